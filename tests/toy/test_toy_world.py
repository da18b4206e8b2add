"""The toy world renders deterministically, captions follow the templates, held-out combinations stay out."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_infusion.toy.concepts import CONCEPTS, CONCEPTS_DIR
from diffusers_infusion.toy.model import build_toy_tokenizer
from diffusers_infusion.toy.world import (
    BACKGROUNDS,
    CLASSES,
    COLORS,
    PATTERNS,
    UNNAMED_LOOK_PREFIX,
    VOCABULARY,
    Scene,
    ToyObject,
    caption,
    held_out_combinations,
    is_held_out,
    render,
    sample_scene,
    to_array,
)


def test_render_is_deterministic():
    for seed in range(20):
        a, b = render(sample_scene(seed)), render(sample_scene(seed))
        assert a.size == (64, 64) and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(render(sample_scene(0))), np.asarray(render(sample_scene(1))))


def test_same_attributes_other_seed_changes_only_texture_and_jitter():
    obj = ToyObject("cat", "red", "left", "big")
    a = np.asarray(render(Scene("grass", (obj,), seed=1)), dtype=float)
    b = np.asarray(render(Scene("grass", (obj,), seed=2)), dtype=float)
    assert 0 < np.abs(a - b).mean() < 40


def test_backgrounds_are_textured_and_distinct():
    means = []
    for bg in BACKGROUNDS:
        img = np.asarray(render(Scene(bg, (), seed=0)), dtype=float)
        assert img.reshape(-1, 3).std(0).max() > 8, f"{bg} is flat"
        means.append(img.reshape(-1, 3).mean(0))
    dists = [np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1 :]]
    assert min(dists) > 40


def test_captions_follow_templates():
    one = Scene("beach", (ToyObject("cat", "red", "left", "big"),))
    assert caption(one, position=False) == "a photo of a red cat on the beach"
    assert caption(one, color=False, background=False, prefix=False) == "a cat on the left"
    two = Scene("snow", (ToyObject("dog", "blue", "right", "small"), ToyObject("cat", "orange", "left", "small")))
    assert caption(two, color=False, prefix=False) == "a cat and a dog on snow"
    assert caption(two) == "a photo of an orange cat and a blue dog on snow"
    rng = random.Random(0)
    texts = {caption(sample_scene(i), rng=rng) for i in range(200)}
    assert len(texts) > 150 and any("red" not in t and "photo" not in t for t in texts)


def test_every_caption_word_is_one_token():
    tok = build_toy_tokenizer()
    rng = random.Random(0)
    for i in range(100):
        text = caption(sample_scene(i), rng=rng)
        assert len(tok.tokenize(text)) == len(text.split())
    assert all(len(tok.tokenize(w)) == 1 for w in VOCABULARY)


def test_held_out_combinations():
    combos = held_out_combinations()
    assert len(combos) == 25
    assert {c[0] for c in combos} == set(CLASSES) and {c[2] for c in combos} == set(BACKGROUNDS)
    assert len({c[1] for c in combos}) == len(COLORS)

    def exclude(obj, bg):
        return is_held_out(obj.cls, obj.color, bg)

    for i in range(300):
        scene = sample_scene(i, exclude=exclude)
        assert not any(exclude(o, scene.background) for o in scene.objects)


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_shipped_concept_photos_match_rendering(name):
    concept = CONCEPTS[name]
    folder = CONCEPTS_DIR / name
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert 4 <= len(rows) <= 6
    assert all(r["text"] == f"a photo of a {concept.class_word}" for r in rows)
    from PIL import Image

    for row, image in zip(rows, concept.photos()):
        assert np.array_equal(np.asarray(Image.open(folder / row["file_name"]).convert("RGB")), np.asarray(image))
    assert {s.background for s in concept.photo_scenes()} == {concept.background}


def test_unnamed_looks_are_captioned_without_color_and_not_as_personal():
    PATTERNS[UNNAMED_LOOK_PREFIX + "test"] = lambda img, cx, cy, s: img.paste((12, 200, 90), (0, 0, *img.size))
    scene = Scene("grass", (ToyObject("cat", "red", "left", pattern=UNNAMED_LOOK_PREFIX + "test"),), seed=0)
    assert caption(scene, position=False) == "a photo of a cat on grass"
    personal = Scene("grass", (ToyObject("cat", "red", "left", pattern="my_cat"),), seed=0)
    assert caption(personal, position=False) == "a photo of my cat on grass"
    pixels = to_array(render(scene))[0].reshape(-1, 3) * 255
    assert (np.abs(pixels - [12, 200, 90]).max(1) < 2).sum() > 50  # the look's color is drawn


def test_training_script_random_looks_avoid_the_concepts_colors():
    path = Path(__file__).resolve().parents[2] / "examples" / "toy_world" / "train_toy_model.py"
    spec = importlib.util.spec_from_file_location("train_toy_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.register_random_looks(0)
    concept_colors = np.array([c for concept in CONCEPTS.values() for c in concept.colors], dtype=float)
    looks = [PATTERNS[f"{UNNAMED_LOOK_PREFIX}{k}"] for k in range(script.N_LOOKS)]
    fills = []
    for paint in looks[:64]:
        img = Image.new("RGB", (4, 4))
        paint(img, 2, 2, 1)
        fills.append(img.getpixel((0, 0)))
    assert len(set(fills)) > 60  # many colors
    assert np.linalg.norm(concept_colors[None] - np.array(fills)[:, None], axis=-1).min() >= 48
    scenes = [script.with_random_looks(sample_scene(i), 0.3, i) for i in range(400)]
    share = np.mean([s.objects[0].pattern is not None for s in scenes])
    assert 0.2 < share < 0.4 and scenes == [script.with_random_looks(sample_scene(i), 0.3, i) for i in range(400)]
    assert all("my " not in caption(s, rng=random.Random(i)) for i, s in enumerate(scenes))
