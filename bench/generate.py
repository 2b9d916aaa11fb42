"""Captioning and VQA at tiny scale: train a decoder, score its captions and answers on
held-out compositions, time them through Serve.

    python -m bench.generate [--n 3000] [--steps 600] [--base-steps 0] [--requests 40]
                             [--override KEY=VALUE ...] [--scenes-of MODEL] [--decode-of MODEL]

1. A sample crawl (seed 20) and its questions are curated (`--qa`), and the tiny config
   trained on it as `hybrid` with the clip, itm, caption and vqa objectives (`mmray train`,
   Ray Train + DeepSpeed): its evaluation logs eval/caption/* and eval/vqa/accuracy on the
   held-out pairs (seen compositions). With `--base-steps`, the tiny config as shipped (late
   fusion, CLIP) is trained on the same crawl first, and the hybrid model starts from its
   towers and projections (`init.from`, the way ALBEF and BLIP fine-tune a pretrained
   backbone); its fusion module and heads start fresh.
2. The crawl's held-out shard (`heldout/`: scenes whose first object is a composition no crawl
   image or caption has) is scored with `mmray eval caption` (greedy and 3 beams) and
   `mmray eval vqa` (greedy), beside two majority baselines: the most common answer of each
   question type in the training questions (a prior-only answerer), and in the held-out
   questions themselves (the best any prior-only answerer could do). The colour and shape
   answers are also split by scene (``by_scene``): one object, or which of two the question
   names, the held-out one or its seen neighbour, and how often the answer was the
   neighbour's. ``--scenes-of MODEL`` prints only that split for a model already trained on
   the bench's crawl; ``--override`` adds training overrides (``loss.vqa_debias=true``).
   ``--decode-of MODEL`` prints only the engine's seconds for 100 held-out images' captions
   (greedy, 3 beams) and the answers to their questions, without Serve.
3. `mmray serve` serves the model; `--requests` sequential /v1/caption (greedy, 3 beams) and
   /v1/vqa requests of held-out images: latency p50/p99 per image, the client on the same
   2 cores.

Prints one JSON line; the figures go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import requests
from PIL import Image

from bench.filter import mmray, train, workdir
from mmcore import tracking
from mmcore.data.shards import tar_samples
from mmcore.eval.run import sample_questions
from mmcore.eval.vqa import normalise
from mmcore.inference import Engine
from mmcore.tasks import GenerationConfig
from pipelines.local import free_port


def heldout_requests(shard: Path) -> list[dict]:
    """The held-out shard's images (JPEG bytes, base64) with each one's first question."""
    return [{"image": base64.b64encode(sample["jpg"]).decode(),
             "question": sample_questions(sample)[0]["question"]}
            for _, sample in tar_samples(str(shard))]  # fmt: skip


def prior_baseline(train_qa: Path, shard: Path) -> dict[str, float]:
    """Accuracy on the held-out questions of always answering the training questions' most
    common answer of the question's type: overall and by type."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in pq.read_table(train_qa).to_pylist():
        counts[row["type"]][normalise(row["answer"])] += 1
    top = {t: c.most_common(1)[0][0] for t, c in counts.items()}
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    for _, sample in tar_samples(str(shard)):
        for qa in sample_questions(sample):
            hits[qa["type"]].append(top[qa["type"]] == normalise(qa["answer"]))
    every = [h for v in hits.values() for h in v]
    return {"accuracy": float(np.mean(every))} | {t: float(np.mean(v)) for t, v in hits.items()}


OBJECT = re.compile(r"(?:small|large) (\w+) (\w+)")  # colour, shape in a scene's caption


def by_scene(model: str, shard: Path) -> dict[str, dict[str, float]]:
    """Accuracy of the colour and shape questions of the held-out shard (scenes whose first
    object is the held-out composition) by what the question names: a lone object, the
    held-out object of two, or its seen neighbour; for two objects that differ in what is
    asked, also how often the answer named the neighbour's instead."""
    images, questions, answers, groups = [], [], [], []
    for _, sample in tar_samples(str(shard)):
        objects = OBJECT.findall(json.loads(sample["json"])["caption"])
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        for qa in sample_questions(sample):
            kind, words = qa["type"], qa["question"].rstrip("?").split()
            if kind not in ("colour", "shape"):
                continue
            answer = normalise(qa["answer"])
            ask, named = (1, words[-1]) if kind == "colour" else (0, words[4])  # what is named
            which = [i for i, o in enumerate(objects) if o[ask] == named]
            if len(objects) == 1:
                group, other = f"{kind}: one object", None
            else:
                group = f"{kind}: {('the held-out', 'the seen')[which[0]]} object of two"
                other = objects[1 - which[0]][1 - ask]
                group += ", objects differ" if other != answer else ", objects alike"
            images.append(image)
            questions.append(qa["question"])
            answers.append(answer)
            groups.append((group, other))
    predicted = [p for p, _ in Engine(tracking.load(model)).answer(images, questions)]
    hits: dict[str, list[tuple[bool, bool]]] = collections.defaultdict(list)
    for (group, other), answer, said in zip(groups, answers, predicted, strict=True):
        hits[group].append((normalise(said) == answer, normalise(said) == other))
    return {group: {"n": len(v), "right": float(np.mean([r for r, _ in v])),
                    "neighbours": float(np.mean([o for _, o in v]))}
            for group, v in sorted(hits.items())}  # fmt: skip


def decode_seconds(model: str, shard: Path, n: int = 100) -> dict[str, float]:
    """Seconds of the engine (no Serve) for greedy and 3-beam captions of the shard's first
    ``n`` images and greedy answers to the questions about them."""
    engine = Engine(tracking.load(model))
    images, questions = [], []
    for _, sample in itertools.islice(tar_samples(str(shard)), n):
        images.append(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        questions += [(images[-1], qa["question"]) for qa in sample_questions(sample)]
    engine.caption(images[:4])  # warm-up
    runs = {"caption_greedy": lambda: engine.caption(images),
            "caption_3_beams": lambda: engine.caption(images, GenerationConfig(num_beams=3)),
            "answer_greedy": lambda: engine.answer(*zip(*questions, strict=True))}  # fmt: skip
    seconds = {}
    for name, call in runs.items():
        t0 = time.perf_counter()
        call()
        seconds[name] = round(time.perf_counter() - t0, 3)
    return seconds | {"images": len(images), "questions": len(questions)}


def latency(url: str, bodies: list[dict], path: str, **settings) -> dict[str, float]:
    times = []
    for body in bodies:
        if path == "/v1/caption":
            body = {"image": body["image"]}
        t0 = time.perf_counter()
        requests.post(f"{url}{path}", json=body | settings, timeout=60).raise_for_status()
        times.append(time.perf_counter() - t0)
    ms = 1000 * np.asarray(times)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="rows of the crawl")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--base-steps", type=int, default=0, help="a CLIP base first (0: none)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--out", default="bench/out/generate")
    p.add_argument("--override", action="append", default=[], help="a training override")
    p.add_argument("--scenes-of", metavar="MODEL", help="only the by-scene split of MODEL")
    p.add_argument("--decode-of", metavar="MODEL", help="only the engine's generation times")
    args = p.parse_args()
    out = workdir(args.out)
    raw, shards = out / "raw", out / "shards"
    if args.scenes_of:
        print(json.dumps(by_scene(args.scenes_of, raw / "heldout" / "00000.tar")))
        return
    if args.decode_of:
        print(json.dumps(decode_seconds(args.decode_of, raw / "heldout" / "00000.tar")))
        return
    mmray("sample-data", str(raw), "--n", str(args.n), "--seed", "20")
    mmray("curate", "--config", "pipelines/configs/curate_tiny.yaml", "--input",
          f"{raw}/metadata.parquet", "--qa", f"{raw}/qa.parquet",
          "--output", str(shards))  # fmt: skip
    base = train(shards, raw, args.base_steps, out / "base") if args.base_steps else None
    warm = [f"init.from={base['model_uri']}", "init.modules=[towers, projections]"] if base else []
    trained = train(
        shards,
        raw,
        args.steps,
        out / "runs",
        "model.fusion=hybrid",
        "loss.terms={clip: 1.0, itm: 1.0, caption: 1.0, vqa: 1.0}",
        *warm,
        *args.override,
    )
    model = trained["model_uri"]
    metrics = trained["metrics"]
    names = ("eval/caption/bleu4", "eval/caption/cider", "eval/vqa/accuracy")
    result: dict = {"args": vars(args), "model": model,
                    "base": base and base["metrics"],
                    "seen": {"/".join(k.split("/")[-2:]): metrics[k] for k in names}}  # fmt: skip
    heldout = raw / "heldout"
    for beams in (1, 3):
        scored = mmray("eval", "caption", "--model", model, "--data", str(heldout),
                       "--num-beams", str(beams))  # fmt: skip
        result[f"heldout_caption_beams{beams}"] = {
            k: scored[k] for k in ("bleu4", "cider", "examples")
        }
    scored = mmray("eval", "vqa", "--model", model, "--data", str(heldout))
    result["heldout_vqa"] = {k: scored[k] for k in ("accuracy", "majority_baseline", "by_type",
                                                    "n_questions", "examples")}  # fmt: skip
    result["heldout_vqa_prior_baseline"] = prior_baseline(raw / "qa.parquet",
                                                          heldout / "00000.tar")  # fmt: skip
    result["heldout_vqa_by_scene"] = by_scene(model, heldout / "00000.tar")
    bodies = heldout_requests(heldout / "00000.tar")[: args.requests]
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mmray")), "serve", "--model",
                               model, "--port", str(port)], stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/healthz", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        latency(url, bodies[:5], "/v1/caption")  # warm-up
        result["serve"] = {
            "caption_beams1": latency(url, bodies, "/v1/caption"),
            "caption_beams3": latency(url, bodies, "/v1/caption", num_beams=3),
            "vqa_beams1": latency(url, bodies, "/v1/vqa"),
        }
    finally:
        server.terminate()
        server.wait(60)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
