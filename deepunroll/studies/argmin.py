"""Experiments for embedded optimisation layers (``deepunroll.nets.argmin``), issue 9 item 5.

(a) Learned Huber-TV weights on *linear* problems (1D toy and 2D blur, both at a = 0): a tiny CNN
    maps the back-projection A^T y to per-pixel weights w = softplus(.) that feed
    ``ArgminLayer(HuberTVEnergy(A))``; the same model is trained for the same number of steps with
    each backward mode (``unroll``, ``implicit``, ``lagrangian`` central). Reported: test PSNR,
    training seconds, bytes autograd keeps per step, and the cosine between each mode's first
    gradient and the implicit gradient of a converged solve. -> results/argmin_tv.{csv,md}
(b) EIT (``study=argmin_eit``, deepunroll/studies/argmin_eit.py): LPGD-RMA (deepunroll.pipeline.build_problem, short Adam loop with the Trainer's settings)
    followed by ``ArgminLayer(LabelEnergy(labels=[0.5, 1, 2], mu, element neighbours), ICM)``.
    After pre-training the plain network, three branches get the same extra budget: the plain
    network (labelled post hoc), and the labelled network fine-tuned end to end with ``lagrangian``
    or ``straight_through``. Reported per seed: relative error and per-element label accuracy on
    the test split. -> results/argmin_eit.{csv,md}, figures/argmin_eit.png

    python scripts/reproduce.py study=argmin        # (a)
    python scripts/reproduce.py study=argmin_eit    # (b)
"""

from __future__ import annotations

import copy
import functools
import math
import time
from pathlib import Path

import torch
from torch import nn

from deepunroll import metrics
from deepunroll.data.generators import RandomWalkSignals, add_relative_noise
from deepunroll.data.patches import ImagePatches
from deepunroll.nets.argmin import ArgminLayer
from deepunroll.optim.descent import GradientDescent
from deepunroll.nets.energies import HuberTVEnergy
from deepunroll.operators.blur import VolterraBlur2d
from deepunroll.operators.toy import NonlinearConv1d
from deepunroll.studies.common import format_mean_std, load_profile, run_claimed
from deepunroll.tables import write_csv
from deepunroll.train.checkpoint import seed_everything
from deepunroll.train.memory import count_saved_bytes

TV_MODES = ("unroll", "implicit", "lagrangian")
TV_COLUMNS = ["problem", "mode", "seed", "steps", "test_psnr", "initial_psnr", "train_seconds", "saved_bytes",
              "grad_cos_vs_implicit", "mean_weight"]

# shared settings (not per profile)
TV = {"delta": 0.05, "ridge": 1e-3, "w_init": 0.01, "noise": 0.01, "lr": 1e-2, "tol": 1e-9, "tau": 1e-3}


# ---------------------------------------------------------------------------------------- (a) Huber-TV
class WeightedTV(nn.Module):
    """x*(y) = argmin_x 1/2 ||A x - y||^2 + sum_i w_i(y) sum_d huber((D_d x)_i) + ridge/2 ||x||^2.

    w(y) = softplus(cnn(A^T y) + b0), the CNN's last layer zero-initialised so that w starts at the
    constant ``w_init`` in every mode.
    """

    def __init__(self, operator, ndim: int, backward: str, n_iter: int, delta: float, ridge: float,
                 w_init: float, tau: float, tol: float):
        super().__init__()
        conv = nn.Conv1d if ndim == 1 else nn.Conv2d
        self.operator = operator
        self.cnn = nn.Sequential(conv(1, 8, 3, padding=1), nn.Softplus(), conv(8, 1, 3, padding=1))
        nn.init.zeros_(self.cnn[2].weight)
        nn.init.zeros_(self.cnn[2].bias)
        self.register_buffer("b0", torch.tensor(math.log(math.expm1(w_init))))
        energy = HuberTVEnergy(operator, ndim=ndim, delta=delta, ridge=ridge)
        self.layer = ArgminLayer(energy, GradientDescent(n_iter=n_iter, tol=tol), backward=backward, tau=tau,
                                 side="central")

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = y.new_zeros((y.shape[0], *self.operator.in_shape)).requires_grad_()
            (back,) = torch.autograd.grad(self.operator(x), x, y.detach())
        return back

    def weights(self, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(self.cnn(self.adjoint(y)[:, None])[:, 0] + self.b0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer(y, self.weights(y))


def tv_problem(name: str, n_train: int, n_test: int, image_size: int, seed: int = 0):
    """(operator, ndim, (x, y) train, (x, y) test), float64, noise TV['noise'], data seed fixed."""
    gen = torch.Generator().manual_seed(seed)
    if name == "toy1d":
        operator, ndim = NonlinearConv1d(a=0.0), 1  # published geometry: 53 samples, 12 windows
        source = RandomWalkSignals()
        x_train, x_test = source.sample(operator, n_train, gen), source.sample(operator, n_test, gen)
    elif name == "blur2d":
        operator, ndim = VolterraBlur2d(image_size=image_size, a=0.0), 2
        source = ImagePatches(patch_size=image_size)
        x_train, x_test = source.sample(operator, n_train, gen, "train"), source.sample(operator, n_test, gen, "test")
    else:
        raise ValueError(f"unknown TV problem {name!r}; expected toy1d or blur2d")
    operator = operator.double()
    with torch.no_grad():
        y_train = add_relative_noise(operator(x_train), TV["noise"], gen)
        y_test = add_relative_noise(operator(x_test), TV["noise"], gen)
    return operator, ndim, (x_train, y_train), (x_test, y_test)


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _tv_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i log(mse_i / max(range(x_i), 0.1)^2) over the batch: minus the test PSNR (mean over samples) up to
    a factor 10 / ln 10, with the range floored so that flat patches do not divide by zero.

    The unlogged sum of normalised squared errors let flat patches dominate: on the 2D blur it fell by 5 %
    on the test set while the mean PSNR fell below its initial value."""
    mse = (x_hat - x).pow(2).flatten(1).mean(1)
    return (mse / metrics.data_range(x).clamp_min(0.1).square()).log().sum()


@torch.no_grad()
def _tv_psnr(model: WeightedTV, x: torch.Tensor, y: torch.Tensor, eval_iter: int) -> float:
    layer = model.layer
    backward, solver = layer.backward, layer.solver
    layer.backward, layer.solver = "implicit", GradientDescent(n_iter=eval_iter, tol=TV["tol"])
    try:
        x_hat = model(y)
    finally:
        layer.backward, layer.solver = backward, solver
    return float(metrics.psnr(x_hat, x).mean())


def tv_run(problem: str, mode: str, seed: int, cfg: dict, data) -> dict:
    """Train the weight CNN with one backward mode for cfg['steps'] Adam steps; one table row."""
    operator, ndim, (x_train, y_train), (x_test, y_test) = data
    seed_everything(seed)
    model = WeightedTV(operator, ndim, mode, cfg["n_iter"], TV["delta"], TV["ridge"], TV["w_init"], TV["tau"],
                       TV["tol"]).double()
    initial_psnr = _tv_psnr(model, x_test, y_test, cfg["eval_iter"])
    batch = cfg["batch"]
    # gradient quality at the start: cosine to the implicit gradient of a converged solve, same batch
    reference = copy.deepcopy(model)
    reference.layer.backward, reference.layer.solver = "implicit", GradientDescent(n_iter=20 * cfg["n_iter"],
                                                                                   tol=1e-13)
    _tv_loss(reference(y_train[:batch]), x_train[:batch]).backward()
    model.zero_grad()
    _tv_loss(model(y_train[:batch]), x_train[:batch]).backward()
    g, g_ref = _flat_grad(model), _flat_grad(reference)
    cosine = float(g @ g_ref / (g.norm() * g_ref.norm()).clamp_min(1e-300))
    model.zero_grad()
    # bytes autograd keeps for one step's backward
    out, saved = count_saved_bytes(model, y_train[:batch])
    del out
    optimiser = torch.optim.Adam(model.parameters(), lr=TV["lr"])
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(cfg["steps"]):
        index = torch.randint(len(x_train), (batch,), generator=gen)
        optimiser.zero_grad()
        loss = _tv_loss(model(y_train[index]), x_train[index])
        loss.backward()
        optimiser.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        mean_weight = float(model.weights(y_test).mean())
    return {"problem": problem, "mode": mode, "seed": seed, "steps": cfg["steps"],
            "test_psnr": _tv_psnr(model, x_test, y_test, cfg["eval_iter"]), "initial_psnr": initial_psnr,
            "train_seconds": seconds, "saved_bytes": saved, "grad_cos_vs_implicit": cosine, "mean_weight": mean_weight}


def tv_table(rows: list[dict]) -> str:
    lines = ["| problem | backward | test PSNR (dB) | PSNR at init (dB) | train time (s) | saved bytes / step | "
             "cos(grad, implicit) at init | mean w |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for mode in TV_MODES:
            rs = [r for r in rows if r["problem"] == problem and r["mode"] == mode]
            if not rs:
                continue
            lines.append(f"| {problem} | {mode} | {format_mean_std([r['test_psnr'] for r in rs], 2)} | "
                         f"{format_mean_std([r['initial_psnr'] for r in rs], 2)} | "
                         f"{format_mean_std([r['train_seconds'] for r in rs], 1)} | {int(rs[0]['saved_bytes']):,} | "
                         f"{format_mean_std([r['grad_cos_vs_implicit'] for r in rs], 6)} | "
                         f"{format_mean_std([r['mean_weight'] for r in rs], 3)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ common
def _write(rows: list[dict], columns: list[str], md: str, stem: Path) -> None:
    write_csv(rows, stem.with_suffix(".csv"), columns)
    stem.with_suffix(".md").write_text(md)


def run(profile: str = "quick", out_dir: str | Path = ".", runs_dir: str | Path | None = None,
        report_only: bool = False) -> dict:
    """Run (or resume) the Huber-TV experiment; writes out_dir/results/argmin_tv.{csv,md} (EIT: study argmin_eit).

    One (problem, backward mode, seed) is one resumable unit (:func:`deepunroll.studies.common.run_claimed`)
    in ``runs_dir/argmin_<profile>/`` (default out_dir/runs/reproduce); its row is its result.json.
    """
    spec = load_profile("argmin", profile)  # configs/reproduce/argmin.yaml
    out_dir = Path(out_dir)
    runs_dir = (Path(runs_dir) if runs_dir else out_dir / "runs" / "reproduce") / f"argmin_{profile}"
    tv_cfg = spec["tv"]

    tv_rows, pending = [], 0
    for problem in tv_cfg["problems"]:
        n_train = max(tv_cfg["steps"] * tv_cfg["batch"], 64) if profile != "tiny" else 16
        data = functools.cache(lambda: tv_problem(problem, n_train, tv_cfg["n_test"], tv_cfg["image_size"]))
        for seed in tv_cfg["seeds"]:
            for mode in TV_MODES:
                row = run_claimed(runs_dir / f"{problem}_{mode}_seed={seed}",
                                  lambda: tv_run(problem, mode, seed, tv_cfg, data()), report_only)
                if row is None:
                    pending += 1
                    continue
                tv_rows.append(row)
                print(f"[tv] {problem} {mode} seed {seed}: PSNR {row['test_psnr']:.2f} dB (init "
                      f"{row['initial_psnr']:.2f}), {row['train_seconds']:.1f} s, {row['saved_bytes']:,} B, "
                      f"cos {row['grad_cos_vs_implicit']:.6f}", flush=True)
    if pending:
        print(f"{pending} runs not finished (in other processes, or report_only)")
    if not tv_rows:
        return {"tv": []}
    settings = (f"loss sum_i log(mse_i / max(range(x_i), 0.1)^2) (minus the PSNR), {tv_cfg['steps']} Adam steps "
                f"(lr {TV['lr']}), batch {tv_cfg['batch']}, forward FISTA "
                f"<= {tv_cfg['n_iter']} iterations (tol {TV['tol']}), delta {TV['delta']}, ridge {TV['ridge']}, "
                f"w starts at {TV['w_init']}, lagrangian central tau {TV['tau']}, noise {TV['noise']}, "
                f"test PSNR on {tv_cfg['n_test']} samples with a {tv_cfg['eval_iter']}-iteration solve")
    _write(tv_rows, TV_COLUMNS, f"# Learned Huber-TV weights by backward mode ({profile} profile)\n\n{settings}\n\n"
           f"{tv_table(tv_rows)}\n", out_dir / "results" / "argmin_tv")

    return {"tv": tv_rows}
