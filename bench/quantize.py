"""Accuracy and speed of the exported encoders: torch fp32 vs onnxruntime fp32 vs int8.

    python bench/quantize.py [--steps 300]

Trains the shipped tiny model (frozen pretrained MiniLM text tower, tiny ViT with the conv
stem, from scratch) on `mmray sample-data` for --steps steps, then measures with each
backend: zero-shot top-1 on the held-out colour/shape compositions, the embeddings' cosine
to torch's (min over the zero-shot images and prompts), and encoder latency (batch 64, both
cores). int8 kernels differ by CPU, so it prints the CPU's flags first. Record the figures
in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from mmcore.data.captions import clean_caption
from mmcore.data.sample import make_sample_data
from mmcore.data.transforms import TransformConfig, eval_transform, train_transform
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES, accuracy, image_folder
from mmcore.losses.contrastive import clip_loss
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig, VisionConfig, tokenize
from mmcore.onnx_export import OnnxEncoders, export_onnx

ROOT = Path(__file__).resolve().parents[1]


def train(data: Path, steps: int) -> torch.nn.Module:
    info = json.loads((data / "sample_info.json").read_text())
    good = {kind for kind, status in info["expected_status"].items() if status == "success"}
    rows = [r for r in pq.read_table(data / "metadata.parquet").to_pylist() if r["kind"] in good]
    images = [Image.open(r["url"]).convert("RGB") for r in rows]
    tokens = tokenize([clean_caption(r["caption"]) for r in rows], 32)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    text, vision = TextConfig(kind="minilm", frozen=True), VisionConfig(stem="conv")
    model = build_model(ModelConfig(vision=vision, text=text, embed_dim=128))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tcfg = TransformConfig(image_size=64)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = rng.choice(len(rows), 64, replace=False)
        pixels = torch.from_numpy(np.stack([train_transform(images[i], tcfg, rng) for i in idx]))
        out = model(pixels, tokens["input_ids"][idx], tokens["attention_mask"][idx])
        loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)["clip"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(
                f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True
            )
    return model.eval()


def cpu_flags() -> str:
    info = Path("/proc/cpuinfo")
    words = set(info.read_text().split()) if info.exists() else set()
    names = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return " ".join(f"{name}={'yes' if name in words else 'no'}" for name in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n", type=int, default=1200, help="rows of the sample crawl")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    make_sample_data(work / "data", n=args.n, seed=0)
    model = train(work / "data", args.steps)
    export_onnx(model, work / "onnx", quantize=True)

    def torch_image(x: np.ndarray) -> np.ndarray:
        return model.encode_image(torch.from_numpy(x)).detach().numpy()

    def torch_text(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()

    backends = {"torch fp32": (torch_image, torch_text)}
    for name, int8 in (("onnxruntime fp32", False), ("onnxruntime int8", True)):
        enc = OnnxEncoders(work / "onnx", int8=int8)
        backends[name] = (enc.encode_image, enc.encode_text)

    print(f"\nCPU: {cpu_flags()}")
    head = f"{'colour top1':>12}{'shape top1':>12}{'image cos':>11}{'text cos':>10}"
    print(f"\n{'backend':<18}{head}{'image ms/64':>13}{'text ms/64':>12}")
    reference: dict[str, np.ndarray] = {}
    for name, (enc_image, enc_text) in backends.items():
        row, cosines = [], []
        for task in ("colour", "shape"):
            paths, labels, classes = image_folder(work / "data" / "zeroshot" / task)
            pixels = np.stack([eval_transform(Image.open(p), 64) for p in paths])
            prompts = [t.format(c) for c in classes for t in DEFAULT_TEMPLATES]
            tok = tokenize(prompts, 32)
            with torch.no_grad():
                txt = torch.from_numpy(
                    enc_text(tok["input_ids"].numpy(), tok["attention_mask"].numpy())
                )
                img = torch.from_numpy(enc_image(pixels))
            for kind, emb in ((f"{task}/image", img), (f"{task}/text", txt)):
                reference.setdefault(kind, emb.numpy())  # torch's, the first backend
                cosines.append((kind, (emb.numpy() * reference[kind]).sum(1).min()))
            clf = F.normalize(txt.view(len(classes), len(DEFAULT_TEMPLATES), -1).mean(1), dim=-1)
            row.append(accuracy(img @ clf.T, torch.tensor(labels))["top1"])
        batch = np.random.default_rng(0).standard_normal((64, 3, 64, 64)).astype(np.float32)
        tok = tokenize(["a large red circle to the left of a small blue square"] * 64, 32)
        ids, mask = tok["input_ids"].numpy(), tok["attention_mask"].numpy()
        with torch.no_grad():
            times = []
            for fn, fn_args in ((enc_image, (batch,)), (enc_text, (ids, mask))):
                fn(*fn_args)  # warm-up
                t0 = time.perf_counter()
                for _ in range(10):
                    fn(*fn_args)
                times.append((time.perf_counter() - t0) / 10 * 1000)
        cos = [min(c for k, c in cosines if k.endswith(kind)) for kind in ("image", "text")]
        print(f"{name:<18}{row[0]:>12.3f}{row[1]:>12.3f}{cos[0]:>11.4f}{cos[1]:>10.4f}"
              f"{times[0]:>13.1f}{times[1]:>12.1f}")  # fmt: skip
    print("chance: colour 1/6 = 0.167, shape 1/5 = 0.200")


if __name__ == "__main__":
    main()
