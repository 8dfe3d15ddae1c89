"""scripts/reproduce.py machinery on profile=tiny (2 toy configs x 1 seed): CSV, tables, figure, resume."""

import csv
import itertools
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, run_tiny, untimed
from deepunroll.studies import common, rma
from deepunroll.studies.common import load_profile
from deepunroll.validation import ConfigError

NETWORKS = ["LPGD", "LPGD-RMA"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny(tmp_path_factory, rma)


def test_csv_has_one_row_per_run_with_commit_and_config(tiny_run):
    out, tables = tiny_run
    with open(out / "results" / "toy_sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["network"] for r in rows] == NETWORKS
    assert {"sweep", "a", "seed", "n_test", "mse_mean", "mse_std", "psnr_mean", "rel_err_mean", "n_params",
            "git_commit", "config"} <= set(rows[0])
    for row in rows:
        config = json.loads(row["config"])
        assert config["operator"]["a"] == 1.0 and config["seed"] == 0 and config["train"]["epochs"] == 2
        assert row["git_commit"] and float(row["mse_mean"]) > 0
    assert json.loads(rows[1]["config"])["accel"]["_target_"].endswith("accel.RMA")
    assert len(tables["toy_sweep"]) == 2


def test_markdown_tables_and_figure(tiny_run):
    out, _ = tiny_run
    table = (out / "results" / "toy_sweep.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| a |"))
    assert header.split("|")[1:-1] == [" a ", " network ", " seeds ", " mse ", " rel_err ", " psnr "]
    body = [line for line in table if line.startswith("| 1.0 |")]
    assert [line.split("|")[2].strip() for line in body] == NETWORKS and all(" +- " in line for line in body)
    claims = (out / "results" / "claims.md").read_text()
    assert "| LPGD-RMA vs LPGD | 1.0 |" in claims and ("0/1" in claims or "1/1" in claims)
    assert (out / "figures" / "toy_rma_gain_vs_a.png").stat().st_size > 0


def test_second_call_skips_finished_runs_and_script_entry_point(tiny_run, monkeypatch):
    out, _ = tiny_run
    results = sorted((out / "runs" / "reproduce" / "tiny").rglob(common.RESULT))
    assert len(results) == 2
    stamps = [p.stat().st_mtime_ns for p in results]
    done = subprocess.run([sys.executable, "scripts/reproduce.py", "profile=tiny", f"out_dir={out}", "workers=2"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trainable parameters" not in done.stdout and "all runs finished" in done.stdout
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert len(list(csv.DictReader(open(out / "results" / "toy_sweep.csv")))) == 2


class Interrupted(RuntimeError):
    """Stands in for a kill right after a checkpoint was written."""


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A run stopped after epoch 1 of 2 (checkpoints/last.pt, no result.json) continues from epoch 1 with
    train.resume=true, trains only epoch 2, and ends exactly where an uninterrupted run ends."""
    from deepunroll.train import checkpoint

    profile = load_profile("rma", "tiny")["sweeps"]["toy"]
    overrides, run_dir, info = rma.plan("toy", profile, tmp_path, tmp_path / "runs")[0]
    _, reference_dir, _ = rma.plan("toy", profile, tmp_path, tmp_path / "reference")[0]
    reference = common.run_one(overrides, reference_dir, info)
    assert reference["epochs"] == 2 and not reference["resumed"]

    save = checkpoint.save_atomic

    def save_then_die(state, path):
        save(state, path)
        if path.name == "last.pt":
            raise Interrupted(f"killed after epoch {state['epoch']}")

    monkeypatch.setattr(checkpoint, "save_atomic", save_then_die)
    with pytest.raises(Interrupted, match="killed after epoch 1"):
        common.run_one(overrides, run_dir, info)
    monkeypatch.setattr(checkpoint, "save_atomic", save)
    assert not (run_dir / common.RESULT).exists() and not (run_dir / "claim.pid").exists()
    first_epoch = checkpoint.load(run_dir / "checkpoints" / "last.pt")["history"]
    assert [h["epoch"] for h in first_epoch] == [1]
    capsys.readouterr()

    again = common.run_one(overrides, run_dir, info)
    out = capsys.readouterr().out
    assert f"resuming {run_dir} from its checkpoint after epoch 1" in out
    assert "epoch   1/2" not in out and "epoch   2/2" in out  # only epoch 2 was trained
    assert again["resumed"] and again["epochs"] == 2
    history = checkpoint.load(run_dir / "checkpoints" / "last.pt")["history"]
    assert history[0] == first_epoch[0]
    reference_history = checkpoint.load(reference_dir / "checkpoints" / "last.pt")["history"]
    assert untimed(history) == untimed(reference_history)
    # the resumed run's time is both epochs' (epoch 1 ran in the killed process), not this process's alone
    assert again["train_seconds"] == sum(h["seconds"] for h in history) and history[0]["seconds"] > 0
    assert math.isnan(common.train_seconds([{"epoch": 1, "seconds": 2.0}, {"epoch": 2}]))  # epoch 1's time unknown
    assert again["scores"] == reference["scores"]


def test_paired_statistics():
    stats = common.paired([1.0, 2.0, 3.0])
    assert stats["n"] == 3 and stats["mean"] == 2.0 and stats["std"] == 1.0 and stats["favour"] == 3
    assert stats["t"] == pytest.approx(2.0 * 3 ** 0.5)


def test_unknown_profile_is_named():
    with pytest.raises(ValueError, match="profile='huge': expected one of converged, mesh, paper, quick, tiny for study=rma"):
        load_profile("rma", "huge")


def test_profiles_of_a_single_file_study_merge_the_shared_keys():
    """configs/reproduce/equilibrium.yaml: models and modes shared, seeds and overrides per profile."""
    quick = load_profile("equilibrium", "quick")
    assert set(quick) == {"models", "modes", "seeds", "overrides"} and quick["seeds"] == [0, 1, 2]
    assert common.profile_names("physics_use") == ["blur2d", "probe", "probe_lpd", "published", "published_mesh", "tiny",
                                                   "toy"]
    with pytest.raises(ValueError, match=r"^profile='nope': expected one of paper, quick, tiny for study=equilibrium$"):
        load_profile("equilibrium", "nope")


def test_ktc_own_level_set_reads_each_level_from_its_own_network():
    """study=ktc2023_learned own_level: level L's score comes from the variant trained at L (hand case: the
    network of level v scores 0.1 v on every target of every level, so the set scores 0.4 L at level L, total
    0.4 * 28 = 11.2), per seed; above a reference of 0.4 L - 0.01 on all 7 levels, and a seed missing one
    network is left out."""
    from deepunroll.studies.ktc2023_learned import _own_level_lines

    variants = [f"net (level {v})" for v in range(1, 8)]
    spec = {"variants": dict.fromkeys(variants, []), "seeds": [0, 1], "own_level": {"per level": variants}}
    rows = [{"method": name, "seed": 0, "split": split, "level": level, "segmentation": "log_otsu",
             "score": 0.1 * v} for v, name in enumerate(variants, start=1) for level in range(1, 8)
            for split in ("measured",) * 4 + ("sim",)]
    rows += [dict(row, seed=1) for row in rows if row["method"] != variants[2]]
    reference = {level: 0.4 * level - 0.01 for level in range(1, 8)}
    (line,) = _own_level_lines(spec, rows, reference)
    assert line == ("- per level, log_otsu: measured total 11.200 +- 0.000 over 1 seed(s); per level (seed mean) "
                    "0.400 / 0.800 / 1.200 / 1.600 / 2.000 / 2.400 / 2.800; above our replication of the reference "
                    "method on 7 of 7 levels")


def test_ktc_x0_priors_entry_is_checked_and_named():
    """study=ktc2023_learned segmenter.x0_priors: a well-formed entry becomes its own method and unit; an entry
    without priors, with 0 epochs or a non-positive prior is one ConfigError naming segmenter.x0_priors."""
    from deepunroll.studies.ktc2023_learned import x0_priors_name, x0_segmenters

    priors = {"epochs": 30, "priors": [[0.05, 0.03], [0.5, 1]]}
    spec = {"segmenter": {"x0_only": True, "epochs": 15, "x0_priors": priors}}
    methods = x0_segmenters(spec)
    assert methods[x0_priors_name(2, 30)] == ("x0_priors_segmenter_30_epochs", 30, [[0.05, 0.03], [0.5, 1.0]], None)
    assert x0_priors_name(1, 2) == ("learned segmentation of x0 and 1 more linearised reconstruction (no network), "
                                    "2 epochs")
    for bad in ({"epochs": 3}, {"epochs": 0, "priors": [[1, 1]]}, {"epochs": 2, "priors": [[1, -1]]},
                {"epochs": 2, "priors": [[1]]}, 5):
        with pytest.raises(ConfigError, match=r"segmenter.x0_priors=.*expected \{epochs: N >= 1, priors"):
            x0_segmenters({"segmenter": {"x0_only": True, "x0_priors": bad}})


def test_ktc_x0_data_entry_is_checked_and_named():
    """study=ktc2023_learned segmenter.x0_data {epochs, train} or a list of them: per entry its own method, unit and
    number of simulated training targets; a missing, zero or non-numeric field is one ConfigError naming
    segmenter.x0_data."""
    from deepunroll.studies.ktc2023_learned import x0_data_name, x0_segmenters

    methods = x0_segmenters({"segmenter": {"x0_only": True, "x0_data": {"epochs": 30, "train": 3000}}})
    name = "learned segmentation of x0 (no network), 30 epochs, 3000 simulated targets"
    assert x0_data_name(30, 3000) == name and methods[name] == ("x0_segmenter_30_epochs_3000_train", 30, [], 3000)
    listed = x0_segmenters({"segmenter": {"x0_only": True, "x0_data": [{"epochs": 30, "train": 3000},
                                                                       {"epochs": 15, "train": 6000}]}})
    assert listed[name] == methods[name] and listed[x0_data_name(15, 6000)] == ("x0_segmenter_15_epochs_6000_train",
                                                                                 15, [], 6000)
    for bad in ({"epochs": 3}, {"epochs": 0, "train": 10}, {"epochs": 2, "train": "many"}, 5,
                [{"epochs": 1, "train": 4}, {"train": 4}]):
        with pytest.raises(ConfigError, match=r"segmenter.x0_data=.*expected \{epochs: N >= 1, train: M >= 1\}"):
            x0_segmenters({"segmenter": {"x0_only": True, "x0_data": bad}})


def test_ktc_twin_gap_per_target_is_the_seed_mean_over_levels():
    """study=ktc2023_learned: the twin-minus-measured line of a method sums its primary rule's scores over the 7
    levels per target and averages the seeds (hand case: a gap of 0.01 t (seed + 1) per level gives 0.105 t);
    simulated rows and other rules do not count."""
    from deepunroll.studies.ktc2023_learned import _twin_gap_lines

    rows = []
    for seed, level, target in itertools.product((0, 1), range(1, 8), range(1, 5)):
        common = {"method": "m", "seed": seed, "level": level, "target": target, "segmentation": "learned"}
        rows += [{**common, "split": "twin", "score": 0.9},
                 {**common, "split": "measured", "score": 0.9 - 0.01 * target * (seed + 1)},
                 {**common, "split": "sim", "score": 0.1}, {**common, "split": "twin", "segmentation": "otsu", "score": 1}]
    assert _twin_gap_lines({"m": None}, rows) == [
        "- m, learned: twin minus measured per target (7 levels, seed mean): +0.105 / +0.210 / +0.315 / +0.420"]


def test_ktc_ship_choice_by_simulation_or_by_the_measured_files():
    """study=ktc2023_learned ship: by sim_val the lowest simulated validation loss wins (method b, seed 0); by
    measured the method of the highest measured seed mean (a: 20.5 against 19.5), then its seed of the lowest
    loss (seed 1, though seed 0 scored higher on the measured files)."""
    from deepunroll.studies.ktc2023_learned import ship_choice

    totals = {("a", 0): 21.0, ("a", 1): 20.0, ("b", 0): 19.0, ("b", 1): 20.0}
    rows = [{"method": name, "seed": seed, "split": "measured", "level": 1, "segmentation": "learned",
             "score": total} for (name, seed), total in totals.items()]
    rows += [dict(row, split="sim", score=0.5) for row in rows]
    best_val = {("a", 0): 0.05, ("a", 1): 0.04, ("b", 0): 0.03, ("b", 1): 0.035}
    assert ship_choice(best_val, rows, "sim_val", "loss") == ("b", 0, "lowest loss over candidates and seeds")
    name, seed, how = ship_choice(best_val, rows, "measured", "loss")
    assert (name, seed) == ("a", 1) and how.startswith("highest measured total of the candidate methods (seed mean "
                                                       "20.500") and how.endswith("then its seed of the lowest loss")
