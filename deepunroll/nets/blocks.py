"""Small CNN blocks shared by the learned steps, and the block factory (``net.step.block``)."""

from __future__ import annotations

from torch import nn

from deepunroll.validation import ConfigError

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


def conv_block(in_channels: int, out_channels: int, hidden: int = 32, n_conv: int = 4, dim: int = 1,
               zero_init: bool = False) -> nn.Sequential:
    """Conv(in->hidden) PReLU [Conv(hidden->hidden) PReLU]* Conv(hidden->out), kernel 3, padding 1, biases.

    ``n_conv`` counts convolutions (>= 2); every PReLU has one parameter (PyTorch default).
    ``dim`` is 1 (signals, element vectors: (B, C, n)) or 2 (images: (B, C, H, W)).
    ``zero_init`` starts the last convolution at zero, so a residual update x + block(...) starts as
    the identity and an untrained unrolled network returns its initial guess x0.
    """
    if dim not in _CONV:
        raise ValueError(f"conv_block: dim={dim} unsupported; expected 1 or 2")
    if n_conv < 2:
        raise ValueError(f"conv_block: n_conv={n_conv}; expected at least 2")
    conv = _CONV[dim]
    widths = [in_channels] + [hidden] * (n_conv - 1) + [out_channels]
    layers: list[nn.Module] = []
    for i in range(n_conv):
        layers.append(conv(widths[i], widths[i + 1], kernel_size=3, padding=1))
        if i < n_conv - 1:
            layers.append(nn.PReLU())
    if zero_init:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


BLOCKS = ("cnn", "mesh", "dncnn", "drunet")


def make_block(kind: str, in_channels: int, out_channels: int, hidden: int = 32, n_conv: int = 4, dim: int = 1,
               zero_init: bool = False, element_mesh=None) -> nn.Module:
    """A learned block (B, in, *spatial) -> (B, out, *spatial): ``cnn`` (:func:`conv_block`), ``mesh``
    (convolutions over vertex-sharing elements, :class:`deepunroll.nets.mesh_conv.MeshBlock`; needs
    ``element_mesh`` = (nodes, elements), :meth:`ForwardOperator.element_mesh`), or deepinv's ``dncnn`` / ``drunet``
    trained from scratch (images only; the [deepinv] extra, :func:`deepunroll.interop.deepinv.denoiser_block`)."""
    if kind == "cnn":
        return conv_block(in_channels, out_channels, hidden, n_conv, dim, zero_init)
    if kind == "mesh":
        if element_mesh is None:
            raise ConfigError("net.step.block=mesh needs an operator whose x lives on the elements of a triangle mesh "
                             "(EIT, CEM); this operator has none (net.step.block=cnn, or net=lpgd)")
        from deepunroll.nets.mesh_conv import MeshBlock

        return MeshBlock(element_mesh, in_channels, out_channels, hidden, n_conv, zero_init)
    if kind not in BLOCKS:
        raise ValueError(f"net.step.block={kind!r}: expected one of {', '.join(BLOCKS)}")
    from deepunroll.interop.deepinv import denoiser_block

    return denoiser_block(kind, in_channels, out_channels, hidden, n_conv, dim, zero_init)


def per_iteration(factory, n_iter: int, share_weights: bool) -> nn.ModuleList:
    """``n_iter`` blocks from ``factory()``, or a single one reused when ``share_weights``."""
    return nn.ModuleList(factory() for _ in range(1 if share_weights else n_iter))
