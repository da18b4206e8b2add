"""The toy Stable Diffusion's components: real diffusers/transformers classes at toy sizes, built from configs.

:func:`build_toy_components` returns fresh (untrained) components; ``examples/toy_world/train_toy_model.py`` trains
them and saves a ``StableDiffusionPipeline`` folder; :func:`load_toy_pipeline` loads the trained one shipped in
``examples/toy_world/model``.

Sizes: images 64x64x3 -> VAE latents 8x16x16 (two downsamplings); UNet with cross-attention at 16x16 and 8x8 (and its
mid block), none at 4x4; a CLIP text encoder of width 64 over the world's vocabulary (one token per word).

Three choices make the toy model behave like Stable Diffusion where Infusion depends on it:

- Cross-attention sits at the finest resolutions, as in SD 1.5 (whose coarsest level has none). A method that acts
  through cross-attention (Infusion, Custom Diffusion, Perfusion) can then paint a concept's look at the latent's own
  resolution; with cross-attention only at 8x8 and 4x4, none of them could draw a two-color look that DreamBooth,
  which changes every layer, could.
- The text encoder has no transformer layers (token + position embedding, final layer norm). With a contextual
  encoder this small, the padding tokens after the prompt summarize the whole sentence and the UNet learns to
  read everything from them, so no word gets a localized cross-attention map; with none, the object's class word
  is the only token that says "cat", so its map covers the cat, as in SD (the premise of prompt-to-prompt and of
  Infusion's value residuals).
- The scheduler has zero terminal SNR with v-prediction and trailing timesteps (Lin et al., 2024). With SD 1.5's
  betas, 7% of the signal survives at the last step, and on a 16x16 latent the low frequencies of the initial
  noise then decide where objects go, whatever the prompt says.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny import build_clip_tokenizer
from .world import LOOK_VOCABULARY, VOCABULARY

#: Where the trained toy model lives in a checkout of the repository.
TOY_MODEL_DIR = Path(__file__).resolve().parents[3] / "examples" / "toy_world" / "model"

MAX_TOKENS = 24  # padded prompt length; the world's longest caption has 21 tokens with start and end
MAX_TOKENS_LOOKS = 32  # with looks (toy world 2) the longest caption has 29

VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=8,
    sample_size=64,
    mid_block_add_attention=False,
)

UNET_CONFIG: dict = dict(
    sample_size=16,
    in_channels=8,
    out_channels=8,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),  # as in SD: cross-attention
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),  # at the finest resolutions
    cross_attention_dim=64,
    attention_head_dim=(2, 4, 4),  # heads per block; two at 16x16 keep the step as fast as the 8x8-only model
    norm_num_groups=16,
)

#: Toy world 2 (looks): more heads and wider values at the finest level (4 x 12 at 16x16, 4 x 16 at 8x8, 4 x 32 mid).
UNET_CONFIG_LOOKS: dict = {**UNET_CONFIG, "block_out_channels": (48, 64, 128), "attention_head_dim": (4, 4, 4)}

TEXT_CONFIG: dict = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=0,  # no mixing: each token's embedding says its word (and place), see below
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    rescale_betas_zero_snr=True,  # the last step is pure noise: the noise cannot decide the layout
    timestep_spacing="trailing",
    prediction_type="v_prediction",  # eps-prediction is degenerate at zero terminal SNR
)


def build_toy_tokenizer(*, looks: bool = False):
    """The world's ``CLIPTokenizer``: every word of :data:`~diffusers_infusion.toy.world.VOCABULARY` is one token.

    Args:
        looks: Toy world 2: also the words of looks (:data:`~diffusers_infusion.toy.world.LOOK_VOCABULARY`), and
            prompts padded to :data:`MAX_TOKENS_LOOKS`.
    """
    if looks:
        return build_clip_tokenizer(VOCABULARY + LOOK_VOCABULARY, model_max_length=MAX_TOKENS_LOOKS)
    return build_clip_tokenizer(VOCABULARY, model_max_length=MAX_TOKENS)


def build_toy_components(seed: int = 0, *, text_layers: int = 0, looks: bool = False) -> dict:
    """Fresh, seeded, untrained components for ``StableDiffusionPipeline(**components)``.

    Args:
        seed: Seed of the initial weights.
        text_layers: Transformer layers of the text encoder (0 for the shipped model).
        looks: Toy world 2's components: the tokenizer with the words of looks, :data:`UNET_CONFIG_LOOKS`.

    Returns:
        A dict with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (DDIM), ``safety_checker``
        (None), ``feature_extractor`` (None) and ``image_encoder`` (None).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_toy_tokenizer(looks=looks)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**(UNET_CONFIG_LOOKS if looks else UNET_CONFIG))
    torch.manual_seed(seed + 2)
    text = {**TEXT_CONFIG, "num_hidden_layers": text_layers, "max_position_embeddings": tokenizer.model_max_length}
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **text))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def load_toy_pipeline(path: str | Path | None = None, *, pipeline_cls=None, dtype: torch.dtype = torch.float32):
    """Load the trained toy model (``examples/toy_world/model`` by default) as a pipeline.

    Args:
        path: Model folder; the shipped one when None.
        pipeline_cls: Pipeline class to load into (``StableDiffusionPipeline`` when None; an
            ``InfusionPipeline`` works the same way).
        dtype: Weights dtype after loading (the folder stores fp32 weights, 13.8 MB; fp32 is the CPU default).
    """
    if pipeline_cls is None:
        from diffusers import StableDiffusionPipeline

        pipeline_cls = StableDiffusionPipeline
    if path is None and not TOY_MODEL_DIR.is_dir():
        raise FileNotFoundError(
            f"The toy model is not at '{TOY_MODEL_DIR}': it ships in the repository's examples/toy_world/model, "
            "not in the installed package. Pass its path: load_toy_pipeline('path/to/examples/toy_world/model')."
        )
    pipe = pipeline_cls.from_pretrained(str(path or TOY_MODEL_DIR), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
