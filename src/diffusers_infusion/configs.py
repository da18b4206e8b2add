"""UNet shapes of the real base models, to build without weights (``meta``) for sizes, or with random weights."""

from __future__ import annotations

import torch

SD15_UNET: dict = dict(
    sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
"""Stable Diffusion 1.5's UNet (860M parameters; 16 cross-attention layers)."""

SDXL_UNET: dict = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip
"""Stable Diffusion XL base's UNet (70 cross-attention layers)."""


def build_unet(config: dict, *, device: str | torch.device = "meta"):
    """A ``UNet2DConditionModel`` of that shape: on ``meta`` (no memory, for sizes) or with random weights."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**config)
