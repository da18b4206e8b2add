"""The latent Fisher divergence (eq. 4 of the paper): how much a customization changes what the model does elsewhere.

``D_F ≈ ½ E_{z~E(x), t, ε} ‖ε_θ(z_t, t, c̄) − ε_θ'(z_t, t, c̄)‖²`` over real images ``x`` with captions ``c̄`` that do not
mention the concept (the paper: 50,000 LAION samples). ``ε_θ`` is the base model, ``ε_θ'`` the customized one; both
see the very same ``(z_t, t)``. It measures concept-agnostic overfitting; for Infusion it is exactly 0 on captions
without the class word, by construction (METHOD.md, property 4).

Normalization: the squared difference is averaged over the latent's elements (C·h·w), i.e. this returns
``½ E[mean((ε_θ − ε_θ')²)]``; multiply by C·h·w (16,384 for SD 1.5 at 512 px) for the sum-over-elements form.
Outputs of v-prediction models are converted to ε first (``ε̂ = √ᾱ_t·v̂ + √(1−ᾱ_t)·z_t``), so the number means the
same for both prediction types.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from tqdm.auto import tqdm

from ..concept import InfusionConcept
from ..stream import Placement, dual_stream_noise_pred
from ..tokens import class_word_token_ids, find_class_word_positions
from .images import ImageBatch, encode_images

logger = logging.getLogger(__name__)

#: What ``custom`` may be: concepts, concept names (or name -> strength), a pipeline, or a noise-prediction callable.
CustomModel = (
    InfusionConcept | Sequence[InfusionConcept] | str | Sequence[str] | Mapping[str, float] | DiffusionPipeline
    | Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor]
)  # fmt: skip
# (z_t, t, captions, base raw output, base caption encodings) -> the customized model's raw output
_Predictor = Callable[[torch.Tensor, torch.Tensor, list[str], torch.Tensor, torch.Tensor], torch.Tensor]


def to_epsilon(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """A UNet's raw output as a noise prediction ``ε̂`` (float32), whatever the model predicts.

    ``z_t = √ᾱ·z_0 + √(1−ᾱ)·ε`` and ``v = √ᾱ·ε − √(1−ᾱ)·z_0`` give ``ε = √ᾱ·v + √(1−ᾱ)·z_t`` (v-prediction) and
    ``ε = (z_t − √ᾱ·ẑ_0) / √(1−ᾱ)`` (sample prediction).

    Args:
        model_output: (B, C, h, w) raw UNet output.
        noisy_latents: (B, C, h, w) the ``z_t`` it was computed on.
        timesteps: (B,) training timesteps.
        alphas_cumprod: (T,) the scheduler's ``ᾱ``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """
    out = model_output.float()
    if prediction_type == "epsilon":
        return out
    a = alphas_cumprod.to(out.device, torch.float32)[timesteps.to(out.device)].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    z = noisy_latents.float()
    if prediction_type == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * z
    if prediction_type == "sample":
        return (z - a.sqrt() * out) / (1 - a).sqrt()
    raise ValueError(
        f"prediction_type={prediction_type!r} is not supported: use 'epsilon', 'v_prediction' or 'sample'."
    )


def _encode(pipe, captions: list[str]) -> torch.Tensor:
    """Caption encodings (B, tokens, dim) exactly as the pipeline encodes prompts (textual-inversion tokens too)."""
    return pipe.encode_prompt(captions, pipe.unet.device, 1, False)[0]


def _infusion_predictor(unet, place: Callable[[list[str]], list[Placement]], residuals, *, encode=None) -> _Predictor:
    """ε_θ' of Infusion concepts: the C stream on rows whose caption has a class word, the base model elsewhere.

    With ``encode=None`` the concepts sit on the base pipeline: rows without a class word take the base output as
    is (bit-identical, property 4) and only the other rows are run through the dual stream. Otherwise (another
    pipeline's UNet) every row is run through the dual stream with ``encode``'s encodings.
    """

    def predict(latents, timesteps, captions, base_out, base_encodings):
        placements = place(captions)
        if encode is not None:
            return dual_stream_noise_pred(unet, latents, timesteps, encode(captions), placements, residuals)
        rows = [i for i, placed in enumerate(placements) if placed]
        if not rows:
            return base_out
        index = torch.tensor(rows, device=latents.device)
        pick = lambda x: x.index_select(0, index)  # noqa: E731
        out = dual_stream_noise_pred(unet, pick(latents), pick(timesteps), pick(base_encodings),
                                     [placements[i] for i in rows], residuals)  # fmt: skip
        return base_out.index_copy(0, index, out.to(base_out.dtype))

    return predict


def _concept_predictor(base_pipe, concepts: Sequence[InfusionConcept]) -> _Predictor:
    """Concepts not loaded anywhere: placed on the base pipeline's tokenizer, strength 1.0 each."""
    unet, tokenizer = base_pipe.unet, base_pipe.tokenizer
    for concept in concepts:
        concept.validate_for(unet)
        class_word_token_ids(tokenizer, concept.class_word)
    named = {f"concept_{j}": c for j, c in enumerate(concepts)}
    residuals = {n: {k: v.to(unet.device, unet.dtype) for k, v in c.residuals.items()} for n, c in named.items()}

    def place(captions: list[str]) -> list[Placement]:
        placements = []
        for caption in captions:
            found = [(n, c, find_class_word_positions(tokenizer, caption, c.class_word)) for n, c in named.items()]
            placements.append([(n, 1.0, tuple(p)) for n, c, p in found if p])
        return placements

    return _infusion_predictor(unet, place, residuals)


def _loaded_predictor(pipe, strengths: Mapping[str, float], *, shares_base: bool) -> _Predictor:
    """Concepts loaded in an InfusionPipeline, placed by the pipeline's own logic (``place_infusion_concepts``)."""
    names = list(strengths)
    pipe._check_names(names, argument="custom")
    residuals = pipe._infusion_residuals(names, pipe.unet.device, pipe.unet.dtype)
    place = lambda captions: pipe.place_infusion_concepts(captions, len(captions), dict(strengths))  # noqa: E731
    return _infusion_predictor(pipe.unet, place, residuals, encode=None if shares_base else lambda c: _encode(pipe, c))


def _resolve_custom(base_pipe, custom) -> tuple[_Predictor, str]:
    """The customized model as a predictor of raw outputs, and the prediction type those outputs have."""
    base_type = base_pipe.scheduler.config.prediction_type
    if isinstance(custom, InfusionConcept):
        custom = [custom]
    if isinstance(custom, str):
        custom = {custom: 1.0}
    if isinstance(custom, Sequence) and custom and all(isinstance(c, InfusionConcept) for c in custom):
        return _concept_predictor(base_pipe, list(custom)), base_type
    if isinstance(custom, Sequence) and custom and all(isinstance(c, str) for c in custom):
        custom = dict.fromkeys(custom, 1.0)
    if isinstance(custom, Mapping):
        if not hasattr(base_pipe, "place_infusion_concepts"):
            raise TypeError(
                f"custom={custom!r} names concepts, but base_pipe is a {type(base_pipe).__name__}. Load them in an "
                "InfusionPipeline (load_infusion_concept) and pass that as base_pipe, or pass InfusionConcept objects."
            )
        return _loaded_predictor(base_pipe, custom, shares_base=True), base_type
    if hasattr(custom, "unet") and hasattr(custom, "encode_prompt"):  # another pipeline (a fine-tune)
        kind = custom.scheduler.config.prediction_type
        active = custom.get_active_infusion_concepts() if hasattr(custom, "get_active_infusion_concepts") else {}
        if active:
            shares = custom.unet is base_pipe.unet and custom.text_encoder is base_pipe.text_encoder
            return _loaded_predictor(custom, active, shares_base=shares), kind
        device = base_pipe.unet.device

        def predict(latents, timesteps, captions, base_out, base_encodings):
            to = lambda x: x.to(custom.unet.device)  # noqa: E731
            out = custom.unet(to(latents).to(custom.unet.dtype), to(timesteps), _encode(custom, captions),
                              return_dict=False)[0]  # fmt: skip
            return out.to(device)

        return predict, kind
    if callable(custom):
        return (
            lambda latents, timesteps, captions, base_out, base_enc: custom(latents, timesteps, captions)
        ), base_type
    raise TypeError(
        f"custom is of type {type(custom).__name__}. Pass an InfusionConcept (or a list), concept names loaded in "
        "base_pipe, a pipeline, or a callable (noisy_latents, timesteps, captions) -> raw UNet output."
    )


def _check_args(base_pipe, images, captions, num_samples_per_image: int, batch_size: int) -> list[str]:
    if getattr(base_pipe.unet.config, "addition_embed_type", None) is not None:
        raise ValueError(
            f"base_pipe's UNet has added conditioning ({base_pipe.unet.config.addition_embed_type!r}, e.g. SDXL). "
            "The latent Fisher divergence here supports Stable Diffusion 1.x/2.x pipelines."
        )
    if not isinstance(num_samples_per_image, int) or num_samples_per_image < 1:
        raise ValueError(f"num_samples_per_image={num_samples_per_image!r} must be a positive integer.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    n_images = len(images)
    if n_images == 0:
        raise ValueError("images is empty. Pass at least one image with its caption.")
    captions = [captions] * n_images if isinstance(captions, str) else list(captions)
    if len(captions) != n_images:
        raise ValueError(f"captions has {len(captions)} entries for {n_images} images. Pass one caption per image.")
    return captions


def _draw(seed: int, index: int, latent_shape: tuple[int, ...], num_timesteps: int) -> tuple[int, torch.Tensor]:
    """(t, ε) of sample ``index``, from its own generator: the same whatever the batch size or the model."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    t = int(torch.randint(num_timesteps, (1,), generator=g))
    return t, torch.randn(latent_shape, generator=g)


@torch.no_grad()
def fisher_divergence_samples(
    base_pipe: DiffusionPipeline,
    custom: CustomModel,
    images: ImageBatch,
    captions: str | Sequence[str],
    *,
    num_samples_per_image: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """One term ``½ mean((ε_θ − ε_θ')²)`` per sample (float64, (N · num_samples_per_image,)), image-major order.

    The arguments are those of :func:`latent_fisher_divergence`, whose value is the mean of these terms; their
    standard deviation over ``sqrt(len)`` is the estimate's standard error.
    """
    captions = _check_args(base_pipe, images, captions, num_samples_per_image, batch_size)
    predict, custom_type = _resolve_custom(base_pipe, custom)
    unet = base_pipe.unet
    device, dtype = unet.device, unet.dtype
    scheduler = DDPMScheduler.from_config(base_pipe.scheduler.config)  # add_noise and ᾱ of the training schedule
    base_type = scheduler.config.prediction_type
    latents = encode_images(base_pipe.vae, images, batch_size=batch_size).float()  # (N, C, h, w)
    n_samples = len(latents) * num_samples_per_image
    terms = []
    for start in tqdm(range(0, n_samples, batch_size), desc="Fisher divergence", disable=not progress):
        index = list(range(start, min(start + batch_size, n_samples)))
        rows = [i // num_samples_per_image for i in index]
        draws = [_draw(seed, i, tuple(latents.shape[1:]), scheduler.config.num_train_timesteps) for i in index]
        timesteps = torch.tensor([t for t, _ in draws], device=device)  # (B,)
        noise = torch.stack([e for _, e in draws]).to(device)  # (B, C, h, w)
        noisy = scheduler.add_noise(latents[rows], noise, timesteps)  # z_t, float32
        batch_captions = [captions[r] for r in rows]
        encodings = _encode(base_pipe, batch_captions)
        base_out = unet(noisy.to(dtype), timesteps, encodings, return_dict=False)[0]
        custom_out = predict(noisy.to(dtype), timesteps, batch_captions, base_out, encodings)
        if custom_out.shape != base_out.shape:
            raise ValueError(
                f"custom returned shape {tuple(custom_out.shape)} for latents {tuple(base_out.shape)}. It must return "
                "the raw UNet output for each noisy latent."
            )
        eps = [to_epsilon(out, noisy, timesteps, alphas_cumprod=scheduler.alphas_cumprod, prediction_type=kind)
               for out, kind in ((base_out, base_type), (custom_out.to(device), custom_type))]  # fmt: skip
        terms.append(0.5 * (eps[0].double() - eps[1].double()).pow(2).flatten(1).mean(1).cpu())
    return torch.cat(terms)


def latent_fisher_divergence(
    base_pipe: DiffusionPipeline,
    custom: CustomModel,
    images: ImageBatch,
    captions: str | Sequence[str],
    *,
    num_samples_per_image: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Eq. 4: ``½ E‖ε_θ(z_t, t, c̄) − ε_θ'(z_t, t, c̄)‖²`` (mean over latent elements), base vs. customized model.

    ``z_0`` is the VAE latent of each real image (posterior mean × scaling factor), ``t`` is uniform over the
    training timesteps and ``ε ~ N(0, I)``; sample ``i`` draws its ``(t, ε)`` from a generator seeded by
    ``(seed, i)``, so base and custom see the same ``z_t`` and the value does not depend on ``batch_size``.

    Args:
        base_pipe: The base Stable Diffusion pipeline (``StableDiffusionPipeline`` or ``InfusionPipeline``); its
            VAE encodes the images and its UNet is ``ε_θ``.
        custom: The customized model ``ε_θ'``: an ``InfusionConcept`` or a list of them (placed on the class
            word's tokens with the base pipeline's tokenizer); concept names loaded in ``base_pipe`` (a name, a
            list, or a dict name -> strength); another pipeline (its UNet, text encoder and tokenizer: a
            DreamBooth, LoRA or Textual Inversion fine-tune; an ``InfusionPipeline`` uses its active concepts); or
            a callable ``(noisy_latents, timesteps, captions) -> raw UNet output`` such as
            ``PersonalizationMethod.noise_prediction`` (read with the base scheduler's prediction type).
        images: Real images: PIL images (one size), an array (N, H, W, 3) in [0, 1] or a tensor (N, 3, H, W) in
            [-1, 1].
        captions: One caption per image (or one for all), not mentioning the concept.
        num_samples_per_image: ``(t, ε)`` draws per image (the paper: one per image, 50,000 images).
        seed: Seed of the draws.
        batch_size: Samples per UNet call.
        progress: Show a progress bar.

    Returns:
        The estimate (0.0 when the two models agree on every sample).
    """
    terms = fisher_divergence_samples(
        base_pipe, custom, images, captions, num_samples_per_image=num_samples_per_image, seed=seed,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return float(terms.mean())
