"""The overfitting benchmark's report (``benchmarks/overfitting.py``): tables, curves, trade-off plot, grids.

Reads the rows that ``overfitting.py`` appended to ``<output-dir>/results.jsonl`` (and to each ``--merge`` dir) and
writes ``overfitting.md`` (mean ± std over concepts at 400 steps and at the last step, then each metric by step),
``overfitting.png`` (curves), ``tradeoff.png`` (similarity against Wasserstein and against text alignment) and one
``grid_<concept>.png`` per concept (rows: methods, columns: steps; Fig. 11).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_rows(path: Path) -> list[dict]:
    """The rows of one ``results.jsonl`` (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def report(args: argparse.Namespace, *, method_order: tuple[str, ...]) -> None:
    """Markdown tables, curves and grids from ``results.jsonl`` of ``args.output_dir`` and ``args.merge``.

    Rows are listed in ``method_order`` (the benchmark's, with any diagnostic rows registered after it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out = args.output_dir
    # one row per (concept, method, step): a concept split over several dirs has its base rows in each
    merged = [r for d in (out, *args.merge) for r in read_rows(d / "results.jsonl")]
    rows = list({(r["concept"], r["method"], r["step"]): r for r in merged}.values())
    if not rows:
        raise SystemExit(f"{out / 'results.jsonl'} has no results yet. Run without --report-only first.")
    out.mkdir(parents=True, exist_ok=True)  # a report over --merge dirs may go to a new one
    methods = [m for m in method_order if any(r["method"] == m for r in rows)]
    steps = sorted({r["step"] for r in rows})
    concepts = sorted({r["concept"] for r in rows})
    metrics = ("wasserstein", "fisher", "text_alignment", "concept_similarity")

    def stat(method: str, step: int, key: str) -> tuple[float, float, int]:
        vals = [r[key] for r in rows if r["method"] == method and r["step"] == step]
        return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else (float("nan"), 0.0, 0)

    lines = [f"Concepts: {', '.join(concepts)}; mean ± std over concepts.", "", *_ceiling_lines(concepts), ""]
    last = steps[-1]
    for at in [s for s in (400, last) if s in steps]:  # a short and the longest training (Table 1's analogue)
        lines += [f"### At {at} steps" + (" (Table 1's analogue)" if at == last else ""), "", TABLE_HEAD,
                  "|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        for m in [m for m in methods if stat(m, at, "wasserstein")[2]]:  # rows run to that step
            cells = [f"{stat(m, at, k)[0]:.3f} ± {stat(m, at, k)[1]:.3f}" for k in metrics[2:] + metrics[:2]]
            size, n = stat(m, at, "storage_bytes")[0], stat(m, at, "storage_bytes")[2]
            lines.append(f"| {m} | {' | '.join(cells)} | {_bytes(size)} | {n} |")
        lines.append("")
    for key in metrics:
        lines += ["", f"### {key.replace('_', ' ')} by training steps", "",
                  "| method | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "--:|" * len(steps)]  # fmt: skip
        for m in methods:
            cells = (f"{stat(m, s, key)[0]:.3f}" if stat(m, s, key)[2] else "—" for s in steps)  # — : not run
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "overfitting.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for ax, key in zip(axes, metrics):
        palette = plt.get_cmap("tab20").colors  # one color per method (tab10 repeats after ten)
        for i, m in enumerate(methods):
            ran = [s for s in steps if stat(m, s, key)[2]]  # a method may have been measured at fewer steps
            mean = np.array([stat(m, s, key)[0] for s in ran])
            std = np.array([stat(m, s, key)[1] for s in ran])
            knob = m.startswith("infusion_fidelity")
            style = (
                dict(lw=2.5, color="black")
                if m == "infusion"
                else dict(lw=1.2, color=palette[2 * i % 20 + i // 10 % 2], ls="--" if knob else "-")
            )
            ax.plot(ran, mean, marker="o", ms=3, label=m, **style)
            ax.fill_between(ran, mean - std, mean + std, alpha=0.12, color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title(key.replace("_", " "))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(out / "overfitting.png", dpi=110)
    plt.close(fig)
    _tradeoff_plot(out / "tradeoff.png", methods, [s for s in (400, last) if s in steps], stat)

    for concept in concepts:

        def cell(name: str) -> Path:
            """The cell image from whichever output dir has it (a concept may be split over several)."""
            paths = [d / "cells" / name for d in (out, *args.merge)]
            return next((p for p in paths if p.exists()), paths[0])

        base = [cell(f"{concept}_base_0_{i}.png") for i in range(2)]
        trained = [m for m in methods if not m.startswith("base")]
        grid = Image.new("RGB", (66 * (2 * len(steps) + 2) + 150, 66 * (len(trained) + 1)), "white")
        from PIL import ImageDraw

        draw = ImageDraw.Draw(grid)
        for i, p in enumerate(base):
            if p.exists():
                grid.paste(Image.open(p), (150 + 66 * i, 0))
        draw.text((4, 26), "base model", fill="black")
        for r, m in enumerate(trained, start=1):
            draw.text((4, 66 * r + 26), m, fill="black")
            for c, s in enumerate(steps):
                for i in range(2):
                    p = cell(f"{concept}_{m}_{s}_{i}.png")
                    if p.exists():
                        grid.paste(Image.open(p), (150 + 66 * (2 + 2 * c + i), 66 * r))
        for c, s in enumerate(steps):
            draw.text((150 + 66 * (2 + 2 * c) + 40, 2), f"{s} steps", fill="black")
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(out / f"grid_{concept}.png")
    print((out / "overfitting.md").read_text())


TABLE_HEAD = "| method | text alignment ↑ | concept similarity ↑ | Wasserstein ↓ | Fisher ↓ | storage | concepts |"


def _tradeoff_plot(path: Path, methods: list[str], steps: list[int], stat) -> None:
    """Fidelity against overfitting: mean concept similarity against Wasserstein and against text alignment.

    One point per method (mean over concepts), one row of panels per step count; Infusion's rows in black, the
    fidelity knob's in green (labelled ``knob_<setting>``), the base model's in blue, the baselines' in red.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(steps), 2, figsize=(11, 4.2 * len(steps)), squeeze=False)
    for row, step in zip(axes, steps):
        for ax, key in zip(row, ("wasserstein", "text_alignment")):
            for m in [m for m in methods if stat(m, step, key)[2]]:  # the rows measured at that step
                x, y = stat(m, step, key)[0], stat(m, step, "concept_similarity")[0]
                knob = m.startswith("infusion_fidelity_")
                color = ("tab:green" if knob else "black" if m.startswith("infusion") else
                         "tab:blue" if m.startswith("base") else "tab:red")  # fmt: skip
                ax.scatter([x], [y], color=color, s=22)
                label = "knob_" + m.removeprefix("infusion_fidelity_") if knob else m
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(key.replace("_", " ") + (" (lower: less overfitting)" if key == "wasserstein" else ""))
            ax.set_ylabel("concept similarity")
            ax.set_title(f"{step} steps, mean over concepts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ceiling_lines(concepts: list[str]) -> list[str]:
    """The concept similarity of the photos and of the toy VAE's reconstructions of them (the most any method gets)."""
    from diffusers_infusion.metrics import toy_concept_similarity, toy_reconstruction_similarity
    from diffusers_infusion.toy import CONCEPTS, load_toy_pipeline

    vae = load_toy_pipeline().vae
    cells = [
        f"{c} {np.mean(toy_concept_similarity(CONCEPTS[c].photos(), c)):.3f} / "
        f"{toy_reconstruction_similarity(vae, c):.3f}"
        for c in concepts
    ]
    return [
        f"Concept similarity of the photos / of the VAE's reconstructions of them (the ceiling): {'; '.join(cells)}."
    ]


def _bytes(n: float) -> str:
    if n != n:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
