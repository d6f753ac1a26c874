"""``simple_pyramid`` values, not only shapes: bilinear up, identity at 1, max-pool below 1 (as documented)."""

import pytest
import torch
import torch.nn.functional as F

from aptvit.nn.dense import simple_pyramid


def known_grid():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 12, generator=g)


def test_scale_one_is_the_grid_itself():
    grid = known_grid()
    (same,) = simple_pyramid(grid, scales=(1,))
    assert torch.equal(same, grid)


@pytest.mark.parametrize("scale", [0.5, 0.25])
def test_scales_below_one_max_pool(scale):
    grid = known_grid()
    (out,) = simple_pyramid(grid, scales=(scale,))
    k = int(1 / scale)
    b, d, h, w = grid.shape
    want = grid.reshape(b, d, h // k, k, w // k, k).amax((3, 5))  # the largest value of every k x k block
    assert torch.equal(out, want)
    assert torch.equal(out, F.max_pool2d(grid, k))


@pytest.mark.parametrize("scale", [2, 4])
def test_scales_above_one_upsample_bilinearly(scale):
    grid = known_grid()
    (out,) = simple_pyramid(grid, scales=(scale,))
    b, d, h, w = grid.shape
    want = F.interpolate(grid, size=(h * scale, w * scale), mode="bilinear", align_corners=False)
    assert out.shape == want.shape
    assert (out - want).abs().max() <= 1e-6 * want.abs().max()


def test_bilinear_values_by_hand():
    # align_corners=False at 2x: output pixel i samples the input at (i + 0.5) / 2 - 0.5, clamped at the border
    grid = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])
    (out,) = simple_pyramid(grid, scales=(2,))
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0].item() == 0.0  # clamped to the corner
    assert out[0, 0, 0, 1].item() == pytest.approx(0.75 * 0.0 + 0.25 * 4.0)
    assert out[0, 0, 1, 1].item() == pytest.approx(0.75 * (0.75 * 0.0 + 0.25 * 4.0) + 0.25 * (0.75 * 8.0 + 0.25 * 12.0))
    assert out[0, 0, 3, 3].item() == 12.0
    levels = simple_pyramid(grid, scales=(2, 1, 0.5))
    assert [tuple(l.shape[-2:]) for l in levels] == [(4, 4), (2, 2), (1, 1)]
    assert levels[2].item() == 12.0  # max, not mean (6.0)
