"""Export a model: ``mmray export --model URI --format FORMAT --output DIR``.

hf: a folder that transformers' CLIPModel and CLIPProcessor load (late fusion, CLIP-style
towers); safetensors: mmray's own folder (config.json + model.safetensors); onnx,
torch-export, torchscript: the image and text encoders as graphs that onnxruntime or PyTorch
alone run, with their preprocessing in encoders.json and the tokenizer (torch formats).
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

from mmcore.export import export_hf, save_model
from mmcore.onnx_export import export_onnx
from mmcore.torch_export import export_torch
from mmcore.tracking import check_model, load
from pipelines import job


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmray export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder, runs:/ID/model or models:/NAME@ALIAS")
    p.add_argument("--format", choices=list(FORMATS), default="hf")
    p.add_argument("--output", required=True)
    return p.parse_args(argv)


FORMATS = {
    "hf": export_hf,
    "safetensors": save_model,
    "onnx": export_onnx,
    "torch-export": functools.partial(export_torch, fmt="torch-export"),
    "torchscript": functools.partial(export_torch, fmt="torchscript"),
}


def work(args: argparse.Namespace) -> dict[str, Any]:
    model = load(args.model)
    FORMATS[args.format](model, args.output)
    return {"model": str(args.model), "format": args.format, "output": str(args.output)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def check(args: argparse.Namespace) -> None:
        check_model(args.model)
        job.check_output("--output", args.output)

    return job.main("mmray export", lambda: parse_args(argv), work, check)


if __name__ == "__main__":
    sys.exit(main())
