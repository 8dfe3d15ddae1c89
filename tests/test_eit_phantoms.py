"""Published EIT phantoms: layout, non-overlap, seeding, pyEIT rasterisation, x0."""

import numpy as np
import pytest
import pyeit.mesh
import torch
from pyeit.mesh import set_perm
from pyeit.mesh.wrapper import PyEITAnomaly_Circle

from deepunroll.data.phantoms import PUBLISHED, EITPhantoms
from deepunroll.operators.eit import EIT, GaussNewton


@pytest.fixture(scope="module")
def op():
    return EIT(h0=0.2)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_circles_follow_the_published_layout(k):
    gen = EITPhantoms(k)
    centres, radii = gen.draw_circles(400, torch.Generator().manual_seed(k))
    layout = PUBLISHED[k]
    assert centres.shape == (400, k, 2) and radii.shape == (400, k)
    assert float(centres.abs().max()) <= layout["centre_range"]
    assert float(radii.min()) >= layout["radius_min"]
    assert float(radii.max()) <= layout["radius_min"] + layout["radius_span"]
    i, j = torch.triu_indices(k, k, offset=1)
    gap = (centres[:, i] - centres[:, j]).norm(dim=-1) - radii[:, i] - radii[:, j]
    assert float(gap.min()) >= 0.05  # margin respected by every pair
    # the rejection keeps the radius law nearly uniform: mean close to min + span / 2
    assert abs(float(radii.mean()) - (layout["radius_min"] + 0.05)) < 0.01


@pytest.mark.parametrize("k", [2, 3, 4])
def test_sample_values_seeding_and_shape(op, k):
    gen = EITPhantoms(k)
    first = gen.sample(op, 16, torch.Generator().manual_seed(7), split="train")
    again = gen.sample(op, 16, torch.Generator().manual_seed(7))
    other = gen.sample(op, 16, torch.Generator().manual_seed(8))
    assert first.shape == (16, op.n_elems) and first.dtype == torch.float64
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert set(first.unique().tolist()) <= {1.0, *PUBLISHED[k]["values"]}
    assert bool((first == 1.0).any(dim=1).all())
    assert gen.sample(op, 0, torch.Generator()).shape == (0, op.n_elems)


def test_rasterisation_matches_pyeit_set_perm(op):
    gen = EITPhantoms(4)
    centres, radii = gen.draw_circles(5, torch.Generator().manual_seed(3))
    mesh = pyeit.mesh.create(16, h0=0.2)
    ours = gen.rasterise(op.centroids, centres, radii).numpy()
    for b in range(5):
        anomalies = [PyEITAnomaly_Circle(center=centres[b, i].numpy(), r=float(radii[b, i]), perm=value)
                     for i, value in enumerate(PUBLISHED[4]["values"])]
        assert np.array_equal(ours[b], set_perm(mesh, anomaly=anomalies, background=1.0).perm)


def test_initial_guess_is_published_gauss_newton(op):
    """data=eit selects x0=gauss_newton: GaussNewton from the phantoms' background, published defaults."""
    from conftest import compose_config
    from deepunroll.pipeline import initial_guess

    gen = EITPhantoms(2)
    y = op(gen.sample(op, 2, torch.Generator().manual_seed(1)))
    x0 = initial_guess(compose_config(["data=eit"]))(op, y)
    assert x0.shape == (2, op.n_elems)
    assert torch.equal(x0, GaussNewton()(op, y))
    background = compose_config(["data=eit", "data.generator.background=2.0"])
    assert initial_guess(background).background == 2.0 and initial_guess(background).n_iter == 8


def test_metadata_and_validation():
    meta = EITPhantoms(3, margin=0.1).metadata()
    assert meta["n_inclusions"] == 3 and meta["margin"] == 0.1 and meta["values"] == [2.0, 1.5, 0.5]
    for kwargs in (dict(n_inclusions=5), dict(margin=-0.1), dict(background=0.0)):
        with pytest.raises(ValueError):
            EITPhantoms(**kwargs)
