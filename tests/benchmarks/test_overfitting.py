"""benchmarks/overfitting.py in --quick mode, shortened further: every row written, the report made, Infusion's
concept-agnostic overfitting exactly zero."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def overfitting():
    spec = importlib.util.spec_from_file_location("overfitting", ROOT / "benchmarks" / "overfitting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_measurement_and_the_report(overfitting, tmp_path):
    args = [
        "--quick",
        "--methods",
        "infusion",
        "textual_inversion",
        "--steps",
        "2",
        "4",
        "--output-dir",
        str(tmp_path),
    ]
    overfitting.main(args)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["step"]) for r in rows} == {
        (m, s) for m in ("base", "infusion", "textual_inversion") for s in (2, 4)
    }
    infusion = [r for r in rows if r["method"] == "infusion"]
    assert all(r["fisher"] == 0.0 for r in infusion)  # METHOD.md property 4: captions without the class word
    # Textual Inversion changes only its new token's embedding: captions without it are untouched too.
    assert all(r["fisher"] == 0.0 for r in rows if r["method"] == "textual_inversion")
    assert any(r["wasserstein"] > 0.0 for r in rows if r["method"] != "base")
    assert all(0.0 <= r["text_alignment"] <= 1.0 and r["wasserstein"] >= 0.0 for r in rows)
    assert infusion[0]["storage_bytes"] > 0
    for name in ("overfitting.md", "overfitting.png", "grid_my_cat.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| infusion |" in (tmp_path / "overfitting.md").read_text()

    overfitting.main(args)  # a rerun skips what is done
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.parametrize("flag, expected", [([], None), (["--learning-rate", "0.003"], 0.003)])
def test_learning_rate_option_reaches_every_method(overfitting, tmp_path, monkeypatch, flag, expected):
    """``--learning-rate`` trains every chosen method at that rate; without it each uses its toy_learning_rate.

    Also: the base model's grid cells are on disk before the first method trains."""
    import PIL.Image

    from diffusers_infusion.baselines import METHODS

    class NoEvaluation:
        def __init__(self, base, concept, args):
            self.scene_prompts, self.base_scene = ["a cat"], [PIL.Image.new("RGB", (64, 64))]

        def reference_row(self):
            return {}

    seen, base_cell = {}, tmp_path / "cells" / "my_cat_base_0_0.png"

    def train_and_measure(method, *args, **kwargs):
        assert base_cell.exists()  # the grid's base column is written before any training (a cut run keeps it)
        seen[method.name] = method.learning_rate

    monkeypatch.setattr(overfitting, "Evaluator", NoEvaluation)
    monkeypatch.setattr(overfitting, "train_and_measure", train_and_measure)
    monkeypatch.setattr(overfitting, "report", lambda args: None)
    methods = ["infusion", "dreambooth"]
    overfitting.main(["--quick", "--methods", *methods, "--steps", "2", "--output-dir", str(tmp_path), *flag])
    assert seen == {m: expected or METHODS[m].toy_learning_rate for m in methods}
