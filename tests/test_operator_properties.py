"""Property tests (hypothesis): for any batch size, dtype and operator setting, forward, vjp, jacobian and
misfit_grad agree, and malformed inputs raise the documented error. OPERATORS is the one list of operators
these contract tests run on (each with the inputs it is defined for)."""

from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepunroll.operators.blur import VolterraBlur2d
from deepunroll.operators.eit import EIT
from deepunroll.operators.eit.cem import CompleteElectrodeModel
from deepunroll.operators.eit.mesh import build_electrode_disk_mesh
from deepunroll.operators.toy import NonlinearConv1d

DTYPES = st.sampled_from([torch.float32, torch.float64])
TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


@st.composite
def toy_operators(draw):
    window = draw(st.integers(1, 9))
    length = draw(st.integers(window, 30))
    return NonlinearConv1d(length, window, draw(st.integers(1, 5)), a=draw(st.floats(-2, 2)), seed=draw(st.integers(0, 9)))


@st.composite
def blur_operators(draw):
    size = draw(st.integers(3, 9))
    return VolterraBlur2d(image_size=size, kernel_size=draw(st.sampled_from([1, 3, 5])), a=draw(st.floats(-2, 2)),
                          stride=draw(st.integers(1, 3)), boundary=draw(st.sampled_from(["reflect", "mirror", "constant", "wrap"])),
                          seed=draw(st.integers(0, 9)))


@cache
def eit_operator(setting: int) -> EIT:
    """Small meshes (pyEIT's mesher is too slow to draw afresh per example): 16 or 8 electrodes, a measurement subset."""
    return [EIT(h0=0.3), EIT(n_electrodes=8, h0=0.35), EIT(h0=0.3, meas_fraction=0.5, meas_seed=1)][setting]


def eit_operators():
    return st.integers(0, 2).map(eit_operator)


@cache
def cem_operator(setting: int) -> CompleteElectrodeModel:
    """Complete electrode model on small meshes: 8 electrodes with adjacent injections and measurements, one
    contact impedance or one per electrode."""
    n_el, h0 = (8, 0.3) if setting == 0 else (6, 0.35)
    nodes, elements, faces = build_electrode_disk_mesh(n_el, h0, 0.3)
    eye = torch.eye(n_el, dtype=torch.float64)
    inj = (eye - eye.roll(1, dims=0)).numpy()  # column l: +1 A at l, -1 A at l + 1
    meas = inj[:, :-1]                         # column m: U_m - U_(m+1)
    z = 0.1 if setting == 0 else [0.05 * (l + 1) for l in range(n_el)]
    return CompleteElectrodeModel(nodes, elements, faces, inj, meas, z)


def cem_operators():
    return st.integers(0, 1).map(cem_operator)


def any_real(shape, gen):
    return torch.randn(*shape, generator=gen)


def conductivities(shape, gen):
    return 0.5 + torch.rand(*shape, generator=gen)  # EIT is defined for positive conductivities


# name -> (operator strategy, input sampler (shape, generator) -> x)
OPERATORS = {"toy": (toy_operators(), any_real), "blur2d": (blur_operators(), any_real),
             "eit": (eit_operators(), conductivities), "cem": (cem_operators(), conductivities)}
CHECKS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", OPERATORS)
@CHECKS
@given(data=st.data(), batch=st.integers(1, 4), dtype=DTYPES)
def test_forward_vjp_jacobian_agree(name, data, batch, dtype):
    operators, sample = OPERATORS[name]
    op = data.draw(operators)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = sample((batch, *op.in_shape), gen).to(dtype)
    v = torch.randn(batch, *op.out_shape, generator=gen).to(dtype)
    y, vjp, jac = op(x), op.vjp(x, v), op.jacobian(x)
    assert y.shape == (batch, *op.out_shape) and y.dtype == dtype
    assert vjp.shape == x.shape and vjp.dtype == dtype and jac.shape == (batch, op.n_out, op.n_in)
    from_jac = (jac.transpose(1, 2) @ v.reshape(batch, -1, 1)).reshape(x.shape)
    # tolerances relative to each quantity's scale (EIT's Jacobian entries are ~1e-4, its voltages ~1e-2)
    scale = lambda t: TOL[dtype] * float(t.abs().max())  # noqa: E731
    torch.testing.assert_close(vjp, from_jac, rtol=TOL[dtype], atol=scale(from_jac))
    # misfit_grad(x, y') = J(x)^T (F(x) - y'), the data-fit gradient every network reads
    y_other = y + 0.1 * y.abs().max() * torch.randn(y.shape, generator=gen).to(dtype)
    misfit = (jac.transpose(1, 2) @ (y - y_other).reshape(batch, -1, 1)).reshape(x.shape)
    torch.testing.assert_close(op.misfit_grad(x, y_other), misfit, rtol=TOL[dtype], atol=scale(misfit))
    # each sample is independent of the others in the batch
    torch.testing.assert_close(op(x[-1:]), y[-1:], rtol=TOL[dtype], atol=scale(y))


@pytest.mark.parametrize("name", OPERATORS)
@CHECKS
@given(data=st.data(), extra=st.integers(1, 3))
def test_bad_inputs_raise_documented_errors(name, data, extra):
    op = data.draw(OPERATORS[name][0])
    wrong_shape = torch.zeros(2, *(n + extra for n in op.in_shape))
    with pytest.raises(ValueError, match=r"x must have shape \(B, "):
        op(wrong_shape)
    with pytest.raises(ValueError, match=r"v must have shape \(B, "):
        op.vjp(torch.zeros(2, *op.in_shape), torch.zeros(2, op.n_out + extra))
    with pytest.raises(TypeError, match="float32 or float64"):
        op(torch.zeros(2, *op.in_shape, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must have shape"):
        op(torch.zeros(*op.in_shape))  # missing batch dimension
