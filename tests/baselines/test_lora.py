"""DreamBooth-LoRA: only the adapters train; the file is diffusers' LoRA format."""

from __future__ import annotations

import copy

import numpy as np
import torch
from state_helpers import changed, module_state

from diffusers_infusion.baselines import LoRAMethod, train_method


def test_only_lora_weights_change(base_pipe, data):
    method = LoRAMethod(base_pipe, class_word="cat", learning_rate=1e-2)
    before = module_state(method.pipe)
    train_method(method, data, steps=2, progress=False)
    moved = changed(before, module_state(method.pipe))
    assert moved and all(".lora_B." in name or ".lora_A." in name for name in moved)
    ranks = {p.shape[0] for n, p in method.pipe.unet.named_parameters() if "lora_A" in n}
    assert ranks == {4}


def test_file_loads_into_a_plain_pipeline_with_diffusers(base_pipe, data, tmp_path):
    method = LoRAMethod(base_pipe, class_word="cat", identifier="my", learning_rate=1e-2)
    train_method(method, data, steps=2, progress=False)
    folder = method.save(tmp_path / "lora")
    assert (folder / "pytorch_lora_weights.safetensors").exists()
    plain = copy.deepcopy(base_pipe)
    plain.load_lora_weights(folder)
    kwargs = dict(num_inference_steps=3)
    ours = method.generate(["a cat on snow"], seed=2, **kwargs)[0]
    generator = [torch.Generator().manual_seed(2)]
    theirs = plain(["a my cat on snow"], generator=generator, **kwargs).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
