"""A network trained on simulated KTC2023 data (``data=ktc2023_sim``) run on measured tank data.

:class:`KTCLearnedReconstructor` has the interface of :class:`ktc_reconstruct.KTCReconstructor`
(``images(data, level)``, ``labels(data, level)``, ``n_elements``, ``sigma0``). For measurements U (B, 2356)
(NaN where a level removed electrodes) and the empty tank U_ref of ``ref.mat`` it forms the difference data
y = keep_L * (U - U_ref) (NaN -> 0), builds the level's operator (its electrodes removed; a network trained at
one level serves all: the data term carries the level) and its linearised x0, runs the network, and segments
its conductivity on the 256 x 256 grid (nodal images) by one of :data:`SEGMENTATIONS`:

* ``otsu``: the organisers' three-class Otsu rule on the change sigma - sigma_bg (as for the linearised step);
* ``log_otsu``: the same rule on the log contrast log(sigma / sigma_bg). A network outputs conductivities, whose
  resistive changes are bounded by -sigma_bg while conductive ones are not; on the change image Otsu's classes
  then follow the conductive tail and resistive inclusions are lost (docs/ktc_learned.md). The log contrast is
  symmetric in the two;
* ``learned``: a segmenter trained on simulation on top of the frozen network (:mod:`ktc_segmenter`), stored in
  the checkpoint under ``segmenter`` (``scripts/train_segmenter.py``); the default for a checkpoint that has one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from deepunroll.operators.eit.grid import GridOperator
from deepunroll.pipeline import load_trained
from deepunroll.realdata import ktc2023
from deepunroll.realdata.ktc_segmenter import KTCSegmentation
from deepunroll.realdata.ktc_sim import KTCDifferenceCEM
from deepunroll.realdata.pixel_grid import PixelMap
from deepunroll.realdata.segmentation import segment_ktc
from deepunroll.train import checkpoint as checkpoints


def on_operator(model: torch.nn.Module, operator: KTCDifferenceCEM) -> torch.nn.Module:
    """The model with its mesh operator replaced (same mesh, another level's mask), grid or native domain;
    a ``frozen_gn`` direction is relinearised for the new operator."""
    inner = getattr(model, "net", model)
    if model.operator is operator:  # already there: G stays as built
        return model
    if isinstance(inner.operator, GridOperator):
        inner.operator.mesh_operator = operator
    else:
        inner.operator = operator
    if inner.data_fit.kind == "frozen_gn":
        inner.data_fit.linearise_at_reference(inner.operator)
    return model


OTSU_RULES = ("otsu", "log_otsu")  # the rules every conductivity image can get (no trained segmenter needed)
SEGMENTATIONS = (*OTSU_RULES, "learned")
# the network scripts/ktc2023.py runs by default (weights and config; written by study=ktc2023_learned's ``ship``)
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "ktc2023_default.pt"
LOG_FLOOR = 1e-3  # log_otsu: conductivities below LOG_FLOOR * sigma_bg count as LOG_FLOOR * sigma_bg


class TankImages:
    """Element conductivities (B, E) S/m on a KTC operator's mesh -> 256 x 256 change images and labels
    (``segmentation``: one of :data:`SEGMENTATIONS`; ``learned`` needs ``segmenter``)."""

    def __init__(self, operator: KTCDifferenceCEM, segmentation: str = "otsu",
                 segmenter: KTCSegmentation | None = None) -> None:
        if segmentation not in SEGMENTATIONS:
            raise ValueError(f"segmentation={segmentation!r}: expected one of {', '.join(SEGMENTATIONS)}")
        if segmentation == "learned" and segmenter is None:
            raise ValueError("segmentation='learned': the model has no trained segmenter (scripts/train_segmenter.py "
                             "adds one)")
        self.background, self.segmentation, self.segmenter = operator.background, segmentation, segmenter
        self.pixels = PixelMap(operator.nodes.cpu().numpy(), operator.elements.cpu().numpy())

    def rules(self) -> tuple[str, ...]:
        """The labelling rules this object can apply (``learned`` only with a segmenter)."""
        return SEGMENTATIONS if self.segmenter is not None else OTSU_RULES

    def images(self, sigma: torch.Tensor) -> np.ndarray:
        """(B, 256, 256) conductivity changes sigma - sigma_bg (nodal images, 0 outside the tank)."""
        return self.pixels(sigma.detach().double().cpu().numpy() - self.background)

    def labels(self, sigma: torch.Tensor, segmentation: str | None = None,
               x0: torch.Tensor | None = None, y: torch.Tensor | None = None) -> np.ndarray:
        """(B, 256, 256) uint8 (0 water, 1 resistive, 2 conductive) by ``segmentation`` (default: this object's);
        ``learned`` also reads the linearised x0 (B, E), and the difference data y (B, 2356) where its segmenter
        has extra linearised reconstructions."""
        rule = segmentation or self.segmentation
        if rule == "learned":
            if self.segmenter is None or x0 is None:
                raise ValueError("segmentation='learned' needs a segmenter and x0")
            return self.segmenter.labels(sigma, x0, y)
        if rule == "otsu":
            images = self.images(sigma)
        else:
            ratio = sigma.detach().double().cpu().numpy().clip(min=LOG_FLOOR * self.background) / self.background
            images = self.pixels(np.log(ratio))
        return np.stack([segment_ktc(image) for image in images])


class KTCLearnedReconstructor:
    """Built from a checkpoint trained on ``operator=ktc_cem`` and the empty-tank file ``ref_path`` (its Inj / Mpat
    are the patterns, its Uel the reference voltages); ``segmentation`` is the labelling rule (default: learned
    when the checkpoint holds a segmenter, else log_otsu). With the learned rule and a segmenter that reads only
    the linearised x0 (no ``sigma`` input), the network is not run: its output would not change the labels."""

    def __init__(self, checkpoint: str | Path, ref_path: str | Path, segmentation: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        checkpoint, ref_path = Path(checkpoint), Path(ref_path)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"model checkpoint {checkpoint} does not exist")
        self.cfg, self.model = load_trained(checkpoint, device, {"operator.data_root": str(ref_path)},
                                            operator=f"{KTCDifferenceCEM.__module__}.{KTCDifferenceCEM.__name__}")
        self.ref = ktc2023.load_measurement(ref_path)
        self.initial_guess = instantiate(self.cfg.x0)
        trained = self.model.operator  # the level it was trained at, built by load_trained with its G
        self._operators: dict[int, KTCDifferenceCEM] = {int(self.cfg.operator.level): trained}
        entry = checkpoints.load(checkpoint).get("segmenter")
        segmenter = KTCSegmentation.from_plain(entry, trained) if entry else None
        self.tank = TankImages(trained, segmentation or ("learned" if segmenter else "log_otsu"), segmenter)
        self.runs_network = self.tank.segmentation != "learned" or "sigma" in segmenter.features.inputs
        self.n_elements, self.sigma0 = trained.n_in, trained.background

    def operator(self, level: int) -> KTCDifferenceCEM:
        """The level's operator (built once)."""
        if level not in self._operators:
            ktc2023.removed_electrodes(level)  # checks the level
            device = next(self.model.parameters()).device
            self._operators[level] = instantiate(self.cfg.operator, level=level, device=device)
        return self._operators[level]

    def measurements(self, data: np.ndarray, level: int) -> torch.Tensor:
        """Difference data y = U - U_ref (B, 2356) float64 V of measurements data (B, 2356) or (2356,), the rows
        the level removed (NaN in the files) 0."""
        operator = self.operator(level)
        data = np.atleast_2d(np.asarray(data, dtype=np.float64))
        if data.shape[1] != operator.n_out:
            raise ValueError(f"KTC data: expected {operator.n_out} voltages per target, got {data.shape[1]}")
        delta = torch.as_tensor(data - self.ref["uel"].reshape(1, -1), device=operator.keep.device)
        return torch.nan_to_num(delta) * operator.keep

    def reconstruct(self, data: np.ndarray, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, sigma), each (B, E) float64 S/m, for measurements data (B, 2356) or (2356,)."""
        return self.solve(self.measurements(data, level), level)

    def solve(self, y: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, sigma), each (B, E) float64 S/m, for the level's difference data y (B, 2356) (:meth:`measurements`);
        sigma is x0 where the network is not run (:attr:`runs_network`)."""
        operator = self.operator(level)
        on_operator(self.model, operator)
        x0 = self.initial_guess(operator, y)
        if not self.runs_network:
            return x0, x0
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            sigma = self.model(y.to(dtype), x0.to(dtype)).double()
        return x0, sigma

    def images(self, data: np.ndarray, level: int) -> np.ndarray:
        return self.tank.images(self.reconstruct(data, level)[1])

    def labels(self, data: np.ndarray, level: int) -> np.ndarray:
        y = self.measurements(data, level)
        x0, sigma = self.solve(y, level)
        return self.tank.labels(sigma, x0=x0, y=y)
