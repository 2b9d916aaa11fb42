"""Where a training step of the `tiny` image tower goes, and whether torch.compile helps it.

    python -m bench.tower [--batch 32] [--repeats 4] [--profile]

One worker's share of a step of the shipped `tiny` recipe (conv stem of 24 channels, 64 px,
a batch of 32: half of 64, as each of the job's two workers gets it) on one thread, as each
worker runs on a 2-core machine: forward and backward of the whole tower, of the conv stem
alone, and of the tower whose stem is ``torch.compile``d (its compile time printed apart).
The variants alternate ``--repeats`` times; milliseconds per forward and backward.
``--profile`` adds torch.profiler's table of the eager tower's operators (5 steps).
"""

from __future__ import annotations

import argparse
import time

import torch

from mmcore.models.towers import VisionConfig, VisionTower


def per_step_ms(step, n: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = VisionConfig(size="tiny", image_size=64, stem="conv", stem_channels=24)
    eager, compiled = VisionTower(config).train(), VisionTower(config).train()
    compiled.load_state_dict(eager.state_dict())
    pixels = torch.randn(args.batch, 3, 64, 64)
    stem = eager.model.embeddings.patch_embedding
    nhwc = pixels.contiguous(memory_format=torch.channels_last)  # as the tower feeds its stem

    start = time.perf_counter()
    embeddings = compiled.model.embeddings
    embeddings.patch_embedding = torch.compile(embeddings.patch_embedding)
    compiled(pixels)[1].sum().backward()
    print(f"torch.compile of the stem, first step: {time.perf_counter() - start:.1f} s")

    steps = {
        "tower": lambda: eager(pixels)[1].sum().backward(),
        "stem alone": lambda: stem(nhwc).sum().backward(),
        "tower, compiled stem": lambda: compiled(pixels)[1].sum().backward(),
    }
    for step in steps.values():
        per_step_ms(step, 2)  # warm
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(per_step_ms(step))
    for name, ms in times.items():
        print(f"{name:22s} " + " ".join(f"{t:6.1f}" for t in ms) + " ms")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            per_step_ms(steps["tower"], 5)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
