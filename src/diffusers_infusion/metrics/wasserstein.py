"""The Wasserstein metric (concept-specific overfitting): Fréchet distance of Gaussians fitted to two latent sets.

The paper fits a Gaussian to the VAE latents of the images that the base and the customized model generate for
super-class prompts ("a photo of a cat ...") and takes the 2-Wasserstein distance between the two Gaussians,

``W2² = |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½)``,

the quantity FID computes on Inception features. A method that drifts toward its training photos' backgrounds
and layouts moves away from the base model's distribution and the metric grows.

Everything is computed in float64. With ``N`` samples of dimension ``D`` the covariances have rank < ``N``; when
``D`` exceeds the sample counts (SD latents: D = 16,384) the trace term is computed without ever forming a
``D × D`` matrix: with ``Σ1 = AᵀA`` and ``Σ2 = BᵀB`` (``A``, ``B`` the centred samples over ``√(N − 1)``), the
non-zero eigenvalues of ``Σ1^½ Σ2 Σ1^½`` are the squared singular values of ``A Bᵀ``, so
``Tr((Σ1^½ Σ2 Σ1^½)^½) = ‖A Bᵀ‖_*`` (the nuclear norm), which is exact. Otherwise the ``D × D`` covariances are
used with symmetric square roots (``numpy.linalg.eigh``) whose rounding-noise eigenvalues are set to zero, which
keeps rank-deficient covariances stable.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_samples(latents: torch.Tensor | np.ndarray, *, argument: str) -> np.ndarray:
    """(N, ...) tensor or array -> (N, D) float64 array; raises for fewer than two samples."""
    x = latents.detach().double().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents, float)
    if x.ndim < 2:
        raise ValueError(f"{argument} has shape {x.shape}. Pass samples as (N, D) or (N, C, h, w).")
    if x.shape[0] < 2:
        raise ValueError(f"{argument} has {x.shape[0]} sample(s). A covariance needs at least 2 samples.")
    x = x.reshape(x.shape[0], -1)
    if not np.isfinite(x).all():
        raise ValueError(f"{argument} has NaN or infinite values.")
    return x


def _clip_eigenvalues(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise removed: those below ``D·eps·max`` are zeros (rank < D)."""
    tol = len(values) * np.finfo(np.float64).eps * max(np.abs(values).max(initial=0.0), 1e-300)
    return np.where(values > tol, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh; rounding-noise eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_clip_eigenvalues(values))) @ vectors.T


def frechet_distance_from_moments(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½)`` for given means (D,) and covariances (D, D)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"Moments do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}."
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1  # Σ1^½ Σ2 Σ1^½, symmetric PSD
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(_clip_eigenvalues(values)).sum()
    value = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(value, 0.0))


def _frechet_from_samples(a: np.ndarray, b: np.ndarray) -> float:
    """The same distance through the samples' (N1 × N2) cross product: exact, no D × D matrix."""
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)  # Σ1 = caᵀ ca
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()  # ‖A Bᵀ‖_*
    value = ((a.mean(0) - b.mean(0)) ** 2).sum() + (ca**2).sum() + (cb**2).sum() - 2 * trace_sqrt
    return float(max(value, 0.0))


def wasserstein_metric(
    latents_a: torch.Tensor | np.ndarray, latents_b: torch.Tensor | np.ndarray, *, algorithm: str = "auto"
) -> float:
    """Squared 2-Wasserstein (Fréchet) distance between Gaussians fitted to two sets of latents.

    Args:
        latents_a: (N1, D) or (N1, C, h, w) samples (tensor or array), e.g. latents of the base model's images.
        latents_b: (N2, D) or (N2, C, h, w) samples, e.g. the customized model's latents for the same prompts.
        algorithm: ``"samples"`` (through the N1 × N2 cross product), ``"covariance"`` (D × D covariances) or
            ``"auto"`` (the cheaper one: ``"samples"`` when D > max(N1, N2)). Both are exact.

    Returns:
        ``W2²`` (as FID reports it; take the square root for ``W2``); 0.0 for a set against itself, up to rounding.
    """
    a = _as_samples(latents_a, argument="latents_a")
    b = _as_samples(latents_b, argument="latents_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"latents_a has dimension {a.shape[1]} per sample, latents_b {b.shape[1]}. Compare latents of one shape."
        )
    if algorithm not in ("auto", "samples", "covariance"):
        raise ValueError(f"algorithm={algorithm!r} must be 'auto', 'samples' or 'covariance'.")
    if algorithm == "samples" or (algorithm == "auto" and a.shape[1] > max(len(a), len(b))):
        return _frechet_from_samples(a, b)
    cov = lambda x: np.atleast_2d(np.cov(x, rowvar=False))  # noqa: E731
    return frechet_distance_from_moments(a.mean(0), cov(a), b.mean(0), cov(b))
