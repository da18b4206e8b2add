"""Convert a concept trained with the authors' code (``zwl666666/infusion``, LDM) into our safetensors file.

    diffusers-infusion-convert my_cat.ckpt --output_dir my_cat --unet_config sd15
    python -m diffusers_infusion.convert my_cat.ckpt --output_dir my_cat --base_model ./stable-diffusion-v1-5

The authors' checkpoint is a pickled ``torch.save`` dict: ``global_step``, ``C_inv``, ``target_input``,
``embedding`` (``initializer_words``: the class word; ``string_to_token``; ``string_to_param``, an
``nn.ParameterDict``) and ``target_output``: one vector per cross-attention layer under LDM names such as
``input_blocks.1.1.transformer_blocks.0.attn2.to_v.target_output`` (the value residual), plus ``...attn2.to_k...`` key
residuals when trained with xformers.

Reading it runs nothing: ``torch.load(weights_only=True)``, torch's restricted unpickler, which rebuilds tensors,
storages and plain containers only, with ``nn.ParameterDict`` added to its allowed globals; any other global (a
``__reduce__`` payload calling ``os.system``, a class of the authors' code) is refused before it is called. Layer names
are mapped with diffusers' single-file conversion rules and every vector's length is checked against the target
UNet's config (built on ``meta``: no weights are read or downloaded).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .attention import cross_attention_layers, value_size
from .concept import InfusionConcept
from .configs import SD15_UNET, SDXL_UNET
from .errors import InfusionError

__all__ = ["ConversionError", "convert_checkpoint", "ldm_to_diffusers", "load_checkpoint", "main"]

logger = logging.getLogger(__name__)

PRESETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
_KEY = re.compile(
    r"^(?:model\.diffusion_model\.)?(?P<block>input_blocks\.(?P<inp>\d+)\.1|middle_block\.1|output_blocks\.(?P<out>\d+)"
    r"\.1)\.(?P<tb>transformer_blocks\.\d+)\.attn2\.to_(?P<kind>[kv])\.target_output$"
)
_KEY_RESIDUAL_HELP = (
    "The authors' xformers path also trains a residual on the key, which changes the attention maps; the paper's "
    "method, which diffusers-infusion implements exactly, never changes them (the C stream attends with the base "
    "model's maps), so this concept cannot be reproduced as trained. Pass --drop-key-residuals "
    "(drop_key_residuals=True) to convert the value residuals only: expect images that differ from the authors' code."
)


class ConversionError(InfusionError, ValueError):
    """A checkpoint cannot be converted: unsafe, unreadable, of another structure, or for another UNet."""


# ------------------------------------------------------------------------------------------------ reading
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read the authors' checkpoint with torch's restricted unpickler; nothing in the file is executed.

    Raises:
        ConversionError: The file is missing, not a torch checkpoint, or references a global that is neither a
            tensor-rebuild function, a storage, a plain container nor ``nn.ParameterDict`` (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Checkpoint '{path}' does not exist. Pass the .ckpt file the authors' code saved.")
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:
            raise ConversionError(f"'{path}' is not a readable torch checkpoint (truncated, or another format?): "
                                  f"{str(error).splitlines()[-1]}") from error  # fmt: skip
        raise ConversionError(
            f"Refused to read '{path}': it references the global '{found.group(1)}', which a concept checkpoint never "
            "needs (only tensors, "
            "storages, dicts and nn.ParameterDict are allowed). Nothing in the file was run. If you trust where it "
            "comes from, re-save its tensors in a plain dict with the authors' environment and convert that file."
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise ConversionError(
            f"'{path}' is not a readable torch checkpoint (truncated, or another format?): {error}"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"'{path}' holds a {type(checkpoint).__name__}, not the authors' checkpoint dict.")
    return dict(checkpoint)


# ------------------------------------------------------------------------------------------------ names
def ldm_to_diffusers(block: str, transformer_block: str, *, layers_per_block: int) -> str:
    """The diffusers ``attn2`` path of an LDM cross-attention layer (diffusers' single-file conversion rules).

    ``input_blocks.i.1`` → ``down_blocks.{(i-1)//(L+1)}.attentions.{(i-1)%(L+1)}``, ``middle_block.1`` →
    ``mid_block.attentions.0``, ``output_blocks.i.1`` → ``up_blocks.{i//(L+1)}.attentions.{i%(L+1)}``, with ``L``
    the UNet's ``layers_per_block`` (2 for SD 1.5 and SDXL, which gives the familiar ``//3``, ``%3``).
    """
    step = layers_per_block + 1
    kind, index = block.split(".")[0], int(block.split(".")[1])
    if kind == "input_blocks":
        if index < 1:
            raise ConversionError(f"LDM block '{block}' is the input convolution; it has no cross-attention.")
        prefix = f"down_blocks.{(index - 1) // step}.attentions.{(index - 1) % step}"
    elif kind == "middle_block":
        prefix = "mid_block.attentions.0"
    else:
        prefix = f"up_blocks.{index // step}.attentions.{index % step}"
    return f"{prefix}.{transformer_block}.attn2"


def _residual_entries(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every ``*.target_output`` tensor, at the top level or under ``target_output`` / ``state_dict``."""
    entries = {}
    for scope in (checkpoint, checkpoint.get("target_output"), checkpoint.get("state_dict")):
        if isinstance(scope, Mapping):
            entries.update({k: v for k, v in scope.items() if isinstance(k, str) and k.endswith(".target_output")})
    return entries


def _class_word(checkpoint: Mapping[str, Any]) -> str | None:
    words = (checkpoint.get("embedding") or {}).get("initializer_words") if isinstance(
        checkpoint.get("embedding"), Mapping) else None  # fmt: skip
    if isinstance(words, str):
        return words
    if isinstance(words, Sequence) and words and all(isinstance(w, str) for w in words):
        return " ".join(words)
    return None


# ------------------------------------------------------------------------------------------------ converting
def convert_checkpoint(
    checkpoint: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    *,
    class_word: str | None = None,
    drop_key_residuals: bool = False,
    base_model: str | None = None,
    source: str = "checkpoint",
) -> InfusionConcept:
    """The ``InfusionConcept`` of an authors' checkpoint, checked layer by layer against ``unet_config``.

    Args:
        checkpoint: The dict ``load_checkpoint`` returns.
        unet_config: The target ``UNet2DConditionModel`` config (``unet/config.json`` of the base model).
        class_word: The class word; default: the checkpoint's ``embedding.initializer_words``.
        drop_key_residuals: Convert a checkpoint with key residuals by dropping them (with a warning).
        base_model: Recorded in the concept (name or path of the base model).
        source: The checkpoint's name, for messages and the ``converted_from`` note.
    """
    from diffusers import UNet2DConditionModel

    layers_per_block = unet_config.get("layers_per_block", 2)
    if not isinstance(layers_per_block, int):
        raise ConversionError(
            f"The UNet config's layers_per_block={layers_per_block!r} varies per block; LDM names map only to UNets "
            "with one layers_per_block (SD 1.x, SD 2.x, SDXL)."
        )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    sizes = {name: value_size(attn) for name, attn in cross_attention_layers(unet).items()}

    values, keys = {}, []
    for name, tensor in _residual_entries(checkpoint).items():
        match = _KEY.match(name)
        if match is None:
            raise ConversionError(
                f"{source}: '{name}' is not a cross-attention value or key residual (expected names like "
                "'input_blocks.1.1.transformer_blocks.0.attn2.to_v.target_output'). Is this an Infusion checkpoint?"
            )
        if match["kind"] == "k":
            keys.append(name)
            continue
        path = ldm_to_diffusers(match["block"], match["tb"], layers_per_block=layers_per_block)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.squeeze().ndim != 1:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ConversionError(f"{source}: '{name}' must be a float vector (out_features,), got {shape}.")
        if path not in sizes:
            raise ConversionError(
                f"{source}: '{name}' maps to '{path}', which the target UNet does not have ({len(sizes)} "
                "cross-attention layers). Pass the base model the concept was trained on (--base_model/--unet_config)."
            )
        if tensor.numel() != sizes[path]:
            raise ConversionError(
                f"{source}: '{name}' has {tensor.numel()} values but '{path}' of the target UNet expects "
                f"{sizes[path]} (attn2.to_v.out_features). Pass the base model it was trained on "
                "(SD 1.5: --unet_config sd15)."
            )
        values[path] = tensor.detach().reshape(-1).clone()
    if not values and not keys:
        raise ConversionError(
            f"{source} holds no '*.attn2.to_v.target_output' tensors (keys: {sorted(checkpoint)[:8]}). "
            "Is it an Infusion checkpoint of the authors' code?"
        )
    if keys and not drop_key_residuals:
        raise ConversionError(f"{source} holds key residuals ({len(keys)} layers, e.g. '{keys[0]}'). "
                              + _KEY_RESIDUAL_HELP)  # fmt: skip
    if keys:
        logger.warning("Dropping %d key residuals of %s (e.g. '%s'): images will differ from the authors' code.",
                       len(keys), source, keys[0])  # fmt: skip
    missing = sorted(set(sizes) - set(values))
    if missing:
        raise ConversionError(
            f"{source} has no value residual for {len(missing)} of the target UNet's {len(sizes)} cross-attention "
            f"layers (e.g. '{missing[0]}'). Pass the base model the concept was trained on (--base_model)."
        )
    word = class_word or _class_word(checkpoint)
    if not word:
        raise ConversionError(f"{source} records no class word (embedding.initializer_words). Pass --class_word.")
    note = f"{Path(source).name} (authors' code zwl666666/infusion, global_step {checkpoint.get('global_step')})"
    if keys:
        note += f"; {len(keys)} key residuals dropped"
    concept = InfusionConcept(word, values, base_model=base_model, metadata={"converted_from": note})
    concept.validate_for(unet)
    return concept


# ------------------------------------------------------------------------------------------------ command line
def _unet_config(args) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    if args.unet_config in PRESETS:
        return dict(PRESETS[args.unet_config])
    if args.unet_config is not None:
        path = Path(args.unet_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConversionError(f"--unet_config '{args.unet_config}' is neither sd15, sdxl nor a config.json file.")
        return json.loads(path.read_text())
    try:
        return dict(UNet2DConditionModel.load_config(args.base_model, subfolder="unet", revision=args.revision))
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"Could not read the UNet config of --base_model '{args.base_model}' ({error}). Pass a local model "
            "folder, a cached Hub id, or --unet_config sd15/sdxl/path/to/config.json."
        ) from error


def main(argv: Sequence[str] | None = None) -> int:
    """``diffusers-infusion-convert``: returns 0, or 2 after logging why the checkpoint was not converted."""
    p = argparse.ArgumentParser(prog="diffusers-infusion-convert", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="The authors' .ckpt file.")
    p.add_argument("--output_dir", type=Path, required=True, help="Folder to write infusion_concept.safetensors to.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base_model", help="Base model (folder or Hub id); its unet/config.json is read.")
    target.add_argument("--unet_config", help="sd15, sdxl, or a UNet config.json (or its folder).")
    p.add_argument("--revision", default=None, help="Hub revision of --base_model.")
    p.add_argument("--class_word", default=None, help="Class word (default: the checkpoint's initializer word).")
    p.add_argument("--drop-key-residuals", "--drop_key_residuals", dest="drop_key_residuals", action="store_true",
                   help="Convert a checkpoint with key residuals by dropping them (not the method as trained).")
    args = p.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        concept = convert_checkpoint(
            load_checkpoint(args.checkpoint), _unet_config(args), class_word=args.class_word,
            drop_key_residuals=args.drop_key_residuals, base_model=args.base_model, source=str(args.checkpoint),
        )  # fmt: skip
    except ConversionError as error:
        logger.error("%s", error)
        return 2
    details = f"Converted from `{concept.metadata['converted_from']}` with `diffusers-infusion-convert`."
    concept.save_pretrained(args.output_dir, model_card_kwargs={"training_details": details})
    logger.info("Wrote %s/infusion_concept.safetensors: class word %r, %d layers, %d values.", args.output_dir,
                concept.class_word, len(concept.residuals), concept.num_values)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
