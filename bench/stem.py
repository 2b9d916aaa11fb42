"""Why the `tiny` config has a conv stem: shape learning of the tiny ViT, patch vs conv stem.

    python bench/stem.py [--stem patch|conv] [--channels 24] [--steps 1500] [--seed 0] [--lr 1e-3]
                         [--bn-batch 32] [--order fixed] [--n 16000 --zeroshot-n 8000]
                         [--scale 0.85 1 --ratio 1 1] [--gray 0.2] [--ema 0.99] [--wd 0.1]

A single-process loop, not the training job: the `tiny` model (frozen MiniLM, late fusion,
CLIP loss, batch 64, AdamW, cosine lr) on the curated shards of an n-row sample crawl, with
the frozen text tower's features computed once per caption so that a run takes minutes.
Every `--eval-every` steps it prints zero-shot top-1 (5-template ensemble) on the sample's
`zeroshot/shape` and `zeroshot/colour` (held-out colour × shape compositions, never in the
crawl; the training job's evaluation) and shape top-1 on 100 images of compositions the
crawl has (`shape_seen`). Chance: shape 0.20, colour 0.17.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.train import OUT, shards
from mmcore.data.inputs import held_out
from mmcore.data.sample import BACKGROUNDS, COLOURS, SHAPES, heldout, render
from mmcore.data.shards import read_shards
from mmcore.data.transforms import TransformConfig, train_transform
from mmcore.eval.run import zeroshot_eval
from mmcore.eval.zeroshot import accuracy
from mmcore.inference import Engine
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig, tokenize
from mmcore.training import cosine_lr, param_groups


def seen_shapes(rng: np.random.Generator, per_shape: int) -> tuple[list, torch.Tensor]:
    """Single-object images of compositions the crawl has, drawn as `mmray sample-data` draws
    its zero-shot sets of held-out ones."""
    images, labels = [], []
    for label, shape in enumerate(SHAPES):
        colours = [c for c in COLOURS if not heldout(c, shape)]
        for k in range(per_shape):
            x, y = rng.uniform(0.35, 0.65, size=2)
            obj = (("small", "large")[k % 2], colours[k % len(colours)], shape, x, y)
            images.append(render(rng, 128, 128, [obj], list(BACKGROUNDS)[k % 5]))
            labels.append(label)
    return images, torch.tensor(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stem", choices=["patch", "conv"], default="conv")
    p.add_argument("--n", type=int, default=8000, help="sample crawl rows")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=int, default=24, help="the conv stem's first width")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--order", choices=["random", "fixed"], default="random",
                   help="fixed: every epoch the same batches in the same order")  # fmt: skip
    p.add_argument("--zeroshot-n", type=int, default=0,
                   help="score on that crawl's zeroshot/ sets (0: --n's)")  # fmt: skip
    p.add_argument("--scale", type=float, nargs=2, default=[0.6, 1.0], help="crop area range")
    p.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], help="crop w/h range")
    p.add_argument("--wd", type=float, default=0.1, help="weight decay")
    p.add_argument("--gray", type=float, default=0.0, help="grayscale probability")
    p.add_argument("--ema", type=float, default=0.0, help="evaluate an EMA of the weights")
    p.add_argument("--bn-batch", type=int, default=64,
                   help="images per BatchNorm batch (the job: 64 / 2 workers = 32)")  # fmt: skip
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = OUT / f"train-shards-{args.n}"
    if not (data / "manifest.json").exists():
        import ray

        ray.init(num_cpus=2, object_store_memory=300 << 20, include_dashboard=False)
        shards(args.n)
        ray.shutdown()
    keys, images, captions = read_shards(data)
    train = [i for i, key in enumerate(keys) if not held_out(key, 0.1)]
    vision = VisionConfig(size="tiny", image_size=64, stem=args.stem, stem_channels=args.channels)
    locked = TextConfig(kind="minilm", frozen=True, context_length=32)
    model = build_model(ModelConfig(vision=vision, text=locked))
    with torch.no_grad():  # the locked tower's features, once per caption
        tokens = tokenize([captions[i] for i in train], 32)
        ids, mask = tokens["input_ids"].split(256), tokens["attention_mask"].split(256)
        text = torch.cat([model.text(i, m)[1] for i, m in zip(ids, mask, strict=True)])
    seen_images, seen_labels = seen_shapes(rng, 20)
    zeroshot = OUT / f"train-sample-{args.zeroshot_n or args.n}" / "zeroshot"
    opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps, 50))
    augment = TransformConfig(image_size=64, scale=args.scale, ratio=args.ratio)
    start, ema = time.perf_counter(), copy.deepcopy(model) if args.ema else model
    # What training changes, paired once: the trained weights (not the locked text tower's)
    # and the buffers (BatchNorm's statistics).
    moving = lambda m: [p for p in m.parameters() if p.requires_grad] + list(m.buffers())  # noqa: E731
    averaged = list(zip(moving(ema), moving(model), strict=True)) if args.ema else []
    fixed = rng.permutation(len(train)) if args.order == "fixed" else None
    model.train()
    for step in range(1, args.steps + 1):
        if fixed is None:
            idx = rng.choice(len(train), 64, replace=False)
        else:  # the k-th batch of every epoch holds the same rows
            k = (step - 1) % (len(train) // 64)
            idx = fixed[k * 64 : (k + 1) * 64]
        batch = [images[train[i]] for i in idx]
        if args.gray:
            batch = [img.convert("L") if rng.random() < args.gray else img for img in batch]
        pixels = np.stack([train_transform(img, augment, rng) for img in batch])
        parts = np.split(pixels, 64 // args.bn_batch)  # each a forward of its own, as on a rank
        image = torch.cat([model.encode_image(torch.from_numpy(part)) for part in parts])
        logits = model.scales()[0] * image @ F.normalize(model.text_projection(text[idx])).T
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, m in averaged:  # BatchNorm's counters copied, the rest averaged
                e.copy_(e * args.ema + m * (1 - args.ema) if e.is_floating_point() else m)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            ema.eval()
            seen = accuracy(Engine(ema).class_scores(seen_images, list(SHAPES)), seen_labels)
            row = {"stem": args.stem, "scale": args.scale, "ratio": args.ratio, "wd": args.wd,
                   "ema": args.ema, "gray": args.gray, "lr": args.lr, "seed": args.seed,
                   "channels": args.channels, "bn_batch": args.bn_batch,
                   "order": args.order, "n": args.n, "step": step,
                   "seconds": round(time.perf_counter() - start),
                   "shape_heldout": zeroshot_eval(ema, zeroshot / "shape")["top1"],
                   "shape_seen": seen["top1"],
                   "colour": zeroshot_eval(ema, zeroshot / "colour")["top1"]}  # fmt: skip
            print(json.dumps(row), flush=True)
            model.train()


if __name__ == "__main__":
    main()
