"""The argmin-layer studies (deepunroll.studies.argmin: Huber-TV; argmin_eit: labelling on EIT) on their
``tiny`` profiles (~10 s)."""

import csv

import pytest
import torch

from deepunroll.studies import argmin as study
from deepunroll.studies import argmin_eit
from deepunroll.studies.argmin_eit import EIT_COLUMNS, EIT_METHODS, element_neighbours


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_profile_writes_tables_and_figure(tmp_path):
    tv_out = study.run("tiny", tmp_path)
    out = argmin_eit.run("tiny", tmp_path)

    tv = _csv(tmp_path / "results" / "argmin_tv.csv")
    assert list(tv[0]) == study.TV_COLUMNS
    assert [r["mode"] for r in tv] == list(study.TV_MODES)
    for row in tv:
        assert float(row["test_psnr"]) > 0 and float(row["train_seconds"]) >= 0
        assert float(row["grad_cos_vs_implicit"]) > 0.9  # every mode's first gradient points the implicit way
    saved = {r["mode"]: int(r["saved_bytes"]) for r in tv}
    assert saved["implicit"] == saved["lagrangian"] < saved["unroll"]  # no graph through the solver

    eit = _csv(tmp_path / "results" / "argmin_eit.csv")
    assert list(eit[0]) == EIT_COLUMNS
    assert [r["method"] for r in eit] == list(EIT_METHODS)
    for row in eit:
        assert 0 <= float(row["rel_err"]) < 1 and 0 <= float(row["label_acc"]) <= 1
    labelled = [r for r in eit if r["method"] not in ("gauss_newton", "lpgd_rma")]
    assert all(float(r["label_acc"]) > 0.5 for r in labelled)

    for name in ("argmin_tv.md", "argmin_eit.md"):
        text = (tmp_path / "results" / name).read_text()
        assert text.startswith("# ") and "| --- |" in text
    assert "| lagrangian |" in (tmp_path / "results" / "argmin_eit.md").read_text()
    assert "| implicit |" in (tmp_path / "results" / "argmin_tv.md").read_text()
    assert out["figure"].exists() and out["figure"].stat().st_size > 1000
    # every seed / mode is a resumable unit of the common runner: report_only reads them back, trains nothing
    assert argmin_eit.run("tiny", tmp_path, report_only=True)["eit"] == out["eit"]
    assert study.run("tiny", tmp_path, report_only=True)["tv"] == tv_out["tv"]
    assert (tmp_path / "runs" / "reproduce" / "argmin_eit_tiny" / "seed=0" / "reconstructions.pt").exists()


def test_element_neighbours_share_an_edge():
    elements = torch.tensor([[0, 1, 2], [1, 2, 3], [3, 4, 5], [2, 3, 6]])
    pairs = {tuple(sorted(p)) for p in element_neighbours(elements).tolist()}
    assert pairs == {(0, 1), (1, 3)}


def test_unknown_profile_is_an_error(tmp_path):
    for module in (study, argmin_eit):
        with pytest.raises(ValueError, match="profile"):
            module.run("huge", tmp_path)


def test_tv_loss_is_minus_the_psnr():
    """The TV objective is -ln(10)/10 x the summed PSNR (range floored at 0.1): training raises the reported metric."""
    from deepunroll import metrics

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 8, 8, generator=gen, dtype=torch.float64)
    x_hat = x + 0.05 * torch.randn(4, 8, 8, generator=gen, dtype=torch.float64)
    expected = -float(metrics.psnr(x_hat, x).sum()) * torch.log(torch.tensor(10.0)).item() / 10
    assert float(study._tv_loss(x_hat, x)) == pytest.approx(expected, rel=1e-7)  # measured 1.4e-8 (psnr in float32)
