"""Convolutions on the elements of a triangle mesh (``net.step.block=mesh``).

A 1D convolution over the element vector (the published block) mixes elements that are neighbours in the
mesh generator's numbering, which is only loosely spatial (on pyEIT's h0=0.1 disk, consecutive elements are a
tenth of the disk radius apart in the median, but more than half of it in one pair of ten). A mesh
convolution mixes each element with the elements it shares a vertex with, through three fixed stencils:

  mean:     (S_0 h)_i = mean_{j in N(i)} h_j - h_i
  gradient: (S_1 h, S_2 h)_i = least-squares slope of h over the centroid offsets c_j - c_i, j in N(i), in units
            of the mean neighbour distance (exact for fields linear in x, y)

and a learned linear map of the channels [h, S_0 h, S_1 h, S_2 h]. Products of the gradient channels through
the nonlinearities give the block direction-aware features (edges and their orientation).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from deepunroll.validation import POSITIVE_INT, ConfigError, check_all


def element_stencils(nodes: np.ndarray, elements: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(support (E, K + 1) int64, weights (E, 3, K + 1) float32): each element's vertex-sharing neighbours (padded
    by repeating the element itself with weight 0), then the element itself; the weights of [mean - self, d/dx,
    d/dy] on that support. nodes (N, 2), elements (E, 3); K is the largest neighbour count."""
    nodes, elements = np.asarray(nodes, dtype=np.float64), np.asarray(elements, dtype=np.int64)
    n_elems = elements.shape[0]
    incidence = sp.csr_matrix((np.ones(elements.size), (np.repeat(np.arange(n_elems), 3), elements.reshape(-1))),
                              shape=(n_elems, nodes.shape[0]))
    shared = (incidence @ incidence.T).tocsr()
    shared.setdiag(0)
    shared.eliminate_zeros()
    counts = np.diff(shared.indptr)
    if counts.min() < 2:
        raise ValueError("mesh convolution: every element needs at least 2 vertex-sharing neighbours")
    k = int(counts.max())
    valid = np.arange(k)[None, :] < counts[:, None]  # (E, K)
    support = np.repeat(np.arange(n_elems)[:, None], k + 1, axis=1)
    support[:, :k][valid] = shared.indices
    centroids = nodes[elements].mean(axis=1)
    offsets = (centroids[support[:, :k]] - centroids[:, None, :]) * valid[..., None]  # (E, K, 2)
    offsets /= np.linalg.norm(offsets, axis=-1)[valid].mean()
    # least-squares gradient g_i = (D^T D)^-1 D^T (h_N - h_i), D (K, 2) the offsets
    slope = np.linalg.solve(np.einsum("ekc,ekd->ecd", offsets, offsets), offsets.transpose(0, 2, 1))  # (E, 2, K)
    weights = np.zeros((n_elems, 3, k + 1))
    weights[:, 0, :k] = valid / counts[:, None]
    weights[:, 0, k] = -1.0
    weights[:, 1:, :k] = slope
    weights[:, 1:, k] = -slope.sum(axis=-1)
    return torch.as_tensor(support), torch.as_tensor(weights, dtype=torch.float32)


def _numpy_mesh(element_mesh) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, elements) as NumPy arrays from tensors or arrays."""
    return tuple(a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a) for a in element_mesh)


class MeshConv(nn.Module):
    """(E, B, C_in) -> (E, B, C_out): a linear map of [h, mean - h, d/dx h, d/dy h] (4 C_in features).

    Elements lead the layout so the stencil is one row gather and one batched product over elements.
    ``support`` (E, K + 1), ``weights`` (E, 3, K + 1) from :func:`element_stencils` (non-persistent buffers:
    rebuilt from the operator's mesh, never saved).
    """

    def __init__(self, support: torch.Tensor, weights: torch.Tensor, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.register_buffer("support", support.reshape(-1), persistent=False)
        self.register_buffer("weights", weights, persistent=False)
        self.mix = nn.Linear(4 * in_channels, out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n_elems, batch, channels = h.shape
        gathered = h.reshape(n_elems, -1).index_select(0, self.support).view(n_elems, -1, batch * channels)
        stencil = torch.bmm(self.weights.to(h.dtype), gathered).view(n_elems, 3, batch, channels)
        return self.mix(torch.cat([h, stencil.permute(0, 2, 1, 3).reshape(n_elems, batch, 3 * channels)], dim=-1))


class MeshBlock(nn.Module):
    """MeshConv(in->hidden) PReLU [MeshConv(hidden->hidden) PReLU]* MeshConv(hidden->out): (B, C_in, E) ->
    (B, C_out, E), a drop-in for the 1D CNN block on element vectors.

    ``element_mesh``: (nodes (N, 2), elements (E, 3)) of the operator (:meth:`ForwardOperator.element_mesh`).
    ``zero_init``: the last layer starts at zero (a residual update starts as the identity).
    """

    def __init__(self, element_mesh, in_channels: int, out_channels: int, hidden: int = 32, n_conv: int = 4,
                 zero_init: bool = False) -> None:
        super().__init__()
        if n_conv < 2:
            raise ValueError(f"net.step.n_conv={n_conv}; the mesh block needs at least 2")
        support, weights = element_stencils(*_numpy_mesh(element_mesh))
        widths = [in_channels] + [hidden] * (n_conv - 1) + [out_channels]
        layers: list[nn.Module] = []
        for i in range(n_conv):
            layers.append(MeshConv(support, weights, widths[i], widths[i + 1]))
            if i < n_conv - 1:
                layers.append(nn.PReLU())
        if zero_init:
            nn.init.zeros_(layers[-1].mix.weight)
            nn.init.zeros_(layers[-1].mix.bias)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.permute(2, 0, 1)).permute(1, 2, 0)


class MeshLSTMAccelerator(nn.Module):
    """RMA on a mesh: a convolutional LSTM whose gates are mesh convolutions, d_k (B, E) -> v_k (B, E).

    [i, f, g, o] = MeshConv([d_k, h_{k-1}]); c_k = f c_{k-1} + i g; h_k = o tanh(c_k); v_k = Linear(h_k) per element.
    The mesh analogue of :class:`deepunroll.nets.convlstm.ConvLSTMAccelerator`: local and equivariant to the element
    numbering, with 4.4k weights at 16 channels where the fully connected LSTM of ``accel=rma`` has about
    4 x hidden x (E + hidden) + hidden x E (506k on the 686-element mesh). State (h, c), each (B, channels_hidden,
    E), zero-initialised and carried across iterations; the forget-gate bias starts at 1. ``element_mesh`` is
    filled by the builder from the operator.
    """

    RULES = {"channels_hidden": POSITIVE_INT}

    def __init__(self, channels_hidden: int = 16, element_mesh=None) -> None:
        super().__init__()
        check_all("accel", self.RULES, {"channels_hidden": channels_hidden})
        if element_mesh is None:
            raise ConfigError("accel=mesh_lstm needs an operator whose x lives on the elements of a triangle mesh "
                              "(EIT, CEM); this operator has none (accel=rma, or accel=convlstm on a pixel grid)")
        self.channels_hidden = int(channels_hidden)
        support, weights = element_stencils(*_numpy_mesh(element_mesh))
        self.gates = MeshConv(support, weights, 1 + self.channels_hidden, 4 * self.channels_hidden)
        with torch.no_grad():
            self.gates.mix.bias[self.channels_hidden : 2 * self.channels_hidden] = 1.0
        self.readout = nn.Linear(self.channels_hidden, 1)

    def init_state(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = d.new_zeros(d.shape[0], self.channels_hidden, d.shape[-1])
        return zeros, zeros

    def forward(self, d: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        hidden, cell = (s.permute(2, 0, 1) for s in state)  # (E, B, C)
        i, f, g, o = self.gates(torch.cat([d.T.unsqueeze(-1), hidden], dim=-1)).chunk(4, dim=-1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        return self.readout(hidden)[..., 0].T, (hidden.permute(1, 2, 0), cell.permute(1, 2, 0))
