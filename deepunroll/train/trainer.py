"""Training loop: Adam + clipping + cosine schedule, TensorBoard, atomic checkpoints, resume."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from deepunroll.train import checkpoint, distributed
from deepunroll.nets.backprop import solver_stats, warm_starts
from deepunroll.validation import BOOL, POSITIVE, POSITIVE_INT, ConfigError, check, is_number, one_of

DEVICES = ("auto", "cpu", "cuda")                                  # train.device
DTYPES = {"float32": torch.float32, "float64": torch.float64}      # train.dtype: the network's precision


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN/Inf and ``train.on_nonfinite=stop``."""


class NonFiniteGradientError(NonFiniteLossError):
    """Raised when a gradient entry is NaN/Inf (finite loss) and ``train.on_nonfinite=stop``."""


class ExistingRunError(RuntimeError):
    """The run directory already holds a checkpoint and ``train.resume`` is false."""


@dataclass
class TrainSettings:
    """The ``train.*`` config keys used by the loop; checked on construction (ConfigError naming the key)."""

    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    resume: bool = False
    on_nonfinite: str = "stop"  # stop | skip
    amp: bool = False  # autocast the network (bfloat16 on CPU, float16 + grad scaling on CUDA); physics stays float64

    RULES = {"epochs": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE, "grad_clip": POSITIVE,
             "resume": BOOL, "on_nonfinite": one_of("stop", "skip"), "amp": BOOL,
             "betas": (lambda v: len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v),
                       "two numbers in [0, 1)")}
    PIPELINE_KEYS = {"device": one_of(*DEVICES), "dtype": one_of(*DTYPES)}  # train.* read by the pipeline

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for f in fields(self):
            value = getattr(self, f.name)
            check(f"train.{f.name}", list(value) if f.name == "betas" else value, self.RULES[f.name])

    @classmethod
    def from_config(cls, train_cfg) -> "TrainSettings":
        """From the ``train`` mapping: its loop keys checked, device and dtype checked, unknown keys refused."""
        given = dict(train_cfg)
        known = {f.name for f in fields(cls)} | set(cls.PIPELINE_KEYS)
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"train.{unknown[0]}: unknown key; known keys are {sorted(known)}")
        for key, rule in cls.PIPELINE_KEYS.items():
            if key in given:
                check(f"train.{key}", given.pop(key), rule)
        return cls(**given)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    check("train.device", name, one_of(*DEVICES))
    return torch.device(name)


class Trainer:
    """Fits ``model(y, x0) ~ x`` with an MSE loss; writes ``checkpoints/{last,best}.pt`` and ``tb/`` in run_dir."""

    def __init__(self, model, settings: TrainSettings, run_dir: Path, seed: int) -> None:
        self.model, self.settings, self.run_dir, self.seed = model, settings, Path(run_dir), int(seed)
        self.record: dict = {}
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=tuple(settings.betas))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=settings.epochs)
        self.last_path = self.run_dir / "checkpoints" / "last.pt"
        self.best_path = self.run_dir / "checkpoints" / "best.pt"
        self.epoch, self.best_val, self.history, self.skipped_steps = 0, math.inf, [], 0
        self.world, self.is_main = distributed.world_size(), distributed.is_main()
        if settings.batch_size % self.world:
            raise ValueError(f"train.batch_size={settings.batch_size} must be divisible by the {self.world} processes")
        # the module that runs forward/backward: DDP averages gradients over processes
        self.net = DistributedDataParallel(model, find_unused_parameters=True) if self.world > 1 else model
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp and self.device.type == "cuda")

    # -------------------------------------------------------------- state
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "best_val": self.best_val,
            "history": self.history,
            "skipped_steps": self.skipped_steps,
            "rng": checkpoint.rng_states(),
            "config": self.record,
        }

    def _resume_only(self) -> dict:
        """What only resuming needs beside :meth:`_state`: restarted JFB's per-sample warm starts (``warm_starts``)."""
        cache = warm_starts(self.model)
        return {"warm_starts": cache.state_dict()} if cache is not None else {}

    def _restore(self) -> None:
        state = checkpoint.load(self.last_path, self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best_val = state["epoch"], state["best_val"]
        self.history, self.skipped_steps = state["history"], state["skipped_steps"]
        checkpoint.restore_rng_states(state["rng"])
        cache = warm_starts(self.model)
        if cache is not None and "warm_starts" in state:  # checkpoints written before warm starts were saved: cold
            cache.load_state_dict(state["warm_starts"])

    def check_run_dir(self) -> None:
        """Fail before any work if resuming without a checkpoint, or starting over an existing one."""
        if self.settings.resume and not self.last_path.exists():
            raise FileNotFoundError(f"train.resume=true but {self.last_path} does not exist")
        if not self.settings.resume and self.last_path.exists():
            raise ExistingRunError(
                f"{self.last_path} exists; pass train.resume=true to continue that run, or choose another hydra.run.dir"
            )

    # ------------------------------------------------------------- epochs
    def _loader(self, dataset: Dataset, epoch: int | None) -> DataLoader:
        """Training (epoch given): a permutation seeded by (seed, epoch), so a resumed epoch sees the same
        order; with N processes each takes every N-th index, so global batch b holds the same samples
        as a one-process run's batch b. Evaluation (epoch None): every process reads the whole set in order."""
        if epoch is None:
            return DataLoader(dataset, batch_size=self.settings.batch_size)
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=distributed.rank(), shuffle=True,
                                     seed=self.seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=self.settings.batch_size // self.world, sampler=sampler)

    def _loss(self, batch: dict, module=None) -> torch.Tensor:
        y, x0, x = (batch[k].to(self.device) for k in ("y", "x0", "x"))
        takes_index = "index" in inspect.signature(self.model.forward).parameters
        extra = {"index": batch.get("index")} if takes_index else {}  # restarted_jfb warm starts
        amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=amp_dtype, enabled=self.settings.amp):
            x_hat = (module or self.model)(y, x0, **extra)
        return torch.nn.functional.mse_loss(x_hat.to(x.dtype), x)

    def _diagnostics(self, dataset: Dataset) -> dict[str, float]:
        """The model's per-epoch diagnostics (weight-tied maps: Lipschitz estimate, learned scalars) on one batch."""
        if not hasattr(self.model, "diagnostics"):
            return {}
        batch = next(iter(self._loader(dataset, None)))
        values = self.model.diagnostics(batch["y"].to(self.device), batch["x0"].to(self.device))
        return {name: float(value) for name, value in values.items()}  # plain numbers in checkpoints

    def _train_epoch(self, train_set: Dataset, writer: SummaryWriter) -> float:
        self.model.train()
        total, count = 0.0, 0
        bar = tqdm(self._loader(train_set, self.epoch), desc=f"epoch {self.epoch + 1}/{self.settings.epochs}",
                   leave=False, dynamic_ncols=True, disable=None if self.is_main else True, mininterval=0.5)
        for step, batch in enumerate(bar):
            loss = self._loss(batch, self.net)
            finite_everywhere = distributed.sum_over_ranks(float(torch.isfinite(loss)))[0] == self.world
            if not finite_everywhere:
                self._nonfinite(NonFiniteLossError, f"non-finite loss ({loss.item()})", step, writer)
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            # one fused norm over all gradients (foreach kernels); it is inf/NaN iff some entry is
            # (or the norm itself overflows). Clipping a non-finite norm would write NaN into the
            # gradients (inf * 0) and Adam into the parameters, so such a step is never taken.
            # DDP has already averaged the gradients: every process sees the same norm and decides alike.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            if not self.scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                self._nonfinite(NonFiniteGradientError, f"non-finite gradient (norm {grad_norm.item()})", step,
                                writer)
                continue
            # float16 AMP (CUDA): the grad scaler skips a step with inf/NaN gradients itself and lowers
            # its scale (an overflow of the scaled loss, expected early on), so those are not counted
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n = batch["x"].shape[0]
            total, count = total + loss.item() * n, count + n
            bar.set_postfix(loss=f"{total / count:.3e}")
        self.scheduler.step()
        total, count = distributed.sum_over_ranks(total, count)
        return total / max(count, 1)

    def _nonfinite(self, error: type[NonFiniteLossError], what: str, step: int, writer) -> None:
        """train.on_nonfinite: ``stop`` raises ``error``; ``skip`` counts the step (not taken) and logs the count."""
        if self.settings.on_nonfinite == "stop":
            raise error(f"{what} at epoch {self.epoch + 1}, step {step + 1}; the last good checkpoint is "
                        f"{self.last_path}")
        self.skipped_steps += 1
        if writer is not None:
            writer.add_scalar("train/skipped_steps", self.skipped_steps, self.epoch)

    @torch.no_grad()
    def evaluate_loss(self, dataset: Dataset) -> float:
        self.model.eval()
        total = sum(self._loss(b).item() * b["x"].shape[0] for b in self._loader(dataset, None))
        return total / len(dataset)

    def fit(self, train_set: Dataset, val_set: Dataset, record: dict | None = None) -> list[dict]:
        """Train to ``settings.epochs``; returns the per-epoch history [{epoch, train_loss, val_loss, lr, seconds}]
        (seconds: that epoch's wall time, training and validation, so a resumed run's total is still their sum).

        ``record`` (config, commit, versions) is stored in every checkpoint.
        """
        self.check_run_dir()
        self.record = record or {}
        if self.settings.resume:
            self._restore()
            if self.is_main:
                print(f"resuming {self.run_dir} from its checkpoint after epoch {self.epoch}")
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.epoch) if self.is_main else None
        try:
            while self.epoch < self.settings.epochs:
                started = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                train_loss = self._train_epoch(train_set, writer)
                solver = solver_stats(self.model)  # fixed-point modes: the last training step's solves
                val_loss = self.evaluate_loss(val_set)
                self.epoch += 1
                diagnostics = self._diagnostics(val_set)
                self.history.append({"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr}
                                    | diagnostics | {"seconds": time.perf_counter() - started})
                improved = val_loss < self.best_val
                if improved:
                    self.best_val = val_loss
                if self.is_main:  # one process logs and writes checkpoints
                    scalars = {"train/loss": train_loss, "val/loss": val_loss, "train/lr": lr}
                    scalars |= {f"solver/{k}": v for k, v in solver.items()}
                    for name, value in (scalars | {f"diag/{k}": v for k, v in diagnostics.items()}).items():
                        writer.add_scalar(name, value, self.epoch)
                    state = self._state()
                    if improved:  # best first: a run killed between the two writes redoes this epoch
                        checkpoint.save_atomic(state, self.best_path)
                    checkpoint.save_atomic(state | self._resume_only(), self.last_path)  # resume reads last.pt alone
                    tqdm.write(
                        f"epoch {self.epoch:>3}/{self.settings.epochs}  train {train_loss:.4e}  val {val_loss:.4e}"
                        + ("  *best" if improved else "")
                    )
        finally:
            if writer is not None:
                writer.close()
        return self.history
