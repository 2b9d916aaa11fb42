"""mmray's image and text encoders for transformers' ``AutoModel`` (``trust_remote_code``),
copied into every exported folder by ``mmcore.export.export_hf`` for the models that
``CLIPModel`` cannot hold (a convolutional stem, the MiniLM text tower). It needs torch and
transformers, not mmray.

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = CLIPProcessor.from_pretrained(folder, backend="pil")  # mmray's pixels
    image = model.get_image_features(**processor(images=[img], return_tensors="pt"))  # (B, E)
    text = model.get_text_features(**processor(text=["a red circle"], padding="max_length",
                                               max_length=32, return_tensors="pt"))  # (B, E)

Embeddings are unit norm; an image-text score is their dot product (times ``logit_scale``).
The state-dict names are mmray's, so the folder's weights are the model's as trained.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
)


class MmrayConfig(PretrainedConfig):
    model_type = "mmray"

    def __init__(
        self, vision_config: dict | None = None, text_config: dict | None = None,
        text_kind: str = "minilm", stem: str = "patch", stem_channels: int = 24,
        embed_dim: int = 128, **kwargs,
    ) -> None:  # fmt: skip
        self.vision_config = vision_config or {}
        self.text_config = text_config or {}
        self.text_kind, self.stem, self.stem_channels = text_kind, stem, stem_channels
        self.embed_dim = embed_dim
        super().__init__(**kwargs)


class ConvStem(nn.Sequential):
    """(B, 3, H, W) → (B, width, H/patch, W/patch), as the patch embedding it replaces: a 3×3
    convolution at full resolution, then stride-2 3×3 convolutions (channels C, C, 2C, ...)
    down to the patch grid, the last one to ``width``; BatchNorm and GELU between them, as
    Xiao et al.'s stem has (BN, ReLU). The patch size is a power of two. (mmray's vision
    tower uses this class too: ``mmcore.models.towers``.)"""

    def __init__(self, width: int, patch: int, channels: int) -> None:
        sizes = [channels] + [channels * 2**i for i in range(patch.bit_length() - 2)] + [width]
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, 1, 1)]
        for c_in, c_out in itertools.pairwise(sizes):
            layers += [nn.BatchNorm2d(c_in), nn.GELU(), nn.Conv2d(c_in, c_out, 3, 2, 1)]
        super().__init__(*layers)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads patch_embedding.weight.dtype
        return self[-1].weight


class VisionTower(nn.Module):
    def __init__(self, config: MmrayConfig) -> None:
        super().__init__()
        vision = CLIPVisionConfig(**config.vision_config)
        self.model = CLIPVisionModel(vision)
        if config.stem == "conv":
            stem = ConvStem(vision.hidden_size, vision.patch_size, config.stem_channels)
            self.model.embeddings.patch_embedding = stem
        self.width = vision.hidden_size


class TextTower(nn.Module):
    def __init__(self, config: MmrayConfig) -> None:
        super().__init__()
        if config.text_kind == "minilm":
            self.model = BertModel(BertConfig(**config.text_config))
        else:
            self.model = CLIPTextModel(CLIPTextConfig(**config.text_config))
        self.width = self.model.config.hidden_size


class MmrayModel(PreTrainedModel):
    config_class = MmrayConfig
    base_model_prefix = "mmray"
    main_input_name = "pixel_values"

    def __init__(self, config: MmrayConfig) -> None:
        super().__init__(config)
        self.vision = VisionTower(config)
        self.text = TextTower(config)
        self.visual_projection = nn.Linear(self.vision.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the folder

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, E), unit norm."""
        if self.config.stem == "conv":  # mmray runs its conv stem in NHWC, as trained
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        pooled = self.vision.model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """(B, T) token ids (the MiniLM tokenizer's, right-padded) → (B, E), unit norm."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.text.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.config.text_kind == "minilm":  # the mean over real tokens
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = out.pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, **kwargs,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Either or both inputs → ``image_embeds``, ``text_embeds`` and, with both,
        ``logits_per_image`` (B_img, B_txt), scaled as mmray scales them."""
        out = {}
        if pixel_values is not None:
            out["image_embeds"] = self.get_image_features(pixel_values)
        if input_ids is not None:
            out["text_embeds"] = self.get_text_features(input_ids, attention_mask)
        if len(out) == 2:
            scale = self.logit_scale.exp().clamp(max=100.0)
            out["logits_per_image"] = scale * out["image_embeds"] @ out["text_embeds"].T
        return out
