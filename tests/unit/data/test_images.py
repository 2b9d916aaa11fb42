from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmcore.data.images import (
    ImageConfig,
    Rejected,
    colour_distance,
    hamming,
    phash,
    process_image,
    thumbnail,
)
from mmcore.data.sample import _png_header_only, render


def photo(w: int, h: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """An asymmetric scene: a symmetric one has many DCT terms at ~0 and a fragile phash."""
    rng = np.random.default_rng(seed)
    objects = [("large", "red", "circle", 0.35, 0.4), ("small", "blue", "square", 0.7, 0.75)]
    img = render(rng, w, h, objects, "white")
    buf = io.BytesIO()
    img.save(buf, fmt, quality=92)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("center_crop", (400, 200), (64, 64)),
        ("center_crop", (150, 300), (64, 64)),
        ("keep_ratio", (400, 200), (128, 64)),
        ("keep_ratio", (150, 300), (64, 128)),
        ("border", (400, 200), (64, 64)),
        ("no", (400, 200), (400, 200)),
    ],
)
@pytest.mark.parametrize("draft", [True, False])
def test_resize_modes(mode: str, size: tuple[int, int], expected: tuple, draft: bool) -> None:
    out = process_image(photo(*size), ImageConfig(image_size=64, resize_mode=mode, draft=draft))
    img = Image.open(io.BytesIO(out.data))
    assert img.size == expected == (out.width, out.height)
    assert (out.original_width, out.original_height) == size


def test_border_pads_with_black_and_keeps_content_centred() -> None:
    out = process_image(photo(400, 200), ImageConfig(image_size=64, resize_mode="border"))
    px = np.asarray(Image.open(io.BytesIO(out.data)), np.int32)
    assert px[:14].max() < 30 and px[-14:].max() < 30  # 16-row bands top and bottom
    assert px[24:40].mean() > 100  # the white image is in the middle


def test_draft_decoding_matches_full_decoding() -> None:
    data = photo(1200, 900)
    fast = process_image(data, ImageConfig(image_size=128, resize_mode="center_crop"))
    slow = process_image(data, ImageConfig(image_size=128, resize_mode="center_crop", draft=False))
    a = np.asarray(Image.open(io.BytesIO(fast.data)), np.float32)
    b = np.asarray(Image.open(io.BytesIO(slow.data)), np.float32)
    assert a.shape == b.shape == (128, 128, 3)
    assert np.abs(a - b).mean() < 4.0  # same picture, within JPEG noise
    assert hamming(fast.phash, slow.phash) <= 4


def test_resize_only_if_bigger_never_upscales() -> None:
    cfg = ImageConfig(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True)
    out = process_image(photo(120, 100), cfg)
    assert (out.width, out.height) == (120, 100)


def test_webp_output() -> None:
    out = process_image(photo(200, 200), ImageConfig(image_size=32, encode_format="webp"))
    assert Image.open(io.BytesIO(out.data)).format == "WEBP"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00\x01garbage" * 50, "failed_to_decode"),
        (b"<html><body>not an image</body></html>", "failed_to_decode"),
        (photo(300, 300)[:2000], "failed_to_decode"),  # truncated
        (photo(20, 40), "too_small"),
        (photo(400, 100), "bad_aspect_ratio"),
        (_png_header_only(30_000, 30_000), "image_too_large"),
        (_png_header_only(200_000, 200_000), "image_too_large"),  # past Pillow's own guard
    ],
)
def test_rejections(data: bytes, status: str) -> None:
    with pytest.raises(Rejected) as e:
        process_image(data, ImageConfig(min_side=32, max_aspect_ratio=3.0))
    assert e.value.status == status and e.value.message
    assert " at 0x" not in e.value.message  # the same record in every run


def test_phash_is_robust_to_rescale_and_reencode_but_not_to_content() -> None:
    a = Image.open(io.BytesIO(photo(300, 240, "PNG")))
    small = a.resize((240, 192), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=60)
    b = Image.open(io.BytesIO(buf.getvalue()))
    other = Image.open(io.BytesIO(photo(300, 240, "PNG", seed=0)))
    other = render(
        np.random.default_rng(5), 300, 240, [("small", "blue", "cross", 0.7, 0.3)], "black"
    )
    assert hamming(phash(a), phash(b)) <= 4
    assert colour_distance(thumbnail(a), thumbnail(b)) <= 12
    assert hamming(phash(a), phash(other)) > 10


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "border"])
def test_geometry_holds_for_many_sizes(mode: str) -> None:
    """Rounding must never push a crop box outside the image (odd sizes, any draft scale)."""
    cfg = ImageConfig(image_size=64, resize_mode=mode, min_side=1)
    for w, h in [(97, 131), (131, 97), (255, 129), (129, 255), (301, 199), (1001, 667), (67, 65)]:
        out = process_image(photo(w, h), cfg)
        short, long_ = sorted((out.width, out.height))
        if mode == "keep_ratio":
            assert short == 64 and abs(long_ - 64 * max(w, h) / min(w, h)) <= 1
        else:
            assert (out.width, out.height) == (64, 64)
