"""Evaluation of any model variant: zero-shot classification and retrieval.

Late-fusion models compare embeddings; fusion models score every (image, prompt) pair with
their ITM head (``hybrid`` re-ranks an ITC shortlist), which costs a fusion pass per pair.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmcore.config import ConfigError
from mmcore.data.transforms import eval_transform
from mmcore.eval.retrieval import recall_at_k
from mmcore.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    accuracy,
    class_prompts,
    image_folder,
    zeroshot_classifier,
)
from mmcore.models.model import ImageTextModel
from mmcore.models.towers import tokenize


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def pixels_of(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """PIL images → (B, 3, S, S), the eval transform."""
    return torch.from_numpy(np.stack([eval_transform(img, image_size) for img in images]))


@torch.no_grad()
def class_scores(
    model: ImageTextModel, images: Sequence[Image.Image], classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 64,
) -> torch.Tensor:  # fmt: skip
    """(N, C) class scores for each image (higher is more likely)."""
    cfg = model.cfg
    prompts = class_prompts(classnames, templates)
    tokens = tokenize(prompts, cfg.text.context_length)
    rows = []
    if cfg.fusion == "late":
        clf = zeroshot_classifier(
            lambda texts: model.encode_text(**tokenize(texts, cfg.text.context_length)),
            classnames, templates,
        )  # fmt: skip
        for chunk in _batches(images, batch_size):
            rows.append(model.encode_image(pixels_of(chunk, cfg.vision.image_size)) @ clf.T)
        return torch.cat(rows)
    for chunk in _batches(images, batch_size):  # fusion: score every (image, prompt) pair
        pixels = pixels_of(chunk, cfg.vision.image_size)
        scores = model.pair_scores(pixels, tokens["input_ids"], tokens["attention_mask"])
        rows.append(scores.view(len(chunk), len(classnames), len(templates)).mean(-1))
    return torch.cat(rows)


def zeroshot_eval(
    model: ImageTextModel, folder: str | Path, templates: Sequence[str] = DEFAULT_TEMPLATES
) -> dict[str, float]:
    """``folder/<class name>/<images>`` → top1, top5 (and the counts)."""
    paths, labels, classes = image_folder(folder)
    images = [Image.open(p).convert("RGB") for p in paths]
    scores = class_scores(model, images, classes, templates)
    metrics = accuracy(scores, torch.tensor(labels))
    return metrics | {"n_images": len(paths), "n_classes": len(classes)}


@torch.no_grad()
def retrieval_eval(
    model: ImageTextModel, images: Sequence[Image.Image], captions: Sequence[str],
    shortlist: int | None = 16,
) -> dict[str, float]:  # fmt: skip
    """Recall@1/5/10 both ways over (image i, caption i) pairs."""
    pixels = pixels_of(images, model.cfg.vision.image_size)
    tokens = tokenize(list(captions), model.cfg.text.context_length)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    return retrieval_metrics(model, pixels, ids, mask, shortlist)


@torch.no_grad()
def retrieval_metrics(
    model: ImageTextModel, pixels: torch.Tensor, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, shortlist: int | None = 16,
) -> dict[str, float]:  # fmt: skip
    """Recall@1/5/10 both ways over model inputs, pair i = (pixels[i], input_ids[i])."""
    use_shortlist = shortlist if model.cfg.fusion == "hybrid" else None
    scores = model.pair_scores(pixels, input_ids, attention_mask, use_shortlist)
    return recall_at_k(scores) | {"n_pairs": len(pixels)}


def eval_metrics(
    model: ImageTextModel, zeroshot_folders: Sequence[str | Path],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:  # fmt: skip
    """The training job's evaluation: ``zeroshot/<folder name>/top1|top5`` per folder and, given
    validation pairs (pixels, input_ids, attention_mask), ``retrieval/i2t_rK|t2i_rK|n_pairs``
    (MLflow metric names allow no "@")."""
    metrics = {}
    for folder in zeroshot_folders:
        zs = zeroshot_eval(model, folder)
        metrics |= {f"zeroshot/{Path(folder).name}/{k}": zs[k] for k in ("top1", "top5")}
    if val is not None:
        recalls = retrieval_metrics(model, *val)
        metrics |= {f"retrieval/{k.replace('@', '')}": v for k, v in recalls.items()}
    return metrics


def read_shards(
    path: str | Path, limit: int | None = None
) -> tuple[list[str], list[Image.Image], list[str]]:
    """Keys, images and captions from curated WebDataset shards (a folder of .tar or a .tar)."""
    import webdataset as wds

    path = Path(path)
    tars = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else [str(path)]
    if not tars:
        raise ConfigError(f"no .tar shards in {path}")
    keys, images, captions = [], [], []
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil"):
        image = sample.get("jpg", sample.get("webp"))
        keys.append(sample["__key__"])
        images.append(image.convert("RGB"))
        captions.append(sample["txt"])
        if limit and len(images) >= limit:
            break
    return keys, images, captions
