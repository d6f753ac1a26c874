"""Budget mode, per image: one threshold for each image of a batch, equal to a brute-force search.

The documented rule (aptvit/core/quadtree.py): one threshold t per image, shared by every size, and t is
the smallest value that brings the image to at most ``budget`` tokens. The layout only changes where t
passes a score, so the brute force tries "merge nothing" and then "merge every score <= c" for every
candidate score c of the image in ascending order, counts the tokens with plain quadtree loops, and
takes the first that fits.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import aptvit
from aptvit.core.pixels import grayscale_255
from aptvit.core.scoring import entropy_scores

from ..conftest import photo
from .test_quadtree import assert_valid, reference_greedy


def brute_force_budget(scores, sizes, grid, max_tokens):
    """Boxes of the smallest shared threshold that leaves at most ``max_tokens`` tokens (plain loops).

    Args:
        scores: {size: nested list [h_s][w_s] of floats} of ONE image, every non-base size.
        sizes: ascending patch sizes, sizes[0] the base.
        grid: (H / p, W / p).
        max_tokens: the token budget.

    Returns:
        sorted [(y, x, size)].
    """
    candidates = sorted({v for s in sizes[1:] for row in scores[s] for v in row})
    for c in [-math.inf] + candidates:
        thr = math.nextafter(c, math.inf) if c != -math.inf else -math.inf  # merge every score <= c
        boxes = reference_greedy(scores, {s: thr for s in sizes[1:]}, sizes[0], grid)
        if len(boxes) <= max_tokens:
            return boxes
    raise AssertionError("no threshold meets the budget; the test picked an infeasible budget")


def content_scorer(gray, sizes, base):
    """A per-pixel score that depends only on the image itself (its mean brightness per patch)."""
    return {s: F.avg_pool2d(gray[:, None], s)[:, 0] for s in sizes}


def boxes_of(layout, i):
    return sorted(map(tuple, layout.boxes(i).tolist()))


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.75, 40])
def test_budget_per_image_in_a_batch_equals_the_image_alone_and_the_brute_force(budget):
    names = ["camera", "coffee", "astronaut", "chelsea"]
    img = torch.cat([photo(name, (128, 192)) for name in names])
    sizes = (16, 32, 64)
    batch = aptvit.patch_layout(img, sizes, budget=budget)
    assert_valid(batch)
    scores = entropy_scores(grayscale_255(img), sizes[1:], 16)
    limit = budget if isinstance(budget, int) else math.floor(budget * 8 * 12 + 1e-9)
    for i in range(len(names)):
        alone = aptvit.patch_layout(img[i : i + 1], sizes, budget=budget)
        assert boxes_of(batch, i) == boxes_of(alone, 0), f"image {i} ({names[i]}) depends on its batch"
        per_image = {s: scores[s][i].tolist() for s in sizes[1:]}
        assert boxes_of(batch, i) == brute_force_budget(per_image, sizes, (8, 12), limit), names[i]


def test_a_plain_image_beside_a_busy_one_keeps_only_the_merges_its_budget_needs():
    # the case: one image at a time met the budget as [48, 48]; a threshold shared by the batch merged
    # the plain image much further than it needed ([48, 33])
    busy = photo("astronaut", (128, 128))
    plain = photo("camera", (128, 128))
    both = torch.cat([busy, plain])
    batch = aptvit.patch_layout(both, (16, 32, 64), budget=48)
    alone = [int(aptvit.patch_layout(x, (16, 32, 64), budget=48).num_tokens) for x in (busy, plain)]
    assert batch.num_tokens.tolist() == alone
    assert max(alone) <= 48


@st.composite
def budget_cases(draw):
    base = draw(st.sampled_from([4, 16]))
    levels = draw(st.integers(2, 3))
    sizes = tuple(base * 2**k for k in range(levels))
    top = 2 ** (levels - 1)
    hc = draw(st.integers(1, 3)) * top + draw(st.integers(0, top - 1))  # odd grids too: cells no large patch covers
    wc = draw(st.integers(1, 3)) * top + draw(st.integers(0, top - 1))
    b = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    levels_px = draw(st.sampled_from([2, 4, 256]))  # few grey levels give ties between scores
    g = torch.Generator().manual_seed(seed)
    img = (
        torch.randint(0, levels_px, (b, 1, hc * base, wc * base), generator=g)
        .mul(255 // (levels_px - 1))
        .to(torch.uint8)
    )
    return sizes, (hc, wc), img, draw(st.floats(0.05, 1.0))


@given(budget_cases())
def test_budget_equals_brute_force_for_every_image_of_a_batch(case):
    sizes, grid, img, frac = case
    limit = max(1, math.floor(frac * grid[0] * grid[1] + 1e-9))
    everything = aptvit.patch_layout(img, sizes, thresholds={s: math.inf for s in sizes[1:]}, scorer=content_scorer)
    if limit < int(everything.num_tokens.max()):
        with pytest.raises(ValueError, match="budget"):
            aptvit.patch_layout(img, sizes, budget=frac, scorer=content_scorer)
        return
    layout = aptvit.patch_layout(img, sizes, budget=frac, scorer=content_scorer)
    assert_valid(layout)
    scores = content_scorer(grayscale_255(img), sizes[1:], sizes[0])
    for i in range(img.shape[0]):
        per_image = {s: scores[s][i].tolist() for s in sizes[1:]}
        assert boxes_of(layout, i) == brute_force_budget(per_image, sizes, grid, limit), f"image {i}"
