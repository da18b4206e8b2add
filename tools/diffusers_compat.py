"""Run diffusers' own fast SD / SDXL pipeline tests against the Infusion pipelines (docs/diffusers-compat.md).

This script holds no diffusers code: it runs pytest on the test files of a diffusers checkout given as an argument
(diffusers' tests are not in the wheel), with a plugin that

* answers ``CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")`` offline with
  ``diffusers_infusion.tiny.build_clip_tokenizer`` (a vocabulary holding the words of the tests' prompts);
* in the test modules, replaces the pipeline class (``pipeline_class`` and the module's own name for it) by
  ``InfusionPipeline`` / ``InfusionXLPipeline`` (``--mode none``), by the same with a concept active on the word
  "painting" of the dummy prompt "A painting of a squirrel eating a burger" (``--mode concept``), or leaves the
  parent class (``--mode parent``: the baseline under the same offline setup).

In ``concept`` mode the concept (seeded random residuals, as in the project's tests) is loaded the first time the
pipeline is called with a UNet that it has not been loaded for, so pipelines built, saved, reloaded or made with
``from_pipe`` by the tests all carry it.

Usage::

    git -C <diffusers bare repo> archive v0.40.0 tests | tar -x -C /tmp/dtests
    python tools/diffusers_compat.py /tmp/dtests --suite sd --mode concept --junit /tmp/sd-concept.xml
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

SUITES = {
    "sd": ("tests/pipelines/stable_diffusion/test_stable_diffusion.py", "StableDiffusionPipeline", "InfusionPipeline"),
    "sdxl": ("tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py", "StableDiffusionXLPipeline",
             "InfusionXLPipeline"),
}  # fmt: skip
HUB_TOKENIZER = "hf-internal-testing/tiny-random-clip"
PROMPT_WORDS = ("painting", "squirrel", "eating", "burger", "hey")
CONCEPT_WORD = "painting"


def with_concept(pipeline_class: type) -> type:
    """``pipeline_class`` whose ``__call__`` first loads a concept on ``CONCEPT_WORD`` for the current UNet."""
    import torch

    from diffusers_infusion import InfusionConcept

    call = pipeline_class.__call__

    @functools.wraps(call)  # the same signature for diffusers' signature checks
    def __call__(self, *args, **kwargs):
        if self.__dict__.get("_harness_unet") is not self.unet:
            for name in self.get_list_infusion_concepts():
                self.unload_infusion_concept(name)
            concept = InfusionConcept.zeros(self.unet, CONCEPT_WORD)
            generator = torch.Generator().manual_seed(0)
            for layer in sorted(concept.residuals):
                concept.residuals[layer] = torch.randn(concept.residuals[layer].shape, generator=generator)
            self.load_infusion_concept(concept, "harness")
            self.__dict__["_harness_unet"] = self.unet
        return call(self, *args, **kwargs)

    return type(pipeline_class.__name__, (pipeline_class,), {"__call__": __call__, "__module__": __name__})


class InfusionSwap:
    """The pytest plugin: offline tokenizer, pipeline class swapped in the collected test modules."""

    def __init__(self, suite: str, mode: str) -> None:
        import diffusers

        import diffusers_infusion

        _, self.parent_name, child_name = SUITES[suite]
        self.parent = getattr(diffusers, self.parent_name)
        child = getattr(diffusers_infusion, child_name)
        self.target = {"parent": self.parent, "none": child, "concept": with_concept(child) if mode == "concept"
                       else child}[mode]  # fmt: skip

    def pytest_configure(self, config) -> None:
        from transformers import CLIPTokenizer

        from diffusers_infusion.tiny import DEFAULT_WORDS, build_clip_tokenizer

        original = CLIPTokenizer.from_pretrained.__func__

        def from_pretrained(cls, name, *args, **kwargs):
            if name == HUB_TOKENIZER:
                return build_clip_tokenizer(DEFAULT_WORDS + PROMPT_WORDS)
            return original(cls, name, *args, **kwargs)

        CLIPTokenizer.from_pretrained = classmethod(from_pretrained)
        # diffusers' test of encode_prompt reads its source through `getattr(diffusers.pipelines, cls.__name__)`,
        # a lookup only classes shipped in diffusers pass; register the swapped-in class there for the run.
        import diffusers.pipelines

        setattr(diffusers.pipelines, self.target.__name__, self.target)

    def pytest_collection_modifyitems(self, session, config, items) -> None:
        for item in items:
            module = item.module
            if module.__dict__.get(self.parent_name) is self.parent:
                setattr(module, self.parent_name, self.target)
            cls = item.cls
            if cls is not None and getattr(cls, "pipeline_class", None) is self.parent:
                cls.pipeline_class = self.target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="a folder holding diffusers' tests/ (from the repository, not the wheel)")
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--mode", choices=["parent", "none", "concept"], required=True)
    parser.add_argument("--junit", help="write a JUnit XML report here")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    import pytest

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(args.checkout)
    sys.path.insert(0, args.checkout)
    pytest_args = [SUITES[args.suite][0], "-q", "-rfEs", "-p", "no:cacheprovider"]
    pytest_args += ["-k", "not Integration and not Nightly"]  # the fast tests: no checkpoint, no accelerator
    if args.junit:
        pytest_args.append(f"--junitxml={args.junit}")
    return pytest.main(pytest_args + args.pytest_args, plugins=[InfusionSwap(args.suite, args.mode)])


if __name__ == "__main__":
    sys.exit(main())
