"""Learned three-class segmentation of a KTC network's output (issue 18, item 2): a small U-Net trained on simulation.

The networks of ``+experiment=ktc_lpgd_rma`` output conductivities, and the KTC score is computed on labels
(0 water, 1 resistive, 2 conductive). Otsu's rule (:mod:`segmentation`) always looks for three classes and takes
its thresholds from each image's histogram. :class:`TankSegmenter` learns the labelling instead. Its inputs, on an
n x n grid of the tank (nodal images, :class:`PixelMap`), are

* ``sigma``: the network's log contrast log(sigma / sigma_bg) (floored at 1e-3 sigma_bg);
* ``x0``: the linearised step's change x0 / sigma_bg (it shows the level's artefacts);
* optionally (``priors``), more linearised reconstructions of the same measurements with other smoothness priors
  (prior std, correlation length), scaled like x0;
* always the tank's indicator (1 inside the disk).

It outputs three class logits per pixel. It is trained with cross-entropy against the simulated targets' classes
(``KTCPhantoms.labels``, each pixel its triangle's), while the reconstruction network stays frozen, or is
trained on with it, end to end for the labels (``network_lr``; :func:`train_segmenter`). Labels on the
256 x 256 KTC grid: the logits upsampled bilinearly, argmax, 0 outside the tank.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from tqdm.auto import tqdm

from deepunroll.pipeline import load_datasets, load_trained
from deepunroll.realdata.ktc_sim import KTCDifferenceCEM, KTCDifferenceX0
from deepunroll.realdata.pixel_grid import PixelMap
from deepunroll.train import checkpoint as checkpoints

INPUTS = ("sigma", "x0")
N_CLASSES = 3
LOG_FLOOR = 1e-3  # sigma below LOG_FLOOR * sigma_bg counts as LOG_FLOOR * sigma_bg (log contrast >= -6.9)


class SegmenterInputs:
    """Per-element values on a KTC operator's mesh -> the segmenter's input images (B, n_channels, n, n):
    ``inputs`` in order, then one linearised reconstruction of the measurements per entry of ``priors``
    ((prior_std S/m, prior_length m) each, :class:`KTCDifferenceX0`, scaled like x0), then the tank."""

    def __init__(self, operator, inputs=INPUTS, n: int = 64, priors=()) -> None:
        inputs = tuple(inputs)
        if not inputs or any(name not in INPUTS for name in inputs) or len(set(inputs)) != len(inputs):
            raise ValueError(f"segmenter inputs {list(inputs)}: expected distinct names among {list(INPUTS)}")
        self.priors = tuple((float(std), float(length)) for std, length in priors)
        if self.priors and getattr(operator, "level", None) != 1:
            raise ValueError("segmenter priors: the extra linearised reconstructions need the operator at level 1 "
                             f"(every electrode; each target's removed rows are read from its y), got level "
                             f"{getattr(operator, 'level', None)}")
        self.linearised = [KTCDifferenceX0(std, length) for std, length in self.priors]
        nodes, elements = operator.nodes.cpu().numpy(), operator.elements.cpu().numpy()
        self.operator, self.inputs, self.n = operator, inputs, int(n)
        self.background = float(operator.background)
        nodal = PixelMap(nodes, elements, n=self.n)
        self.element = PixelMap(nodes, elements, n=self.n, mode="element")
        matrix = nodal.matrix.tocoo()
        self.nodal = torch.sparse_coo_tensor(np.stack([matrix.row, matrix.col]), matrix.data, matrix.shape,
                                             dtype=torch.float64, check_invariants=True).coalesce()
        inside = np.zeros(self.n * self.n)
        inside[nodal.inside] = 1.0
        self.inside = torch.tensor(inside, dtype=torch.float32).view(1, 1, self.n, self.n)

    @property
    def n_channels(self) -> int:
        """Input images per sample: the inputs, the extra reconstructions, the tank."""
        return len(self.inputs) + len(self.priors) + 1

    def __call__(self, sigma: torch.Tensor, x0: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, n, n) float32 of sigma, x0 (B, E) S/m (and, with priors, the difference data y (B, 2356) V, a
        removed row 0), on sigma's device; differentiable in sigma (the segmenter trained end to end with the
        network, :func:`train_segmenter`)."""
        if self.priors and y is None:
            raise ValueError(f"segmenter with {len(self.priors)} extra linearised reconstructions: needs the "
                             "measurements y")
        scaled = {"sigma": lambda: torch.log(sigma.double().clamp(min=LOG_FLOOR * self.background) / self.background),
                  "x0": lambda: x0.double().to(sigma.device) / self.background}
        values = [scaled[name]() for name in self.inputs]
        values += [step(self.operator, y.double()).to(sigma.device) / self.background for step in self.linearised]
        nodal = self.nodal.to(sigma.device)
        images = [torch.sparse.mm(nodal, value.T).T.reshape(-1, self.n, self.n).float() for value in values]
        inside = self.inside.to(sigma.device).expand(len(images[0]), -1, -1, -1)
        return torch.cat([torch.stack(images, 1), inside], 1)

    def classes(self, element_classes: torch.Tensor) -> torch.Tensor:
        """(B, n, n) int64 classes of per-element classes (B, E) (each pixel its triangle's; 0 outside)."""
        return torch.tensor(np.rint(self.element(element_classes.double().cpu().numpy())), dtype=torch.long)


def _block(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1), nn.GroupNorm(8, n_out), nn.SiLU(),
                         nn.Conv2d(n_out, n_out, 3, padding=1), nn.GroupNorm(8, n_out), nn.SiLU())


class TankSegmenter(nn.Module):
    """U-Net with two poolings: (B, n_inputs, n, n) -> (B, 3, n, n) class logits (n divisible by 4)."""

    def __init__(self, n_inputs: int, channels: int = 32) -> None:
        super().__init__()
        c = int(channels)
        if c < 8 or c % 8:
            raise ValueError(f"segmenter channels={channels}: expected a multiple of 8 (group norm of 8 groups)")
        self.down1, self.down2, self.bottom = _block(n_inputs, c), _block(c, 2 * c), _block(2 * c, 4 * c)
        self.up2, self.up1 = _block(6 * c, 2 * c), _block(3 * c, c)
        self.out = nn.Conv2d(c, N_CLASSES, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % 4 or images.shape[-2] % 4:
            raise ValueError(f"TankSegmenter: image size {tuple(images.shape[-2:])} must be divisible by 4")
        a = self.down1(images)
        b = self.down2(F.max_pool2d(a, 2))
        c = self.bottom(F.max_pool2d(b, 2))
        b = self.up2(torch.cat([F.interpolate(c, scale_factor=2.0), b], 1))
        return self.out(self.up1(torch.cat([F.interpolate(b, scale_factor=2.0), a], 1)))


class KTCSegmentation:
    """A trained segmenter on its inputs' mesh: ``labels(sigma, x0, y)`` -> (B, 256, 256) uint8 KTC labels."""

    def __init__(self, features: SegmenterInputs, segmenter: TankSegmenter) -> None:
        if segmenter.down1[0].in_channels != features.n_channels:
            raise ValueError(f"segmenter reads {segmenter.down1[0].in_channels} images, its inputs give "
                             f"{features.n_channels}")
        self.features, self.segmenter = features, segmenter.eval()
        operator = features.operator
        tank = PixelMap(operator.nodes.cpu().numpy(), operator.elements.cpu().numpy(), mode="element")
        self.tank = torch.zeros(tank.n * tank.n, dtype=torch.bool)
        self.tank[tank.inside] = True
        self.tank = self.tank.view(tank.n, tank.n)

    def labels(self, sigma: torch.Tensor, x0: torch.Tensor, y: torch.Tensor | None = None) -> np.ndarray:
        """Labels of sigma, x0 (B, E) S/m; the difference data y (B, 2356) V are needed with priors."""
        with torch.no_grad():
            logits = self.segmenter(self.features(sigma, x0, y))
            logits = F.interpolate(logits, size=tuple(self.tank.shape), mode="bilinear", align_corners=False)
        return (logits.argmax(1) * self.tank).numpy().astype(np.uint8)

    def to_plain(self, history: list | None = None) -> dict:
        """Checkpoint entry (plain data): weights, settings and the training history."""
        return {"weights": self.segmenter.state_dict(), "inputs": list(self.features.inputs), "grid": self.features.n,
                "channels": self.segmenter.out.in_channels, "priors": [list(p) for p in self.features.priors],
                "history": list(history or [])}

    @classmethod
    def from_plain(cls, entry: dict, operator) -> "KTCSegmentation":
        # no priors in models written before the extra reconstructions
        features = SegmenterInputs(operator, entry["inputs"], int(entry["grid"]), entry.get("priors", []))
        segmenter = TankSegmenter(features.n_channels, int(entry["channels"]))
        segmenter.load_state_dict(entry["weights"])
        return cls(features, segmenter)


def network_outputs(model: nn.Module, dataset, batch_size: int = 100) -> torch.Tensor:
    """(B, E) float64 outputs of the frozen network on a dataset's (y, x0), in batches."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return torch.cat([model(dataset.y[i:i + batch_size].to(dtype), dataset.x0[i:i + batch_size].to(dtype)).double()
                          for i in range(0, len(dataset.y), batch_size)])


def train_segmenter(model: nn.Module, operator, sets: dict, element_classes, inputs=INPUTS, n: int = 64,
                    channels: int = 32, epochs: int = 20, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                    progress: bool = True, network_lr: float | None = None,
                    priors=()) -> tuple[KTCSegmentation, list[dict]]:
    """Train a segmenter on a network's outputs for ``sets`` {"train", "val"} (datasets with y, x0, x).

    ``element_classes``: sigma (B, E) -> classes (B, E) (the generator's ``labels``). Adam at ``lr`` with a
    cosine decay over ``epochs``, cross-entropy, the weights of the lowest validation loss kept; a step whose
    loss or gradient is not finite is skipped. The network stays frozen unless ``network_lr`` is given: then it
    is trained with the segmenter, end to end for the labels (its own Adam group at ``network_lr``, gradients
    clipped to norm 1), and left with the weights of the lowest validation loss. Returns (the segmentation,
    history [{epoch, train_ce, val_ce, skipped}]). ``priors``: extra linearised reconstructions of each sample's
    y as inputs (:class:`SegmenterInputs`)."""
    if int(epochs) < 1:
        raise ValueError(f"segmenter epochs={epochs}: expected >= 1")
    joint = network_lr is not None
    features = SegmenterInputs(operator, inputs, n, priors)
    if joint and "sigma" not in features.inputs:
        raise ValueError("segmenter trained end to end (network_lr): its inputs must include 'sigma'")
    dtype = next(model.parameters()).dtype
    classes = {split: features.classes(element_classes(sets[split].x.double())) for split in ("train", "val")}
    cached = {} if joint else {
        split: features(network_outputs(model, sets[split]) if "sigma" in features.inputs else sets[split].x0.double(),
                        sets[split].x0, sets[split].y) for split in ("train", "val")}

    def images(split: str, index) -> torch.Tensor:
        """The segmenter's inputs for samples ``index`` of a split (the network run now when it is trained)."""
        if not joint:
            return cached[split][index]
        ds = sets[split]
        return features(model(ds.y[index].to(dtype), ds.x0[index].to(dtype)), ds.x0[index], ds.y[index])

    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        segmenter = TankSegmenter(features.n_channels, channels)
    groups = [{"params": list(segmenter.parameters()), "lr": lr}]
    trained = [segmenter, model] if joint else [segmenter]
    if joint:
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": float(network_lr)})
    optimiser = torch.optim.Adam(groups)
    params = [p for group in groups for p in group["params"]]
    n_train = len(classes["train"])
    steps = int(epochs) * math.ceil(n_train / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    best, best_state, history = math.inf, None, []
    for epoch in range(1, int(epochs) + 1):
        for module in trained:
            module.train()
        order = torch.randperm(n_train, generator=generator)
        total, count, skipped = 0.0, 0, 0
        for start in tqdm(range(0, n_train, batch_size), desc=f"segmenter epoch {epoch}/{epochs}",
                          disable=not progress, leave=False):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(segmenter(images("train", batch)), classes["train"][batch])
            optimiser.zero_grad()
            if torch.isfinite(loss):
                loss.backward()
            norm = nn.utils.clip_grad_norm_(params, 1.0 if joint else math.inf)  # inf: the norm only, nothing scaled
            if not (torch.isfinite(loss) and torch.isfinite(norm)):
                skipped += 1
                continue
            optimiser.step()
            schedule.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
        for module in trained:
            module.eval()
        with torch.no_grad():
            val_index = torch.arange(len(classes["val"]))
            val = float(sum(F.cross_entropy(segmenter(images("val", part)), classes["val"][part], reduction="sum")
                            for part in val_index.split(100)) / classes["val"].numel())
        history.append({"epoch": epoch, "train_ce": total / max(count, 1), "val_ce": val, "skipped": skipped})
        if progress:
            tqdm.write(f"segmenter epoch {epoch}: train CE {history[-1]['train_ce']:.4f}, val CE {val:.4f}")
        if val < best:
            best, best_state = val, [{k: v.clone() for k, v in m.state_dict().items()} for m in trained]
    if best_state is None:
        raise RuntimeError("segmenter training: the validation loss was never finite")
    for module, state in zip(trained, best_state):
        module.load_state_dict(state)
    return KTCSegmentation(features, segmenter), history


def add_segmenter(source: str | Path, target: str | Path, inputs=INPUTS, n: int = 64, channels: int = 32,
                  epochs: int = 20, seed: int = 0, settings: dict | None = None, progress: bool = True,
                  network_lr: float | None = None, priors=()) -> dict:
    """Train a segmenter on the network of checkpoint ``source`` (trained on ``data=ktc2023_sim``) and write the
    network with it to ``target`` (:func:`export_model`). The simulated train / val splits are those of the stored
    config (generated if missing), with ``settings`` {dotted key: value} applied, e.g. ``operator.data_root``.
    ``network_lr``: the network is trained on with the segmenter, end to end for the labels, from the checkpoint's
    weights (:func:`train_segmenter`), and written with its new weights; ``priors``: extra linearised
    reconstructions as inputs (:class:`SegmenterInputs`). Returns the segmenter's history and provenance."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"model checkpoint {source} does not exist")
    cfg, model = load_trained(source, "cpu", settings, operator=f"{KTCDifferenceCEM.__module__}.KTCDifferenceCEM")
    operator = model.operator
    sets = load_datasets(cfg, operator, splits=("train", "val"))
    segmentation, history = train_segmenter(model, operator, sets, instantiate(cfg.data.generator).labels, inputs, n,
                                            channels, epochs, seed=seed, progress=progress, network_lr=network_lr,
                                            priors=priors)
    state = checkpoints.load(source)
    provenance = {**state.get("provenance", {}),
                  "segmenter": {"source": source.name, "seed": int(seed), "epochs": int(epochs),
                                "network_lr": network_lr, "priors": [list(p) for p in segmentation.features.priors],
                                "best_val_ce": min(h["val_ce"] for h in history),
                                "trained_on": f"{cfg.data.name}: {len(sets['train'])} train / {len(sets['val'])} val"}}
    checkpoints.export_model(source, target, provenance=provenance,
                             extra={"segmenter": segmentation.to_plain(history)},
                             weights=None if network_lr is None else model.state_dict())
    return {"history": history, "provenance": provenance}
