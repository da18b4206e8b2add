"""Train the toy world's attribute reader (a tiny CNN) on freshly rendered scenes; ships as ``reader.safetensors``.

Half of the training images are passed through the toy model's autoencoder (encode + decode), so the reader
also reads decoded (generated) images, whose edges and textures are softer than rendered ones. Scenes include
two objects at any two positions, no object at all, looks (patterns in two colors, marks) and personal concepts.

Three stages: the trunk (background, class, colors, pattern, position); then the mark branch on its own, on scenes
where most objects carry a mark, with its windows shifted by up to 2 pixels and mirrored (every mark is symmetric);
then the pattern branch on its own, on scenes where most objects wear a look, shifted but not mirrored (a mirror
swaps the sides' colors and turns the diagonal the other way).

    python examples/toy_world/train_reader.py --vae examples/toy_world/model
    python examples/toy_world/train_reader.py --marks-only      # retrain the mark branch of the shipped reader
    python examples/toy_world/train_reader.py --patterns-only   # retrain its pattern branch

Prints the reader's accuracy on 2000 (``--eval-images``) freshly rendered scenes (seeds never used in training),
clean and decoded.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusers_infusion.toy.concepts import CONCEPTS  # noqa: E402
from diffusers_infusion.toy.looks import random_look  # noqa: E402
from diffusers_infusion.toy.reader import (  # noqa: E402
    READER_PATH,
    MarkBranch,
    PatternBranch,
    ToyReaderNet,
    mark_loss,
    pattern_loss,
    reader_accuracy,
    reader_loss,
    scene_targets,
)
from diffusers_infusion.toy.world import (  # noqa: E402
    CLASSES,
    COLORS,
    SIZES,
    Scene,
    ToyObject,
    render,
    sample_scene,
)

logger = logging.getLogger("train_reader")
EVAL_SEED = 10_000_000  # evaluation scenes use seeds from here on; training never does
MARK_SEED = 5_000_000  # the mark stage's scenes (the trunk's use 0 .. --num-images)
MARK_IMAGES, MARK_STEPS = 24000, 6000
PATTERN_SEED = 7_000_000  # the pattern stage's scenes
PATTERN_IMAGES, PATTERN_STEPS = 16000, 4000


def reader_scene(seed: int) -> Scene:
    """A random scene for the reader: like the world's, plus any position pairs, empty scenes and concepts.

    Half of the objects wear a random look (one in five of them a held-out one: the reader reads every look).
    """
    rng = random.Random(f"reader-{seed}")
    scene = sample_scene(seed, two_objects_prob=0.3)
    if rng.random() < 0.03:
        return Scene(scene.background, (), seed)
    objects = list(scene.objects)
    if len(objects) == 2:
        positions = rng.choice([("left", "right"), ("left", "center"), ("center", "right")])
        objects = [ToyObject(rng.choice(CLASSES), rng.choice(list(COLORS)), p, "small") for p in positions]
    objects = [
        replace(o, look=random_look(rng, o.cls, o.color, held_out=rng.random() < 0.2)) if rng.random() < 0.5 else o
        for o in objects
    ]
    if rng.random() < 0.15:
        i = rng.randrange(len(objects))
        concept = rng.choice(list(CONCEPTS.values()))
        objects[i] = concept.object(objects[i].position, rng.choice(list(SIZES)) if len(objects) == 1 else "small")
    return Scene(scene.background, tuple(objects), seed)


def mark_scene(seed: int) -> Scene:
    """A reader scene in which most plain objects get a look, nine in ten of them with a mark (the mark stage)."""
    scene = reader_scene(seed)
    rng = random.Random(f"marks-{seed}")
    objects = [
        replace(o, look=random_look(rng, o.cls, o.color, mark_prob=0.9, held_out=rng.random() < 0.2))
        if o.look is None and o.pattern is None and rng.random() < 0.8 else o
        for o in scene.objects
    ]  # fmt: skip
    return Scene(scene.background, tuple(objects), seed)


def look_scene(seed: int) -> Scene:
    """A reader scene in which most plain objects wear a look (the pattern stage)."""
    scene = reader_scene(seed)
    rng = random.Random(f"looks-{seed}")
    objects = [
        replace(o, look=random_look(rng, o.cls, o.color, held_out=rng.random() < 0.2))
        if o.look is None and o.pattern is None and rng.random() < 0.8 else o
        for o in scene.objects
    ]  # fmt: skip
    return Scene(scene.background, tuple(objects), seed)


def load_vae(path: Path | None):
    if path is None:
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(path), subfolder="vae").eval()


@torch.no_grad()
def vae_roundtrip(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Encode (posterior mean) and decode images (N, 3, 64, 64) in [0, 1]."""
    out = []
    for i in tqdm(range(0, len(x), batch), desc="vae roundtrip", mininterval=5):
        z = vae.encode(x[i : i + batch] * 2 - 1).latent_dist.mean
        out.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def build_set(seeds, vae, roundtrip_share: float, scene=reader_scene) -> tuple[torch.Tensor, list[Scene]]:
    """Render ``scene(s)`` for ``seeds``; the first ``roundtrip_share`` of them go through the VAE."""
    scenes = [scene(s) for s in tqdm(seeds, desc="render", mininterval=5)]
    x = torch.from_numpy(np.stack([np.asarray(render(s), dtype=np.float32) / 255 for s in scenes]))
    x = x.permute(0, 3, 1, 2).contiguous()  # (N, 3, 64, 64)
    k = int(len(x) * roundtrip_share) if vae is not None else 0
    if k:
        x[:k] = vae_roundtrip(vae, x[:k])
    return x, scenes


def train_trunk(net: ToyReaderNet, vae, args: argparse.Namespace) -> None:
    """Stage 1: the trunk and its heads on ``--num-images`` reader scenes."""
    x, scenes = build_set(range(args.num_images), vae, 0.5)
    targets = [scene_targets(s) for s in scenes]
    bg = torch.tensor([t[0] for t in targets])  # (N,)
    slots = torch.tensor([t[1] for t in targets])  # (N, 3, heads)

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        return reader_loss(net, _jitter(x[idx], gen), bg[idx], slots[idx])

    _fit(net, batch_loss, steps=args.steps, args=args, desc="reader")


def train_marks(net: ToyReaderNet, vae, args: argparse.Namespace) -> None:
    """Stage 2: the mark branch alone, on ``--mark-images`` scenes (every other one a mark scene)."""
    seeds = range(MARK_SEED, MARK_SEED + args.mark_images)
    scene = lambda s: mark_scene(s) if s % 2 else reader_scene(s)  # noqa: E731
    _train_branch(net.marks, mark_loss, seeds, scene, vae, args, steps=args.mark_steps, mirror=True, desc="marks")


def train_patterns(net: ToyReaderNet, vae, args: argparse.Namespace) -> None:
    """Stage 3: the pattern branch alone, on ``--pattern-images`` scenes (every other one a look scene)."""
    seeds = range(PATTERN_SEED, PATTERN_SEED + args.pattern_images)
    scene = lambda s: look_scene(s) if s % 2 else reader_scene(s)  # noqa: E731
    _train_branch(net.patterns, pattern_loss, seeds, scene, vae, args, steps=args.pattern_steps, mirror=False,
                  desc="patterns")  # fmt: skip


def _train_branch(branch, loss, seeds, scene, vae, args, *, steps: int, mirror: bool, desc: str) -> None:
    """Fit a window branch on ``scene(s)`` for ``seeds`` (half through the VAE), windows shifted by up to 2 px."""
    x, scenes = build_set(seeds, vae, 0.5, scene=scene)
    slots = torch.tensor([scene_targets(s)[1] for s in scenes])  # (N, 3, heads)

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        shift = tuple(int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        windows = branch.windows(_jitter(x[idx], gen), shift).flatten(0, 1)  # (B * 3, 3, 40, 32)
        if mirror:
            flip = torch.rand(len(windows), generator=gen) < 0.5
            windows = torch.where(flip[:, None, None, None], windows.flip(-1), windows)
        return loss(branch, windows, slots[idx].flatten(0, 1))

    _fit(branch, batch_loss, steps=steps, args=args, desc=desc)


def _fit(module: torch.nn.Module, batch_loss, *, steps: int, args: argparse.Namespace, desc: str) -> None:
    """AdamW, one-cycle schedule, on ``module``'s parameters; ``batch_loss(generator)`` draws and scores a batch."""
    opt = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    module.train()
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for _ in bar:
        loss = batch_loss(gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    module.eval()


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness jitter and a little noise, per image."""
    n = len(x)
    x = x * (0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=gen))
    return (x + 0.03 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, default=Path("examples/toy_world/model"), help="model folder with vae/")
    parser.add_argument("--output", type=Path, default=READER_PATH)
    parser.add_argument("--num-images", type=int, default=24000)
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--mark-images", type=int, default=MARK_IMAGES)
    parser.add_argument("--mark-steps", type=int, default=MARK_STEPS)
    parser.add_argument("--pattern-images", type=int, default=PATTERN_IMAGES)
    parser.add_argument("--pattern-steps", type=int, default=PATTERN_STEPS)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--marks-only", action="store_true", help="keep the rest of --output, retrain the marks")
    only.add_argument("--patterns-only", action="store_true", help="keep the rest of --output, retrain the patterns")
    parser.add_argument("--eval-images", type=int, default=2000, help="fresh scenes to measure the reader on")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    vae = load_vae(args.vae if args.vae and (args.vae / "vae").exists() else None)
    net = ToyReaderNet()
    retrain = "marks" if args.marks_only else "patterns" if args.patterns_only else None
    if retrain:
        if not args.output.is_file():
            parser.error(f"--{retrain}-only keeps the rest of --output; {args.output} does not exist: leave it out.")
        from safetensors.torch import load_file

        kept = {k: v.float() for k, v in load_file(str(args.output)).items() if not k.startswith(f"{retrain}.")}
        lacking = {k.split(".")[0] for k in net.load_state_dict(kept, strict=False).missing_keys} - {retrain}
        if lacking:
            parser.error(f"--{retrain}-only keeps the rest of --output, but {args.output} has no {', '.join(lacking)}"
                         " weights (written before that branch existed): train them first, or leave the flag out.")
        net.eval()
    else:
        train_trunk(net, vae, args)
    if retrain in (None, "marks"):
        torch.manual_seed(args.seed + 1)
        net.marks = MarkBranch()  # drawn here, so --marks-only and a full run start the branch alike
        train_marks(net, vae, args)
    if retrain in (None, "patterns"):
        torch.manual_seed(args.seed + 2)
        net.patterns = PatternBranch()
        train_patterns(net, vae, args)

    from safetensors.torch import save_file

    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(args.output))
    net.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})  # evaluate the fp16 weights
    eval_seeds = range(EVAL_SEED, EVAL_SEED + args.eval_images)
    eval_scenes = [reader_scene(s) for s in eval_seeds]
    clean = reader_accuracy(eval_scenes, reader=net)
    print(f"saved {args.output} after {(time.time() - t0) / 60:.1f} min")
    print(f"accuracy on {len(eval_seeds)} fresh rendered scenes:", {k: round(v, 4) for k, v in clean.items()})
    if vae is not None:
        xe, _ = build_set(eval_seeds, vae, 1.0)
        dec = reader_accuracy(eval_scenes, xe, reader=net)
        print("accuracy on the same scenes through the VAE:", {k: round(v, 4) for k, v in dec.items()})


if __name__ == "__main__":
    main()
