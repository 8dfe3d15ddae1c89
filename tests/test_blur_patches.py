"""ImagePatches: offline skimage images, disjoint splits, seeded sampling, initial guess, metadata."""

import socket

import numpy as np
import pytest
import torch

from deepunroll.data.patches import BUNDLED_IMAGES, TEST_IMAGES, TRAIN_IMAGES, VAL_IMAGES, ImagePatches, load_gray
from deepunroll.operators.blur import VolterraBlur2d

SMALL = dict(train_images=["camera", "coins"], val_images=["clock"], test_images=["moon"])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_every_bundled_image_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in BUNDLED_IMAGES:
        image = load_gray(name)
        assert image.ndim == 2 and image.dtype == np.float64
        assert image.min() == 0.0 and image.max() == 1.0


def test_default_splits_use_disjoint_images():
    assert not set(TRAIN_IMAGES) & set(VAL_IMAGES)
    assert not set(TRAIN_IMAGES) & set(TEST_IMAGES)
    assert not set(VAL_IMAGES) & set(TEST_IMAGES)
    ImagePatches()  # the constructor accepts its own defaults


def test_sample_shapes_range_and_seeding():
    source = ImagePatches(patch_size=32, **SMALL)
    op = VolterraBlur2d(image_size=32)
    x = source.sample(op, 10, _gen(0), "train")
    assert x.shape == (10, 32, 32) and x.dtype == torch.float64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x, source.sample(op, 10, _gen(0), "train"))
    assert not torch.equal(x, source.sample(op, 10, _gen(1), "train"))
    assert source.sample(op, 0, _gen(0), "val").shape == (0, 32, 32)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_patches_are_crops_of_their_own_split_only(split):
    source = ImagePatches(patch_size=24, **SMALL)
    patches, origins = source.draw(VolterraBlur2d(image_size=24), 20, _gen(3), split)
    images = source.split_images(split)
    for patch, (index, top, left) in zip(patches.numpy(), origins.tolist()):
        np.testing.assert_array_equal(patch, images[index][top : top + 24, left : left + 24])
    assert source._loaded.keys() == {split}  # other splits' images were never even loaded


def test_grid_stride_draws_without_replacement():
    source = ImagePatches(patch_size=64, stride=64, **SMALL)
    op = VolterraBlur2d(image_size=64)
    patches, origins = source.draw(op, 64, _gen(0), "test")  # moon is 512x512: exactly 64 grid patches
    assert (origins[:, 1:] % 64 == 0).all()
    assert len({tuple(o) for o in origins.tolist()}) == 64
    with pytest.raises(ValueError, match=r"65 test patches requested.*only 64.*data\.stride=null"):
        source.sample(op, 65, _gen(0), "test")


def test_metadata():
    meta = ImagePatches(patch_size=32, **SMALL).metadata()
    assert meta["patch_size"] == 32 and meta["stride"] == -1
    assert meta["train_images"] == ["camera", "coins"] and meta["val_images"] == ["clock"]
    assert meta["test_images"] == ["moon"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train_images": ["camera", "foo"]}, r"data\.train_images contains 'foo'.*astronaut"),
        ({"val_images": ["camera"]}, r"'camera' is in both data\.train_images and data\.val_images"),
        ({"test_images": ["cat"], "train_images": ["chelsea"]}, r"'cat' is in both"),
        ({"test_images": []}, r"data\.test_images is empty"),
        ({"patch_size": 0}, r"data\.patch_size=0"),
        ({"stride": 0}, r"data\.stride=0"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImagePatches(**{**SMALL, **kwargs})


def test_bad_calls_are_rejected():
    source = ImagePatches(patch_size=32, **SMALL)
    with pytest.raises(ValueError, match=r"data\.patch_size=32 does not match.*\(64, 64\)"):
        source.sample(VolterraBlur2d(image_size=64), 4, _gen(0), "train")
    with pytest.raises(ValueError, match=r"split='valid'"):
        source.sample(VolterraBlur2d(image_size=32), 4, _gen(0), "valid")
    with pytest.raises(ValueError, match=r"'microaneurysms' is 102x102, smaller than data\.patch_size=128"):
        ImagePatches(patch_size=128, train_images=["microaneurysms"], val_images=["clock"],
                     test_images=["moon"]).sample(None, 1, _gen(0), "train")
