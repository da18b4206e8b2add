"""Textual Inversion: one embedding row trains; diffusers' TI file format."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from state_helpers import changed, module_state

from diffusers_infusion.baselines import TextualInversionMethod, train_method


def test_only_the_new_tokens_embedding_changes(base_pipe, data):
    method = TextualInversionMethod(base_pipe, class_word="cat", learning_rate=1e-1)
    before = module_state(method.pipe)
    start = method.token.embedding.detach().clone()
    train_method(method, data, steps=2, progress=False)
    assert changed(before, module_state(method.pipe)) == set()  # the matrix itself is untouched while training
    assert not torch.equal(start, method.token.embedding)
    assert method.trainable_parameters() == [method.token.embedding]
    base_rows = base_pipe.text_encoder.get_input_embeddings().weight
    ours = method.pipe.text_encoder.get_input_embeddings().weight
    assert ours.shape[0] == base_rows.shape[0] + 1 and torch.equal(ours[:-1], base_rows)


def test_concept_prompt_replaces_the_class_word(base_pipe):
    method = TextualInversionMethod(base_pipe, class_word="cat")
    assert method.concept_prompt("a cat and a cat") == "a <concept> and a <concept>"
    with pytest.raises(ValueError, match="token='cat'"):
        TextualInversionMethod(base_pipe, class_word="cat", token="cat")


def test_untrained_token_renders_the_base_models_images(base_pipe):
    method = TextualInversionMethod(base_pipe, class_word="cat")
    ours = method.generate(["a cat on snow"], seed=4, num_inference_steps=3)[0]
    base = base_pipe(["a cat on snow"], generator=[torch.Generator().manual_seed(4)], num_inference_steps=3).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(base))


def test_file_loads_with_diffusers_load_textual_inversion(base_pipe, data, tmp_path):
    method = TextualInversionMethod(base_pipe, class_word="cat", learning_rate=1e-1)
    train_method(method, data, steps=2, progress=False)
    folder = method.save(tmp_path / "ti")
    plain = copy.deepcopy(base_pipe)
    plain.load_textual_inversion(folder, weight_name="learned_embeds.safetensors")
    theirs = plain(["a <concept> on snow"], generator=[torch.Generator().manual_seed(1)], num_inference_steps=3)
    ours = method.generate(["a cat on snow"], seed=1, num_inference_steps=3)[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs.images[0]))


def test_several_vectors_train_replace_the_word_and_load_with_diffusers(base_pipe, data, tmp_path):
    method = TextualInversionMethod(base_pipe, class_word="cat", learning_rate=1e-1, num_vectors=3)
    assert method.concept_prompt("a cat on snow") == "a <concept> on snow"
    tokenizer = method.pipe.tokenizer  # training expands the token as the pipeline does
    ids = tokenizer(["a <concept> <concept>_1 <concept>_2 on snow"], padding="max_length", return_tensors="pt")
    assert torch.equal(method.encode_prompts(["a <concept> on snow"]), method.pipe.text_encoder(ids.input_ids)[0])
    start = method.token.embedding.detach().clone()  # (3, dim), each row the class word's embedding
    assert start.shape[0] == 3 and torch.equal(start[0], start[2])
    train_method(method, data, steps=2, progress=False)
    moved = (method.token.embedding.detach() - start).abs().sum(-1)
    assert (moved > 0).all()  # every vector trains
    assert not torch.equal(method.token.embedding[0], method.token.embedding[1])
    folder = method.save(tmp_path / "ti3")
    plain = copy.deepcopy(base_pipe)
    plain.load_textual_inversion(folder, weight_name="learned_embeds.safetensors")  # expands to 3 tokens
    theirs = plain(["a <concept> on snow"], generator=[torch.Generator().manual_seed(1)], num_inference_steps=3)
    ours = method.generate(["a cat on snow"], seed=1, num_inference_steps=3)[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs.images[0]))
    again = TextualInversionMethod.load(base_pipe, folder)
    assert torch.equal(again.token.embedding, method.token.embedding)
    one = TextualInversionMethod(base_pipe, class_word="cat")
    with pytest.raises(ValueError, match="num_vectors"):
        one._load_weights(folder)


def test_num_vectors_must_be_a_positive_integer(base_pipe):
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"num_vectors={bad!r}"):
            TextualInversionMethod(base_pipe, class_word="cat", num_vectors=bad)
