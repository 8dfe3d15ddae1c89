"""Initial guesses (deepunroll.initial_guess): zeros, and the 2D blur's constant-image inverse."""

import torch

from deepunroll.data.patches import ImagePatches
from deepunroll.initial_guess import ConstantImageInverse, Zeros
from deepunroll.operators.blur import VolterraBlur2d
from deepunroll.operators.toy import NonlinearConv1d


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_zeros_has_the_operator_input_shape_and_y_dtype():
    y = torch.rand(3, 12, dtype=torch.float32)
    x0 = Zeros()(NonlinearConv1d(), y)
    assert x0.shape == (3, 53) and x0.dtype == torch.float32 and not x0.any()


def test_initial_guess_inverts_the_constant_image_response():
    for stride in (1, 2, 3):
        op = VolterraBlur2d(image_size=16, kernel_size=5, a=1.5, stride=stride, boundary="reflect")
        c = torch.tensor([0.2, 0.9], dtype=torch.float64)[:, None, None].expand(2, 16, 16)
        x0 = ConstantImageInverse()(op, op(c))
        assert x0.shape == (2, 16, 16)
        torch.testing.assert_close(x0, c, rtol=0, atol=1e-13)


def test_initial_guess_is_the_measurement_for_a_linear_blur():
    op = VolterraBlur2d(image_size=16, a=0.0)
    y = torch.rand(3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(ConstantImageInverse()(op, y), y, rtol=0, atol=1e-15)
    assert ConstantImageInverse()(op, y.float()).dtype == torch.float32


def test_initial_guess_interpolates_strided_measurements_linearly():
    op = VolterraBlur2d(image_size=7, kernel_size=3, a=0.0, stride=2)
    ramp = torch.arange(4, dtype=torch.float64)  # samples at columns 0, 2, 4, 6
    x0 = ConstantImageInverse()(op, ramp.expand(1, 4, 4))
    torch.testing.assert_close(x0[0, 0], torch.arange(7, dtype=torch.float64) / 2)


def test_initial_guess_is_close_on_real_patches():
    source = ImagePatches(patch_size=32, train_images=["camera", "coins"], val_images=["clock"], test_images=["moon"])
    op = VolterraBlur2d(image_size=32, a=1.0, stride=2)
    x = source.sample(op, 8, _gen(0), "val")
    x0 = ConstantImageInverse()(op, op(x))
    assert float((x0 - x).norm() / x.norm()) < 0.2


def test_configs_without_an_x0_node_get_their_data_initial_guess():
    """Checkpoints written before the x0 group existed still rebuild the initial guess their data used."""
    from omegaconf import open_dict

    from conftest import compose_config
    from deepunroll.operators.eit import GaussNewton
    from deepunroll.pipeline import initial_guess

    for overrides, kind in ((["data=eit", "data.generator.background=1.5"], GaussNewton),
                            (["data=blur2d", "operator=blur2d"], ConstantImageInverse), ([], Zeros)):
        cfg = compose_config(overrides)
        assert type(initial_guess(cfg)) is kind
        with open_dict(cfg):
            del cfg["x0"]
        legacy = initial_guess(cfg)
        assert type(legacy) is kind and legacy.metadata() == initial_guess(compose_config(overrides)).metadata()
