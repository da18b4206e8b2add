"""Shared by the benchmark tests: benchmarks/overfitting.py with its measuring stubbed out."""

from __future__ import annotations

import pytest


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
