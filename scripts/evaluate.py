"""Score a trained checkpoint on the test split: python scripts/evaluate.py checkpoint=PATH."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepunroll.evaluation import evaluate_checkpoint, format_table, write_csv


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    path = Path(cfg.checkpoint)
    rows = evaluate_checkpoint(path, cfg.split, cfg.device, cfg.batch_size)
    print(format_table(rows))
    csv_path = path.with_name(f"{path.stem}_{cfg.split}_metrics.csv")
    write_csv(rows, csv_path)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
