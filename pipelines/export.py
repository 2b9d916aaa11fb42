"""Export a model: ``mmray export --model URI --format {hf,safetensors} --output DIR``.

hf: a folder that transformers' CLIPModel and CLIPProcessor load (late fusion, CLIP-style
towers); safetensors: mmray's own folder (config.json + model.safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys

from mmcore.export import export_hf, load_model, save_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmray export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder, runs:/ID/model or models:/NAME@ALIAS")
    p.add_argument("--format", choices=["hf", "safetensors"], default="hf")
    p.add_argument("--output", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model = load_model(args.model)
        out = (
            export_hf(model, args.output) if args.format == "hf" else save_model(model, args.output)
        )
    except (ValueError, OSError) as e:
        print(f"mmray export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model": str(args.model), "format": args.format, "output": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
