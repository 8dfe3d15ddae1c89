"""The Hydra configs, installed with the package as ``deepunroll.configs`` (``pkg://deepunroll.configs``)."""
