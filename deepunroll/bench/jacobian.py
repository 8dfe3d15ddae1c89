"""Full vs detached Jacobian of the fixed-point map: DEQ gradients and Lipschitz estimates, one batch.

With ``net.grad_through_operator=false`` the data-fit direction d_k is computed without a graph, but the map
T the forward pass iterates still depends on x through it. For the same weights and batch this compares the
DEQ parameter gradient whose adjoint uses the full J_T (``backprop.jacobian=full``) with the one that
holds d_k constant (``detached``), and the Lipschitz estimates of both maps (``lipschitz``,
``lipschitz_detached``), on an untrained model and after ``--epochs`` epochs of JFB training.

    python scripts/bench.py jacobian [--problems toy_lpgd_tied toy_weighted_norm toy_pnp eit] [--epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from deepunroll.pipeline import build_problem, compose_config, load_datasets, train
from deepunroll.train import checkpoint

PROBLEMS = {  # name -> overrides of a small problem (its data are generated in a temporary folder)
    "toy_lpgd_tied": ["+experiment=toy_lpgd_tied", "data.splits.train=256", "data.splits.val=32",
                      "data.splits.test=32", "train.batch_size=32"],
    "toy_weighted_norm": ["+experiment=toy_weighted_norm", "net.step.reg_level=1.0", "data.splits.train=256",
                          "data.splits.val=32", "data.splits.test=32", "train.batch_size=32"],
    "toy_pnp": ["+experiment=toy_pnp", "net.spectral_norm=0.5", "data.splits.train=256", "data.splits.val=32",
                "data.splits.test=32", "train.batch_size=32"],
    "eit": ["+experiment=eit_lpgd", "net=lpgd_tied", "net.direction_damping=1.0e-3", "operator.h0=0.2", "data.splits.train=64", "data.splits.val=16",
            "data.splits.test=16", "data.n_train=64", "train.batch_size=8", "net.n_iter=6"],
}
DEQ = ["backprop=deq", "net.n_iter=100", "backprop.tol=1e-6", "backprop.backward_tol=1e-6",
       "backprop.backward_max_iter=200"]


def deq_gradients(model, y, x0, x) -> dict:
    """The DEQ gradient of the MSE under both Jacobians (same weights), their relative difference and cosine,
    the adjoint solves' iterations / residuals, seconds per backward, and both Lipschitz estimates."""
    net = model.net if hasattr(model, "net") else model  # GridDomainNet wraps the UnrolledNet
    params = [p for p in model.parameters() if p.requires_grad]
    out, grads = {}, {}
    for jacobian in ("full", "detached"):
        net.backprop.jacobian = jacobian
        model.train()
        loss = torch.nn.functional.mse_loss(model(y, x0), x)
        start = time.perf_counter()
        grads[jacobian] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=True)
                                     if g is not None])
        out[f"{jacobian}_seconds"] = time.perf_counter() - start
        stats = net.backprop.stats
        out[f"{jacobian}_adjoint"] = (stats["backward_iterations"], stats["backward_residual"])
    out["forward"] = (stats["forward_iterations"], stats["forward_residual"])
    full, detached = grads["full"], grads["detached"]
    out["grad_rel_diff"] = float((full - detached).norm() / full.norm())
    out["grad_cosine"] = float(full @ detached / (full.norm() * detached.norm()))
    out["grad_norm_ratio"] = float(detached.norm() / full.norm())
    out |= model.diagnostics(y, x0, n_power=20)
    out["lipschitz_rel_diff"] = abs(out["lipschitz"] - out["lipschitz_detached"]) / out["lipschitz"]
    return out


def measure(problem: str, epochs: int, batch: int, root: Path) -> list[dict]:
    overrides = PROBLEMS[problem] + [f"data.root={root / 'data'}", "train.device=cpu"]
    torch.manual_seed(0)
    untrained = build_problem(compose_config(overrides + DEQ))[2]
    trained_path = train(compose_config(overrides + ["backprop=jfb", f"train.epochs={epochs}"]),
                         root / problem)["last"]
    trained = build_problem(compose_config(overrides + DEQ))[2]
    trained.load_state_dict(checkpoint.load(trained_path)["model"])
    cfg = compose_config(overrides)
    val = load_datasets(cfg, untrained.operator, splits=("val",))["val"]
    batch = {k: v[:batch] for k, v in next(iter(torch.utils.data.DataLoader(val, batch_size=batch))).items()}
    rows = []
    for label, model in (("untrained", untrained), (f"jfb x{epochs} ep", trained)):
        rows.append({"problem": problem, "model": label} | deq_gradients(model, batch["y"], batch["x0"], batch["x"]))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py jacobian", description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=sorted(PROBLEMS))
    parser.add_argument("--epochs", type=int, default=2, help="JFB training epochs of the 'trained' model")
    parser.add_argument("--batch", type=int, default=8, help="validation samples in the compared batch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        for problem in args.problems:
            for r in measure(problem, args.epochs, args.batch, Path(root)):
                print(f"{r['problem']:>13} {r['model']:>14}: DEQ gradient full vs detached: rel. diff "
                      f"{r['grad_rel_diff']:.3g}, cosine {r['grad_cosine']:.3f}, norm ratio {r['grad_norm_ratio']:.3g}; adjoint (iterations, residual) full "
                      f"{r['full_adjoint'][0]}, {r['full_adjoint'][1]:.1e} / detached {r['detached_adjoint'][0]}, "
                      f"{r['detached_adjoint'][1]:.1e}; backward s full {r['full_seconds']:.3f} / detached "
                      f"{r['detached_seconds']:.3f}; forward {r['forward'][0]} it, residual {r['forward'][1]:.1e}; "
                      f"Lipschitz full {r['lipschitz']:.4f} / detached {r['lipschitz_detached']:.4f} "
                      f"(rel. diff {r['lipschitz_rel_diff']:.3g})", flush=True)
