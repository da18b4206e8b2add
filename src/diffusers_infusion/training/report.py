"""What a training run shows and leaves behind: validation grids (same seeds every time), the concept, its card."""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid

from ..pipeline import InfusionPipeline
from .step import InfusionResiduals

logger = logging.getLogger(__name__)


def validation_grid(pipe: InfusionPipeline, prompts: list[str], *, num_images: int, steps: int, seed: int):
    """Rows = prompts; columns = the base model's images, then the concept's, with seeds ``seed .. seed+n-1``."""
    images = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        out = pipe([prompt] * num_images, num_inference_steps=steps, generator=generators, return_base_images=True)
        images += list(out.base_images) + list(out.images)
    return make_image_grid(images, rows=len(prompts), cols=2 * num_images), images


@torch.no_grad()
def log_validation(accelerator, args: Namespace, components: dict, model, step: int) -> PIL.Image.Image:
    """Render the validation prompts with the current Δ, log them to the trackers, save the grid as a PNG."""
    residuals: InfusionResiduals = accelerator.unwrap_model(model)
    pipe = InfusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_infusion_concept(residuals.to_concept(args.class_word), "concept")
    grid, images = validation_grid(
        pipe, args.validation_prompt, num_images=args.num_validation_images,
        steps=args.num_validation_inference_steps, seed=args.seed,
    )  # fmt: skip
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(args.validation_prompt))]}, step=step)
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    logger.info("Validation grid at step %d: %s", step, folder / f"step-{step:06d}.png")
    return grid


def save_outputs(residuals: InfusionResiduals, args: Namespace, grid: PIL.Image.Image | None) -> Path:
    """Write ``infusion_concept.safetensors`` and the model card into ``--output_dir``; push if asked."""
    from huggingface_hub import HfApi

    output_dir = Path(args.output_dir)
    concept = residuals.to_concept(args.class_word, base_model=args.pretrained_model_name_or_path)
    details = [
        "| setting | value |",
        "| --- | --- |",
        *(f"| {k} | {getattr(args, k)} |" for k in ("class_word", "max_train_steps", "learning_rate",
                                                   "train_batch_size", "gradient_accumulation_steps", "resolution",
                                                   "mixed_precision", "seed")),
        f"| fidelity_rank | {getattr(args, 'fidelity_rank', 0)} |",
    ]  # fmt: skip
    if getattr(args, "fidelity_rank", 0):
        details += [f"| {k} | {getattr(args, k)} |" for k in ("fidelity_max_timestep", "fidelity_layers",
                                                              "fidelity_norm_bound", "fidelity_strength",
                                                              "fidelity_residual_lr_scale")]  # fmt: skip
    if grid is not None:
        grid.save(output_dir / "validation.png")
        details += ["", "Validation (left: base model, right: with the concept; same seeds):", "",
                    "![validation](validation.png)"]  # fmt: skip
    (output_dir / "README.md").unlink(missing_ok=True)  # the card describes this run
    repo_id = args.hub_model_id or output_dir.resolve().name
    concept.save_pretrained(output_dir, model_card_kwargs={"training_details": "\n".join(details), "repo_id": repo_id})
    logger.info("Saved the concept (%d values) to %s", concept.num_values, output_dir)
    if args.push_to_hub:
        api = HfApi(token=args.hub_token)
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id, folder_path=output_dir, commit_message="Infusion concept",
            ignore_patterns=["checkpoint-*/**", ".checkpoint-*/**", f"{args.logging_dir}/**", "validation/**",
                             ".*"],
        )  # fmt: skip
        logger.info("Pushed %s to the Hub as %s", output_dir, repo_id)
    return output_dir
