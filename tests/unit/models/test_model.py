"""The late-fusion model: forward/backward, frozen towers, save/load, and overfitting."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from mmcore.config import ConfigError, load_config
from mmcore.data.transforms import eval_transform
from mmcore.eval.retrieval import recall_at_k
from mmcore.export import load_model, save_model
from mmcore.inference import trim_padding
from mmcore.losses.contrastive import clip_loss, siglip_loss
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import (
    VISION_SIZES,
    ConvStem,
    TextConfig,
    TextMemo,
    VisionConfig,
    tokenize,
)

TINY = ModelConfig(text=TextConfig(kind="transformer", size="tiny"))


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    texts = [f"a {c} circle" for c in ("red", "green", "blue", "yellow", "purple")][:n]
    return pixels, tokenize(texts, 32)


@pytest.mark.parametrize("text", ["transformer", "minilm"])
def test_gradients_reach_both_towers_and_the_scales(text: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(text=TextConfig(kind=text)))
    pixels, tokens = batch()
    out = model(pixels, **tokens)
    assert out.image_embeds.shape == out.text_embeds.shape == (4, 128)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)["clip"]
    loss = (
        loss
        + siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)["siglip"]
    )
    loss.backward()
    for part in (model.vision, model.text, model.visual_projection, model.text_projection):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    assert model.logit_scale.grad.abs() > 0 and model.logit_bias.grad.abs() > 0
    assert model.logit_scale.shape == (1,)  # DeepSpeed cannot broadcast 0-dim parameters


def test_frozen_minilm_is_locked_and_pretrained() -> None:
    model = build_model(ModelConfig(text=TextConfig(kind="minilm", frozen=True)))
    assert not any(p.requires_grad for p in model.text.parameters())
    assert all(p.requires_grad for p in model.text_projection.parameters())
    with torch.no_grad():  # pretrained: related captions are closer than unrelated ones
        _, pooled = model.text(**tokenize(["a red circle", "a red round disc", "tax law"], 32))
    sim = torch.nn.functional.cosine_similarity
    assert sim(pooled[0], pooled[1], dim=0) > sim(pooled[0], pooled[2], dim=0) + 0.2
    model.train()  # a locked tower keeps no dropout: the same text, the same embedding
    assert model.vision.training and not model.text.model.training
    tokens = tokenize(["a red circle"] * 2, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_text(**tokens), model.encode_text(**tokens))


def test_text_memo_gives_the_locked_towers_features_computing_each_text_once() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(text=TextConfig(kind="minilm", frozen=True))).train()
    texts = ["a red circle", "a large blue square to the left of a star", "a red circle", "a star"]
    pixels, tokens = torch.randn(4, 3, 64, 64), tokenize(texts, 32)
    with torch.no_grad():
        want = model(pixels, **tokens)
    rows: list[int] = []  # batch sizes the tower ran on
    model.text.register_forward_hook(lambda module, args, out: rows.append(len(out[1])))
    model.text_memo = TextMemo(model.text, size=2)
    real = tokens["attention_mask"].bool()
    for _ in range(2):
        out = model(pixels, **tokens)
        assert torch.allclose(out.text_embeds, want.text_embeds, atol=1e-5)
        assert torch.allclose(out.text_tokens[real], want.text_tokens[real], atol=1e-4)
        assert not out.text_tokens[~real].any()  # zero past each text's end
    assert rows == [3, 1]  # 3 distinct texts; 2 kept, the third computed again
    out.text_embeds.sum().backward()  # the projection above the memo still learns
    assert model.text_projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="only a locked"):
        TextMemo(build_model(TINY).text, size=2)


def test_text_memo_keeps_features_on_disk_for_the_next_run_of_the_same_tower(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(text=TextConfig(kind="minilm", frozen=True)))
    texts = ["a red circle", "a large blue square to the left of a star", "a star"]
    tokens = tokenize(texts, 32)
    first = TextMemo(model.text, size=8, folder=tmp_path)
    want = first(**tokens)
    first.save("rank-0")
    rows: list[int] = []
    model.text.register_forward_hook(lambda module, args, out: rows.append(len(out[1])))
    again = TextMemo(model.text, size=8, folder=tmp_path)  # the next run: read, not computed
    got = again(**tokens)
    assert (again.loaded, rows) == (3, [])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    again.save("rank-0")  # nothing new: the file is left as it was
    assert [p.name for p in (tmp_path / first.folder.name).iterdir()] == ["rank-0.pt"]
    (first.folder / "rank-1.pt").write_bytes(b"half a file")  # unreadable: skipped
    with torch.no_grad():  # other weights: another folder, nothing loaded
        model.text.model.embeddings.word_embeddings.weight.add_(1.0)
    other = TextMemo(model.text, size=8, folder=tmp_path)
    assert other.loaded == 0 and other.folder != first.folder
    assert TextMemo(model.text, size=8).folder is None  # no folder: memory only
    blocked = tmp_path / "file"  # a folder that cannot be made: a warning, the run goes on
    blocked.write_text("")
    memo = TextMemo(model.text, size=8, folder=blocked)
    memo(**tokens)
    memo.save("rank-0")
    assert "text features not kept" in caplog.text


@pytest.mark.parametrize(("size", "image_size"), [("tiny", 64), ("small", 64)])
def test_conv_stem_gives_the_patch_grid_and_learns(size: str, image_size: int) -> None:
    torch.manual_seed(0)
    vision = VisionConfig(size=size, image_size=image_size, stem="conv")
    model = build_model(ModelConfig(vision=vision, text=TextConfig(kind="transformer")))
    stem = model.vision.model.embeddings.patch_embedding
    patch = VISION_SIZES[size][4]
    convs = sum(isinstance(m, nn.Conv2d) for m in stem)
    assert isinstance(stem, ConvStem) and convs == 1 + math.log2(patch)  # full res, then halvings
    pixels = torch.randn(2, 3, image_size, image_size)
    tokens, pooled = model.vision(pixels)
    assert tokens.shape == (2, 1 + (image_size // patch) ** 2, model.vision.width)
    pooled.pow(2).sum().backward()  # not .sum(): a LayerNorm output sums to a constant
    assert stem[0].weight.grad.abs().sum() > 0


def test_unknown_stem_fails_before_building() -> None:
    with pytest.raises(ConfigError, match="stem: 'resnet' is not one of"):
        load_config(ModelConfig, None, ["vision.stem=resnet"])


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_save_load_gives_identical_outputs(tmp_path: Path, stem: str) -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, vision=VisionConfig(stem=stem))).eval()
    pixels, tokens = batch()
    with torch.no_grad():
        before = model(pixels, **tokens)
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        after = loaded(pixels, **tokens)
    assert torch.equal(before.image_embeds, after.image_embeds)
    assert torch.equal(before.text_embeds, after.text_embeds)


def test_bad_model_config_fails_before_building() -> None:
    with pytest.raises(ConfigError, match="image_size must be a multiple"):
        load_config(ModelConfig, None, ["vision.image_size=60"])
    with pytest.raises(ConfigError, match="stem_channels must be >= 1"):
        load_config(ModelConfig, None, ["vision.stem_channels=0"])
    with pytest.raises(ConfigError, match="fusion: 'nope' is not one of"):
        load_config(ModelConfig, None, ["fusion=nope"])


def test_tiny_model_overfits_64_pairs(sample_dir: Path) -> None:
    """The smoke test of learning: 64 image-caption pairs memorised to R@1 >= 0.95."""
    rows = pq.read_table(sample_dir / "metadata.parquet").to_pylist()
    seen, pairs = set(), []
    for r in rows:  # 64 clean pairs with distinct captions
        if r["kind"] == "clean" and r["caption"] not in seen:
            seen.add(r["caption"])
            pairs.append(r)
    pairs = pairs[:64]
    pixels = torch.from_numpy(np.stack([eval_transform(Image.open(r["url"]), 64) for r in pairs]))
    ids, mask = trim_padding(**tokenize([r["caption"] for r in pairs], 32))  # as training does
    tokens = {"input_ids": ids, "attention_mask": mask}
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(200):  # R@1 reaches 1.0 near step 150 here; 200 leaves a margin
        out = model(pixels, **tokens)
        loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)["clip"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        r = recall_at_k(model.encode_image(pixels) @ model.encode_text(**tokens).T, ks=(1,))
    assert r["i2t_r@1"] >= 0.95 and r["t2i_r@1"] >= 0.95, (r, loss.item())
