"""LPGD-RMA followed by a labelling layer on EIT, trained end to end with the ``lagrangian`` or
``straight_through`` backward, against post-hoc labelling of the plain network (the argmin-layer study's
EIT part; its Huber-TV part is deepunroll/studies/argmin.py).

    python scripts/reproduce.py study=argmin_eit [profile=tiny|quick|quick_gn] [workers=2]   (quick: raw input, quick_gn: GN)

Each seed is a resumable unit of the common runner (claimed, result.json); the training itself is the
short Adam loop below, not the Trainer: the study fine-tunes three branches of one pre-trained network in
the same process, two of them wrapped with an argmin layer, on a summed squared error.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from deepunroll import metrics
from deepunroll.nets.argmin import ArgminLayer
from deepunroll.optim.descent import ICM
from deepunroll.nets.energies import LabelEnergy
from deepunroll.studies.common import format_mean_std, load_profile, run_claimed
from deepunroll.tables import write_csv
from deepunroll.train.checkpoint import seed_everything

EIT_METHODS = ("gauss_newton", "lpgd_rma", "post_hoc_nearest", "post_hoc_icm", "lagrangian", "straight_through")
EIT_COLUMNS = ["method", "seed", "rel_err", "label_acc", "test_psnr", "finetune_seconds"]
EIT = {"labels": [0.5, 1.0, 2.0], "mu": 0.05, "tau": 0.5, "icm_sweeps": 5, "lr": 1e-3, "grad_clip": 1.0}


def _sse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the batch (a per-sample gradient independent of the batch size)."""
    return (x_hat - x).pow(2).sum()


def element_neighbours(elements: torch.Tensor) -> torch.Tensor:
    """(n_edges, 2) pairs of triangles that share a mesh edge."""
    owner: dict[tuple[int, int], int] = {}
    pairs = []
    for e, tri in enumerate(elements.tolist()):
        for a, b in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[0], tri[2])):
            key = (min(a, b), max(a, b))
            if key in owner:
                pairs.append((owner[key], e))
            else:
                owner[key] = e
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


class Labelled(nn.Module):
    """x = label(net(y, x0)): the LPGD-RMA output projected onto the known conductivities."""

    def __init__(self, net: nn.Module, label: ArgminLayer):
        super().__init__()
        self.net, self.label = net, label

    def forward(self, y, x0):
        return self.label(self.net(y, x0))


def nearest_label(x: torch.Tensor, labels: list[float]) -> torch.Tensor:
    values = torch.as_tensor(labels, dtype=x.dtype)
    return values[(x[..., None] - values).abs().argmin(-1)]


def eit_scores(x_hat: torch.Tensor, x: torch.Tensor) -> dict:
    x_hat, x = x_hat.double(), x.double()
    rel = ((x_hat - x).norm(dim=1) / x.norm(dim=1)).mean()
    acc = (nearest_label(x_hat, EIT["labels"]) == x).double().mean()
    return {"rel_err": float(rel), "label_acc": float(acc), "test_psnr": float(metrics.psnr(x_hat, x).mean())}


def _fit(model: nn.Module, train_set, epochs: int, batch: int, seed: int) -> float:
    """Adam (lr EIT['lr'], betas as the Trainer), SSE loss summed over the batch, clip EIT['grad_clip']."""
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=EIT["lr"], betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        for index in torch.randperm(len(train_set), generator=gen).split(batch):
            optimiser.zero_grad()
            loss = _sse(model(train_set.y[index], train_set.x0[index]).to(train_set.x.dtype), train_set.x[index])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), EIT["grad_clip"])
            optimiser.step()
    return time.perf_counter() - start


def eit_seed(seed: int, cfg: dict, out_dir: Path) -> tuple[list[dict], dict, tuple]:
    """Rows for one seed, the test reconstructions {method: (n, n_elems)} and (x_test, nodes, elements)."""
    from deepunroll.pipeline import build_problem, load_datasets
    from deepunroll.pipeline import compose_config

    conf = compose_config(["+experiment=eit_lpgd_rma", f"net.direction={cfg['direction']}", f"operator.h0={cfg['h0']}",
                           f"data.splits.train={cfg['n_train']}", f"data.splits.val={cfg['n_val']}",
                           f"data.splits.test={cfg['n_test']}", f"data.n_train={cfg['n_train']}",
                           f"data.noise={cfg['noise']}", f"net.n_iter={cfg['n_iter']}", "train.device=cpu",
                           f"seed={seed}", *cfg["network"],
                           f"data.root={out_dir / 'data'}"])
    seed_everything(seed)
    operator, _, net = build_problem(conf, "cpu")
    data = load_datasets(conf, operator, splits=("train", "test"))
    train_set, test = data["train"], data["test"]
    edges = element_neighbours(operator.elements.cpu())

    def label_layer(backward: str, mu: float) -> ArgminLayer:
        return ArgminLayer(LabelEnergy(EIT["labels"], mu=mu, edges=edges), ICM(EIT["icm_sweeps"]),
                           backward=backward, tau=EIT["tau"], side="central")

    _fit(net, train_set, cfg["pre_epochs"], cfg["batch"], seed)
    branches = {"lpgd_rma": copy.deepcopy(net),
                "lagrangian": Labelled(copy.deepcopy(net), label_layer("lagrangian", EIT["mu"])),
                "straight_through": Labelled(copy.deepcopy(net), label_layer("straight_through", EIT["mu"]))}
    seconds = {name: _fit(model, train_set, cfg["fine_epochs"], cfg["batch"], seed) for name, model in branches.items()}
    with torch.no_grad():
        for model in branches.values():
            model.eval()
        plain = branches["lpgd_rma"](test.y, test.x0)
        outputs = {"gauss_newton": test.x0, "lpgd_rma": plain,
                   "post_hoc_nearest": label_layer("straight_through", 0.0)(plain),
                   "post_hoc_icm": label_layer("straight_through", EIT["mu"])(plain),
                   "lagrangian": branches["lagrangian"](test.y, test.x0),
                   "straight_through": branches["straight_through"](test.y, test.x0)}
    seconds["post_hoc_nearest"] = seconds["post_hoc_icm"] = seconds["lpgd_rma"]
    rows = [{"method": m, "seed": seed, **eit_scores(outputs[m], test.x), "finetune_seconds": seconds.get(m, "")}
            for m in EIT_METHODS]
    return rows, outputs, (test.x, operator.nodes.cpu(), operator.elements.cpu())


def eit_table(rows: list[dict]) -> str:
    lines = ["| method | relative error | label accuracy | fine-tune time (s) |", "| --- | --- | --- | --- |"]
    for method in EIT_METHODS:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        secs = [r["finetune_seconds"] for r in rs if r["finetune_seconds"] != ""]
        lines.append(f"| {method} | {format_mean_std([r['rel_err'] for r in rs], 4)} | "
                     f"{format_mean_std([r['label_acc'] for r in rs], 4)} | "
                     f"{format_mean_std(secs, 1) if secs else '-'} |")
    by_seed = {(r["method"], r["seed"]): r for r in rows}
    seeds = [s for m, s in by_seed if m == "lagrangian" and ("straight_through", s) in by_seed]
    if seeds:
        wins = sum(by_seed["lagrangian", s]["label_acc"] > by_seed["straight_through", s]["label_acc"] for s in seeds)
        lines.append("")
        lines.append("Paired over seeds, lagrangian minus straight-through: relative error "
                     + format_mean_std([by_seed["lagrangian", s]["rel_err"] - by_seed["straight_through", s]["rel_err"]
                                  for s in seeds], 4)
                     + ", label accuracy "
                     + format_mean_std([by_seed["lagrangian", s]["label_acc"] - by_seed["straight_through", s]["label_acc"]
                                  for s in seeds], 4)
                     + f" ({wins}"
                     f" of {len(seeds)} seeds with higher label accuracy).")
    return "\n".join(lines)


def run(profile: str = "quick", out_dir: str | Path = ".", runs_dir: str | Path | None = None,
        report_only: bool = False) -> dict:
    """Run (or resume) every seed; writes out_dir/results/<stem>.{csv,md} and out_dir/figures/<stem>.png.

    One seed is one resumable unit (:func:`deepunroll.studies.common.run_claimed`) in
    ``runs_dir/argmin_eit_<profile>/seed=<s>/`` (default out_dir/runs/reproduce): its rows in result.json,
    its test reconstructions in reconstructions.pt (the figure shows the first seed's).
    """
    out_dir = Path(out_dir)
    runs_dir = (Path(runs_dir) if runs_dir else out_dir / "runs" / "reproduce") / f"argmin_eit_{profile}"
    cfg = load_profile("argmin_eit", profile)  # configs/reproduce/argmin_eit.yaml
    eit_rows, figure_data, pending = [], None, 0
    for seed in cfg["seeds"]:
        run_dir = runs_dir / f"seed={seed}"

        def work() -> dict:
            rows, outputs, (x_test, nodes, elements) = eit_seed(seed, cfg, out_dir)
            torch.save({"outputs": outputs, "x_test": x_test, "nodes": nodes, "elements": elements},
                       run_dir / "reconstructions.pt")
            return {"rows": rows}

        result = run_claimed(run_dir, work, report_only)
        if result is None:
            pending += 1
            continue
        eit_rows += result["rows"]
        for r in result["rows"]:
            print(f"[eit] seed {seed} {r['method']}: rel err {r['rel_err']:.4f}, label acc {r['label_acc']:.4f}",
                  flush=True)
        if figure_data is None:
            saved = torch.load(run_dir / "reconstructions.pt", weights_only=True)
            figure_data = (saved["outputs"], (saved["x_test"], saved["nodes"], saved["elements"]))
    if pending:
        print(f"{pending} seeds not finished (in other processes, or report_only)")
    if not eit_rows:
        return {"eit": [], "figure": None}
    settings = (f"h0 {cfg['h0']}, noise {cfg['noise']}, {cfg['n_train']} training / "
                f"{cfg['n_test']} test phantoms, LPGD-RMA "
                f"with {cfg['n_iter']} iterations pre-trained {cfg['pre_epochs']} epochs, then "
                f"{cfg['fine_epochs']} more epochs per branch; labels {EIT['labels']}, mu {EIT['mu']}, "
                f"lagrangian central tau {EIT['tau']} (loss: squared error summed over the batch); "
                f"data-fit signal net.direction={cfg['direction']}; "
                f"{len(cfg['seeds'])} seed(s), mean ± std")
    write_csv(eit_rows, out_dir / "results" / f"{cfg['stem']}.csv", EIT_COLUMNS)
    (out_dir / "results" / f"{cfg['stem']}.md").write_text(
        f"# LPGD-RMA + labelling layer on EIT ({profile} profile)\n\n{settings}\n\n{eit_table(eit_rows)}\n")

    from deepunroll.viz import plot_mesh_reconstructions

    outputs, (x_test, nodes, elements) = figure_data
    columns = {"ground truth": x_test, "LPGD-RMA": outputs["lpgd_rma"], "post-hoc label (ICM)": outputs["post_hoc_icm"],
               "lagrangian e2e": outputs["lagrangian"], "straight-through e2e": outputs["straight_through"]}
    figure = plot_mesh_reconstructions(columns, nodes, elements, out_dir / "figures" / f"{cfg['stem']}.png",
                                        n_samples=4)
    return {"eit": eit_rows, "figure": figure}
