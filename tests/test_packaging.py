"""Packaging: configs/ is installed as deepunroll.configs, so a non-editable install runs the scripts from
any directory without the checkout's configs/; pyproject.toml lists every package."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "deepunroll").rglob("__init__.py")}
    assert found | {"deepunroll.configs"} == listed


def test_installed_package_trains_without_the_checkout_configs(tmp_path):
    """pip install (not editable) of a copy of the sources, then scripts/train.py from a folder with no configs/."""
    setuptools = pytest.importorskip("setuptools", reason="building the package offline needs setuptools here")
    if int(setuptools.__version__.split(".")[0]) < 64:
        pytest.skip(f"setuptools {setuptools.__version__} < 64 (pyproject.toml's build requirement)")
    source, site, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    source.mkdir()
    elsewhere.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("deepunroll", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (site / "deepunroll" / "configs" / "experiment" / "eit_rma.yaml").exists()
    shutil.copy(REPO / "scripts" / "train.py", elsewhere / "train.py")
    env = os.environ | {"PYTHONPATH": str(site)}  # the installed copy comes before the editable checkout

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    where = run("-c", "import deepunroll.pipeline as p; print(p.CONFIGS)")
    assert where.stdout.strip() == str(site / "deepunroll" / "configs"), where.stderr[-2000:]
    done = run("train.py", "+experiment=toy_lpgd", "train.epochs=1", "net.n_iter=2", "data.splits.train=16",
               "data.splits.val=8", "data.splits.test=8", "train.device=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((elsewhere / "runs" / "toy_lpgd").glob("*/checkpoints/best.pt"))) == 1
