"""2D blur experiments: configs compose and build, 2D networks are batch independent, train -> CSV + figure."""

import csv

import matplotlib.image
import pytest
import torch
from torch import nn

from conftest import CONFIGS, compose_config
from deepunroll.evaluation import evaluate_to_files
from deepunroll.nets.convlstm import ConvLSTMAccelerator
from deepunroll.pipeline import build_problem, initial_guess, load_model, train

BLUR = ["blur2d_lpd", "blur2d_lpd_rma", "blur2d_lpgd", "blur2d_lpgd_ma", "blur2d_lpgd_rma"]
ACCELS = {
    "none": ["accel=none"],
    "momentum": ["accel=momentum", "accel.eta=0.2"],
    "rma_lstm": ["accel=rma", "accel.cell=lstm", "accel.hidden=8"],
    "rma_convlstm": ["accel=convlstm", "accel.channels_hidden=4"],
}


def test_blur_experiments_exist():
    assert sorted(p.stem for p in (CONFIGS / "experiment").glob("blur2d_*.yaml")) == BLUR


@pytest.mark.parametrize("experiment", BLUR)
@pytest.mark.parametrize("accel", [None, "rma"])
def test_blur_experiment_composes_with_2d_networks(experiment, accel):
    if accel and not experiment.endswith("_rma"):
        pytest.skip("the fully connected RMA replaces the convolutional one of the _rma experiments")
    cfg = compose_config([f"+experiment={experiment}"] + ([f"accel={accel}"] if accel else []))
    assert cfg.name == experiment and cfg.data.generator.patch_size == cfg.operator.image_size
    assert {"psnr", "ssim"} <= set(cfg.data.metrics)
    operator, _, model = build_problem(cfg)
    assert len(operator.in_shape) == 2
    convs = [m for m in model.step.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert convs and all(isinstance(m, nn.Conv2d) for m in convs)
    if experiment.endswith("_rma"):
        assert isinstance(model.accelerator, ConvLSTMAccelerator) == (accel is None)
    y = torch.rand(2, *operator.out_shape)
    assert model(y, torch.rand(2, *operator.in_shape)).shape == (2, *operator.in_shape)


@pytest.mark.parametrize("net", ["lpgd", "lpd"])
@pytest.mark.parametrize("accel", list(ACCELS))
def test_2d_networks_shapes_and_batch_independence_float64(net, accel):
    cfg = compose_config([
        "operator=blur2d", "data=blur2d", f"net={net}", "operator.image_size=8", "operator.kernel_size=3",
        "operator.stride=2", "net.n_iter=2", "net.step.hidden=8", "train.dtype=float64", *ACCELS[accel],
    ])
    torch.manual_seed(0)
    operator, generator, model = build_problem(cfg)
    assert operator.in_shape == (8, 8) and operator.out_shape == (4, 4)
    x = torch.rand(5, 8, 8, dtype=torch.float64)
    y = operator(x)
    x0 = initial_guess(cfg)(operator, y)
    batched = model(y, x0)
    singles = torch.cat([model(y[i : i + 1], x0[i : i + 1]) for i in range(5)])
    assert batched.shape == (5, 8, 8) and batched.dtype == torch.float64
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-12)


def test_tiny_training_lowers_loss_and_evaluation_writes_csv_and_figure(tmp_path):
    cfg = compose_config([
        "+experiment=blur2d_lpgd_rma", "operator.image_size=16", f"data.root={tmp_path / 'data'}",
        "data.splits.train=96", "data.splits.val=16", "data.splits.test=16", "net.n_iter=2",
        "net.step.hidden=8", "accel.channels_hidden=4", "train.epochs=3", "train.batch_size=16", "train.device=cpu",
        "train.lr=3e-3",
    ])
    result = train(cfg, tmp_path / "run")
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    rows, written = evaluate_to_files([result["best"]])
    csv_path, png_path = written
    assert csv_path.name == "best_test_metrics.csv" and png_path.name == "best_test_reconstructions.png"
    table = list(csv.DictReader(open(csv_path)))
    assert [r["method"] for r in table] == ["x0", "blur2d_lpgd_rma"]
    assert 0 < float(table[1]["ssim_mean"]) <= 1 and "psnr_std" in table[1]
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and min(image.shape[:2]) > 300  # 4 rows (samples) x 4 columns (x, y, x0, network)

    model = load_model(result["best"])
    x_hat = model.reconstruct(torch.rand(2, 16, 16, dtype=torch.float64))
    assert x_hat.shape == (2, 16, 16) and torch.isfinite(x_hat).all()
