"""The attribute reader reads fresh renders (>= 98%), and the concept-similarity score separates concepts."""

from __future__ import annotations

import pytest

from diffusers_infusion.toy.concepts import CONCEPTS, concept_similarity
from diffusers_infusion.toy.reader import read_images, reader_accuracy
from diffusers_infusion.toy.world import Scene, ToyObject, render, sample_scene

FRESH_SEED = 20_000_000  # neither the reader's training nor its evaluation in train_reader.py used these


def test_reader_accuracy_on_fresh_renders():
    scenes = [sample_scene(FRESH_SEED + i, two_objects_prob=0.25) for i in range(400)]
    acc = reader_accuracy(scenes)
    for key in ("background", "class", "color", "position"):
        assert acc[key] >= 0.98, (key, acc)


def test_reader_reads_a_known_scene():
    scene = Scene("night", (ToyObject("car", "yellow", "left"), ToyObject("cup", "purple", "right", "small")), 3)
    reading = read_images([render(scene)])[0]
    assert reading.background == "night"
    got = {(o.cls, o.color, o.position) for o in reading.objects}
    assert got == {("car", "yellow", "left"), ("cup", "purple", "right")}


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_concept_similarity(name):
    concept = CONCEPTS[name]
    own = concept_similarity(concept.photos(), concept)
    assert min(own) > 0.8
    elsewhere = [
        render(Scene(bg, (concept.object(pos),), seed=7)) for bg, pos in (("beach", "left"), ("night", "right"))
    ]
    assert min(concept_similarity(elsewhere, concept)) > 0.6
    plain = [
        render(Scene(concept.background, (ToyObject(concept.class_word, c, concept.position),), seed=7))
        for c in ("red", "white", "blue", "orange")
    ]
    assert max(concept_similarity(plain, concept)) < 0.05  # a one-color object lacks a main color


def test_concept_similarity_asks_for_every_main_color(monkeypatch):
    """The concept's look painted in its first main color only (band and body alike) is not the concept."""
    from diffusers_infusion.toy import concepts
    from diffusers_infusion.toy.world import PATTERNS

    concept = CONCEPTS["my_cat"]
    base, _, mark = concept.colors
    monkeypatch.setitem(PATTERNS, "one_color_cat", concepts._PAINTERS["my_cat"](base, base, mark))
    obj = ToyObject("cat", "white", concept.position, concept.size, pattern="one_color_cat")
    one_color = render(Scene(concept.background, (obj,), seed=1))
    own = render(Scene(concept.background, (concept.object(),), seed=1))
    assert concept_similarity([one_color], concept)[0] < 0.05
    assert concept_similarity([own], concept)[0] > 0.8
