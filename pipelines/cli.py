"""The ``mmray`` command: one entry point, a subcommand per stage.

    mmray sample-data OUT [--n N] [--seed S] [--noisy FRACTION]
    mmray curate --input META --output DIR [flags] [key.sub=value ...]
    mmray train --config FILE --data SHARDS [key.sub=value ...]
    mmray tune --config FILE --data SHARDS [key.sub=value ...] | mmray tune report SWEEP
    mmray serve --model URI [--index SHARDS] [--host 127.0.0.1] [--port 8000] [key.sub=value ...]
    mmray demo [--quick] | mmray demo --stop
    mmray embed --model URI --data SHARDS --output DIR [key.sub=value ...]
    mmray index --embeddings DIR --output DIR
    mmray eval {zeroshot,retrieval,caption,vqa} --model URI ...
    mmray export --model URI --format {hf,safetensors,onnx,torch-export,torchscript} --output DIR
Each job is also ``python -m pipelines.<job>`` (for ``ray job submit``).
"""

from __future__ import annotations

import argparse
import json
import sys


def sample_data_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmray sample-data", description="Write a synthetic crawl.")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=600, help="metadata rows (junk included)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-px", type=int, default=96, help="smallest side of clean images")
    p.add_argument("--max-px", type=int, default=256, help="largest side of clean images")
    p.add_argument(
        "--noisy",
        type=float,
        default=0.0,
        help="fraction of clean images given another scene's caption (kind noisy)",
    )
    args = p.parse_args(argv)
    from mmcore.data.sample import check_args

    try:
        check_args(args.n, args.seed, args.min_px, args.max_px, args.noisy)
    except ValueError as e:
        p.error(str(e))  # exit 2, before anything is written
    return args


def sample_data(argv: list[str]) -> int:
    from mmcore.data.sample import make_sample_data

    args = sample_data_args(argv)
    info = make_sample_data(
        args.out,
        n=args.n,
        seed=args.seed,
        min_px=args.min_px,
        max_px=args.max_px,
        noisy=args.noisy,
    )
    paths = {"out": args.out, "metadata": f"{args.out}/metadata.parquet",
             "qa": f"{args.out}/qa.parquet", "heldout": f"{args.out}/heldout"}  # fmt: skip
    print(json.dumps(paths | info["counts"]))
    return 0


def _job(module: str):
    """A subcommand that runs ``pipelines.<module>.main`` (imported only when used)."""

    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(f"pipelines.{module}").main(argv)

    return run


COMMANDS = {
    "sample-data": sample_data,
    "curate": _job("curate"),
    "train": _job("train"),
    "tune": _job("tune"),
    "serve": _job("serve"),
    "demo": _job("demo"),
    "embed": _job("embed"),
    "index": _job("index"),
    "eval": _job("evaluate"),
    "export": _job("export"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        from pipelines.flags import usage

        names = ", ".join(COMMANDS)
        text = (
            f"usage: mmray {{{names}}} ...\n\n{__doc__}\nFlags (each sets a config key):\n{usage()}"
        )
        print(text, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
