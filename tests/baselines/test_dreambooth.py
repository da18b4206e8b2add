"""DreamBooth: the whole (copied) UNet trains; identifier prompts; fp16 storage."""

from __future__ import annotations

import torch
from conftest import changed, module_state

from diffusers_infusion.baselines import DreamBoothMethod, train_method


def test_only_the_unet_changes(base_pipe, data):
    method = DreamBoothMethod(base_pipe, class_word="cat", learning_rate=1e-3)
    before = module_state(method.pipe)
    train_method(method, data, steps=2, progress=False)
    moved = changed(before, module_state(method.pipe))
    assert moved and all(name.startswith("unet.") for name in moved)
    assert len(method.trainable_parameters()) == len(list(base_pipe.unet.parameters()))


def test_concept_prompt_puts_the_identifier_before_the_class_word(base_pipe):
    method = DreamBoothMethod(base_pipe, class_word="cat", identifier="my")
    assert method.concept_prompt("a cat next to a Cat") == "a my cat next to a my cat"
    assert method.concept_prompt("a catalog on a dog") == "a catalog on a dog"
    assert DreamBoothMethod(base_pipe, class_word="cat").concept_prompt("a cat") == "a sks cat"


def test_fp16_storage_rounds_the_weights(base_pipe, data, tmp_path):
    method = DreamBoothMethod(base_pipe, class_word="cat", learning_rate=1e-3)
    train_method(method, data, steps=2, progress=False)
    folder = method.save(tmp_path / "db")
    n_values = sum(t.numel() for t in method.pipe.unet.state_dict().values())
    weights = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 2 * n_values <= weights < 2 * n_values + 100_000  # fp16 plus the header
    loaded = DreamBoothMethod.load(base_pipe, folder)
    for (name, got), want in zip(loaded.pipe.unet.state_dict().items(), method.pipe.unet.state_dict().values()):
        assert torch.equal(got, want.half().float()), name
