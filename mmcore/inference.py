"""One inference path: a model with its preprocessing, on a backend. Evaluation, the MLflow
pyfunc, Serve and the benchmarks all score through ``Engine``.

    engine = Engine(load_model(uri), backend="torch")   # or "onnx", "onnx-int8" (late fusion)
    engine.embed_texts(["a red circle"])                # (B, E) float32, unit norm
    engine.embed_images([img])                          # (B, E)
    engine.classify([img], ["red", "blue"], templates)  # (N, C) probabilities
    engine.match(img, ["a red circle", "a blue star"])  # (T,) scores and how they were scored
    engine.pair_scores(images, captions)                # (N, M): retrieval
    index = engine.index(images)
    engine.search(index, k=5, text="a red circle")      # [(row, score)], best first

Scores follow what the model can do (``model.scores_pairs``, ``model.has_itc``): a dual
encoder compares embeddings (cosine similarity; probabilities are the softmax of the learnt
logit scale times it, as in CLIP). A fusion variant scores a pair with its ITM head (the
match probability); one that also has trained ITC embeddings (hybrid) ranks an ITC
shortlist with it.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from mmcore.data.transforms import eval_transform
from mmcore.eval.zeroshot import DEFAULT_TEMPLATES, class_prompts, zeroshot_classifier
from mmcore.generate import generate_chunks
from mmcore.models.model import ImageTextModel, ModelConfig
from mmcore.models.towers import tokenize
from mmcore.tasks import ANSWER, GenerationConfig, question_prompts

Backend = Literal["torch", "onnx", "onnx-int8"]
HYBRID_SHORTLIST = 64  # hybrid search: ITM re-ranks this many ITC candidates
CHUNK = 64  # images per forward pass when indexing or scoring pairs


@dataclasses.dataclass(frozen=True)
class Transforms:
    """A model's inference preprocessing, built from its config (as open_clip builds the
    model and its transforms together); training adds augmentation on top of the same."""

    image_size: int
    context_length: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> Transforms:
        return cls(cfg.vision.image_size, cfg.text.context_length)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → (B, 3, S, S): resize, centre crop, CLIP normalisation."""
        return torch.from_numpy(np.stack([eval_transform(img, self.image_size) for img in images]))

    def tokens(self, texts: Sequence[str], trim: bool = True) -> tuple[torch.Tensor, ...]:
        """(B, T) ids and mask; trimmed to the longest text unless a graph needs a fixed T."""
        tokens = tokenize(list(texts), self.context_length)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        return trim_padding(ids, mask) if trim else (ids, mask)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the trailing columns that are padding in every row: the text tower then runs on
    the batch's longest caption, not the full context length."""
    length = max(1, int(attention_mask.sum(1).max()))
    return input_ids[:, :length], attention_mask[:, :length]


def trim_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``trim_padding`` of each text in a batch: the captions, and the questions when there."""
    out = dict(batch)
    for ids, mask in (("input_ids", "attention_mask"), ("qa_ids", "qa_mask")):
        if ids in out:
            out[ids], out[mask] = trim_padding(out[ids], out[mask])
    return out


@dataclasses.dataclass
class Index:
    image_embeds: np.ndarray  # (N, E), unit norm
    image_tokens: torch.Tensor | None  # (N, P, Dv): pair-scoring variants score from these

    def __len__(self) -> int:
        return len(self.image_embeds)


class Engine:
    """One loaded model on one backend. Torch runs every variant; the ONNX backends run the
    two encoders of a dual encoder (fusion modules are not exported)."""

    def __init__(self, model: ImageTextModel, backend: Backend = "torch") -> None:
        self.model, self.cfg, self.backend = model.eval(), model.cfg, backend
        self.transforms = Transforms.of(model.cfg)
        self.onnx = None
        if backend != "torch":
            if model.scores_pairs:
                raise ValueError(f"backend {backend!r} needs fusion=late, not {self.cfg.fusion!r}")
            from mmcore.onnx_export import OnnxEncoders, export_onnx

            folder = tempfile.mkdtemp(prefix="mmray-onnx-")
            weakref.finalize(self, shutil.rmtree, folder, True)  # gone with the engine
            export_onnx(model, folder, quantize=backend == "onnx-int8")
            self.onnx = OnnxEncoders(folder, int8=backend == "onnx-int8")

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, E) float32, unit norm."""
        pixels = self.transforms.pixels(images)
        if self.onnx is not None:
            return self.onnx.encode_image(pixels.numpy())
        return self.model.encode_image(pixels).numpy()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(B, E) float32, unit norm."""
        ids, mask = self.transforms.tokens(texts, trim=self.onnx is None)  # ONNX: a fixed T
        if self.onnx is not None:
            return self.onnx.encode_text(ids.numpy(), mask.numpy())
        return self.model.encode_text(ids, mask).numpy()

    @torch.no_grad()
    def embed_pairs(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """Preprocessed (image, caption) pairs → unit image and text embeddings (B, E) and each
        pair's ``alignment``: the embeddings' cosine, or the ITM match probability where the
        variant scores pairs."""
        ids, mask = trim_padding(input_ids, attention_mask)
        out = self.model(pixels, ids, mask)
        if self.model.scores_pairs:
            alignment = self.model.itm_logits(out.image_tokens, out.text_tokens, mask)
            alignment = alignment.softmax(-1)[:, 1]
        else:
            alignment = (out.image_embeds * out.text_embeds).sum(-1)
        return {
            "image_embedding": out.image_embeds.numpy(),
            "text_embedding": out.text_embeds.numpy(),
            "alignment": alignment.numpy(),
        }

    def caption(
        self, images: Sequence[Image.Image], cfg: GenerationConfig | None = None
    ) -> list[tuple[str, float]]:
        """(text, mean token log-probability) per image, from the caption decoder; with
        ``cfg.num_return_sequences`` R, each image's best R beams, one image after another."""
        return self._generate(images, cfg or GenerationConfig())

    def answer(
        self, images: Sequence[Image.Image], questions: Sequence[str],
        cfg: GenerationConfig = ANSWER,
    ) -> list[tuple[str, float]]:  # fmt: skip
        """(answer, mean token log-probability) per (image, question), from the decoder the
        ``vqa`` objective trains."""
        prompts = question_prompts(questions, self.transforms.context_length)
        return self._generate(images, cfg, prompts)

    def _generate(
        self, images: Sequence[Image.Image], cfg: GenerationConfig,
        prompts: list[list[int]] | None = None,
    ) -> list[tuple[str, float]]:  # fmt: skip
        pixels = (self.transforms.pixels(chunk) for chunk in _chunks(images))  # chunk by chunk
        return generate_chunks(self.model, pixels, cfg, prompts)

    def logit_scale(self) -> float:
        return self.model.scales()[0].item()

    def logits_from_embeddings(
        self, image_embeds: np.ndarray, prompt_embeds: np.ndarray, n_labels: int
    ) -> torch.Tensor:
        """Image (N, E) and class-major prompt (C·T, E) embeddings → (N, C) logits over the
        C labels (open_clip's classifier: the renormalised mean prompt per class)."""
        classifier = zeroshot_classifier(torch.from_numpy(prompt_embeds), n_labels)  # (C, E)
        return self.logit_scale() * torch.from_numpy(image_embeds) @ classifier.T

    def probs_from_embeddings(
        self, image_embeds: np.ndarray, prompt_embeds: np.ndarray, n_labels: int
    ) -> np.ndarray:
        """(N, C) probabilities: the softmax of ``logits_from_embeddings``."""
        logits = self.logits_from_embeddings(image_embeds, prompt_embeds, n_labels)
        return logits.softmax(-1).numpy()

    @torch.no_grad()
    def class_scores(
        self, images: Sequence[Image.Image], labels: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> torch.Tensor:  # fmt: skip
        """(N, C) logits over ``labels`` for each image: the scaled cosine with each class's
        mean prompt embedding, or (pair-scoring variants) the ITM match log-probability
        averaged over templates."""
        if not self.model.scores_pairs:
            prompts = self.embed_texts(class_prompts(labels, templates))
            embeds = np.concatenate([self.embed_images(c) for c in _chunks(images)])
            return self.logits_from_embeddings(embeds, prompts, len(labels))
        ids, mask = self.transforms.tokens(class_prompts(labels, templates))
        rows = []
        for chunk in _chunks(images):
            scores = self.model.pair_scores(self.transforms.pixels(chunk), ids, mask)
            rows.append(scores.view(len(chunk), len(labels), len(templates)).mean(-1))
        return torch.cat(rows)

    def classify(
        self, images: Sequence[Image.Image], labels: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> np.ndarray:  # fmt: skip
        """(N, C) probabilities over ``labels`` for each image."""
        return self.class_scores(images, labels, templates).softmax(-1).numpy()

    def pair_scores(
        self, images: Sequence[Image.Image], texts: Sequence[str], shortlist: int | None = 16
    ) -> torch.Tensor:
        """(N, M) scores of every (image, text) pair, for retrieval (``score_inputs``)."""
        ids, mask = self.transforms.tokens(texts)
        return self.score_inputs(self.transforms.pixels(images), ids, mask, shortlist)

    @torch.no_grad()
    def score_inputs(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        shortlist: int | None = 16,
    ) -> torch.Tensor:  # fmt: skip
        """(N, M) pair scores of preprocessed inputs: ``model.pair_scores``, with an ITC
        shortlist of ``shortlist`` texts per image where the variant has both heads."""
        use = shortlist if self.model.has_itc and self.model.scores_pairs else None
        return self.model.pair_scores(pixels, input_ids, attention_mask, use)

    @torch.no_grad()
    def match(self, image: Image.Image, texts: Sequence[str]) -> tuple[np.ndarray, str]:
        """(T,) scores of (image, text) pairs: cosine similarity or ITM probability."""
        if not self.model.scores_pairs:
            return self.embed_texts(texts) @ self.embed_images([image])[0], "cosine"
        ids, mask = self.transforms.tokens(texts)
        pixels = self.transforms.pixels([image])
        return self.model.pair_scores(pixels, ids, mask)[0].exp().numpy(), "itm"

    @torch.no_grad()
    def index(self, images: Sequence[Image.Image]) -> Index:
        if not images:
            raise ValueError("the search index is empty")
        embeds = np.concatenate([self.embed_images(chunk) for chunk in _chunks(images)])
        tokens = None
        if self.model.scores_pairs:
            tokens = torch.cat(
                [self.model.vision(self.transforms.pixels(c))[0] for c in _chunks(images)]
            )
        return Index(embeds, tokens)

    @torch.no_grad()
    def search(
        self, index: Index, k: int, text: str | None = None, image: Image.Image | None = None
    ) -> tuple[list[tuple[int, float]], str]:
        """The k best index rows for a text or an image query, best first, and the score kind.
        Image queries compare image embeddings; text queries use ITC where the variant has it
        (hybrid re-ranks the ITC shortlist by ITM) and ITM over every row otherwise."""
        if image is not None:
            scores, kind = index.image_embeds @ self.embed_images([image])[0], "cosine"
        elif not self.model.scores_pairs:
            scores, kind = index.image_embeds @ self.embed_texts([text])[0], "cosine"
        else:
            rows = np.arange(len(index.image_embeds))
            if self.model.has_itc:
                itc = index.image_embeds @ self.embed_texts([text])[0]
                rows = np.argsort(-itc)[: max(k, HYBRID_SHORTLIST)]
            scores, kind = np.full(len(index.image_embeds), -np.inf), "itm"
            scores[rows] = self._itm(index.image_tokens[torch.from_numpy(rows)], text)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in top if np.isfinite(scores[i])], kind

    def _itm(self, image_tokens: torch.Tensor, text: str) -> np.ndarray:
        """ITM match probability of one text with each image's tokens (N, P, Dv) → (N,)."""
        ids, mask = self.transforms.tokens([text])
        text_tokens = self.model.text(ids, mask)[0]  # (1, T, Dt)
        out = []
        for chunk in image_tokens.split(CHUNK):
            n = len(chunk)
            logits = self.model.itm_logits(chunk, text_tokens.expand(n, -1, -1), mask.expand(n, -1))
            out.append(logits.softmax(-1)[:, 1])
        return torch.cat(out).numpy()


def _chunks(items: Sequence) -> list[Sequence]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
