"""ONNX export of the two encoders, int8 dynamic quantisation, and an onnxruntime runner.

    paths = export_onnx(model, "out/onnx", quantize=True)
    enc = OnnxEncoders("out/onnx", int8=True)
    enc.encode_image(pixels)            # (B, 3, S, S) float32 → (B, E), unit norm
    enc.encode_text(input_ids, mask)    # (B, T) int64 → (B, E)
Serving and retrieval need only these embeddings, so the encoders are exported apart: the
image graph for indexing, the text graph for queries. Fusion modules are not exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmcore.models.model import ImageTextModel

GRAPHS = ("image_encoder", "text_encoder")


class _Image(nn.Module):
    def __init__(self, model: ImageTextModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _Text(nn.Module):
    def __init__(self, model: ImageTextModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


Graph = tuple[nn.Module, tuple[torch.Tensor, ...], list[str], dict[str, dict[int, Any]]]


def encoder_graphs(model: ImageTextModel) -> dict[str, Graph]:
    """The two encoders as modules, each with example inputs, its input names and their
    dynamic (batch) dimension: what ONNX, ``torch.export`` and TorchScript export."""
    model = model.eval()
    size, length = model.cfg.vision.image_size, model.cfg.text.context_length
    batch = torch.export.Dim("batch", min=1, max=4096)
    ids = torch.ones(2, length, dtype=torch.long)
    return {
        "image_encoder": (_Image(model).eval(), (torch.zeros(2, 3, size, size),), ["pixels"],
                          {"pixels": {0: batch}}),
        "text_encoder": (_Text(model).eval(), (ids, ids.clone()), ["input_ids", "attention_mask"],
                         {"input_ids": {0: batch}, "attention_mask": {0: batch}}),
    }  # fmt: skip


def export_onnx(
    model: ImageTextModel, folder: str | Path, quantize: bool = False
) -> dict[str, Path]:
    """Write image_encoder.onnx and text_encoder.onnx (+ ``*.int8.onnx`` when ``quantize``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (module, args, inputs, shapes) in encoder_graphs(model).items():
        path = folder / f"{name}.onnx"
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=["embeddings"],
            dynamic_shapes=shapes, dynamo=True, external_data=False,
        )  # fmt: skip
        paths[name] = path
        if quantize:
            paths[f"{name}.int8"] = _quantize(path, folder / f"{name}.int8.onnx")
    return paths


def _quantize(fp32: Path, int8: Path) -> Path:
    """Dynamic int8: weights quantised ahead, activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    quantize_dynamic(
        str(fp32), str(int8), weight_type=QuantType.QInt8,
        # 7-bit weights, one scale per output channel: the u8s8 kernels of CPUs without VNNI
        # (AVX2 only) saturate on full-range int8 weights; there the image embedding's
        # cosine to torch fell to 0.98. Together they keep it above 0.999.
        per_channel=True, reduce_range=True,
        # Convolutions stay fp32: ConvInteger has no fast CPU kernel, and the conv stem's
        # image encoder ran 3x slower quantised than in fp32 (docs/BENCHMARKS.md).
        op_types_to_quantize=[op for op in IntegerOpsRegistry if op != "Conv"],
    )  # fmt: skip
    return int8


class OnnxEncoders:
    """The exported encoders on onnxruntime's CPU provider."""

    def __init__(self, folder: str | Path, int8: bool = False, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        suffix = ".int8.onnx" if int8 else ".onnx"
        self.sessions = {
            name: ort.InferenceSession(str(Path(folder) / f"{name}{suffix}"), options,
                                       providers=["CPUExecutionProvider"])
            for name in GRAPHS
        }  # fmt: skip

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions["image_encoder"].run(None, {"pixels": pixels.astype(np.float32)})[0]

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
        }
        return self.sessions["text_encoder"].run(None, feed)[0]
