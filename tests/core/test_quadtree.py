"""Layout rules: exact tiling, greedy quadtree semantics, thresholds, budget, bad input."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aptvit
from aptvit.core.layout import PatchLayout
from aptvit.core.pixels import grayscale_255
from aptvit.core.quadtree import all_merged_tokens
from aptvit.core.scoring import entropy_scores

from ..conftest import photo


def assert_valid(layout: PatchLayout):
    """Exact tiling, cell index consistent with boxes, patches on their own grid inside the image."""
    p = layout.base_size
    for i, (h, w) in enumerate(layout.image_sizes):
        boxes = layout.boxes(i)
        cover = torch.zeros(h // p, w // p, dtype=torch.long)
        cells = layout.cell_index_of(i)
        start = int(layout.cu_seqlens[i])
        for t, (y, x, s) in enumerate(boxes.tolist()):
            assert s in layout.patch_sizes and y % s == 0 and x % s == 0
            assert y + s <= h and x + s <= w
            cover[y // p : (y + s) // p, x // p : (x + s) // p] += 1
            assert (cells[y // p : (y + s) // p, x // p : (x + s) // p] == start + t).all()
        assert (cover == 1).all()
        keys = [(y, x) for y, x, _ in boxes.tolist()]
        assert keys == sorted(keys), "tokens are packed in raster order"
    assert int(layout.num_tokens.sum()) == layout.total_tokens
    assert layout.max_seqlen == int(layout.num_tokens.max())


def reference_greedy(scores, thresholds, base, grid):
    """The APT selection written as plain loops over the quadtree."""
    hc, wc = grid
    taken = [[None] * wc for _ in range(hc)]
    boxes = []
    for s in sorted(thresholds, reverse=True):
        k = s // base
        for i in range(hc // k):
            for j in range(wc // k):
                block = [taken[i * k + a][j * k + b] for a in range(k) for b in range(k)]
                if all(c is None for c in block) and scores[s][i][j] < thresholds[s]:
                    for a in range(k):
                        for b in range(k):
                            taken[i * k + a][j * k + b] = s
                    boxes.append((i * s, j * s, s))
    boxes += [(i * base, j * base, base) for i in range(hc) for j in range(wc) if taken[i][j] is None]
    return sorted(boxes)


@st.composite
def layout_cases(draw):
    base = draw(st.sampled_from([4, 14, 16]))
    levels = draw(st.integers(1, 4))
    sizes = [base * 2**k for k in sorted(draw(st.sets(st.integers(1, 3), min_size=levels - 1, max_size=levels - 1)))]
    sizes = [base] + sizes
    hc, wc = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    thresholds = {s: draw(st.floats(-0.5, 1.5)) for s in sizes[1:] if draw(st.booleans())}
    return base, tuple(sizes), (hc, wc), thresholds, draw(st.integers(0, 2**31 - 1))


def random_scorer(seed):
    def scorer(gray, sizes, base):
        g = torch.Generator().manual_seed(seed)
        b, h, w = gray.shape
        return {s: torch.rand(b, h // s, w // s, generator=g) for s in sizes}

    return scorer


@given(layout_cases())
def test_greedy_selection_equals_reference_loops_and_tiles_exactly(case):
    base, sizes, (hc, wc), thresholds, seed = case
    images = torch.zeros(2, 1, hc * base, wc * base)
    layout = aptvit.patch_layout(images, sizes, thresholds=thresholds, scorer=random_scorer(seed))
    assert_valid(layout)
    scores = random_scorer(seed)(images[:, 0], sorted(thresholds), base)
    for i in range(2):
        per_image = {s: scores[s][i].tolist() for s in thresholds}
        assert sorted(map(tuple, layout.boxes(i).tolist())) == reference_greedy(per_image, thresholds, base, (hc, wc))
    assert set(layout.size.unique().tolist()) <= {base, *thresholds}, "a size without a threshold is never used"


@given(layout_cases(), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_budget_is_respected_and_monotone(case, frac_a, frac_b):
    base, sizes, (hc, wc), _, seed = case
    images = torch.zeros(3, 1, hc * base, wc * base)
    scorer = random_scorer(seed)
    everything = aptvit.patch_layout(images, sizes, thresholds={s: math.inf for s in sizes[1:]}, scorer=scorer)
    floor_tokens = int(everything.num_tokens.max())
    counts = []
    for frac in sorted([frac_a, frac_b]):
        limit = max(1, math.floor(frac * hc * wc + 1e-9))
        if limit < floor_tokens:
            with pytest.raises(ValueError, match="budget"):
                aptvit.patch_layout(images, sizes, budget=frac, scorer=scorer)
            return
        layout = aptvit.patch_layout(images, sizes, budget=frac, scorer=scorer)
        assert_valid(layout)
        assert (layout.num_tokens <= limit).all()
        counts.append(layout.num_tokens)
    assert (counts[0] <= counts[1]).all(), "a smaller budget never gives more tokens"


def reference_budget(scores, sizes, base, grid, limit):
    """Budget mode written plainly: the first shared threshold, in increasing order, that meets the budget."""
    values = sorted(v for s in sizes[1:] for row in scores[s] for v in row)
    for t in [-math.inf] + [math.nextafter(v, math.inf) for v in values]:
        boxes = reference_greedy(scores, {s: t for s in sizes[1:]}, base, grid)
        if len(boxes) <= limit:
            return boxes
    raise AssertionError("infeasible budget")


@given(layout_cases(), st.floats(0.01, 1.0))
def test_budget_equals_reference_scan(case, frac):
    base, sizes, (hc, wc), _, seed = case
    limit = max(1, math.floor(frac * hc * wc + 1e-9))
    if len(sizes) == 1 or limit < all_merged_tokens((hc * base, wc * base), sizes):
        return
    images = torch.zeros(2, 1, hc * base, wc * base)
    layout = aptvit.patch_layout(images, sizes, budget=frac, scorer=random_scorer(seed))
    assert_valid(layout)
    scores = random_scorer(seed)(images[:, 0], list(sizes[1:]), base)
    for i in range(2):
        per_image = {s: scores[s][i].tolist() for s in sizes[1:]}
        assert sorted(map(tuple, layout.boxes(i).tolist())) == reference_budget(per_image, sizes, base, (hc, wc), limit)


def test_budget_merges_most_homogeneous_first_and_stops_at_the_budget():
    img = photo("coffee", (224, 320))
    sizes = (16, 32, 64)
    layout = aptvit.patch_layout(img, sizes, budget=100)
    assert int(layout.num_tokens) <= 100
    scores = entropy_scores(grayscale_255(img), sizes, 16)
    merged = [scores[s][0, y // s, x // s].item() for y, x, s in layout.boxes(0).tolist() if s > 16]
    t = max(merged)
    # the same layout is a shared-threshold layout: everything scoring <= t merges ...
    shared = aptvit.patch_layout(
        img, sizes, thresholds={32: math.nextafter(t, math.inf), 64: math.nextafter(t, math.inf)}
    )
    assert torch.equal(shared.boxes(0), layout.boxes(0))
    # ... and stopping one merge earlier would exceed the budget
    fewer = aptvit.patch_layout(img, sizes, thresholds={32: t, 64: t})
    assert int(fewer.num_tokens) > 100


def test_budget_int_and_fraction_and_bad_values():
    img = photo("astronaut", (128, 128))
    assert aptvit.patch_layout(img, budget=32).num_tokens.item() <= 32
    assert aptvit.patch_layout(img, budget=0.5).num_tokens.item() <= 32
    assert aptvit.patch_layout(img, budget=1.0).num_tokens.item() == 64  # nothing needs to merge
    for bad, kind in [(0, ValueError), (1.5, ValueError), (0.0, ValueError), (True, TypeError), ("half", TypeError)]:
        with pytest.raises(kind, match="budget"):
            aptvit.patch_layout(img, budget=bad)
    with pytest.raises(ValueError, match="below the 4 tokens"):
        aptvit.patch_layout(img, budget=3)
    with pytest.raises(ValueError, match=r"one patch size 16 nothing merges: add a larger one \(patch sizes 16,32\)"):
        aptvit.patch_layout(img, patch_sizes=(16,), budget=0.5)
    with pytest.raises(ValueError, match="no patch larger than 16 fits it, so nothing can merge"):  # not "add 32"
        aptvit.patch_layout(torch.rand(1, 3, 16, 48), patch_sizes=(16,), budget=1)
    with pytest.raises(ValueError, match="either thresholds= or budget="):
        aptvit.patch_layout(img, thresholds={32: 5.0}, budget=0.5)


def test_constant_image_merges_everything_that_fits():
    img = torch.full((2, 3, 160, 96), 0.5)  # 10 x 6 cells; 64-grid 2 x 1, 32-grid 5 x 3
    layout = aptvit.patch_layout(img, (16, 32, 64), thresholds={32: 5.5, 64: 4.0})
    assert_valid(layout)
    counts = layout.size_counts()
    assert counts[64].tolist() == [2, 2]
    # 64-patches cover rows 0-7 x cols 0-3 (cells); 32-grid cells outside: rows 8-9 (3 patches) + cols 4-5 rows 0-7 (4 patches)
    assert counts[32].tolist() == [7, 7]
    assert counts[16].tolist() == [0, 0]


def test_noise_merges_nothing():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 128, 192), generator=g, dtype=torch.uint8)
    layout = aptvit.patch_layout(img, (16, 32, 64), thresholds={32: 5.5, 64: 4.0})
    assert layout.num_tokens.tolist() == [8 * 12, 8 * 12]


def test_score_equal_to_threshold_does_not_merge():
    img = photo("chelsea", (64, 64))
    score = entropy_scores(grayscale_255(img), [32], 16)[32][0, 0, 0].item()
    at = aptvit.patch_layout(img, (16, 32), thresholds={32: score})
    above = aptvit.patch_layout(img, (16, 32), thresholds={32: math.nextafter(score, math.inf)})
    assert (0, 0, 32) not in map(tuple, at.boxes(0).tolist())
    assert (0, 0, 32) in map(tuple, above.boxes(0).tolist())


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 3]))
def test_uint8_and_float_inputs_give_the_same_layout(seed, channels):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 8, (2, channels, 64, 96), generator=g, dtype=torch.uint8) * 36
    a = aptvit.patch_layout(img, (16, 32, 64), thresholds={32: 2.0, 64: 2.5})
    b = aptvit.patch_layout(img.float() / 255, (16, 32, 64), thresholds={32: 2.0, 64: 2.5})
    assert torch.equal(a.cells, b.cells) and torch.equal(a.size, b.size)


def test_cpu_results_are_deterministic():
    img = torch.cat([photo("astronaut", (224, 224)), photo("coffee", (224, 224))])
    for kwargs in [
        dict(thresholds={32: 5.5, 64: 4.0}),
        dict(budget=0.4),
        dict(scorer="laplacian"),
        dict(scorer="upsample"),
    ]:
        a, b = aptvit.patch_layout(img, **kwargs), aptvit.patch_layout(img, **kwargs)
        assert torch.equal(a.cells, b.cells) and torch.equal(a.size, b.size) and torch.equal(a.y, b.y)


@pytest.mark.parametrize("scorer", ["entropy", "laplacian", "upsample"])
def test_real_photos_give_a_plausible_token_reduction(scorer):
    names = ["astronaut", "coffee", "chelsea", "camera", "rocket"]
    img = torch.cat([photo(name, (448, 448)) for name in names])
    layout = aptvit.patch_layout(img, (16, 32, 64), scorer=scorer)  # documented defaults
    assert_valid(layout)
    kept = layout.num_tokens / 784
    assert (kept < 0.97).all() and (kept > 0.25).all(), f"{scorer}: kept {kept.tolist()}"
    assert kept.mean() < 0.85, "a plausible reduction over the photos"
    assert kept[3] < 0.7, "the camera man's plain sky and coat merge"
    # merged patches are the plain ones: their cells' own entropy is lower than the base cells'
    scores = entropy_scores(grayscale_255(img), [16], 16)[16]
    is_base = layout.size[layout.cell_index] == 16
    assert scores[~is_base].mean() < scores[is_base].mean() - 1.0


def test_non_square_and_list_of_mixed_sizes():
    a, b = photo("astronaut", (96, 160)), photo("coffee", (128, 64))
    alone = [aptvit.patch_layout(x, (16, 32)) for x in (a, b, a)]
    mixed = aptvit.patch_layout([a[0], b[0], a[0]], (16, 32))
    assert_valid(mixed)
    assert mixed.image_sizes == ((96, 160), (128, 64), (96, 160))
    for i in range(3):
        assert torch.equal(mixed.boxes(i), alone[i].boxes(0))
        assert torch.equal(mixed.cell_index_of(i) - int(mixed.cu_seqlens[i]), alone[i].cell_index[0])
    with pytest.raises(ValueError, match="differ in size"):
        mixed.cell_index
    joined = PatchLayout.cat([mixed.image(i) for i in range(3)])
    assert torch.equal(joined.cells, mixed.cells) and torch.equal(joined.cu_seqlens, mixed.cu_seqlens)


def test_to_dict_is_json_and_round_trips():
    img = torch.cat([photo("astronaut", (128, 192)), photo("chelsea", (128, 192))])
    layout = aptvit.patch_layout(img, (16, 32, 64), budget=0.5)
    again = PatchLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    for name in ("y", "x", "size", "cu_seqlens", "cells"):
        assert torch.equal(getattr(again, name), getattr(layout, name)), name
    assert again.image_sizes == layout.image_sizes and again.max_seqlen == layout.max_seqlen
    moved = layout.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.cell_index, layout.cell_index)


def test_from_dict_rejects_boxes_that_do_not_tile():
    d = {"patch_sizes": [16, 32], "image_sizes": [[32, 32]], "cu_seqlens": [0, 2], "boxes": [[0, 0, 32], [0, 0, 16]]}
    with pytest.raises(ValueError, match="exactly once"):
        PatchLayout.from_dict(d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch_sizes=(32, 16)), "ascending"),
        (dict(patch_sizes=(16, 48)), "powers of two"),
        (dict(patch_sizes=()), "positive ints"),
        (dict(patch_sizes=(16, True)), "positive ints"),
        (dict(thresholds={48: 1.0}), "not a non-base patch size"),
        (dict(thresholds={16: 1.0}), "not a non-base patch size"),
        (dict(thresholds={32: float("nan")}), "must be a number"),
        (dict(scorer_args={"bins": 1}), "bins"),
        (dict(scorer_args={"sigma": 1}), "no parameter"),
        (dict(scorer="sobel"), "unknown scorer"),
    ],
)
def test_bad_arguments_get_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aptvit.patch_layout(torch.zeros(1, 3, 64, 64), **kwargs)


def test_size_not_a_multiple_names_pad_to_multiple():
    with pytest.raises(ValueError, match="pad_to_multiple"):
        aptvit.patch_layout(torch.zeros(1, 3, 70, 64))
    padded = aptvit.pad_to_multiple(torch.zeros(1, 3, 70, 64), 16)
    assert_valid(aptvit.patch_layout(padded))


def test_custom_scorer_with_wrong_shape_is_reported():
    bad = lambda gray, sizes, base: {s: torch.zeros(1, 1, 1) for s in sizes}  # noqa: E731
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        aptvit.patch_layout(torch.zeros(1, 3, 64, 64), thresholds={32: 1.0}, scorer=bad)
    with pytest.raises(ValueError, match="custom scorer"):
        aptvit.patch_layout(torch.zeros(1, 3, 64, 64), scorer=bad)


@pytest.mark.parametrize(
    "boxes, cu, message",
    [
        ([[16, 0, 32], [0, 0, 16], [0, 16, 16], [16, 32, 16]], [0, 4], "sit on the grid"),  # 32-px box at y=16
        ([[0, 0, 48]], [0, 1], "sit on the grid"),  # 48 is not a patch size
        ([[0, 0, 32]], [0, 2], "cu_seqlens"),
        ([[0, 0, 32]], [1, 1], "cu_seqlens"),
    ],
)
def test_from_dict_rejects_boxes_off_their_grid_and_bad_offsets(boxes, cu, message):
    d = {
        "patch_sizes": [16, 32],
        "image_sizes": [[32, 48]] if len(boxes) == 4 else [[32, 32]],
        "cu_seqlens": cu,
        "boxes": boxes,
    }
    with pytest.raises(ValueError, match=message):
        PatchLayout.from_dict(d)


def test_image_accepts_negative_indices_and_rejects_out_of_range():
    layout = aptvit.patch_layout(torch.rand(3, 3, 64, 64), (16, 32))
    assert torch.equal(layout.image(-1).boxes(0), layout.boxes(2))
    with pytest.raises(IndexError):
        layout.image(3)


def test_custom_scorer_on_the_wrong_dtype_is_reported():
    def ints(gray, sizes, base):
        return {s: torch.zeros(gray.shape[0], gray.shape[1] // s, gray.shape[2] // s, dtype=torch.long) for s in sizes}  # noqa: E731

    with pytest.raises(ValueError, match="floating point scores"):
        aptvit.patch_layout(torch.zeros(1, 3, 64, 64), thresholds={32: 1.0}, scorer=ints)
    with pytest.raises(ValueError, match="bins must be an int from 2 to 65536"):
        aptvit.patch_layout(torch.zeros(1, 3, 64, 64), scorer_args={"bins": 1 << 20})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_thresholds_rounded_on_the_host_are_the_devices(monkeypatch, dtype):
    """The host rounding (numpy, one op) keeps ``score < threshold`` exact, as the device rounding does."""
    from aptvit.core import quadtree

    values = [5.5, 1 / 3, 6.000000001, -2.7, 1e-30, 1e5, 3.4e38] + torch.randn(300, dtype=torch.float64).mul(5).tolist()
    host = [quadtree._exact_threshold(v, 2, dtype, "cpu") for v in values]
    monkeypatch.setattr(quadtree, "_HOST_FLOATS", {})
    device = [quadtree._exact_threshold(v, 2, dtype, "cpu") for v in values]
    for v, a, b in zip(values, host, device):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), (v, a, b)
        assert float(a[0]) >= v and (
            float(a[0]) == v or float(torch.nextafter(a[:1], torch.full_like(a[:1], -math.inf))) < v
        )
