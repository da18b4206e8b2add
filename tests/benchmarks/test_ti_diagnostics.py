"""benchmarks/ti_diagnostics.py: each variant changes the paper's Textual Inversion in the one place it says."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a photo of a cat on snow", "a cat and a dog at night"]


@pytest.fixture(scope="module")
def diag(load_benchmark):
    return load_benchmark("ti_diagnostics")


@pytest.fixture(scope="module")
def pipe():
    from diffusers_infusion.toy import load_toy_pipeline

    return load_toy_pipeline()


def encode(method, prompts):
    with torch.no_grad():
        return method.encode_prompts([method.concept_prompt(p) for p in prompts])  # (B, tokens, dim)


def concept_positions(method, prompts) -> torch.Tensor:
    tokenizer = method.token.tokenizer
    ids = tokenizer([method.concept_prompt(p) for p in prompts], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
    return ids == method.token.token_id  # (B, tokens)


@pytest.mark.parametrize("name", ["ti_output", "ti_own_position", "ti_object_loss"])
def test_each_variant_starts_where_textual_inversion_starts(diag, pipe, name):
    """Before training, every variant encodes "a photo of a <concept> ..." as the base model does the class word."""
    cls = next(c for c in diag.DIAGNOSTICS if c.name == name)
    method = cls(pipe, class_word="cat", learning_rate=0.05)
    paper = diag.TextualInversionMethod(pipe, class_word="cat", learning_rate=0.05)
    # the output vector starts at the class word's output after "a photo of a", which depends on the words before
    prompts = PROMPTS[:1] if name == "ti_output" else PROMPTS
    assert torch.allclose(encode(method, prompts), encode(paper, prompts), atol=1e-6)
    if name == "ti_output":
        assert not torch.allclose(encode(method, PROMPTS[1:]), encode(paper, PROMPTS[1:]), atol=1e-4)
    assert [p.numel() for p in method.trainable_parameters()] == [pipe.text_encoder.config.hidden_size]


def test_output_vector_is_the_concept_positions_output_and_nothing_else(diag, pipe):
    method = diag.OutputVectorTI(pipe, class_word="cat", learning_rate=0.05)
    before = encode(method, PROMPTS)
    with torch.no_grad():
        method.output.add_(1.0)
    after, at = encode(method, PROMPTS), concept_positions(method, PROMPTS)
    assert torch.equal(after[~at], before[~at])  # every other token untouched
    assert torch.allclose(after[at], method.output.expand(int(at.sum()), -1))


def test_own_position_changes_only_its_position_where_the_paper_changes_the_later_tokens(diag, pipe):
    own = diag.OwnPositionTI(pipe, class_word="cat", learning_rate=0.05)
    paper = diag.TextualInversionMethod(pipe, class_word="cat", learning_rate=0.05)
    at = concept_positions(own, PROMPTS)
    later = at.cumsum(1).bool() & ~at  # the tokens after the concept (causal attention reaches them)
    before = encode(own, PROMPTS)
    # a random step: a uniform shift of every value would vanish in the encoder's layer norms
    step = torch.randn(own.token.embedding.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own.token.embedding.add_(step)
        paper.token.embedding.add_(step)
    moved_own, moved_paper = encode(own, PROMPTS), encode(paper, PROMPTS)
    assert torch.equal(moved_own[~at], before[~at]) and not torch.allclose(moved_own[at], before[at])
    assert not torch.allclose(moved_paper[later], before[later], atol=1e-4)
    assert torch.allclose(moved_own[at], moved_paper[at], atol=1e-6)  # the same vector at its own position


def test_object_loss_counts_the_photos_object_cells_only(diag, pipe):
    method = diag.ObjectLossTI(pipe, class_word="cat", learning_rate=0.05)
    cells = method.object_cells()  # (1, 1, 16, 16)
    assert cells.shape == (1, 1, 16, 16) and set(cells.unique().tolist()) == {0.0, 1.0}
    assert 0.1 < cells.mean() < 0.4  # a big cat in the center of a 16 x 16 latent
    latents = torch.zeros(2, 8, 16, 16)
    noise, timesteps = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 900])
    captions = ["a photo of a cat"] * 2
    weighted = method.training_loss(latents, captions, noise=noise, timesteps=timesteps)
    with torch.no_grad():
        noisy = method.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = method.pipe.unet(noisy, timesteps, method.encode_prompts(["a photo of a <concept>"] * 2)).sample
        err = (pred - method.target(latents, noise, timesteps)).square()  # (2, 8, 16, 16)
    assert torch.allclose(weighted, err[:, :, cells[0, 0].bool()].mean(), rtol=1e-5)
    plain = diag.TextualInversionMethod.training_loss(method, latents, captions, noise=noise, timesteps=timesteps)
    assert torch.allclose(plain, err.mean(), rtol=1e-5)  # the paper's loss counts every cell


def test_main_runs_the_variants_through_the_benchmark(diag, tmp_path, monkeypatch, stub_measuring):
    from diffusers_infusion.baselines import METHODS

    for cls in diag.DIAGNOSTICS:  # registered for this test only
        monkeypatch.setitem(METHODS, cls.name, cls)
    seen = {}

    def train_and_measure(method, *args, label=None, **kwargs):
        seen[label] = type(method)

    stub_measuring(diag.overfitting, train_and_measure)
    diag.main(["--quick", "--steps", "2", "--output-dir", str(tmp_path)])
    assert seen == {cls.name: cls for cls in diag.DIAGNOSTICS}
