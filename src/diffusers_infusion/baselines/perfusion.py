"""Perfusion (Tewel et al. 2023, "Key-Locked Rank One Editing for Text-to-Image Personalization").

Every cross-attention layer's key and value projections (``attn2.to_k`` / ``attn2.to_v`` of a structural copy of
the UNet; the base pipeline's modules are never touched) get a gated rank-one edit (the paper's Sec. 4 and its
Algorithm 1)::

    W' e = W e_⊥ + σ((sim(e)/energy − β)/τ) · o*,    e_⊥ = e − (sim(e)/energy) · i*,
    sim(e) = i*ᵀ C⁻¹ e,    energy = i*ᵀ C⁻¹ i*,

where ``i*`` is the concept's input encoding (the text encoder's output at the concept token), ``C`` the
uncentered covariance of text encodings (:func:`input_covariance`), and ``o*`` the edit's target output. A token
unrelated to the concept (``sim ≈ 0``) keeps ``W e``; the concept token (``e = i*``) gets ``σ((1 − β)/τ) · o*``
(0.92 at the training gate, 0.88 at the inference gate; exactly ``o*`` as ``τ → 0``).

- Key locking: ``o*_K = W_K · e_class``, the key of the super-class word's encoding (the class word in
  ``init_prompt``, "a photo of a cat"); fixed, never trained.
- Values: ``o*_V`` is learned per layer, initialised to ``W_V · e_class``.
- Word embedding: a new token (``"<concept>"``, initialised from the class word) replaces the class word in
  prompts ("a cat on snow" -> "a <concept> on snow") and is learned too.
- ``i*`` starts at ``e_class`` and follows an exponential moving average (decay 0.99) of the concept token's
  encodings in the training batches (as both public re-implementations do), without gradient.

Settings (paper): value-target lr 0.03 (``learning_rate``), embedding lr 0.006 (``embedding_learning_rate``,
by default 0.2 × ``learning_rate``), gate β 0.75 / τ 0.1 in training, β 0.7 / τ 0.15 at inference. On the toy
model ``toy_learning_rate`` is 0.01: at 0.03 the images break down within 200 steps (the value targets drift to
4× their initial size), at 0.01 the cat changes visibly by 100–200 steps and degrades from about 400.

Simplifications (see docs/baselines.md): local key locking only (no "global locking" of every token's key to the
super-class prompt), one concept per model (no multi-concept Cholesky orthogonalisation, no zero-shot weighting),
no masked loss and no 4× gradient accumulation (all methods share :func:`~.base.train_method`), and ``C`` is
estimated from prompts given by the caller (``covariance_prompts``; random prompts of the tokenizer's whole words
when None; :func:`toy_world_captions` for the toy model) instead of 100k LAION captions, with a small ridge.

Storage (fp32 safetensors): the token embedding, ``i*``, ``C⁻¹i*``, ``e_class`` (4 × d) and one ``o*_V`` per
layer: 15,552 numbers, about 65 KB, on SD 1.5 (computed from the layer sizes); 960 numbers, 5,397 bytes with the
JSON, on the toy model (measured).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..tokens import find_class_word_positions
from .base import ConceptToken, PersonalizationMethod, copy_module, insert_identifier

logger = logging.getLogger(__name__)

WEIGHT_NAME = "perfusion.safetensors"
TARGET_SUFFIX = ".to_v.target_output"


# ---------------------------------------------------------------------------------------------- input statistics
@torch.no_grad()
def input_covariance(tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str], *, batch_size: int = 64):
    """``C = E[e eᵀ]`` (d, d), float64: the uncentered covariance of the encodings of every token the UNet sees.

    All ``model_max_length`` positions of each prompt count, padding included (cross-attention sees them all).
    """
    if not prompts:
        raise ValueError("prompts=[] is empty. Pass captions to estimate the input covariance from.")
    total, count = None, 0
    device = next(text_encoder.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[start : start + batch_size]), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        enc = text_encoder(ids.to(device))[0].reshape(-1, text_encoder.config.hidden_size).double()  # (B·N, d)
        total = enc.T @ enc if total is None else total + enc.T @ enc
        count += len(enc)
    return (total / count).cpu()


def whitening_matrix(covariance: torch.Tensor, *, ridge: float = 1e-3) -> torch.Tensor:
    """``(C + λ·mean(eig C)·I)⁻¹`` (d, d), float64: ``C⁻¹`` with a small relative ridge for rank-deficient ``C``."""
    d = covariance.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    return torch.linalg.inv(covariance.double() + ridge * covariance.double().trace() / d * eye)


def vocabulary_prompts(tokenizer, *, count: int = 2000, seed: int = 0, max_words: int = 12) -> list[str]:
    """Random prompts of the tokenizer's whole words (default covariance prompts when no captions are given)."""
    words = sorted({t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha()})
    if not words:
        raise ValueError("The tokenizer has no whole-word tokens. Pass covariance_prompts (captions) explicitly.")
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(1, max_words))) for _ in range(count)]


def toy_world_captions(count: int = 4000, *, seed: int = 0) -> list[str]:
    """Captions of random toy-world scenes (covariance prompts for the toy model)."""
    from ..toy.world import caption, sample_scene

    rng = random.Random(f"perfusion-covariance-{seed}")
    return [caption(sample_scene(seed * 1_000_003 + i), rng=rng) for i in range(count)]


# ---------------------------------------------------------------------------------------------- the edit
class ConceptInput(torch.nn.Module):
    """The concept's input ``i*`` and whitened input ``C⁻¹i*`` (d,), and the gate's β, τ: shared by every edit.

    ``prepare`` (set by the method) fills ``whitened`` on first use when it has not been computed or loaded yet.
    """

    def __init__(self, concept_input: torch.Tensor, *, beta: float, tau: float):
        super().__init__()
        self.register_buffer("concept_input", concept_input.detach().float().clone())  # i*: (d,)
        self.register_buffer("whitened", torch.full_like(self.concept_input, float("nan")))  # C⁻¹ i*: (d,)
        self.beta, self.tau = beta, tau
        self.prepare: Callable[[], None] | None = None

    @property
    def ready(self) -> bool:
        return not bool(torch.isnan(self.whitened).any())

    def similarity(self, encodings: torch.Tensor) -> torch.Tensor:
        """``sim(e)/energy = i*ᵀC⁻¹e / i*ᵀC⁻¹i*`` per token, float32. encodings: (..., d) -> (...)."""
        if not self.ready:
            if self.prepare is None:
                raise RuntimeError("The Perfusion edit has no input covariance yet; call PerfusionMethod.prepare().")
            self.prepare()
        energy = self.concept_input @ self.whitened
        return (encodings.float() @ self.whitened) / energy

    def gate(self, ratio: torch.Tensor) -> torch.Tensor:
        """``σ((sim/energy − β)/τ)``: the gate that replaces ROME's linear ``sim/energy`` factor on ``o*``."""
        return torch.sigmoid((ratio - self.beta) / self.tau)


class GatedRankOneEdit(torch.nn.Module):
    """A projection ``W`` (``attn2.to_k`` or ``to_v``, frozen) with Perfusion's gated rank-one edit towards ``o*``.

    Args:
        linear: The (copied, frozen) projection.
        target_output: ``o*`` (out,): a trainable ``Parameter`` for values, a fixed buffer for keys.
        concept: The shared :class:`ConceptInput`.
    """

    def __init__(self, linear: torch.nn.Linear, target_output: torch.Tensor, *, concept: ConceptInput):
        super().__init__()
        self.linear, self.concept = linear, concept
        if isinstance(target_output, torch.nn.Parameter):
            self.target_output = target_output
        else:
            self.register_buffer("target_output", target_output)

    def forward(self, encodings: torch.Tensor) -> torch.Tensor:
        """``W e − (sim/energy)·W i* + σ(·)·o*`` = ``W e_⊥ + σ(·)·o*``. encodings: (B, N, d) -> (B, N, out)."""
        ratio = self.concept.similarity(encodings)[..., None]  # (B, N, 1)
        weight = self.linear.weight
        w_concept = F.linear(self.concept.concept_input.to(weight), weight)  # W i*: (out,)
        edit = self.concept.gate(ratio) * self.target_output.float() - ratio * w_concept.float()  # (B, N, out)
        return self.linear(encodings) + edit.to(encodings.dtype)


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The cross-attention modules (``...attn2``) of a UNet by diffusers module path."""
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", False)}


# ---------------------------------------------------------------------------------------------- the method
class PerfusionMethod(PersonalizationMethod):
    """Perfusion: "a cat on snow" -> "a <concept> on snow", key-locked gated rank-one edits of every ``attn2``.

    Args:
        token: The new token (must not be in the tokenizer yet).
        embedding_learning_rate: The token embedding's lr; 0.2 × ``learning_rate`` (0.006 at 0.03) when None.
        beta, tau: The inference gate (0.7, 0.15).
        train_beta, train_tau: The training gate (0.75, 0.1).
        ema_decay: Decay of the moving average that ``i*`` follows during training.
        init_prompt: Prompt whose class-word encoding is ``e_class`` (must contain ``{class_word}``).
        covariance_prompts: Captions to estimate ``C`` from (needed to train; not needed to load a saved concept);
            :func:`vocabulary_prompts` of the tokenizer when None.
        covariance_ridge: Relative ridge added to ``C`` before inverting it.
    """

    name: ClassVar[str] = "perfusion"
    default_learning_rate: ClassVar[float] = 0.03
    toy_learning_rate: ClassVar[float] = 0.01

    def __init__(
        self,
        pipe,
        *,
        class_word: str,
        learning_rate: float | None = None,
        token: str = "<concept>",
        embedding_learning_rate: float | None = None,
        beta: float = 0.7,
        tau: float = 0.15,
        train_beta: float = 0.75,
        train_tau: float = 0.1,
        ema_decay: float = 0.99,
        init_prompt: str = "a photo of a {class_word}",
        covariance_prompts: Sequence[str] | None = None,
        covariance_ridge: float = 1e-3,
    ):
        super().__init__(pipe, class_word=class_word, learning_rate=learning_rate)
        for arg, value in dict(tau=tau, train_tau=train_tau, covariance_ridge=covariance_ridge).items():
            if not value > 0:
                raise ValueError(f"{arg}={value!r} must be positive.")
        if embedding_learning_rate is not None and not embedding_learning_rate > 0:
            raise ValueError(f"embedding_learning_rate={embedding_learning_rate!r} must be positive (or None).")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay={ema_decay!r} must be in [0, 1) (0.99 in the paper's re-implementations).")
        if "{class_word}" not in init_prompt:
            raise ValueError(
                f"init_prompt={init_prompt!r} has no '{{class_word}}'. Use e.g. 'a photo of a {{class_word}}'."
            )
        self._options = dict(token=token, embedding_learning_rate=embedding_learning_rate, beta=beta, tau=tau,
                             train_beta=train_beta, train_tau=train_tau, ema_decay=ema_decay,
                             init_prompt=init_prompt, covariance_ridge=covariance_ridge)  # fmt: skip
        self.embedding_learning_rate = embedding_learning_rate or 0.2 * self.learning_rate
        self.train_gate, self.ema_decay = (train_beta, train_tau), ema_decay
        self.covariance_prompts, self.covariance_ridge = covariance_prompts, covariance_ridge
        self._whitening: torch.Tensor | None = None  # C⁻¹ (d, d), float64, computed on first training step

        self.token = ConceptToken(pipe.tokenizer, pipe.text_encoder, token=token, init_word=self.class_word)
        self.superclass_input = self._class_encoding(init_prompt.format(class_word=self.class_word))  # e_class: (d,)
        self.concept = ConceptInput(self.superclass_input, beta=beta, tau=tau)
        self.concept.prepare = self.prepare
        unet = copy_module(pipe.unet)
        self.edits: dict[str, tuple[GatedRankOneEdit, GatedRankOneEdit]] = {}
        for path, attn in cross_attention_layers(unet).items():
            key = GatedRankOneEdit(attn.to_k, self._locked_key(attn.to_k), concept=self.concept)
            value_init = F.linear(self.superclass_input.to(attn.to_v.weight), attn.to_v.weight).detach().float()
            value = GatedRankOneEdit(attn.to_v, torch.nn.Parameter(value_init), concept=self.concept)
            attn.to_k, attn.to_v = key, value
            self.edits[path] = (key, value)
        if not self.edits:
            raise ValueError("pipe.unet has no cross-attention layers (attn2) to edit.")
        self.pipe = self.build_pipeline(
            unet=unet, tokenizer=self.token.tokenizer, text_encoder=self.token.text_encoder
        )

    # ------------------------------------------------------------------------------------------ set-up
    @torch.no_grad()
    def _class_encoding(self, prompt: str) -> torch.Tensor:
        """The base text encoder's output at the class word (last sub-token, first occurrence) of ``prompt``: (d,)."""
        tokenizer, encoder = self.base_pipe.tokenizer, self.base_pipe.text_encoder
        positions = find_class_word_positions(tokenizer, prompt, self.class_word)
        if not positions:
            raise ValueError(f"init_prompt={prompt!r} does not contain class_word={self.class_word!r} as a token.")
        ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        return encoder(ids.to(encoder.device))[0][0, positions[0]].float().cpu()

    def _locked_key(self, to_k: torch.nn.Module) -> torch.Tensor:
        """``o*_K = W_K · e_class`` (out,): the concept's key locked to the super-class word's key."""
        return F.linear(self.superclass_input.to(to_k.weight), to_k.weight).detach().float()

    def prepare(self) -> None:
        """Estimate ``C`` from ``covariance_prompts`` (once) and set ``C⁻¹i*``."""
        if self._whitening is None:
            prompts = self.covariance_prompts or vocabulary_prompts(self.base_pipe.tokenizer)
            logger.info("Perfusion: estimating the input covariance from %d prompts", len(prompts))
            covariance = input_covariance(self.base_pipe.tokenizer, self.base_pipe.text_encoder, prompts)
            self._whitening = whitening_matrix(covariance, ridge=self.covariance_ridge)
        self._set_concept_input(self.concept.concept_input)

    @torch.no_grad()
    def _set_concept_input(self, concept_input: torch.Tensor) -> None:
        """Set ``i*`` and ``C⁻¹i*``."""
        self.concept.concept_input.copy_(concept_input)
        whitened = self._whitening.to(self.concept.whitened.device) @ concept_input.double()
        self.concept.whitened.copy_(whitened)

    def options(self) -> dict[str, Any]:
        return dict(self._options)

    @contextlib.contextmanager
    def gate_settings(self, beta: float, tau: float) -> Iterator[None]:
        """Temporarily use another gate (β, τ), e.g. the training gate."""
        saved = self.concept.beta, self.concept.tau
        self.concept.beta, self.concept.tau = beta, tau
        try:
            yield
        finally:
            self.concept.beta, self.concept.tau = saved

    # ------------------------------------------------------------------------------------------ training
    def value_targets(self) -> dict[str, torch.nn.Parameter]:
        """The learned ``o*_V`` by cross-attention layer path."""
        return {path: value.target_output for path, (_, value) in self.edits.items()}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.token.embedding, *self.value_targets().values()]

    def optimizer(self) -> list[dict[str, Any]]:
        """Two groups: the embedding at ``embedding_learning_rate``, the value targets at ``learning_rate``."""
        return [{"params": [self.token.embedding], "lr": self.embedding_learning_rate},
                {"params": list(self.value_targets().values()), "lr": self.learning_rate}]  # fmt: skip

    def concept_prompt(self, prompt: str) -> str:
        """ "a cat on snow" -> "a <concept> on snow"."""
        return insert_identifier(prompt, self.class_word, self.token.token)

    def training_loss(
        self, latents: torch.Tensor, captions: list[str], *, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Denoising loss with the training gate; first moves ``i*`` towards the batch's concept encodings (EMA)."""
        if self._whitening is None:
            self.prepare()
        tokenizer = self.pipe.tokenizer
        ids = tokenizer([self.concept_prompt(c) for c in captions], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        encodings = self.pipe.text_encoder(ids.to(self.pipe.text_encoder.device))[0]  # (B, N, d)
        at_concept = encodings[ids.to(encodings.device) == self.token.token_id]  # (occurrences, d)
        if len(at_concept):
            decay = self.ema_decay
            mean = at_concept.detach().float().mean(0).to(self.concept.concept_input.device)
            self._set_concept_input(decay * self.concept.concept_input + (1 - decay) * mean)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)  # z_t
        with self.gate_settings(*self.train_gate):
            pred = self.pipe.unet(noisy, timesteps, encodings, return_dict=False)[0]
        return F.mse_loss(pred.float(), self.target(latents, noise, timesteps).float())

    # ------------------------------------------------------------------------------------------ using
    @torch.no_grad()
    def gate_values(self, prompt: str) -> torch.Tensor:
        """The inference gate per token of ``concept_prompt(prompt)`` (N,), for inspection."""
        encodings = self.encode_prompts([self.concept_prompt(prompt)])[0]
        return self.concept.gate(self.concept.similarity(encodings))

    # ------------------------------------------------------------------------------------------ storage
    def _save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if not self.concept.ready:
            self.prepare()
        tensors = {"token_embedding": self.token.embedding, "concept_input": self.concept.concept_input,
                   "concept_input_whitened": self.concept.whitened,
                   "superclass_input": self.superclass_input}  # fmt: skip
        tensors.update({f"{path}{TARGET_SUFFIX}": t for path, t in self.value_targets().items()})
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        save_file(tensors, str(directory / WEIGHT_NAME), metadata={"format": "pt", "token": self.token.token})

    @torch.no_grad()
    def _load_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(directory / WEIGHT_NAME))
        missing = {f"{p}{TARGET_SUFFIX}" for p in self.edits} - tensors.keys()
        if missing:
            raise ValueError(f"'{directory / WEIGHT_NAME}' lacks {sorted(missing)[:3]}...: saved for another UNet?")
        self.token.load(tensors["token_embedding"])
        self.superclass_input = tensors["superclass_input"]
        for path, (key, value) in self.edits.items():
            key.target_output.copy_(self._locked_key(key.linear))
            value.target_output.copy_(tensors[f"{path}{TARGET_SUFFIX}"])
        self.concept.concept_input.copy_(tensors["concept_input"])
        self.concept.whitened.copy_(tensors["concept_input_whitened"])
