"""Render prompts × concepts × strengths × seeds on many processes (``accelerate launch``, resumable).

    accelerate launch --num_processes 8 examples/generate_infusion.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --concept my_cat=user/my-cat --concept my_dog=./my_dog \\
        --jobs jobs.jsonl --output_dir out/gallery

or a prompt file × a grid: ``--prompts prompts.txt --grid_concepts my_cat my_dog --strengths 0.5 1.0 --seeds 0 1 2``.

Jobs that differ only in their concepts share one F stream (``infusion_variants``). The batches are split between
processes (``PartialState().split_between_processes``); each process writes its images and one manifest line per
image (job fields, model, the concept files' sha256, the image file). A rerun skips the finished jobs; a killed run
loses at most the batch in flight. See ``docs/generation.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from tqdm.auto import tqdm

from diffusers_infusion import CONCEPT_WEIGHT_NAME, ConceptNotFoundError, InfusionError, InfusionPipeline, __version__
from diffusers_infusion.batch_generation import (
    ManifestWriter,
    finished_jobs,
    merge_manifests,
    plan_batches,
    render_batch,
    sha256,
)
from diffusers_infusion.jobs import JobFileError, grid_jobs, read_jobs, read_prompt_file

logger = logging.getLogger("generate_infusion")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Base model: Hub id or folder.")
    p.add_argument("--revision", default=None, help="Hub revision of the base model.")
    p.add_argument("--concept", action="append", default=[], metavar="NAME=PATH_OR_HUB_ID",
                   help="Declare a concept (repeatable): a concept folder, .safetensors file or Hub repo id.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jobs", type=Path, help="A .jsonl or .csv file of jobs (one image each).")
    src.add_argument("--prompts", type=Path, help="A text file of prompts, one per line, rendered over the grid.")
    p.add_argument("--grid_concepts", nargs="+", default=None, help="Grid: concept names (default: all declared).")
    p.add_argument("--strengths", nargs="+", type=float, default=[1.0], help="Grid: strengths.")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="Grid: seeds.")
    p.add_argument("--include_base", action="store_true", help="Grid: also the base image of each prompt and seed.")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--batch_size", type=int, default=4, help="Prompts per pipeline call (each with its variants).")
    p.add_argument("--steps", type=int, default=50, help="Default denoising steps of a job.")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Default guidance scale of a job.")
    p.add_argument("--height", type=int, default=None, help="Default image height (the model's when unset).")
    p.add_argument("--width", type=int, default=None, help="Default image width (the model's when unset).")
    p.add_argument("--negative_prompt", default="", help="Default negative prompt of a job.")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--cpu", action="store_true", help="Run on CPU processes (gloo) even where an accelerator is.")
    return p.parse_args(argv)  # fmt: skip


def resolve_concept(name: str, source: str) -> Path:
    """The concept file of a file path, a folder or a Hub repo id (downloaded into the cache)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir() and (path / CONCEPT_WEIGHT_NAME).is_file():
        return path / CONCEPT_WEIGHT_NAME
    try:
        return Path(hf_hub_download(source, CONCEPT_WEIGHT_NAME))
    except (HFValidationError, HfHubHTTPError, OSError, ValueError) as error:
        raise ConceptNotFoundError(
            f"--concept {name}={source}: no {CONCEPT_WEIGHT_NAME} there; it is neither a concept file, a folder "
            f"holding one, nor a reachable Hub repo ({type(error).__name__}). Check the path or repo id."
        ) from error


def load_jobs(args, concept_names: list[str]):
    defaults = {"steps": args.steps, "guidance_scale": args.guidance_scale, "height": args.height,
                "width": args.width, "negative_prompt": args.negative_prompt}  # fmt: skip
    if args.jobs is not None:
        return read_jobs(args.jobs, defaults=defaults, known_concepts=concept_names)
    names = args.grid_concepts if args.grid_concepts is not None else concept_names
    unknown = [n for n in names if n not in concept_names]
    if unknown:
        raise JobFileError(
            f"--grid_concepts names {unknown}, not declared with --concept (declared: {concept_names}). "
            "Declare each with --concept NAME=PATH_OR_HUB_ID."
        )
    prompts = [(f"{args.prompts}:{n}", text) for n, text in read_prompt_file(args.prompts)]
    return grid_jobs(prompts, concepts=names, strengths=args.strengths, seeds=args.seeds, defaults=defaults,
                     include_base=args.include_base)  # fmt: skip


def use_cpu(flag: bool) -> bool:
    """CPU processes (gloo) when asked (``--cpu``, ``ACCELERATE_USE_CPU``) or when there is no accelerator."""
    if flag or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def main(argv=None) -> int:
    args = parse_args(argv)
    state = PartialState(cpu=use_cpu(args.cpu))
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING, format="%(message)s")

    # 1. Concepts and jobs: every bad line is reported before anything is loaded or rendered.
    concepts = {}
    for item in args.concept:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise SystemExit(f"--concept {item!r} must be NAME=PATH_OR_HUB_ID, e.g. --concept my_cat=./my_cat")
        concepts[name] = source
    try:
        jobs = load_jobs(args, list(concepts))
        files = {name: resolve_concept(name, source) for name, source in concepts.items()}
    except InfusionError as error:
        if state.is_main_process:
            logger.error("%s", error)
        return 2
    hashes = {name: sha256(path) for name, path in files.items()}

    # 2. Ids (the job's fields, the model and its concept files' hashes), batches, the finished jobs.
    context = {"model": args.pretrained_model_name_or_path, "revision": args.revision, "dtype": args.dtype}
    ids, records = {}, {}
    for index, job in enumerate(jobs):
        used = {n: {"source": concepts[n], "sha256": hashes[n]} for n in sorted(job.concepts)}
        ids[index] = job.job_id({**context, "concept_sha256": {n: u["sha256"] for n, u in used.items()}})
        records.setdefault(ids[index], {"job_id": ids[index], "index": index, "source": job.source, **job.fields(),
                                        **context, "concept_files": used, "library_version": __version__})  # fmt: skip
    batches = plan_batches(jobs, batch_size=args.batch_size)
    if state.is_main_process:
        for stale in [*args.output_dir.glob("images/.*.tmp"), *args.output_dir.glob(".manifest.*.tmp")]:
            stale.unlink(missing_ok=True)  # partial writes of a killed run
    done = finished_jobs(args.output_dir)
    pending = [b for b in batches if any(ids[i] not in done for i, _ in b.jobs)]
    state.wait_for_everyone()  # every process has read the same manifest before any writes to it

    # 3. Render this process's share, batch by batch; each batch's images and lines are written as it finishes.
    pipe = InfusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                            dtype=DTYPES[args.dtype]).to(state.device)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    for name, path in files.items():
        pipe.load_infusion_concept(path, name)
    writer = ManifestWriter(args.output_dir, process_index=state.process_index)
    rendered, start = 0, time.perf_counter()
    with state.split_between_processes(pending) as mine:
        bar = tqdm(total=sum(len(b) for b in mine), desc=f"images (process 0 of {state.num_processes})",
                   disable=not state.is_main_process)  # fmt: skip
        for batch in mine:
            results = [(ids[i], job, image) for i, job, image in render_batch(pipe, batch) if ids[i] not in done]
            writer.write(results, records)
            rendered += len(results)
            bar.update(len(batch))
        bar.close()
    seconds = time.perf_counter() - start

    # 4. Summary, and the ordered manifest.
    stats = gather_object([{"process": state.process_index, "rendered": rendered, "seconds": seconds}])
    state.wait_for_everyone()
    if state.is_main_process:
        total = sum(s["rendered"] for s in stats)
        wall = max(s["seconds"] for s in stats)
        summary = {
            "jobs": len(records), "already_done": sum(i in done for i in records), "rendered": total,
            "processes": state.num_processes, "seconds": round(wall, 3),
            "seconds_per_image": round(wall / total, 4) if total else None,
            "images_per_second": round(total / wall, 4) if total and wall else None, "per_process": stats,
            "manifest": str(merge_manifests(args.output_dir, [ids[i] for i in sorted(ids)])),
        }  # fmt: skip
        (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("%d jobs: %d already done, %d rendered by %d process(es) in %.1f s (%s s per image, %s images/s). "
                    "Manifest: %s", summary["jobs"], summary["already_done"], total, state.num_processes, wall,
                    summary["seconds_per_image"], summary["images_per_second"], summary["manifest"])  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
