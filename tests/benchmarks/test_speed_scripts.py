"""benchmarks/inference.py and benchmarks/training.py on the tiny model: one row per method, every ratio printed.

Timings are never asserted (tests don't time things); only that each script runs every method and reports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(name: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    script = str(ROOT / "benchmarks" / name)
    return subprocess.run([sys.executable, script, "--model", "tiny", "--threads", "1", *argv],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip


def run_script(name: str, *argv: str) -> list[list[str]]:
    out = run(name, *argv)
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


def test_inference_benchmark_compiled_reports_no_recompile_on_concept_swap():
    """--compile (aot_eager here; inductor on a GPU) in bfloat16 (fp16 on a GPU): sequential is skipped, and a
    concept swap compiles nothing new."""
    rows = run_script("inference.py", "--batch", "1", "--steps", "1", "--repeats", "1", "--dtype", "bfloat16",
                      "--methods", "plain", "exact", "sequential", "--compile", "aot_eager")  # fmt: skip
    assert [r[1] for r in rows] == ["plain", "exact"]
    assert [r[8] for r in rows] == ["-", "False"]


@pytest.mark.parametrize(
    "argv, message",
    [(["--device", "cuda:7"], "--device cuda:7"), (["--dtype", "float16"], "--dtype float16")],
)
def test_inference_benchmark_refuses_what_the_machine_cannot_run(argv, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: both settings are valid here")
    out = run("inference.py", *argv)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_training_benchmark_reports_every_method():
    rows = run_script("training.py", "--repeats", "1")
    assert len(rows) >= 2 and rows[0][0] == "lora" and any(r[0] == "infusion" for r in rows)
    assert all(r[-1].endswith("x") for r in rows)


def test_fidelity_benchmark_reports_every_setting_and_the_storage_table():
    out = run("fidelity.py", "--steps", "1", "--repeats", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.strip("| ").split(" | ") for line in out.stdout.splitlines() if line.startswith("| ")]
    storage = [r for r in rows if r[0] in ("SD 1.5", "SDXL")]
    assert [r[2] for r in storage] == ["12,480", "12,480", "83,200", "83,200"]  # Δ values: METHOD.md's figures
    assert storage[0][4] == "24,960" and storage[2][4] == "166,400"  # value + query sizes over every layer
    settings = [r for r in rows if r[0].startswith(("exact", "knob"))]
    assert [r[0] for r in settings] == ["exact", "knob-r4", "knob-r4-finest", "knob-r16"]
    assert settings[0][3] == "1.000x" and all(r[3].endswith("x") and r[5].endswith("x") for r in settings)
