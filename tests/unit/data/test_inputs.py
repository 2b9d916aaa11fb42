"""The data pipeline's CPU step: shard rows → model inputs, without torch or transformers."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pyarrow as pa
from PIL import Image

from mmcore.data.inputs import held_out, in_split, preprocess, token_ids
from mmcore.data.transforms import TransformConfig


def test_ray_data_tasks_import_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, mmcore.data.inputs as m; m.token_ids(['a red circle'], 8); "
        "print(sorted({'torch', 'transformers', 'deepspeed', 'ray'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_token_ids_equal_the_transformers_tokenizer() -> None:
    from mmcore.models.towers import tokenizer

    texts = ["a red circle", "", "A LARGE Red Circle, to the left of a small blue square!",
             "naïve café — 東京 emoji 🙂", "word " * 40, "  spaced\tout\ntext  "]  # fmt: skip
    for length in (8, 32):
        ids, mask = token_ids(texts, length)
        ref = tokenizer()(texts, padding="max_length", truncation=True, max_length=length,
                          return_tensors="np", return_token_type_ids=False)  # fmt: skip
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == (len(texts), length)
        assert np.array_equal(ids, ref["input_ids"]) and np.array_equal(mask, ref["attention_mask"])


def test_preprocess_decodes_transforms_and_tokenizes() -> None:
    def jpeg(colour: str, size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, colour).save(buf, "JPEG")
        return buf.getvalue()

    batch = {
        "__key__": np.array(["000000000", "000000001"]),
        "jpg": np.array([jpeg("red", (90, 60)), jpeg("blue", (64, 64))], dtype=object),
        "txt": np.array([b"a red square", "a blue square"], dtype=object),  # bytes or str
    }
    out = preprocess(batch, image_size=32, context_length=16)
    assert out["pixels"].shape == (2, 3, 32, 32) and out["pixels"].dtype == np.float32
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 16)
    assert out["pixels"][0, 0].mean() > out["pixels"][1, 0].mean()  # red channel
    aug = TransformConfig(image_size=32)
    a = preprocess(batch, 32, 16, augment=aug, seed=3)["pixels"]
    assert np.array_equal(a, preprocess(batch, 32, 16, augment=aug, seed=3)["pixels"])
    ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (128, 1))  # a crop shows where it is
    buf = io.BytesIO()
    Image.fromarray(np.stack([ramp] * 3, -1)).save(buf, "PNG")
    one = {"__key__": np.array(["000000002"]), "jpg": np.array([buf.getvalue()], dtype=object),
           "txt": np.array([b"a ramp"], dtype=object)}  # fmt: skip
    crops = [preprocess(one, 32, 16, augment=aug)["pixels"] for _ in range(4)]
    assert not all(np.array_equal(crops[0], c) for c in crops[1:])  # fresh crops unseeded


def test_validation_split_is_stable_and_near_the_fraction() -> None:
    keys = [f"{i:09d}" for i in range(20_000)]
    held = [k for k in keys if held_out(k, 0.05)]
    assert 0.045 < len(held) / len(keys) < 0.055
    assert held == [k for k in keys if held_out(k, 0.05)]  # a pure function of the key
    assert not any(held_out(k, 0.0) for k in keys)
    table = pa.table({"__key__": keys[:500], "txt": [b"x"] * 500})
    val, train = in_split(table, 0.05, True), in_split(table, 0.05, False)
    assert val.column("__key__").to_pylist() == [k for k in keys[:500] if held_out(k, 0.05)]
    assert val.num_rows + train.num_rows == 500 and val.schema == train.schema == table.schema
