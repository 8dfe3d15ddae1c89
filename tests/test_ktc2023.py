"""KTC2023 measured data through the complete electrode model (skipped without ../shared/data)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from deepunroll.operators.eit.calibration import fit_background
from deepunroll.realdata.ktc2023 import ktc_operator, load_measurement, load_mesh

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ktc2023"
pytestmark = pytest.mark.skipif(not (ROOT / "mesh" / "Mesh_sparse.mat").is_file(),
                                reason=f"KTC2023 data not found under {ROOT} (published by the challenge on Zenodo)")


def test_organisers_mesh_and_patterns_load():
    nodes, elements, faces = load_mesh(ROOT, "sparse")
    assert nodes.shape == (1602, 2) and elements.shape == (3073, 3) and len(faces) == 32
    assert all(f.shape == (2, 2) for f in faces)  # 2 segments (3 nodes) per electrode on the sparse mesh
    radius = np.linalg.norm(nodes[np.concatenate(faces).reshape(-1)], axis=1)
    np.testing.assert_allclose(radius, 0.115, atol=1e-6)
    ref = load_measurement(ROOT / "training" / "ref.mat")
    assert ref["inj"].shape == (32, 76) and ref["mpat"].shape == (32, 31) and ref["uel"].shape == (2356,)
    level7 = load_measurement(ROOT / "training_levels" / "level_7" / "data1.mat")
    assert int(np.isnan(level7["uel"]).sum()) == 1843  # the data README's count


def test_empty_tank_calibration():
    """One background conductivity and one contact impedance fitted to ref.mat on the sparse mesh (P1, element
    conductivity). Measured: sigma 0.7268, z 2.88e-5, relative residual 0.0748 in 24 L-BFGS iterations (Denker
    et al. fit 0.745 with the organisers' quadratic-element model)."""
    op = ktc_operator(ROOT, "sparse")
    ref = load_measurement(ROOT / "training" / "ref.mat")
    fit = fit_background(op, torch.as_tensor(ref["uel"]))
    assert fit["sigma"] == pytest.approx(0.7268, rel=2e-3)
    assert fit["relative_residual"] == pytest.approx(0.0748, abs=1e-3)
    start = fit_background(op, torch.as_tensor(ref["uel"]), n_iter=1)  # one L-BFGS step from sigma 1, z 1e-3
    assert start["relative_residual"] > fit["relative_residual"]
