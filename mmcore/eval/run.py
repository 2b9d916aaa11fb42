"""Evaluation of any model variant: zero-shot classification and retrieval, scored through
``mmcore.inference.Engine`` (dual encoders compare embeddings; pair-scoring variants run
their ITM head per (image, prompt) pair, hybrid on an ITC shortlist).
"""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmcore import storage
from mmcore.config import ConfigError
from mmcore.eval.caption import caption_metrics
from mmcore.eval.retrieval import recall_at_k
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES, accuracy, image_folder
from mmcore.generate import GenerationConfig, generate
from mmcore.inference import Engine
from mmcore.models.model import ImageTextModel
from mmcore.models.towers import tokenizer


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


def caption_eval(
    model: ImageTextModel, images: Sequence[Image.Image], captions: Sequence[str],
    cfg: GenerationConfig | None = None, examples: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """Captions generated for ``images`` against ``captions``: BLEU-4, CIDEr and a few
    (reference, generated) examples."""
    generated = [text for text, _ in Engine(model).caption(images, cfg)]
    return caption_metrics(captions, generated) | {
        "n_images": len(images),
        "examples": [{"reference": r, "generated": g}
                     for r, g in zip(captions[:examples], generated, strict=False)],
    }  # fmt: skip


def eval_metrics(
    model: ImageTextModel, zeroshot_folders: Sequence[str | Path],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, captions: bool = False,
) -> dict[str, float]:  # fmt: skip
    """The training job's evaluation: ``zeroshot/<folder name>/top1|top5`` per folder and, given
    validation pairs (pixels, input_ids, attention_mask), ``retrieval/i2t_rK|t2i_rK|n_pairs``
    (MLflow metric names allow no "@") and, with ``captions`` (a model trained with the
    caption objective), ``caption/bleu4|cider`` of greedy captions against the pairs' texts."""
    metrics = {}
    for folder in zeroshot_folders:
        zs = zeroshot_eval(model, folder)
        metrics |= {f"zeroshot/{Path(folder).name}/{k}": zs[k] for k in ("top1", "top5")}
    if val is not None:
        recalls = recall_at_k(Engine(model).score_inputs(*val)) | {"n_pairs": len(val[0])}
        metrics |= {f"retrieval/{k.replace('@', '')}": v for k, v in recalls.items()}
    if val is not None and captions:
        pixels, ids, _ = val
        references = tokenizer().batch_decode(ids, skip_special_tokens=True)
        generated = [t for chunk in pixels.split(64)
                     for t, _ in generate(model, chunk, GenerationConfig())]  # fmt: skip
        metrics |= {f"caption/{k}": v for k, v in caption_metrics(references, generated).items()}
    return metrics


def read_shards(
    path: str | Path, limit: int | None = None
) -> tuple[list[str], list[Image.Image], list[str]]:
    """Keys, images and captions from curated WebDataset shards (a folder or bucket prefix of
    .tar, or one .tar), local or in object storage."""
    path = str(path)
    tars = storage.list_files(path, ".tar") if storage.is_dir(path) else [path]
    if not tars:
        raise ConfigError(f"no .tar shards in {storage.absolute(path)}")
    keys, images, captions = [], [], []
    for key, sample in itertools.chain.from_iterable(map(tar_samples, tars)):
        image = sample.get("jpg", sample.get("webp"))
        keys.append(key)
        images.append(Image.open(io.BytesIO(image)).convert("RGB"))
        captions.append(sample["txt"].decode())
        if limit and len(images) >= limit:
            break
    return keys, images, captions


def tar_samples(tar: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a WebDataset tar, streamed in order."""
    with storage.open_input(tar) as f, tarfile.open(fileobj=f, mode="r|") as archive:
        key, sample = None, {}
        for member in archive:
            stem, _, ext = member.name.partition(".")
            if stem != key and sample:
                yield key, sample
                sample = {}
            key, sample[ext] = stem, archive.extractfile(member).read()
        if sample:
            yield key, sample
