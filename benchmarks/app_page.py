"""Time a training run in the web page, as a user runs it, and take the docs' screenshot (docs/images/app.png).

    python benchmarks/app_page.py --steps 300 --screenshot docs/images/app.png

Starts ``examples/app.py`` on a free local port, opens it in Debian's headless Chromium (Playwright; no browser
download), uploads a concept's photos in the Train tab with the page's defaults (learning rate 1e-2, a validation
image every 50 steps), presses Train and times it until the page says "Done"; then generates with the new concept
in the Generate tab and saves a screenshot of the page. Prints the times as JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import app as page
    from app_backend import InfusionApp
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=page.DEFAULT_MODEL)
    p.add_argument("--photos", type=Path, default=ROOT / "examples" / "toy_world" / "concepts" / "my_cat")
    p.add_argument("--class_word", default="cat")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--prompt", default="a photo of a cat on the beach")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--screenshot", type=Path, default=None)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    photos = sorted(str(f) for f in args.photos.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))

    app = InfusionApp.from_pretrained(args.model)
    demo = page.build_demo(app)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True, **page.launch_kwargs())
    times = {"steps": args.steps, "photos": len(photos)}
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="chromium-"), executable_path=args.chromium, headless=True, args=FLAGS,
                viewport={"width": 1280, "height": 1000},
            )  # fmt: skip
            browser = context.new_page()
            browser.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            browser.get_by_role("tab", name="Train").click()
            browser.locator("#train-photos input[type=file]").set_input_files(photos)
            uploaded = "n => document.querySelector('#train-photos').innerText.split('.png').length - 1 === n"
            browser.wait_for_function(uploaded, arg=len(photos), timeout=60_000)
            browser.locator("#train-class-word textarea").fill(args.class_word)
            browser.locator("#train-steps input[type=number]").fill(str(args.steps))
            browser.locator("#train-steps input[type=number]").press("Enter")
            start = time.perf_counter()
            browser.locator("#train").click()
            browser.get_by_text("Done:").wait_for(timeout=3_600_000)
            times["train_s"] = round(time.perf_counter() - start, 1)
            times["status"] = browser.locator("#train-status").inner_text()
            browser.get_by_role("tab", name="Generate").click()
            browser.locator("#prompt textarea").fill(args.prompt)
            browser.locator("#num-images input[type=number]").fill(str(args.images))
            browser.locator("#num-images input[type=number]").press("Enter")
            start = time.perf_counter()
            browser.locator("#generate").click()
            count = "n => document.querySelectorAll('#concept-images img').length === n"
            browser.wait_for_function(count, arg=args.images, timeout=600_000)
            browser.wait_for_function(count.replace("concept", "base"), arg=args.images, timeout=600_000)
            times["generate_s"] = round(time.perf_counter() - start, 1)
            if args.screenshot:
                args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                browser.wait_for_timeout(500)
                browser.screenshot(path=str(args.screenshot), full_page=True)
            context.close()
    finally:
        demo.close()
    print(json.dumps(times))


if __name__ == "__main__":
    main()
