"""Where the network works (the ``domain`` group, configs/domain/): on the operator's own x (``native``) or on
another representation of it (``grid``: EIT conductivities on a pixel image). A domain object gives the operator
the network is built on and wraps the built network."""

from __future__ import annotations

import torch
from torch import nn

from deepunroll.nets.unrolled import UnrolledNet
from deepunroll.operators.base import ForwardOperator
from deepunroll.operators.eit.grid import GridOperator
from deepunroll.validation import POSITIVE_INT, check_all


class GridDomainNet(nn.Module):
    """x = to_mesh(net(y, to_grid(x0))): the learned prior works on a pixel grid with 2D convolutions.

    ``net`` is an UnrolledNet built on a :class:`GridOperator`; inputs and outputs stay on the mesh:
    y (B, n_meas), x0 (B, n_elems) -> x (B, n_elems).
    """

    def __init__(self, net: UnrolledNet, initial_guess=None) -> None:
        super().__init__()
        if not isinstance(net.operator, GridOperator):
            raise TypeError("GridDomainNet needs an UnrolledNet built on a GridOperator")
        self.net, self.initial_guess = net, initial_guess

    @property
    def operator(self) -> ForwardOperator:
        """The mesh operator (what the data were measured with)."""
        return self.net.operator.mesh_operator

    def forward(self, y: torch.Tensor, x0: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``index`` (B,): dataset indices, passed on to the grid network (``restarted_jfb`` warm starts)."""
        self.operator.check_input(x0, "x0")
        grid = self.net.operator.grid
        return grid.to_mesh(self.net(y, grid.to_grid(x0), index=index))

    def diagnostics(self, y: torch.Tensor, x0: torch.Tensor, n_power: int = 5) -> dict[str, float]:
        """:meth:`UnrolledNet.diagnostics` of the grid network, from x0 on the mesh (B, n_elems)."""
        return self.net.diagnostics(y, self.net.operator.grid.to_grid(x0), n_power)

    @torch.no_grad()
    def reconstruct(self, y: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`UnrolledNet.reconstruct`, on the mesh."""
        param = next(self.parameters())
        y = y.to(device=param.device, dtype=param.dtype)
        if x0 is None:
            x0 = self.initial_guess(self.operator, y)
        grid = self.net.operator.grid
        return grid.to_mesh(self.net.reconstruct(y, grid.to_grid(x0.to(device=param.device, dtype=param.dtype))))


class NativeDomain:
    """``domain=native``: the network works on the operator's own x."""

    def operator(self, operator: ForwardOperator) -> ForwardOperator:
        return operator

    def wrap(self, net: UnrolledNet, initial_guess=None) -> nn.Module:
        return net


class GridDomain:
    """``domain=grid``: the network works on a ``size`` x ``size`` pixel image (:class:`GridOperator`) and
    :class:`GridDomainNet` maps its inputs and outputs to and from the mesh."""

    RULES = {"size": POSITIVE_INT}

    def __init__(self, size: int = 32) -> None:
        check_all("domain", self.RULES, {"size": size})
        self.size = int(size)

    def operator(self, operator: ForwardOperator) -> GridOperator:
        return GridOperator(operator, self.size)

    def wrap(self, net: UnrolledNet, initial_guess=None) -> GridDomainNet:
        return GridDomainNet(net, initial_guess=initial_guess)


def upgrade_domain(net_cfg) -> dict:
    """The ``domain`` node of a config written before the domain group existed (``net.domain``: native | grid,
    absent: native; ``net.grid_size``)."""
    if net_cfg.get("domain", "native") == "grid":
        return {"_target_": "deepunroll.nets.domain.GridDomain", "size": int(net_cfg.get("grid_size", 32))}
    return {"_target_": "deepunroll.nets.domain.NativeDomain"}
