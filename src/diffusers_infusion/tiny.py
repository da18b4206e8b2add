"""Tiny Stable Diffusion components built in code: no download, seeded, for tests, demos and offline work.

Real diffusers/transformers classes (``CLIPTokenizer``, ``CLIPTextModel``, ``AutoencoderKL``,
``UNet2DConditionModel``, ``DDIMScheduler``) at toy sizes, so the whole Infusion data path runs on a CPU
in milliseconds. The tokenizer's vocabulary is built from a word list (see :func:`build_clip_tokenizer`).
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import torch

DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "of", "on", "in", "at", "and", "with", "next", "to", "my", "is", "sitting",
    "cat", "dog", "teddy", "bear", "car", "cup", "book", "moon", "beach", "grass", "snow", "night", "brick",
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple", "left", "right", "center",
    "small", "big", "reading", "painting", "picture",
)  # fmt: skip


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none applies."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into the single token ``word</w>``.

    Each word first gets its left-to-right merge chain. A shorter word's merge can fire inside a longer word
    and leave it in pieces ("pho" + "to</w>"), so repair merges joining those pieces are appended until every
    word encodes to one token.
    """
    merges: dict[tuple[str, str], None] = {}
    for word in words:
        left = word[0]
        for right in list(word[1:-1]) + [word[-1] + "</w>"]:
            merges.setdefault((left, right))
            left += right
    for _ in range(len(words)):
        ranks = {pair: i for i, pair in enumerate(merges)}
        broken = [parts for parts in (_bpe(w, ranks) for w in words) if len(parts) > 1]
        if not broken:
            break
        for parts in broken:
            left = parts[0]
            for right in parts[1:]:
                merges.setdefault((left, right))
                left += right
    return list(merges)


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, *, model_max_length: int = 77):
    """A ``CLIPTokenizer`` whose BPE vocabulary turns each of ``words`` into one token.

    The vocabulary holds the special tokens, every lowercase letter, digit and punctuation mark (plain and with
    the end-of-word marker ``</w>``), and for each word the intermediate tokens of its merge chain. Any other
    text still tokenizes (into single characters), never into unknown tokens.

    Args:
        words: The words that should become single tokens (lowercase letters).
        model_max_length: The padded prompt length (CLIP's is 77).
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = _merges_for([w for w in dict.fromkeys(w.lower() for w in words) if len(w) > 1])
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def tiny_sd_components(
    seed: int = 0,
    *,
    words: Iterable[str] = DEFAULT_WORDS,
    sample_size: int = 8,
    block_out_channels: tuple[int, ...] = (16, 32),
    cross_attention_dim: int = 32,
) -> dict:
    """Seeded components for ``StableDiffusionPipeline(**components)``, cross-attention at two resolutions.

    Args:
        seed: Seed of the random weights.
        words: Words the tokenizer knows as single tokens.
        sample_size: Latent side length (the image side is 2x this: the VAE downsamples once).
        block_out_channels: UNet channels per resolution; every block has cross-attention.
        cross_attention_dim: Width of the text encoder (and so of the cross-attention keys).

    Returns:
        A dict with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``, ``safety_checker`` (None),
        ``feature_extractor`` (None) and ``image_encoder`` (None).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(words)
    n_blocks = len(block_out_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n_blocks,
        up_block_types=("CrossAttnUpBlock2D",) * n_blocks,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sdxl_components(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS) -> dict:
    """Seeded components for ``StableDiffusionXLPipeline(**components)``: two text encoders, size conditioning.

    Cross-attention sits at two resolutions, with two transformer layers in the second (as SDXL stacks them).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_clip_tokenizer(words), build_clip_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    ).eval()  # fmt: skip
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()  # fmt: skip
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                  projection_dim=32)  # fmt: skip
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler, image_encoder=None, feature_extractor=None)  # fmt: skip
