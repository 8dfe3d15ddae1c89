"""How much does a data-fit direction say about the error? Nothing is trained (``study=direction_alignment``).

    python scripts/reproduce.py study=direction_alignment profile=published   # configs/reproduce/direction_alignment.yaml

At points x near the truth x* (x* smoothed by ``smoothing`` steps of the mesh mean stencil of
:mod:`deepunroll.nets.mesh_conv`, x <- x + 0.5 (mean of the neighbours - x): errors at the inclusion boundaries,
like a trained network's), for every noise level and ``net.direction`` setting of the profile, the direction d(x)
the blocks would read and the error e = x - x*: the cosine cos(d, e) (mean over test samples) and the error left
by the best scalar step, min_a ||e - a d|| / ||e||. A direction with a larger cosine carries more of the error the
measurements can still correct; the damping of ``gauss_newton`` that maximises it depends on the noise.
Writes results/direction_alignment_<profile>.{csv,md}.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepunroll.nets.direction import DataFit
from deepunroll.nets.mesh_conv import element_stencils
from deepunroll.studies.common import load_profile, markdown_table
from deepunroll.tables import write_csv

COLUMNS = ["noise", "signal", "cosine", "best_step_error_ratio", "best_step", "initial_rms_error"]


def smoothed(x: torch.Tensor, element_mesh, steps: int) -> torch.Tensor:
    """x (B, E) after ``steps`` steps x <- x + 0.5 (mean of the vertex-sharing neighbours - x)."""
    support, weights = element_stencils(*(a.cpu().numpy() for a in element_mesh))
    mean = weights[:, 0].to(x.dtype)
    for _ in range(steps):
        x = x + 0.5 * torch.einsum("ek,bek->be", mean, x[:, support])
    return x


def alignment(direction: torch.Tensor, error: torch.Tensor) -> dict[str, float]:
    """Mean cosine of d and e, mean error ratio and median step a* of the best scalar step (B, n) each."""
    step = (direction * error).sum(1) / direction.square().sum(1)
    left = (error - step[:, None] * direction).norm(dim=1) / error.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(direction, error, dim=1)
    return {"cosine": float(cosine.mean()), "best_step_error_ratio": float(left.mean()),
            "best_step": float(step.median())}


def run(profile: str, out_dir: Path, runs_dir: Path | None = None) -> list[dict]:
    from deepunroll.pipeline import compose_config, load_datasets
    from hydra.utils import instantiate

    spec = load_profile("direction_alignment", profile)
    rows = []
    for noise in spec["noise"]:
        cfg = compose_config([f"+experiment={spec['experiment']}", *spec["base"], f"data.noise={noise}",
                              f"data.root={(Path(runs_dir) if runs_dir else out_dir / 'runs' / 'reproduce') / 'data'}"])
        operator = instantiate(cfg.operator)
        test = load_datasets(cfg, operator, splits=("test",))["test"]
        truth = test.x[: spec["samples"]].double()
        y = test.y[: spec["samples"]].double()
        x = smoothed(truth, operator.element_mesh(), spec["smoothing"])
        error = x - truth
        for signal, settings in spec["signals"].items():
            data_fit = DataFit(operator, **settings)
            with torch.no_grad():
                direction, _ = data_fit.misfit_direction(operator, x, y)
            rows.append({"noise": noise, "signal": signal, **alignment(direction, error),
                         "initial_rms_error": float(error.square().mean().sqrt())})
    _write(profile, out_dir, rows, spec)
    return rows


def _write(profile: str, out_dir: Path, rows: list[dict], spec: dict) -> None:
    results = out_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    write_csv(rows, results / f"direction_alignment_{profile}.csv", COLUMNS)
    table = markdown_table(["noise", "signal", "cos(d, x - x*)", "error left by the best step", "best step a*"],
                           [[r["noise"], r["signal"], f"{r['cosine']:.3f}", f"{r['best_step_error_ratio']:.3f}",
                             f"{r['best_step']:.2f}"] for r in rows])
    text = (f"# Data-fit directions against the error, profile `{profile}`\n\n"
            f"`python scripts/reproduce.py study=direction_alignment profile={profile}`; experiment "
            f"`{spec['experiment']}` with `{' '.join(spec['base'])}`; {spec['samples']} test samples; x = the truth "
            f"after {spec['smoothing']} smoothing steps (rms error {rows[0]['initial_rms_error']:.3f}). Nothing is "
            "trained (deepunroll/studies/direction_alignment.py).\n\n" + table + "\n")
    (results / f"direction_alignment_{profile}.md").write_text(text)
