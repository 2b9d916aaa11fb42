"""ONNX export of the encoders: onnxruntime parity, and int8 dynamic quantisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig, tokenize
from mmcore.onnx_export import OnnxEncoders, export_onnx

CAPTIONS = ["a red circle", "a small blue square above a green cross", "a purple diamond",
            "a large yellow triangle", "an orange cross below a red circle"]  # fmt: skip


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_onnxruntime_matches_torch_and_int8_stays_close(tmp_path, stem: str) -> None:
    torch.manual_seed(0)
    vision = VisionConfig(stem=stem)
    model = build_model(ModelConfig(vision=vision, text=TextConfig(kind="minilm"))).eval()
    paths = export_onnx(model, tmp_path, quantize=True)
    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # batch 5
    tokens = tokenize(CAPTIONS, 32)
    with torch.no_grad():
        image, text = model.encode_image(pixels).numpy(), model.encode_text(**tokens).numpy()
    ids, mask = tokens["input_ids"].numpy(), tokens["attention_mask"].numpy()

    fp32 = OnnxEncoders(tmp_path)
    np.testing.assert_allclose(fp32.encode_image(pixels.numpy()), image, atol=1e-5)
    np.testing.assert_allclose(fp32.encode_text(ids, mask), text, atol=1e-5)

    # Holds on AVX2-only CPUs too (no VNNI), where full-range per-tensor int8 gave 0.98.
    int8 = OnnxEncoders(tmp_path, int8=True)
    assert (int8.encode_image(pixels.numpy()) * image).sum(1).min() > 0.99  # cosine
    assert (int8.encode_text(ids, mask) * text).sum(1).min() > 0.98
    # int8 weights: a third of the bytes or less; the image encoder's convolutions stay fp32.
    for name, most in (("image_encoder", 0.5), ("text_encoder", 0.35)):
        assert paths[f"{name}.int8"].stat().st_size < most * paths[name].stat().st_size
