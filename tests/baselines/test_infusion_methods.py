"""Infusion behind the baseline interface: only Δ trains; prompts without the class word are the base model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from state_helpers import changed, module_state

from diffusers_infusion import InfusionConcept, InfusionPipeline
from diffusers_infusion.baselines import InfusionMethod, InfusionOwnQueryMethod, train_method
from diffusers_infusion.errors import ClassWordError


@pytest.mark.parametrize("cls", [InfusionMethod, InfusionOwnQueryMethod])
def test_only_residuals_change_and_other_captions_are_exactly_the_base(cls, base_pipe, data):
    method = cls(base_pipe, class_word="cat", learning_rate=1e-1)
    before = module_state(method.pipe)
    train_method(method, data, steps=3, progress=False)
    assert changed(before, module_state(method.pipe)) == set()
    assert all(d.abs().sum() > 0 for d in method.residuals.deltas)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((3, 4, 8, 8), generator=g), torch.tensor([10, 400, 990])
    captions = ["a dog on snow", "a photo of a car", "a red cup"]
    enc = base_pipe.text_encoder(base_pipe.tokenizer(captions, padding="max_length", max_length=77,
                                                     return_tensors="pt").input_ids)[0]  # fmt: skip
    with torch.no_grad():
        base = base_pipe.unet(x, t, enc).sample
    assert torch.equal(method.noise_prediction(x, t, captions), base)  # METHOD.md property 4, exactly
    with_cat = ["a cat on snow", "a photo of a cat", "a red cat"]
    enc_cat = base_pipe.text_encoder(base_pipe.tokenizer(with_cat, padding="max_length", max_length=77,
                                                         return_tensors="pt").input_ids)[0]  # fmt: skip
    with torch.no_grad():
        assert not torch.allclose(method.noise_prediction(x, t, with_cat), base_pipe.unet(x, t, enc_cat).sample)
    assert method.concept_prompt("a cat on snow") == "a cat on snow"


def test_exact_and_own_query_variants_differ_once_trained(base_pipe, data):
    exact = InfusionMethod(base_pipe, class_word="cat", learning_rate=1e-1)
    train_method(exact, data, steps=3, progress=False)
    own = InfusionOwnQueryMethod(base_pipe, class_word="cat")
    own.residuals.load_concept(exact.concept())
    x, t = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    assert not torch.allclose(exact.noise_prediction(x, t, ["a cat"]), own.noise_prediction(x, t, ["a cat"]))


def test_generate_matches_the_infusion_pipeline_and_file_is_a_concept(base_pipe, data, tmp_path):
    method = InfusionMethod(base_pipe, class_word="cat", learning_rate=1e-1)
    train_method(method, data, steps=3, progress=False)
    folder = method.save(tmp_path / "inf")
    pipe = InfusionPipeline(**base_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_infusion_concept(InfusionConcept.from_pretrained(folder))
    kwargs = dict(num_inference_steps=3)
    theirs = pipe(["a cat on snow", "a dog"], generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **kwargs)
    ours = method.generate(["a cat on snow", "a dog"], seed=7, **kwargs)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs.images))
    base = base_pipe(["a dog"], generator=[torch.Generator().manual_seed(8)], **kwargs).images[0]
    assert np.array_equal(np.asarray(ours[1]), np.asarray(base))


def test_unknown_class_word_is_refused(base_pipe):
    with pytest.raises(ClassWordError, match="café"):
        InfusionMethod(base_pipe, class_word="café")


def test_fidelity_option_trains_the_knob_keeps_other_captions_and_saves(base_pipe, data, tmp_path):
    method = InfusionMethod(base_pipe, class_word="cat", learning_rate=1e-1, fidelity={"rank": 2, "norm_bound": 0.5})
    assert method.fidelity.rank == 2 and method.residuals.fidelity_layers
    train_method(method, data, steps=3, progress=False)
    assert all(u.abs().sum() > 0 for u in method.residuals.fidelity_up)  # U starts at 0 and trains
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((2, 4, 8, 8), generator=g), torch.tensor([10, 700])
    captions = ["a dog on snow", "a red cup"]
    enc = base_pipe.text_encoder(base_pipe.tokenizer(captions, padding="max_length", max_length=77,
                                                     return_tensors="pt").input_ids)[0]  # fmt: skip
    with torch.no_grad():
        assert torch.equal(method.noise_prediction(x, t, captions), base_pipe.unet(x, t, enc).sample)
    plain = InfusionMethod(base_pipe, class_word="cat")
    plain.residuals.deltas.load_state_dict(method.residuals.deltas.state_dict())
    with torch.no_grad():  # same Δ, knob on vs off: the knob changes the class word's prediction
        assert not torch.allclose(method.noise_prediction(x, t, ["a cat", "a cat"]),
                                  plain.noise_prediction(x, t, ["a cat", "a cat"]))  # fmt: skip
    again = InfusionMethod.load(base_pipe, method.save(tmp_path / "knob"))
    assert again.fidelity == method.fidelity
    assert all(torch.equal(a, b) for a, b in zip(again.residuals.fidelity_up, method.residuals.fidelity_up))
    with torch.no_grad():
        assert torch.equal(
            again.noise_prediction(x, t, ["a cat", "a cat"]), method.noise_prediction(x, t, ["a cat"] * 2)
        )


def test_residual_lr_scale_trains_delta_at_a_fraction_of_the_knobs_rate(base_pipe, data, tmp_path):
    method = InfusionMethod(base_pipe, class_word="cat", learning_rate=1e-1, fidelity={"rank": 2},
                            residual_lr_scale=0.1)  # fmt: skip
    train_method(method, data, steps=1, progress=False)  # Adam's first step moves each entry by ~ its group's rate
    delta = max(d.abs().max().item() for d in method.residuals.deltas)
    knob = max(u.abs().max().item() for u in method.residuals.fidelity_up)
    assert 0.009 < delta <= 0.01 + 1e-6 and 0.09 < knob <= 0.1 + 1e-6
    again = InfusionMethod.load(base_pipe, method.save(tmp_path / "scaled"))
    assert again.residual_lr_scale == 0.1 and again.fidelity == method.fidelity
    with pytest.raises(ValueError, match=r"residual_lr_scale=0 must be in \(0, 1\]"):
        InfusionMethod(base_pipe, class_word="cat", fidelity={"rank": 2}, residual_lr_scale=0)
