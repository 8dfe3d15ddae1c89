"""Saved-tensor accounting: exact byte counts for known graphs."""

import torch

from deepunroll.train.memory import count_saved_bytes, saved_bytes

DT = torch.float64


def leaves(n=10):
    return (torch.randn(n, dtype=DT, requires_grad=True), torch.randn(n, dtype=DT, requires_grad=True))


def test_product_saves_both_factors():
    x, w = leaves()
    with saved_bytes() as counter:
        loss = (x * w).sum()
    assert counter.live_bytes == counter.packed_bytes == 2 * 10 * 8
    assert counter.n_packed == 2
    loss.backward()


def test_dtype_and_size_enter_the_count():
    x = torch.randn(3, 5, dtype=torch.float32, requires_grad=True)
    result, n_bytes = count_saved_bytes(lambda t: t.exp(), x)
    assert n_bytes == 15 * 4  # exp saves its output
    assert torch.equal(result, x.exp())


def test_nothing_is_saved_without_grad():
    x, w = leaves()
    with torch.no_grad():
        _, n_bytes = count_saved_bytes(lambda: (x * w).exp())
    assert n_bytes == 0


def test_graph_consumed_inside_the_block_is_not_live():
    x, _ = leaves()

    def inner_gradient():
        with torch.enable_grad():
            x_in = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad((x_in.exp() * x_in).sum(), x_in)  # graph freed here
        return grad

    with saved_bytes() as counter:
        inner_gradient()
    assert counter.live_bytes == 0
    assert counter.packed_bytes == counter.peak_bytes > 0


def test_bytes_are_released_with_the_graph():
    x, w = leaves()
    with saved_bytes() as counter:
        loss = (x * w).exp().sum()
    assert counter.live_bytes == 3 * 10 * 8  # x, w, exp output
    loss.backward()
    assert counter.live_bytes == 0
    assert counter.peak_bytes == 3 * 10 * 8


def test_depth_scales_the_count():
    x, w = leaves()

    def chain(depth):
        out = x
        for _ in range(depth):
            out = out * w
        return out

    _, short = count_saved_bytes(chain, 2)
    _, long = count_saved_bytes(chain, 8)
    assert (short, long) == (2 * 2 * 80, 8 * 2 * 80)
