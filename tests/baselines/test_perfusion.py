"""Perfusion: the gated rank-one edit, key locking, value targets, the two learning rates, storage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from state_helpers import changed, module_state

from diffusers_infusion.baselines import METHODS, train_method
from diffusers_infusion.baselines.perfusion import (
    WEIGHT_NAME,
    ConceptInput,
    GatedRankOneEdit,
    PerfusionMethod,
    input_covariance,
    vocabulary_prompts,
    whitening_matrix,
)


def make(pipe, **options) -> PerfusionMethod:
    """A Perfusion method whose covariance comes from 300 random prompts (the default takes 2,000)."""
    return PerfusionMethod(pipe, class_word="cat", covariance_prompts=vocabulary_prompts(pipe.tokenizer, count=300),
                           **options)  # fmt: skip


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def class_encoding(pipe, prompt: str = "a photo of a cat", position: int = 5) -> torch.Tensor:
    """The base text encoder's output at the class word ("cat" is token 5 of "a photo of a cat")."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # fmt: skip
    assert pipe.tokenizer.convert_ids_to_tokens(int(ids[0, position])) == "cat</w>"
    with torch.no_grad():
        return pipe.text_encoder(ids)[0][0, position]


def hand_built_edit(d: int = 6, out: int = 5, *, beta: float = 0.7, tau: float = 0.15):
    """An edit with a known covariance C = A Aᵀ, concept input i*, projection W and target o*."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn((d, d), generator=g, dtype=torch.float64)
    covariance = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)
    concept_input = torch.randn(d, generator=g)
    concept = ConceptInput(concept_input, beta=beta, tau=tau)
    concept.whitened.copy_(torch.linalg.solve(covariance, concept_input.double()))
    linear = torch.nn.Linear(d, out, bias=False)
    target = torch.randn(out, generator=g)
    return concept, GatedRankOneEdit(linear, target, concept=concept), covariance


def test_gate_is_one_at_the_concept_and_zero_for_unrelated_tokens():
    concept, edit, covariance = hand_built_edit()
    i_star = concept.concept_input
    unrelated = torch.randn((3, 6), generator=torch.Generator().manual_seed(1))
    w = concept.whitened  # C⁻¹ i*
    unrelated -= (unrelated @ w / (i_star @ w))[:, None] * i_star  # C-orthogonal to i*
    tokens = torch.stack([i_star, 2 * i_star, *unrelated])[None]  # (1, 5, d): i*, 2 i*, three C-orthogonal to i*
    ratio = concept.similarity(tokens)[0]
    assert torch.allclose(ratio, torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0]), atol=1e-5)
    gate = concept.gate(ratio)
    assert gate[0] == pytest.approx(sigmoid((1 - 0.7) / 0.15), abs=1e-6)  # 0.88 at the concept encoding
    assert gate[1] > 0.999 and (gate[2:] < 0.01).all()  # σ(−β/τ) = 0.0094 for unrelated tokens
    concept.tau = 1e-3  # a hard gate: exactly 1 at the concept, 0 elsewhere
    assert concept.gate(ratio).tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0, 0.0], abs=1e-6)
    with torch.no_grad():  # unrelated tokens keep W e; the concept's output is o*
        out = edit(tokens)[0]
    assert torch.allclose(out[2:], edit.linear(unrelated), atol=1e-5)
    assert torch.allclose(out[0], edit.target_output, atol=1e-5)


def test_edit_is_the_rank_one_rome_update_with_the_gate_replaced():
    concept, edit, covariance = hand_built_edit()
    e = torch.randn((2, 4, 6), generator=torch.Generator().manual_seed(2))
    i_star, w, o_star = concept.concept_input, edit.linear.weight, edit.target_output
    ratio = (e.double() @ torch.linalg.solve(covariance, i_star.double())) / (
        i_star.double() @ torch.linalg.solve(covariance, i_star.double())
    )
    e_orth = e - ratio[..., None].float() * i_star  # e_⊥
    gate = torch.sigmoid((ratio[..., None].float() - 0.7) / 0.15)
    with torch.no_grad():
        assert torch.allclose(edit(e), e_orth @ w.T + gate * o_star, atol=1e-5)


@pytest.fixture
def trained(base_pipe, data) -> PerfusionMethod:
    method = PerfusionMethod(base_pipe, class_word="cat", learning_rate=1e-2)  # default covariance prompts
    train_method(method, data, steps=3, progress=False)
    return method


def test_key_is_locked_to_the_class_word_and_the_value_reaches_its_target(trained, base_pipe):
    e_class = class_encoding(base_pipe)
    assert torch.equal(trained.superclass_input, e_class)
    i_star = trained.concept.concept_input
    assert not torch.allclose(i_star, e_class)  # i* has moved with the learned embedding
    g = sigmoid((1 - 0.7) / 0.15)
    with torch.no_grad():
        for path, (key, value) in trained.edits.items():
            locked = key.linear(e_class)  # W_K e_class
            assert torch.allclose(key(i_star[None, None])[0, 0], g * locked, atol=1e-5), path
            assert torch.allclose(value(i_star[None, None])[0, 0], g * value.target_output, atol=1e-5), path
            with trained.gate_settings(0.7, 1e-4):  # σ -> 1: exactly the locked key and the learned value
                assert torch.allclose(key(i_star[None, None])[0, 0], locked, atol=1e-5), path
                assert torch.allclose(value(i_star[None, None])[0, 0], value.target_output, atol=1e-5), path
            assert not key.target_output.requires_grad
            assert not torch.allclose(value.target_output, value.linear(e_class))  # learned away from W_V e_class


def test_untrained_concept_token_gets_the_class_words_key_in_a_prompt(base_pipe):
    method = make(base_pipe)
    encodings = method.encode_prompts([method.concept_prompt("a photo of a cat")])  # "a photo of a <concept>"
    assert torch.allclose(encodings[0, 5], class_encoding(base_pipe), atol=1e-6)
    gate = sigmoid((1 - 0.7) / 0.15)
    with torch.no_grad():
        for key, _ in method.edits.values():
            assert torch.allclose(key(encodings)[0, 5], gate * key.linear(class_encoding(base_pipe)), atol=1e-5)
    assert method.gate_values("a photo of a cat")[5] == pytest.approx(gate, abs=1e-5)


def test_only_the_embedding_and_value_targets_train_and_the_base_pipe_is_untouched(base_pipe, data):
    before, flags = module_state(base_pipe), {n: p.requires_grad for n, p in base_pipe.unet.named_parameters()}
    method = make(base_pipe, learning_rate=1e-2)
    keys = {p: k.target_output.clone() for p, (k, _) in method.edits.items()}
    frozen = {n: p.detach().clone() for n, p in method.pipe.unet.named_parameters() if "target_output" not in n}
    train_method(method, data, steps=3, progress=False)
    assert changed(before, module_state(base_pipe)) == set()
    assert all(type(m.to_k) is torch.nn.Linear for n, m in base_pipe.unet.named_modules() if n.endswith("attn2"))
    assert all(p.grad is None for p in base_pipe.unet.parameters())
    assert {n: p.requires_grad for n, p in base_pipe.unet.named_parameters()} == flags
    assert all(torch.equal(keys[p], k.target_output) for p, (k, _) in method.edits.items())
    assert all(torch.equal(frozen[n], p) for n, p in method.pipe.unet.named_parameters() if n in frozen)
    n_layers = sum(n.endswith("attn2") for n, _ in base_pipe.unet.named_modules())
    assert len(method.edits) == n_layers and len(method.trainable_parameters()) == 1 + n_layers


def test_two_learning_rates(base_pipe):
    groups = make(base_pipe).optimizer()
    method = make(base_pipe, embedding_learning_rate=1e-3, token="<c2>")
    assert [g["lr"] for g in groups] == pytest.approx([0.006, 0.03])
    assert [g["lr"] for g in method.optimizer()] == pytest.approx([1e-3, 0.03])
    assert method.optimizer()[0]["params"] == [method.token.embedding]
    assert METHODS["perfusion"] is PerfusionMethod


def test_loss_falls_on_a_tiny_overfit_case(base_pipe):
    method = make(base_pipe, learning_rate=0.3)  # the tiny random UNet reads little from the text
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    t = torch.tensor([300, 600])
    optimizer = torch.optim.AdamW(method.optimizer(), weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = method.training_loss(latents, ["a photo of a cat"] * 2, noise=noise, timesteps=t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.96 * losses[0]
    assert all(b < a for a, b in zip(losses[:20], losses[1:21]))  # steadily at first


def test_concept_input_follows_the_batches_concept_encoding(base_pipe):
    method = make(base_pipe, ema_decay=0.0)
    with torch.no_grad():
        method.token.embedding.add_(1.0)
    x = torch.zeros((1, 4, 8, 8))
    method.training_loss(x, ["a cat on snow"], noise=x, timesteps=torch.tensor([10]))
    encoding = method.encode_prompts(["a <concept> on snow"])[0, 2]
    assert torch.allclose(method.concept.concept_input, encoding, atol=1e-6)
    assert torch.allclose(method.concept.similarity(encoding), torch.tensor(1.0), atol=1e-5)


def test_v_prediction_loss_regresses_the_velocity_with_the_training_gate(vpred_pipe):
    method = make(vpred_pipe, ema_decay=0.0)
    g = torch.Generator().manual_seed(1)
    latents, noise, t = (
        torch.randn((2, 4, 8, 8), generator=g),
        torch.randn((2, 4, 8, 8), generator=g),
        torch.tensor([10, 900]),
    )
    captions = ["a photo of a cat", "a cat on the grass"]
    loss = method.training_loss(latents, captions, noise=noise, timesteps=t)
    with torch.no_grad(), method.gate_settings(0.75, 0.1):
        noisy = method.noise_scheduler.add_noise(latents, noise, t)
        pred = method.pipe.unet(noisy, t, method.encode_prompts([method.concept_prompt(c) for c in captions])).sample
    assert torch.allclose(loss, F.mse_loss(pred, method.noise_scheduler.get_velocity(latents, noise, t)), rtol=1e-5)
    assert not torch.allclose(loss, F.mse_loss(pred, noise), rtol=1e-3)


def test_save_load_round_trip_and_storage(trained, base_pipe, tmp_path):
    folder = trained.save(tmp_path / "perfusion")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert trained.storage_bytes() == size
    assert sorted(f.suffix for f in folder.iterdir()) == [".json", ".safetensors"]
    tensors = load_file(str(folder / WEIGHT_NAME))
    d = base_pipe.text_encoder.config.hidden_size
    values = sum(v.linear.out_features for _, v in trained.edits.values())
    assert sum(t.numel() for t in tensors.values()) == 4 * d + values
    loaded = PerfusionMethod.load(base_pipe, folder)
    prompts, kwargs = ["a cat on snow", "a photo of a cat at night"], dict(seed=3, num_inference_steps=3)
    images = [np.stack([np.asarray(i) for i in m.generate(prompts, **kwargs)]) for m in (trained, loaded)]
    assert np.array_equal(*images)
    x, t = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    assert torch.equal(trained.noise_prediction(x, t, ["a cat"]), loaded.noise_prediction(x, t, ["a cat"]))
    for (k1, v1), (k2, v2) in zip(trained.edits.values(), loaded.edits.values()):
        assert torch.equal(k1.target_output, k2.target_output) and torch.equal(v1.target_output, v2.target_output)


def test_input_covariance_and_its_inverse(base_pipe):
    prompts = ["a cat", "a red dog on the grass", "the moon at night"]
    covariance = input_covariance(base_pipe.tokenizer, base_pipe.text_encoder, prompts, batch_size=2)
    ids = base_pipe.tokenizer(prompts, padding="max_length", max_length=base_pipe.tokenizer.model_max_length,
                              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        e = base_pipe.text_encoder(ids)[0].reshape(-1, covariance.shape[0]).double()
    assert torch.allclose(covariance, e.T @ e / len(e))
    d = len(covariance)
    ridged = covariance + 1e-3 * covariance.trace() / d * torch.eye(d, dtype=torch.float64)  # 3 prompts: rank < d
    assert torch.allclose(whitening_matrix(covariance) @ ridged, torch.eye(d, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(tau=0.0), "tau=0.0"), (dict(train_tau=-1.0), "train_tau"), (dict(ema_decay=1.0), "ema_decay"),
     (dict(init_prompt="a photo"), "init_prompt"), (dict(embedding_learning_rate=0.0), "embedding_learning_rate")],
)  # fmt: skip
def test_rejects_bad_options(base_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(base_pipe, **kwargs)
