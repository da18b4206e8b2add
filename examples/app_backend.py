"""What the page does, as plain Python: generate, load / list / unload / save concepts, train one.

``examples/app.py`` wires these methods to Gradio; tests call them directly. Every method checks its input first
and changes nothing when it fails (the library's own errors, which name the argument, the value and the fix).
Training drives the library's loop (:func:`diffusers_infusion.training.training_steps`), the one
``examples/train_infusion.py`` drives: same settings, same seed, same Δ.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from diffusers_infusion import CONCEPT_WEIGHT_NAME, InfusionConcept, InfusionError, InfusionPipeline
from diffusers_infusion.tokens import class_word_token_ids
from diffusers_infusion.training import (
    InfusionResiduals,
    TrainingInputs,
    load_instance_data,
    training_steps,
)
from diffusers_infusion.training.data import IMAGE_SUFFIXES
from diffusers_infusion.training.report import validation_grid

logger = logging.getLogger("app")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_SEED = 2**31 - 1


class AppInputError(InfusionError, ValueError):
    """Bad input to the page that the library never sees (no photos, a bad name): says what to change."""


@dataclass
class TrainingUpdate:
    """One report of a training run: the step, its loss, and (every N steps, and at the end) the validation grid."""

    step: int
    total: int
    loss: float
    validation: PIL.Image.Image | None = None
    concept_file: Path | None = None  # set on the last update, once the concept is saved and loaded
    name: str | None = None


class InfusionApp:
    """One base pipeline, loaded once, and the concepts loaded into it.

    Args:
        pipe: An ``InfusionPipeline``.
        model_id: Name of the base model (recorded in trained concepts and shown in the page).
        workdir: Where uploaded photos and trained / saved concept files go (a temporary folder when None).
    """

    def __init__(self, pipe: InfusionPipeline, *, model_id: str, workdir: str | Path | None = None):
        self.pipe = pipe
        self.model_id = model_id
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="infusion-app-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)  # only Δ is ever trained

    @classmethod
    def from_pretrained(cls, model: str | Path, *, device: str | None = None, **kwargs) -> InfusionApp:
        """Load the base model (a Hub repo id or a folder) once, on ``device`` (CUDA when available)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = InfusionPipeline.from_pretrained(str(model), dtype=dtype).to(device)
        return cls(pipe, model_id=str(model), **kwargs)

    @property
    def resolution(self) -> int:
        """The base model's image side (512 for SD 1.5, 64 for the toy model)."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    # ------------------------------------------------------------------------------------------- concepts
    def concepts(self) -> list[list]:
        """One row per loaded concept: name, class word, number of values, base model it was made for."""
        concepts = self.pipe.infusion_concepts
        return [[name, c.class_word, c.num_values, c.base_model or ""] for name, c in concepts.items()]

    def _check_new_name(self, name: str) -> str:
        name = (name or "").strip()
        if not NAME_PATTERN.match(name):
            raise AppInputError(
                f"Concept name {name!r} is not usable: use 1-64 letters, digits, '_', '-' or '.', e.g. 'my_cat'."
            )
        if name in self.pipe.get_list_infusion_concepts():
            raise AppInputError(f"A concept named {name!r} is already loaded. Pick another name, or unload it first.")
        return name

    def _default_name(self, stem: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "concept"
        taken, name, index = set(self.pipe.get_list_infusion_concepts()), stem[:60], 1
        while name in taken:
            index += 1
            name = f"{stem[:60]}_{index}"
        return name

    def load_concept(
        self, source: str | Path | None = None, *, upload: str | Path | None = None, name: str | None = None,
        class_word: str | None = None,
    ) -> str:  # fmt: skip
        """Load a concept from a Hub repo id, a local folder or ``.safetensors`` file, or an uploaded file.

        Returns the name it was loaded under (``name``, or one made from the source). Nothing is loaded when the
        file is missing, pickled, corrupt, or made for another base model (the library refuses it first).
        """
        source, upload = (str(source).strip() if source else ""), (str(upload) if upload else "")
        if bool(source) == bool(upload):
            raise AppInputError(
                "Give exactly one concept source: a Hub repo id or local path, or an uploaded .safetensors file."
            )
        origin = upload or source
        name = self._check_new_name(name) if name else self._default_name(Path(origin.rstrip("/")).stem)
        if upload:
            concept = InfusionConcept.from_file(upload, class_word=class_word or None)
        else:
            concept = InfusionConcept.from_pretrained(source, class_word=class_word or None)
        return self.pipe.load_infusion_concept(concept, name)

    def unload_concept(self, name: str) -> None:
        """Unload one concept by name (the library says which names are loaded when it is not)."""
        self.pipe.unload_infusion_concept(name)

    def concept_file(self, name: str) -> Path:
        """Save a loaded concept (file and model card) under the work folder; returns the ``.safetensors`` path."""
        if name not in self.pipe.get_list_infusion_concepts():
            raise AppInputError(
                f"No concept named {name!r} is loaded (loaded: {self.pipe.get_list_infusion_concepts()}). Pick one "
                "of those, or load it first."
            )
        folder = self.workdir / "concepts" / name
        self.pipe.infusion_concepts[name].save_pretrained(folder)
        return folder / CONCEPT_WEIGHT_NAME

    # ------------------------------------------------------------------------------------------- generate
    def generate(
        self, prompt: str, *, negative_prompt: str = "", steps: int = 25, guidance_scale: float = 7.5,
        seed: int = 0, num_images: int = 1, strengths: dict[str, float] | None = None,
    ) -> tuple[list[PIL.Image.Image], list[PIL.Image.Image]]:  # fmt: skip
        """The base model's images and the concepts' images, same seeds, one call (``return_base_images``).

        Args:
            strengths: Concept name -> strength of the concepts to use (others are off); all loaded ones at 1.0
                when None.
        """
        if not prompt or not prompt.strip():
            raise AppInputError("The prompt is empty. Type a prompt with a concept's class word, e.g. 'a cat'.")
        if strengths is None:
            strengths = dict.fromkeys(self.pipe.get_list_infusion_concepts(), 1.0)
        self.pipe.set_infusion_concepts(list(strengths), list(strengths.values()))
        n = int(num_images)
        generators = [torch.Generator().manual_seed(int(seed) + i) for i in range(n)]
        out = self.pipe(
            [prompt] * n, negative_prompt=[negative_prompt] * n if negative_prompt else None,
            num_inference_steps=int(steps), guidance_scale=float(guidance_scale), generator=generators,
            return_base_images=True,
        )  # fmt: skip
        return list(out.base_images), list(out.images)

    @staticmethod
    def random_seed() -> int:
        return random.randint(0, MAX_SEED)

    # ------------------------------------------------------------------------------------------- train
    def _photo_folder(self, photos: Sequence[str | Path]) -> Path:
        if not photos:
            raise AppInputError("No photos. Upload 3-10 photos of your concept (.png, .jpg, .jpeg, .webp, .bmp).")
        odd = [Path(p).name for p in photos if Path(p).suffix.lower() not in IMAGE_SUFFIXES]
        if odd:
            raise AppInputError(
                f"Not image files: {odd}. Upload photos as {', '.join(IMAGE_SUFFIXES)} files, or remove those."
            )
        folder = Path(tempfile.mkdtemp(prefix="photos-", dir=self.workdir))
        for index, photo in enumerate(photos):
            shutil.copyfile(photo, folder / f"{index:03d}{Path(photo).suffix.lower()}")
        return folder

    def train(
        self, photos: Sequence[str | Path], class_word: str, *, steps: int = 300, learning_rate: float = 1e-2,
        name: str | None = None, seed: int = 0, batch_size: int = 4, validation_prompt: str | None = None,
        validation_steps: int = 50, validation_inference_steps: int = 25,
    ) -> Iterator[TrainingUpdate]:  # fmt: skip
        """Train a concept on uploaded photos, yielding an update after every step; at the end, save and load it.

        Everything is checked before the first step (photos readable, class word known to the tokenizer, name
        free); a failure leaves nothing loaded. The last update carries the saved ``.safetensors`` file.
        """
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        # 1. Check everything first.
        class_word = (class_word or "").strip()
        class_word_token_ids(self.pipe.tokenizer, class_word)  # ClassWordError for a word it cannot place
        name = self._check_new_name(name) if name else self._default_name(f"my_{class_word}")
        for value, label in ((steps, "steps"), (batch_size, "batch_size"), (validation_steps, "validation_steps")):
            if int(value) < 1:
                raise AppInputError(f"{label}={value} must be at least 1.")
        if not float(learning_rate) > 0:
            raise AppInputError(f"learning_rate={learning_rate} must be positive (the paper uses 1e-2).")
        if len(photos) < 3 or len(photos) > 10:
            logger.warning("%d photos: 3-10 work best.", len(photos))
        folder = self._photo_folder(photos)
        data = load_instance_data(folder, class_word, resolution=self.resolution, center_crop=True)
        prompt = validation_prompt or f"a photo of a {class_word}"

        # 2. The frozen model's inputs, the residuals, the optimizer: as examples/train_infusion.py sets them up.
        pipe, steps = self.pipe, int(steps)
        half = pipe.unet.dtype == torch.float16  # fp16 on CUDA: autocast, as the script with --mixed_precision fp16
        accelerator = Accelerator(mixed_precision="fp16" if half else None)
        inputs = TrainingInputs.precompute(data, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                           vae=pipe.vae, class_word=class_word, device=pipe.device,
                                           dtype=pipe.unet.dtype)  # fmt: skip
        model = InfusionResiduals.for_unet(pipe.unet).to(pipe.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(learning_rate), weight_decay=0.0)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        viewer = InfusionPipeline(**pipe.components)  # shares the weights; its own (empty) set of concepts
        viewer.set_progress_bar_config(disable=True)

        def validate() -> PIL.Image.Image:
            viewer.unload_infusion_concept()
            viewer.load_infusion_concept(accelerator.unwrap_model(model).to_concept(class_word), "training")
            return validation_grid(viewer, [prompt], num_images=1, steps=validation_inference_steps, seed=seed)[0]

        # 3. The library's loop.
        loop = training_steps(
            accelerator, model, optimizer, lr_scheduler, pipe.unet, noise_scheduler, inputs,
            max_train_steps=steps, train_batch_size=int(batch_size), seed=int(seed), weight_dtype=pipe.unet.dtype,
        )  # fmt: skip
        for step, loss in loop:
            image = validate() if step % int(validation_steps) == 0 or step == steps else None
            yield TrainingUpdate(step, steps, loss, validation=image)

        # 4. Save (never lose the run), then load.
        concept = accelerator.unwrap_model(model).to_concept(class_word, base_model=self.model_id)
        out = self.workdir / "trained" / name
        concept.save_pretrained(out)
        pipe.load_infusion_concept(concept, name)
        logger.info("Trained %s (%d steps) -> %s", name, steps, out)
        yield TrainingUpdate(steps, steps, loss, validation=image, concept_file=out / CONCEPT_WEIGHT_NAME, name=name)
