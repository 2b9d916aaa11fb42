"""Zero-shot classification: class names × prompt templates → averaged text embeddings.

prompts = class_prompts(["red", "green"], DEFAULT_TEMPLATES)     # class-major
classifier = zeroshot_classifier(encode_texts(prompts), n_classes=2)  # (C, E)
metrics = accuracy(image_embeds @ classifier.T, labels)   # {"top1": ..., "top5": ...}

The module itself does not import torch (its functions take tensors), so that the server's
request checks can use its templates before a model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmcore.config import ConfigError

if TYPE_CHECKING:
    import torch

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a rendering of a {}.",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every (class, template) prompt, class-major: prompt c·T + t is template t of class c."""
    return [t.format(name) for name in classnames for t in templates]


def zeroshot_classifier(prompt_embeds: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class-major prompt embeddings (C·T, E), unit norm → (C, E): per class, the
    renormalised mean embedding of its prompts (open_clip's recipe)."""
    mean = prompt_embeds.view(n_classes, -1, prompt_embeds.shape[-1]).mean(1)  # (C, E)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's arithmetic


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """logits (N, C), labels (N,) → top-k accuracies (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hits = top == labels[:, None]
    return {f"top{k}": hits[:, :k].any(1).float().mean().item() for k in ks}


def image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """``root/<class name>/<images>`` → (paths, labels, class names sorted by name)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ConfigError(f"{root} has {len(classes)} class sub-folders, zero-shot needs two or "
                          "more (DIR/<class name>/<images>)")  # fmt: skip
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise ConfigError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its "
                          "class sub-folders")  # fmt: skip
    return paths, labels, classes
