"""benchmarks/inference.py and benchmarks/training.py on the tiny model: one row per method, every ratio printed.

Timings are never asserted (tests don't time things); only that each script runs every method and reports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *argv: str) -> list[list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--model", "tiny", "--threads", "1", *argv],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.strip("| ").split(" | ") for line in out.stdout.splitlines() if line.startswith("| ")]
    return [r for r in rows if not r[0].startswith("---") and r[0] not in ("batch", "method")]


def test_inference_benchmark_reports_every_method():
    rows = run_script("inference.py", "--batch", "1", "--steps", "1", "--repeats", "1", "--output-type", "pil")
    assert [r[1] for r in rows] == ["plain", "exact", "sequential", "fast", "variants", "naive"]
    for row in rows:
        assert len(row) == 8 and row[3].endswith("x") and row[7].endswith("x")
        assert float(row[6]) > 100  # total peak RSS in MB: the weights and torch are in it
    assert rows[0][3] == "1.00x" and rows[0][7] == "1.00x"  # plain is the baseline of its own run


def test_training_benchmark_reports_every_method():
    rows = run_script("training.py", "--repeats", "1")
    assert len(rows) >= 2 and rows[0][0] == "lora" and any(r[0] == "infusion" for r in rows)
    assert all(r[-1].endswith("x") for r in rows)
