"""Comparing a pipeline's weights before and after training (imported by the baseline tests by this unique name:
a ``from conftest import`` resolves to whichever conftest pytest imported first)."""

from __future__ import annotations

import torch


def module_state(pipe) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer of the pipeline's UNet, text encoder and VAE, by qualified name."""
    state = {}
    for part in ("unet", "text_encoder", "vae"):
        for name, tensor in getattr(pipe, part).state_dict().items():
            state[f"{part}.{name}"] = tensor.detach().clone()
    return state


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensors differ (or appear/disappear)."""
    return {k for k in before.keys() | after.keys() if k not in before or k not in after or
            before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}  # fmt: skip
