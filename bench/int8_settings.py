"""How onnxruntime's dynamic int8 settings move the exported encoders away from torch.

    python -m bench.int8_settings          # from the repository root

For the patch and conv stems (random init, pretrained MiniLM text tower, as in the unit test
tests/unit/test_onnx.py), quantises the exported fp32 encoders with each combination of
``per_channel`` and ``reduce_range`` (and, last, the shipped settings: both on, convolutions
left fp32) and prints the smallest cosine between int8 and torch embeddings (5 images, 5
captions), the int8/fp32 size ratio and the image encoder's latency (batch 64, mean of 10).
The u8s8 kernels differ by CPU (VNNI or not), so the CPU's flags come first. Record the
figures in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.registry import IntegerOpsRegistry

from bench.quantize import cpu_flags
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig, tokenize
from mmcore.onnx_export import GRAPHS, OnnxEncoders, export_onnx

CAPTIONS = ["a red circle", "a small blue square above a green cross", "a purple diamond",
            "a large yellow triangle", "an orange cross below a red circle"]  # fmt: skip


def image_ms(enc: OnnxEncoders, batch: np.ndarray) -> float:
    enc.encode_image(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(10):
        enc.encode_image(batch)
    return (time.perf_counter() - t0) / 10 * 1000


def main() -> None:
    print(f"CPU: {cpu_flags()}")
    print(f"{'stem':<6}{'per_channel':>12}{'reduce_range':>13}{'convs':>6}{'image cos':>11}"
          f"{'text cos':>10}{'int8/fp32 bytes':>17}{'image ms/64':>13}")  # fmt: skip
    batch = np.random.default_rng(0).standard_normal((64, 3, 64, 64)).astype(np.float32)
    settings = [(*flags, "int8") for flags in itertools.product([False, True], repeat=2)]
    settings.append((True, True, "fp32"))  # what export_onnx ships
    for stem in ("patch", "conv"):
        torch.manual_seed(0)
        cfg = ModelConfig(vision=VisionConfig(stem=stem), text=TextConfig(kind="minilm"))
        model = build_model(cfg).eval()
        folder = Path(tempfile.mkdtemp())
        export_onnx(model, folder)
        pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        tokens = tokenize(CAPTIONS, 32)
        with torch.no_grad():
            image, text = model.encode_image(pixels).numpy(), model.encode_text(**tokens).numpy()
        ids, mask = tokens["input_ids"].numpy(), tokens["attention_mask"].numpy()
        print(f"{stem:<6}{'(fp32)':>12}{'':>13}{'':>6}{1:>11.4f}{1:>10.4f}{1:>17.2f}"
              f"{image_ms(OnnxEncoders(folder), batch):>13.1f}")  # fmt: skip
        for per_channel, reduce_range, convs in settings:
            ops = [op for op in IntegerOpsRegistry if convs == "int8" or op != "Conv"]
            variant = folder / f"{per_channel}-{reduce_range}-{convs}"
            variant.mkdir()
            sizes = []
            for name in GRAPHS:
                (variant / f"{name}.onnx").symlink_to(folder / f"{name}.onnx")
                quantize_dynamic(str(folder / f"{name}.onnx"), str(variant / f"{name}.int8.onnx"),
                                 weight_type=QuantType.QInt8, per_channel=per_channel,
                                 reduce_range=reduce_range, op_types_to_quantize=ops)  # fmt: skip
                sizes.append((variant / f"{name}.int8.onnx").stat().st_size)
            fp32 = sum((folder / f"{name}.onnx").stat().st_size for name in GRAPHS)
            enc = OnnxEncoders(variant, int8=True)
            cos_image = np.min((enc.encode_image(pixels.numpy()) * image).sum(1))
            cos_text = np.min((enc.encode_text(ids, mask) * text).sum(1))
            print(f"{stem:<6}{per_channel!s:>12}{reduce_range!s:>13}{convs:>6}{cos_image:>11.4f}"
                  f"{cos_text:>10.4f}{sum(sizes) / fp32:>17.2f}{image_ms(enc, batch):>13.1f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
