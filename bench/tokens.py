"""What does the tower's patch token at an object hold? Linear probes, per tower layer, on the
token at the centre of each object of two-object scenes (seconds per model on 2 cores).

    python -m bench.tokens --model URI [--model URI ...] [--n 800]

Scenes are drawn as ``mmray sample-data`` draws them: ``n`` of seen compositions (70 % fit
the probes, 30 % score them) and 600 whose first object is a held-out composition (half of
them fit only the ceiling probe). One JSON line per model and layer (0: the patch
embeddings, the last: the tokens fusion attends to by default); accuracies, chance 0.17
(colour) and 0.2 (shape):

  colour, shape         an object's colour and shape, on seen compositions
  shape_held            the same shape probe on the held-out compositions' objects
  shape_held_no_colour  the same, with the colour's linear part taken out of the tokens
                        before fitting (a probe that cannot rule a shape out by its colour)
  shape_held_ceiling    a probe fit on held-out compositions too (of other images)
  neighbour_shape       the other object's shape, from this object's token: how much a
                        layer mixes the scene into each object's tokens
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from bench.binding import two_objects
from mmcore import tracking
from mmcore.data import sample
from mmcore.data.transforms import eval_transform

COLOURS, SHAPES = list(sample.COLOURS), list(sample.SHAPES)


def scenes(n: int, seed: int = 5) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    held = sample.compositions(held=True)
    images, objects = [], []
    for i in range(n + 600):
        first = sample._composition(rng) if i < n else held[i % len(held)]
        image, pair, _ = two_objects(rng, sample._pick(rng, ("small", "large")), *first)
        images.append(image)
        objects.append(pair)
    return images, objects


def probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """Multinomial logistic regression with an L2 penalty, fit by L-BFGS: (D + 1, classes)."""
    w = torch.zeros(x.shape[1] + 1, classes, requires_grad=True)
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
    optim = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

    def loss():
        optim.zero_grad()
        value = F.cross_entropy(x1 @ w, y) + 5e-3 * w[:-1].pow(2).sum()
        value.backward()
        return value

    optim.step(loss)
    return w.detach()


def accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    said = (torch.cat([x, torch.ones(len(x), 1)], 1) @ w).argmax(1)
    return round(float((said == y).float().mean()), 3)


def layers_of(uri: str, images: list, objects: list, n: int) -> list[dict]:
    model = tracking.load(uri).eval()
    size = model.cfg.vision.image_size
    pixels = torch.from_numpy(np.stack([eval_transform(i, size) for i in images]))
    with torch.no_grad():
        states = model.vision.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    grid = int(round((states[0].shape[1] - 1) ** 0.5))
    rows = []  # (image, token, colour, shape, neighbour's shape, held-out composition)
    for b, pair in enumerate(objects):
        for k, (_, colour, shape, x, y) in enumerate(pair):
            token = 1 + min(int(y * grid), grid - 1) * grid + min(int(x * grid), grid - 1)
            rows.append((b, token, COLOURS.index(colour), SHAPES.index(shape),
                         SHAPES.index(pair[1 - k][2]), sample.heldout(colour, shape)))  # fmt: skip
    rows = torch.tensor(rows)
    image, colour, shape = rows[:, 0], rows[:, 2], rows[:, 3]
    fit, score = image < 0.7 * n, (image >= 0.7 * n) & (image < n)
    held = (image >= n + 300) & rows[:, 5].bool()
    ceiling = fit | ((image >= n) & (image < n + 300))
    onehot = F.one_hot(colour, len(COLOURS)).float()
    out = []
    for layer, h in enumerate(states):
        x = h[rows[:, 0], rows[:, 1]]
        x = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6)
        no_colour = x - onehot @ torch.linalg.lstsq(onehot[fit], x[fit]).solution
        w_shape = probe(x[fit], shape[fit], len(SHAPES))
        w_free = probe(no_colour[fit], shape[fit], len(SHAPES))
        w_ceiling = probe(x[ceiling], shape[ceiling], len(SHAPES))
        w_neighbour = probe(x[fit], rows[fit, 4], len(SHAPES))
        out.append({
            "model": uri, "layer": layer,
            "colour": accuracy(probe(x[fit], colour[fit], len(COLOURS)), x[score], colour[score]),
            "shape": accuracy(w_shape, x[score], shape[score]),
            "shape_held": accuracy(w_shape, x[held], shape[held]),
            "shape_held_no_colour": accuracy(w_free, no_colour[held], shape[held]),
            "shape_held_ceiling": accuracy(w_ceiling, x[held], shape[held]),
            "neighbour_shape": accuracy(w_neighbour, x[score], rows[score, 4]),
        })  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="URI")
    p.add_argument("--n", type=int, default=800, help="scenes of seen compositions")
    args = p.parse_args()
    images, objects = scenes(args.n)
    for uri in args.model:
        for row in layers_of(uri, images, objects, args.n):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
