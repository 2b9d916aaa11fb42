"""Image transforms with Pillow and numpy (no torchvision CPU build exists here).

    x = train_transform(img, TransformConfig(image_size=64), rng)   # (3, 64, 64) float32
    x = eval_transform(img, 64)                                      # resize + centre crop
Normalisation uses CLIP's mean and std, the statistics open_clip and transformers' CLIP use.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)


@dataclasses.dataclass(kw_only=True)
class TransformConfig:
    image_size: int = 64
    scale: list[float] = dataclasses.field(default_factory=lambda: [0.6, 1.0])  # crop area
    ratio: list[float] = dataclasses.field(default_factory=lambda: [3 / 4, 4 / 3])  # crop w/h
    # Off by default: a flip turns "a circle to the left of a square" into a wrong caption.
    hflip: bool = False

    def validate(self) -> None:
        if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError("need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]")


def normalize(img: Image.Image) -> np.ndarray:
    """RGB image → (3, H, W) float32, CLIP-normalised."""
    x = np.asarray(img.convert("RGB"), np.float32) / 255.0  # (H, W, 3)
    return ((x - MEAN) / STD).transpose(2, 0, 1).copy()


def random_resized_crop(
    img: Image.Image, size: int, scale: list[float], ratio: list[float], rng: np.random.Generator
) -> Image.Image:
    """torchvision's RandomResizedCrop: a random area and aspect, resized to size×size."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.resize(
                (size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch)
            )
    return center_crop(img, size)  # fallback, as torchvision does


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then crop the centre square, with the
    same rounding as transformers' CLIPImageProcessor, so exported models see equal pixels."""
    w, h = img.size
    if w <= h:
        w, h = size, int(size * h / w)
    else:
        w, h = int(size * w / h), size
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = int((w - size) / 2), int((h - size) / 2)
    return img.crop((left, top, left + size, top + size))


def train_transform(img: Image.Image, cfg: TransformConfig, rng: np.random.Generator) -> np.ndarray:
    img = random_resized_crop(img.convert("RGB"), cfg.image_size, cfg.scale, cfg.ratio, rng)
    if cfg.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return normalize(img)


def eval_transform(img: Image.Image, image_size: int) -> np.ndarray:
    return normalize(center_crop(img.convert("RGB"), image_size))
