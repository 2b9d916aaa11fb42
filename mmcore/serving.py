"""Inference behind the HTTP API (no Ray): safe image decoding, the encoders on a backend, and
the API's operations: embed, classify, match and search over an index of curated shards.

    engine = Engine(load_model(uri), backend="torch")   # or "onnx", "onnx-int8" (late fusion)
    engine.embed_texts(["a red circle"])                # (B, E) float32, unit norm
    engine.embed_images([img])                          # (B, E)
    engine.classify([img], ["red", "blue"], templates)  # (N, C) probabilities
    engine.match(img, ["a red circle", "a blue star"])  # (T,) scores and how they were scored
    index = engine.index(read_index("shards/"))
    engine.search(index, text="a red circle", k=5)      # [(row, score)], best first

Scores: late fusion compares embeddings (cosine similarity; probabilities are the softmax of
the learnt logit scale times it, as in CLIP). Fusion variants score a pair with their ITM
head (the match probability); ``hybrid`` ranks an ITC shortlist with it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmcore.data.images import ImageConfig, Rejected, open_checked
from mmcore.eval.run import class_scores, pixels_of, read_shards
from mmcore.eval.zeroshot import class_prompts
from mmcore.models.model import ITC, OBJECTIVES, ImageTextModel
from mmcore.models.towers import tokenize
from mmcore.training import trim_padding

Backend = Literal["torch", "onnx", "onnx-int8"]
HYBRID_SHORTLIST = 64  # hybrid search: ITM re-ranks this many ITC candidates
CHUNK = 64  # images per forward pass when indexing or scoring pairs


class BadInput(ValueError):
    """A request the API refuses, with the HTTP status to answer (4xx) and a message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(kw_only=True)
class Limits:
    """What one request may carry; anything beyond is a 4xx, never work."""

    max_body_bytes: int = 8 * 2**20  # 413 above this
    max_image_pixels: int = 16_000_000  # decompression-bomb guard, checked on the header
    max_images: int = 16  # per /v1/embed request
    max_texts: int = 256  # per /v1/embed or /v1/match request
    max_text_chars: int = 2000
    max_labels: int = 256
    max_templates: int = 16
    max_k: int = 100

    def validate(self) -> None:
        if min(dataclasses.astuple(self)) < 1:
            raise ValueError("every serve limit must be >= 1")


def decode_image(value: str | bytes, limits: Limits) -> Image.Image:
    """Base64 text (a ``data:`` URL too) or raw bytes → an RGB image; ``BadInput`` otherwise.
    The pixel count is checked on the header, before any pixel is decoded."""
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadInput(f"image is not valid base64: {e}") from e
    checks = ImageConfig(
        max_pixels=limits.max_image_pixels, min_side=1, max_side=2**16, max_aspect_ratio=2**16
    )
    try:
        return open_checked(value, checks).convert("RGB")  # convert decodes: truncation fails
    except Rejected as e:
        if e.status == "failed_to_decode":
            raise BadInput("the bytes are not an image Pillow can decode") from e
        status = 413 if e.status == "image_too_large" else 400
        raise BadInput(f"image refused ({e.status}): {e.message}", status) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"not a decodable image: {e}") from e


def preview(img: Image.Image, side: int = 96) -> str:
    """A small JPEG of ``img`` as a ``data:`` URL, for search hits."""
    small = img.copy()
    small.thumbnail((side, side))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclasses.dataclass
class IndexRecords:
    """What a search hit shows, from the shards: independent of the model."""

    keys: list[str]
    captions: list[str]
    thumbnails: list[str]  # data: URLs
    images: list[Image.Image]


def read_index(path: str | Path, limit: int | None = None) -> IndexRecords:
    keys, images, captions = read_shards(path, limit)
    return IndexRecords(keys, captions, [preview(img) for img in images], images)


@dataclasses.dataclass
class Index:
    records: IndexRecords
    image_embeds: np.ndarray  # (N, E), unit norm
    image_tokens: torch.Tensor | None  # (N, P, Dv): fusion variants score pairs from these


class Engine:
    """One loaded model on one backend. Torch runs every variant; the ONNX backends run the
    two encoders of a late-fusion model (fusion modules are not exported)."""

    def __init__(self, model: ImageTextModel, backend: Backend = "torch") -> None:
        self.model, self.cfg, self.backend = model.eval(), model.cfg, backend
        self.onnx = None
        if backend != "torch":
            if self.cfg.fusion != "late":
                raise ValueError(f"backend {backend!r} needs fusion=late, not {self.cfg.fusion!r}")
            from mmcore.onnx_export import OnnxEncoders, export_onnx

            folder = tempfile.mkdtemp(prefix="mmray-onnx-")
            weakref.finalize(self, shutil.rmtree, folder, True)  # gone with the engine
            export_onnx(model, folder, quantize=backend == "onnx-int8")
            self.onnx = OnnxEncoders(folder, int8=backend == "onnx-int8")

    @property
    def has_itc(self) -> bool:
        return bool(OBJECTIVES[self.cfg.fusion] & ITC)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return pixels_of(images, self.cfg.vision.image_size)  # (B, 3, S, S)

    def tokens(self, texts: Sequence[str], trim: bool = True) -> tuple[torch.Tensor, ...]:
        """(B, T) ids and mask; trimmed to the longest text unless the graph has a fixed T."""
        tokens = tokenize(list(texts), self.cfg.text.context_length)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        return trim_padding(ids, mask) if trim else (ids, mask)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, E) float32, unit norm."""
        pixels = self.pixels(images)
        if self.onnx is not None:
            return self.onnx.encode_image(pixels.numpy())
        return self.model.encode_image(pixels).numpy()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(B, E) float32, unit norm."""
        ids, mask = self.tokens(texts, trim=self.onnx is None)  # ONNX: a fixed length
        if self.onnx is not None:
            return self.onnx.encode_text(ids.numpy(), mask.numpy())
        return self.model.encode_text(ids, mask).numpy()

    def logit_scale(self) -> float:
        return float(self.model.scales()[0])

    def probs_from_embeddings(
        self, image_embeds: np.ndarray, prompt_embeds: np.ndarray, n_labels: int
    ) -> np.ndarray:
        """Late fusion: image (N, E) and class-major prompt (C·T, E) embeddings → (N, C)
        probabilities over the C labels (open_clip's averaged-prompt classifier)."""
        prompts = torch.from_numpy(prompt_embeds).view(n_labels, -1, prompt_embeds.shape[-1])
        classifier = F.normalize(prompts.mean(1), dim=-1)  # (C, E)
        logits = self.logit_scale() * torch.from_numpy(image_embeds) @ classifier.T
        return logits.softmax(-1).numpy()

    def classify(
        self, images: Sequence[Image.Image], labels: Sequence[str], templates: Sequence[str]
    ) -> np.ndarray:
        """(N, C) probabilities over ``labels`` for each image."""
        if self.cfg.fusion == "late":
            return self.probs_from_embeddings(
                self.embed_images(images),
                self.embed_texts(class_prompts(labels, templates)),
                len(labels),
            )
        # Fusion: the ITM match log-probability averaged over templates, softmax over labels.
        return class_scores(self.model, images, labels, templates).softmax(-1).numpy()

    @torch.no_grad()
    def match(self, image: Image.Image, texts: Sequence[str]) -> tuple[np.ndarray, str]:
        """(T,) scores of (image, text) pairs: cosine similarity (late) or ITM probability."""
        if self.cfg.fusion == "late":
            return self.embed_texts(texts) @ self.embed_images([image])[0], "cosine"
        ids, mask = self.tokens(texts)
        return self.model.pair_scores(self.pixels([image]), ids, mask)[0].exp().numpy(), "itm"

    @torch.no_grad()
    def index(self, records: IndexRecords) -> Index:
        if not records.images:
            raise ValueError("the search index is empty")
        chunks = [records.images[i : i + CHUNK] for i in range(0, len(records.images), CHUNK)]
        embeds = np.concatenate([self.embed_images(chunk) for chunk in chunks])
        tokens = None
        if self.cfg.fusion != "late":
            tokens = torch.cat([self.model.vision(self.pixels(chunk))[0] for chunk in chunks])
        return Index(records, embeds, tokens)

    @torch.no_grad()
    def search(
        self, index: Index, k: int, text: str | None = None, image: Image.Image | None = None
    ) -> tuple[list[tuple[int, float]], str]:
        """The k best index rows for a text or an image query, best first, and the score kind.
        Image queries compare image embeddings; text queries use ITC where the variant has it
        (hybrid re-ranks the ITC shortlist by ITM) and ITM over every row otherwise."""
        if image is not None:
            scores, kind = index.image_embeds @ self.embed_images([image])[0], "cosine"
        elif self.cfg.fusion == "late":
            scores, kind = index.image_embeds @ self.embed_texts([text])[0], "cosine"
        else:
            rows = np.arange(len(index.image_embeds))
            if self.has_itc:  # hybrid
                itc = index.image_embeds @ self.embed_texts([text])[0]
                rows = np.argsort(-itc)[: max(k, HYBRID_SHORTLIST)]
            scores, kind = np.full(len(index.image_embeds), -np.inf), "itm"
            scores[rows] = self._itm(index.image_tokens[torch.from_numpy(rows)], text)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in top if np.isfinite(scores[i])], kind

    def _itm(self, image_tokens: torch.Tensor, text: str) -> np.ndarray:
        """ITM match probability of one text with each image's tokens (N, P, Dv) → (N,)."""
        ids, mask = self.tokens([text])
        text_tokens = self.model.text(ids, mask)[0]  # (1, T, Dt)
        out = []
        for chunk in image_tokens.split(CHUNK):
            n = len(chunk)
            logits = self.model.itm_logits(chunk, text_tokens.expand(n, -1, -1), mask.expand(n, -1))
            out.append(logits.softmax(-1)[:, 1])
        return torch.cat(out).numpy()
