"""deepunroll: deep unrolling networks for nonlinear inverse problems."""

__version__ = "0.1.0"
