"""The converter from the authors' checkpoints: restricted unpickling, LDM → diffusers names, lengths, key residuals.

Every checkpoint is built here, in the structure the authors' code saves (no file from elsewhere).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusers_infusion import InfusionConcept, InfusionPipeline
from diffusers_infusion.convert import ConversionError, convert_checkpoint, ldm_to_diffusers, load_checkpoint, main
from diffusers_infusion.toy import TOY_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]

# SD 1.5's 16 cross-attention layers: LDM block -> (diffusers attentions module, value size), written out by hand.
SD15_LAYERS = {
    "input_blocks.1.1": ("down_blocks.0.attentions.0", 320),
    "input_blocks.2.1": ("down_blocks.0.attentions.1", 320),
    "input_blocks.4.1": ("down_blocks.1.attentions.0", 640),
    "input_blocks.5.1": ("down_blocks.1.attentions.1", 640),
    "input_blocks.7.1": ("down_blocks.2.attentions.0", 1280),
    "input_blocks.8.1": ("down_blocks.2.attentions.1", 1280),
    "middle_block.1": ("mid_block.attentions.0", 1280),
    "output_blocks.3.1": ("up_blocks.1.attentions.0", 1280),
    "output_blocks.4.1": ("up_blocks.1.attentions.1", 1280),
    "output_blocks.5.1": ("up_blocks.1.attentions.2", 1280),
    "output_blocks.6.1": ("up_blocks.2.attentions.0", 640),
    "output_blocks.7.1": ("up_blocks.2.attentions.1", 640),
    "output_blocks.8.1": ("up_blocks.2.attentions.2", 640),
    "output_blocks.9.1": ("up_blocks.3.attentions.0", 320),
    "output_blocks.10.1": ("up_blocks.3.attentions.1", 320),
    "output_blocks.11.1": ("up_blocks.3.attentions.2", 320),
}
# The toy model (layers_per_block=1; blocks CrossAttnDown, CrossAttnDown, Down / Up, CrossAttnUp, CrossAttnUp;
# channels 48 / 64 / 128, toy world 2).
TOY_LAYERS = {
    "input_blocks.1.1": ("down_blocks.0.attentions.0", 48),
    "input_blocks.3.1": ("down_blocks.1.attentions.0", 64),
    "middle_block.1": ("mid_block.attentions.0", 128),
    "output_blocks.2.1": ("up_blocks.1.attentions.0", 64),
    "output_blocks.3.1": ("up_blocks.1.attentions.1", 64),
    "output_blocks.4.1": ("up_blocks.2.attentions.0", 48),
    "output_blocks.5.1": ("up_blocks.2.attentions.1", 48),
}


def authors_checkpoint(layers: dict, *, key_residuals: bool = False, seed: int = 0, word: str = "cat") -> dict:
    """A dict in the structure of the authors' ``torch.save``: C_inv, target_input, embedding, target_output."""
    gen = torch.Generator().manual_seed(seed)
    target_output = OrderedDict()
    for block, (_, size) in layers.items():
        target_output[f"{block}.transformer_blocks.0.attn2.to_v.target_output"] = torch.randn(size, generator=gen)
        if key_residuals:
            target_output[f"{block}.transformer_blocks.0.attn2.to_k.target_output"] = torch.randn(size, generator=gen)
    return {
        "global_step": 1500,
        "C_inv": torch.randn(768, 768, generator=gen),
        "target_input": torch.randn(768, generator=gen),
        "embedding": {
            "initializer_words": [word],
            "string_to_token": {"*": torch.tensor(2368)},
            "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, 768, generator=gen))}),
        },
        "target_output": target_output,
    }


def save(checkpoint, path: Path) -> Path:
    torch.save(checkpoint, path)
    return path


class Payload:
    """Pickles as a call to ``Path.write_text``: unpickling it with plain pickle would write the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "the checkpoint ran code"))


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("payload", "refused"), [(Payload, "getattr"), (SystemPayload, "posix.system")])
def test_a_reduce_payload_is_refused_and_never_runs(tmp_path, payload, refused):
    marker = tmp_path / "ran"
    checkpoint = authors_checkpoint(TOY_LAYERS)
    checkpoint["embedding"]["extra"] = payload(marker)
    path = save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(ConversionError, match=f"Refused to read .*evil.ckpt.*references the global '{refused}'"):
        load_checkpoint(path)
    assert not marker.exists()
    assert main([str(path), "--output_dir", str(tmp_path / "out"), "--unet_config", "sd15"]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(path, weights_only=False)  # the control: an unrestricted unpickler does run the payload
    assert marker.exists()


def test_other_globals_are_refused_too(tmp_path):
    checkpoint = authors_checkpoint(TOY_LAYERS)
    checkpoint["model"] = torch.nn.Linear(2, 2)  # a module of any other class: its global is not allowed
    with pytest.raises(ConversionError, match="torch.nn.modules.linear.Linear"):
        load_checkpoint(save(checkpoint, tmp_path / "module.ckpt"))
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "text.ckpt")
    with pytest.raises(ConversionError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ConversionError, match="holds a list"):
        load_checkpoint(save([torch.zeros(2)], tmp_path / "list.ckpt"))


def test_the_authors_structure_loads_with_its_parameter_dict(tmp_path):
    loaded = load_checkpoint(save(authors_checkpoint(TOY_LAYERS), tmp_path / "cat.ckpt"))
    assert isinstance(loaded["embedding"]["string_to_param"], torch.nn.ParameterDict)
    assert loaded["global_step"] == 1500 and loaded["C_inv"].shape == (768, 768)


def test_ldm_names_map_as_in_diffusers_single_file_conversion():
    for block, (path, _) in SD15_LAYERS.items():
        got = ldm_to_diffusers(block, "transformer_blocks.0", layers_per_block=2)
        assert got == f"{path}.transformer_blocks.0.attn2"
    for block, (path, _) in TOY_LAYERS.items():
        got = ldm_to_diffusers(block, "transformer_blocks.3", layers_per_block=1)
        assert got == f"{path}.transformer_blocks.3.attn2"
    with pytest.raises(ConversionError, match="input convolution"):
        ldm_to_diffusers("input_blocks.0.1", "transformer_blocks.0", layers_per_block=2)


def test_sd15_checkpoint_converts_every_layer_to_its_diffusers_path(tmp_path):
    checkpoint = authors_checkpoint(SD15_LAYERS)
    path = save(checkpoint, tmp_path / "my_cat.ckpt")
    assert main([str(path), "--output_dir", str(tmp_path / "my_cat"), "--unet_config", "sd15"]) == 0
    file = tmp_path / "my_cat" / "infusion_concept.safetensors"
    concept = InfusionConcept.from_file(file)
    assert concept.class_word == "cat" and len(concept.residuals) == 16 and concept.num_values == 12480
    for block, (module, _) in SD15_LAYERS.items():
        expected = checkpoint["target_output"][f"{block}.transformer_blocks.0.attn2.to_v.target_output"]
        assert torch.equal(concept.residuals[f"{module}.transformer_blocks.0.attn2"], expected)
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata()["converted_from"] == "my_cat.ckpt (authors' code zwl666666/infusion, global_step 1500)"
    assert concept.metadata["converted_from"].startswith("my_cat.ckpt")
    assert "Converted from `my_cat.ckpt" in (tmp_path / "my_cat" / "README.md").read_text()


def test_converted_toy_concept_loads_into_the_toy_pipeline(tmp_path):
    """--base_model reads unet/config.json of a model folder; the file loads into that model's pipeline."""
    checkpoint = authors_checkpoint(TOY_LAYERS, word="teddy")
    checkpoint = {**checkpoint.pop("target_output"), **checkpoint}  # keys at the top level work too
    path = save(checkpoint, tmp_path / "teddy.ckpt")
    out = tmp_path / "teddy"
    assert main([str(path), "--output_dir", str(out), "--base_model", str(TOY_MODEL_DIR)]) == 0
    pipe = InfusionPipeline.from_pretrained(str(TOY_MODEL_DIR))
    name = pipe.load_infusion_concept(out)
    loaded = pipe.infusion_concepts[name]
    assert loaded.class_word == "teddy" and loaded.base_model == str(TOY_MODEL_DIR)
    assert loaded.to(torch.float16).metadata == loaded.metadata and "teddy.ckpt" in loaded.metadata["converted_from"]
    for block, (module, _) in TOY_LAYERS.items():
        key = f"{block}.transformer_blocks.0.attn2.to_v.target_output"
        assert torch.equal(loaded.residuals[f"{module}.transformer_blocks.0.attn2"], checkpoint[key])


def test_key_residuals_are_refused_unless_dropped(tmp_path, caplog):
    path = save(authors_checkpoint(TOY_LAYERS, key_residuals=True), tmp_path / "xformers.ckpt")
    args = [str(path), "--output_dir", str(tmp_path / "out"), "--base_model", str(TOY_MODEL_DIR)]
    with caplog.at_level("ERROR"):
        assert main(args) == 2
    assert "holds key residuals (7 layers" in caplog.text and "changes the attention maps" in caplog.text
    assert "--drop-key-residuals" in caplog.text and not (tmp_path / "out").exists()
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main([*args, "--drop-key-residuals"]) == 0
    assert "Dropping 7 key residuals" in caplog.text
    concept = InfusionConcept.from_pretrained(tmp_path / "out")
    assert len(concept.residuals) == 7 and concept.metadata["converted_from"].endswith("7 key residuals dropped")


def test_lengths_and_layers_are_checked_against_the_target_unet(tmp_path):
    sd15 = authors_checkpoint(SD15_LAYERS)
    toy_config = json.loads((TOY_MODEL_DIR / "unet" / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"'input_blocks.1.1.* has 320 values but 'down_blocks.0.attentions.0"):
        convert_checkpoint(sd15, toy_config)
    extra = authors_checkpoint({**TOY_LAYERS, "input_blocks.2.1": ("", 48)})
    with pytest.raises(ConversionError, match=r"'input_blocks\.2\.1\..*' maps to 'down_blocks\.0\.attentions\.1\..*"
                                              r"which the target UNet does not have"):  # fmt: skip
        convert_checkpoint(extra, toy_config)
    wrong = authors_checkpoint(TOY_LAYERS)
    wrong["target_output"]["middle_block.1.transformer_blocks.0.attn2.to_v.target_output"] = torch.zeros(1280)
    with pytest.raises(ConversionError, match=r"has 1280 values but 'mid_block.attentions.0.transformer_blocks.0"
                                              r".attn2' of the target UNet expects 128"):  # fmt: skip
        convert_checkpoint(wrong, toy_config)
    partial = authors_checkpoint(TOY_LAYERS)
    del partial["target_output"]["input_blocks.1.1.transformer_blocks.0.attn2.to_v.target_output"]
    with pytest.raises(ConversionError, match=r"no value residual for 1 of .* 7 .*'down_blocks.0.attentions.0"):
        convert_checkpoint(partial, toy_config)
    stray = authors_checkpoint(TOY_LAYERS)
    stray["target_output"]["input_blocks.1.1.transformer_blocks.0.attn1.to_v.target_output"] = torch.zeros(48)
    with pytest.raises(ConversionError, match="attn1.to_v.target_output' is not a cross-attention value or key"):
        convert_checkpoint(stray, toy_config)
    with pytest.raises(ConversionError, match="holds no"):
        convert_checkpoint({"global_step": 3}, toy_config)
    nameless = authors_checkpoint(TOY_LAYERS)
    nameless.pop("embedding")
    with pytest.raises(ConversionError, match="no class word .* Pass --class_word"):
        convert_checkpoint(nameless, toy_config)
    assert convert_checkpoint(nameless, toy_config, class_word="dog").class_word == "dog"


def test_module_and_console_entry_points(tmp_path):
    path = save(authors_checkpoint(SD15_LAYERS), tmp_path / "cat.ckpt")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "diffusers_infusion.convert", str(path), "--output_dir",
                          str(tmp_path / "cat"), "--unet_config", "sd15"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class word 'cat', 16 layers, 12480 values" in out.stderr
    assert (tmp_path / "cat" / "infusion_concept.safetensors").is_file()
