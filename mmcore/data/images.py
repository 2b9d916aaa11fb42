"""Image decode, checks, resize, encode and perceptual hash (Pillow + numpy, no I/O).

The resize modes have img2dataset's meanings, for a target ``image_size`` S:
  - ``center_crop``: scale the shorter side to S, crop the centre to S×S.
  - ``keep_ratio``:  scale the shorter side to S, keep the aspect ratio.
  - ``border``:      scale the longer side to S, pad with black to S×S.
  - ``no``:          keep the decoded size.
JPEGs are decoded in draft mode (the DCT scaled by 1/2, 1/4 or 1/8 to the smallest size that
still covers the target), which skips most of the decode work for large photos.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
import warnings
from typing import Literal

import numpy as np
from PIL import Image

ResizeMode = Literal["center_crop", "keep_ratio", "border", "no"]
HASH_SIDE = 128  # smallest short side a JPEG is draft-decoded to
# Downscaling filters; "area" (box) averages pixels like OpenCV's INTER_AREA, which
# img2dataset uses. Upscaling is always bicubic.
FILTERS = {
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class Rejected(Exception):
    """A sample that is dropped for a recorded reason (``status``) with a message."""

    def __init__(self, status: str, message: str) -> None:
        # Without object addresses ("<_io.BytesIO object at 0x...>"): a row's record is the
        # same in every run, so a resumed curation equals an uninterrupted one, parquet too.
        message = re.sub(r" at 0x[0-9a-f]+", "", message)
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclasses.dataclass(kw_only=True)
class ImageConfig:
    """Image checks (on the original size) and the output encoding."""

    image_size: int = 256  # target S of the resize mode
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False  # never upscale
    encode_format: Literal["jpg", "webp"] = "jpg"
    encode_quality: int = 95
    min_side: int = 32  # shorter side below this: too_small
    max_side: int = 20_000  # longer side above this: too_large
    max_aspect_ratio: float = 3.0  # long/short above this: bad_aspect_ratio
    max_pixels: int = 50_000_000  # decompression-bomb guard, checked from the header
    draft: bool = True  # JPEG draft-mode decoding
    downscale_filter: Literal["area", "bilinear", "bicubic", "lanczos"] = "area"

    def validate(self) -> None:
        if self.image_size < 1 or not 1 <= self.encode_quality <= 100:
            raise ValueError("need image_size >= 1 and 1 <= encode_quality <= 100")
        if self.max_aspect_ratio < 1 or not 0 <= self.min_side <= self.max_side:
            raise ValueError("need max_aspect_ratio >= 1 and 0 <= min_side <= max_side")
        if self.max_pixels < 1:  # below 1 every image would be image_too_large
            raise ValueError("need max_pixels >= 1")


@dataclasses.dataclass
class ProcessedImage:
    data: bytes  # encoded output image
    width: int
    height: int
    original_width: int
    original_height: int
    phash: int  # 64-bit perceptual hash of the decoded image
    thumb: bytes  # 4×4 RGB thumbnail (48 bytes): the colours that phash cannot see


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def process_image(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """Decode, check, hash, resize and encode one image; raises ``Rejected``."""
    img = open_checked(data, cfg)
    ow, oh = img.size
    # Decode at no less than HASH_SIDE on the short side: the phash of a much smaller draft
    # drifts from that of the full image, and near duplicates would be missed.
    scale = max(_scale(ow, oh, cfg), HASH_SIDE / min(ow, oh))
    if cfg.draft and img.format == "JPEG" and scale < 1:
        img.draft("RGB", (math.ceil(ow * scale), math.ceil(oh * scale)))
    try:
        img = img.convert("RGB")  # forces the decode; truncated data fails here
    except (OSError, ValueError, SyntaxError) as e:
        raise Rejected("failed_to_decode", str(e)) from e
    out = resize(img, cfg, original_size=(ow, oh))
    # Both hashes come from one 32×32 area reduction of the whole decoded picture, so crops
    # and borders of the resize mode do not change them.
    small = img.resize((32, 32), Image.Resampling.BOX)
    return ProcessedImage(
        data=encode(out, cfg.encode_format, cfg.encode_quality),
        width=out.width,
        height=out.height,
        original_width=ow,
        original_height=oh,
        phash=phash(small),
        thumb=thumbnail(small),
    )


def open_checked(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Open lazily (header only) and apply the size checks before decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("image_too_large", str(e)) from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for junk bytes
        raise Rejected("failed_to_decode", f"{type(e).__name__}: {e}") from e
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise Rejected("image_too_large", f"{w}x{h} is over {cfg.max_pixels} pixels")
    if min(w, h) < cfg.min_side:
        raise Rejected("too_small", f"{w}x{h}, min side {cfg.min_side}")
    if max(w, h) > cfg.max_side:
        raise Rejected("too_large", f"{w}x{h}, max side {cfg.max_side}")
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise Rejected("bad_aspect_ratio", f"{w}x{h}, max ratio {cfg.max_aspect_ratio}")
    return img


def _scale(w: int, h: int, cfg: ImageConfig) -> float:
    """The factor the resize mode applies to the original size."""
    match cfg.resize_mode:
        case "no":
            return 1.0
        case "border":
            scale = cfg.image_size / max(w, h)
        case "center_crop" | "keep_ratio":
            scale = cfg.image_size / min(w, h)
    return min(scale, 1.0) if cfg.resize_only_if_bigger else scale


def resize(img: Image.Image, cfg: ImageConfig, original_size: tuple[int, int]) -> Image.Image:
    """Apply ``cfg.resize_mode``; ``img`` may be a draft-decoded version of the original."""
    ow, oh = original_size
    scale = _scale(ow, oh, cfg)
    if cfg.resize_mode == "no":
        return img
    # Output geometry is computed on the original size, so draft decoding changes nothing
    # but the speed.
    w, h = max(1, round(ow * scale)), max(1, round(oh * scale))
    kx, ky = img.width / ow, img.height / oh  # draft factor, 1.0 without draft
    size = cfg.image_size
    resample = FILTERS[cfg.downscale_filter] if scale < 1 else Image.Resampling.BICUBIC
    if cfg.resize_mode == "center_crop" and (w > size or h > size):
        # Crop the centre in source coordinates and resize once (Pillow's box argument).
        cw, ch = min(ow, size / scale), min(oh, size / scale)
        left, top = (ow - cw) / 2, (oh - ch) / 2
        box = (left * kx, top * ky, (left + cw) * kx, (top + ch) * ky)
        return img.resize((min(w, size), min(h, size)), resample, box=box, reducing_gap=3.0)
    out = img if (w, h) == img.size else img.resize((w, h), resample, reducing_gap=3.0)
    if cfg.resize_mode == "border" and (w, h) != (size, size):
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(out, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        return canvas
    return out


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    match fmt:
        case "jpg":
            img.save(buf, "JPEG", quality=quality)
        case "webp":
            img.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


_DCT = np.cos(np.pi * np.outer(np.arange(32), 2 * np.arange(32) + 1) / 64)  # (32, 32) DCT-II


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash: low-frequency 8×8 DCT of a 32×32 grey image vs its median."""
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.Resampling.BOX)
    grey = np.asarray(img.convert("L"), np.float64)  # (32, 32)
    low = (_DCT @ grey @ _DCT.T)[:8, :8]  # (8, 8)
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail(img: Image.Image) -> bytes:
    """4×4 RGB thumbnail as 48 bytes: a colour signature for near-duplicate checks."""
    return img.resize((4, 4), Image.Resampling.BOX).tobytes()


def colour_distance(a: bytes, b: bytes) -> int:
    """Largest per-cell, per-channel difference of two thumbnails (0-255)."""
    return int(
        np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8)).max()
    )


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
