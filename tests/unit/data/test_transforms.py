from __future__ import annotations

import numpy as np
from PIL import Image

from mmcore.data.transforms import MEAN, STD, TransformConfig, eval_transform, train_transform


def test_shapes_normalisation_and_determinism() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 140, 3), np.uint8))
    cfg = TransformConfig(image_size=32)
    a = train_transform(img, cfg, np.random.default_rng(1))
    b = train_transform(img, cfg, np.random.default_rng(1))
    c = train_transform(img, cfg, np.random.default_rng(2))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # seeded, and random
    grey = eval_transform(Image.new("RGB", (50, 80), (128, 128, 128)), 16)
    assert grey.shape == (3, 16, 16)
    np.testing.assert_allclose(grey[:, 0, 0], (128 / 255 - MEAN) / STD, rtol=1e-5)


def test_eval_crop_keeps_the_centre() -> None:
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # white centre square
    x = eval_transform(img, 20)
    assert x.min() > 1.5  # all white: the black sides were cropped away
