"""The encoders as programs that PyTorch alone loads (no mmray, no transformers): a
``torch.export`` archive (``*.pt2``) or TorchScript (``*.pt``), with the preprocessing they
expect in ``encoders.json`` and the tokenizer's files beside them.

    export_torch(model, "out/pt2", "torch-export")
    image = torch.export.load("out/pt2/image_encoder.pt2").module()
    image(pixels)                      # (B, 3, S, S) float32, normalised → (B, E), unit norm
    text = torch.jit.load("out/ts/text_encoder.pt")      # after export_torch(..., "torchscript")
    text(input_ids, attention_mask)    # (B, T) int64 → (B, E)

``torch.export`` is the format PyTorch develops (AOTInductor and ExecuTorch take it);
TorchScript is the one older C++ and mobile runtimes load. The batch size is dynamic in both.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import torch

from mmcore.data.transforms import MEAN, STD
from mmcore.models.model import ImageTextModel
from mmcore.models.towers import tokenizer
from mmcore.onnx_export import encoder_graphs

TorchFormat = Literal["torch-export", "torchscript"]
SUFFIX = {"torch-export": ".pt2", "torchscript": ".pt"}


def export_torch(model: ImageTextModel, folder: str | Path, fmt: TorchFormat) -> dict[str, Path]:
    """Write ``image_encoder`` and ``text_encoder`` in ``fmt``, ``encoders.json`` and the
    tokenizer; returns the encoders' paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (module, args, _, shapes) in encoder_graphs(model).items():
        path = paths[name] = folder / f"{name}{SUFFIX[fmt]}"
        with torch.no_grad():
            if fmt == "torch-export":
                torch.export.save(torch.export.export(module, args, dynamic_shapes=shapes), path)
            else:  # transformers' shape checks warn as constants; the check at another
                # batch size is what shows the trace holds
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    traced = torch.jit.trace(module, args, check_inputs=[_other_batch(args)])
                traced.save(path)
    cfg = model.cfg
    (folder / "encoders.json").write_text(json.dumps({
        "format": fmt,
        "image_encoder": {"file": paths["image_encoder"].name, "input": "pixels (B, 3, S, S)",
                          "image_size": cfg.vision.image_size, "mean": MEAN.tolist(),
                          "std": STD.tolist(), "resize": "shorter side to S, center crop"},
        "text_encoder": {"file": paths["text_encoder"].name,
                         "input": "input_ids, attention_mask (B, T) int64",
                         "context_length": cfg.text.context_length,
                         "tokenizer": "tokenizer.json (WordPiece, [CLS] ... [SEP], right-padded)"},
        "output": "(B, embed_dim) float32, unit norm; the image-text score is their dot product",
        "embed_dim": cfg.embed_dim,
    }, indent=2) + "\n")  # fmt: skip
    tokenizer().save_pretrained(folder)
    return paths


def _other_batch(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs at another batch size: TorchScript checks the trace on them."""
    return tuple(torch.cat([a, a[:1]]) for a in args)
