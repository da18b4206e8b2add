"""The README's main job (``examples/demo.py``), shortened: it trains, writes the grid and prints the scores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_writes_the_grid_and_prints_the_scores(tmp_path):
    output = tmp_path / "demo.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--output", str(output), "--train_steps", "4",
         "--steps", "2"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    scores = re.findall(r"concept similarity (\d\.\d\d)\s+text alignment (\d\.\d\d)", log)
    assert len(scores) == 2 and all(0.0 <= float(v) <= 1.0 for row in scores for v in row)
    assert "Prompt without the class word untouched: True" in log
    assert (tmp_path / "my_cat" / "infusion_concept.safetensors").exists()  # the trained concept, next to the grid
    with PIL.Image.open(output) as grid:
        assert grid.width > 400 and grid.height > 7 * 150  # seven prompt rows, two columns


def test_demo_with_the_fidelity_knob_trains_a_knob_concept(tmp_path):
    from safetensors import safe_open

    output = tmp_path / "demo.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--output", str(output), "--train_steps", "3",
         "--steps", "2", "--fidelity"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Prompt without the class word untouched: True" in out.stdout + out.stderr
    with safe_open(str(tmp_path / "my_cat" / "infusion_concept.safetensors"), "pt") as f:
        assert f.metadata()["fidelity_rank"] == "4" and f.metadata()["fidelity_max_timestep"] == "500.0"
        assert any(k.endswith(".fidelity_up") for k in f.keys())
