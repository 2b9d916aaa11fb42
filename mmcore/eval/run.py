"""Evaluation of any model variant: zero-shot classification and retrieval, scored through
``mmcore.inference.Engine`` (dual encoders compare embeddings; pair-scoring variants run
their ITM head per (image, prompt) pair, hybrid on an ITC shortlist).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmcore.data.shards import sample_image, shard_tars, tar_samples
from mmcore.eval.caption import caption_metrics
from mmcore.eval.retrieval import recall_at_k
from mmcore.eval.vqa import vqa_metrics
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES, accuracy, image_folder
from mmcore.generate import generate_chunks
from mmcore.inference import CHUNK, Engine
from mmcore.models.model import ImageTextModel
from mmcore.models.towers import tokenizer
from mmcore.tasks import ANSWER, GenerationConfig


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


def vqa_eval(
    model: ImageTextModel, images: Sequence[Image.Image], questions: Sequence[str],
    answers: Sequence[str], types: Sequence[str] | None = None,
    cfg: GenerationConfig = ANSWER, examples: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """Answers generated for (image, question) pairs against ``answers``: exact-match
    accuracy overall and by type, the majority baseline, and a few examples."""
    predicted = [text for text, _ in Engine(model).answer(images, questions, cfg)]
    return vqa_metrics(answers, predicted, types) | {
        "examples": [{"question": q, "answer": a, "predicted": p}
                     for q, a, p in zip(questions[:examples], answers, predicted, strict=False)],
    }  # fmt: skip


def eval_metrics(
    model: ImageTextModel, zeroshot_folders: Sequence[str | Path],
    val: dict[str, torch.Tensor] | None = None, generative: bool = False,
) -> dict[str, float]:  # fmt: skip
    """The training job's evaluation: ``zeroshot/<folder name>/top1|top5`` per folder and, given
    a validation batch (``pixels``, ``input_ids``, ``attention_mask``, and ``qa_ids``/
    ``qa_mask`` with questions), ``retrieval/i2t_rK|t2i_rK|n_pairs`` (MLflow metric names
    allow no "@"); with ``generative`` (a model whose decoder was trained: the caption or vqa
    objective), ``caption/bleu4|cider`` of greedy captions against the pairs' texts and
    ``vqa/accuracy`` of greedy answers to the questions."""
    metrics = {}
    for folder in zeroshot_folders:
        zs = zeroshot_eval(model, folder)
        metrics |= {f"zeroshot/{Path(folder).name}/{k}": zs[k] for k in ("top1", "top5")}
    if val is None:
        return metrics
    pixels, ids, mask = val["pixels"], val["input_ids"], val["attention_mask"]
    recalls = recall_at_k(Engine(model).score_inputs(pixels, ids, mask)) | {"n_pairs": len(pixels)}
    metrics |= {f"retrieval/{k.replace('@', '')}": v for k, v in recalls.items()}
    if not generative:
        return metrics
    references = tokenizer().batch_decode(ids, skip_special_tokens=True)
    generated = generate_chunks(model, pixels.split(CHUNK), GenerationConfig())
    metrics |= {f"caption/{k}": v for k, v in
                caption_metrics(references, [t for t, _ in generated]).items()}  # fmt: skip
    if "qa_ids" in val and (asked := val_questions(val["qa_ids"], val["qa_mask"]))[0]:
        rows, prompts, answers = asked
        predicted = generate_chunks(model, pixels[rows].split(CHUNK), ANSWER, prompts)
        metrics["vqa/accuracy"] = vqa_metrics(answers, [t for t, _ in predicted])["accuracy"]
    return metrics


def val_questions(
    qa_ids: torch.Tensor, qa_mask: torch.Tensor
) -> tuple[list[int], list[list[int]], list[str]]:
    """The rows of a batch's ``[CLS] question [SEP] answer [SEP]`` ids that have a question:
    (rows, prompts ``[CLS] question [SEP]``, answers)."""
    tok = tokenizer()
    rows, prompts, answers = [], [], []
    for i, (row, m) in enumerate(zip(qa_ids.tolist(), qa_mask.tolist(), strict=True)):
        row = row[: sum(m)]
        end = row.index(tok.sep_token_id) + 1
        if end < len(row):
            rows.append(i)
            prompts.append(row[:end])
            answers.append(tok.decode(row[end:], skip_special_tokens=True))
    return rows, prompts, answers


def has_questions(path: str | Path, samples: int = 100) -> bool:
    """Whether any of the first ``samples`` samples of curated shards has questions."""
    first = itertools.islice(tar_samples(shard_tars(path)[0]), samples)
    return any(sample_questions(sample) for _, sample in first)


def sample_questions(sample: dict[str, bytes]) -> list[dict[str, str]]:
    """A shard sample's question-answer pairs: its ``KEY.json``'s ``qa`` list, or []."""
    return json.loads(sample.get("json", b"{}")).get("qa") or []


def read_questions(
    path: str | Path, limit: int | None = None
) -> tuple[list[Image.Image], list[str], list[str], list[str]]:
    """Every question-answer pair of the samples in curated shards (their ``KEY.json``'s
    ``qa``; the first ``limit`` samples that have any): (image, question, answer, type) as
    four lists, an image once per question."""
    images, questions, answers, types = [], [], [], []
    samples = 0
    for _, sample in itertools.chain.from_iterable(map(tar_samples, shard_tars(path))):
        pairs = sample_questions(sample)
        if not pairs:
            continue
        image = sample_image(sample)
        for qa in pairs:
            images.append(image)
            questions.append(qa["question"])
            answers.append(qa["answer"])
            types.append(qa.get("type", ""))
        samples += 1
        if limit and samples >= limit:
            break
    return images, questions, answers, types
