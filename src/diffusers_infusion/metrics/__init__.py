"""The paper's metrics (METHOD.md, "The paper's metrics"): overfitting, text alignment and concept fidelity.

- :func:`latent_fisher_divergence`: concept-agnostic overfitting (eq. 4), base vs. customized noise predictions on
  real images with captions that do not name the concept.
- :func:`wasserstein_metric`: concept-specific overfitting, the Fréchet distance of Gaussians fitted to the
  latents of base and customized images (:func:`generated_latents`, :func:`encode_images`).
- :func:`clip_t`, :func:`clip_i`, :func:`dino_i`: prompt fidelity and concept fidelity with user-supplied models.
- :func:`toy_text_alignment`, :func:`toy_concept_similarity`: their toy-world counterparts (the attribute reader);
  :func:`toy_reconstruction_similarity`: the concept similarity the VAE itself allows.

Feature extractors, pure metric functions and small loops are kept apart, so that a benchmark loop over methods
and checkpoints computes reference features (base latents, reference embeddings) once.
"""

from __future__ import annotations

from .embeddings import (
    clip_i,
    clip_image_embeddings,
    clip_t,
    clip_text_embeddings,
    dino_i,
    dino_image_embeddings,
    mean_cosine,
)
from .fisher import fisher_divergence_samples, latent_fisher_divergence, to_epsilon
from .images import encode_images, generated_latents, to_pil, to_pixels
from .toy import (
    parse_toy_prompt,
    toy_concept_similarity,
    toy_prompt_matches,
    toy_reconstruction_similarity,
    toy_text_alignment,
)
from .wasserstein import frechet_distance_from_moments, wasserstein_metric

__all__ = [
    "clip_i",
    "clip_image_embeddings",
    "clip_t",
    "clip_text_embeddings",
    "dino_i",
    "dino_image_embeddings",
    "encode_images",
    "fisher_divergence_samples",
    "frechet_distance_from_moments",
    "generated_latents",
    "latent_fisher_divergence",
    "mean_cosine",
    "parse_toy_prompt",
    "to_epsilon",
    "to_pil",
    "to_pixels",
    "toy_concept_similarity",
    "toy_prompt_matches",
    "toy_reconstruction_similarity",
    "toy_text_alignment",
    "wasserstein_metric",
]
