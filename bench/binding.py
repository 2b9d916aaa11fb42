"""Can the fusion decoder learn to find the object a question names? A synthetic check of the
decoder alone (no tower, no data pipeline, a few minutes on 2 cores).

    python -m bench.binding [--steps 3000] [--seed 0] [--variant colour ...]
    python -m bench.binding --seen-shard DIR   # then: mmray eval vqa --model M --data DIR

The image tokens (65 of the tiny tower's width) are noise plus a position vector each; one or
two of them also carry a colour vector, as a patch of a coloured object would. The decoder of
a ``hybrid`` model as ``build_model`` makes it (2 layers, its text from the locked MiniLM's
embeddings) is trained with the ``vqa`` loss (AdamW, lr 1e-3, batches of 64) to answer
"where is the <colour>?" with "left" or "right", in three variants:

  text  two coloured tokens; the answer follows from the colour word alone (no image needed)
  one   one coloured token; the answer is its half of the grid (no choosing between tokens)
  two   two tokens of different colours; the answer is the named one's side of the other

and a fourth, ``colour``: two tokens that each carry a colour vector plus a shape vector (an
object whose token holds its colour and its shape apart), "what colour is the <shape>?",
trained on the sample crawl's seen compositions and scored on questions about a held-out
one beside a seen one (chance 0.17).

Accuracy is over 1 024 fresh questions, comparing the decoder's logits of the possible
answers at the answer's position; 0.5 is a coin flip for left/right. Prints a JSON line per
variant.

``--seen-shard DIR`` writes instead a shard of 300 two-object scenes of seen compositions
only, drawn as ``mmray sample-data`` draws its held-out shard, for ``mmray eval vqa``: where
the held-out shard asks whether a model generalises, this one asks whether it binds at all.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmcore.data import sample
from mmcore.data.inputs import token_ids
from mmcore.losses.fusion import answer_targets, vqa_loss
from mmcore.models.model import ModelConfig, ModelOutput, build_model
from mmcore.models.towers import tokenizer

COLOURS, SHAPES = tuple(sample.COLOURS), sample.SHAPES
SEEN, HELD = sample.compositions(held=False), sample.compositions(held=True)
GRID, WIDTH = 8, 128  # the tiny tower at 64 px: 8 x 8 patches (+ [CLS]) of width 128


def scenes(rng: np.random.Generator, n: int, variant: str, colours, positions, shapes=None,
           held: bool = False):  # fmt: skip
    """(tokens (n, 65, WIDTH), [(question, answer)] * n)."""
    tokens = torch.randn(n, 1 + GRID * GRID, WIDTH) + positions
    if variant == "colour":
        return tokens, [named_colour(rng, tokens[b], colours, shapes, held) for b in range(n)]
    pairs = []
    for b in range(n):
        while True:
            i, j = rng.choice(GRID * GRID, size=2, replace=False)
            if i % GRID != j % GRID:  # columns differ: a side is defined
                break
        ci, cj = rng.choice(len(COLOURS), size=2, replace=False)
        tokens[b, 1 + i] += colours[ci]
        if variant != "one":
            tokens[b, 1 + j] += colours[cj]
        side = {"text": ci % 2 == 0, "one": i % GRID < GRID // 2, "two": i % GRID < j % GRID}
        pairs.append((f"where is the {COLOURS[ci]}?", "left" if side[variant] else "right"))
    return tokens, pairs


def named_colour(rng, tokens, colours, shapes, held: bool) -> tuple[str, str]:
    """Two objects of different shapes on two tokens; the question names one by its shape,
    a held-out composition when ``held``, else the first of two seen ones."""
    pick = HELD if held else SEEN
    while True:
        named, other = pick[rng.integers(len(pick))], SEEN[rng.integers(len(SEEN))]
        if named[1] != other[1]:
            break
    cells = rng.choice(GRID * GRID, size=2, replace=False)
    for cell, (c, s) in zip(cells, (named, other), strict=True):
        tokens[1 + cell] += colours[COLOURS.index(c)] + shapes[SHAPES.index(s)]
    return f"what colour is the {named[1]}?", named[0]


def run(variant: str, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(ModelConfig(fusion="hybrid"))
    model.requires_grad_(False)
    decoder = [model.image_to_fusion, model.text_to_fusion, model.fusion, model.lm_head]
    params = [p for m in decoder for p in m.parameters()] + [model.positions]
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    colours, positions = torch.randn(len(COLOURS), WIDTH), 0.3 * torch.randn(1 + GRID * GRID, WIDTH)
    shapes = torch.randn(len(SHAPES), WIDTH)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        tokens, pairs = scenes(rng, 64, variant, colours, positions, shapes)
        ids, mask = (torch.from_numpy(a) for a in token_ids(pairs, 16))
        out = ModelOutput(None, None, image_tokens=tokens, text_tokens=None, logit_scale=None,
                          logit_bias=None)  # fmt: skip
        loss = vqa_loss(model, out, ids, mask)["vqa"]
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    tokens, pairs = scenes(rng, 1024, variant, colours, positions, shapes, held=True)
    ids, mask = (torch.from_numpy(a) for a in token_ids(pairs, 16))
    at = (answer_targets(ids, mask)[:, 1:] != -100).int().argmax(1)  # predicts the answer word
    words = COLOURS if variant == "colour" else ("left", "right")
    choices = [tokenizer().convert_tokens_to_ids(w) for w in words]
    with torch.no_grad():
        states = model.decoder_states(tokens, ids, mask)[torch.arange(len(ids)), at]
        said = model.lm_head(states)[:, choices].argmax(1)
    truth = torch.tensor([words.index(a) for _, a in pairs])
    return {"variant": variant, "steps": steps, "accuracy": float((said == truth).float().mean()),
            "loss_last_100": float(np.mean(losses[-100:])),
            "seconds": round(time.perf_counter() - t0)}  # fmt: skip


def two_objects(rng: np.random.Generator, size: str, colour: str, shape: str) -> tuple:
    """(image, objects, caption): a 128 px scene of a (size, colour, shape) object and a random
    seen one, in a random relation on a random background, as ``mmray sample-data`` draws its
    two-object scenes."""
    background = sample._pick(rng, list(sample.BACKGROUNDS))
    objects, caption = sample._pair(rng, (size, colour, shape))
    return sample.render(rng, 128, 128, objects, background), objects, caption


def seen_shard(folder: Path, n: int = 300, seed: int = 0) -> None:
    rng = np.random.default_rng([seed, 9])

    def scenes():
        for _ in range(n):
            size = sample._pick(rng, ("small", "large"))
            yield two_objects(rng, size, *sample._composition(rng))

    sample.write_shard(folder / "00000.tar", scenes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seen-shard", type=Path, metavar="DIR")
    p.add_argument("--variant", action="append", choices=("text", "one", "two", "colour"),
                   help="repeatable; default: all four")  # fmt: skip
    args = p.parse_args()
    if args.seen_shard:
        seen_shard(args.seen_shard, seed=args.seed)
        return
    for variant in args.variant or ("text", "one", "two", "colour"):
        print(json.dumps(run(variant, args.steps, args.seed)), flush=True)


if __name__ == "__main__":
    main()
