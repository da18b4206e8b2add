"""The attribute reader: reads background, and class, look and position of each object, off a toy-world image.

A tiny CNN (shipped as ``reader.safetensors`` beside this file, fp16) trained on freshly rendered scenes, half of
them passed through the toy model's autoencoder so that it also reads decoded images. For each of the three
position slots (left, center, right) it predicts whether an object is there, its class, its look (first color,
pattern, second color, mark and mark color); for the whole image, the background.

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

from .looks import MARKS, PATTERN_KINDS
from .world import BACKGROUNDS, CLASSES, COLORS, POSITIONS, UNNAMED_LOOK_PREFIX, Scene, to_array

logger = logging.getLogger(__name__)

READER_PATH = Path(__file__).with_name("reader.safetensors")
SLOTS: tuple[str, ...] = tuple(POSITIONS)  # left, center, right
_COLORS = tuple(COLORS)
_N_CLS = len(CLASSES) + 1  # index 0: no object in this slot
_N_COL = len(_COLORS)
_N_MARK = len(MARKS) + 1  # index 0: no mark
#: Per slot: class (6), color a (8), color b (8), pattern (5), mark (5), mark color (8).
HEADS: tuple[tuple[str, int], ...] = (
    ("cls", _N_CLS), ("color", _N_COL), ("color_b", _N_COL), ("pattern", len(PATTERN_KINDS)), ("mark", _N_MARK),
    ("mark_color", _N_COL),
)  # fmt: skip
_PER_SLOT = sum(n for _, n in HEADS)


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class _WindowBranch(nn.Module):
    """Full-resolution convolutions over each slot's window (40 x 32 pixels, rows 16..55, columns x - 16 .. x + 15).

    The base of :class:`MarkBranch` and :class:`PatternBranch`: five convolutions and two poolings make a
    (2 * width, 10, 8) map per window; each subclass reads it with its own head (``classify``).
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv(3, w), *_conv(w, w), nn.MaxPool2d(2), *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 2 * w),
        )  # fmt: skip

    @staticmethod
    def windows(x: torch.Tensor, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """(N, 3, 64, 64) -> (N, 3 slots, 3, 40, 32), each slot's window moved by ``shift`` = (dx, dy) ≤ 4 pixels."""
        dx, dy = shift
        padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
        rows = slice(20 + dy, 60 + dy)
        return torch.stack([padded[:, :, rows, POSITIONS[s] - 12 + dx : POSITIONS[s] + 20 + dx] for s in SLOTS], 1)


class MarkBranch(_WindowBranch):
    """Reads each slot's mark and mark color off the image's pixels at full resolution.

    The marks are 5-8 pixels across; at the trunk's 16x16 resolution a star, a heart, a disc and a square look
    alike. This branch takes the maximum of its features over the window, so it finds a mark wherever the object's
    class and size put it. It is trained after the trunk, on its own (``train_reader.py``), so it changes no other
    reading.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__(width)
        self.head = nn.Sequential(nn.Linear(2 * width, 64), nn.ReLU(), nn.Linear(64, _N_MARK + _N_COL))

    def classify(self, windows: torch.Tensor) -> torch.Tensor:
        """(M, 3, 40, 32) windows -> (M, marks + colors) logits."""
        return self.head(self.features(windows - 0.5).amax((2, 3)))


class PatternBranch(_WindowBranch):
    """Reads each slot's pattern kind off the image's pixels at full resolution.

    A band and two halves differ by where the second color starts: 0.1 of the object's half-height higher for the
    band, one or two pixel rows on a car, which the trunk's 32x32 map blurs. This branch keeps the layout of the
    window (one more pooling to 5 x 4 cells, then a dense head). Trained after the trunk, on its own
    (``train_reader.py``); the colors stay the trunk's.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__(width)
        self.head = nn.Sequential(
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * 5 * 4, 128), nn.ReLU(),
            nn.Linear(128, len(PATTERN_KINDS)),
        )  # fmt: skip

    def classify(self, windows: torch.Tensor) -> torch.Tensor:
        """(M, 3, 40, 32) windows -> (M, patterns) logits."""
        return self.head(self.features(windows - 0.5))


class ToyReaderNet(nn.Module):
    """CNN: (N, 3, 64, 64) in [0, 1] -> background logits (N, 5) and, per head of :data:`HEADS`, (N, 3, n).

    A shared trunk makes feature maps at 32x32 (48 channels) and 16x16 (96 channels). Each position slot reads the
    same window around its object's place from both, 40 x 32 pixels (rows 16..55, columns x - 16 .. x + 15): the
    coarse map for class, colors and pattern, the fine one for details. One slot head serves the three slots, so
    what is learned about an object at one position serves at the others; the background is read from the whole
    coarse map. The marks are read by :class:`MarkBranch` and the pattern by :class:`PatternBranch` (``forward``);
    the slot head's own mark and pattern outputs (``trunk``) only train the trunk.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fine = nn.Sequential(*_conv(3, 24), nn.MaxPool2d(2), *_conv(24, 48), *_conv(48, 48))  # (N, 48, 32, 32)
        self.coarse = nn.Sequential(nn.MaxPool2d(2), *_conv(48, 96))  # (N, 96, 16, 16)
        self.down = nn.Sequential(nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.slot = nn.Sequential(
            *_conv(96 + 64, 96), nn.MaxPool2d(2), nn.Flatten(),  # (N * 3, 96 * 5 * 4)
            nn.Linear(96 * 5 * 4, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, _PER_SLOT),
        )  # fmt: skip
        self.background = nn.Linear(96, len(BACKGROUNDS))
        self.marks = MarkBranch()
        with torch.random.fork_rng(devices=[]):  # drawn aside: the trunk's training (dropout) draws as before
            self.patterns = PatternBranch()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        background, heads = self.trunk(x)
        windows = MarkBranch.windows(x).flatten(0, 1)  # (N * 3, 3, 40, 32): one window per slot, for both branches
        marks = self.marks.classify(windows).view(len(x), len(SLOTS), -1)  # (N, 3, marks + colors)
        heads["mark"], heads["mark_color"] = marks[..., :_N_MARK], marks[..., _N_MARK:]
        heads["pattern"] = self.patterns.classify(windows).view(len(x), len(SLOTS), -1)  # (N, 3, patterns)
        return background, heads

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The trunk's readings: background logits and every head of :data:`HEADS` from the slot head."""
        fine = self.fine(x - 0.5)  # (N, 48, 32, 32)
        coarse = self.coarse(fine)  # (N, 96, 16, 16)
        windows = []
        for slot in SLOTS:
            c = POSITIONS[slot] // 4  # feature column of the slot's center: 4, 8, 12
            f = self.down(fine[:, :, 8:28, 2 * c - 8 : 2 * c + 8])  # (N, 64, 10, 8)
            windows.append(torch.cat([coarse[:, :, 4:14, c - 4 : c + 4], f], 1))  # (N, 160, 10, 8)
        slots = self.slot(torch.stack(windows, 1).flatten(0, 1)).view(len(x), len(SLOTS), _PER_SLOT)  # (N, 3, 40)
        heads, i = {}, 0
        for name, n in HEADS:
            heads[name] = slots[..., i : i + n]
            i += n
        return self.background(coarse.mean((2, 3))), heads


@dataclass(frozen=True)
class ToyReadObject:
    """One object read off an image: class, color, position slot, the reader's confidence it is there, its look.

    ``color`` is the object's (first) color; ``pattern`` one of :data:`~.looks.PATTERN_KINDS` (``plain`` for one
    color), ``color_b`` its second color (None when plain), ``mark`` and ``mark_color`` its mark (None when none).
    """

    cls: str
    color: str
    position: str
    presence: float
    pattern: str = "plain"
    color_b: str | None = None
    mark: str | None = None
    mark_color: str | None = None


@dataclass(frozen=True)
class Reading:
    """What the reader sees in one image: the background and the objects (most confident first)."""

    background: str
    objects: tuple[ToyReadObject, ...]
    main: ToyReadObject  # the most confident slot, even when its presence is below the threshold


def scene_targets(scene: Scene) -> tuple[int, list[list[int]]]:
    """Training targets of a scene: background index, per slot the index of each head of :data:`HEADS`.

    Empty slots have class 0 and every other head ignored (-100); colors of unnamed (``rgb-``) looks and looks
    known only by a painter's name are ignored too.
    """
    slots = [[0] + [-100] * (len(HEADS) - 1) for _ in SLOTS]
    for obj in scene.objects:
        t = slots[SLOTS.index(obj.position)]
        t[0] = CLASSES.index(obj.cls) + 1
        look = obj.look
        if look is not None:
            t[1:] = [_COLORS.index(look.a), _COLORS.index(look.b), PATTERN_KINDS.index(look.pattern)]
            t.append(MARKS.index(look.mark) + 1 if look.mark else 0)
            t.append(_COLORS.index(look.mark_color) if look.mark else -100)
        elif obj.pattern is None:
            t[1:] = [_COLORS.index(obj.color), _COLORS.index(obj.color), 0, 0, -100]
        elif obj.pattern.startswith(UNNAMED_LOOK_PREFIX):  # one unnamed color, no mark
            t[1:] = [-100, -100, 0, 0, -100]
    return BACKGROUNDS.index(scene.background), slots


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
        bg, heads = net(x[i : i + batch])
        p_cls = heads["cls"].softmax(-1)  # (B, 3, 6)
        presence = 1.0 - p_cls[..., 0]  # (B, 3)
        kind = p_cls[..., 1:].argmax(-1)  # (B, 3)
        best = {name: heads[name].argmax(-1) for name, _ in HEADS[1:]}  # each (B, 3)
        for b in range(len(bg)):
            objs = []
            for s in range(len(SLOTS)):
                pattern = PATTERN_KINDS[best["pattern"][b, s]]
                mark = int(best["mark"][b, s])
                objs.append(
                    ToyReadObject(
                        CLASSES[kind[b, s]],
                        _COLORS[best["color"][b, s]],
                        SLOTS[s],
                        float(presence[b, s]),
                        pattern=pattern,
                        color_b=None if pattern == "plain" else _COLORS[best["color_b"][b, s]],
                        mark=MARKS[mark - 1] if mark else None,
                        mark_color=_COLORS[best["mark_color"][b, s]] if mark else None,
                    )
                )
            objs.sort(key=lambda o: -o.presence)
            found = tuple(o for o in objs if o.presence > threshold)
            out.append(Reading(BACKGROUNDS[int(bg[b].argmax())], found, objs[0]))
    return out


def reader_accuracy(scenes: list[Scene], images=None, *, reader: ToyReaderNet | None = None) -> dict[str, float]:
    """Accuracy of the reader on scenes whose truth is known (rendered when ``images`` is None).

    Returns:
        Fractions in [0, 1]: ``background``; ``class``, ``color``, ``position`` over all true objects (an object
        counts as found at its position when the reader's object at that slot is present; ``color`` over objects
        of a known first color); ``pattern`` (pattern and both colors right), ``mark`` (mark and its color right,
        or no mark read where there is none) over objects with a :class:`~.looks.Look`; ``count`` (the number of
        objects read equals the truth).
    """
    from .world import render

    if images is None:
        images = [render(s) for s in scenes]
    readings = read_images(images, reader=reader)
    hits = dict.fromkeys(("background", "class", "color", "position", "count", "pattern", "mark"), 0)
    n_obj = n_col = n_look = 0
    for scene, reading in zip(scenes, readings):
        hits["background"] += reading.background == scene.background
        hits["count"] += len(reading.objects) == len(scene.objects)
        by_pos = {o.position: o for o in reading.objects}
        for obj in scene.objects:
            n_obj += 1
            got = by_pos.get(obj.position)
            hits["position"] += got is not None
            hits["class"] += got is not None and got.cls == obj.cls
            if obj.pattern is None or obj.look is not None:
                n_col += 1
                hits["color"] += got is not None and got.color == obj.color
            if obj.look is not None:
                n_look += 1
                hits["pattern"] += got is not None and look_matches(got, obj.look)
                hits["mark"] += got is not None and (got.mark, got.mark_color) == (obj.look.mark, obj.look.mark_color)
    n = len(scenes)
    return {
        "background": hits["background"] / n,
        "class": hits["class"] / n_obj,
        "color": hits["color"] / max(1, n_col),
        "position": hits["position"] / n_obj,
        "pattern": hits["pattern"] / max(1, n_look),
        "mark": hits["mark"] / max(1, n_look),
        "count": hits["count"] / n,
    }


def look_matches(read: ToyReadObject, look) -> bool:
    """Whether a read object shows ``look``'s pattern in its two colors (the mark is not asked for)."""
    if read.pattern != look.pattern:
        return False
    return read.color == look.a and (look.pattern == "plain" or read.color_b == look.b)


def reader_loss(net: ToyReaderNet, x: torch.Tensor, bg: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The trunk's loss: cross-entropy of every head; ``slots``: (N, 3, len(HEADS)) targets, -100 where ignored."""
    p_bg, heads = net.trunk(x)
    loss = F.cross_entropy(p_bg, bg)
    for k, (name, n) in enumerate(HEADS):
        target = slots[..., k].reshape(-1)
        if (target >= 0).any():
            loss = loss + F.cross_entropy(heads[name].reshape(-1, n), target, ignore_index=-100)
    return loss


MARK_HEADS = (HEADS.index(("mark", _N_MARK)), HEADS.index(("mark_color", _N_COL)))  # their columns in the targets
PATTERN_HEAD = HEADS.index(("pattern", len(PATTERN_KINDS)))


def mark_loss(branch: MarkBranch, windows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mark branch's loss on (M, 3, 40, 32) windows; ``targets``: (M, len(HEADS)), -100 where ignored."""
    keep = targets[:, MARK_HEADS[0]] >= 0  # slots with an object whose mark is known
    if not keep.any():
        return branch.classify(windows[:1]).sum() * 0.0  # nothing to learn from this batch
    logits = branch.classify(windows[keep])
    mark, color = targets[keep][:, MARK_HEADS[0]], targets[keep][:, MARK_HEADS[1]]
    loss = F.cross_entropy(logits[:, :_N_MARK], mark)
    if (color >= 0).any():
        loss = loss + F.cross_entropy(logits[:, _N_MARK:], color, ignore_index=-100)
    return loss


def pattern_loss(branch: PatternBranch, windows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The pattern branch's loss on (M, 3, 40, 32) windows; ``targets``: (M, len(HEADS)), -100 where ignored."""
    keep = targets[:, PATTERN_HEAD] >= 0  # slots with an object whose pattern is known
    if not keep.any():
        return branch.classify(windows[:1]).sum() * 0.0  # nothing to learn from this batch
    return F.cross_entropy(branch.classify(windows[keep]), targets[keep][:, PATTERN_HEAD])
