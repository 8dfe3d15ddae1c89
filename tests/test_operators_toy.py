"""Exactness of the published 1D toy operator: autograd, finite differences, a plain NumPy loop."""

import numpy as np
import pytest
import torch

from deepunroll.operators.toy import NonlinearConv1d, draw_kernels


def loop_forward_and_jacobian(x, w1, w2, a, window, stride):
    """Per-window reference written independently of the operator (float64 NumPy)."""
    n_windows = (x.size - window) // stride + 1
    y = np.zeros(n_windows)
    jac = np.zeros((n_windows, x.size))
    for i in range(n_windows):
        xw = x[i * stride : i * stride + window]
        y[i] = a * xw @ w1 @ xw + w2 @ xw
        jac[i, i * stride : i * stride + window] = a * (w1 + w1.T) @ xw + w2
    return y, jac


@pytest.fixture
def x64():
    return torch.randn(4, 53, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_published_shapes_and_kernels():
    op = NonlinearConv1d()
    assert op.in_shape == (53,) and op.out_shape == (12,)
    assert op.window_index[0, 4].item() == 4 and op.window_index[-1, 4].item() == 48  # centres 4..48
    w1, w2 = draw_kernels(9, seed=0)
    assert np.allclose(np.tril(w1, -1), 0) and np.isclose(w1.sum(), 1) and (w1 >= 0).all()
    assert np.isclose(w2.sum(), 1) and (w2 >= 0).all()
    assert np.array_equal(op.W1.numpy(), w1)
    assert not np.array_equal(draw_kernels(9, seed=1)[0], w1)


@pytest.mark.parametrize("a", [0.0, 1.5])
@pytest.mark.parametrize("signal_length,window,stride", [(53, 9, 4), (20, 5, 3), (7, 7, 1)])
def test_matches_numpy_loop(x64, a, signal_length, window, stride):
    op = NonlinearConv1d(signal_length, window, stride, a=a, seed=3)
    x = torch.randn(3, signal_length, dtype=torch.float64)
    y, jac = op(x), op.jacobian(x)
    for b in range(3):
        y_ref, jac_ref = loop_forward_and_jacobian(x[b].numpy(), op.W1.numpy(), op.W2.numpy(), a, window, stride)
        np.testing.assert_allclose(y[b].numpy(), y_ref, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(jac[b].numpy(), jac_ref, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("a", [0.0, 1.0, 2.0])
def test_vjp_and_jacobian_vs_autograd_and_finite_differences(x64, a):
    op = NonlinearConv1d(a=a)
    vjp_errors = op.check_vjp(x64)
    jac_errors = op.check_jacobian(x64)
    # measured: autograd <= 1.7e-16, finite differences <= 2.8e-10
    assert vjp_errors["autograd"] < 1e-14 and vjp_errors["finite_difference"] < 1e-8
    assert jac_errors["autograd"] < 1e-14 and jac_errors["finite_difference"] < 1e-8


def test_asymmetric_w1_uses_exact_derivative(x64):
    """The authors' 2 a W1 x_w + W2 differs from the true derivative for non-symmetric W1."""
    op = NonlinearConv1d(a=1.0)
    xw = x64[0, :9]
    authors = 2 * op.W1 @ xw + op.W2
    assert not torch.allclose(op.jacobian(x64)[0, 0, :9], authors)


def test_misfit_grad_and_dtype_device(x64):
    op = NonlinearConv1d(a=1.5)
    y = torch.randn(4, 12, dtype=torch.float64)
    expected = op.jacobian(x64).transpose(1, 2) @ (op(x64) - y)[..., None]
    torch.testing.assert_close(op.misfit_grad(x64, y), expected[..., 0], rtol=1e-14, atol=1e-14)  # measured 0
    x32 = x64.float()
    assert op(x32).dtype == torch.float32 and op.vjp(x32, y.float()).dtype == torch.float32


def test_bad_input_is_a_clear_error():
    op = NonlinearConv1d()
    with pytest.raises(ValueError, match=r"shape \(B, 53\)"):
        op(torch.zeros(2, 50))
    with pytest.raises(TypeError, match="float32 or float64"):
        op(torch.zeros(2, 53, dtype=torch.long))
    with pytest.raises(ValueError, match=r"operator.window=60 exceeds"):
        NonlinearConv1d(window=60)
