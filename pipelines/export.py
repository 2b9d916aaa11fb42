"""Export a model: ``mmray export --model URI --format {hf,safetensors} --output DIR``.

hf: a folder that transformers' CLIPModel and CLIPProcessor load (late fusion, CLIP-style
towers); safetensors: mmray's own folder (config.json + model.safetensors).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mmcore.export import export_hf, save_model
from mmcore.tracking import check_model, load
from pipelines import job


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmray export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder, runs:/ID/model or models:/NAME@ALIAS")
    p.add_argument("--format", choices=["hf", "safetensors"], default="hf")
    p.add_argument("--output", required=True)
    return p.parse_args(argv)


def work(args: argparse.Namespace) -> dict[str, Any]:
    model = load(args.model)
    save = export_hf if args.format == "hf" else save_model
    out = save(model, args.output)
    return {"model": str(args.model), "format": args.format, "output": str(out)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = lambda args: check_model(args.model)  # noqa: E731
    return job.main("mmray export", lambda: parse_args(argv), work, check)


if __name__ == "__main__":
    sys.exit(main())
