"""Wasserstein metric: zero for a set against itself, closed forms, symmetry, rank-deficient covariances."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusers_infusion.metrics import encode_images, frechet_distance_from_moments, wasserstein_metric
from diffusers_infusion.metrics.images import generated_latents


def _axis_set(mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Points mean ± spread_j e_j (2D of them): sample mean ``mean``, diagonal sample covariance, exactly."""
    offsets = np.concatenate([np.diag(spread), -np.diag(spread)])  # (2D, D)
    return mean + offsets


def _scipy_reference(a: np.ndarray, b: np.ndarray) -> float:
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * cross))


@pytest.mark.parametrize("algorithm", ["samples", "covariance"])
def test_a_set_against_itself_is_zero(algorithm):
    x = np.random.default_rng(0).normal(size=(40, 12)) * np.linspace(0.1, 3, 12)
    scale = np.trace(np.cov(x, rowvar=False))
    assert wasserstein_metric(x, x, algorithm=algorithm) <= 1e-8 * scale


@pytest.mark.parametrize("algorithm", ["samples", "covariance", "auto"])
def test_diagonal_covariances_match_the_closed_form(algorithm):
    """Commuting covariances: W2² = |Δμ|² + Σ_j (√σ1_j − √σ2_j)²."""
    d = 6
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = _axis_set(mu1, rng.uniform(0.5, 2, d)), _axis_set(mu2, rng.uniform(0.5, 2, d))
    var1, var2 = np.diag(np.cov(a, rowvar=False)), np.diag(np.cov(b, rowvar=False))
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert wasserstein_metric(a, b, algorithm=algorithm) == pytest.approx(expected, rel=1e-10)


def test_isotropic_gaussians_from_moments():
    """W2² = |Δμ|² + D(σ1 − σ2)² for N(μ1, σ1² I) and N(μ2, σ2² I)."""
    d, s1, s2 = 7, 0.5, 2.0
    mu1, mu2 = np.zeros(d), np.full(d, 0.3)
    value = frechet_distance_from_moments(mu1, s1**2 * np.eye(d), mu2, s2**2 * np.eye(d))
    assert value == pytest.approx(d * 0.3**2 + d * (s1 - s2) ** 2, rel=1e-12)


def test_general_case_agrees_with_scipy_both_ways_and_is_symmetric():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(60, 10)) @ rng.normal(size=(10, 10))
    b = rng.normal(size=(50, 10)) @ rng.normal(size=(10, 10)) + 1.0
    reference = _scipy_reference(a, b)
    for algorithm in ("samples", "covariance"):
        assert wasserstein_metric(a, b, algorithm=algorithm) == pytest.approx(reference, rel=1e-8)
    assert wasserstein_metric(a, b) == pytest.approx(wasserstein_metric(b, a), rel=1e-10)


def test_fewer_samples_than_dimensions_is_finite_and_exact():
    """N < D: rank-deficient covariances; the sample path equals the D × D path, no NaN."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 50)), rng.normal(size=(8, 50)) * 2 + 0.5
    fast = wasserstein_metric(a, b)  # auto: the sample path
    slow = wasserstein_metric(a, b, algorithm="covariance")
    assert np.isfinite(fast) and fast > 0
    assert fast == pytest.approx(slow, rel=1e-8)
    assert wasserstein_metric(a, a) <= 1e-8 * (a.var(0).sum())


def test_latent_shaped_tensors_are_flattened():
    x = torch.randn((6, 4, 3, 3), generator=torch.Generator().manual_seed(0)).double()
    assert wasserstein_metric(x, x + 1) == pytest.approx(36.0, rel=1e-9)  # Δμ = 1 in each of 36 dims


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="dimension 5 per sample, latents_b 6"):
        wasserstein_metric(np.zeros((3, 5)), np.zeros((3, 6)))
    with pytest.raises(ValueError, match="latents_b has 1 sample"):
        wasserstein_metric(np.zeros((3, 5)), np.zeros((1, 5)))
    with pytest.raises(ValueError, match="NaN"):
        wasserstein_metric(np.full((3, 5), np.nan), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="algorithm='fast'"):
        wasserstein_metric(np.zeros((3, 5)), np.zeros((3, 5)), algorithm="fast")


def test_generated_latents_share_seeds_with_the_pipeline(sd_pipe, pipe, make_concept):
    prompts = ["a dog on snow", "a cat on snow", "a car"]
    kwargs = dict(num_inference_steps=2, batch_size=2, progress=False)
    base = generated_latents(sd_pipe, prompts, **kwargs)
    assert base.shape == (3, 4, 8, 8)
    torch.testing.assert_close(generated_latents(sd_pipe, prompts, **kwargs), base)
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat", scale=5.0), adapter_name="cat")
    custom = generated_latents(pipe, prompts, **kwargs)
    assert torch.equal(custom[[0, 2]], base[[0, 2]]) and not torch.equal(custom[1], base[1])  # property 1
    images = sd_pipe(prompts[:1], generator=[torch.Generator().manual_seed(0)], num_inference_steps=2).images
    torch.testing.assert_close(encode_images(sd_pipe.vae, images), base[:1])

    def generate(prompts, *, seed, num_inference_steps, guidance_scale, batch_size):  # PersonalizationMethod-like
        return sd_pipe(prompts, generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale).images  # fmt: skip

    torch.testing.assert_close(generated_latents(generate, prompts, vae=sd_pipe.vae, **kwargs), base)
    with pytest.raises(ValueError, match="Pass vae="):
        generated_latents(generate, prompts, **kwargs)
