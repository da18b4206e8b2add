"""Custom Diffusion: only cross-attention K/V and the new token train; diffusers' key names."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from state_helpers import changed, module_state

from diffusers_infusion.baselines import CustomDiffusionMethod, train_method


def test_only_cross_attention_key_value_and_the_token_change(base_pipe, data):
    method = CustomDiffusionMethod(base_pipe, class_word="cat", learning_rate=1e-2)
    before = module_state(method.pipe)
    start = method.token.embedding.detach().clone()
    train_method(method, data, steps=2, progress=False)
    moved = changed(before, module_state(method.pipe))
    assert moved == set(f"unet.{n}" for n in method.key_value_weights())
    assert all(n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for n in method.key_value_weights())
    assert len(method.key_value_weights()) == 2 * sum(n.endswith("attn2") for n, _ in base_pipe.unet.named_modules())
    assert not torch.equal(start, method.token.embedding)
    assert method.concept_prompt("a cat on snow") == "a <concept> cat on snow"


def test_saved_keys_follow_diffusers_custom_diffusion_names(base_pipe, tmp_path):
    folder = CustomDiffusionMethod(base_pipe, class_word="cat").save(tmp_path / "cd")
    keys = load_file(str(folder / "pytorch_custom_diffusion_weights.safetensors"))
    assert keys and all(k.endswith(("attn2.processor.to_k_custom_diffusion.weight",
                                    "attn2.processor.to_v_custom_diffusion.weight")) for k in keys)  # fmt: skip
    assert set(load_file(str(folder / "learned_embeds.safetensors"))) == {"<concept>"}
