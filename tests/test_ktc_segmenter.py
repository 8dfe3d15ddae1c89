"""The learned KTC segmentation (deepunroll/realdata/ktc_segmenter.py) on our own tank mesh, without measured data:
input images, the U-Net's shapes and errors, training on a synthetic rule it must learn from the input it is
given (and cannot learn without it), the checkpoint round trip, and export_model's extra entries."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deepunroll.realdata import ktc2023
from deepunroll.realdata.ktc_learned import TankImages
from deepunroll.realdata.ktc_segmenter import KTCSegmentation, SegmenterInputs, TankSegmenter, train_segmenter
from deepunroll.realdata.pixel_grid import PixelMap
from deepunroll.train.checkpoint import export_model, load, save_atomic

BACKGROUND = 0.8


@pytest.fixture(scope="module")
def tank():
    """Our tank mesh at h0 0.2 (a stand-in operator: nodes, elements, centroids, background)."""
    nodes, elements, _ = ktc2023.tank_mesh(0.2)
    nodes, elements = torch.tensor(nodes), torch.tensor(elements)
    return SimpleNamespace(nodes=nodes, elements=elements, centroids=nodes[elements].mean(1), background=BACKGROUND,
                           n_in=elements.shape[0])


def disks(tank, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (n, E), classes (n, E)): one disk of radius 0.035 m per sample, resistive (0.1 x) or conductive
    (5 x) by a coin, at a random centre within 0.06 m of the middle."""
    g = torch.Generator().manual_seed(seed)
    centre = (torch.rand(n, 1, 2, generator=g, dtype=torch.float64) - 0.5) * 0.12
    inside = (tank.centroids[None] - centre).norm(dim=-1) < 0.035
    conductive = torch.rand(n, 1, generator=g) < 0.5
    classes = inside.long() * torch.where(conductive, 2, 1)
    sigma = torch.full(classes.shape, BACKGROUND, dtype=torch.float64)
    sigma = torch.where(classes == 1, 0.1 * BACKGROUND, torch.where(classes == 2, 5.0 * BACKGROUND, sigma))
    return sigma, classes


class Echo(torch.nn.Module):
    """A stand-in reconstruction network: returns y (the 'measurement' is the conductivity itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, y, x0):
        return y


class Gated(torch.nn.Module):
    """A stand-in network that hides y until trained: sigma = sigma_bg (y / sigma_bg)^a, a learnable, a = 0 at
    first (a uniform tank: no information for the segmenter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, y, x0):
        return BACKGROUND * torch.exp(self.a * torch.log(y / BACKGROUND))


def dataset(tank, n: int, seed: int):
    sigma, classes = disks(tank, n, seed)
    noise = torch.randn(sigma.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return SimpleNamespace(y=sigma, x0=0.01 * noise, x=sigma), classes


def test_inputs_are_log_contrast_scaled_x0_and_the_tank(tank):
    """Background sigma gives log contrast 0 inside the tank; x0 appears divided by sigma_bg; the last channel is
    the tank indicator; classes take each pixel's triangle. Bad input names are one error."""
    features = SegmenterInputs(tank, ("sigma", "x0"), n=32)
    sigma = torch.full((2, tank.n_in), BACKGROUND, dtype=torch.float64)
    sigma[1] *= np.e
    x0 = torch.full((2, tank.n_in), 0.4, dtype=torch.float64)
    images = features(sigma, x0)
    inside = images[0, 2] > 0.5
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert 600 < inside.sum() < 32 * 32 * np.pi / 4
    assert images[0, 0].abs().max() < 1e-6
    np.testing.assert_allclose(images[1, 0][inside].numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(images[0, 1][inside].numpy(), 0.5, atol=1e-6)
    assert images[:, :2][:, :, ~inside].abs().max() == 0
    _, classes = disks(tank, 3, 0)
    pixels = features.classes(classes)
    assert pixels.shape == (3, 32, 32) and set(pixels.unique().tolist()) <= {0, 1, 2}
    assert [int((pixels[k] > 0).sum()) > 20 for k in range(3)] == [True] * 3
    assert (pixels[:, ~inside] == 0).all()
    with pytest.raises(ValueError, match=r"segmenter inputs \['sigma', 'y'\]: expected distinct names"):
        SegmenterInputs(tank, ("sigma", "y"))


def test_unet_shapes_and_errors():
    net = TankSegmenter(3, 16)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="channels=12: expected a multiple of 8"):
        TankSegmenter(3, 12)


@pytest.fixture(scope="module")
def trained(tank):
    """Segmenters trained for 15 epochs on 128 synthetic disks (a few seconds each): one reading the 'network
    output' (which shows the disk and its class), one reading only x0 (noise without the disk)."""
    (train, _), (val, _) = dataset(tank, 128, 0), dataset(tank, 32, 10)
    labels = lambda sigma: (sigma < 0.5 * BACKGROUND).long() + 2 * (sigma > 2 * BACKGROUND).long()  # noqa: E731
    sets = {"train": train, "val": val}
    kwargs = dict(n=32, channels=16, epochs=15, batch_size=16, lr=3e-3, seed=0, progress=False)
    with_sigma = train_segmenter(Echo(), tank, sets, labels, ("sigma", "x0"), **kwargs)
    x0_only = train_segmenter(Echo(), tank, sets, labels, ("x0",), **kwargs)
    return with_sigma, x0_only


def test_segmenter_learns_the_classes_from_its_input_and_not_without_it(tank, trained):
    """Reading the output: validation cross-entropy below 0.1, at least 95 % of the 256 x 256 test pixels right and
    80 % of the inclusion pixels (measured 0.077, 98.4 %, 84 %); reading only x0 (no information): cross-entropy
    above 0.2 (measured 0.256, the classes' prior) and no inclusion pixel found. One history entry per epoch."""
    (segmentation, history), (x0_segmentation, x0_history) = trained
    assert [h["epoch"] for h in history] == list(range(1, 16)) and all(h["skipped"] == 0 for h in history)
    assert min(h["val_ce"] for h in history) < 0.1 < 0.2 < min(h["val_ce"] for h in x0_history)
    test, classes = dataset(tank, 8, 20)
    truth = np.rint(PixelMap(tank.nodes.numpy(), tank.elements.numpy(), mode="element")(classes)).astype(np.uint8)
    labels = segmentation.labels(test.y, test.x0)
    assert labels.shape == (8, 256, 256) and labels.dtype == np.uint8
    assert (labels == truth).mean() > 0.95 and (labels == truth)[truth > 0].mean() > 0.8
    assert (x0_segmentation.labels(test.y, test.x0) > 0).sum() == 0


def test_end_to_end_training_trains_the_network_for_the_labels(tank):
    """With network_lr the cross-entropy reaches the network's weights: the gated network, which shows nothing
    until trained, learns to open (a 0 -> -0.87: the contrast flipped, which the segmenter reads as well) and its
    segmenter then finds the classes (validation CE 0.071); with the network frozen the same setting learns only
    the classes' prior (CE 0.250, a stays 0). End to end needs the sigma input."""
    (train, _), (val, _) = dataset(tank, 128, 0), dataset(tank, 32, 10)
    labels = lambda sigma: (sigma < 0.5 * BACKGROUND).long() + 2 * (sigma > 2 * BACKGROUND).long()  # noqa: E731
    sets = {"train": train, "val": val}
    kwargs = dict(n=32, channels=16, epochs=15, batch_size=16, lr=3e-3, seed=0, progress=False)
    frozen, joint = Gated(), Gated()
    _, frozen_history = train_segmenter(frozen, tank, sets, labels, ("sigma", "x0"), **kwargs)
    _, joint_history = train_segmenter(joint, tank, sets, labels, ("sigma", "x0"), network_lr=0.05, **kwargs)
    assert frozen.a.item() == 0.0 and min(h["val_ce"] for h in frozen_history) > 0.2
    assert min(h["val_ce"] for h in joint_history) < 0.1 and abs(joint.a.item()) > 0.5
    with pytest.raises(ValueError, match="end to end \\(network_lr\\): its inputs must include 'sigma'"):
        train_segmenter(Gated(), tank, sets, labels, ("x0",), network_lr=0.05, **kwargs)


def test_checkpoint_round_trip_and_export_extras(tank, trained, tmp_path):
    """to_plain -> from_plain gives the same labels; export_model writes the extra entry, carries it over from a
    source that has one, and refuses an extra that would replace the model's own entries."""
    segmentation, history = trained[0]
    test, _ = dataset(tank, 4, 30)
    entry = segmentation.to_plain(history)
    again = KTCSegmentation.from_plain(entry, tank)
    np.testing.assert_array_equal(again.labels(test.y, test.x0), segmentation.labels(test.y, test.x0))
    with pytest.raises(ValueError, match=r"segmenter reads 3 images, its inputs give 2"):  # sigma, x0, tank; x0, tank
        KTCSegmentation(SegmenterInputs(tank, ("x0",), 32), segmentation.segmenter)
    source = tmp_path / "source.pt"
    save_atomic({"model": {"w": torch.zeros(2)}, "config": {"config": {"a": 1}}}, source)
    export_model(source, tmp_path / "with.pt", extra={"segmenter": entry})
    assert set(load(tmp_path / "with.pt")) >= {"model", "config", "segmenter"}
    export_model(tmp_path / "with.pt", tmp_path / "again.pt")
    carried = load(tmp_path / "again.pt")["segmenter"]
    assert carried["inputs"] == ["sigma", "x0"] and carried["grid"] == 32 and len(carried["history"]) == 15
    with pytest.raises(KeyError, match=r"extra entries \['model'\] would replace the model's own"):
        export_model(source, tmp_path / "bad.pt", extra={"model": {}})
    export_model(source, tmp_path / "tuned.pt", weights={"w": torch.ones(2)})  # a network trained on
    assert load(tmp_path / "tuned.pt")["model"]["w"].tolist() == [1.0, 1.0]


def test_learned_rule_needs_a_segmenter(tank):
    with pytest.raises(ValueError, match=r"segmentation='learned': the model has no trained segmenter"):
        TankImages(tank, "learned")
    assert "learned" not in TankImages(tank, "log_otsu").rules()
