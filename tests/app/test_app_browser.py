"""The page in a real browser: Playwright driving Debian's Chromium, headless (never a browser download).

Set INFUSION_APP_SCREENSHOT=path to keep the screenshot (docs/images/app.png is made by benchmarks/app_page.py).
Outside CI, the tests skip when Playwright or /usr/bin/chromium is missing; in CI (CI=true) that is a failure.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from diffusers_infusion import InfusionConcept, InfusionError

CHROMIUM = os.environ.get("INFUSION_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require_browser():
    if IN_CI:
        import playwright.sync_api  # noqa: F401  (the test extra; a missing one fails in CI)

        assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing in CI: .ci/run installs it (apt-get install chromium)"
    else:
        pytest.importorskip("playwright.sync_api", reason="the test extra: pip install -e '.[test]'")
        if not Path(CHROMIUM).is_file():
            pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (CI installs it and never skips this).")


@pytest.fixture(scope="module")
def browser_page(request, tmp_path_factory):
    """A fresh headless Chromium profile with the page open."""
    _require_browser()  # before the app starts: a missing browser is reported at once
    served = request.getfixturevalue("served")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 1100},
        )  # fmt: skip
        context.set_default_timeout(300_000)  # a slow or busy CI machine: generous limits, never timings
        try:
            page = context.new_page()
            page.goto(served[1], wait_until="domcontentloaded")
            page.get_by_label("my_cat").wait_for(state="visible", timeout=300_000)  # the concept's switch
            yield page
        finally:
            context.close()


def shown_images(page, selector: str) -> list[np.ndarray]:
    """The images a gallery shows, fetched from the page's own URLs."""
    sources = [page.locator(selector).nth(i).get_attribute("src") for i in range(page.locator(selector).count())]
    return [np.asarray(PIL.Image.open(io.BytesIO(page.request.get(src).body()))) for src in sources]


def test_generate_in_the_browser_shows_base_and_concept_images_that_differ(browser_page, served, tmp_path):
    page, resolution = browser_page, served[0].resolution
    page.locator("#prompt textarea").fill("a photo of a cat")
    page.locator("#generate").click()
    page.locator("#base-images img").first.wait_for(timeout=300_000)
    page.locator("#concept-images img").first.wait_for(timeout=300_000)
    base, concept = shown_images(page, "#base-images img"), shown_images(page, "#concept-images img")
    assert len(base) == len(concept) == 1 and base[0].shape[:2] == concept[0].shape[:2] == (resolution, resolution)
    assert (base[0] != concept[0]).any()  # the class word carries the concept
    path = Path(os.environ.get("INFUSION_APP_SCREENSHOT") or tmp_path / "app.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert PIL.Image.open(path).size[0] == 1280


def test_bad_input_shows_the_librarys_message_in_the_page(browser_page, tmp_path):
    page = browser_page
    missing = tmp_path / "no-such-concept"
    with pytest.raises(InfusionError) as error:
        InfusionConcept.from_pretrained(missing)
    page.get_by_role("tab", name="Concepts").click()
    page.locator("#concept-source textarea").fill(str(missing))
    page.locator("#load").click()
    page.get_by_text(str(error.value)[-60:], exact=False).first.wait_for(timeout=300_000)  # the library's words
    page.get_by_role("tab", name="Generate").click()
    assert page.get_by_label("my_cat").is_visible()  # nothing else loaded, the page still works


def test_train_in_the_browser_shows_progress_and_loads_the_concept(browser_page, served, photos):
    page, app = browser_page, served[0]
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-photos input[type=file]").set_input_files([str(p) for p in photos])
    uploaded = "n => document.querySelector('#train-photos').innerText.split('.png').length - 1 === n"
    page.wait_for_function(uploaded, arg=len(photos), timeout=300_000)  # every photo listed
    page.locator("#train-class-word textarea").fill("cat")
    page.locator("#train-steps input[type=number]").fill("4")
    page.locator("#train-steps input[type=number]").press("Enter")
    page.locator("#train").click()
    page.get_by_text("Done:").wait_for(timeout=300_000)
    name = page.locator("#train-status").inner_text().split("Done:")[1].split()[0]
    assert name in app.pipe.get_list_infusion_concepts() and "4 steps" in page.locator("#train-status").inner_text()
    assert page.locator("#train-validation img").count() == 1
    app.unload_concept(name)
