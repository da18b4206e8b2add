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
    assert len(scores) == 3 and all(0.0 <= float(v) <= 1.0 for row in scores for v in row)  # base, exact, knob
    assert "Prompt without the class word untouched: True" in log
    for folder in ("my_cat", "my_cat_fidelity"):  # the trained concepts, next to the grid
        assert (tmp_path / folder / "infusion_concept.safetensors").exists()
    with PIL.Image.open(output) as grid:
        assert grid.width > 650 and grid.height > 7 * 150  # seven prompt rows, three columns


def test_demo_with_the_fidelity_knob_trains_a_knob_concept(tmp_path):
    from safetensors import safe_open

    output = tmp_path / "demo.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--output", str(output), "--train_steps", "3",
         "--steps", "2", "--variants", "fidelity"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "Prompt without the class word untouched: True" in log and "Infusion + fidelity knob, 3 steps" in log
    assert not (tmp_path / "my_cat").exists()  # only the chosen variant is trained
    with safe_open(str(tmp_path / "my_cat_fidelity" / "infusion_concept.safetensors"), "pt") as f:
        assert f.metadata()["fidelity_rank"] == "4" and f.metadata()["fidelity_max_timestep"] == "700.0"
        assert any(k.endswith(".fidelity_up") for k in f.keys())
    assert "| fidelity_residual_lr_scale | 0.3 |" in (tmp_path / "my_cat_fidelity" / "README.md").read_text()
