"""benchmarks/overfitting.py in --quick mode, shortened further: every row written, the report made, Infusion's
concept-agnostic overfitting exactly zero."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def overfitting(load_benchmark):
    return load_benchmark("overfitting")


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
        (m, s) for m in ("base", "base_described", "infusion", "textual_inversion") for s in (2, 4)
    }
    described = [r for r in rows if r["method"] == "base_described"]  # the look in words lifts the base model
    assert described[0]["concept_similarity"] > [r for r in rows if r["method"] == "base"][0]["concept_similarity"]
    infusion = [r for r in rows if r["method"] == "infusion"]
    assert all(r["fisher"] == 0.0 for r in infusion)  # METHOD.md property 4: captions without the class word
    # Textual Inversion changes only its new token's embedding: captions without it are untouched too.
    assert all(r["fisher"] == 0.0 for r in rows if r["method"] == "textual_inversion")
    assert any(r["wasserstein"] > 0.0 for r in rows if r["method"] != "base")
    assert all(0.0 <= r["text_alignment"] <= 1.0 and r["wasserstein"] >= 0.0 for r in rows)
    assert infusion[0]["storage_bytes"] > 0
    for name in ("overfitting.md", "overfitting.png", "tradeoff.png", "grid_my_cat.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| infusion |" in (tmp_path / "overfitting.md").read_text()

    overfitting.main(args)  # a rerun skips what is done
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.parametrize("flag, expected", [([], None), (["--learning-rate", "0.003"], 0.003)])
def test_learning_rate_option_reaches_every_method(overfitting, tmp_path, stub_measuring, flag, expected):
    """``--learning-rate`` trains every chosen method at that rate; without it each uses its toy_learning_rate.

    Also: the base model's grid cells are on disk before the first method trains."""
    from diffusers_infusion.baselines import METHODS

    seen, base_cell = {}, tmp_path / "cells" / "my_cat_base_0_0.png"

    def train_and_measure(method, *args, **kwargs):
        assert base_cell.exists()  # the grid's base column is written before any training (a cut run keeps it)
        seen[method.name] = method.learning_rate

    stub_measuring(overfitting, train_and_measure)
    methods = ["infusion", "dreambooth"]
    overfitting.main(["--quick", "--methods", *methods, "--steps", "2", "--output-dir", str(tmp_path), *flag])
    assert seen == {m: expected or METHODS[m].toy_learning_rate for m in methods}


def test_variants_and_learning_rate_scale_reach_the_methods(overfitting, tmp_path, stub_measuring):
    """A variant row trains its method with its options under its own label; ``--lr-scale`` scales every rate."""
    from diffusers_infusion.baselines import METHODS

    seen = {}

    def train_and_measure(method, *args, label=None, **kwargs):
        seen[label] = (method.name, method.learning_rate, method.options())

    stub_measuring(overfitting, train_and_measure)
    methods = ["textual_inversion_8v", "infusion_fidelity_r4_late", "infusion", "dreambooth_prior", "dreambooth_te"]
    overfitting.main(["--quick", "--methods", *methods, "--steps", "2", "--output-dir", str(tmp_path),
                      "--lr-scale", "3"])  # fmt: skip
    ti, knob = METHODS["textual_inversion"], METHODS["infusion"]
    assert seen["textual_inversion_8v"] == ("textual_inversion", 3 * ti.toy_learning_rate,
                                            {"token": "<concept>", "num_vectors": 8})  # fmt: skip
    name, lr, options = seen["infusion_fidelity_r4_late"]
    assert (name, lr) == ("infusion", 3 * knob.toy_learning_rate)
    assert options["fidelity"]["rank"] == 4 and options["fidelity"]["max_timestep"] == 500
    assert seen["infusion"] == ("infusion", 3 * knob.toy_learning_rate, {})
    name, _, options = seen["dreambooth_prior"]  # the variant's options join the toy identifier
    assert name == "dreambooth" and options["identifier"] == "my" and options["prior_preservation"] is True
    assert seen["dreambooth_te"][2] == {"identifier": "my", "save_precision": "fp16", "train_text_encoder": True}
    assert "textual_inversion_8v" not in overfitting.DEFAULT_METHODS  # the default run is the paper's seven


@pytest.mark.parametrize("flag", [[], ["--scene-captions"]])
def test_scene_captions_name_the_photos_position_and_background(overfitting, tmp_path, stub_measuring, flag):
    """``--scene-captions`` trains on "a photo of a cat in the center at night" (my_cat's photos); without it the
    photos' own captions ("a photo of a cat") are used."""
    seen = {}

    def train_and_measure(method, data, *args, **kwargs):
        seen["captions"] = {c for captions in data.captions for c in captions}

    stub_measuring(overfitting, train_and_measure)
    overfitting.main(["--quick", "--methods", "textual_inversion", "--steps", "2", "--output-dir", str(tmp_path),
                      *flag])  # fmt: skip
    told = "a photo of a cat in the center at night"
    assert seen["captions"] == ({told} if flag else {"a photo of a cat"})
    other = [] if flag else ["--scene-captions"]
    with pytest.raises(SystemExit, match="would mix"):  # rows of the other setting are not added to this dir
        overfitting.main(["--quick", "--methods", "infusion", "--steps", "2", "--output-dir", str(tmp_path), *other])


def test_report_over_merged_dirs_tables_at_400_and_the_last_step(overfitting, tmp_path):
    """``--report-only --merge`` writes into a new dir; the 400-step and last-step tables list rows run that far."""
    ran = tmp_path / "ran"
    ran.mkdir()
    metrics = {"wasserstein": 20.0, "fisher": 0.0, "text_alignment": 1.0, "concept_similarity": 0.25,
               "storage_bytes": 3000}  # fmt: skip
    rows = [{"concept": "my_cat", "method": m, "step": s, **metrics}
            for m, steps in (("base", (400, 2000)), ("infusion", (400, 2000)), ("dreambooth_te", (400,)))
            for s in steps]  # fmt: skip
    (ran / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report_dir = tmp_path / "report" / "new"
    overfitting.main(["--report-only", "--output-dir", str(report_dir), "--merge", str(ran)])
    text = (report_dir / "overfitting.md").read_text()
    at_400, at_2000 = text.split("### At 400 steps")[1].split("### At 2000 steps")
    assert "| dreambooth_te | 1.000 ± 0.000 | 0.250 ± 0.000 |" in at_400 and "| infusion |" in at_400
    assert "| infusion |" in at_2000.split("###")[0] and "dreambooth_te" not in at_2000.split("###")[0]
    assert "| dreambooth_te | 0.250 | — |" in text.split("### concept similarity by training steps")[1]
    assert (report_dir / "overfitting.png").stat().st_size > 0


def test_rows_sampled_at_another_guidance_are_not_added(overfitting, tmp_path, stub_measuring):
    """The setting marker holds the sampling too: a dir made at guidance 7.5 refuses a --guidance 3 run; a marker
    written before the sampling keys existed reads as the defaults it was made with."""
    stub_measuring(overfitting, lambda *args, **kwargs: None)
    run = ["--concepts", "my_cat", "--methods", "infusion", "--steps", "2", "--output-dir", str(tmp_path)]
    overfitting.main(run)
    assert json.loads((tmp_path / "setting.json").read_text()) == {
        "scene_captions": False, "guidance": 7.5, "inference_steps": 25}  # fmt: skip
    with pytest.raises(SystemExit, match="would mix"):
        overfitting.main([*run, "--guidance", "3"])
    (tmp_path / "setting.json").write_text('{"scene_captions": false}\n')  # an older marker
    overfitting.main(run)
    with pytest.raises(SystemExit, match="guidance': 7.5"):
        overfitting.main([*run, "--guidance", "3"])
