"""Generate a dataset: python scripts/make_data.py data=toy operator.a=1.5 [data.splits.train=...]."""

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from deepunroll.config_checks import validate
from deepunroll.data.make import ensure_dataset
from deepunroll.pipeline import initial_guess
from deepunroll.record import report_errors


@hydra.main(config_path="pkg://deepunroll.configs", config_name="config", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    validate(cfg)
    path = ensure_dataset(cfg.data, instantiate(cfg.operator), initial_guess(cfg))
    print(f"dataset ready: {path}")


if __name__ == "__main__":
    main()
