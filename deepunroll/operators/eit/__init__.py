"""Electrical impedance tomography: disk mesh, protocols, batched FEM, operator, Gauss-Newton."""

from deepunroll.operators.eit.gauss_newton import GaussNewton
from deepunroll.operators.eit.operator import EIT

__all__ = ["EIT", "GaussNewton"]
