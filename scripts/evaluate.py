"""Score trained checkpoints and the initial guess (e.g. Gauss-Newton) on the test split.

    python scripts/evaluate.py checkpoint=PATH
    python scripts/evaluate.py 'checkpoint=[RUN_A/checkpoints/best.pt,RUN_B/checkpoints/best.pt]' out=DIR

Prints a table (mean +- std over the split) and writes <stem>_<split>_metrics.csv and
<stem>_<split>_reconstructions.png beside the (first) checkpoint or into `out`.
"""

import hydra
from omegaconf import DictConfig, ListConfig

from deepunroll.evaluation import evaluate_to_files, format_table


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    checkpoints = list(cfg.checkpoint) if isinstance(cfg.checkpoint, ListConfig) else [cfg.checkpoint]
    rows, written = evaluate_to_files(checkpoints, cfg.split, cfg.device, cfg.batch_size, cfg.out)
    print(format_table(rows))
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
