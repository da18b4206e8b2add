"""The attribute reader: reads background, and class, color and position of each object, off a toy-world image.

A tiny CNN (0.44 M parameters, 0.9 MB in fp16, shipped as ``reader.safetensors`` beside this file) trained on
freshly rendered scenes, half of them passed through the toy model's autoencoder so that it also reads decoded
images. For each of the three position slots (left, center, right) it predicts whether an object is there, its
class and its color; for the whole image, the background.

    from diffusers_infusion.toy.reader import read_images
    readings = read_images(images)          # PIL images or a (N, 64, 64, 3) array in [0, 1]
    readings[0].background, readings[0].main  # "beach", ToyReadObject(cls="cat", color="red", position="left", ...)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .world import BACKGROUNDS, CLASSES, COLORS, POSITIONS, Scene, to_array

logger = logging.getLogger(__name__)

READER_PATH = Path(__file__).with_name("reader.safetensors")
SLOTS: tuple[str, ...] = tuple(POSITIONS)  # left, center, right
_COLORS = tuple(COLORS)
_N_CLS = len(CLASSES) + 1  # index 0: no object in this slot
_N_COL = len(_COLORS)


class ToyReaderNet(nn.Module):
    """CNN: (N, 3, 64, 64) in [0, 1] -> background logits (N, 5), slot class logits (N, 3, 6), color (N, 3, 8)."""

    def __init__(self) -> None:
        super().__init__()
        chans = (3, 16, 32, 64)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        layers += [nn.Conv2d(64, 32, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)  # (N, 32, 8, 8)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 192), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(192, len(BACKGROUNDS) + len(SLOTS) * (_N_CLS + _N_COL))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(self.fc(self.features(x - 0.5)))  # (N, 5 + 3 * 14)
        nb = len(BACKGROUNDS)
        slots = out[:, nb:].view(-1, len(SLOTS), _N_CLS + _N_COL)  # (N, 3, 14)
        return out[:, :nb], slots[..., :_N_CLS], slots[..., _N_CLS:]


@dataclass(frozen=True)
class ToyReadObject:
    """One object read off an image: class, color, position slot and the reader's confidence it is there."""

    cls: str
    color: str
    position: str
    presence: float


@dataclass(frozen=True)
class Reading:
    """What the reader sees in one image: the background and the objects (most confident first)."""

    background: str
    objects: tuple[ToyReadObject, ...]
    main: ToyReadObject  # the most confident slot, even when its presence is below the threshold


def scene_targets(scene: Scene) -> tuple[int, list[int], list[int]]:
    """Training targets of a scene: background index, per-slot class index (0 = none), per-slot color (-100)."""
    cls, col = [0] * len(SLOTS), [-100] * len(SLOTS)
    for obj in scene.objects:
        i = SLOTS.index(obj.position)
        cls[i] = CLASSES.index(obj.cls) + 1
        col[i] = _COLORS.index(obj.color) if obj.pattern is None else -100
    return BACKGROUNDS.index(scene.background), cls, col


def _as_tensor(images) -> torch.Tensor:
    """PIL images, a (N, 64, 64, 3) array/tensor in [0, 1], or a (N, 3, 64, 64) tensor -> (N, 3, 64, 64) float."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        return x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x
    arr = images if isinstance(images, np.ndarray) else to_array(list(images))
    return torch.from_numpy(np.asarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)


@lru_cache(maxsize=4)
def load_reader(path: str | Path | None = None) -> ToyReaderNet:
    """The trained reader network (the shipped one when ``path`` is None), in eval mode."""
    from safetensors.torch import load_file

    net = ToyReaderNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path or READER_PATH)).items()})
    return net.eval()


@torch.no_grad()
def read_images(
    images, *, reader: ToyReaderNet | None = None, threshold: float = 0.5, batch: int = 256
) -> list[Reading]:
    """Read background and objects off images.

    Args:
        images: A list of PIL images, or an array/tensor of shape (N, 64, 64, 3) or (N, 3, 64, 64) in [0, 1].
        reader: The network; the shipped one when None.
        threshold: Presence probability above which a slot counts as holding an object.
        batch: Images per forward pass.
    """
    net = reader or load_reader()
    x = _as_tensor(images)
    out: list[Reading] = []
    for i in range(0, len(x), batch):
        bg, cls, col = net(x[i : i + batch])
        p_cls = cls.softmax(-1)  # (B, 3, 6)
        presence = 1.0 - p_cls[..., 0]  # (B, 3)
        kind = p_cls[..., 1:].argmax(-1)  # (B, 3)
        color = col.argmax(-1)  # (B, 3)
        for b in range(len(bg)):
            objs = [
                ToyReadObject(CLASSES[kind[b, s]], _COLORS[color[b, s]], SLOTS[s], float(presence[b, s]))
                for s in range(len(SLOTS))
            ]
            objs.sort(key=lambda o: -o.presence)
            found = tuple(o for o in objs if o.presence > threshold)
            out.append(Reading(BACKGROUNDS[int(bg[b].argmax())], found, objs[0]))
    return out


def reader_accuracy(scenes: list[Scene], images=None, *, reader: ToyReaderNet | None = None) -> dict[str, float]:
    """Accuracy of the reader on scenes whose truth is known (rendered when ``images`` is None).

    Returns:
        Fractions in [0, 1]: ``background``; ``class``, ``color``, ``position`` over all true objects (an object
        counts as found at its position when the reader's object at that slot is present); ``count`` (the number
        of objects read equals the truth).
    """
    from .world import render

    if images is None:
        images = [render(s) for s in scenes]
    readings = read_images(images, reader=reader)
    hits = {"background": 0, "class": 0, "color": 0, "position": 0, "count": 0}
    n_obj = n_col = 0
    for scene, reading in zip(scenes, readings):
        hits["background"] += reading.background == scene.background
        hits["count"] += len(reading.objects) == len(scene.objects)
        by_pos = {o.position: o for o in reading.objects}
        for obj in scene.objects:
            n_obj += 1
            got = by_pos.get(obj.position)
            hits["position"] += got is not None
            hits["class"] += got is not None and got.cls == obj.cls
            if obj.pattern is None:
                n_col += 1
                hits["color"] += got is not None and got.color == obj.color
    n = len(scenes)
    return {
        "background": hits["background"] / n,
        "class": hits["class"] / n_obj,
        "color": hits["color"] / max(1, n_col),
        "position": hits["position"] / n_obj,
        "count": hits["count"] / n,
    }


def reader_loss(net: ToyReaderNet, x: torch.Tensor, bg: torch.Tensor, cls: torch.Tensor, col: torch.Tensor):
    """Cross-entropy of the three heads; ``cls``, ``col``: (N, 3) targets, color -100 where ignored."""
    p_bg, p_cls, p_col = net(x)
    loss = F.cross_entropy(p_bg, bg) + F.cross_entropy(p_cls.reshape(-1, _N_CLS), cls.reshape(-1))
    if (col >= 0).any():
        loss = loss + F.cross_entropy(p_col.reshape(-1, _N_COL), col.reshape(-1), ignore_index=-100)
    return loss
