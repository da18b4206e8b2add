"""Shared by the benchmark tests: benchmarks/overfitting.py with its measuring stubbed out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(name)``: a fresh module from ``benchmarks/<name>.py`` (scripts, not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


class NoEvaluation:
    """Stands in for the benchmark's Evaluator: one base image, empty reference rows (nothing generated)."""

    def __init__(self, base, concept, args):
        import PIL.Image

        self.scene_prompts, self.base_scene = ["a cat"], [PIL.Image.new("RGB", (64, 64))]

    def reference_row(self):
        return {}

    described_row = reference_row


@pytest.fixture
def stub_measuring(monkeypatch):
    """``stub_measuring(module, train_and_measure)``: the benchmark module runs its loop with ``train_and_measure``
    in place of training and measuring, no Evaluator and no report."""

    def stub(module, train_and_measure) -> None:
        monkeypatch.setattr(module, "Evaluator", NoEvaluation)
        monkeypatch.setattr(module, "train_and_measure", train_and_measure)
        monkeypatch.setattr(module, "report", lambda args: None)

    return stub
