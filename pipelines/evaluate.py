"""Evaluation commands; each prints one JSON line.

    mmray eval zeroshot --model URI --image-folder DIR [--template "a photo of a {}." ...]
    mmray eval retrieval --model URI --data SHARDS [--limit N] [--shortlist K]
    mmray eval caption --model URI --data SHARDS [--max-pairs N] [--num-beams K]
    mmray eval vqa --model URI --data SHARDS [--max-pairs N] [--num-beams K]
URI: a model folder, runs:/ID/model, or models:/NAME@ALIAS.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mmcore.config import ConfigError
from mmcore.data.shards import read_shards
from mmcore.eval.run import (
    caption_eval,
    read_questions,
    retrieval_eval,
    vqa_eval,
    zeroshot_eval,
)
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES
from mmcore.tasks import ANSWER, GenerationConfig, cannot
from mmcore.tracking import check_model, load
from pipelines import job


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmray eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    zs = sub.add_parser("zeroshot", help="top-1/top-5 over DIR/<class name>/<images>")
    zs.add_argument("--model", required=True)
    zs.add_argument("--image-folder", required=True)
    zs.add_argument("--template", action="append", help="repeatable; default: an ensemble")
    rt = sub.add_parser("retrieval", help="image<->text recall@1/5/10 over curated shards")
    rt.add_argument("--model", required=True)
    rt.add_argument("--data", required=True, help="a folder of .tar shards, or one .tar")
    rt.add_argument("--limit", type=int, default=None, help="use the first N pairs")
    rt.add_argument("--shortlist", type=int, default=16, help="hybrid: re-rank ITC top-k")
    tasks = (("caption", "BLEU-4 and CIDEr of generated captions over shards", GenerationConfig()),
             ("vqa", "exact-match accuracy of generated answers to the shards' questions "
              "(KEY.json qa lists), by type", ANSWER))  # fmt: skip
    for task, text, defaults in tasks:
        gen = sub.add_parser(task, help=text)
        gen.add_argument("--model", required=True)
        gen.add_argument("--data", required=True, help="a folder of .tar shards, or one .tar")
        gen.add_argument("--max-pairs", type=int, default=None, help="use the first N images")
        gen.add_argument("--num-beams", type=int, default=1, help="1: greedy")
        gen.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    args = p.parse_args(argv)
    if args.task in ("caption", "vqa"):
        args.generation = GenerationConfig(max_new_tokens=args.max_new_tokens,
                                           num_beams=args.num_beams)  # fmt: skip
        args.generation.validate()
    if args.task == "zeroshot":
        args.template = args.template or list(DEFAULT_TEMPLATES)
        if any("{}" not in t for t in args.template):
            raise ConfigError("every --template needs a {} for the class name")
    # 0 and negative counts used to mean "all" (falsy) or "all but the last" (a slice).
    least = {"limit": 2, "shortlist": 1, "max_pairs": 1}
    for name, low in least.items():
        if getattr(args, name, None) is not None and getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}")
    return args


def check(args: argparse.Namespace) -> None:
    check_model(args.model)
    if args.task == "zeroshot":
        job.check_input("--image-folder", args.image_folder)
    else:  # a folder of shards, or one
        job.shard_paths(args.data, "--data")


def work(args: argparse.Namespace) -> dict[str, Any]:
    model = load(args.model)
    if args.task == "zeroshot":
        metrics = zeroshot_eval(model, args.image_folder, args.template)
    elif args.task == "retrieval":
        _, images, captions = read_shards(args.data, args.limit)
        metrics = retrieval_eval(model, images, captions, args.shortlist)
    else:
        if reason := cannot(model, args.task):
            raise ConfigError(f"model {args.model}: {reason}")
        if args.task == "caption":
            _, images, captions = read_shards(args.data, args.max_pairs)
            metrics = caption_eval(model, images, captions, args.generation)
        else:
            images, questions, answers, types = read_questions(args.data, args.max_pairs)
            if not questions:
                raise ConfigError(f"--data {args.data}: no sample has questions (a qa list in "
                                  "KEY.json): curate with --qa")  # fmt: skip
            metrics = vqa_eval(model, images, questions, answers, types, args.generation)
    return {"task": args.task, "model": str(args.model)} | metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return job.main("mmray eval", lambda: parse_args(argv), work, check)


if __name__ == "__main__":
    sys.exit(main())
