"""ConvLSTMAccelerator: shapes, zero state, forget bias, batch independence, recurrence, errors."""

import pytest
import torch

from deepunroll.nets.convlstm import ConvLSTMAccelerator


def _accelerator(**kwargs) -> ConvLSTMAccelerator:
    torch.manual_seed(0)
    return ConvLSTMAccelerator(**kwargs).double()


def _run(accel: ConvLSTMAccelerator, directions: list[torch.Tensor]) -> list[torch.Tensor]:
    state = accel.init_state(directions[0])
    velocities = []
    for d in directions:
        v, state = accel(d, state)
        velocities.append(v)
    return velocities


@pytest.mark.parametrize("layers", [1, 2])
def test_shapes_and_zero_state(layers):
    accel = _accelerator(channels_hidden=4, kernel_size=3, layers=layers, x_shape=(9, 7))
    d = torch.randn(2, 9, 7, dtype=torch.float64)
    state = accel.init_state(d)
    assert len(state) == layers
    assert all(h.shape == (2, 4, 9, 7) and not h.any() and not c.any() for h, c in state)
    v, state = accel(d, state)
    assert v.shape == d.shape and v.dtype == torch.float64
    assert len(state) == layers and all(h.shape == (2, 4, 9, 7) and c.shape == h.shape for h, c in state)
    assert accel.readout.in_channels == layers * 4 and accel.readout.out_channels == 1


def test_forget_gate_bias_starts_at_one():
    accel = _accelerator(channels_hidden=5, layers=2)
    for cell in accel.cells:
        bias = cell.gates.bias.detach()
        assert torch.equal(bias[5:10], torch.ones(5, dtype=torch.float64))


def test_batch_of_three_equals_three_batches_of_one():
    accel = _accelerator(channels_hidden=6, kernel_size=3, layers=2)
    directions = [torch.randn(3, 8, 10, dtype=torch.float64) for _ in range(4)]
    batched = _run(accel, directions)
    for sample in range(3):
        single = _run(accel, [d[sample : sample + 1] for d in directions])
        for v_batch, v_single in zip(batched, single):
            torch.testing.assert_close(v_batch[sample : sample + 1], v_single, rtol=0, atol=1e-12)


def test_state_carries_history():
    accel = _accelerator(channels_hidden=4)
    d = torch.randn(1, 6, 6, dtype=torch.float64)
    first, second = _run(accel, [d, d])
    assert (first - second).abs().max() > 1e-6  # same input, different history -> different velocity


def test_gradients_reach_every_parameter():
    accel = _accelerator(channels_hidden=3, layers=2)
    velocities = _run(accel, [torch.randn(2, 5, 5, dtype=torch.float64) for _ in range(3)])
    sum(v.square().sum() for v in velocities).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in accel.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels_hidden": 0}, r"accel\.channels_hidden=0"),
        ({"layers": 0}, r"accel\.layers=0"),
        ({"kernel_size": 2}, r"accel\.kernel_size=2"),
        ({"x_shape": (53,)}, r"needs 2D images.*\(53,\)"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvLSTMAccelerator(**kwargs)


def test_bad_direction_shape():
    accel = _accelerator()
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        accel.init_state(torch.zeros(2, 1, 4, 4))
