"""A small synthetic "web crawl" of coloured shapes, junk included: ``mmray sample-data OUT``.

Writes, reproducibly for a seed:
  OUT/images/*.png|jpg|webp    rendered shapes on noisy backgrounds, plus junk files
  OUT/metadata.parquet         url (absolute path), caption, file (name under images/), kind
                               ("noisy": a clean image whose caption describes another scene,
                               the planted mismatches an alignment filter should drop)
  OUT/qa.parquet               url, question, answer, type: questions about each image that
                               curation keeps (``qa_pairs``); ``mmray curate input.qa=...`` joins
                               them into each sample's ``.json``
  OUT/heldout/00000.tar        a curated-format shard (KEY.jpg, KEY.txt, KEY.json with "qa")
                               of scenes whose first object is a held-out composition, for
                               ``mmray eval caption|vqa``
  OUT/sample_info.json         counts per kind, the status each kind should end with, and
                               the held-out (colour, shape) compositions
  OUT/zeroshot/{colour,shape}/<class>/*.png   images of held-out compositions only, for
                               zero-shot classification (``mmray eval zeroshot``)
A held-out composition (e.g. "green triangle") never appears in any crawl image or caption,
so a model can only classify it by composing what it learnt about colours and shapes.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from mmcore.data.shards import add_sample

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
BACKGROUNDS = {"white": 240, "light grey": 200, "grey": 140, "dark grey": 70, "black": 20}
RELATIONS = ("to the left of", "to the right of", "above", "below")

# Junk of a real crawl → the status curation must give it. "html_caption" rows are good
# images whose caption needs cleaning: they must be kept.
JUNK = {
    "corrupt": "failed_to_decode",
    "truncated": "failed_to_decode",
    "non_image": "failed_to_decode",
    "missing": "failed_to_download",
    "tiny": "too_small",
    "extreme_aspect": "bad_aspect_ratio",
    "bomb": "image_too_large",
    "duplicate": "duplicate",
    "near_duplicate": "near_duplicate",
    "empty_caption": "caption_too_short",
    "whitespace_caption": "caption_too_short",
    "overlong_caption": "caption_too_long",
    "html_caption": "success",
}


def heldout(colour: str, shape: str) -> bool:
    """Held-out compositions: every colour and every shape has at least one."""
    return (list(COLOURS).index(colour) + SHAPES.index(shape)) % 5 == 0


def compositions(held: bool) -> list[tuple[str, str]]:
    """The held-out (colour, shape) compositions, or the seen ones, colour by colour."""
    return [(c, s) for c in COLOURS for s in SHAPES if heldout(c, s) == held]


def check_args(n: int, seed: int, min_px: int, max_px: int, noisy: float) -> None:
    """ValueError, before anything is written, for arguments no crawl can be drawn with."""
    n_junk = max(2, round(n * 0.02))
    if n - n_junk * len(JUNK) < n_junk:
        raise ValueError(f"n={n} is too small: need at least {n_junk * (len(JUNK) + 1)} rows")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    if not 1 <= min_px <= max_px:
        raise ValueError(f"need 1 <= min_px <= max_px (got {min_px} and {max_px})")
    if not 0 <= noisy < 1:
        raise ValueError(f"noisy={noisy} must be in [0, 1)")


def make_sample_data(
    out: str | Path, n: int = 600, seed: int = 0, min_px: int = 96, max_px: int = 256,
    zeroshot_per_class: int = 40, noisy: float = 0.0, heldout_n: int = 200,
) -> dict:  # fmt: skip
    """Write the crawl to ``out``; returns the contents of ``sample_info.json``. ``noisy``:
    the fraction of clean rows whose caption is replaced by one of a scene with another
    colour and shape (kind ``noisy``); 0 leaves the crawl exactly as without it."""
    check_args(n, seed, min_px, max_px, noisy)
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_junk = max(2, round(n * 0.02))
    n_clean = n - n_junk * len(JUNK)
    rows = [_clean_row(rng, images, f"c{i:06d}", min_px, max_px) for i in range(n_clean)]
    n_noisy = round(n_clean * noisy)
    _mismatch(np.random.default_rng([seed, 1]), rows, n_noisy)  # its own stream: see above
    for kind in JUNK:
        for j in range(n_junk):
            # A duplicate goes after its original, the copy that curation keeps (smallest key).
            src = int(rng.integers(0, len(rows)))
            while rows[src]["kind"] not in ("clean", "noisy"):  # not a junk row
                src = (src + 1) % len(rows)
            dup = kind in ("duplicate", "near_duplicate")
            pos = int(rng.integers(src + 1 if dup else 0, len(rows) + 1))
            row = _junk_row(rng, images, kind, f"j_{kind}_{j:04d}", rows[src], min_px, max_px)
            rows.insert(pos, row)

    pq.write_table(
        pa.table({
            "url": [str((images / r["file"]).resolve()) for r in rows],
            "caption": [r["caption"] for r in rows],
            "file": [r["file"] for r in rows],
            "kind": [r["kind"] for r in rows],
        }),
        out / "metadata.parquet",
    )  # fmt: skip
    qa = _qa_table(rows, images)
    pq.write_table(qa, out / "qa.parquet")
    zs = _write_zeroshot(rng, out / "zeroshot", zeroshot_per_class)
    # Their own streams, as the noise's: the crawl is the same with or without them.
    _write_heldout(np.random.default_rng([seed, 2]), out / "heldout", heldout_n)
    info = {
        "n": n,
        "seed": seed,
        "counts": {"clean": n_clean - n_noisy}
        | {k: n_junk for k in JUNK}
        | ({"noisy": n_noisy} if n_noisy else {}),
        "expected_status": {"clean": "success"}
        | JUNK
        | ({"noisy": "low_alignment"} if n_noisy else {}),
        "heldout": [f"{c} {s}" for c, s in compositions(held=True)],
        "zeroshot": zs,
        "qa": {
            "pairs": len(qa),
            "by_type": dict(Counter(qa.column("type").to_pylist())),
            "heldout_images": heldout_n,
        },
    }
    (out / "sample_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _composition(rng: np.random.Generator) -> tuple[str, str]:
    while True:
        colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
        if not heldout(colour, shape):
            return colour, shape


def _background(rng: np.random.Generator, w: int, h: int, grey: int) -> np.ndarray:
    """A tinted gradient with noise, so no two images are alike. (H, W, 3) uint8."""
    tint = rng.integers(-25, 26, size=3)
    ramp = np.linspace(-20, 20, w)[None, :, None] * rng.choice([-1, 1])
    img = grey + tint + ramp + rng.normal(0, 10, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    match shape:
        case "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        case "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        case "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        case "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        case "cross":
            t = r / 3
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)


def render(
    rng: np.random.Generator, w: int, h: int, objects: list[tuple[str, str, str, float, float]],
    background: str,
) -> Image.Image:  # fmt: skip
    """Draw ``(size, colour, shape, x, y)`` objects (x, y in [0, 1]) on a background."""
    img = Image.fromarray(_background(rng, w, h, BACKGROUNDS[background]))
    draw = ImageDraw.Draw(img)
    for size, colour, shape, x, y in objects:
        r = min(w, h) * (rng.uniform(0.09, 0.13) if size == "small" else rng.uniform(0.18, 0.24))
        fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
        _draw(draw, shape, x * w, y * h, r, fill)
    return img


def _scene(rng: np.random.Generator) -> tuple[list, str, str]:
    """Random objects, their background, and the caption that describes them."""
    background = _pick(rng, list(BACKGROUNDS))
    size, (colour, shape) = _pick(rng, ("small", "large")), _composition(rng)
    if rng.random() < 0.5:
        x, y = rng.uniform(0.3, 0.7, size=2)
        text = f"a {size} {colour} {shape}"
        # Alt text is often partial: some captions name only the shape or only the colour.
        templates = (text, f"a photo of {text}", f"{text} on a {background} background",
                     f"a {colour} {shape}", f"a {shape}", f"a {size} {shape}",
                     f"something {colour}")  # fmt: skip
        return [(size, colour, shape, x, y)], _pick(rng, templates), background
    return *_pair(rng, (size, colour, shape)), background


def _pair(rng: np.random.Generator, first: tuple[str, str, str]) -> tuple[list, str]:
    """Two objects, ``first`` (size, colour, shape) and a random one, in a random relation."""
    size, colour, shape = first
    size2, (colour2, shape2) = _pick(rng, ("small", "large")), _composition(rng)
    relation = _pick(rng, RELATIONS)
    a, b, jitter = 0.27, 0.73, rng.uniform(0.4, 0.6)
    first, second = {
        "to the left of": ((a, jitter), (b, jitter)),
        "to the right of": ((b, jitter), (a, jitter)),
        "above": ((jitter, a), (jitter, b)),
        "below": ((jitter, b), (jitter, a)),
    }[relation]
    objects = [(size, colour, shape, *first), (size2, colour2, shape2, *second)]
    caption = f"a {size} {colour} {shape} {relation} a {size2} {colour2} {shape2}"
    return objects, caption


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt], quality=quality)
    return buf.getvalue()


def _clean_row(rng, images: Path, name: str, min_px: int, max_px: int) -> dict:
    w, h = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
    objects, caption, background = _scene(rng)
    fmt = _pick(rng, ("jpg", "jpg", "png", "webp"))
    (images / f"{name}.{fmt}").write_bytes(_encode(render(rng, w, h, objects, background), fmt))
    return {"file": f"{name}.{fmt}", "caption": caption, "kind": "clean", "objects": objects}


def qa_pairs(objects: list[tuple[str, str, str, float, float]]) -> list[dict[str, str]]:
    """Questions a scene answers unambiguously, with their answer and type:
    colour ("what colour is the circle?", when one object has that shape), shape ("what shape
    is the red object?", when one object has that colour), where ("where is the red circle?":
    left / right / top / bottom, in two-object scenes) and count ("how many shapes are
    there?": one / two)."""
    shapes = Counter(o[2] for o in objects)
    colours = Counter(o[1] for o in objects)
    qa = []
    for i, (_, colour, shape, x, y) in enumerate(objects):
        if shapes[shape] == 1:
            qa.append(("colour", f"what colour is the {shape}?", colour))
        if colours[colour] == 1:
            qa.append(("shape", f"what shape is the {colour} object?", shape))
        if len(objects) == 2 and (colour, shape) != objects[1 - i][1:3]:
            other_x, other_y = objects[1 - i][3:5]
            side = (("left" if x < other_x else "right") if abs(x - other_x) > abs(y - other_y)
                    else ("top" if y < other_y else "bottom"))  # fmt: skip
            qa.append(("where", f"where is the {colour} {shape}?", side))
    qa.append(("count", "how many shapes are there?", ("one", "two")[len(objects) - 1]))
    return [{"question": q, "answer": a, "type": t} for t, q, a in qa]


def _qa_table(rows: list[dict], images: Path) -> pa.Table:
    """The questions about every image that curation keeps (not about junk or copies)."""
    cols: dict[str, list[str]] = {"url": [], "question": [], "answer": [], "type": []}
    for row in rows:
        if row["kind"] in ("clean", "noisy", "html_caption"):
            for qa in qa_pairs(row["objects"]):
                cols["url"].append(str((images / row["file"]).resolve()))
                for k in ("question", "answer", "type"):
                    cols[k].append(qa[k])
    return pa.table(cols)


def write_shard(path: Path, scenes: Iterable[tuple[Image.Image, list, str]]) -> None:
    """A curated-format shard (KEY.jpg, KEY.txt, KEY.json with the caption and the scene's
    questions) of ``(image, objects, caption)`` scenes, keyed by their order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (image, objects, caption) in enumerate(scenes):
            meta = {"caption": caption, "qa": qa_pairs(objects)}
            members = {"jpg": _encode(image, "jpg", 95), "txt": caption.encode(),
                       "json": json.dumps(meta).encode()}  # fmt: skip
            add_sample(tar, f"{i:09d}", members)


def _write_heldout(rng: np.random.Generator, folder: Path, n: int) -> None:
    """``n`` scenes whose first object is a held-out composition (the second, in half of them,
    a seen one), captioned as the crawl's full captions are, as a shard with their questions."""
    combos = compositions(held=True)

    def scenes():
        for i in range(n):
            colour, shape = combos[i % len(combos)]
            size = _pick(rng, ("small", "large"))
            background = _pick(rng, list(BACKGROUNDS))
            if i % 2 == 0:
                x, y = rng.uniform(0.35, 0.65, size=2)
                objects = [(size, colour, shape, x, y)]
                caption = f"a {size} {colour} {shape}"
            else:
                objects, caption = _pair(rng, (size, colour, shape))
            yield render(rng, 128, 128, objects, background), objects, caption

    write_shard(folder / "00000.tar", scenes())


def _mismatch(rng: np.random.Generator, rows: list[dict], n: int) -> None:
    """Give ``n`` random clean rows the caption of another scene, one whose first object
    differs from the image's in both colour and shape (kind ``noisy``)."""
    for i in sorted(rng.choice(len(rows), size=n, replace=False)):
        _, colour, shape, *_ = rows[i]["objects"][0]
        while True:
            objects, caption, _ = _scene(rng)
            if objects[0][1] != colour and objects[0][2] != shape:
                break
        rows[i] |= {"caption": caption, "kind": "noisy"}


def _junk_row(rng, images: Path, kind: str, name: str, original: dict | None, lo: int, hi: int):
    """One junk row of ``kind``; duplicates copy ``original``."""
    objects, caption, bg = _scene(rng)
    file, data = f"{name}.jpg", None
    size = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
    match kind:
        case "corrupt":
            data = rng.bytes(int(rng.integers(200, 5000)))
        case "truncated":
            full = _encode(render(rng, *size, objects, bg), "jpg")
            data = full[: len(full) // 2]
        case "non_image":
            data = b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>"
        case "missing":
            file = f"{name}_missing.jpg"  # never written
        case "tiny":
            data = _encode(
                render(rng, int(rng.integers(4, 20)), int(rng.integers(4, 20)), objects, bg), "jpg"
            )
        case "extreme_aspect":
            data = _encode(render(rng, hi * 3, max(lo // 3, 20), objects, bg), "jpg")
        case "bomb":
            file, data = f"{name}.png", _png_header_only(30_000, 30_000)
        case "duplicate":
            data = (images / original["file"]).read_bytes()
            caption = f"reposted: {original['caption']}"
        case "near_duplicate":
            src = Image.open(images / original["file"]).convert("RGB")
            src = src.resize(
                (round(src.width * 0.8), round(src.height * 0.8)), Image.Resampling.LANCZOS
            )
            data = _encode(src, "jpg", quality=70)
            caption = f"{original['caption']}, resized"
        case _:
            data = _encode(render(rng, *size, objects, bg), "jpg")
            caption = {
                "empty_caption": "",
                "whitespace_caption": " \t \n  ",
                "overlong_caption": " ".join([caption] * 40),
                "html_caption": f"<p>{caption.replace(' a ', ' <b>a</b> ', 1)}&nbsp;&amp;</p>",
            }[kind]
    if data is not None:
        (images / file).write_bytes(data)
    return {"file": file, "caption": caption, "kind": kind, "objects": objects}


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims ``w``×``h`` pixels (a decompression bomb's signature)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _write_zeroshot(rng: np.random.Generator, root: Path, per_class: int) -> dict:
    """Single-object images of held-out compositions, by colour and by shape."""
    combos = compositions(held=True)
    counts: dict[str, dict[str, int]] = {"colour": {}, "shape": {}}
    for task, classes in (("colour", list(COLOURS)), ("shape", list(SHAPES))):
        for cls in classes:
            folder = root / task / cls
            folder.mkdir(parents=True, exist_ok=True)
            options = [(c, s) for c, s in combos if cls in (c, s)]
            for i in range(per_class):
                colour, shape = options[i % len(options)]
                x, y = rng.uniform(0.35, 0.65, size=2)
                size = _pick(rng, ("small", "large"))
                img = render(
                    rng, 128, 128, [(size, colour, shape, x, y)], _pick(rng, list(BACKGROUNDS))
                )
                img.save(folder / f"{i:03d}.png")
            counts[task][cls] = per_class
    return counts
