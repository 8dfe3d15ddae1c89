"""Train one experiment: python scripts/train.py +experiment=toy_lpgd_rma [overrides]."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deepunroll.pipeline import train


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = train(cfg, run_dir)
    best = min(h["val_loss"] for h in result["history"])
    print(f"best validation loss {best:.4e}; checkpoints in {run_dir / 'checkpoints'}")
    return best


if __name__ == "__main__":
    main()
