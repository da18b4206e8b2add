"""The page's functions as plain Python (examples/app_backend.py): generate, load, train, and every bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from app_backend import AppInputError
from hub_server import populate_cache

from diffusers_infusion import (
    CONCEPT_WEIGHT_NAME,
    ClassWordError,
    ConceptFileError,
    ConceptMismatchError,
    InfusionConcept,
    UnknownConceptError,
)
from diffusers_infusion.tiny import tiny_sd_components
from diffusers_infusion.training import TrainingDataError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def arrays(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


# ------------------------------------------------------------------------------------------------- generate
def test_generate_gives_base_and_concept_images_side_by_side(app, trained_file):
    app.load_concept(trained_file, name="my_cat")
    base, images = app.generate("a photo of a cat", steps=4, seed=3, num_images=2)
    assert len(base) == len(images) == 2 and base[0].size == (app.resolution, app.resolution)
    assert (arrays(base) != arrays(images)).any()  # the concept changes the cat
    assert (arrays(base)[0] != arrays(base)[1]).any()  # seeds 3 and 4
    off_base, off = app.generate("a photo of a cat", steps=4, seed=3, num_images=2, strengths={})
    assert np.array_equal(arrays(off), arrays(off_base)) and np.array_equal(arrays(off_base), arrays(base))
    zero_base, zero = app.generate("a photo of a cat", steps=4, seed=3, num_images=2, strengths={"my_cat": 0.0})
    assert np.array_equal(arrays(zero), arrays(base))
    plain_base, plain = app.generate("a photo", steps=4, seed=3)  # no class word: untouched, bit for bit
    assert np.array_equal(arrays(plain), arrays(plain_base))


def test_several_concepts_each_with_its_strength(app, trained_file):
    app.load_concept(trained_file, name="a")
    app.load_concept(trained_file, name="b")
    kwargs = dict(steps=3, seed=0)
    _, one = app.generate("a cat", strengths={"a": 1.0}, **kwargs)
    _, half_each = app.generate("a cat", strengths={"a": 0.5, "b": 0.5}, **kwargs)
    _, both = app.generate("a cat", strengths={"a": 1.0, "b": 1.0}, **kwargs)
    assert app.pipe.get_active_infusion_concepts() == {"a": 1.0, "b": 1.0}
    _, double = app.generate("a cat", strengths={"a": 2.0}, **kwargs)
    assert np.allclose(arrays(half_each), arrays(one), atol=1) and np.allclose(arrays(both), arrays(double), atol=1)
    assert (arrays(both) != arrays(one)).any()  # the same residual twice: strengths add up (eq. 9)


def test_generate_bad_input(app, trained_file):
    with pytest.raises(AppInputError, match="prompt is empty"):
        app.generate("  ")
    with pytest.raises(UnknownConceptError, match="not loaded"):
        app.generate("a cat", strengths={"nope": 1.0})


# ------------------------------------------------------------------------------------------------- concepts
def test_load_from_folder_file_upload_and_hub_then_list_unload_download(app, trained_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    populate_cache(cache, "user/my-cat", {CONCEPT_WEIGHT_NAME: trained_file.read_bytes()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    upload = tmp_path / "upload" / "some-cat.safetensors"
    upload.parent.mkdir()
    shutil.copy(trained_file, upload)
    names = [
        app.load_concept(str(trained_file.parent)),  # a folder
        app.load_concept(str(trained_file), name="from_file"),
        app.load_concept(upload=str(upload)),
        app.load_concept("user/my-cat", name="hub", class_word="kitten cat"),
    ]
    assert names == ["my_cat", "from_file", "some-cat", "hub"]
    rows = app.concepts()
    assert [r[0] for r in rows] == names and [r[1] for r in rows] == ["cat", "cat", "cat", "kitten cat"]
    expected = InfusionConcept.from_file(trained_file)
    assert all(r[2] == expected.num_values for r in rows)
    saved = InfusionConcept.from_file(app.concept_file("hub"))  # what the page offers for download loads back
    assert saved.class_word == "kitten cat"
    for layer, tensor in expected.residuals.items():
        assert torch.equal(saved.residuals[layer], tensor)
    app.unload_concept("from_file")
    assert [r[0] for r in app.concepts()] == ["my_cat", "some-cat", "hub"]
    with pytest.raises(UnknownConceptError, match="from_file"):
        app.unload_concept("from_file")
    with pytest.raises(AppInputError, match="No concept named 'from_file'"):
        app.concept_file("from_file")
    assert len(app.concepts()) == 3


def pickled(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"down_blocks.0.attentions.0.transformer_blocks.0.attn2": torch.zeros(4)}, path)
    return path


@pytest.mark.parametrize(
    "make_source, error, match",
    [
        (lambda d, f: {"upload": pickled(d / "concept.ckpt")}, ConceptFileError, "never unpickles"),
        (lambda d, f: {"upload": pickled(d / "looks-safe.safetensors")}, ConceptFileError, "never unpickles"),
        (lambda d, f: {"source": str(d / "missing")}, ConceptFileError, "missing"),
        (lambda d, f: {"upload": (d / "x.safetensors", (d / "x.safetensors").write_bytes(b"{}"))[0]},
         ConceptFileError, "not a readable safetensors"),  # fmt: skip
        (lambda d, f: {}, AppInputError, "exactly one concept source"),
        (lambda d, f: {"source": str(f), "upload": str(f)}, AppInputError, "exactly one concept source"),
        (lambda d, f: {"source": str(f), "name": "has space"}, AppInputError, "not usable"),
        (lambda d, f: {"source": str(f), "name": "my_cat"}, AppInputError, "already loaded"),
        (lambda d, f: {"source": str(f), "class_word": "☃"}, ClassWordError, "☃"),
    ],
)
def test_load_bad_input_says_why_and_loads_nothing(app, trained_file, tmp_path, make_source, error, match):
    app.load_concept(trained_file, name="my_cat")
    with pytest.raises(error, match=match):
        app.load_concept(**make_source(tmp_path, trained_file))
    assert [r[0] for r in app.concepts()] == ["my_cat"]


def test_a_concept_for_another_base_model_is_refused(app, tmp_path):
    other = InfusionConcept.zeros(tiny_sd_components(seed=0)["unet"], "cat", base_model="tiny-sd")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConceptMismatchError, match="tiny-sd"):
        app.load_concept(upload=tmp_path / "other" / CONCEPT_WEIGHT_NAME)
    assert app.concepts() == []


# ------------------------------------------------------------------------------------------------- train
def test_train_five_steps_reports_each_step_then_saves_and_loads(app, photos):
    updates = list(app.train(photos, "cat", steps=5, validation_steps=2, validation_inference_steps=2, seed=1))
    assert [u.step for u in updates] == [1, 2, 3, 4, 5, 5] and all(np.isfinite(u.loss) for u in updates)
    assert [u.validation is not None for u in updates] == [False, True, False, True, True, True]
    assert updates[-2].validation.size == (2 * app.resolution, app.resolution)  # base | concept
    last = updates[-1]
    assert last.name == "my_cat" and last.concept_file.is_file() and [r[0] for r in app.concepts()] == ["my_cat"]
    saved, loaded = InfusionConcept.from_file(last.concept_file), app.pipe.infusion_concepts["my_cat"]
    assert saved.class_word == "cat" and saved.base_model == app.model_id
    assert any(t.abs().sum() > 0 for t in saved.residuals.values())
    for layer, tensor in saved.residuals.items():
        assert torch.equal(loaded.residuals[layer], tensor)


def test_train_uses_the_scripts_loop_same_delta(app, photos, tmp_path):
    """The page and examples/train_infusion.py drive one loop: same photos, settings and seed give the same Δ."""
    import importlib.util

    from accelerate.state import AcceleratorState

    from diffusers_infusion.toy import TOY_MODEL_DIR

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, photo in enumerate(photos):  # photos only: the page captions with the default templates
        shutil.copy(photo, folder / f"{i:03d}.png")
    spec = importlib.util.spec_from_file_location("train_infusion", EXAMPLES / "train_infusion.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        script.main([
            "--pretrained_model_name_or_path", str(TOY_MODEL_DIR), "--instance_data_dir", str(folder),
            "--class_word", "cat", "--output_dir", str(tmp_path / "script"), "--resolution", str(app.resolution),
            "--center_crop", "--train_batch_size", "4", "--max_train_steps", "3", "--learning_rate", "0.01",
            "--seed", "7", "--report_to", "none",
        ])  # fmt: skip
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    from_script = InfusionConcept.from_pretrained(tmp_path / "script")
    from_page = InfusionConcept.from_file(list(app.train(photos, "cat", steps=3, seed=7))[-1].concept_file)
    for layer, tensor in from_script.residuals.items():
        assert torch.equal(from_page.residuals[layer], tensor), layer


def not_an_image(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("not a png")
    return path


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda p, d: {"photos": []}, AppInputError, "No photos"),
        (lambda p, d: {"photos": [*p, (d / "notes.txt", (d / "notes.txt").write_text("x"))[0]]}, AppInputError,
         "notes.txt"),  # fmt: skip
        (lambda p, d: {"photos": [*p, not_an_image(d)]}, TrainingDataError, "cannot read image"),
        (lambda p, d: {"class_word": "☃"}, ClassWordError, "☃"),
        (lambda p, d: {"class_word": " "}, ClassWordError, "empty"),
        (lambda p, d: {"name": "my_cat"}, AppInputError, "already loaded"),
        (lambda p, d: {"steps": 0}, AppInputError, "steps=0"),
        (lambda p, d: {"learning_rate": -1.0}, AppInputError, "learning_rate=-1.0"),
    ],
)
def test_train_bad_input_fails_before_any_step_and_loads_nothing(app, photos, trained_file, tmp_path, change, error,
                                                                 match):  # fmt: skip
    app.load_concept(trained_file, name="my_cat")
    kwargs = {"photos": photos, "class_word": "cat", "steps": 2, **change(photos, tmp_path)}
    updates = []
    with pytest.raises(error, match=match):
        for update in app.train(kwargs.pop("photos"), kwargs.pop("class_word"), **kwargs):
            updates.append(update)
    assert updates == [] and [r[0] for r in app.concepts()] == ["my_cat"]
    assert not (app.workdir / "trained").exists()
