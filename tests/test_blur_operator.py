"""VolterraBlur2d: scipy agreement at a = 0, exact vjp / Jacobian, kernels, metadata, errors."""

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch

from deepunroll.operators.blur import BOUNDARY_MODES, VolterraBlur2d

MODES = ["reflect", "mirror", "constant", "wrap", "nearest"]
NUMPY_PAD = {"reflect": "symmetric", "mirror": "reflect", "constant": "constant", "wrap": "wrap", "nearest": "edge"}


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _correlate(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> np.ndarray:
    return np.stack([ndimage.correlate(xi, kernel.numpy(), mode=mode, cval=0.0) for xi in x.numpy()])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_size, image_size", [(3, [6, 9]), (5, [7, 8]), (7, [2, 3])])
def test_linear_case_matches_scipy_correlate(mode, kernel_size, image_size):
    op = VolterraBlur2d(image_size=image_size, kernel_size=kernel_size, a=0.0, kernel="random", boundary=mode, seed=3)
    x = _rand(2, *image_size)
    np.testing.assert_allclose(op(x).numpy(), _correlate(x, op.linear_kernel, mode), rtol=0, atol=1e-14)  # measured 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [2, 3])
def test_stride_subsamples_the_full_output(mode, stride):
    op = VolterraBlur2d(image_size=[10, 11], kernel_size=5, a=0.0, kernel="gaussian", stride=stride, boundary=mode)
    x = _rand(2, 10, 11)
    assert op.out_shape == (-(-10 // stride), -(-11 // stride))
    expected = _correlate(x, op.linear_kernel, mode)[:, ::stride, ::stride]
    np.testing.assert_allclose(op(x).numpy(), expected, rtol=0, atol=1e-14)  # measured 0


@pytest.mark.parametrize("mode", MODES)
def test_quadratic_term_matches_explicit_windows(mode):
    k, r, a = 3, 1, 1.7
    op = VolterraBlur2d(image_size=[5, 6], kernel_size=k, a=a, kernel="random", stride=2, boundary=mode, seed=1)
    x = _rand(2, 5, 6, seed=2)
    w, quad = op.linear_kernel.numpy().reshape(-1), op.quadratic_kernel.numpy()
    expected = np.zeros((2, *op.out_shape))
    for b in range(2):
        padded = np.pad(x[b].numpy(), r, mode=NUMPY_PAD[mode])
        for i in range(op.out_shape[0]):
            for j in range(op.out_shape[1]):
                window = padded[2 * i : 2 * i + k, 2 * j : 2 * j + k].reshape(-1)
                expected[b, i, j] = w @ window + a * window @ quad @ window
    np.testing.assert_allclose(op(x).numpy(), expected, rtol=0, atol=1e-14)  # measured 2.2e-16


@pytest.mark.parametrize("mode", ["reflect", "mirror", "wrap", "nearest"])
def test_constant_image_response(mode):
    """w and W sum to 1, so a constant image c maps to c + a c^2 wherever padding keeps it constant."""
    op = VolterraBlur2d(image_size=12, kernel_size=5, a=1.5, kernel="motion", kernel_width=4, motion_angle=30,
                        boundary=mode)
    c = torch.full((1, 12, 12), 0.6, dtype=torch.float64)
    torch.testing.assert_close(op(c), torch.full_like(c, 0.6 + 1.5 * 0.36), rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_vjp_matches_autograd_and_finite_differences(mode, stride):
    op = VolterraBlur2d(image_size=[9, 7], kernel_size=5, a=1.3, kernel="random", stride=stride, boundary=mode, seed=4)
    errors = op.check_vjp(_rand(3, 9, 7) - 0.3)
    assert errors["autograd"] < 1e-14  # measured <= 2.0e-16; finite differences <= 3.2e-10
    assert errors["finite_difference"] < 1e-8


@pytest.mark.parametrize("mode, stride", [("reflect", 1), ("constant", 2), ("wrap", 3), ("mirror", 2)])
def test_jacobian_matches_autograd_and_finite_differences(mode, stride):
    op = VolterraBlur2d(image_size=[6, 5], kernel_size=3, a=2.0, kernel="gaussian", stride=stride, boundary=mode)
    x = _rand(2, 6, 5)
    jac = op.jacobian(x)
    assert jac.shape == (2, op.n_out, op.n_in)
    errors = op.check_jacobian(x)
    assert errors["autograd"] < 1e-14  # measured <= 1.0e-16; finite differences <= 1.7e-10
    assert errors["finite_difference"] < 1e-8


def test_jacobian_at_the_size_limit_agrees_with_vjp():
    op = VolterraBlur2d(image_size=32, kernel_size=5, a=1.0, stride=2)
    x, v = _rand(1, 32, 32), _rand(1, 16, 16, seed=1)
    jac = op.jacobian(x)
    torch.testing.assert_close((jac.transpose(1, 2) @ v.reshape(1, -1, 1)).reshape(1, 32, 32), op.vjp(x, v),
                               rtol=1e-14, atol=1e-14)  # measured 1.1e-16


def test_jacobian_refuses_large_images_and_points_to_vjp():
    op = VolterraBlur2d(image_size=64)
    with pytest.raises(ValueError, match=r"32x32.*vjp"):
        op.jacobian(torch.zeros(1, 64, 64))


def test_vjp_is_differentiable_like_autograd():
    """Second derivatives through the exact vjp (training through the operator) equal autograd's."""
    op = VolterraBlur2d(image_size=8, kernel_size=3, a=1.2, stride=2, boundary="reflect")
    x = _rand(2, 8, 8).requires_grad_()
    v, u = _rand(2, 4, 4, seed=1), _rand(2, 8, 8, seed=2)
    (ours,) = torch.autograd.grad((op.vjp(x, v) * u).sum(), x)
    with torch.enable_grad():
        (first,) = torch.autograd.grad(op(x), x, v, create_graph=True)
    (reference,) = torch.autograd.grad((first * u).sum(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-14, atol=1e-14)  # measured 1.1e-16


def test_dtype_follows_input_and_batch_is_independent():
    op = VolterraBlur2d(image_size=16, kernel_size=5, a=1.0)
    x = _rand(3, 16, 16)
    y32 = op(x.float())
    assert y32.dtype == torch.float32 and op.vjp(x.float(), y32).dtype == torch.float32
    torch.testing.assert_close(y32.double(), op(x), rtol=1e-5, atol=1e-6)
    single = torch.cat([op(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(op(x), single, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kernel", ["gaussian", "motion", "random"])
def test_kernels_are_normalised_seeded_and_saved(kernel):
    op = VolterraBlur2d(image_size=16, kernel_size=5, kernel=kernel, kernel_width=3.0, motion_angle=45.0, seed=7)
    w, quad = op.linear_kernel, op.quadratic_kernel
    assert w.shape == (5, 5) and quad.shape == (25, 25)
    assert abs(float(w.sum()) - 1) < 1e-14 and abs(float(quad.sum()) - 1) < 1e-14
    assert (w >= 0).all() and (quad >= 0).all()
    assert torch.equal(torch.tril(quad, -1), torch.zeros_like(quad)) and (torch.diagonal(quad) > 0).all()
    again = VolterraBlur2d(image_size=16, kernel_size=5, kernel=kernel, kernel_width=3.0, motion_angle=45.0, seed=7)
    assert torch.equal(again.linear_kernel, w) and torch.equal(again.quadratic_kernel, quad)
    other = VolterraBlur2d(image_size=16, kernel_size=5, kernel=kernel, seed=8)
    assert not torch.equal(other.quadratic_kernel, quad)
    # W is drawn first, so it does not depend on the choice of linear kernel
    assert torch.equal(VolterraBlur2d(image_size=16, kernel_size=5, kernel="gaussian", seed=7).quadratic_kernel, quad)
    assert set(op.state_dict()) == {"linear_kernel", "quadratic_kernel"}


def test_motion_kernel_is_a_line():
    horizontal = VolterraBlur2d(kernel_size=5, kernel="motion", kernel_width=5.0, motion_angle=0.0).linear_kernel
    torch.testing.assert_close(horizontal[2], torch.full((5,), 0.2, dtype=torch.float64))
    assert float(horizontal.sum()) == pytest.approx(1.0)
    diagonal = VolterraBlur2d(kernel_size=5, kernel="motion", kernel_width=5.0, motion_angle=45.0).linear_kernel
    anti = torch.flip(diagonal, [1])  # 45 deg runs bottom-left to top-right, so the anti-diagonal carries the weight
    assert torch.equal(anti.argmax(1), torch.arange(5)) and float(torch.diagonal(anti).sum()) > 0.6
    assert float(diagonal[0, 0]) == 0.0 and float(diagonal[4, 4]) == 0.0


def test_metadata_holds_every_parameter_and_the_kernels():
    op = VolterraBlur2d(image_size=[16, 20], kernel_size=3, a=0.5, kernel="random", kernel_width=2.0,
                        motion_angle=10.0, stride=2, boundary="wrap", seed=5)
    meta = op.metadata()
    assert meta["operator"] == "VolterraBlur2d"
    assert meta["in_shape"] == [16, 20] and meta["out_shape"] == [8, 10] and meta["image_size"] == [16, 20]
    expected = dict(kernel_size=3, a=0.5, kernel="random", kernel_width=2.0, motion_angle=10.0, stride=2,
                    boundary="wrap", seed=5)
    assert {key: meta[key] for key in expected} == expected
    assert isinstance(meta["linear_kernel"], np.ndarray) and isinstance(meta["quadratic_kernel"], np.ndarray)
    np.testing.assert_array_equal(meta["linear_kernel"], op.linear_kernel.numpy())
    np.testing.assert_array_equal(meta["quadratic_kernel"], op.quadratic_kernel.numpy())


def test_hydra_instantiate_from_config():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "deepunroll.operators.blur.VolterraBlur2d", "image_size": [8, 12],
                            "kernel_size": 3, "a": 1.0, "boundary": "mirror", "stride": 2})
    op = instantiate(cfg)
    assert op.in_shape == (8, 12) and op.out_shape == (4, 6) and op.boundary == "mirror"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"boundary": "foo"}, r"operator\.boundary='foo'.*'reflect', 'mirror', 'constant', 'wrap'"),
        ({"boundary": "circular"}, r"torch's 'reflect' padding is 'mirror'"),
        ({"kernel_size": 4}, r"operator\.kernel_size=4 must be an odd"),
        ({"kernel_size": 0}, r"operator\.kernel_size"),
        ({"kernel": "box"}, r"operator\.kernel='box'.*'gaussian', 'motion', 'random'"),
        ({"stride": 0}, r"operator\.stride=0"),
        ({"kernel_width": 0.0}, r"operator\.kernel_width"),
        ({"image_size": [8, 8, 8]}, r"operator\.image_size"),
        ({"image_size": 0}, r"operator\.image_size"),
        ({"a": float("nan")}, r"operator\.a"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VolterraBlur2d(**kwargs)


def test_bad_inputs_are_rejected():
    op = VolterraBlur2d(image_size=8, kernel_size=3, stride=2)
    with pytest.raises(ValueError, match=r"\(B, 8, 8\)"):
        op(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"v must have shape \(B, 4, 4\)"):
        op.vjp(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(TypeError):
        op(torch.zeros(2, 8, 8, dtype=torch.long))


def test_boundary_modes_are_documented():
    assert set(BOUNDARY_MODES) == set(MODES)
    assert "torch's 'reflect'" in BOUNDARY_MODES["mirror"]


def test_single_pixel_window_is_pointwise():
    op = VolterraBlur2d(image_size=[4, 5], kernel_size=1, a=2.0, boundary="reflect", stride=2)
    x = _rand(2, 4, 5)
    torch.testing.assert_close(op(x), (x + 2.0 * x**2)[:, ::2, ::2], rtol=0, atol=1e-15)
    assert op.check_vjp(x)["autograd"] < 1e-14


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode):
    op = VolterraBlur2d(image_size=16, kernel_size=5, a=1.0, stride=2, boundary=mode)
    x, v = _rand(3, 16, 16), _rand(3, 8, 8, seed=1)
    y_cpu, vjp_cpu = op(x), op.vjp(x, v)
    op.to("cuda")
    torch.testing.assert_close(op(x.cuda()).cpu(), y_cpu, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.vjp(x.cuda(), v.cuda()).cpu(), vjp_cpu, rtol=1e-12, atol=1e-14)
