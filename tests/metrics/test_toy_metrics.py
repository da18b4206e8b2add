"""Toy-world scores: prompt parsing, matching a reading, and the reader on rendered scenes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from diffusers_infusion.metrics import (
    parse_toy_prompt,
    toy_concept_similarity,
    toy_prompt_matches,
    toy_reconstruction_similarity,
    toy_text_alignment,
)
from diffusers_infusion.metrics.toy import NamedObject
from diffusers_infusion.toy import concepts
from diffusers_infusion.toy.reader import Reading, ToyReadObject
from diffusers_infusion.toy.world import caption, render, sample_scene


def _reading(background: str, *objects: tuple[str, str, str]) -> Reading:
    read = tuple(ToyReadObject(cls, color, position, 0.9) for cls, color, position in objects)
    return Reading(background, read, read[0] if read else ToyReadObject("cat", "red", "left", 0.1))


def test_parse_binds_colors_positions_and_personal_concepts():
    objects, background = parse_toy_prompt("a photo of a red cat on the left by a brick wall")
    assert objects == [NamedObject("cat", "red", "left")] and background == "brick"
    objects, background = parse_toy_prompt("a blue dog and a yellow cup on snow")
    assert objects == [NamedObject("dog", "blue"), NamedObject("cup", "yellow")] and background == "snow"
    objects, background = parse_toy_prompt("my cat at night")
    assert objects == [NamedObject("cat", None, None, personal=True)] and background == "night"
    assert parse_toy_prompt("a photo") == ([], None)


def test_parse_reads_looks_as_part_of_their_object():
    objects, _ = parse_toy_prompt("a photo of an orange and blue cat on the left on grass")
    assert objects == [NamedObject("cat", "orange", "left")]  # the first color: the one the reader reads
    objects, _ = parse_toy_prompt("a dog with a red left side and a yellow right side and a cup on the right")
    assert objects == [NamedObject("dog"), NamedObject("cup", None, "right")]  # "left side" is no position
    objects, _ = parse_toy_prompt("a red car with a white heart and a blue cup")
    assert objects == [NamedObject("car", "red"), NamedObject("cup", "blue")]  # the mark's color binds to nothing


def test_a_reading_matches_only_what_the_prompt_names():
    reading = _reading("beach", ("cat", "red", "left"), ("dog", "blue", "right"))
    assert toy_prompt_matches("a cat on the beach", reading)
    assert toy_prompt_matches("a red cat on the left", reading)
    assert toy_prompt_matches("a red cat and a blue dog", reading)
    assert toy_prompt_matches("my cat on the beach", reading)  # a concept's color is not checked
    assert not toy_prompt_matches("a cat on snow", reading)  # background
    assert not toy_prompt_matches("a blue cat", reading)  # color
    assert not toy_prompt_matches("a cat on the right", reading)  # position
    assert not toy_prompt_matches("a car on the beach", reading)  # class
    assert not toy_prompt_matches("a cat and a cat", reading)  # two objects need two read objects
    assert not toy_prompt_matches("a cat", _reading("beach"))  # nothing above the presence threshold


def test_rendered_scenes_align_with_their_own_captions_not_with_others():
    rng = random.Random(0)
    scenes = [sample_scene(seed) for seed in range(24)]  # one or two objects
    prompts = [caption(s, rng=rng) for s in scenes]
    images = [render(s) for s in scenes]
    own = toy_text_alignment(images, prompts)
    shuffled = toy_text_alignment(images, prompts[1:] + prompts[:1])
    assert own >= 0.9
    assert shuffled < own - 0.3


def test_alignment_accepts_arrays_readings_and_one_prompt_for_all():
    scene = sample_scene(3)
    image = render(scene)
    prompt = caption(scene, color=True, background=True, position=False)
    array = np.asarray(image, dtype=np.float32)[None] / 255
    assert toy_text_alignment(array, prompt) == toy_text_alignment([image], [prompt])
    assert toy_text_alignment([image], [prompt], readings=[_reading("night")]) == 0.0
    with pytest.raises(ValueError, match="prompts has 2 entries for 1 images"):
        toy_text_alignment([image], [prompt, prompt])


def test_concept_similarity_is_the_toy_module_function():
    assert toy_concept_similarity is concepts.concept_similarity
    photos = concepts.CONCEPTS["my_cat"].photos()
    assert np.mean(toy_concept_similarity(photos, "my_cat")) > 0.8


class _FakeVAE(torch.nn.Module):
    """encode -> posterior mean = pixels, decode -> ``transform(latents)``: a VAE whose reconstruction we choose."""

    def __init__(self, transform):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.transform = transform

    def encode(self, x):
        return type("Out", (), {"latent_dist": type("Dist", (), {"mean": x})()})()

    def decode(self, z):
        return type("Out", (), {"sample": self.transform(z)})()


def test_reconstruction_similarity_is_the_ceiling_the_vae_allows():
    faithful = toy_reconstruction_similarity(_FakeVAE(lambda z: z), "my_cat")
    photos = np.mean(toy_concept_similarity(concepts.CONCEPTS["my_cat"].photos(), "my_cat"))
    assert faithful == pytest.approx(photos, abs=0.02) and faithful > 0.8  # a perfect VAE: the photos' own score
    swapped = toy_reconstruction_similarity(_FakeVAE(lambda z: z[:, [1, 2, 0]]), "my_cat")  # colors permuted
    assert swapped < 0.2
