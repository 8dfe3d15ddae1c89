"""Learned KTC2023 reconstructions: trained on simulation (data=ktc2023_sim), scored on the measured training levels.

    python scripts/reproduce.py study=ktc2023_learned data_root=PATH/TO/ktc2023 [profile=quick] [workers=2]

Every variant x seed of the profile (configs/reproduce/ktc2023_learned.yaml) trains one network on simulated
difference data (level 1's electrodes, or the variant's ``operator.level``) through the resumable runner
(:func:`run_one`). Each trained network is then run on

* the simulated test split (first ``sim_samples`` targets): KTC score against the drawn classes, the
  sim side of the sim-to-real check, and the physics ablation (data term removed, another sample's y);
* the measured training levels 1-7 (4 targets each): y = U - U_ref with NaN rows set to 0, the level's own
  operator (its electrodes removed, whatever level the network was trained at) and x0 = the linearised step of
  that operator, so the data term, not the weights, carries the level;
* the measured targets' twin (:class:`TankTwin`): the same four targets simulated by the training data's CEM, per
  level, so the gap from simulation to the tank splits into the targets' share and the physics' share.

Reconstructions become labels as in the baseline: the change sigma - sigma_bg on the 256 x 256 grid (nodal
images) and the organisers' Otsu rule. The linearised x0 alone is scored the same way. Writes
results/ktc2023_learned_<profile>.{csv,md} and figures/ktc2023_learned_<profile>_<method>.png (seed 0: level rows,
targets). Per level, the seeds' mean is set against our replication of the organisers' reference method (its
settings on our mesh, :func:`ktc2023_levels.score_variant`). A profile's ``ship`` entry exports one model (weights,
config, segmenter) for scripts/ktc2023.py: of its candidates x seeds, the one with the lowest simulated
validation loss, so the measured files do not pick it, or (``method_by: measured``) the method of the highest
measured total, then its seed of the lowest simulated validation loss (:func:`ship_choice`).

A profile's ``segmenter`` entry {variants, epochs, x0_only} adds the learned segmentation (:mod:`ktc_segmenter`):
for each listed variant's runs a segmenter is trained on the frozen network's simulated outputs (the run's
``segmenter/model.pt``), scored as the rule ``learned`` next to the Otsu rules; with ``x0_only`` the same
segmenter reading only the linearised x0 (no network; ``x0_segmenter/`` of the first listed variant's runs, on
their data) is a method of its own, so the network's share in the learned labels is measured (``x0_longer`` N:
another one trained for N epochs, ``x0_segmenter_N_epochs/``; ``x0_priors`` {epochs, priors}: one that also
reads a linearised reconstruction per [prior_std, prior_length], ``x0_priors_segmenter_N_epochs/``;
``x0_data`` {epochs, train} or a list of them: one on x0 per entry, trained on M simulated targets for N epochs,
``x0_segmenter_N_epochs_M_train/``). Its
``end_to_end`` entry {variants, network_lr} trains, for those variants' runs, the network on from its weights
together with a new segmenter, for the labels (cross-entropy through the network; ``joint_segmenter/``), as the
method "<variant>, end to end", with the same number of segmenter epochs as the frozen one; where that network
has a data term it is scored again with the term removed ("..., data term removed"), so the measurements' share
in its labels is measured.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from hydra.utils import instantiate

from deepunroll.ablation import data_term_removed
from deepunroll.metrics import ktc_score
from deepunroll.pipeline import load_datasets
from deepunroll.realdata import ktc2023
from deepunroll.realdata.ktc_learned import OTSU_RULES, SEGMENTATIONS, KTCLearnedReconstructor, on_operator
from deepunroll.realdata.ktc_segmenter import add_segmenter
from deepunroll.realdata.ktc_twin import TankTwin
from deepunroll.realdata.pixel_grid import PixelMap
from deepunroll.record import git_commit
from deepunroll.studies.common import (load_profile, markdown_table, measured_data_root, paired, run_ablation,
                                       run_claimed, run_one, slug, val_curve)
from deepunroll.studies.ktc2023_levels import (N_TARGETS, REFERENCE_TOTAL, load_level, load_truths, plot_levels,
                                               score_variant)
from deepunroll.tables import write_csv
from deepunroll.train.checkpoint import export_model
from deepunroll.train.checkpoint import load as load_checkpoint
from deepunroll.validation import ConfigError

COLUMNS = ["method", "seed", "split", "level", "target", "segmentation", "score", "git_commit"]
# the labelling rule of the table's level columns and the figures: the organisers' Otsu rule for their linearised
# step, Otsu on the log contrast for the networks' conductivities, or the learned segmenter where a network has one
# (every rule's totals are in the table)
PRIMARY = {"baseline": "otsu", "network": "log_otsu", "segmented": "learned"}
X0_SEGMENTER = "learned segmentation of x0 (no network)"
SHIP_RULES = ("sim_val", "measured")  # ship.method_by: how the shipped model's method is chosen (:func:`ship_choice`)
_TWINS: dict[tuple, TankTwin] = {}  # the measured targets' twin, fitted once per data folder and simulator


def end_to_end_name(variant: str) -> str:
    """The method of a variant's network trained on with its segmenter, end to end for the labels."""
    return f"{variant}, end to end"


class X0Unit(NamedTuple):
    """A segmenter without a network: its unit folder, epochs, extra priors [[prior_std, prior_length], ...] and
    number of simulated training targets (None: the run's dataset's)."""
    unit: str
    epochs: int
    priors: list
    train: int | None = None


def x0_segmenters(spec: dict) -> dict[str, X0Unit]:
    """{method: :class:`X0Unit`} of a profile's segmenters without a network: with segmenter.x0_only, one on x0 at
    segmenter.epochs (:data:`X0_SEGMENTER`); with segmenter.x0_longer N, another trained for N epochs; with
    segmenter.x0_priors {epochs, priors}, one that also reads a linearised reconstruction per prior [prior_std,
    prior_length] (:class:`SegmenterInputs`); with segmenter.x0_data {epochs, train} (or a list of them), one on
    x0 trained on ``train`` simulated targets per entry (the run's dataset regenerated with data.splits.train =
    train)."""
    seg = spec.get("segmenter") or {}
    if not seg.get("x0_only"):
        return {}
    out = {X0_SEGMENTER: X0Unit("x0_segmenter", int(seg.get("epochs", 20)), [])}
    if seg.get("x0_longer"):
        epochs = int(seg["x0_longer"])
        out[f"{X0_SEGMENTER}, {epochs} epochs"] = X0Unit(f"x0_segmenter_{epochs}_epochs", epochs, [])
    if seg.get("x0_priors"):
        epochs, priors = x0_priors_of(seg["x0_priors"])
        out[x0_priors_name(len(priors), epochs)] = X0Unit(f"x0_priors_segmenter_{epochs}_epochs", epochs, priors)
    entries = seg.get("x0_data") or []
    for entry in entries if isinstance(entries, list) else [entries]:
        epochs, train = x0_data_of(entry)
        out[x0_data_name(epochs, train)] = X0Unit(f"x0_segmenter_{epochs}_epochs_{train}_train", epochs, [], train)
    return out


def x0_data_of(entry) -> tuple[int, int]:
    """(epochs, train) of a segmenter.x0_data entry {epochs: N >= 1, train: M >= 1}; ConfigError naming it else."""
    try:
        epochs, train = int(entry["epochs"]), int(entry["train"])
    except (KeyError, TypeError, ValueError):
        epochs, train = 0, 0
    if epochs < 1 or train < 1:
        raise ConfigError(f"segmenter.x0_data={entry}: expected {{epochs: N >= 1, train: M >= 1}} (M simulated "
                          "training targets)")
    return epochs, train


def x0_data_name(epochs: int, train: int) -> str:
    """The method of the segmenter on x0 alone trained on ``train`` simulated targets for ``epochs`` epochs."""
    return f"{X0_SEGMENTER}, {epochs} epochs, {train} simulated targets"


def x0_priors_of(entry) -> tuple[int, list[list[float]]]:
    """(epochs, priors) of a segmenter.x0_priors entry {epochs: N >= 1, priors: [[prior_std, prior_length], ...]},
    both positive; ConfigError naming the entry otherwise."""
    try:
        epochs, priors = int(entry["epochs"]), [[float(std), float(length)] for std, length in entry["priors"]]
    except (KeyError, TypeError, ValueError):
        priors, epochs = [], 0
    if epochs < 1 or not priors or not all(std > 0 and length > 0 for std, length in priors):
        raise ConfigError(f"segmenter.x0_priors={entry}: expected {{epochs: N >= 1, priors: [[prior_std, "
                          "prior_length], ...]} with positive numbers")
    return epochs, priors


def x0_priors_name(n_priors: int, epochs: int) -> str:
    """The method of the segmenter on x0 and ``n_priors`` more linearised reconstructions (no network)."""
    noun = "reconstruction" if n_priors == 1 else "reconstructions"
    return f"learned segmentation of x0 and {n_priors} more linearised {noun} (no network), {epochs} epochs"


def no_data_term_name(method: str) -> str:
    """The method of a network scored with its data-fit directions zeroed."""
    return f"{method}, data term removed"


def end_to_end_variants(spec: dict) -> list[str]:
    """The variants whose networks a profile trains on end to end with a segmenter (segmenter.end_to_end)."""
    return list(((spec.get("segmenter") or {}).get("end_to_end") or {}).get("variants", []))


def methods_of(spec: dict) -> list[str]:
    """Every method a profile scores besides the x0 baseline: its variants, the x0-only segmenter, the networks
    trained end to end."""
    return [*spec["variants"], *x0_segmenters(spec), *map(end_to_end_name, end_to_end_variants(spec))]


def primary_rule(rules, baseline: bool = False) -> str:
    """The rule of a method's level columns and figure, given the rules it was scored with: learned where it has
    it, else :data:`PRIMARY` (otsu for the linearised x0, log_otsu for a network)."""
    return PRIMARY["segmented"] if "learned" in rules else PRIMARY["baseline" if baseline else "network"]


def rules_of(rows: list[dict], method: str) -> set[str]:
    """The labelling rules a method's rows were scored with."""
    return {r["segmentation"] for r in rows if r["method"] == method}


def sim_truths(operator, classes: torch.Tensor) -> np.ndarray:
    """(B, 256, 256) uint8 labels of per-element classes (B, E) on the operator's mesh (each pixel its triangle's)."""
    pixels = PixelMap(operator.nodes.cpu().numpy(), operator.elements.cpu().numpy(), mode="element")
    return np.rint(pixels(classes.double().cpu().numpy())).astype(np.uint8)


def _labels(tank, sigma, rules, x0, y) -> dict[str, np.ndarray]:
    """{rule: (B, 256, 256) labels} of conductivities sigma (B, E), with the x0 (B, E) and difference data y (B, 2356)
    they came from, by each of ``rules``."""
    return {rule: tank.labels(sigma, rule, x0, y) for rule in rules}


def _scored(method: str, seed: int, split: str, level: int, truths, labels: dict, commit: str) -> list[dict]:
    """Score rows of labels {rule: (B, 256, 256)} against truths (B, 256, 256), one per target and rule."""
    return [{"method": method, "seed": seed, "split": split, "level": level, "target": index, "segmentation": rule,
             "score": round(ktc_score(truth, label), 4), "git_commit": commit}
            for rule, images in labels.items() for index, (truth, label) in enumerate(zip(truths, images), start=1)]


def baseline_name(cfg) -> str:
    """The x0 row of a run's operator calibration (runs with the same background and z share x0)."""
    return f"linearised x0 (sigma_bg {cfg.operator.background:g}, z {cfg.operator.contact_impedance:g})"


def score_run(model_path: Path, method: str, seed: int, root: Path, truths: np.ndarray, n_sim: int, commit: str,
              scored_baselines=(), rules=None, data_term: bool = True):
    """(rows of the network, rows of its x0, {name: (images, labels) (7, 4, 256, 256)}) of one trained model
    (a run's best.pt, or one with a segmenter); the pictures' labels use each method's primary rule. The x0 is
    not scored again (its rows are empty) when its name is in ``scored_baselines``: runs on the same data share
    it. ``rules``: the network's labelling rules (default: all it can apply); a model whose segmenter reads x0
    alone is scored without its network (its images are x0's; ``runs_network``); ``data_term=False``: the network's data-fit
    directions are zero throughout (:func:`data_term_removed`; does it use the measurements?)."""
    reconstructor = KTCLearnedReconstructor(model_path, root / "training" / "ref.mat")
    model, tank = reconstructor.model, reconstructor.tank
    with nullcontext() if data_term else data_term_removed(model):
        return _score_reconstructor(reconstructor, method, seed, root, truths, n_sim, commit, scored_baselines,
                                    rules or tank.rules())


def measured_twin(reconstructor: KTCLearnedReconstructor, root: Path, truths: np.ndarray) -> TankTwin:
    """The twin (:class:`TankTwin`) of the measured training targets on the model's simulator: its level-1
    operator (mesh, background, contact impedance), fitted to the measured level-1 data once per simulator."""
    operator = reconstructor.operator(1)
    key = (str(root), operator.h0, operator.background, tuple(operator.cem.contact_impedance.tolist()))
    if key not in _TWINS:
        _TWINS[key] = TankTwin(operator, truths, reconstructor.measurements(load_level(root, 1), 1))
    return _TWINS[key]


def _score_reconstructor(reconstructor: KTCLearnedReconstructor, method, seed, root, truths, n_sim, commit,
                         scored_baselines, rules):
    """:func:`score_run` of a loaded model: the simulated test split, the measured levels and their twin."""
    cfg, model, tank = reconstructor.cfg, reconstructor.model, reconstructor.tank
    baseline = baseline_name(cfg)
    x0_only = not reconstructor.runs_network  # its segmenter reads x0 alone: the network is not scored
    with_baseline = baseline not in scored_baselines and not x0_only
    trained = reconstructor.operator(int(cfg.operator.level))
    on_operator(model, trained)
    test = load_datasets(cfg, trained, splits=("test",))["test"]
    sim = slice(0, min(n_sim, len(test)))
    x0_sim, y_sim = test.x0[sim].double(), test.y[sim].double()
    with torch.no_grad():
        sigma = x0_sim if x0_only else model(test.y[sim].float(), test.x0[sim].float()).double()
    sim_truth = sim_truths(trained, instantiate(cfg.data.generator).labels(test.x[sim].double()))
    rows = _scored(method, seed, "sim", 1, sim_truth, _labels(tank, sigma, rules, x0_sim, y_sim), commit)
    base_rows = _scored(baseline, seed, "sim", 1, sim_truth, _labels(tank, x0_sim, OTSU_RULES, x0_sim, y_sim),
                        commit) if with_baseline else []
    pictures = {method: ([], []), baseline: ([], [])} if with_baseline else {method: ([], [])}
    twin = measured_twin(reconstructor, root, truths)
    for level in range(1, ktc2023.N_LEVELS + 1):
        for split, y in (("measured", reconstructor.measurements(load_level(root, level), level)),
                         ("twin", twin.data(level))):
            x0, sigma = reconstructor.solve(y, level)
            outputs = [(method, sigma, rows, primary_rule(rules), rules)]  # sigma is x0 for an x0-only segmenter
            if with_baseline:
                outputs.append((baseline, x0, base_rows, primary_rule(OTSU_RULES, baseline=True), OTSU_RULES))
            for name, values, store, rule, name_rules in outputs:
                labels = _labels(tank, values, name_rules, x0, y)
                store += _scored(name, seed, split, level, truths, labels, commit)
                if split == "measured":
                    pictures[name][0].append(tank.images(values)), pictures[name][1].append(labels[rule])
    return rows, base_rows, {name: (np.stack(i), np.stack(l)) for name, (i, l) in pictures.items()}


def trained_segmenter(run_dir: Path, name: str, inputs, spec: dict, seed: int, report_only: bool,
                      network_lr: float | None = None, epochs: int | None = None, priors=(),
                      train: int | None = None) -> Path | None:
    """The run's network with a segmenter reading ``inputs``, trained once into run_dir/<name>/ (a claimed unit:
    workers share them); None while another process trains it, or in report_only mode before it exists.
    ``network_lr``: the network is trained on with it, end to end (:func:`add_segmenter`); ``epochs``: default
    the profile's segmenter.epochs; ``priors``: extra linearised reconstructions it reads; ``train``: simulated
    training targets (default: the run's dataset's)."""
    unit = run_dir / name
    target = unit / "model.pt"

    def work() -> dict:
        how = "frozen" if network_lr is None else f"trained on at lr {network_lr:g}"
        extra = f" and {len(priors)} more linearised reconstructions" if priors else ""
        data = f"; {train} simulated training targets" if train else ""
        print(f"{name}: training on the outputs of {run_dir.name} (inputs {', '.join(inputs)}{extra}; network {how}"
              f"{data})")
        return add_segmenter(run_dir / "checkpoints" / "best.pt", target, inputs,
                             epochs=int(epochs or spec["segmenter"].get("epochs", 20)), seed=seed,
                             settings={"data.splits.train": int(train)} if train else None,
                             network_lr=network_lr, priors=priors)

    return target if run_claimed(unit, work, report_only) is not None else None


def reference_levels(root: Path, truths: np.ndarray) -> dict[int, float]:
    """{level: KTC score summed over the 4 measured targets} of our replication of the reference method (the
    default variant of study=ktc2023_levels)."""
    rows = score_variant(root, "reference settings", {}, truths, "")[0]
    return {level: sum(r["score"] for r in rows if r["level"] == level) for level in range(1, ktc2023.N_LEVELS + 1)}


SHIPPED_SETTINGS = {"operator.data_root": "${oc.env:DEEPUNROLL_KTC_ROOT,../shared/data/ktc2023}", "data.root": "data"}


def ship(spec: dict, profile: str, runs: dict, curves: dict, rows: list[dict], out_dir: Path) -> Path | None:
    """Export one of ``spec['ship']['candidates']`` (variants, or :data:`X0_SEGMENTER`) x seeds to
    ``spec['ship']['to']`` (under out_dir), with its provenance: the one with the lowest simulated validation loss
    of its last stage (the segmenter's cross-entropy when every candidate has a segmenter, else the network's
    MSE; all candidates share the simulated data), or with ``ship.method_by: measured`` the seed of lowest loss
    of the method with the highest measured total (:func:`ship_choice`). None (nothing written) until every
    candidate is done."""
    candidates, target = list(spec["ship"]["candidates"]), out_dir / spec["ship"]["to"]
    known = methods_of(spec)
    if not candidates or any(name not in known for name in candidates):
        raise ConfigError(f"ktc2023_learned profile {profile}: ship.candidates {candidates} must be among "
                          f"{', '.join(known)}")
    done = {(name, seed): runs[name, seed] for name in candidates for seed in spec["seeds"] if (name, seed) in runs}
    if len(done) < len(candidates) * len(spec["seeds"]):
        return None
    segmented = {key: "segmenter" in checkpoint_provenance(path) for key, path in done.items()}
    if all(segmented.values()):
        best_val = {key: float(checkpoint_provenance(path)["segmenter"]["best_val_ce"]) for key, path in done.items()}
        loss = "simulated validation cross-entropy of the segmenter"
    elif not any(segmented.values()):
        best_val = {key: float(min(curves[key])) for key in done}
        loss = "simulated validation MSE"
    else:
        raise ConfigError(f"ktc2023_learned profile {profile}: ship.candidates mix networks with and without a "
                          "segmenter; their validation losses do not compare")
    name, seed, chosen_by = ship_choice(best_val, rows, spec["ship"].get("method_by", "sim_val"), loss)
    rule = primary_rule(rules_of(rows, name))
    measured = _totals(rows, name, seed, rule)
    export_model(done[name, seed], target, SHIPPED_SETTINGS, {
        **checkpoint_provenance(done[name, seed]), "study": f"ktc2023_learned profile={profile}", "variant": name,
        "seed": seed, "chosen_by": chosen_by, "best_val": {f"{n}, seed {s}": v for (n, s), v in best_val.items()},
        "segmentation": rule, "measured_total": measured["total"],
        "measured_levels": [measured[level] for level in range(1, ktc2023.N_LEVELS + 1)]})
    return target


def ship_choice(best_val: dict, rows: list[dict], method_by: str, loss: str) -> tuple[str, int, str]:
    """(method, seed, how it was chosen) of the shipped model among ``best_val`` {(method, seed): simulated
    validation loss} (``loss`` names it). ``method_by`` sim_val: the lowest loss over methods and seeds;
    measured: the method of the highest measured total (seed mean, its primary rule; the public training levels,
    so not held out), then its seed of the lowest loss, so the measured files do not pick the seed."""
    if method_by == "sim_val":
        return (*min(best_val, key=best_val.get), f"lowest {loss} over candidates and seeds")
    totals = {}
    for name, seed in best_val:
        totals.setdefault(name, []).append(_totals(rows, name, seed, primary_rule(rules_of(rows, name)))["total"])
    method = max(totals, key=lambda name: np.mean(totals[name]))
    seed = min((key for key in best_val if key[0] == method), key=best_val.get)[1]
    return method, seed, (f"highest measured total of the candidate methods (seed mean {np.mean(totals[method]):.3f}, "
                          f"public training levels: not held out), then its seed of the lowest {loss}")


def checkpoint_provenance(path: Path) -> dict:
    """The provenance stored in a model file ({} for a training checkpoint)."""
    return dict(load_checkpoint(path).get("provenance") or {})


def run(profile: str, out_dir: Path, data_root: Path | None = None, runs_dir: Path | None = None,
        report_only: bool = False) -> list[dict]:
    spec = load_profile("ktc2023_learned", profile)
    root = measured_data_root("ktc2023_learned", data_root,
                              "the KTC2023 folder (training/, training_levels/; published on Zenodo, see the "
                              "README's Real tanks section)").resolve()
    for pair in spec.get("compare", []):
        if len(pair) != 2 or any(name not in methods_of(spec) for name in pair):
            raise ConfigError(f"ktc2023_learned profile {profile}: compare entry {pair} must name two of its methods "
                              f"({', '.join(methods_of(spec))})")
    if (spec.get("ship") or {}).get("method_by", "sim_val") not in SHIP_RULES:
        raise ConfigError(f"ktc2023_learned profile {profile}: ship.method_by={spec['ship']['method_by']!r}: "
                          f"expected one of {', '.join(SHIP_RULES)}")
    segmenting, joint = list((spec.get("segmenter") or {}).get("variants", [])), end_to_end_variants(spec)
    for key, names in (("variants", segmenting), ("end_to_end.variants", joint)):
        unknown = [name for name in names if name not in spec["variants"]]
        if unknown:
            raise ConfigError(f"ktc2023_learned profile {profile}: segmenter.{key} {unknown} are not among its "
                              "variants")
    truths = load_truths(root)
    runs_dir = Path(runs_dir) if runs_dir else out_dir / "runs" / "reproduce"
    rows, ablations, curves, pictures, baselines, runs = [], {}, {}, {}, {}, {}
    for seed in spec["seeds"]:
        for method, extra in spec["variants"].items():
            run_dir = runs_dir / f"ktc2023_learned_{profile}" / slug(f"{method}_seed={seed}")
            overrides = [f"+experiment={spec['experiment']}", *spec["base"], *extra, f"seed={seed}",
                         f"operator.data_root={root}", "train.device=cpu", "evaluate=false",
                         f"data.root={runs_dir / 'data'}"]
            result = run_one(overrides, run_dir, {"study": "ktc2023_learned", "variant": method}, report_only)
            if result is None:
                continue
            model_path = run_dir / "checkpoints" / "best.pt"
            if method in segmenting:
                model_path = trained_segmenter(run_dir, "segmenter", ("sigma", "x0"), spec, seed, report_only)
                if model_path is None:
                    continue
            run_rows, base_rows, run_pictures = score_run(model_path, method, seed, root, truths, spec["sim_samples"],
                                                          result["git_commit"], baselines)
            rows += run_rows
            for x0_method, x0_unit in (x0_segmenters(spec) if method in segmenting[:1] else {}).items():
                x0_model = trained_segmenter(run_dir, x0_unit.unit, ("x0",), spec, seed, report_only,
                                             epochs=x0_unit.epochs, priors=x0_unit.priors, train=x0_unit.train)
                if x0_model is not None:
                    x0_rows, _, x0_pictures = score_run(x0_model, x0_method, seed, root, truths, spec["sim_samples"],
                                                        result["git_commit"], rules=("learned",))
                    rows += x0_rows
                    runs[x0_method, seed] = x0_model
                    if seed == spec["seeds"][0]:
                        pictures.update(x0_pictures)
            if base_rows:  # runs with the same operator calibration share x0: scored once
                baselines[base_rows[0]["method"]] = base_rows
            if method in joint:
                joint_model = trained_segmenter(run_dir, "joint_segmenter", ("sigma", "x0"), spec, seed, report_only,
                                                float(spec["segmenter"]["end_to_end"]["network_lr"]))
                if joint_model is not None:
                    name = end_to_end_name(method)
                    joint_rows, _, joint_pictures = score_run(joint_model, name, seed, root, truths,
                                                              spec["sim_samples"], result["git_commit"], baselines)
                    rows += joint_rows
                    runs[name, seed] = joint_model
                    if result["config"]["net"]["direction"] != "none":  # a data term to remove
                        rows += score_run(joint_model, no_data_term_name(name), seed, root, truths,
                                          spec["sim_samples"], result["git_commit"], baselines, data_term=False)[0]
                    if seed == spec["seeds"][0]:
                        pictures.update(joint_pictures)
            ablations[method, seed] = run_ablation(run_dir)
            runs[method, seed] = model_path
            curves[method, seed] = val_curve(run_dir)
            if seed == spec["seeds"][0]:
                pictures.update(run_pictures)
    if not baselines:
        return rows
    rows = [row for base in baselines.values() for row in base] + rows
    _write(profile, out_dir, rows, list(baselines), ablations, curves, pictures, truths, spec,
           reference_levels(root, truths))
    if spec.get("ship"):
        shipped = ship(spec, profile, runs, curves, rows, out_dir)
        print(f"shipped model: {shipped}" if shipped else "ship: not every seed is trained yet; nothing exported")
    return rows


def _totals(rows: list[dict], method: str, seed: int | None, rule: str) -> dict | None:
    """{level: sum of the 4 measured scores}, plus "total", "sim" (mean simulated score) and "twin" (the total on
    the measured targets' twin, :class:`TankTwin`), for one method, seed
    (None: the baseline, the same for every seed; its first) and labelling rule; None if it has no such rows."""
    if seed is None:
        seed = next(r["seed"] for r in rows if r["method"] == method)
    mine = [r for r in rows if r["method"] == method and r["seed"] == seed and r["segmentation"] == rule]
    if not mine:
        return None
    out = {level: sum(r["score"] for r in mine if r["split"] == "measured" and r["level"] == level)
           for level in range(1, ktc2023.N_LEVELS + 1)}
    out["total"] = sum(out.values())
    out["sim"] = float(np.mean([r["score"] for r in mine if r["split"] == "sim"]))
    out["twin"] = sum(r["score"] for r in mine if r["split"] == "twin")
    return out


def _table_row(name, seed, rows, extra, baseline: bool = False) -> tuple[list, dict]:
    """(table row, {rule: totals} of the rules the method has) of one method and seed."""
    rule = primary_rule(rules_of(rows, name), baseline)
    by_rule = {r: t for r in SEGMENTATIONS if (t := _totals(rows, name, seed, r)) is not None}
    cell = {r: (f"{by_rule[r]['total']:.3f}", f"{by_rule[r]['sim']:.3f}") if r in by_rule else ("-", "-")
            for r in SEGMENTATIONS}
    return ([name, "-" if seed is None else seed, rule, *[f"{by_rule[rule][level]:.3f}" for level in range(1, 8)],
             *[cell[r][0] for r in SEGMENTATIONS], f"{by_rule[rule]['twin']:.3f}", *[cell[r][1] for r in SEGMENTATIONS],
             *extra], by_rule)


def _twin_gap_lines(seeds_of: dict, rows: list[dict]) -> list[str]:
    """Per method (its primary rule, seed mean): the twin's total minus the measured total per target, summed over
    the 7 levels: where the physics of the tank costs what the simulator does not."""
    lines = []
    for method in seeds_of:
        rule = primary_rule(rules_of(rows, method))
        mine = [r for r in rows if r["method"] == method and r["segmentation"] == rule]
        n_seeds = len({r["seed"] for r in mine})
        gaps = [sum(r["score"] * (1 if r["split"] == "twin" else -1) for r in mine
                    if r["target"] == target and r["split"] in ("twin", "measured")) / n_seeds
                for target in range(1, N_TARGETS + 1)]
        lines.append(f"- {method}, {rule}: twin minus measured per target (7 levels, seed mean): "
                     f"{' / '.join(f'{gap:+.3f}' for gap in gaps)}")
    return lines


def _own_level_lines(spec: dict, rows: list[dict], reference: dict[int, float]) -> list[str]:
    """Summary lines of the profile's ``own_level`` sets {name: [variant trained at level 1, ..., at level 7]}: level
    L's score taken from the network trained at L, per seed where all seven are done."""
    lines = []
    for name, variants in (spec.get("own_level") or {}).items():
        if len(variants) != ktc2023.N_LEVELS or any(v not in spec["variants"] for v in variants):
            raise ConfigError(f"ktc2023_learned own_level {name!r}: expected one variant of the profile per level 1-7")
        seeds = [seed for seed in spec["seeds"]
                 if all(any(r["method"] == v and r["seed"] == seed for r in rows) for v in variants)]
        if not seeds:
            continue
        rule = primary_rule(rules_of(rows, variants[0]))
        per_seed = [{level: _totals(rows, variants[level - 1], seed, rule)[level] for level in range(1, 8)}
                    for seed in seeds]
        totals = [sum(levels.values()) for levels in per_seed]
        means = {level: float(np.mean([levels[level] for levels in per_seed])) for level in range(1, 8)}
        above = sum(means[level] > reference[level] for level in range(1, 8))
        lines.append(f"- {name}, {rule}: measured total {np.mean(totals):.3f} +- {np.std(totals):.3f} over "
                     f"{len(seeds)} seed(s); per level (seed mean) "
                     f"{' / '.join(f'{means[level]:.3f}' for level in range(1, 8))}; above our replication of the "
                     f"reference method on {above} of 7 levels")
    return lines


def _write(profile, out_dir, rows, baselines, ablations, curves, pictures, truths, spec, reference) -> None:
    results, figures = out_dir / "results", out_dir / "figures"
    results.mkdir(parents=True, exist_ok=True)
    stem = f"ktc2023_learned_{profile}"
    write_csv(rows, results / f"{stem}.csv", COLUMNS)
    header = ["method", "seed", "rule of L1-L7", *[f"L{level}" for level in range(1, ktc2023.N_LEVELS + 1)],
              *[f"total {rule}" for rule in SEGMENTATIONS], "twin total", *[f"sim {rule}" for rule in SEGMENTATIONS],
              "MSE ratio, no data term", "MSE ratio, another y", "epochs"]
    body = [_table_row(name, None, rows, ["-", "-", "-"], baseline=True)[0] for name in baselines]
    seeds_of = {}
    segmented = {(r["method"], r["seed"]): None for r in rows  # methods without a network run of their own
                 if r["method"] not in baselines and (r["method"], r["seed"]) not in ablations}
    for (method, seed), ablation in {**ablations, **segmented}.items():
        extra = ["-", "-", "-"] if ablation is None else [
            f"{ablation['no_data_term_ratio']:.3f}", f"{ablation['other_y_ratio']:.3f}", len(curves[method, seed])]
        row, by_rule = _table_row(method, seed, rows, extra)
        body.append(row)
        seeds_of.setdefault(method, []).append(by_rule)
    lines = [f"# KTC2023: learned reconstructions trained on simulation (`study=ktc2023_learned profile={profile}`)", "",
             f"Experiment `{spec['experiment']}` with overrides `{' '.join(spec['base']) or '(none)'}`; trained on "
             "simulated data only (level 1's electrodes unless the variant sets operator.level, or each sample's own "
             "level with data.levels), run on each measured "
             "level with that level's operator and linearised x0. "
             "Measured: KTC score summed over the 4 targets per level (max 4) and over the 7 levels (max 28), with "
             "the organisers' Otsu rule on the change image (otsu), on the log contrast log(sigma / sigma_bg) "
             "(log_otsu; deepunroll.realdata.ktc_learned), and, where the profile trains one, the learned segmenter "
             "on the frozen network's output and x0 (learned; deepunroll.realdata.ktc_segmenter). Sim: mean KTC "
             f"score on the first {spec['sim_samples']} simulated test targets (of the training level). Twin: the "
             "total of the row's rule on the measured targets' twin (deepunroll.realdata.ktc_twin: the true "
             "segmentations with conductivities fitted to the measured level-1 data, simulated by the training "
             "data's CEM with its noise and each level's mask), so sim to twin is the targets' share of the "
             "sim-to-real gap and twin to measured the physics' share. The "
             f"organisers' reference method scores {REFERENCE_TOTAL} of 28 on the same measured files. The ratios are "
             "the simulated test MSE of the trained network with the data-fit directions zeroed and with another "
             "sample's y, over its own.", "",
             markdown_table(header, body), ""]
    for method, totals in seeds_of.items():
        for rule in [r for r in SEGMENTATIONS if r in totals[0]]:
            values, sims = [t[rule]["total"] for t in totals], [t[rule]["sim"] for t in totals]
            twins = [t[rule]["twin"] for t in totals]
            lines.append(f"- {method}, {rule}: measured total {np.mean(values):.3f} +- {np.std(values):.3f}, twin "
                         f"total {np.mean(twins):.3f} +- {np.std(twins):.3f}, sim score {np.mean(sims):.3f} over "
                         f"{len(values)} seed(s)")
    lines.append(f"- our replication of the reference method (its settings on our mesh), per level L1-L7: "
                 f"{' / '.join(f'{reference[level]:.3f}' for level in range(1, 8))}, total {sum(reference.values()):.3f}")
    for method, totals in seeds_of.items():
        rule = primary_rule(rules_of(rows, method))
        means = {level: float(np.mean([t[rule][level] for t in totals])) for level in range(1, 8)}
        above = [level for level in range(1, 8) if means[level] > reference[level]]
        lines.append(f"- {method}, {rule}, seed mean minus that replication per level: "
                     f"{' / '.join(f'{means[level] - reference[level]:+.3f}' for level in range(1, 8))}; above it on "
                     f"{len(above)} of 7 levels")
    lines += _twin_gap_lines(seeds_of, rows)
    lines += _own_level_lines(spec, rows, reference)
    for first, second in spec.get("compare", []):
        if first in seeds_of and second in seeds_of and len(seeds_of[first]) == len(seeds_of[second]):
            for rule in [r for r in SEGMENTATIONS if r in seeds_of[first][0] and r in seeds_of[second][0]]:
                gains = [a[rule]["total"] - b[rule]["total"] for a, b in zip(seeds_of[first], seeds_of[second])]
                summary = paired(gains)
                lines.append(f"- {first} vs {second}, {rule}: measured total {summary['mean']:+.3f} +- "
                             f"{summary['std']:.3f} paired over {summary['n']} seed(s), {summary['favour']} in favour")
    lines += ["", f"Figures: figures/{stem}_<method>.png (seed {spec['seeds'][0]}; labels by the row's rule), "
              f"validation curves figures/{stem}_curves.png. Runs trained at git commit(s) "
              f"{', '.join(sorted({r['git_commit'] for r in rows}))}; scored at {git_commit()}."]
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    for name, (images, labels) in pictures.items():
        is_base = name in baselines
        rule = primary_rule(rules_of(rows, name), is_base)
        total = _totals(rows, name, None if is_base else spec["seeds"][0], rule)["total"]
        plot_levels(images, labels, truths, figures / f"{stem}_{slug(name)}.png",
                    f"KTC2023 training levels, {name} ({rule}): {total:.2f} of 28")
    plot_curves(curves, figures / f"{stem}_curves.png")


def plot_curves(curves: dict, path: Path) -> Path:
    """Validation loss per epoch of every run (one colour per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 3.5))
    colours = {}
    for (method, seed), curve in curves.items():
        colour = colours.setdefault(method, f"C{len(colours)}")
        ax.plot(range(1, len(curve) + 1), curve, color=colour, label=method if seed == min(
            s for m, s in curves if m == method) else None)
    ax.set_xlabel("epoch"), ax.set_ylabel("validation MSE (S/m)^2"), ax.set_yscale("log")
    ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
