"""Our LPGD-RMA against deepinv's unfolded proximal gradient with the same CNN block, on the 2D Volterra blur.

    python scripts/reproduce.py study=deepinv_side_by_side      # needs the [deepinv] extra

Same data (``+experiment=blur2d_lpgd_rma train=smoke``: 1,000 training patches of 32 x 32, a = 1, 1 % noise),
same budget (epochs, batch size, Adam settings and gradient clipping of ``train=smoke``, best validation
epoch kept), same initial guess x0 and the same number of iterations. Ours: x_{k+1} = x_k + Lambda_k([x_k,
v_k]) with the ConvLSTM momentum v_k of J^T (F(x_k) - y). deepinv: ``deepinv.optim.PGD(unfold=True)``,
x_{k+1} = D_k(x_k - tau_k J^T (F(x_k) - y)) with D_k(x) = x + Lambda_k(x) as its PnP denoiser, one learned
step size per iteration; Lambda_k is our CNN block (``conv_block``, hidden 32, 4 convolutions, zero-initialised
last layer) with one input channel instead of two. Test MSE/PSNR/SSIM per seed and the paired PSNR
differences go to results/deepinv_side_by_side_<profile>.{csv,md}.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from deepunroll.studies.common import format_mean_std, load_profile, markdown_table, paired, run_claimed, run_one
from deepunroll.tables import write_csv

EXPERIMENT = ["+experiment=blur2d_lpgd_rma", "train=smoke", "train.device=cpu", "evaluate=false"]
COLUMNS = ["method", "seed", "mse", "psnr", "ssim", "n_params", "epochs", "train_seconds", "git_commit"]


class ResidualDenoiser(torch.nn.Module):
    """deepinv's denoiser interface D(x, sigma) = x + block(x) on (B, 1, H, W) (sigma unused)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, sigma=None) -> torch.Tensor:
        return x + self.block(x)


def deepinv_unfolded_pgd(cfg, operator):
    """deepinv's unfolded PGD with per-iteration residual CNN denoisers and learned step sizes."""
    import deepinv

    from deepunroll.nets.blocks import conv_block

    step = cfg.net.step
    n_iter = int(cfg.net.n_iter)
    priors = [deepinv.optim.PnP(denoiser=ResidualDenoiser(conv_block(1, 1, int(step.hidden), int(step.n_conv), 2,
                                                                     bool(step.zero_init))))
              for _ in range(n_iter)]
    return deepinv.optim.PGD(data_fidelity=deepinv.optim.L2(), prior=priors, stepsize=[0.3] * n_iter,
                             sigma_denoiser=[0.0] * n_iter, max_iter=n_iter, unfold=True,
                             trainable_params=["stepsize"], early_stop=False)


def train_deepinv(cfg, run_dir: Path) -> dict:
    """Train the deepinv model on the run's data with the config's budget; test scores of the best epoch."""
    from deepunroll.interop.deepinv import OperatorPhysics
    from deepunroll.metrics import METRICS
    from deepunroll.pipeline import build_problem, load_datasets
    from deepunroll.train.checkpoint import seed_everything

    seed_everything(int(cfg.seed))
    operator, _, _ = build_problem(cfg, "cpu")
    data = load_datasets(cfg, operator, splits=("train", "val", "test"))
    physics = OperatorPhysics(operator)
    model = deepinv_unfolded_pgd(cfg, operator)
    settings = cfg.train
    optimizer = torch.optim.Adam(model.parameters(), lr=float(settings.lr), betas=tuple(settings.betas))
    generator = torch.Generator().manual_seed(int(cfg.seed))

    def run(split, index=slice(None)):
        d = data[split]
        return model(d.y[index][:, None], physics, init=d.x0[index][:, None])[:, 0]

    best, best_state, start = math.inf, None, time.perf_counter()
    n = len(data["train"])
    for _ in range(int(settings.epochs)):
        model.train()
        for batch in torch.randperm(n, generator=generator).split(int(settings.batch_size)):
            loss = (run("train", batch) - data["train"].x[batch]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(settings.grad_clip))
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val = float((run("val") - data["val"].x).square().mean())
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    with torch.no_grad():
        estimate = run("test")
    truth = data["test"].x
    scores = {name: float(METRICS[name](estimate, truth).mean()) for name in ("mse", "psnr", "ssim")}
    return {"scores": scores, "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "epochs": int(settings.epochs), "train_seconds": time.perf_counter() - start}


def run(profile: str, out_dir: Path, runs_dir: Path | None = None, report_only: bool = False) -> list[dict]:
    from deepunroll.pipeline import compose_config
    from deepunroll.record import git_commit
    from deepunroll.validation import ConfigError

    spec = load_profile("deepinv_side_by_side", profile)  # configs/reproduce/deepinv_side_by_side.yaml
    try:
        import deepinv  # noqa: F401
    except ImportError:
        raise ConfigError("study=deepinv_side_by_side needs deepinv: pip install -e \".[deepinv]\"") from None
    runs_dir = Path(runs_dir) if runs_dir else out_dir / "runs" / "reproduce"
    rows, x0_row = [], None
    for seed in spec["seeds"]:
        overrides = EXPERIMENT + spec["overrides"] + [f"seed={seed}", f"data.root={runs_dir / 'data'}"]
        ours = run_one(overrides, runs_dir / f"side_by_side_{profile}_ours_s{seed}", {"seed": seed}, report_only)
        cfg = compose_config(overrides)
        theirs = run_claimed(runs_dir / f"side_by_side_{profile}_deepinv_s{seed}",
                             lambda: train_deepinv(cfg, runs_dir) | {"git_commit": git_commit()}, report_only)
        if ours:
            rows.append({"method": "ours: LPGD-RMA (ConvLSTM)", "seed": seed, **{k: ours["scores"][f"{k}_mean"]
                         for k in ("mse", "psnr", "ssim")}, "n_params": ours["n_params"], "epochs": ours["epochs"],
                         "train_seconds": round(ours["train_seconds"]), "git_commit": ours["git_commit"]})
            x0_row = x0_row or {k: ours["baseline"][f"{k}_mean"] for k in ("mse", "psnr", "ssim")}  # same data
        if theirs:
            rows.append({"method": "deepinv: unfolded PGD (PnP CNN)", "seed": seed, **theirs["scores"],
                         "n_params": theirs["n_params"], "epochs": theirs["epochs"],
                         "train_seconds": round(theirs["train_seconds"]), "git_commit": theirs["git_commit"]})
    write_csv(rows, out_dir / "results" / f"deepinv_side_by_side_{profile}.csv", COLUMNS)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    body = [[m, len([r for r in rows if r["method"] == m]),
             *[format_mean_std([r[k] * (1e3 if k == "mse" else 1) for r in rows if r["method"] == m], digits)
               for k, digits in (("mse", 3), ("psnr", 2), ("ssim", 4))],
             next(r["n_params"] for r in rows if r["method"] == m)] for m in methods]
    if x0_row:
        body.insert(0, ["x0 (constant-image inverse)", "", f"{1e3 * x0_row['mse']:.3f}", f"{x0_row['psnr']:.2f}",
                        f"{x0_row['ssim']:.4f}", 0])
    gains = [a["psnr"] - b["psnr"] for a in rows if a["method"].startswith("ours")
             for b in rows if b["method"].startswith("deepinv") and b["seed"] == a["seed"]]
    verdict = paired(gains) if gains else None
    text = [f"# Ours vs deepinv's unfolded PGD on the 2D Volterra blur (`study=deepinv_side_by_side profile={profile}`)",
            "", (__doc__ or "").split("\n\n", 2)[2].strip().replace("\n", " "), "",
            markdown_table(["method", "seeds", "test MSE (1e-3)", "test PSNR (dB)", "test SSIM", "parameters"], body),
            ""]
    if verdict:
        text.append(f"Paired PSNR difference ours - deepinv: {verdict['mean']:+.2f} +- {verdict['std']:.2f} dB, "
                    f"ours better in {verdict['favour']}/{verdict['n']} seeds.")
    (out_dir / "results" / f"deepinv_side_by_side_{profile}.md").write_text("\n".join(text) + "\n")
    return rows
