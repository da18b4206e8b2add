"""Why single-vector Textual Inversion learns little on toy world 2: diagnostic variants (docs/toy_world.md).

Each is the paper's Textual Inversion (one trainable vector of 64 values, prompts "a photo of a <concept>")
changed in one place, run through the overfitting benchmark's loop, seeds and metrics:

- ``ti_output``: the vector is the text encoder's *output* at the concept's position (it starts at the class
  word's output there); no encoder stands between it and the UNet, so it bounds what a better encoder could put at
  that position.
- ``ti_own_position``: the paper's input embedding, but every other token is encoded as if the class word stood
  there, so the vector changes its own position's output only (with one causal layer, it otherwise reaches every
  later token too).
- ``ti_object_loss``: the paper's Textual Inversion with the denoising loss counted on the latent cells the
  photos' object covers (the union of the five photos' object masks), so the background costs nothing.
- ``ti_output_object_loss``: the first and the third together.

The data rather than the method: ``overfitting.py --scene-captions`` trains any method on captions that also name
the photos' position and background.

These are measurements, not methods to use (nothing else imports them)::

    OMP_NUM_THREADS=1 python benchmarks/ti_diagnostics.py --steps 400 1000 --output-dir out/ti_diagnostics

Every other argument is ``overfitting.py``'s; ``--methods`` defaults to the four variants.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from diffusers_infusion.baselines import METHODS
from diffusers_infusion.baselines.textual_inversion import TextualInversionMethod

_spec = importlib.util.spec_from_file_location("overfitting", Path(__file__).with_name("overfitting.py"))
overfitting = importlib.util.module_from_spec(_spec)  # the benchmark whose loop, seeds and metrics are used
_spec.loader.exec_module(overfitting)

WEIGHT_NAME = "output_vector.safetensors"


class OutputVectorTI(TextualInversionMethod):
    """The trainable vector replaces the text encoder's output (after its final layer norm) at the concept token."""

    name = "ti_output"

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        encoder, tokenizer = self.token.text_encoder, self.token.tokenizer
        ids = tokenizer(f"a photo of a {self.class_word}", padding="max_length",
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        word = tokenizer(self.class_word, add_special_tokens=False).input_ids[-1]
        with torch.no_grad():
            start = encoder(ids)[0][0, ids[0].tolist().index(word)]  # (dim,): the class word's output
        self.output = torch.nn.Parameter(start.clone())
        self._ids: torch.Tensor | None = None
        encoder.get_input_embeddings().register_forward_pre_hook(lambda module, args: setattr(self, "_ids", args[0]))
        encoder.final_layer_norm.register_forward_hook(self._put_output)

    def _put_output(self, module, args, output: torch.Tensor) -> torch.Tensor:
        """output: (batch, tokens, dim); the concept token's rows become the trained vector."""
        at = (self._ids == self.token.token_id).unsqueeze(-1)
        return torch.where(at, self.output.to(output.dtype), output)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.output]

    def _save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({"output": self.output.detach().float().contiguous()}, str(directory / WEIGHT_NAME))

    def _load_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        with torch.no_grad():
            self.output.copy_(load_file(str(directory / WEIGHT_NAME))["output"])


class OwnPositionTI(TextualInversionMethod):
    """The paper's input embedding; the other tokens' outputs are those of the prompt with the class word."""

    name = "ti_own_position"

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        self.class_id = self.token.tokenizer(self.class_word, add_special_tokens=False).input_ids[-1]
        self._inside = False
        self.token.text_encoder.register_forward_hook(self._keep_other_tokens, with_kwargs=True)

    def _keep_other_tokens(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs["input_ids"]
        at = ids == self.token.token_id  # (batch, tokens)
        if self._inside or not at.any():
            return output
        self._inside = True
        try:
            rest = {k: v for k, v in kwargs.items() if k != "input_ids"}
            plain = module(torch.where(at, self.class_id, ids), *args[1:], **rest)[0]  # (batch, tokens, dim)
        finally:
            self._inside = False
        output["last_hidden_state"] = torch.where(at.unsqueeze(-1), output[0], plain)
        return output


class _ObjectLoss:
    """The denoising loss counted on the latent cells covered by the object in any of the concept's photos."""

    def object_cells(self) -> torch.Tensor:
        """(1, 1, h, w) in {0, 1}: latent cells (16 x 16 on the toy model) that hold the photos' object."""
        import numpy as np

        from diffusers_infusion.toy import CONCEPTS
        from diffusers_infusion.toy.world import object_pixels

        concept = next(c for c in CONCEPTS.values() if c.class_word == self.class_word)
        masks = [object_pixels(scene) for scene in concept.photo_scenes()]  # each (64, 64)
        pixels = torch.from_numpy(np.any(masks, 0)).float()[None, None]
        side = self.pipe.unet.config.sample_size
        return torch.nn.functional.adaptive_max_pool2d(pixels, side)

    def training_loss(self, latents, captions, *, noise, timesteps):
        if not hasattr(self, "_cells"):
            self._cells = self.object_cells()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encodings = self.encode_prompts([self.concept_prompt(c) for c in captions])
        pred = self.pipe.unet(noisy, timesteps, encodings, return_dict=False)[0]
        err = (pred.float() - self.target(latents, noise, timesteps).float()).square()  # (B, C, h, w)
        cells = self._cells.to(err)
        return (err * cells).mean() / cells.mean()


class ObjectLossTI(_ObjectLoss, TextualInversionMethod):
    name = "ti_object_loss"


class OutputVectorObjectLossTI(_ObjectLoss, OutputVectorTI):
    name = "ti_output_object_loss"


DIAGNOSTICS = (OutputVectorTI, OwnPositionTI, ObjectLossTI, OutputVectorObjectLossTI)


def register() -> list[str]:
    """Make the variants rows of ``overfitting.py`` (methods, rows, report order); returns their names."""
    names = []
    for cls in DIAGNOSTICS:
        METHODS[cls.name] = cls
        overfitting.VARIANTS[cls.name] = (cls.name, {})
        if cls.name not in overfitting.TRAINED:
            overfitting.TRAINED.append(cls.name)
            overfitting.METHOD_ORDER = (*overfitting.METHOD_ORDER, cls.name)
        names.append(cls.name)
    return names


def main(argv: list[str] | None = None) -> None:
    names = register()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--methods" not in argv:
        argv += ["--methods", *names]
    overfitting.main(argv)


if __name__ == "__main__":
    main()
