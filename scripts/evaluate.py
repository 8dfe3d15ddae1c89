"""Score trained checkpoints and the initial guess (e.g. Gauss-Newton) on the test split.

    python scripts/evaluate.py checkpoint=PATH
    python scripts/evaluate.py 'checkpoint=[RUN_A/checkpoints/best.pt,RUN_B/checkpoints/best.pt]' out=DIR

Prints a table (mean +- std over the split) and writes <stem>_<split>_metrics.csv and
<stem>_<split>_reconstructions.png beside the (first) checkpoint or into `out`.
"""

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from deepunroll.validation import POSITIVE_INT, ConfigError, one_of
from deepunroll.evaluation import evaluate_to_files, format_table
from deepunroll.record import report_errors
from deepunroll.train.trainer import resolve_device

RULES = {"split": one_of("train", "val", "test"), "device": one_of("auto", "cpu", "cuda"), "batch_size": POSITIVE_INT}


def checked(cfg: DictConfig) -> tuple[list[str], str]:
    """(checkpoint paths, device) after checking the config (ConfigError naming the key)."""
    for key, (ok, allowed) in RULES.items():
        if not ok(cfg[key]):
            raise ConfigError(f"{key}={cfg[key]!r}: expected {allowed}")
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint: missing; pass checkpoint=PATH or 'checkpoint=[PATH_A,PATH_B]'")
    checkpoints = list(cfg.checkpoint) if isinstance(cfg.checkpoint, ListConfig) else [cfg.checkpoint]
    if not checkpoints or not all(isinstance(c, str) and c for c in checkpoints):
        raise ConfigError(f"checkpoint={checkpoints!r}: expected a checkpoint path or a list of them")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is available; use device=auto or cpu")
    return checkpoints, str(resolve_device(cfg.device))


@hydra.main(config_path="pkg://deepunroll.configs", config_name="evaluate", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    checkpoints, device = checked(cfg)
    rows, written = evaluate_to_files(checkpoints, cfg.split, device, cfg.batch_size, cfg.out)
    print(format_table(rows))
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
