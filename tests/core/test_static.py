"""core.static: the budget layout in k slots per image, built on the device, and its padded forms."""

import pytest
import torch

from aptvit import patch_layout
from aptvit.core.static import pad_static, real_tokens, static_layout, static_tokens

SIZES = (16, 32, 64)
FIELDS = ("y", "x", "size", "cells", "cu_seqlens")


def _images(b=5, side=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(b, 3, side, side, generator=g) * 255).to(torch.uint8)
    img[:, :, :64, :64] = 128
    img[::2, :, 64:] = 40
    img[1::3, :, :, 64:] = 200
    return img


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.8, 1.0, 30, 1000])
@pytest.mark.parametrize("floats", [False, True])
def test_the_real_tokens_are_budget_modes_and_every_image_has_k_slots(budget, floats):
    img = _images()
    img = img.float() / 255 if floats else img
    want = patch_layout(img, SIZES, budget=budget)
    got = static_layout(img, SIZES, budget=budget)
    k = static_tokens(budget, (128, 128), SIZES)
    assert got.token_counts == (k,) * 5 and got.max_seqlen == k and max(want.token_counts) <= k
    real = real_tokens(got)
    assert real.offsets == want.offsets
    for name in FIELDS:
        assert torch.equal(getattr(real, name), getattr(want, name)), name
    for name in FIELDS:  # the host padding of a layout made elsewhere is the same thing
        assert torch.equal(getattr(pad_static(want, k), name), getattr(got, name)), name


def test_padding_slots_are_last_cover_no_cell_and_sit_at_the_origin():
    got = static_layout(_images(), SIZES, budget=0.5)
    k = got.max_seqlen
    pad = (got.size == 0).view(5, k)
    assert pad.any()
    first_pad = pad.long().argmax(1)
    assert all(bool(pad[i, int(first_pad[i]) :].all()) for i in range(5) if pad[i].any())  # a suffix per image
    assert not pad.view(-1)[got.cells].any()
    assert (got.y[pad.view(-1)] == 0).all() and (got.x[pad.view(-1)] == 0).all()
    cell_image = got.cells.view(5, -1) // k  # every cell points into its own image's slots
    assert torch.equal(cell_image, torch.arange(5).view(5, 1).expand_as(cell_image))


def test_errors():
    with pytest.raises(ValueError, match="needs a token budget"):
        static_layout(_images(), SIZES, budget=None)
    with pytest.raises(TypeError, match="one \\(B, C, H, W\\) tensor"):
        static_layout([torch.zeros(3, 64, 64)], SIZES, budget=0.5)
    with pytest.raises(ValueError, match="below the 4 tokens"):
        static_layout(_images(), SIZES, budget=3)
    with pytest.raises(ValueError, match="more than the static k = 4"):
        pad_static(patch_layout(_images(), SIZES, budget=0.5), 4)
