"""examples/train_infusion.py end to end on a tiny pipeline saved to a temp folder: artifacts, resume, 2 processes."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from hub_server import LocalHub, point_hub_at
from huggingface_hub import ModelCard

from diffusers_infusion import CONCEPT_WEIGHT_NAME, InfusionConcept

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_infusion.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_infusion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(setup, output: str, *extra: str):
    AcceleratorState._reset_state(reset_partial_state=True)
    argv = [
        "--pretrained_model_name_or_path", str(setup / "base"), "--instance_data_dir", str(setup / "photos"),
        "--class_word", "cat", "--output_dir", str(setup / output), "--resolution", "16", "--train_batch_size", "2",
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--report_to", "none", "--seed", "7", *extra,
    ]  # fmt: skip
    load_script().main(argv)
    return setup / output


def concept_at(folder: Path) -> InfusionConcept:
    return InfusionConcept.from_pretrained(folder)


def test_short_run_writes_a_loadable_concept_card_and_validation(setup, pipe, gen):
    out = train(setup, "run", "--validation_prompt", "a cat on snow", "--validation_steps", "3",
                "--num_validation_inference_steps", "2", "--report_to", "tensorboard")  # fmt: skip
    assert (out / CONCEPT_WEIGHT_NAME).exists() and (out / "checkpoint-3" / CONCEPT_WEIGHT_NAME).exists()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # tensorboard, the default tracker
    card = ModelCard.load(out / "README.md")
    assert {"diffusers", "infusion", "text-to-image"} <= set(card.data.tags)
    assert "![validation](validation.png)" in card.text and (out / "validation.png").exists()
    concept = concept_at(out)
    assert concept.class_word == "cat" and concept.base_model == str(setup / "base")
    assert any(t.abs().max() > 0 for t in concept.residuals.values())  # it trained
    name = pipe.load_infusion_concept(out)
    images = pipe("a cat", num_inference_steps=2, generator=gen(), output_type="np", return_base_images=True)
    assert name == "default_0" and not (images.images == images.base_images).all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial checkpoint, no probe file


def test_resume_continues_to_the_same_delta_bit_for_bit(setup, monkeypatch):
    reference = concept_at(train(setup, "straight", "--gradient_accumulation_steps", "2"))
    import diffusers_infusion.training.loop as training  # the loop the script drives

    original, calls = training.infusion_training_loss, []

    def killed_after_eight_micro_steps(*args, **kwargs):  # step 4 of 6, after checkpoint-3 was written
        calls.append(1)
        if len(calls) > 8:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "infusion_training_loss", killed_after_eight_micro_steps)
    with pytest.raises(KeyboardInterrupt):
        train(setup, "resumed", "--gradient_accumulation_steps", "2")
    monkeypatch.setattr(training, "infusion_training_loss", original)
    out = setup / "resumed"
    assert not (out / CONCEPT_WEIGHT_NAME).exists() and (out / "checkpoint-3").exists()
    (out / ".checkpoint-5.tmp").mkdir()  # a write killed half-way is never resumed from
    train(setup, "resumed", "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest")
    resumed = concept_at(out)
    for name, tensor in reference.residuals.items():
        assert torch.equal(resumed.residuals[name], tensor), name


def test_push_to_hub_uploads_the_concept_without_checkpoints(setup, monkeypatch):
    with LocalHub() as hub:
        point_hub_at(monkeypatch, hub.endpoint)
        train(
            setup,
            "pushed",
            "--push_to_hub",
            "--hub_model_id",
            "user/my-cat",
            "--hub_token",
            "hf_test",
            "--validation_prompt",
            "a cat",
            "--validation_steps",
            "6",
            "--num_validation_inference_steps",
            "1",
        )
    assert sorted(hub.repos["user/my-cat"]) == ["README.md", CONCEPT_WEIGHT_NAME, "validation.png"]
    assert "user/my-cat" in hub.repos["user/my-cat"]["README.md"].decode()  # the card's loading snippet


def test_gradient_checkpointing_and_bf16_train_the_same_concept(setup):
    plain = concept_at(train(setup, "plain", "--max_train_steps", "2"))
    checkpointed = concept_at(train(setup, "gc", "--max_train_steps", "2", "--gradient_checkpointing"))
    for name, tensor in plain.residuals.items():
        assert torch.allclose(checkpointed.residuals[name], tensor, atol=1e-6), name
    bf16 = concept_at(train(setup, "bf16", "--max_train_steps", "2", "--mixed_precision", "bf16"))
    assert all(torch.isfinite(t).all() and t.abs().max() > 0 for t in bf16.residuals.values())


def test_checkpoints_total_limit(setup):
    out = train(setup, "limited", "--max_train_steps", "7", "--checkpointing_steps", "2",
                "--checkpoints_total_limit", "2")  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_two_processes_agree_and_match_one_process(setup):
    one = concept_at(train(setup, "one"))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
        "--pretrained_model_name_or_path", str(setup / "base"), "--instance_data_dir", str(setup / "photos"),
        "--class_word", "cat", "--output_dir", str(setup / "two"), "--resolution", "16", "--train_batch_size", "1",
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--report_to", "none", "--seed", "7",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All 2 processes hold the same Δ" in result.stderr
    assert result.stderr.count("Saved the concept") == 1  # only the main process writes
    two = concept_at(setup / "two")
    for name, tensor in one.residuals.items():  # 2 processes x batch 1 == 1 process x batch 2
        assert torch.allclose(two.residuals[name], tensor, atol=1e-6), name


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty folder", "--instance_data_dir '.*' has no images"),
        ("unreadable image", "--instance_data_dir: cannot read image '.*broken.png'"),
        ("class word in no caption", "--class_word 'dog' appears in no caption"),
        ("output dir not writable", "--output_dir '.*' is not writable"),
        ("resume path missing", "--resume_from_checkpoint '.*nowhere' is not a checkpoint folder"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(setup, case, match):
    extra, output = [], "out"
    photos = setup / "photos"
    if case == "empty folder":
        photos = setup / "empty"
        photos.mkdir()
    elif case == "unreadable image":
        (photos / "broken.png").write_bytes(b"not a png")
    elif case == "class word in no caption":
        extra = ["--class_word", "dog"]
    elif case == "output dir not writable":
        (setup / "a-file").write_text("x")
        output = "a-file/out"
    else:
        extra = ["--resume_from_checkpoint", str(setup / "nowhere")]
    with pytest.raises(SystemExit, match=match):
        train(setup, output, "--instance_data_dir", str(photos), *extra)
    assert not (setup / "out").exists()


# ------------------------------------------------------------------------------- robustness (issue 16)
def write_captions(setup, captions: list[str]) -> None:
    with open(setup / "photos" / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")


@pytest.mark.parametrize(
    "captions, bad",
    [
        (["a photo of a category"] * 4, 0),  # 'cat' as a substring only
        (["a photo of a cat"] * 3 + ["a photo of a category"], 3),  # one caption, fatal at batch 1
        (["a photo of a cat"] * 3 + ["a photo of a " + "very " * 80 + "cat"], 3),  # cut off by truncation
    ],
)
def test_captions_are_checked_by_tokens_before_training(setup, captions, bad):
    write_captions(setup, captions)
    match = rf"caption '.*' of photo '{bad}.png' \(line {bad + 1} of '.*metadata.jsonl'\) has no 'cat' token"
    with pytest.raises(SystemExit, match=match):
        train(setup, "out", "--train_batch_size", "1")
    assert not (setup / "out").exists()


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_checkpoints_total_limit_below_one_is_refused(setup, limit, capsys):
    (setup / "out" / "checkpoint-3").mkdir(parents=True)  # an earlier run's checkpoint stays
    with pytest.raises(SystemExit):
        train(setup, "out", "--checkpoints_total_limit", limit)
    assert f"--checkpoints_total_limit must be at least 1, got {limit}" in capsys.readouterr().err
    assert (setup / "out" / "checkpoint-3").exists()


def test_a_diverged_run_stops_with_a_named_error_and_keeps_its_checkpoints(setup):
    with pytest.raises(SystemExit, match=r"Training diverged at step \d: .* Lower --learning_rate \(now 1e\+30\)"):
        train(setup, "out", "--learning_rate", "1e30", "--checkpointing_steps", "1")
    out = setup / "out"
    assert not (out / CONCEPT_WEIGHT_NAME).exists()
    for checkpoint in out.glob("checkpoint-*"):  # whatever was written is finite and loadable
        assert all(torch.isfinite(t).all() for t in concept_at(checkpoint).residuals.values())


def interrupted_run(setup, monkeypatch, output: str, after_micro_steps: int) -> Path:
    import diffusers_infusion.training.loop as training  # the loop the script drives

    original, calls = training.infusion_training_loss, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_micro_steps:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "infusion_training_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        train(setup, output, "--checkpointing_steps", "2")
    monkeypatch.setattr(training, "infusion_training_loss", original)
    return setup / output


@pytest.mark.parametrize("damage", ["delete optimizer", "truncate concept", "flip a byte"])
def test_latest_skips_a_damaged_checkpoint_and_resumes_bit_for_bit(setup, monkeypatch, caplog, damage):
    reference = concept_at(train(setup, "straight", "--checkpointing_steps", "2"))
    out = interrupted_run(setup, monkeypatch, "resumed", after_micro_steps=5)  # checkpoints 2 and 4, killed at 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    broken = out / "checkpoint-4"
    if damage == "delete optimizer":
        (broken / "optimizer.bin").unlink()
        match = "'optimizer.bin' is missing"
    elif damage == "truncate concept":
        (broken / CONCEPT_WEIGHT_NAME).write_bytes((broken / CONCEPT_WEIGHT_NAME).read_bytes()[:-10])
        match = "truncated"
    else:
        data = bytearray((broken / CONCEPT_WEIGHT_NAME).read_bytes())
        data[-3] ^= 0x40
        (broken / CONCEPT_WEIGHT_NAME).write_bytes(bytes(data))
        match = "is damaged"
    with pytest.raises(SystemExit, match=f"--resume_from_checkpoint '.*checkpoint-4' is damaged: .*{match}"):
        train(setup, "resumed", "--checkpointing_steps", "2", "--resume_from_checkpoint", str(broken))
    with caplog.at_level(logging.WARNING):
        train(setup, "resumed", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert any("Skipping" in r.getMessage() and "checkpoint-4" in r.getMessage() for r in caplog.records)
    resumed = concept_at(out)
    for name, tensor in reference.residuals.items():
        assert torch.equal(resumed.residuals[name], tensor), name
