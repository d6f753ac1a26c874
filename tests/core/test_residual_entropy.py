"""The residual scorer: entropy of the residual from the local mean (gradients plain, texture busy)."""

import numpy as np
import pytest
import torch

import aptvit
from aptvit.core.io import InputError
from aptvit.core.pixels import grayscale_255
from aptvit.core.quadtree import default_thresholds, patch_layout
from aptvit.core.residual_entropy import box_mean, residual_entropy_scores
from aptvit.core.scoring import SCORERS, entropy_scores
from aptvit.core.static import static_layout

SIZES = (16, 32, 64)


def _ramp(side=128, angle=0.6, lo=20.0, hi=230.0):
    """(1, side, side) float32 linear ramp from lo to hi along ``angle``: a smooth gradient of many grey levels."""
    yy, xx = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / (t.max() - t.min())
    return (lo + (hi - lo) * t).float()[None]


def _texture(side=128, amplitude=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (128.0 + amplitude * (torch.rand(1, side, side, generator=g) * 2 - 1)).float()


@pytest.mark.parametrize("angle", [0.0, 0.6, np.pi / 2, 2.3])
def test_a_smooth_gradient_scores_as_plain_at_every_size(angle):
    ramp = _ramp(angle=angle)
    scores = residual_entropy_scores(ramp, SIZES, 16)
    thresholds = default_thresholds(SIZES, "residual")
    for s in SIZES[1:]:
        assert scores[s].max() < 0.5, (s, scores[s].max())  # one bin (0 bits) but where rounding straddles a step
        assert (scores[s] < thresholds[s]).all()
    if angle in (0.6, 2.3):  # what the scorer is for: plain entropy calls an oblique ramp (many levels) busy
        plain = entropy_scores(ramp, SIZES, 16)
        assert (plain[32] >= default_thresholds(SIZES, "entropy")[32]).all()
    layout = patch_layout(ramp.round().to(torch.uint8).expand(3, -1, -1)[None], SIZES, scorer="residual")
    assert layout.total_tokens == 4  # every 64-px patch merges, the image border included


def test_texture_scores_as_busy_and_more_than_a_weaker_texture():
    thresholds = default_thresholds(SIZES, "residual")
    strong = residual_entropy_scores(_texture(amplitude=40.0), SIZES, 16)
    weak = residual_entropy_scores(_texture(amplitude=4.0), SIZES, 16)
    for s in SIZES[1:]:
        assert (strong[s] > thresholds[s]).all(), s
        assert (strong[s] > weak[s]).all(), s
    # a texture on a gradient is still a texture: the ramp does not hide it
    both = residual_entropy_scores(_ramp() + _texture(amplitude=40.0) - 128.0, SIZES, 16)
    for s in SIZES[1:]:
        assert (both[s] > thresholds[s]).all(), s


@pytest.mark.parametrize("radius", [1, 3])
@pytest.mark.parametrize("h, w", [(20, 28), (33, 17)])
def test_box_mean_matches_an_odd_reflection_loop(radius, h, w):
    g = torch.Generator().manual_seed(h + radius)
    x = torch.rand(2, h, w, generator=g) * 255
    padded = np.pad(
        x.double().numpy(), ((0, 0), (radius, radius), (radius, radius)), mode="reflect", reflect_type="odd"
    )
    want = np.zeros((2, h, w))
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            want += padded[:, dy : dy + h, dx : dx + w]
    want /= (2 * radius + 1) ** 2
    got = box_mean(x, radius)
    assert np.abs(got.double().numpy() - want).max() <= 1e-5 * 255


def test_scores_are_the_entropy_of_the_shifted_residual():
    """The histogram half is entropy_scores' (checked against numpy there): scores equal it on the residual."""
    g = torch.Generator().manual_seed(3)
    gray = grayscale_255(torch.randint(0, 256, (2, 3, 64, 96), generator=g, dtype=torch.uint8))
    got = residual_entropy_scores(gray, [16, 32], 16, bins=64, radius=2)
    shifted = (gray - box_mean(gray, 2) + 32.5 * 255 / 64).clamp(0, 255)
    want = entropy_scores(shifted, [16, 32], 16, bins=64)
    for s in (16, 32):
        assert torch.equal(got[s], want[s])


def test_registered_with_its_parameters_checked():
    spec = SCORERS["residual"]
    assert spec.params == {"bins": 128, "radius": 3} and spec.finite
    for bad in ({"radius": 0}, {"radius": 2.5}, {"bins": 1}, {"bins": True}):
        with pytest.raises(InputError, match="radius|bins"):
            aptvit.APTConfig(scorer="residual", scorer_args=bad)
    cfg = aptvit.APTConfig(scorer="residual", scorer_args={"radius": 2}).for_patch_size(16)
    assert cfg.scorer_args == {"bins": 128, "radius": 2} and cfg.thresholds == {32: spec.thresholds[2]}


def test_ignores_the_callers_autocast():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64, generator=g) ** 3
    gray = grayscale_255(images)
    ref = residual_entropy_scores(gray, [16, 32], 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = residual_entropy_scores(gray, [16, 32], 16)
    for s in ref:
        assert torch.equal(got[s], ref[s]), s


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_budget_and_static_layouts(budget):
    g = torch.Generator().manual_seed(1)
    img = (torch.rand(3, 3, 128, 128, generator=g) * 255).to(torch.uint8)
    img[0] = _ramp().round().to(torch.uint8)  # a gradient image merges as far as the budget lets it
    want = patch_layout(img, SIZES, budget=budget, scorer="residual")
    got = static_layout(img, SIZES, budget=budget, scorer="residual")
    assert max(want.token_counts) <= got.max_seqlen
    k = got.max_seqlen
    real = got.size.view(3, k) > 0
    assert real.sum(1).tolist() == list(want.token_counts)


@pytest.mark.slow
def test_compiles_whole_with_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 64, 64, generator=g)
    eager = static_layout(img, (16, 32), budget=0.5, scorer="residual")
    fn = torch.compile(
        lambda x: static_layout(x, (16, 32), budget=0.5, scorer="residual").size, fullgraph=True, backend="aot_eager"
    )
    assert torch.equal(fn(img), eager.size)
    torch._dynamo.reset()
