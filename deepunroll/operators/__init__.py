"""Forward operators y = F(x)."""

from deepunroll.operators.base import ForwardOperator

__all__ = ["ForwardOperator"]
