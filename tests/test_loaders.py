"""The loader verbs: names, activation, strengths, unloading, and their errors."""

import logging

import pytest
import torch

from diffusers_infusion import (
    ClassWordError,
    ConceptMismatchError,
    InfusionCallError,
    InfusionConcept,
    UnknownConceptError,
)


def test_default_names_and_activation(pipe, make_concept):
    assert pipe.load_infusion_concept(make_concept(pipe.unet, "cat")) == "default_0"
    assert pipe.load_infusion_concept(make_concept(pipe.unet, "dog")) == "default_1"
    assert pipe.load_infusion_concept(make_concept(pipe.unet, "cup"), "mug") == "mug"
    assert pipe.get_list_infusion_concepts() == ["default_0", "default_1", "mug"]
    assert pipe.get_active_infusion_concepts() == {"default_0": 1.0, "default_1": 1.0, "mug": 1.0}


def test_set_and_unload(pipe, make_concept):
    for word in ("cat", "dog", "cup"):
        pipe.load_infusion_concept(make_concept(pipe.unet, word), word)
    pipe.set_infusion_concepts(["cat", "cup"], [0.5, 2.0])
    assert pipe.get_active_infusion_concepts() == {"cat": 0.5, "cup": 2.0}
    pipe.set_infusion_concepts("dog", 0.25)
    assert pipe.get_active_infusion_concepts() == {"dog": 0.25}
    pipe.set_infusion_concepts([])
    assert pipe.get_active_infusion_concepts() == {}
    pipe.set_infusion_concepts(["cat", "dog"])
    pipe.unload_infusion_concept("cat")
    assert pipe.get_list_infusion_concepts() == ["dog", "cup"]
    assert pipe.get_active_infusion_concepts() == {"dog": 1.0}
    pipe.unload_infusion_concept()
    assert pipe.get_list_infusion_concepts() == [] and pipe.get_active_infusion_concepts() == {}


def test_unload_restores_plain_images_and_leaves_processors_alone(pipe, sd_pipe, make_concept, gen):
    processors = dict(pipe.unet.attn_processors)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"))
    with_concept = pipe("a cat", num_inference_steps=2, generator=gen(), output_type="np").images
    assert dict(pipe.unet.attn_processors) == processors
    pipe.unload_infusion_concept()
    plain = sd_pipe("a cat", num_inference_steps=2, generator=gen(), output_type="np").images
    assert (pipe("a cat", num_inference_steps=2, generator=gen(), output_type="np").images == plain).all()
    assert not (with_concept == plain).all()


def test_class_word_override(pipe, make_concept):
    name = pipe.load_infusion_concept(make_concept(pipe.unet, "cat"), class_word="teddy bear")
    assert pipe.infusion_concepts[name].class_word == "teddy bear"


def test_same_class_word_twice_warns(pipe, make_concept, caplog):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"), "a")
    with caplog.at_level(logging.WARNING):
        pipe.load_infusion_concept(make_concept(pipe.unet, "cat", seed=1), "b")
    assert "share the class word 'cat'" in caplog.text


def test_duplicate_adapter_name(pipe, make_concept):
    pipe.load_infusion_concept(make_concept(pipe.unet), "mine")
    with pytest.raises(UnknownConceptError, match="adapter_name='mine' is already loaded.*unload_infusion_concept"):
        pipe.load_infusion_concept(make_concept(pipe.unet), "mine")


def test_unknown_names(pipe, make_concept):
    pipe.load_infusion_concept(make_concept(pipe.unet), "mine")
    with pytest.raises(UnknownConceptError, match=r"\['yours'\] that are not loaded \(loaded: \['mine'\]\)"):
        pipe.set_infusion_concepts(["yours"])
    with pytest.raises(UnknownConceptError, match="yours"):
        pipe.unload_infusion_concept("yours")
    with pytest.raises(UnknownConceptError, match="infusion_concepts.*yours"):
        pipe("a cat", num_inference_steps=1, infusion_concepts={"yours": 1.0})


def test_strengths_of_the_wrong_length(pipe, make_concept):
    pipe.load_infusion_concept(make_concept(pipe.unet), "a")
    pipe.load_infusion_concept(make_concept(pipe.unet, "dog"), "b")
    with pytest.raises(InfusionCallError, match=r"strengths has 1 values for 2 names"):
        pipe.set_infusion_concepts(["a", "b"], [0.5])


def test_concept_for_another_unet(pipe):
    other = InfusionConcept("cat", {"mid_block.attentions.0.transformer_blocks.0.attn2": torch.zeros(1280)})
    with pytest.raises(ConceptMismatchError, match="does not fit this UNet"):
        pipe.load_infusion_concept(other)
    assert pipe.get_list_infusion_concepts() == []


def test_class_word_unknown_to_the_tokenizer(pipe, make_concept):
    with pytest.raises(ClassWordError, match="class_word='café' tokenizes to unknown tokens"):
        pipe.load_infusion_concept(make_concept(pipe.unet, "café"))
    with pytest.raises(ClassWordError, match="class_word='  ' is"):
        pipe.load_infusion_concept(make_concept(pipe.unet), class_word="  ")
    assert pipe.get_list_infusion_concepts() == []


def test_save_then_load_gives_the_same_images(pipe, make_concept, gen, tmp_path):
    concept = make_concept(pipe.unet, "cat")
    pipe.load_infusion_concept(concept, "object")
    before = pipe("a cat on snow", num_inference_steps=2, generator=gen(), output_type="np").images
    concept.save_pretrained(tmp_path / "my-cat")
    pipe.unload_infusion_concept()
    assert pipe.load_infusion_concept(tmp_path / "my-cat") == "default_0"
    after = pipe("a cat on snow", num_inference_steps=2, generator=gen(), output_type="np").images
    assert (before == after).all()
