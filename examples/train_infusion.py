"""Train an Infusion concept: ``accelerate launch examples/train_infusion.py --pretrained_model_name_or_path ...``.

Flags follow diffusers' own training scripts. Only the residuals Δ are trained; the base model stays frozen.
Randomness is indexed by step (data order, timesteps, noise), so ``--resume_from_checkpoint latest`` continues to
the same Δ, bit for bit, as an uninterrupted run, and the result does not depend on the number of processes.
Checkpoints are written to a hidden folder and renamed into place, so a killed write is never resumed from, and
carry a manifest (sizes and hashes), so a checkpoint damaged later is skipped by ``latest``. A diverged run (NaN or
infinite loss or Δ) stops with an error before it writes anything non-finite.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger("train_infusion")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train an Infusion concept (only the value residuals Δ are learned).")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Base model: Hub id or folder.")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None, help="Weights variant of the base model, e.g. fp16.")
    p.add_argument("--instance_data_dir", required=True, help="Folder of the concept's photos.")
    p.add_argument("--class_word", required=True, help="The concept's class word, e.g. 'cat'.")
    p.add_argument("--instance_prompt", default=None, help="One caption for all photos (default: templates).")
    p.add_argument("--caption_templates", nargs="+", default=None, help="Templates with {class_word}.")
    p.add_argument("--mask_dir", default=None, help="Object masks with the photos' names: masked loss.")
    p.add_argument("--output_dir", default="infusion-concept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--center_crop", action="store_true")
    p.add_argument("--train_batch_size", type=int, default=4, help="Per process.")
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-2, help="The paper's 1e-2.")
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many (>= 1).")
    p.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    p.add_argument("--validation_prompt", action="append", default=None, help="Repeatable.")
    p.add_argument("--num_validation_images", type=int, default=2)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--num_validation_inference_steps", type=int, default=25)
    p.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none.")
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="Unused: photos are held in memory.")
    p.add_argument("--gradient_checkpointing", action="store_true", help="Recompute UNet activations in backward.")
    p.add_argument("--own_queries", action="store_true", help="Ablation: C attends with its own queries.")
    p.add_argument("--fidelity_rank", type=int, default=0, help="Fidelity knob rank (docs/fidelity.md); 0: off.")
    p.add_argument("--fidelity_max_timestep", type=float, default=None, help="Knob only for t below this.")
    p.add_argument("--fidelity_layers", nargs="+", default=None, help="Knob layers: 'finest' or path prefixes.")
    p.add_argument("--fidelity_norm_bound", type=float, default=None, help="Knob norm ≤ this × ‖v_obj‖.")
    p.add_argument("--fidelity_strength", type=float, default=1.0, help="Knob's default strength at inference.")
    p.add_argument("--fidelity_residual_lr_scale", type=float, default=1.0,
                   help="With the knob: Δ's rate as a fraction of --learning_rate (U, V keep it).")  # fmt: skip
    args = p.parse_args(argv)
    for flag in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "resolution",
                 "checkpointing_steps", "validation_steps"):  # fmt: skip
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    args.fidelity = fidelity_config(args, p)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        p.error(
            f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}. Leave it out to keep "
            "every checkpoint."
        )
    return args


def fidelity_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The fidelity knob's options from the ``--fidelity_*`` flags (``None`` for rank 0: the paper's method)."""
    from diffusers_infusion.errors import FidelityConfigError
    from diffusers_infusion.fidelity import FidelityConfig

    layers = args.fidelity_layers
    try:
        config = FidelityConfig(
            rank=args.fidelity_rank, max_timestep=args.fidelity_max_timestep, norm_bound=args.fidelity_norm_bound,
            layers="finest" if layers == ["finest"] else None if layers is None else tuple(layers),
            strength=args.fidelity_strength,
        )  # fmt: skip
    except FidelityConfigError as error:
        parser.error(f"--fidelity_*: {error}")
    gates = (args.fidelity_max_timestep, layers, args.fidelity_norm_bound)
    if not config.enabled and (any(v is not None for v in gates) or args.fidelity_residual_lr_scale != 1.0):
        parser.error("--fidelity_max_timestep, --fidelity_layers, --fidelity_norm_bound and "
                     "--fidelity_residual_lr_scale need --fidelity_rank > 0.")  # fmt: skip
    if not 0 < args.fidelity_residual_lr_scale <= 1:
        parser.error(f"--fidelity_residual_lr_scale must be in (0, 1], got {args.fidelity_residual_lr_scale}; "
                     "1 trains Δ at --learning_rate, as the paper does.")  # fmt: skip
    return config if config.enabled else None


def check_output_dir(output_dir: Path) -> None:
    """Fail early (before any training) when the output folder cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise SystemExit(
            f"--output_dir '{output_dir}' is not writable ({error}). Pass a folder you can write to."
        ) from None


def check_finite(loss_value: float, deltas, step: int, args: argparse.Namespace) -> None:
    """Stop a diverged run before it writes a checkpoint or a concept holding NaN or infinite values.

    ``deltas``: every trained tensor (Δ, and the fidelity knob's U and V when it has one).
    """
    if math.isfinite(loss_value) and all(bool(d.detach().isfinite().all()) for d in deltas):
        return
    what = f"the loss is {loss_value}" if not math.isfinite(loss_value) else "Δ holds NaN or infinite values"
    raise SystemExit(
        f"Training diverged at step {step}: {what}. Lower --learning_rate (now {args.learning_rate:g}); the "
        f"checkpoints already in '{args.output_dir}' were written before it and are intact."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_infusion import CONCEPT_WEIGHT_NAME, InfusionConcept
    from diffusers_infusion.tokens import class_word_token_ids
    from diffusers_infusion.training import (
        DEFAULT_TEMPLATES,
        InfusionResiduals,
        TrainingDataError,
        TrainingInputs,
        check_caption_tokens,
        find_resume_checkpoint,
        list_checkpoints,
        load_instance_data,
        training_steps,
        write_manifest,
    )
    from diffusers_infusion.training.report import log_validation, save_outputs

    # 1. Validate everything that can be wrong before anything is written.
    output_dir = Path(args.output_dir)
    try:
        data = load_instance_data(
            args.instance_data_dir, args.class_word, resolution=args.resolution, center_crop=args.center_crop,
            instance_prompt=args.instance_prompt, templates=tuple(args.caption_templates or DEFAULT_TEMPLATES),
            mask_dir=args.mask_dir,
        )  # fmt: skip
        load = dict(revision=args.revision)
        tokenizer = CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **load)
        class_word_token_ids(tokenizer, args.class_word)
        check_caption_tokens(data, tokenizer, args.class_word)  # by tokens: 'category' holds no 'cat'
    except TrainingDataError as error:
        raise SystemExit(str(error)) from None
    except ValueError as error:  # ClassWordError
        raise SystemExit(f"--class_word: {error}") from None
    resume_from = find_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    check_output_dir(output_dir)

    # 2. Accelerator, frozen base model, trainable residuals.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    set_seed(args.seed)
    text_encoder = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder", **load)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant,
                                        **load)  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                variant=args.variant, **load)  # fmt: skip
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", **load)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # dropout-free in Stable Diffusion; needed for diffusers' checkpointing
    model = InfusionResiduals.for_unet(unet, fidelity=args.fidelity, seed=args.seed)  # + the knob's U, V if asked
    components = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config),
    )  # for validation

    # 3. Precompute what is frozen: caption encodings (+ class-word positions) and the photos' latent moments.
    inputs = TrainingInputs.precompute(data, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                       class_word=args.class_word, device=accelerator.device, dtype=weight_dtype)

    # 4. Optimizer and learning-rate schedule (counted in optimizer steps on every process, as diffusers does).
    groups = model.param_groups(args.learning_rate, residual_lr_scale=args.fidelity_residual_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    # 5. Checkpoints hold Δ as a concept file (loadable with load_infusion_concept) and the optimizer state.
    def save_model_hook(models, weights, folder):
        if accelerator.is_main_process:
            for m in models:
                accelerator.unwrap_model(m).to_concept(args.class_word, base_model=args.pretrained_model_name_or_path)\
                    ._save_pretrained(Path(folder))  # fmt: skip
        weights.clear()

    def load_model_hook(models, folder):
        concept = InfusionConcept.from_file(Path(folder) / CONCEPT_WEIGHT_NAME)
        while models:
            accelerator.unwrap_model(models.pop()).load_concept(concept)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    def save_checkpoint(step: int) -> None:
        final, partial = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(partial)  # sizes and hashes: a checkpoint damaged later is found before resuming
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)  # the checkpoint appears whole, or not at all
            old = list_checkpoints(output_dir)
            for stale in old[: max(0, len(old) - (args.checkpoints_total_limit or len(old)))]:
                shutil.rmtree(stale)
            logger.info("Saved %s", final)
        accelerator.wait_for_everyone()

    first_step = 0
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except (OSError, RuntimeError, ValueError, EOFError) as error:  # a checkpoint from before manifests
            raise SystemExit(
                f"--resume_from_checkpoint: cannot load '{resume_from}' ({type(error).__name__}: {error}). Pass an "
                "earlier checkpoint, or delete this one and pass 'latest'."
            ) from None
        first_step = int(resume_from.name.split("-")[-1])
        logger.info("Resumed from %s at step %d.", resume_from, first_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("infusion", config={k: v for k, v in vars(args).items() if not isinstance(v, list)})

    # 6. The loop (diffusers_infusion.training.loop): randomness indexed by micro step, so a resume is exact.
    grid = None
    steps = training_steps(
        accelerator, model, optimizer, lr_scheduler, unet, noise_scheduler, inputs,
        max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size, seed=args.seed,
        first_step=first_step, gradient_accumulation_steps=args.gradient_accumulation_steps,
        replace_queries=not args.own_queries, weight_dtype=weight_dtype,
    )  # fmt: skip
    for step, loss_value in steps:
        check_finite(loss_value, list(accelerator.unwrap_model(model).parameters()), step, args)
        accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
        if step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            save_checkpoint(step)
        if args.validation_prompt and step % args.validation_steps == 0 and accelerator.is_main_process:
            grid = log_validation(accelerator, args, components, model, step)

    # 7. The concept, its model card and a sample grid; optionally on the Hub (without checkpoints).
    accelerator.wait_for_everyone()
    deltas = torch.cat([d.detach().flatten() for d in accelerator.unwrap_model(model).parameters()])  # Δ (+ U, V)
    gathered = accelerator.gather(deltas[None])  # (processes, values): every process must hold the same Δ
    if accelerator.is_main_process:
        if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
            raise RuntimeError("The processes ended with different residuals; the run is not synchronized.")
        logger.info("All %d processes hold the same Δ (%d values).", accelerator.num_processes, deltas.numel())
        if args.validation_prompt and args.max_train_steps % args.validation_steps:
            grid = log_validation(accelerator, args, components, model, args.max_train_steps)
        save_outputs(accelerator.unwrap_model(model), args, grid)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Everything is written and the process group is destroyed. Leave now: with gloo, a worker's interpreter
        # shutdown occasionally hangs in torch's exit handlers once its peer has gone (seen with torch 2.13, CPU).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
