"""Reproduction study of recurrent momentum acceleration (the four claims of Zhou et al., Inverse Problems 2024, as the README lists them).

Sweeps of ordinary runs of :func:`deepunroll.pipeline.train`, each scored by
:func:`deepunroll.evaluation.evaluate` on its test split. A profile (configs/reproduce/rma_<profile>.yaml)
is data: per sweep, the networks (label -> overrides), the axes (key -> values, one run per combination)
and fixed overrides. Writes results/<table>.csv (one row per run: metrics, git commit, full config),
results/<table>.md (mean +- std over seeds), results/claims.md (paired comparisons) and figures/.

    python scripts/reproduce.py profile=quick        # or: python -m deepunroll.studies.rma --profile tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

from deepunroll.studies.common import (RESULT, format_value, load_profile, markdown_table, metric_names, paired,
                                       run_ablation, run_one, seed_table, slug)
from deepunroll.tables import write_csv

# (better, base) pairs of the claims; gains are per seed, positive when `better` is better
CLAIM_PAIRS = {
    "1": [("LPGD-RMA", "LPGD"), ("LPD-RMA", "LPD")],
    "4": [("LPGD-RMA", "LPGD-MA"), ("LPD-RMA", "LPD-MA")],
    "ma": [("LPGD-MA", "LPGD"), ("LPD-MA", "LPD")],
    "domain": [("LPGD-RMA (2D grid)", "LPGD-RMA (1D mesh)")],
    "physics": [("LPGD-RMA", "LPGD-RMA (raw)")],
}
# metric of the paired comparisons per sweep: (name, +1 if higher is better else -1)
CLAIM_METRIC = {"toy": ("psnr", +1), "eit": ("rel_err", -1), "eit_domain": ("rel_err", -1)}


def column(key: str) -> str:
    """CSV column of an axis: its last component (operator.a -> a, data.n_train -> n_train)."""
    return key.split(".")[-1]


def plan(sweep: str, spec: dict, out_dir: Path, runs_dir: Path) -> list[tuple[list[str], Path, dict]]:
    """(overrides, run_dir, info) per run; seed outermost so partial results cover every setting."""
    axes = dict(spec["axes"])
    seeds = axes.pop("seed", [0])
    jobs = []
    for seed in seeds:
        for values in itertools.product(*axes.values()):
            setting = dict(zip(axes, values))
            for network, net_overrides in spec["networks"].items():
                overrides = list(net_overrides) + list(spec.get("overrides", [])) + [
                    f"{k}={v}" for k, v in setting.items()] + [
                    f"seed={seed}", "train.device=cpu", "evaluate=false", f"data.root={out_dir / 'data'}"]
                name = ",".join(f"{column(k)}={v}" for k, v in setting.items()) + f",seed={seed}"
                info = {"sweep": sweep, "network": network} | {column(k): v for k, v in setting.items()} | {"seed": seed}
                jobs.append((overrides, runs_dir / sweep / slug(network) / slug(name), info))
    return jobs


def result_row(result: dict, scores: dict, network: str, keys: list[str]) -> dict:
    row = {"sweep": result["sweep"], "network": network} | {k: result[k] for k in keys}
    row |= {"n_test": scores["n"]} | {k: v for k, v in scores.items() if k.endswith(("_mean", "_std"))}
    return row


def ablation_columns(ablation: dict) -> dict:
    """Test-MSE ratios of the physics ablation as table metrics (data term removed, another sample's y)."""
    return {"no_data_term_ratio_mean": ablation["no_data_term_ratio"], "other_y_ratio_mean": ablation["other_y_ratio"]}


def rows_of(results: list[dict], spec: dict) -> list[dict]:
    """One row per run; with ``baseline`` also one row for x0 (e.g. GN) per dataset (seed and n_train blank)."""
    keys = [column(k) for k in spec["axes"] if k != "seed"] + ["seed"]
    rows, datasets = [], {}
    for result in results:
        rows.append(result_row(result, result["scores"], result["network"], keys)
                    | (ablation_columns(result["ablation"]) if result.get("ablation") else {}) | {
            "n_params": result["n_params"], "epochs": result["epochs"],
            "train_seconds": round(result["train_seconds"], 2), "git_commit": result["git_commit"],
            "run_dir": result["run_dir"], "config": json.dumps(result["config"], sort_keys=True)})
        if spec.get("baseline"):
            data = dict(result["config"]["data"], n_train=None)
            datasets.setdefault(json.dumps([result["config"]["operator"], data], sort_keys=True, default=str), result)
    for result in datasets.values():
        row = result_row(result, result["baseline"], result["baseline"]["method"], keys)
        rows.append(row | {"seed": "", "n_train": "", "git_commit": result["git_commit"],
                           "config": json.dumps({"operator": result["config"]["operator"],
                                                 "data": result["config"]["data"]}, sort_keys=True)})
    return rows


def baseline_key(row: dict) -> tuple:
    """An x0 row's dataset and scores, without what differs between sweeps sharing the dataset."""
    return tuple(v for k, v in row.items() if k not in ("sweep", "config", "git_commit", "run_dir"))


def gains(rows: list[dict], better: str, base: str, metric: str, sign: int, keys: list[str]) -> dict[tuple, list]:
    """{setting: [per-seed gain of `better` over `base`]} over the seeds both have."""
    value = {(r["network"],) + tuple(r[k] for k in keys) + (r["seed"],): float(r[f"{metric}_mean"]) for r in rows}
    out: dict[tuple, list] = {}
    for r in rows:
        if r["network"] != better:
            continue
        setting = tuple(r[k] for k in keys)
        other = value.get((base,) + setting + (r["seed"],))
        if other is not None:
            out.setdefault(setting, []).append(sign * (float(r[f"{metric}_mean"]) - other))
    return out


def claims_markdown(tables: dict[str, tuple[list[dict], dict]]) -> str:
    """results/claims.md: per claim, paired per-seed gains per setting and pooled over settings."""
    titles = {"1": "Claim 1: RMA improves LPGD and LPD (RMA vs its base network)",
              "4": "Claim 4: RMA beats plain momentum (RMA vs MA)",
              "ma": "For reference: plain momentum vs its base network (MA vs base)",
              "domain": "EIT: LPGD-RMA on a 2D pixel grid vs on the element order (1D)",
              "physics": "Unrolling vs post-processing: LPGD-RMA with the physics-visible signal vs the published raw "
                         "input (`net.direction=raw`)"}
    units = {"psnr": "test PSNR gain (dB)", "rel_err": "reduction of the test relative error"}
    out = ["# Paired comparisons over seeds",
           "",
           "Each gain is computed per seed on the same dataset (`seed` = network initialisation and data order; "
           "`data.seed` fixed), positive when the first network is better. Columns: mean and std of the gain "
           "over seeds, how many seeds favour the first network, and the paired t-statistic "
           "mean / (std / sqrt(n)). Generated by `python scripts/reproduce.py`; claims 2 and 3 read the "
           "claim-1 rows by `a` (toy) and by inclusions / n_train (EIT)."]
    for claim, pairs in CLAIM_PAIRS.items():
        out += ["", f"## {titles[claim]}"]
        for sweep, (rows, spec) in tables.items():
            metric, sign = CLAIM_METRIC.get(sweep, ("rel_err", -1))
            keys = [column(k) for k in spec["axes"] if k != "seed"]
            body, pooled = [], []
            for better, base in pairs:
                all_gains = gains(rows, better, base, metric, sign, keys)
                for setting, values in all_gains.items():
                    s = paired(values)
                    body.append([f"{better} vs {base}", *setting, format_value(s["mean"]), format_value(s["std"]),
                                 f"{s['favour']}/{s['n']}", f"{s['t']:.2f}"])
                flat = [g for v in all_gains.values() for g in v]
                if flat:
                    s = paired(flat)
                    wins = sum(paired(v)["mean"] > 0 for v in all_gains.values())
                    pooled.append(f"- {better} vs {base}, pooled over {len(all_gains)} settings: mean gain "
                                  f"{format_value(s['mean'])} +- {format_value(s['std'])}, {s['favour']}/{s['n']} "
                                  f"(setting, seed) pairs and {wins}/{len(all_gains)} settings favour {better}.")
            if body:
                out += ["", f"### {sweep}: {units.get(metric, metric)}", "",
                        markdown_table(["comparison"] + keys + ["mean", "std", "favour", "t"], body), ""] + pooled
        if out[-1].startswith("## "):
            out += ["", "(no runs of these networks in this profile)"]
    return "\n".join(out) + "\n"


def write_outputs(tables: dict[str, tuple[list[dict], dict]], out_dir: Path, claims_name: str = "claims") -> list[Path]:
    written = []
    for table, (rows, spec) in tables.items():
        if not rows:
            continue
        csv_path = out_dir / "results" / f"{table}.csv"
        write_csv(rows, csv_path)
        keys = [column(k) for k in spec["axes"] if k != "seed"]
        metrics = metric_names(rows[0])
        md = (f"# {table}: test metrics, mean +- std over seeds\n\nEach cell is the mean over the test set of one "
              f"run, then mean +- std over the seeds ({csv_path.name} has one row per run).\n\n"
              + seed_table(rows, keys, metrics) + "\n")
        (out_dir / "results" / f"{table}.md").write_text(md)
        written += [csv_path, out_dir / "results" / f"{table}.md"]
    claims = out_dir / "results" / f"{claims_name}.md"
    claims.write_text(claims_markdown({CLAIM_KEY.get(t, t): v for t, v in tables.items()}))
    return written + [claims]


CLAIM_KEY = {"toy_sweep": "toy", "eit_sweep": "eit", "eit_domain": "eit_domain"}


def run(profile: str = "quick", out_dir: str | Path = ".", runs_dir: str | Path | None = None,
        report_only: bool = False) -> dict:
    """Run (or resume) every sweep of the profile, then write tables and figures from the finished runs.

    Returns {table: rows}; runs that another process is still training are left out (run again later).
    ``report_only``: train nothing, only tabulate the runs finished so far.
    """
    from deepunroll.studies.rma_figures import make_figures

    spec_all = load_profile("rma", profile)
    out_dir = Path(out_dir).resolve()
    runs_dir = Path(runs_dir) if runs_dir else out_dir / "runs" / "reproduce"
    runs_dir = runs_dir / profile
    tables: dict[str, tuple[list[dict], dict]] = {}
    pending, start = 0, time.perf_counter()
    for sweep, spec in spec_all["sweeps"].items():
        jobs = plan(sweep, spec, out_dir, runs_dir)
        results = []
        for i, (overrides, run_dir, info) in enumerate(jobs, 1):
            tick = time.perf_counter()
            if report_only and not (run_dir / RESULT).exists():
                pending += 1
                continue
            result = run_one(overrides, run_dir, info)
            state = "busy elsewhere" if result is None else f"{time.perf_counter() - tick:.1f} s"
            print(f"[{sweep} {i}/{len(jobs)}] {info['network']} "
                  + " ".join(f"{k}={v}" for k, v in info.items() if k not in ("sweep", "network"))
                  + f": {state} (total {time.perf_counter() - start:.0f} s)", flush=True)
            if result is None:
                pending += 1
            else:
                ablation = run_ablation(run_dir) if spec.get("ablation") else None
                results.append(result | {"run_dir": os.path.relpath(run_dir, out_dir), "ablation": ablation})
        rows = rows_of(results, spec)
        old_rows, old_spec = tables.get(spec["table"], ([], {}))
        seen = {baseline_key(r) for r in old_rows if r["seed"] == ""}
        rows = [r for r in rows if r["seed"] != "" or baseline_key(r) not in seen]  # x0 of a dataset once per table
        figures = old_spec.get("figures", {}) | spec.get("figures", {})
        tables[spec["table"]] = (old_rows + rows, spec | {"figures": figures})
    written = write_outputs(tables, out_dir, spec_all.get("claims", "claims"))
    written += make_figures(tables, out_dir)
    print(f"{pending} runs not finished (in other processes, or report_only)" if pending else "all runs finished")
    print("wrote " + ", ".join(str(p) for p in written))
    return {table: rows for table, (rows, _) in tables.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs, train nothing")
    args = parser.parse_args(argv)
    run(args.profile, args.out_dir, report_only=args.report_only)


if __name__ == "__main__":
    main()
