"""The model stage of curation (mmcore.data.alignment): scores, the filter, semantic dedup."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmcore.config import ConfigError, load_config
from mmcore.data.alignment import AlignmentConfig, keep_mask, score, semantic_duplicates
from mmcore.data.curate import CurateConfig
from mmcore.data.inputs import preprocess
from mmcore.inference import Engine
from mmcore.models.model import ModelConfig, build_model
from mmcore.models.towers import TextConfig


def _jpeg(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), rgb).save(buf, "JPEG")
    return buf.getvalue()


def test_scores_are_the_models_own_and_do_not_depend_on_the_rows_order() -> None:
    torch.manual_seed(0)
    engine = Engine(build_model(ModelConfig(text=TextConfig(kind="transformer"))))
    keys = [f"{i:09d}" for i in range(7)]
    images = [_jpeg((30 * i, 200 - 20 * i, 90)) for i in range(7)]
    captions = [f"a picture number {i}" for i in range(7)]
    table = score(engine, keys, images, captions, batch_size=3)
    shuffled = [6, 2, 0, 5, 1, 4, 3]
    again = score(engine, *([v[i] for i in shuffled] for v in (keys, images, captions)), 3)
    assert table.equals(again) and table.column("key").to_pylist() == keys

    inputs = preprocess({"jpg": images, "txt": captions, "__key__": keys}, 64, 32)
    direct = engine.embed_pairs(*(torch.from_numpy(inputs[k]) for k in
                                  ("pixels", "input_ids", "attention_mask")))  # fmt: skip
    np.testing.assert_allclose(table.column("alignment").to_numpy(), direct["alignment"],
                               atol=1e-5)  # fmt: skip
    embeddings = np.stack(table.column("image_embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(embeddings, direct["image_embedding"], atol=1e-5)


def test_the_filter_keeps_a_score_or_the_best_fraction_ties_by_key() -> None:
    scores = np.asarray([0.2, 0.9, 0.5, 0.5, 0.1], np.float32)
    keep, cutoff = keep_mask(scores, AlignmentConfig(model="m", min_score=0.5))
    assert keep.tolist() == [False, True, True, True, False] and cutoff == 0.5
    keep, cutoff = keep_mask(scores, AlignmentConfig(model="m", keep_fraction=0.4))
    assert keep.tolist() == [False, True, True, False, False] and cutoff == 0.5  # tie: key 2
    keep, cutoff = keep_mask(scores, AlignmentConfig(model="m", keep_fraction=0.5))
    assert keep.sum() == 3  # ceil(0.5 * 5)
    keep, cutoff = keep_mask(scores, AlignmentConfig(model="m"))
    assert keep.all() and cutoff is None


def _brute_force(vectors: np.ndarray, threshold: float) -> tuple[list[int], list[int]]:
    kept, dropped, of = [], [], []
    for i, v in enumerate(vectors):
        close = [k for k in kept if float(vectors[k] @ v) >= threshold]
        if close:
            dropped.append(i), of.append(min(close))
        else:
            kept.append(i)
    return dropped, of


@pytest.mark.parametrize("rows", [300, 25_000])  # exact search; an inverted-file index
def test_semantic_dedup_is_the_key_order_rule_over_close_embeddings(rows: int) -> None:
    rng = np.random.default_rng(rows)
    vectors = rng.standard_normal((rows, 32)).astype(np.float32)
    copies = np.arange(0, rows - 1, 20)
    vectors[copies + 1] = vectors[copies] + 0.02 * rng.standard_normal((len(copies), 32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dropped, of = semantic_duplicates(vectors, 0.98)
    if rows <= 300:
        assert (dropped.tolist(), of.tolist()) == _brute_force(vectors, 0.98)
    else:  # brute force over 25 000 rows is slow in Python: the planted copies, at least
        assert set((copies + 1).tolist()) <= set(dropped.tolist())
        assert all(float(vectors[d] @ vectors[o]) >= 0.98 for d, o in zip(dropped, of, strict=True))
    assert len(dropped) and np.all(of < dropped)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["alignment.min_score=0.3"], "need alignment.model"),
        (["dedup.semantic=true"], "dedup.semantic compares the image embeddings"),
        (["alignment.model=m", "alignment.min_score=1.5"], "must be in [-1, 1]"),
        (["alignment.model=m", "alignment.keep_fraction=0"], "must be in (0, 1]"),
        (["alignment.model=m", "alignment.keep_fraction=0.3", "alignment.min_score=0.1"],
         "not both"),
        (["alignment.model=m", "dedup.semantic_threshold=1.2"], "must be in (0, 1]"),
    ],
)  # fmt: skip
def test_a_bad_alignment_setting_fails_before_work(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(CurateConfig, None, ["input.path=i", "output.path=o", *overrides])
