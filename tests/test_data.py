"""Toy data generation, HDF5 layout and validated reading."""

import h5py
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from deepunroll.data.generators import RandomWalkSignals, add_relative_noise
from deepunroll.data.h5 import DatasetError, read_split
from deepunroll.data.make import ensure_dataset, load_split
from deepunroll.pipeline import initial_guess
from deepunroll.validation import ConfigError


def test_random_walks_are_published_signals():
    op = instantiate(compose_config().operator)
    x = RandomWalkSignals().sample(op, 500, torch.Generator().manual_seed(0))
    assert x.shape == (500, 53)
    torch.testing.assert_close(x.min(1).values, -torch.ones(500, dtype=x.dtype))
    torch.testing.assert_close(x.max(1).values, torch.ones(500, dtype=x.dtype))
    again = RandomWalkSignals().sample(op, 500, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    # Laplace(0, 0.5) increments before rescaling have mean |step| = 0.5; after rescaling the
    # relative increments still show heavy tails: kurtosis of a Laplace is 6 (Gaussian 3).
    steps = torch.diff(x, dim=1).flatten()
    kurtosis = ((steps - steps.mean()) ** 4).mean() / steps.var() ** 2
    assert kurtosis > 4.5


def test_relative_noise_level():
    y = torch.randn(2000, 12, dtype=torch.float64)
    noisy = add_relative_noise(y, 0.05, torch.Generator().manual_seed(0))
    ratio = ((noisy - y).norm(dim=1) / y.norm(dim=1)).mean()
    assert abs(ratio.item() - 0.05) < 0.005
    assert add_relative_noise(y, 0.0, torch.Generator()) is y
    with pytest.raises(ValueError, match="data.noise=-0.1"):
        add_relative_noise(y, -0.1, torch.Generator())


def test_make_data_writes_documented_layout(tiny_toy):
    cfg = compose_config(tiny_toy + ["operator.a=1.5"])
    op = instantiate(cfg.operator)
    path = ensure_dataset(cfg.data, op, initial_guess(cfg))
    with h5py.File(path) as f:
        assert f.attrs["format"] == "deepunroll-dataset" and f.attrs["seed"] == 0
        assert f["operator"].attrs["a"] == 1.5
        np.testing.assert_array_equal(f["operator/W1"][()], op.W1.numpy())
        assert f["train/x"].shape == (96, 53) and f["val/y"].shape == (32, 12) and f["test/x0"].shape == (32, 53)
        train, test = f["train/x"][()], f["test/x"][()]
        np.testing.assert_allclose(f["train/y"][()], op(torch.from_numpy(train)).numpy(), rtol=1e-12)
    # disjoint splits: no test signal equals a training signal
    assert not (np.abs(train[:, None, :] - test[None, :, :]).sum(-1) < 1e-12).any()
    # the same config finds the same file; a different `a` makes a different one
    assert ensure_dataset(cfg.data, op, initial_guess(cfg)) == path
    cfg_b = compose_config(tiny_toy + ["operator.a=0.5"])
    assert ensure_dataset(cfg_b.data, instantiate(cfg_b.operator), initial_guess(cfg_b)) != path


def test_mismatched_operator_is_an_error_naming_the_field(tiny_toy):
    cfg = compose_config(tiny_toy + ["operator.a=1.5"])
    path = ensure_dataset(cfg.data, instantiate(cfg.operator), initial_guess(cfg))
    wrong_a = compose_config(tiny_toy + ["operator.a=2.0", f"data.path={path}"])
    with pytest.raises(DatasetError, match=r"operator.a is 1.5 in the file but 2.0 in the config"):
        ensure_dataset(wrong_a.data, instantiate(wrong_a.operator), initial_guess(wrong_a))
    wrong_seed = compose_config(tiny_toy + ["operator.a=1.5", "operator.seed=7", f"data.path={path}"])
    with pytest.raises(DatasetError, match=r"operator.seed is 0 in the file but 7 in the config"):
        ensure_dataset(wrong_seed.data, instantiate(wrong_seed.operator), initial_guess(wrong_seed))
    with h5py.File(path, "r+") as f:  # same seed, different kernel (e.g. drawn by other code)
        f["operator/W1"][0, 0] += 0.01
    with pytest.raises(DatasetError, match=r"operator.W1 is array of shape \(9, 9\) in the file"):
        ensure_dataset(cfg.data, instantiate(cfg.operator), initial_guess(cfg))


def test_n_train_subset_and_pool_limit(tiny_toy):
    cfg = compose_config(tiny_toy + ["data.n_train=40"])
    op = instantiate(cfg.operator)
    path = ensure_dataset(cfg.data, op, initial_guess(cfg))
    assert load_split(cfg.data, op, path, "train")["x"].shape == (40, 53)
    too_many = compose_config(tiny_toy + ["data.n_train=500"])
    with pytest.raises(DatasetError, match=r"data.n_train=500 exceeds the 96 train samples"):
        load_split(too_many.data, op, path, "train")


def test_missing_corrupt_and_nan_files(tiny_toy, tmp_path):
    cfg = compose_config(tiny_toy)
    op = instantiate(cfg.operator)
    with pytest.raises(FileNotFoundError, match="make_data.py"):
        ensure_dataset(cfg.data, op, initial_guess(cfg), generate=False)
    path = ensure_dataset(cfg.data, op, initial_guess(cfg))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        read_split(truncated, "train", None, (53,), (12,))
    with h5py.File(path, "r+") as f:
        f["val/y"][3, 2] = np.nan
    with pytest.raises(DatasetError, match=r"/val/y contains 1 NaN/Inf"):
        read_split(path, "val", None, (53,), (12,))
    with pytest.raises(DatasetError, match=r"/train/x has shape \(96, 53\); expected \(n, 40\)"):
        read_split(path, "train", None, (40,), (12,))


def test_operator_noise_model_scales_each_entry_by_the_operators_std():
    """data.noise_model=operator: y + noise * std * e; the sample std per entry follows std (4000 draws: within
    5 %), level 0 returns y itself, and an operator without noise_std or an unknown model is one clear error."""
    from omegaconf import OmegaConf

    from deepunroll.data.make import add_noise, data_metadata

    class WithStd:
        def noise_std(self):
            return torch.tensor([0.0, 1e-3, 2e-3], dtype=torch.float64)

    y = torch.ones(4000, 3, dtype=torch.float64)
    cfg = OmegaConf.create({"noise": 2.0, "noise_model": "operator"})
    noisy = add_noise(cfg, WithStd(), y, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, 0], y[:, 0])
    assert torch.allclose((noisy - y).std(0)[1:], torch.tensor([2e-3, 4e-3], dtype=torch.float64), rtol=0.05)
    assert add_noise(OmegaConf.create({"noise": 0.0, "noise_model": "operator"}), WithStd(), y, None) is y
    with pytest.raises(ConfigError, match="has no noise model"):
        add_noise(cfg, object(), y, None)
    with pytest.raises(ConfigError, match="data.noise_model='absolute': expected one of relative, operator"):
        add_noise(OmegaConf.create({"noise": 1.0, "noise_model": "absolute"}), WithStd(), y, None)
    generator = type("G", (), {"metadata": lambda self: {}})()
    base = {"name": "toy", "seed": 0, "noise": 1.0, "splits": {"train": 1, "val": 1, "test": 1}}
    assert "noise_model" not in data_metadata(OmegaConf.create(base), generator, generator)
    assert data_metadata(OmegaConf.create({**base, "noise_model": "operator"}), generator, generator)[
        "noise_model"] == "operator"
