"""study=direction_alignment: how well each data-fit direction points along the error (nothing trained)."""

import pytest
import torch

from deepunroll.operators.eit import EIT
from deepunroll.studies import direction_alignment


def test_smoothing_keeps_constants_and_shrinks_jumps():
    operator = EIT(h0=0.3, n_electrodes=8)
    ones = torch.ones(2, operator.n_in, dtype=torch.float64)
    assert torch.allclose(direction_alignment.smoothed(ones, operator.element_mesh(), 3), ones)
    jump = (torch.arange(operator.n_in) % 2).double()[None]
    assert float(direction_alignment.smoothed(jump, operator.element_mesh(), 2).std()) < 0.6 * float(jump.std())


def test_alignment_of_a_direction_with_itself_and_with_an_orthogonal_one():
    error = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    same = direction_alignment.alignment(2 * error, error)
    assert same == pytest.approx({"cosine": 1.0, "best_step_error_ratio": 0.0, "best_step": 0.5})
    across = direction_alignment.alignment(torch.tensor([[2.0, -1.0, 0.0]], dtype=torch.float64), error)
    assert across == pytest.approx({"cosine": 0.0, "best_step_error_ratio": 1.0, "best_step": 0.0})


def test_tiny_profile_ranks_the_directions(tmp_path):
    """Measured on the 8-electrode tiny mesh (16 test samples, seeded data): noise-free, the least damped Gauss-Newton
    direction points best along the error, and 1 % noise costs it far more than the damped one."""
    rows = {(r["noise"], r["signal"]): r["cosine"] for r in direction_alignment.run("tiny", tmp_path)}
    assert rows == pytest.approx({(0.0, "raw"): 0.197, (0.0, "gauss_newton 1e-5"): 0.600, (0.0, "gauss_newton 1e-1"): 0.431,
                                  (0.01, "raw"): 0.189, (0.01, "gauss_newton 1e-5"): 0.485,
                                  (0.01, "gauss_newton 1e-1"): 0.421}, abs=2e-3)
    assert (tmp_path / "results" / "direction_alignment_tiny.md").read_text().count("| 0.01 |") == 3
