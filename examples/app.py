"""A web page to try, compare and train Infusion concepts (Gradio).

    python examples/app.py --model PATH_OR_REPO_ID --port 7860     # or: make app

- **Generate**: prompt, negative prompt, steps, guidance, seed (or random), number of images; every loaded concept
  with an on/off switch and a strength; the base model's images and the concepts' images side by side (same seeds,
  one call, ``return_base_images``).
- **Concepts**: load from a Hub repo id, a local folder or file, or an uploaded ``.safetensors``; list, unload,
  download.
- **Train**: photos, class word, steps, learning rate -> the library's training loop (the one
  ``examples/train_infusion.py`` drives), live progress and a validation image every N steps; the concept is then
  loaded and offered for download.

The default model is the shipped toy model (``examples/toy_world/model``): the page works offline. The logic lives in
``app_backend.py`` (plain Python, tested without a browser); this file is the page.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from app_backend import MAX_SEED, InfusionApp  # noqa: E402

from diffusers_infusion import InfusionError  # noqa: E402
from diffusers_infusion.training import TrainingDataError  # noqa: E402

logger = logging.getLogger("app")
DEFAULT_MODEL = os.environ.get("INFUSION_MODEL") or str(HERE / "toy_world" / "model")
SLOTS = 4  # concepts with a switch and a slider on the Generate tab (generate() names their inputs)
TRACK_TQDM = gr.Progress(track_tqdm=True)  # the pipeline's and the training loop's tqdm bars, in the page
USER_ERRORS = (InfusionError, TrainingDataError)  # the library's messages name the value and the fix


def launch_kwargs() -> dict:
    """Launch settings that keep the page offline: system fonts (no Google Fonts), no server-side rendering."""
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "ssr_mode": False}


def build_demo(app: InfusionApp) -> gr.Blocks:
    """The page: three tabs wired to ``app``'s methods, with named API endpoints (see docs/app.md)."""
    slots = SLOTS

    def user_error(error: Exception) -> gr.Error:
        return gr.Error(str(error), print_exception=False)

    # --------------------------------------------------------------------------------- concept list refresh
    def refresh():
        rows, loaded = app.concepts(), app.pipe.get_list_infusion_concepts()
        shown = loaded[:slots]
        names = [gr.update(value=shown[i] if i < len(shown) else "") for i in range(slots)]
        switches = [gr.update(visible=i < len(shown), label=shown[i] if i < len(shown) else "", value=True)
                    for i in range(slots)]  # fmt: skip
        sliders = [gr.update(visible=i < len(shown), value=1.0) for i in range(slots)]
        note = "" if loaded else "No concept loaded: load one in the **Concepts** tab, or train one in **Train**."
        if len(loaded) > slots:
            note = f"{len(loaded) - slots} more concept(s) loaded than shown here: they stay off."
        pick = gr.update(choices=loaded, value=loaded[-1] if loaded else None)
        return [rows, pick, *names, *switches, *sliders, note]

    # --------------------------------------------------------------------------------- handlers
    def generate(prompt, negative_prompt, steps, guidance_scale, seed, randomize_seed, num_images,
                 concept_1, concept_2, concept_3, concept_4, on_1, on_2, on_3, on_4,
                 strength_1, strength_2, strength_3, strength_4, progress=TRACK_TQDM):  # fmt: skip
        names, switches = (concept_1, concept_2, concept_3, concept_4), (on_1, on_2, on_3, on_4)
        strengths = (strength_1, strength_2, strength_3, strength_4)
        seed = app.random_seed() if randomize_seed else int(seed or 0)
        chosen = {n: float(s) for n, on, s in zip(names, switches, strengths) if n and on}
        try:
            base, images = app.generate(prompt, negative_prompt=negative_prompt or "", steps=int(steps),
                                        guidance_scale=float(guidance_scale), seed=seed, num_images=int(num_images),
                                        strengths=chosen)  # fmt: skip
        except USER_ERRORS as error:
            raise user_error(error) from None
        return base, images, seed

    def load(source, upload, name, class_word):
        try:
            loaded = app.load_concept(source or None, upload=upload or None, name=name or None,
                                      class_word=class_word or None)  # fmt: skip
        except USER_ERRORS as error:
            raise user_error(error) from None
        gr.Info(f"Loaded {loaded!r}.")
        return refresh()

    def unload(name):
        try:
            app.unload_concept(name or "")
        except USER_ERRORS as error:
            raise user_error(error) from None
        return refresh()

    def download(name):
        try:
            return str(app.concept_file(name or ""))
        except USER_ERRORS as error:
            raise user_error(error) from None

    def train(photos, class_word, name, steps, learning_rate, seed, validation_prompt, validation_steps,
              progress=TRACK_TQDM):  # fmt: skip
        files = [getattr(p, "name", p) for p in (photos or [])]
        if files and not 3 <= len(files) <= 10:
            gr.Warning(f"{len(files)} photos: 3-10 photos of the concept work best.")
        skip = [gr.skip()] * (len(concept_outputs))
        try:
            updates = app.train(files, class_word, steps=int(steps), learning_rate=float(learning_rate),
                                name=name or None, seed=int(seed or 0), validation_prompt=validation_prompt or None,
                                validation_steps=int(validation_steps))  # fmt: skip
            for update in updates:
                status = f"Step {update.step} / {update.total} · loss {update.loss:.4f}"
                if update.concept_file is not None:
                    status = f"Done: **{update.name}** is loaded ({update.total} steps, loss {update.loss:.4f})."
                    yield status, update.validation, str(update.concept_file), *refresh()
                elif update.validation is not None or update.step % 10 == 0:
                    image = update.validation if update.validation is not None else gr.skip()
                    yield status, image, gr.skip(), *skip
        except USER_ERRORS as error:
            raise user_error(error) from None

    # --------------------------------------------------------------------------------- layout
    with gr.Blocks(title="Infusion concepts") as demo:
        gr.Markdown(f"# Infusion concepts\nBase model: `{app.model_id}` · {app.resolution}×{app.resolution}")
        with gr.Tab("Generate"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", placeholder="a photo of a cat on the beach", scale=5,
                                    elem_id="prompt")  # fmt: skip
                go = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
            negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                guidance = gr.Slider(0.0, 15.0, value=7.5, step=0.5, label="Guidance scale")
                num_images = gr.Slider(1, 4, value=1, step=1, label="Images", elem_id="num-images")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                randomize = gr.Checkbox(value=False, label="Randomize seed")
            note = gr.Markdown()
            names, switches, sliders = [], [], []
            for _ in range(slots):
                with gr.Row():
                    names.append(gr.Textbox(visible=False))
                    switches.append(gr.Checkbox(value=True, visible=False, scale=1))
                    sliders.append(gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength", visible=False,
                                             scale=4))  # fmt: skip
            with gr.Row():
                base_gallery = gr.Gallery(label="Base model", format="png", columns=2,
                                          elem_id="base-images")  # fmt: skip
                concept_gallery = gr.Gallery(label="With the concepts", format="png", columns=2,
                                             elem_id="concept-images")  # fmt: skip
        with gr.Tab("Concepts"):
            with gr.Row():
                source = gr.Textbox(label="Hub repo id, local folder or .safetensors path", placeholder="user/my-cat",
                                    elem_id="concept-source")  # fmt: skip
                upload = gr.File(label="… or upload a concept file", type="filepath",
                                 file_types=[".safetensors", ".ckpt", ".bin", ".pt", ".pth"])  # fmt: skip
            with gr.Row():
                load_name = gr.Textbox(label="Name (optional)")
                load_word = gr.Textbox(label="Class word (optional: overrides the file's)")
            load_button = gr.Button("Load", variant="primary", elem_id="load")
            table = gr.Dataframe(headers=["name", "class word", "values", "base model"], interactive=False,
                                 label="Loaded concepts")  # fmt: skip
            with gr.Row():
                pick = gr.Dropdown(choices=[], label="Concept")
                unload_button = gr.Button("Unload")
                download_button = gr.Button("Save for download")
            concept_download = gr.File(label="Concept file", interactive=False)
        with gr.Tab("Train"):
            photos = gr.File(label="Photos (3-10)", file_count="multiple", file_types=["image"], type="filepath",
                             elem_id="train-photos")  # fmt: skip
            with gr.Row():
                class_word = gr.Textbox(label="Class word", placeholder="cat", elem_id="train-class-word")
                train_name = gr.Textbox(label="Name (optional)", placeholder="my_cat")
            with gr.Row():
                train_steps = gr.Slider(1, 2000, value=300, step=1, label="Steps", elem_id="train-steps")
                learning_rate = gr.Number(value=1e-2, label="Learning rate")
                train_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
            with gr.Row():
                validation_prompt = gr.Textbox(label="Validation prompt (default: a photo of a <class word>)")
                validation_steps = gr.Slider(1, 500, value=50, step=1, label="Validation every N steps")
            train_button = gr.Button("Train", variant="primary", elem_id="train")
            status = gr.Markdown(elem_id="train-status")
            validation = gr.Image(label="Validation: base model | with the concept", format="png", type="pil",
                                  interactive=False, elem_id="train-validation")  # fmt: skip
            trained_file = gr.File(label="Trained concept", interactive=False)

        concept_outputs = [table, pick, *names, *switches, *sliders, note]
        model_events = {"concurrency_id": "model", "concurrency_limit": 1}  # one pipeline: one job at a time
        generate_inputs = [prompt, negative, steps, guidance, seed, randomize, num_images, *names, *switches,
                           *sliders]  # fmt: skip
        go.click(generate, generate_inputs, [base_gallery, concept_gallery, seed], api_name="generate",
                 **model_events)  # fmt: skip
        prompt.submit(generate, generate_inputs, [base_gallery, concept_gallery, seed], api_visibility="private",
                      **model_events)  # fmt: skip
        load_button.click(load, [source, upload, load_name, load_word], concept_outputs, api_name="load_concept",
                          **model_events)  # fmt: skip
        unload_button.click(unload, [pick], concept_outputs, api_name="unload_concept", **model_events)
        download_button.click(download, [pick], [concept_download], api_name="concept_file")
        train_button.click(train, [photos, class_word, train_name, train_steps, learning_rate, train_seed,
                                   validation_prompt, validation_steps],
                           [status, validation, trained_file, *concept_outputs], api_name="train",
                           **model_events)  # fmt: skip
        demo.load(refresh, None, concept_outputs, api_name="list_concepts")
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A web page to try, compare and train Infusion concepts.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Base model: Hub repo id or folder (default: toy model).")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="0.0.0.0 to serve other machines (Spaces set GRADIO_SERVER_NAME).")  # fmt: skip
    p.add_argument("--concept", action="append", default=[], help="Concept to load at start (repeatable).")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")
    p.add_argument("--workdir", default=None, help="Where uploads and trained concepts go (default: a temp folder).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    app = InfusionApp.from_pretrained(args.model, device=args.device, workdir=args.workdir)
    for source in args.concept:
        logger.info("Loaded concept %r", app.load_concept(source))
    build_demo(app).launch(server_name=args.host, server_port=args.port, **launch_kwargs())


if __name__ == "__main__":
    main()
