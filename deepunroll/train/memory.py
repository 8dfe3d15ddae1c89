"""Exact, device-independent accounting of the memory autograd keeps for backward.

Every tensor autograd saves for backward passes through ``saved_tensors_hooks``; each one
counts numel * element_size. A save is *live* until the graph node holding it is freed, so
graphs built and consumed inside the block (e.g. a gradient evaluation inside a no-graph
solver) do not count towards what is kept for backward. A tensor saved by two ops counts
twice; parameters and inputs count when saved.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


@dataclass
class SavedBytes:
    """Totals filled in by :func:`saved_bytes`: live (still held by a graph), peak live, all packed."""

    live_bytes: int = 0
    peak_bytes: int = 0
    packed_bytes: int = 0
    n_packed: int = 0


class _Packed:
    """A saved tensor; its bytes stay live until autograd frees it."""

    __slots__ = ("tensor", "counter", "n_bytes")

    def __init__(self, tensor: torch.Tensor, counter: SavedBytes):
        self.tensor, self.counter = tensor, counter
        self.n_bytes = tensor.numel() * tensor.element_size()
        counter.live_bytes += self.n_bytes
        counter.packed_bytes += self.n_bytes
        counter.n_packed += 1
        counter.peak_bytes = max(counter.peak_bytes, counter.live_bytes)

    def __del__(self):
        self.counter.live_bytes -= self.n_bytes


@contextmanager
def saved_bytes() -> Iterator[SavedBytes]:
    """Count the bytes autograd saves for backward inside the block.

    >>> with saved_bytes() as counter:
    ...     loss = model(x).sum()
    >>> counter.live_bytes   # kept for loss.backward()
    """
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Packed(t, counter), lambda packed: packed.tensor):
        yield counter


def count_saved_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """(fn(*args, **kwargs), bytes autograd keeps saved for backward of the result)."""
    with saved_bytes() as counter:
        result = fn(*args, **kwargs)
    return result, counter.live_bytes
