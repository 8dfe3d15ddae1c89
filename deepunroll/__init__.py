"""deepunroll: deep unrolling networks for nonlinear inverse problems."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load a trained UnrolledNet from a checkpoint (see :func:`deepunroll.pipeline.load_model`)."""
    from deepunroll.pipeline import load_model as _load

    return _load(path, device)
