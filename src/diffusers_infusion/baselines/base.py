"""The interface every personalization method implements, and the one training loop they all share.

All methods train on the same data (a concept's photos and captions, :class:`~..training.data.InstanceData`), on
the same base pipeline, with the same step budget, through :func:`train_method`, so that a benchmark can treat
them alike. A method never modifies the modules of the pipeline it is given: it copies what it trains (sharing
the frozen weights' storage, see :func:`copy_module`) and builds its own pipeline from the frozen parts and its
copies.
"""

from __future__ import annotations

import abc
import copy
import json
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import PIL.Image
import torch

from ..training.data import InstanceData

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

METHOD_FILE = "personalization_method.json"


def copy_module(module: torch.nn.Module, *, trainable: Callable[[str], bool] = lambda name: False) -> torch.nn.Module:
    """A structural copy of ``module``: parameters named ``trainable`` are copied, all others share storage.

    Shared parameters are new frozen ``Parameter`` objects on the same storage, so neither the original's values
    nor its ``requires_grad`` flags are ever touched. Buffers are shared.
    """
    memo: dict[int, Any] = {}
    for name, param in module.named_parameters():
        if not trainable(name):
            memo[id(param)] = torch.nn.Parameter(param.detach(), requires_grad=False)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer
    copied = copy.deepcopy(module, memo)
    for name, param in copied.named_parameters():
        param.requires_grad_(trainable(name))
    return copied


def insert_identifier(prompt: str, word: str, replacement: str) -> str:
    """Replace every whole-word occurrence of ``word`` in ``prompt`` (case-insensitive) by ``replacement``."""
    return re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", lambda m: replacement, prompt, flags=re.IGNORECASE)


class ConceptToken:
    """New tokens in a copied tokenizer and text encoder whose embeddings are trainable vectors.

    The embedding rows are substituted by a forward hook on the token-embedding module, so the optimizer sees one
    parameter and every other row stays bit-identical. The vectors start at the class word's embedding (its last
    sub-token). With ``num_vectors > 1`` the tokens are ``token``, ``token_1``, ... (diffusers' multi-vector
    convention, as written by its textual-inversion script's ``--num_vectors`` and read by
    ``load_textual_inversion``): prompts name ``token`` alone and diffusers' ``maybe_convert_prompt`` expands it
    to all of them, in order.

    Attributes:
        token: The first (or only) token.
        tokens: All the tokens, in order.
        embedding: The trainable parameter: (dim,) for one vector, (num_vectors, dim) for several.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, *, token: str, init_word: str, num_vectors: int = 1):
        if not isinstance(num_vectors, int) or isinstance(num_vectors, bool) or num_vectors < 1:
            raise ValueError(f"num_vectors={num_vectors!r}: pass a positive integer (1 for one embedding).")
        self.tokens = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
        vocab = tokenizer.get_vocab()
        known = [t for t in self.tokens if t in vocab or len(tokenizer(t, add_special_tokens=False).input_ids) == 1]
        self.tokenizer = copy.deepcopy(tokenizer)
        if known or self.tokenizer.add_tokens(self.tokens) != num_vectors:
            raise ValueError(
                f"token={token!r} is already a token of the tokenizer's vocabulary ({', '.join(map(repr, known))}). "
                "Pass a new one, e.g. '<concept>'."
            )
        self.token = token
        self.token_ids = self.tokenizer.convert_tokens_to_ids(self.tokens)
        self.token_id = self.token_ids[0]
        self.text_encoder = copy_module(text_encoder)
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        embeddings = self.text_encoder.get_input_embeddings()
        embeddings.weight.requires_grad_(False)
        init_ids = self.tokenizer(init_word, add_special_tokens=False).input_ids
        with torch.no_grad():
            embeddings.weight[self.token_ids] = embeddings.weight[init_ids[-1]].clone()
        start = embeddings.weight[self.token_ids].detach().clone()  # (num_vectors, dim)
        self.embedding = torch.nn.Parameter(start[0] if num_vectors == 1 else start)
        self._ids: torch.Tensor | None = None
        embeddings.register_forward_pre_hook(self._remember_ids)
        embeddings.register_forward_hook(self._substitute)

    @property
    def vectors(self) -> torch.Tensor:
        """The embeddings as (num_vectors, dim), in the order of ``tokens``."""
        return self.embedding.reshape(len(self.tokens), -1)

    def _remember_ids(self, module, args) -> None:
        self._ids = args[0]

    def _substitute(self, module, args, output: torch.Tensor) -> torch.Tensor:
        """Put the trainable vectors at the new tokens' positions. output: (batch, tokens, dim)."""
        vectors = self.vectors.to(output.dtype)  # (num_vectors, dim)
        for row, token_id in enumerate(self.token_ids):
            output = torch.where((self._ids == token_id).unsqueeze(-1), vectors[row], output)
        return output

    def load(self, vector: torch.Tensor) -> None:
        """Set the embeddings (e.g. from a saved file): (dim,), (1, dim) or (num_vectors, dim)."""
        if vector.numel() != self.embedding.numel():
            raise ValueError(
                f"The saved embedding has {tuple(vector.shape)} values, {len(self.tokens)} x "
                f"{self.embedding.numel() // len(self.tokens)} expected: it was trained with another num_vectors "
                "or for another text encoder."
            )
        with torch.no_grad():
            self.embedding.copy_(vector.reshape(self.embedding.shape).to(self.embedding))
            self.text_encoder.get_input_embeddings().weight[self.token_ids] = self.vectors


class PersonalizationMethod(abc.ABC):
    """A way to teach a base pipeline one concept (DreamBooth, LoRA, Textual Inversion, ..., Infusion).

    Subclasses set ``name`` and ``default_learning_rate`` (the Stable Diffusion default; ``toy_learning_rate`` is
    the one tuned on the toy model), build ``self.pipe`` in ``__init__`` and implement ``trainable_parameters``,
    ``_save_weights`` and ``_load_weights``; most reuse the default loss, generation and noise prediction.

    Args:
        pipe: The base ``StableDiffusionPipeline`` (or ``InfusionPipeline``); never modified.
        class_word: The concept's class word, as in the captions (e.g. ``"cat"``).
        learning_rate: AdamW learning rate; ``default_learning_rate`` when None.
    """

    name: ClassVar[str]
    default_learning_rate: ClassVar[float]
    toy_learning_rate: ClassVar[float]
    pipeline_class: ClassVar[type | None] = None  # StableDiffusionPipeline when None

    def __init__(self, pipe: StableDiffusionPipeline, *, class_word: str, learning_rate: float | None = None):
        from diffusers import DDPMScheduler

        if not isinstance(class_word, str) or not class_word.strip():
            raise ValueError(f"class_word={class_word!r} is empty. Pass the concept's word, e.g. class_word='cat'.")
        if learning_rate is not None and not learning_rate > 0:
            raise ValueError(f"learning_rate={learning_rate!r} must be positive (or None for the default).")
        self.base_pipe = pipe
        self.class_word = class_word.strip()
        self.learning_rate = float(learning_rate if learning_rate is not None else self.default_learning_rate)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # add_noise / get_velocity
        self.pipe = self.build_pipeline()  # frozen views of the base's modules; subclasses replace what they train

    # ------------------------------------------------------------------------------------------ building
    def build_pipeline(self, pipeline_class=None, **replace: Any):
        """A pipeline of ``pipeline_class`` (StableDiffusionPipeline) on the base's components, some replaced.

        Modules not replaced are frozen views of the base's (:func:`copy_module`): same storage, no gradients.
        """
        from diffusers import StableDiffusionPipeline

        base = self.base_pipe
        parts = dict(tokenizer=base.tokenizer, scheduler=type(base.scheduler).from_config(base.scheduler.config))
        for part in ("vae", "text_encoder", "unet"):
            parts[part] = replace.pop(part) if part in replace else copy_module(getattr(base, part))
        parts.update(replace)
        pipe = (pipeline_class or self.pipeline_class or StableDiffusionPipeline)(
            **parts, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def options(self) -> dict[str, Any]:
        """The constructor options (besides pipe, class_word, learning_rate) that ``load`` must pass back."""
        return {}

    # ------------------------------------------------------------------------------------------ training
    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates."""

    def optimizer(self) -> list[dict[str, Any]] | torch.optim.Optimizer:
        """Parameter groups (or a ready optimizer) for :func:`train_method`; one group at ``learning_rate``."""
        return [{"params": self.trainable_parameters(), "lr": self.learning_rate}]

    def concept_prompt(self, prompt: str) -> str:
        """How the method invokes the concept in a prompt that names the class word (default: unchanged)."""
        return prompt

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text encodings (batch, tokens, dim) of prompts with the method's tokenizer and text encoder.

        Multi-vector tokens are expanded as the pipeline expands them (``maybe_convert_prompt``: ``"<concept>"`` ->
        ``"<concept> <concept>_1 ..."``), so training sees the prompts that generation encodes.
        """
        tokenizer = self.pipe.tokenizer
        if hasattr(self.pipe, "maybe_convert_prompt"):
            prompts = self.pipe.maybe_convert_prompt(list(prompts), tokenizer)
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        return self.pipe.text_encoder(ids.to(self.pipe.text_encoder.device))[0]

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target: ε for epsilon prediction, v = α_t ε − σ_t z_0 for v-prediction."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"scheduler prediction_type={kind!r} is not supported. Use 'epsilon' or 'v_prediction'.")

    def training_loss(
        self, latents: torch.Tensor, captions: list[str], *, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The denoising loss ``‖target − model(z_t, t, concept_prompt(y))‖²`` (latents: (B, C, h, w))."""
        prompts = [self.concept_prompt(c) for c in captions]
        return self.denoising_loss(latents, prompts, noise=noise, timesteps=timesteps)

    def denoising_loss(
        self, latents: torch.Tensor, prompts: list[str], *, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``‖target − model(z_t, t, prompts)‖²``, the prompts as given (latents: (B, C, h, w))."""
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)  # z_t
        pred = self.pipe.unet(noisy, timesteps, self.encode_prompts(prompts), return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), self.target(latents, noise, timesteps).float())

    # ------------------------------------------------------------------------------------------ using
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        batch_size: int = 16,
    ) -> list[PIL.Image.Image]:
        """Images with the concept; image i starts from ``torch.Generator().manual_seed(seed + i)``."""
        images: list[PIL.Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            images += self._call_pipe(
                [self.concept_prompt(p) for p in chunk], generator=generators,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            )  # fmt: skip
        return images

    def _call_pipe(self, prompts: list[str], **kwargs) -> list[PIL.Image.Image]:
        return self.pipe(prompts, output_type="pil", **kwargs).images

    @torch.no_grad()
    def noise_prediction(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, captions: list[str]):
        """The customized UNet's raw output on captions as given (for the latent Fisher divergence, eq. 4)."""
        return self.pipe.unet(noisy_latents, timesteps, self.encode_prompts(captions), return_dict=False)[0]

    # ------------------------------------------------------------------------------------------ storage
    @abc.abstractmethod
    def _save_weights(self, directory: Path) -> None:
        """Write the learned weights (safetensors) into ``directory``."""

    @abc.abstractmethod
    def _load_weights(self, directory: Path) -> None:
        """Read what ``_save_weights`` wrote."""

    def save(self, directory: str | Path) -> Path:
        """Write the learned weights (safetensors) and a small JSON of the method's settings; returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = {"method": self.name, "class_word": self.class_word, "options": self.options()}
        (directory / METHOD_FILE).write_text(json.dumps(info, indent=1) + "\n")
        self._save_weights(directory)
        return directory

    @classmethod
    def load(cls, pipe, directory: str | Path) -> PersonalizationMethod:
        """Rebuild a saved method on ``pipe`` (the same base model it was trained on)."""
        directory = Path(directory)
        path = directory / METHOD_FILE
        if not path.exists():
            raise FileNotFoundError(f"directory='{directory}' has no {METHOD_FILE}. Pass a folder written by save().")
        info = json.loads(path.read_text())
        if info.get("method") != cls.name:
            raise ValueError(
                f"directory='{directory}' holds method {info.get('method')!r}, not {cls.name!r}. Load it with "
                f"METHODS[{info.get('method')!r}].load(...)."
            )
        method = cls(pipe, class_word=info["class_word"], **info.get("options", {}))
        method._load_weights(directory)
        return method

    def storage_bytes(self) -> int:
        """Bytes that ``save()`` writes (everything a user would share)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- the loop
def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step (batch indices, captions, timesteps, noise): reproducible runs."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def encode_photos(pipe, pixels: torch.Tensor, *, batch_size: int = 16) -> torch.Tensor:
    """Scaled VAE latents ``E(x)·scale`` (latent_dist.mean) of photos (N, 3, H, W) in [-1, 1]."""
    vae = pipe.vae
    chunks = [vae.encode(pixels[i : i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean
              for i in range(0, len(pixels), batch_size)]  # fmt: skip
    return torch.cat(chunks) * vae.config.scaling_factor  # (N, C, h, w)


def _make_optimizer(method: PersonalizationMethod) -> torch.optim.Optimizer:
    groups = method.optimizer()
    if isinstance(groups, torch.optim.Optimizer):
        return groups
    return torch.optim.AdamW(groups, lr=method.learning_rate, weight_decay=0.0)


def train_method(
    method: PersonalizationMethod,
    data: InstanceData,
    *,
    steps: int,
    batch_size: int = 4,
    seed: int = 0,
    snapshot_at: Sequence[int] = (),
    callback: Callable[[int, PersonalizationMethod], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``method`` on ``data`` for ``steps`` AdamW steps; returns the loss of every step.

    Step ``s`` (1-based) draws photos, captions, timesteps and noise from :func:`step_generator` ``(seed, s)``.
    After step ``s`` in ``snapshot_at``, ``callback(s, method)`` runs (e.g. to evaluate at 100, 200, 400 steps).
    """
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    bad = [s for s in snapshot_at if not 1 <= s <= steps]
    if bad:
        raise ValueError(f"snapshot_at={list(snapshot_at)!r} has steps {bad} outside 1..steps={steps}.")
    latents = encode_photos(method.pipe, data.pixels)  # (photos, C, h, w)
    device, n_photos = latents.device, len(latents)
    optimizer = _make_optimizer(method)
    num_timesteps = method.noise_scheduler.config.num_train_timesteps
    losses: list[float] = []
    for step in tqdm(range(1, steps + 1), desc=f"Training {method.name}", unit="step", disable=not progress):
        g = step_generator(seed, step)
        photo = torch.randint(n_photos, (batch_size,), generator=g)
        choice = torch.rand(batch_size, generator=g)
        timesteps = torch.randint(num_timesteps, (batch_size,), generator=g)
        noise = torch.randn((batch_size, *latents.shape[1:]), generator=g)
        captions = [data.captions[i][int(c * len(data.captions[i]))] for i, c in zip(photo.tolist(), choice.tolist())]
        loss = method.training_loss(latents[photo.to(device)], captions, noise=noise.to(device, latents.dtype),
                                    timesteps=timesteps.to(device))  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if callback is not None and step in snapshot_at:
            callback(step, method)
    return losses
