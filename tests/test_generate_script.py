"""``examples/generate_infusion.py`` on the toy model: 2 processes (gloo) = 1 process; kill and rerun; bad lines.

The reference is one process rendering a prompt file × a grid; the other runs must give the same images, pixel for
pixel (the batches never depend on the number of processes, and each prompt has its own seeded CPU generator).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_infusion import InfusionConcept
from diffusers_infusion.batch_generation import sha256
from diffusers_infusion.toy import TOY_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "generate_infusion.py"
PROMPTS = ["a cat on snow", "a cat at night", "a dog on the beach"]
SEEDS = [0, 1]
STRENGTHS = [0.5, 1.0]
N_IMAGES = len(PROMPTS) * len(SEEDS) * (1 + len(STRENGTHS))
COMMON = ["--pretrained_model_name_or_path", str(TOY_MODEL_DIR), "--steps", "8", "--guidance_scale", "4",
          "--batch_size", "1", "--cpu"]  # fmt: skip


def _env():
    src = str(ROOT / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip


def _run(args, *, launch=None, cwd):
    command = [sys.executable, str(SCRIPT)] if launch is None else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(launch),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(SCRIPT),
    ]  # fmt: skip
    return subprocess.run(command + args, capture_output=True, text=True, env=_env(), timeout=1800, cwd=cwd)


@pytest.fixture(scope="module")
def script():
    """The script as a module, to run ``main`` in this process (no interpreter start-up) where one process will do."""
    import importlib.util

    from accelerate import PartialState

    spec = importlib.util.spec_from_file_location("generate_infusion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    PartialState._reset_state()


def _main(script, args, cwd: Path) -> int:
    """``main(args)`` run from ``cwd``, in this process."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return script.main(args)
    finally:
        os.chdir(previous)


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(PIL.Image.open(p)) for p in sorted((folder / "images").glob("*.png"))}


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A concept on the toy UNet (seeded random residuals), the prompt file, and the one-process reference run."""
    from diffusers import UNet2DConditionModel

    work = tmp_path_factory.mktemp("generate")
    unet = UNet2DConditionModel.from_pretrained(TOY_MODEL_DIR, subfolder="unet")
    concept = InfusionConcept.zeros(unet, "cat", base_model="toy")
    gen = torch.Generator().manual_seed(0)
    concept = InfusionConcept("cat", {k: torch.randn(v.shape, generator=gen) for k, v in concept.residuals.items()})
    concept.save_pretrained(work / "my_cat")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    grid = ["--concept", f"my_cat={work / 'my_cat'}", "--prompts", "prompts.txt", "--seeds", *map(str, SEEDS),
            "--strengths", *map(str, STRENGTHS), "--include_base"]  # fmt: skip
    out = _run(COMMON + grid + ["--output_dir", "ref"], cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, grid


def test_one_process_writes_images_and_a_manifest_line_each(setup, script, caplog):
    work, grid = setup
    ref = work / "ref"
    images, manifest = _images(ref), _manifest(ref)
    assert len(images) == len(manifest) == N_IMAGES
    concept_hash = sha256(work / "my_cat" / "infusion_concept.safetensors")
    for record in manifest:
        assert (ref / record["file"]).is_file() and record["file"] == f"images/{record['job_id']}.png"
        assert record["model"] == str(TOY_MODEL_DIR) and record["steps"] == 8 and record["guidance_scale"] == 4.0
        assert record["source"].startswith("prompts.txt:") and record["prompt"] in PROMPTS
        expected = {"my_cat": {"source": str(work / "my_cat"), "sha256": concept_hash}} if record["concepts"] else {}
        assert record["concept_files"] == expected
    by_key = {(r["prompt"], r["seed"], r["concepts"].get("my_cat", 0.0)): images[Path(r["file"]).name]
              for r in manifest}  # fmt: skip
    assert all(img.shape == (64, 64, 3) for img in images.values())
    for prompt in PROMPTS:  # the concept changes images of prompts with "cat", never the others
        changed = not np.array_equal(by_key[(prompt, 0, 1.0)], by_key[(prompt, 0, 0.0)])
        assert changed == ("cat" in prompt.split())
    summary = json.loads((ref / "summary.json").read_text())
    assert (summary["jobs"], summary["already_done"], summary["rendered"], summary["processes"]) == (N_IMAGES, 0,
                                                                                                     N_IMAGES, 1)

    with caplog.at_level("INFO", logger="generate_infusion"):
        assert _main(script, COMMON + grid + ["--output_dir", "ref"], work) == 0  # a rerun has nothing left to do
    assert f"{N_IMAGES} jobs: {N_IMAGES} already done, 0 rendered" in caplog.text
    assert _manifest(ref) == manifest


def test_two_processes_render_the_same_images_as_one(setup):
    work, grid = setup
    out = _run(COMMON + grid + ["--output_dir", "two"], launch=2, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((work / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["rendered"] == N_IMAGES
    assert sorted(s["rendered"] for s in summary["per_process"]) == [N_IMAGES // 2, N_IMAGES // 2]
    assert sorted((work / "two").glob("manifest.rank*.jsonl")) == [work / "two" / f"manifest.rank{r}.jsonl"
                                                                    for r in (0, 1)]  # fmt: skip
    ref, two = _images(work / "ref"), _images(work / "two")
    assert list(ref) == list(two)
    for name in ref:
        np.testing.assert_array_equal(ref[name], two[name])
    strip = lambda records: [{k: v for k, v in r.items() if k != "process"} for r in records]  # noqa: E731
    assert strip(_manifest(work / "two")) == strip(_manifest(work / "ref"))


def test_a_killed_run_resumes_where_it_stopped(setup, script):
    """The same jobs as a JSONL file: kill the run after its first batch, rerun, get the reference images."""
    work, _ = setup
    jobs = work / "jobs.jsonl"
    jobs.write_text("".join(
        json.dumps({"prompt": p, "seed": s, "concepts": {"my_cat": x} if x else {}}) + "\n"
        for p in PROMPTS for s in SEEDS for x in (0, *STRENGTHS)
    ))  # fmt: skip
    args = COMMON + ["--concept", f"my_cat={work / 'my_cat'}", "--jobs", "jobs.jsonl", "--output_dir", "killed"]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=work, env=_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    shard = work / "killed" / "manifest.rank0.jsonl"
    deadline = time.monotonic() + 1200  # a guard only: a loaded machine can be very slow
    while process.poll() is None and not (shard.exists() and shard.read_text().count("\n") >= 1) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    lines_at_kill = shard.read_text().count("\n") if shard.exists() else 0
    assert 1 <= lines_at_kill < N_IMAGES, "the run must be killed mid-way for this test to mean anything"
    assert not (work / "killed" / "manifest.jsonl").exists()

    assert _main(script, args, work) == 0
    summary = json.loads((work / "killed" / "summary.json").read_text())
    assert summary["already_done"] == lines_at_kill and summary["rendered"] == N_IMAGES - lines_at_kill
    ref, resumed = _images(work / "ref"), _images(work / "killed")
    assert list(ref) == list(resumed)  # same job ids: a job's id is its fields, the model and the concept's hash
    for name in ref:
        np.testing.assert_array_equal(ref[name], resumed[name])
    assert not list((work / "killed" / "images").glob(".*.tmp"))
    assert [r["source"] for r in _manifest(work / "killed")] == [f"jobs.jsonl:{i}" for i in range(1, N_IMAGES + 1)]
    shutil.rmtree(work / "killed")


def test_bad_job_lines_stop_the_run_before_anything_is_rendered(setup, script, caplog):
    work, _ = setup
    (work / "bad.jsonl").write_text('{"prompt": "a cat on snow"}\n{"prompt": "a cat", "seed": -1}\n{"prompt": 3}\n')
    args = COMMON + ["--concept", f"my_cat={work / 'my_cat'}", "--jobs", "bad.jsonl", "--output_dir", "bad"]
    with caplog.at_level("ERROR", logger="generate_infusion"):
        assert _main(script, args, work) == 2
    assert "2 bad line(s)" in caplog.text and "line 2: 'seed' must be an integer >= 0, got -1" in caplog.text
    assert "line 3: 'prompt' must be a non-empty string, got 3" in caplog.text
    assert not (work / "bad").exists()


def test_a_missing_concept_is_named_with_the_fix(setup, script, caplog):
    work, _ = setup
    args = COMMON + ["--concept", f"my_cat={work / 'no_such_folder'}", "--prompts", "prompts.txt", "--output_dir", "x"]
    with caplog.at_level("ERROR", logger="generate_infusion"):
        assert _main(script, args, work) == 2
    assert f"--concept my_cat={work / 'no_such_folder'}: no infusion_concept.safetensors there" in caplog.text
    assert not (work / "x").exists()
