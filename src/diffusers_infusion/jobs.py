"""Generation jobs for batch rendering: read from a JSONL or CSV file, or a prompt file × a grid; checked line by line.

A job is one image: a prompt (and negative prompt), the concepts it receives with their strengths, a seed, the number
of steps, the guidance scale and the size. Concepts are referred to by name; the names are declared by the caller
(``--concept my_cat=path/to/concept`` in ``examples/generate_infusion.py``). Every bad line is reported with its line
number, all at once, before anything is rendered.

JSONL, one job per line (blank lines and lines starting with ``#`` are skipped)::

    {"prompt": "a photo of a cat on the beach", "concepts": {"my_cat": 1.0}, "seed": 3, "steps": 30}

CSV, a header row then one job per row; ``concepts`` is ``name:strength`` pairs joined by ``;`` (or a JSON object)::

    prompt,negative_prompt,concepts,seed,steps,guidance_scale,height,width
    a photo of a cat on the beach,,my_cat:1.0;my_dog:0.5,3,30,7.5,512,512
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InfusionError

__all__ = ["FIELDS", "GenerationJob", "JobFileError", "grid_jobs", "read_jobs", "read_prompt_file"]

FIELDS = ("prompt", "negative_prompt", "concepts", "seed", "steps", "guidance_scale", "height", "width")
"""The fields of a job line; all but ``prompt`` are optional (defaults come from the caller)."""


class JobFileError(InfusionError, ValueError):
    """A jobs file (or prompt file) has bad lines; the message names each one with its line number."""


@dataclass(frozen=True)
class GenerationJob:
    """One image to render.

    Args:
        prompt: The prompt.
        concepts: Concept name -> strength (an empty dict renders the base model's image).
        seed: Seed of the initial noise (a CPU generator, so the noise is the same on every device).
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
        negative_prompt: Negative prompt ("" for none, as the plain pipeline does).
        height: Image height in pixels (None: the model's default).
        width: Image width in pixels (None: the model's default).
        source: Where the job was read from, e.g. ``jobs.jsonl:12`` (for messages and the manifest).
    """

    prompt: str
    concepts: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    source: str = ""

    def fields(self) -> dict[str, Any]:
        """The job's fields (everything that decides the image), as written to the manifest."""
        out = asdict(self)
        out.pop("source")
        out["concepts"] = dict(sorted(self.concepts.items()))
        return out

    @property
    def shared_stream_key(self) -> tuple:
        """Jobs with the same key share one F stream: they differ only in their concepts."""
        return (self.prompt, self.negative_prompt, self.seed, self.steps, self.guidance_scale, self.height, self.width)

    def job_id(self, context: Mapping[str, Any] | None = None) -> str:
        """A stable id: the hash of the job's fields and ``context`` (model, concept files' hashes, ...)."""
        payload = json.dumps({"job": self.fields(), "context": dict(context or {})}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------------ field checks
def _check_int(name: str, value: Any, *, minimum: int, multiple_of: int = 1) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value % multiple_of:
        extra = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
        raise ValueError(f"'{name}' must be an integer >= {minimum}{extra}, got {value!r}")
    return value


def _check_number(name: str, value: Any) -> float:
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"'{name}' must be a number, got {value!r}")
    return number


def _parse_concepts(value: Any, known: Sequence[str] | None) -> dict[str, float]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            pairs = [p.strip() for p in text.split(";") if p.strip()]
            if not all(p.count(":") == 1 for p in pairs):
                raise ValueError(f"'concepts' must look like 'my_cat:1.0;my_dog:0.5' or a JSON object, got {text!r}")
            value = {name.strip(): strength for name, strength in (p.split(":") for p in pairs)}
    if not isinstance(value, Mapping):
        raise ValueError(f"'concepts' must be an object name -> strength, got {value!r}")
    concepts = {str(name): _check_number(f"concepts.{name}", s) for name, s in value.items()}
    unknown = [n for n in concepts if known is not None and n not in known]
    if unknown:
        raise ValueError(
            f"concept {unknown[0]!r} is not declared (declared: {list(known)}); declare it with "
            f"--concept {unknown[0]}=PATH_OR_HUB_ID"
        )
    return concepts


def job_from_record(record: Mapping[str, Any], defaults: Mapping[str, Any], *, known_concepts=None,
                    source: str = "") -> GenerationJob:  # fmt: skip
    """Check one record (a JSON object or a CSV row) and fill in the ``defaults``; raises ``ValueError``."""
    unknown = [k for k in record if k not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    values = {**defaults, **{k: v for k, v in record.items() if v is not None and v != ""}}
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"'prompt' must be a non-empty string, got {prompt!r}")
    negative = values.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise ValueError(f"'negative_prompt' must be a string, got {negative!r}")
    size = {
        k: None if values.get(k) is None else _check_int(k, values[k], minimum=8, multiple_of=8)
        for k in ("height", "width")
    }
    return GenerationJob(
        prompt=prompt,
        negative_prompt=negative,
        concepts=_parse_concepts(values.get("concepts"), known_concepts),
        seed=_check_int("seed", values.get("seed", 0), minimum=0),
        steps=_check_int("steps", values.get("steps", 50), minimum=1),
        guidance_scale=_check_number("guidance_scale", values.get("guidance_scale", 7.5)),
        source=source,
        **size,
    )


def _raise_bad_lines(path: Path, errors: list[str]) -> None:
    if errors:
        shown = "\n".join(f"  {e}" for e in errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
        raise JobFileError(
            f"{len(errors)} bad line(s) in '{path}':\n{shown}\nFix these lines (fields: {', '.join(FIELDS)}) and "
            "run again; nothing was rendered."
        )


def read_jobs(path: str | Path, *, defaults: Mapping[str, Any] | None = None,
              known_concepts: Sequence[str] | None = None) -> list[GenerationJob]:  # fmt: skip
    """Read a ``.jsonl`` or ``.csv`` jobs file; raise ``JobFileError`` naming every bad line.

    Args:
        path: The jobs file (``.jsonl``/``.json`` lines, or ``.csv`` with a header row).
        defaults: Values for the fields a line leaves out (e.g. ``{"steps": 30}``).
        known_concepts: The declared concept names; a line naming another one is a bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise JobFileError(f"Jobs file '{path}' does not exist. Pass a .jsonl or .csv file of jobs.")
    defaults, jobs, errors = dict(defaults or {}), [], []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "prompt" not in reader.fieldnames:
                raise JobFileError(f"'{path}' line 1: the CSV header must name a 'prompt' column (fields: {FIELDS}).")
            for row in reader:
                line = reader.line_num
                try:
                    if None in row:
                        cells = len(reader.fieldnames) + len(row[None])
                        raise ValueError(f"{cells} cells for {len(reader.fieldnames)} columns (quote commas)")
                    jobs.append(job_from_record(row, defaults, known_concepts=known_concepts, source=f"{path}:{line}"))
                except (ValueError, TypeError) as error:
                    errors.append(f"line {line}: {error}")
    elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError(f"a job line must be a JSON object, got {type(record).__name__}")
                jobs.append(job_from_record(record, defaults, known_concepts=known_concepts, source=f"{path}:{line}"))
            except json.JSONDecodeError as error:
                errors.append(f"line {line}: not valid JSON ({error.msg} at column {error.colno})")
            except (ValueError, TypeError) as error:
                errors.append(f"line {line}: {error}")
    else:
        raise JobFileError(f"Jobs file '{path}' must end in .jsonl or .csv (got '{path.suffix}').")
    _raise_bad_lines(path, errors)
    if not jobs:
        raise JobFileError(f"'{path}' holds no jobs. Write one JSON object (or CSV row) per image.")
    return jobs


def read_prompt_file(path: str | Path) -> list[tuple[int, str]]:
    """``(line number, prompt)`` for each non-empty line of a text file (lines starting with ``#`` are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise JobFileError(f"Prompt file '{path}' does not exist. Pass a text file with one prompt per line.")
    prompts = [(n, t.strip()) for n, t in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
    prompts = [(n, t) for n, t in prompts if t and not t.startswith("#")]
    if not prompts:
        raise JobFileError(f"Prompt file '{path}' holds no prompts. Write one prompt per line.")
    return prompts


def grid_jobs(prompts: Iterable[tuple[str, str]], *, concepts: Sequence[str], strengths: Sequence[float],
              seeds: Sequence[int], defaults: Mapping[str, Any] | None = None,
              include_base: bool = False) -> list[GenerationJob]:  # fmt: skip
    """Prompts × seeds × concepts × strengths, one concept per job (the variants of a prompt and seed share F).

    Args:
        prompts: ``(source, prompt)`` pairs, e.g. from ``read_prompt_file``.
        concepts: Concept names; each job gets one of them.
        strengths: Strengths to render each concept at.
        seeds: Seeds.
        defaults: The other fields (steps, guidance_scale, height, width, negative_prompt).
        include_base: Also one job per prompt and seed with no concept (the base model's image).
    """
    defaults = dict(defaults or {})
    variants = ([{}] if include_base else []) + [{c: float(s)} for c in concepts for s in strengths]
    if not variants:
        raise JobFileError("The grid is empty: pass at least one concept and one strength (or include the base).")
    jobs = []
    for source, prompt in prompts:
        for seed in seeds:
            for variant in variants:
                record = {**defaults, "prompt": prompt, "seed": seed, "concepts": variant}
                try:
                    jobs.append(job_from_record(record, {}, source=str(source)))
                except ValueError as error:
                    raise JobFileError(f"{source}: {error}.") from error
    return jobs
