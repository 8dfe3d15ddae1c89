"""Complete-electrode-model speed on the KTC2023 meshes, and the whole KTC2023 baseline per level.

Usage: python scripts/bench.py cem --data-root PATH/TO/ktc2023 [--batch 32] [--repeats 5] [--threads 1] [--out .]

Measured in one run, per sample, on the organisers' sparse and dense meshes and our own tank mesh, with the
challenge's 76 injections x 31 measurements (``training/ref.mat``):
  forward          ``CompleteElectrodeModel.forward`` at batch 1 and --batch
  misfit gradient  ``misfit_grad`` (unit-current fields, one factorisation) at batch 1 and --batch, against
                   the baseline autograd through the sparse solve (``voltages`` then ``autograd.grad``)
and the KTC2023 baseline (:class:`KTCReconstructor`, default settings) per level: setup once (mesh, Jacobian,
prior, pixel map), then 4 reconstructions with segmentation. ``--out``: writes results/bench_cem.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from deepunroll.bench.eit import device_name, seconds
from deepunroll.operators.eit.cem import CompleteElectrodeModel
from deepunroll.realdata import ktc2023
from deepunroll.realdata.ktc_reconstruct import KTCReconstructor
from deepunroll.tables import write_csv

COLUMNS = ["mesh", "nodes", "elements", "path", "batch", "ms_per_sample", "device", "torch_threads"]


def autograd_misfit(op: CompleteElectrodeModel, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The baseline: J^T (F - y) by autograd through the sparse solve."""
    sigma = sigma.detach().requires_grad_()
    (grad,) = torch.autograd.grad(0.5 * (op.voltages(sigma) - target).square().sum(), sigma)
    return grad


def bench_mesh(name: str, mesh, ref: dict, batch: int, repeats: int, device: torch.device) -> list[dict]:
    nodes, elements, faces = mesh
    op = CompleteElectrodeModel(nodes, elements, faces, ref["inj"], ref["mpat"], 1e-6, device=device)
    gen = torch.Generator().manual_seed(0)
    sigma = (0.7 + 0.2 * torch.rand(batch, elements.shape[0], generator=gen, dtype=torch.float64)).to(device)
    target = op(torch.full_like(sigma, 0.8))
    ours, baseline = op.misfit_grad(sigma, target), autograd_misfit(op, sigma, target)
    error = float((ours - baseline).norm() / baseline.norm())
    rows = []
    for n in (1, batch):
        s, t = sigma[:n], target[:n]
        paths = {"forward": lambda: op(s), "misfit_grad": lambda: op.misfit_grad(s, t),
                 "misfit_grad_autograd_baseline": lambda: autograd_misfit(op, s, t)}
        for path, fn in paths.items():
            rows.append({"mesh": name, "nodes": nodes.shape[0], "elements": elements.shape[0], "path": path,
                         "batch": n, "ms_per_sample": round(1e3 * seconds(fn, repeats) / n, 3)})
    print(f"{name}: {nodes.shape[0]} nodes; misfit_grad vs autograd through the solve: {error:.1e} relative")
    return rows


def bench_levels(root: Path, repeats: int) -> list[dict]:
    ref = ktc2023.load_measurement(root / "training" / "ref.mat")
    start = time.perf_counter()
    reconstructor = KTCReconstructor(ref)
    setup = time.perf_counter() - start
    rows = [{"mesh": "ours", "nodes": "", "elements": reconstructor.n_elements, "path": "ktc2023_setup",
             "batch": 1, "ms_per_sample": round(1e3 * setup, 1)}]
    for level in range(1, ktc2023.N_LEVELS + 1):
        folder = root / "training_levels" / f"level_{level}"
        data = np.stack([ktc2023.load_measurement(folder / f"data{k}.mat")["uel"] for k in range(1, 5)])
        rows.append({"mesh": "ours", "nodes": "", "elements": reconstructor.n_elements,
                     "path": f"ktc2023_level_{level}", "batch": 4,
                     "ms_per_sample": round(1e3 * seconds(lambda: reconstructor.labels(data, level), repeats) / 4, 1)})
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py cem", description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="the KTC2023 folder (training/, mesh/)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write results/bench_cem.csv under this folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ref = ktc2023.load_measurement(args.data_root / "training" / "ref.mat")
    meshes = {"sparse": ktc2023.load_mesh(args.data_root, "sparse"), "dense": ktc2023.load_mesh(args.data_root, "dense"),
              "ours": ktc2023.tank_mesh()}
    rows = [row for name, mesh in meshes.items() for row in bench_mesh(name, mesh, ref, args.batch, args.repeats, device)]
    rows += bench_levels(args.data_root, args.repeats)
    for row in rows:
        row.update(device=device_name(device), torch_threads=torch.get_num_threads())
        print(f"{row['mesh']:>6} {row['path']:<30} batch {row['batch']:>2}: {row['ms_per_sample']:>9} ms per sample")
    if args.out is not None:
        write_csv(rows, args.out / "results" / "bench_cem.csv", COLUMNS)
