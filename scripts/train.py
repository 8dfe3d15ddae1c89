"""Train one experiment, then score it on the test split:

    python scripts/train.py +experiment=eit_rma [overrides]
    torchrun --nproc_per_node=N scripts/train.py +experiment=eit_rma [overrides]   (DDP, N processes)

The run directory gets checkpoints/, tb/ (TensorBoard), run_record.json, and
checkpoints/best_test_metrics.csv + best_test_reconstructions.png (skip with evaluate=false).
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deepunroll.evaluation import evaluate_to_files, format_table
from deepunroll.pipeline import train
from deepunroll.record import report_errors
from deepunroll.train import distributed
from deepunroll.train.trainer import resolve_device


@hydra.main(config_path="pkg://deepunroll.configs", config_name="config", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = train(cfg, run_dir)
    best = min(h["val_loss"] for h in result["history"])
    if not distributed.is_main():  # torchrun: rank 0 reports and evaluates
        return best
    print(f"best validation loss {best:.4e}; checkpoints in {result['best'].parent}")
    if cfg.evaluate:
        rows, written = evaluate_to_files([result["best"]], "test", str(resolve_device(cfg.train.device)))
        print(format_table(rows))
        print("wrote " + ", ".join(str(p) for p in written))
    return best


if __name__ == "__main__":
    main()
