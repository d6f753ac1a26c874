"""The default training augment runs on every image: RandAugment's increasing posterize at its top magnitude."""

import random

import numpy as np
from PIL import Image

from aptvit.data import build_transform


def posterize_ops(transform):
    return [op for t in transform.transforms for op in getattr(t, "ops", []) if op.name == "PosterizeIncreasing"]


def test_posterize_at_the_top_magnitude_keeps_zero_bits_instead_of_raising():
    """m9 with mstd0.5 reaches magnitude 10 (0 bits kept) on a few images per thousand: newer Pillow raised there,
    stopping a fine-tune midway; 0 bits kept is a black image."""
    transform = build_transform(32, True, (0.5,) * 3, (0.5,) * 3)  # the default augment, rand-m9-mstd0.5-inc1
    (op,) = posterize_ops(transform)
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = np.asarray(op(img))
    assert out.shape == (32, 32, 3) and not out.any()
    op.magnitude = 5  # 2 bits kept: Pillow's own posterize, unchanged
    assert np.array_equal(np.asarray(op(img)), np.asarray(img) & 0b11000000)


def test_a_whole_transform_at_the_top_magnitude_runs():
    transform = build_transform(32, True, (0.5,) * 3, (0.5,) * 3, augment="rand-m10-n3-mstd0-inc1")
    img = Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8))
    random.seed(0)  # timm draws the ops from both generators
    np.random.seed(0)
    for _ in range(100):  # 3 of the 15 ops each time, each at p 0.5: posterize comes up (p 0.9^100 that it does not)
        assert np.asarray(transform(img)).shape == (3, 32, 32)
