"""What the HTTP API needs besides the model (no Ray): safe image decoding with its limits,
and the records a search shows (keys, captions, thumbnails) read from curated shards. The
model side is ``mmcore.inference.Engine``.

    image = decode_image(base64_text_or_bytes, Limits())   # BadInput (a 4xx) when refused
    records = read_index("shards/")                        # engine.index(records.images)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from pathlib import Path

from PIL import Image

from mmcore.data.images import ImageConfig, Rejected, open_checked
from mmcore.data.shards import read_shards


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
    max_beams: int = 5  # per /v1/caption request
    max_new_tokens: int = 30

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
