"""Toy world 2: looks (patterns in two colors, marks), their captions, and the held-out looks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from diffusers_infusion.toy.looks import (
    CONCEPT_LOOKS,
    MARKS,
    PATTERN_KINDS,
    Look,
    held_out_looks,
    is_look_held_out,
    look_phrase,
    random_look,
)
from diffusers_infusion.toy.model import MAX_TOKENS_LOOKS, build_toy_tokenizer
from diffusers_infusion.toy.world import CLASSES, COLORS, Scene, ToyObject, caption, render, sample_scene


def _render(look: Look | None, cls: str = "cat", color: str = "orange") -> np.ndarray:
    obj = ToyObject(cls, color, "center", "big", look=look)
    return np.asarray(render(Scene("grass", (obj,), seed=3)), dtype=np.int16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(pattern="zigzag", a="red", b="blue"), "pattern"),
        (dict(pattern="band", a="red", b="teal"), "color"),
        (dict(pattern="band", a="red", b="red"), "two"),
        (dict(pattern="plain", a="red", b="blue"), "one color"),
        (dict(pattern="band", a="red", b="blue", mark="moon", mark_color="white"), "mark"),
    ],
)
def test_look_refuses_what_the_world_cannot_draw(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Look(**kwargs)


def test_every_pattern_and_mark_paints_its_own_pixels():
    plain = _render(None)
    pictures = {p: _render(Look(p, "orange", "blue")) for p in PATTERN_KINDS[1:]}
    for name, pic in pictures.items():
        blue = (np.abs(pic - np.array(COLORS["blue"])).sum(-1) < 30).sum()
        assert blue > 60, name  # a large region in the second color
    pics = list(pictures.values())
    assert all(np.abs(a - b).max() > 0 for i, a in enumerate(pics) for b in pics[i + 1 :])
    for mark in MARKS:
        marked = _render(Look("plain", "orange", "orange", mark, "white"))
        white = (np.abs(marked - np.array(COLORS["white"])).sum(-1) < 30).sum()
        assert 6 < white < 120, mark  # a small mark, not a second region
        assert np.abs(marked - plain).max() > 0
    assert np.array_equal(_render(Look("band", "orange", "blue")), pictures["band"])  # deterministic


def test_look_phrases_name_the_look():
    assert look_phrase("cat", Look("band", "orange", "blue", "star", "white")) == (
        "orange cat with a blue band and a white star"
    )
    assert look_phrase("dog", Look("sides", "red", "yellow")) == "dog with a red left side and a yellow right side"
    assert look_phrase("teddy", Look("halves", "purple", "yellow")) == "teddy with a purple top and a yellow bottom"
    assert look_phrase("cup", Look("diagonal", "blue", "orange")) == "cup split diagonally into blue and orange"
    assert look_phrase("car", Look("plain", "red", "red", "heart", "white")) == "red car with a white heart"
    assert "star" not in look_phrase("cat", Look("band", "orange", "blue", "star", "white"), short=True)
    phrases = {look_phrase("cat", Look("band", "orange", "blue"), rng=random.Random(i)) for i in range(60)}
    assert "orange and blue cat" in phrases and "cat with a blue band" in phrases  # varied wordings


def test_captions_with_looks_fit_the_tokenizer_one_token_a_word():
    tok = build_toy_tokenizer(looks=True)
    lengths = []
    for i in range(3000):
        text = caption(sample_scene(i, look_prob=0.5), rng=random.Random(i))
        ids = tok(text).input_ids
        assert len(ids) == len(text.split()) + 2, text  # every word is in the vocabulary
        lengths.append(len(ids))
    assert max(lengths) <= MAX_TOKENS_LOOKS
    named = [caption(sample_scene(i, look_prob=1.0), rng=random.Random(i)) for i in range(200)]
    assert np.mean([any(w in t for w in ("band", "side", "top", "diagonally", " and ")) for t in named]) > 0.4


def test_held_out_looks_are_one_in_five_and_include_every_concept():
    total = len(CLASSES) * (len(PATTERN_KINDS) - 1) * len(COLORS) * (len(COLORS) - 1)
    held = held_out_looks()
    assert 0.17 < len(held) / total < 0.23
    for cls, look in CONCEPT_LOOKS.values():
        assert is_look_held_out(cls, look.pattern, look.a, look.b)
        assert is_look_held_out(cls, look.pattern, look.b, look.a)  # either order
    for cls in CLASSES:  # the base model still sees every class with every pattern, and every color pair
        for pattern in PATTERN_KINDS[1:]:
            assert sum(not is_look_held_out(cls, pattern, a, b) for a in COLORS for b in COLORS if a != b) > 30


def test_training_scenes_never_show_a_held_out_look_and_look_prob_zero_is_the_first_world():
    seen = 0
    for i in range(2000):
        for obj in sample_scene(i, look_prob=0.5).objects:
            if obj.look is not None and obj.look.pattern != "plain":
                seen += 1
                assert not is_look_held_out(obj.cls, obj.look.pattern, obj.look.a, obj.look.b)
    assert seen > 500
    assert all(sample_scene(i) == sample_scene(i, look_prob=0.0) for i in range(50))
    assert all(o.look is None for i in range(50) for o in sample_scene(i).objects)


def test_world_one_is_unchanged_and_world_two_tokenizer_knows_looks():
    from diffusers_infusion.toy.world import LOOK_VOCABULARY, VOCABULARY

    assert not set(LOOK_VOCABULARY) & set(VOCABULARY)  # the shipped model's tokenizer is the first world's
    tok = build_toy_tokenizer(looks=True)
    assert all(len(tok.tokenize(w)) == 1 for w in LOOK_VOCABULARY) and tok.model_max_length == MAX_TOKENS_LOOKS
    assert len(build_toy_tokenizer().tokenize("band")) > 1


def test_random_held_out_looks_are_held_out():
    rng = random.Random(0)
    for _ in range(200):
        cls, base = rng.choice(CLASSES), rng.choice(list(COLORS))
        look = random_look(rng, cls, base, held_out=True)
        assert look.pattern == "plain" or is_look_held_out(cls, look.pattern, look.a, look.b)
