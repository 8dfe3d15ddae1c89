"""KIT4 (16 electrodes): the tank mesh, the file reader, the empty-tank calibration and the difference images
(measured-data tests skip without ../shared/data/kit4)."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from deepunroll.operators.eit.calibration import fit_background
from deepunroll.realdata import kit4
from deepunroll.studies import kit4_difference
from deepunroll.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "kit4"
needs_data = pytest.mark.skipif(not (ROOT / kit4.EMPTY_TANK).is_file(),
                                reason=f"KIT4 data not found under {ROOT} (published on Zenodo, record 1203914)")


def test_mesh_puts_16_electrodes_of_2_5_cm_clockwise_from_the_top():
    """Electrode l spans 2.5 cm of the 0.14 m circle, centred at 90 - 22.5 l degrees (to 1e-12 rad)."""
    nodes, elements, faces = kit4.kit4_mesh(0.1)
    assert len(faces) == 16
    assert np.abs(np.hypot(*nodes[np.unique(np.concatenate(faces))].T) - kit4.RADIUS).max() < 1e-12
    for l, face in enumerate(faces):
        ends = nodes[face]                                     # (k, 2, 2)
        length = np.linalg.norm(ends[:, 1] - ends[:, 0], axis=1).sum()
        assert length == pytest.approx(kit4.ELECTRODE_LENGTH, rel=2e-3)   # chords of the arc: measured 1.3e-3
        angles = np.unwrap(np.arctan2(ends[..., 1], ends[..., 0]).reshape(-1))
        centre = 0.5 * (angles.min() + angles.max())
        expected = np.pi / 2 - 2 * np.pi * l / 16
        assert abs(np.angle(np.exp(1j * (centre - expected)))) < 1e-12
        assert angles.max() - angles.min() == pytest.approx(kit4.ELECTRODE_LENGTH / kit4.RADIUS, abs=1e-12)


@needs_data
def test_reader_scales_currents_and_orders_voltages_injection_major():
    raw = scipy.io.loadmat(str(ROOT / "datamat_2_3.mat"))
    data = kit4.load_measurement(ROOT / "datamat_2_3.mat")
    assert data["inj"].shape == (16, 79) and data["uel"].shape == (79 * 16,)
    assert set(np.unique(data["inj"])) == {-1.0, 0.0, 1.0}
    assert data["uel"][5 * 16 + 3] == raw["Uel"][3, 5]
    picked = kit4.load_measurement(ROOT / "datamat_2_3.mat", kit4.ALL_AGAINST_1)
    assert picked["inj"].shape == (16, 15) and (picked["inj"][0] == -1).all()    # all against electrode 1
    assert np.array_equal(picked["uel"], data["uel"].reshape(79, 16)[64:].reshape(-1))
    assert kit4.target_names(ROOT)[:3] == ["1_1", "1_2", "1_3"] and len(kit4.target_names(ROOT)) == 20


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="datamat_9_9.mat does not exist"):
        kit4.load_measurement(tmp_path / "datamat_9_9.mat")
    scipy.io.savemat(str(tmp_path / "datamat_1_1.mat"), {"Uel": np.zeros((16, 79))})
    with pytest.raises(ValueError, match="has no 'CurrentPattern' array"):
        kit4.load_measurement(tmp_path / "datamat_1_1.mat")
    with pytest.raises(FileNotFoundError, match="no datamat_A_B.mat target files"):
        kit4.target_names(tmp_path / "empty")


@needs_data
def test_empty_tank_calibration_matches_the_other_codes():
    """Measured on h0 0.05: sigma0 0.93144, z 5.056e-4 Ohm m, residual 1.41 %; FEIT_CBM34 fits sigma0
    0.92959 (0.2 % away) with a 1.09 % residual; z is weakly determined (eitinn 1.1e-4, FEIT 7.8e-4)."""
    operator = kit4.kit4_operator(ROOT)
    fit = fit_background(operator, torch.as_tensor(kit4.load_measurement(ROOT / kit4.EMPTY_TANK)["uel"]))
    assert fit["sigma"] == pytest.approx(0.93144, abs=2e-5)
    assert fit["z"][0] == pytest.approx(5.056e-4, rel=1e-3)
    assert fit["relative_residual"] == pytest.approx(0.01411, abs=1e-4)
    assert abs(fit["sigma"] / 0.92959 - 1) < 3e-3


@needs_data
def test_difference_images_put_the_objects_where_the_photos_show_them():
    """Against the archive's photos: 1.1 one resistive object in the upper half; 2.3 two metal rings
    (conductive), a small one upper right and a large one below the centre; 4.1 a ring at the top and a plastic
    triangle (resistive) right of and below the centre. The reference itself gives exactly 0."""
    pipeline = kit4.KIT4Difference(ROOT, image_size=64)
    names, data = kit4.load_targets(ROOT)
    picked = [names.index(n) for n in ("1_1", "2_3", "4_1")]
    changes = pipeline.changes(data[picked])
    centroids = pipeline.nodes[pipeline.elements].mean(axis=1)
    assert np.abs(pipeline.changes(pipeline.reference["uel"])).max() == 0.0

    def where(change, sign, region=None):
        mask = np.ones(len(change), dtype=bool) if region is None else region
        values = np.where(mask, sign * change, -np.inf)
        return centroids[int(np.argmax(values))], float(values.max())

    (x, y), depth = where(changes[0], -1)
    assert y > 0.05 and abs(x) < 0.04 and depth > 1.0 and changes[0].max() < 0.25 * depth   # measured 1.48, 0.23
    (x, y), _ = where(changes[1], +1)                 # the larger ring dominates
    assert y < -0.02 and x > 0
    (x, y), _ = where(changes[1], +1, centroids[:, 1] > 0)
    assert y > 0.02 and x > 0.04
    (x, y), _ = where(changes[2], +1)
    assert y > 0.06
    (x, y), _ = where(changes[2], -1)
    assert y < 0 and x > 0
    images = pipeline.images(data[picked])
    assert images.shape == (3, 64, 64) and (images[:, ~pipeline.tank_mask] == 0).all()


@needs_data
def test_study_writes_its_table_and_figure(tmp_path):
    rows = kit4_difference.run("tiny", tmp_path, data_root=ROOT)  # one variant: linear, all 79 injections
    assert len(rows) == 20 and {r["target"] for r in rows} == set(kit4.target_names(ROOT))
    assert (tmp_path / "figures" / "kit4_difference.png").is_file()
    text = (tmp_path / "results" / "kit4_difference.md").read_text()
    assert "| ours, all 79, one z | 0.93144 | 5.056e-04 | 1.41 |" in text
    by_target = {r["target"]: r for r in rows}
    assert by_target["1_1"]["resistive_percent"] > 5 and by_target["1_1"]["conductive_percent"] == 0
    assert by_target["1_2"]["conductive_percent"] > 5 and by_target["1_2"]["resistive_percent"] == 0


def test_study_needs_the_data_folder(tmp_path):
    with pytest.raises(ConfigError, match="needs data_root=PATH"):
        kit4_difference.run("quick", tmp_path)
    with pytest.raises(ConfigError, match="datamat_1_0.mat not found"):
        kit4_difference.run("quick", tmp_path, data_root=tmp_path)
    with pytest.raises(ConfigError, match="expected one of quick"):
        kit4_difference.run("nope", tmp_path)
