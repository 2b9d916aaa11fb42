"""Evaluation of any model variant: zero-shot classification and retrieval, scored through
``mmcore.inference.Engine`` (dual encoders compare embeddings; pair-scoring variants run
their ITM head per (image, prompt) pair, hybrid on an ITC shortlist).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from mmcore.config import ConfigError
from mmcore.eval.retrieval import recall_at_k
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES, accuracy, image_folder
from mmcore.inference import Engine
from mmcore.models.model import ImageTextModel


def zeroshot_eval(
    model: ImageTextModel, folder: str | Path, templates: Sequence[str] = DEFAULT_TEMPLATES
) -> dict[str, float]:
    """``folder/<class name>/<images>`` → top1, top5 (and the counts)."""
    paths, labels, classes = image_folder(folder)
    images = [Image.open(p).convert("RGB") for p in paths]
    scores = Engine(model).class_scores(images, classes, templates)
    metrics = accuracy(scores, torch.tensor(labels))
    return metrics | {"n_images": len(paths), "n_classes": len(classes)}


def retrieval_eval(
    model: ImageTextModel, images: Sequence[Image.Image], captions: Sequence[str],
    shortlist: int | None = 16,
) -> dict[str, float]:  # fmt: skip
    """Recall@1/5/10 both ways over (image i, caption i) pairs."""
    scores = Engine(model).pair_scores(images, captions, shortlist)
    return recall_at_k(scores) | {"n_pairs": len(images)}


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
        recalls = recall_at_k(Engine(model).score_inputs(*val)) | {"n_pairs": len(val[0])}
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
