"""The wheel CI builds: the whole package with its data, the license, the one version, the console script."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

import diffusers_infusion

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "diffusers_infusion"


def _setuptools_version() -> Version:
    try:
        return Version(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:
        return Version("0")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built the way CI builds it, from a copy of the checkout."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    tree = tmp_path / "tree"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    # Offline with the venv's setuptools where it is recent enough (PEP 639 license fields); else pip's isolation.
    offline = ["--no-build-isolation"] if _setuptools_version() >= Version("77") else []
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *offline, str(tree), "-w", str(tmp_path / "d")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    (built,) = (tmp_path / "d").glob("*.whl")
    return built


def test_the_wheel_holds_the_package_its_data_the_license_and_one_version(wheel):
    version = diffusers_infusion.__version__
    assert wheel.name == f"diffusers_infusion-{version}-py3-none-any.whl"
    assert wheel.stat().st_size < 2_500_000  # 2.24 MB: mostly the toy reader (2.25 MB of fp16 weights)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"diffusers_infusion-{version}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        license_text = archive.read(f"{info}/licenses/LICENSE")
    shipped = {p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip
    assert "diffusers_infusion/toy/reader.safetensors" in shipped  # package data the toy scores need
    assert {n for n in names if not n.startswith(info)} == shipped
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/", "docs/")) for n in names)
    assert f"\nVersion: {version}\n" in metadata and "\nLicense-Expression: Apache-2.0\n" in metadata
    assert license_text == (ROOT / "LICENSE").read_bytes() and license_text.lstrip().startswith(b"Apache License")
    assert "diffusers-infusion-convert = diffusers_infusion.convert:main" in entry_points


def test_the_version_lives_in_one_place():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "diffusers_infusion.__version__"}
    assert project["project"]["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{diffusers_infusion.__version__}]" in changelog  # the released version has its entry


def test_the_toy_model_outside_a_checkout_is_named_with_the_fix(monkeypatch, tmp_path):
    """An installed package has no examples/ folder: load_toy_pipeline() says where the model is and what to pass."""
    from diffusers_infusion.toy import model

    monkeypatch.setattr(model, "TOY_MODEL_DIR", tmp_path / "examples" / "toy_world" / "model")
    with pytest.raises(FileNotFoundError, match=r"not in the installed package. Pass its path: load_toy_pipeline\("):
        model.load_toy_pipeline()


def test_the_demo_runs_from_the_installed_wheel(wheel, tmp_path):
    """``pip install`` of the wheel (into a folder put first on the path), then the demo, shortened, from it."""
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    out = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run_demo = ("import runpy, sys, diffusers_infusion as d; print('imported from', d.__file__); "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, "-c", run_demo, str(ROOT / "examples" / "demo.py"), "--output", str(tmp_path / "demo.png"),
         "--train_steps", "2", "--steps", "2"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported from {site / 'diffusers_infusion' / '__init__.py'}" in out.stdout
    log = out.stdout + out.stderr
    assert len(re.findall(r"concept similarity \d\.\d\d\s+text alignment \d\.\d\d", log)) == 3  # base, exact, knob
    assert "Prompt without the class word untouched: True" in log and (tmp_path / "demo.png").is_file()
