"""Exports of the encoders: onnxruntime parity and int8 dynamic quantisation; torch.export
and TorchScript archives that PyTorch alone loads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmcore.export import save_model
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig, tokenize
from mmcore.onnx_export import OnnxEncoders, export_onnx
from pipelines import export

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


# Loads the encoders with mmray and transformers unimportable, tokenizing with the
# `tokenizers` library from the exported tokenizer.json; prints the embeddings as JSON.
LOAD_WITHOUT_MMRAY = """
import json, sys
for name in ("mmcore", "pipelines", "transformers"):
    sys.modules[name] = None  # importing them now raises ImportError
import torch
from tokenizers import Tokenizer
folder, fmt, captions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
spec = json.load(open(f"{folder}/encoders.json"))
load = (lambda f: torch.export.load(f).module()) if fmt == "torch-export" else torch.jit.load
image = load(f"{folder}/{spec['image_encoder']['file']}")
text = load(f"{folder}/{spec['text_encoder']['file']}")
tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
n = spec["text_encoder"]["context_length"]
tok.enable_truncation(n)
tok.enable_padding(length=n)
enc = tok.encode_batch(captions)
ids = torch.tensor([e.ids for e in enc])
mask = torch.tensor([e.attention_mask for e in enc])
size = spec["image_encoder"]["image_size"]
pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    print(json.dumps({"image": image(pixels).tolist(), "text": text(ids, mask).tolist()}))
"""


@pytest.mark.parametrize("fmt", ["torch-export", "torchscript"])
def test_torch_formats_load_without_mmray_and_match_the_model(tmp_path, fmt: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(vision=VisionConfig(stem="conv"))).eval()  # as tiny.yaml
    folder = tmp_path / fmt
    assert export.main(["--model", str(save_model(model, tmp_path / "m")), "--format", fmt,
                        "--output", str(folder)]) == 0  # fmt: skip
    run = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MMRAY, str(folder), fmt,
                          json.dumps(CAPTIONS)], capture_output=True, text=True, cwd=tmp_path,
                         check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # batch 5
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(**tokenize(CAPTIONS, 32))
    np.testing.assert_allclose(got["image"], image.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["text"], text.numpy(), rtol=0, atol=1e-5)
