"""What a GPU waits for in ``patch_layout``: one host read per image size, nothing else data-dependent.

``OpCounter`` (tests/dispatch.py) sees every aten op and the data-dependent ones (``.item()``, ``nonzero``,
``bincount``, boolean masks, ...). ``.tolist()`` on a CPU tensor dispatches nothing, so the host reads
themselves are counted by wrapping ``Tensor.tolist`` / ``Tensor.numpy``.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aptvit
from aptvit.core.layout import PatchLayout, from_boxes
from aptvit.core.quadtree import all_merged_tokens

from ..conftest import photo
from ..dispatch import OpCounter


class HostReads:
    """Counts ``tolist()`` / ``numpy()`` calls on tensors (a device sync each on a GPU)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def run_counted(monkeypatch, fn):
    reads = HostReads(monkeypatch)
    with OpCounter() as ops:
        out = fn()
    monkeypatch.undo()
    return out, ops, reads.count


def batch(b: int, dtype: torch.dtype) -> torch.Tensor:
    names = ["astronaut", "coffee", "chelsea", "camera", "rocket"]
    img = torch.cat([photo(names[i % len(names)], (128, 192)) for i in range(b)])
    return img if dtype == torch.uint8 else img.to(dtype) / 255


MODES = [dict(), dict(thresholds={32: 6.0, 64: 4.5}), dict(budget=0.4), dict(budget=20)]


@pytest.mark.parametrize("scorer", ["entropy", "laplacian", "upsample"])
@pytest.mark.parametrize("mode", MODES, ids=["defaults", "thresholds", "budget-fraction", "budget-count"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_one_host_read_and_no_other_data_dependent_op_whatever_the_batch(monkeypatch, scorer, mode, dtype):
    totals = {}
    for b in (1, 2, 16):
        images = batch(b, dtype)
        # a first call per shape builds the layout's constant index tables (kept: quadtree.grid_tables and the
        # entropy keys), whether or not an earlier test did already; the count is that of every later call
        aptvit.patch_layout(images, (16, 32, 64), scorer=scorer, **mode)
        layout, ops, reads = run_counted(
            monkeypatch, lambda: aptvit.patch_layout(images, (16, 32, 64), scorer=scorer, **mode)
        )
        # one sync in all: the token counts (with the float validity); tolist() is invisible to OpCounter on the CPU
        assert len(ops.data_dependent) + reads == 1, (
            f"batch {b}: {reads} host reads, data-dependent: {ops.data_dependent}"
        )
        assert layout.offsets == tuple(layout.cu_seqlens.tolist())
        totals[b] = ops.total
    # one image may take fewer (entropy adds no image offsets to its histogram keys), but from two on the count is fixed
    assert totals[16] == totals[2] and totals[1] <= totals[2], f"aten ops grow with the batch: {totals}"


def test_lists_take_one_host_read_per_image_size(monkeypatch):
    a, b = photo("astronaut", (96, 160))[0], photo("coffee", (128, 64))[0]
    same, ops, reads = run_counted(monkeypatch, lambda: aptvit.patch_layout([a, a.flip(-1), a], (16, 32)))
    assert reads + len(ops.data_dependent) == 1, (reads, ops.data_dependent)
    mixed, ops, reads = run_counted(monkeypatch, lambda: aptvit.patch_layout([a, b, a, b.float() / 255], (16, 32)))
    assert reads + len(ops.data_dependent) == 3, (reads, ops.data_dependent)  # (96, 160) u8, (128, 64) u8, float
    assert mixed.offsets == tuple(mixed.cu_seqlens.tolist()) and same.offsets == tuple(same.cu_seqlens.tolist())


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.full((2, 3, 32, 32), math.nan), "images contains NaN or inf"),
        (torch.full((2, 3, 32, 32), math.inf), "images contains NaN or inf"),
        (
            torch.full((2, 3, 32, 32), 1.5),
            "images are floating point with values in \\[0.5, 1.5\\]; float images must be in \\[0, 1\\]",
        ),
        (torch.full((2, 3, 32, 32), -0.25), "values in \\[-0.25, 0.5\\]"),
        ([torch.zeros(3, 32, 32, dtype=torch.uint8), torch.full((3, 32, 48), math.nan)], "images\\[1\\] contains NaN"),
    ],
)
@pytest.mark.parametrize("mode", [dict(), dict(budget=0.5)])
def test_bad_float_pixels_are_reported_from_the_shared_read(images, message, mode):
    if isinstance(images, torch.Tensor):
        images = images.clone()
        images[0] = 0.5  # one good image in the batch: the check covers all of them
    with pytest.raises(ValueError, match=message):
        aptvit.patch_layout(images, (16, 32), **mode)


def test_nan_scores_of_a_custom_scorer_are_reported():
    def scorer(gray, sizes, base):
        out = {s: torch.zeros(gray.shape[0], gray.shape[1] // s, gray.shape[2] // s) for s in sizes}
        out[max(sizes)][-1, -1, -1] = math.nan
        return out

    for mode in (dict(thresholds={32: 1.0, 64: 1.0}), dict(budget=0.5)):
        with pytest.raises(ValueError, match="NaN scores for patch size 64"):
            aptvit.patch_layout(torch.zeros(3, 3, 128, 128), (16, 32, 64), scorer=scorer, **mode)
    # registered by name: checked unless registered as finite (the built-in scorers, whose NaN check is left out)
    from aptvit.core import scoring

    scoring.register_scorer("_nan_test", lambda g, s, b: scorer(g, s, b), {2: 1.0}, overwrite=True)
    try:
        with pytest.raises(ValueError, match="NaN scores for patch size 64"):
            aptvit.patch_layout(torch.zeros(3, 3, 128, 128), (16, 32, 64), scorer="_nan_test")
        assert all(scoring.SCORERS[name].finite for name in ("entropy", "laplacian", "upsample"))
    finally:
        scoring.SCORERS.pop("_nan_test")


def test_budget_lets_infinite_scores_merge_when_it_must():
    def inf(gray, sizes, base):
        return {s: torch.full((gray.shape[0], gray.shape[1] // s, gray.shape[2] // s), math.inf) for s in sizes}  # noqa: E731

    images = torch.zeros(2, 3, 96, 160)
    floor = all_merged_tokens((96, 160), (16, 32, 64))
    layout = aptvit.patch_layout(images, (16, 32, 64), budget=floor, scorer=inf)
    assert layout.token_counts == (floor, floor)
    with pytest.raises(ValueError, match=f"below the {floor} tokens"):
        aptvit.patch_layout(images, (16, 32, 64), budget=floor - 1, scorer=inf)


@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([(4,), (4, 8), (4, 16), (4, 8, 16, 32), (14, 28, 112)]))
def test_all_merged_tokens_equals_merging_everything(hc, wc, sizes):
    base = sizes[0]
    images = torch.zeros(1, 1, hc * base, wc * base)
    merged = aptvit.patch_layout(images, sizes, thresholds={s: math.inf for s in sizes[1:]}, scorer="laplacian")
    assert all_merged_tokens((hc * base, wc * base), sizes) == merged.total_tokens


@st.composite
def random_settings(draw):
    base = draw(st.sampled_from([4, 14]))
    sizes = (base,) + tuple(base * 2**k for k in sorted(draw(st.sets(st.integers(1, 3), max_size=3))))
    h, w = draw(st.integers(1, 12)) * base, draw(st.integers(1, 12)) * base
    b = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    scorer = draw(st.sampled_from(["entropy", "laplacian", "upsample"]))
    if draw(st.booleans()) and len(sizes) > 1:
        mode = dict(budget=max(all_merged_tokens((h, w), sizes), draw(st.integers(1, (h // base) * (w // base)))))
    else:
        scale = {"entropy": 6.0, "laplacian": 0.3, "upsample": 0.02}[scorer]
        mode = dict(
            thresholds={s: draw(st.floats(0, 1)) * scale for s in sizes[1:] if draw(st.booleans())}, scorer=scorer
        )
    mode.setdefault("scorer", scorer)
    return sizes, (b, h, w), seed, mode


def random_images(shape, seed):
    """Piecewise-flat images with noise in places: some regions merge, some do not."""
    b, h, w = shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, max(1, h // 8), max(1, w // 8), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")
    noisy = torch.rand(b, 1, h, w, generator=g) < torch.rand(b, 1, 1, 1, generator=g)
    img = torch.where(noisy, torch.rand(b, 3, h, w, generator=g), img)
    return (img * 255).round().to(torch.uint8)


@given(random_settings())
def test_patch_layout_passes_from_boxes_validation(settings):
    sizes, shape, seed, mode = settings
    layout = aptvit.patch_layout(random_images(shape, seed), sizes, **mode)
    checked = from_boxes(layout.patch_sizes, layout.image_sizes, layout.y, layout.x, layout.size, layout.cu_seqlens)
    for name in ("y", "x", "size", "cu_seqlens", "cells"):
        got, want = getattr(layout, name), getattr(checked, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert layout.max_seqlen == checked.max_seqlen and layout.offsets == checked.offsets


def test_offsets_equal_cu_seqlens_after_every_constructor():
    a, b = photo("astronaut", (96, 160)), photo("coffee", (128, 64))
    built = {
        "patch_layout tensor": aptvit.patch_layout(torch.cat([a, a.flip(-1)]), (16, 32, 64)),
        "patch_layout mixed list": aptvit.patch_layout([a[0], b[0], a[0].flip(-1)], (16, 32, 64), budget=0.5),
    }
    layout = built["patch_layout mixed list"]
    built["from_boxes"] = from_boxes(
        layout.patch_sizes, layout.image_sizes, layout.y, layout.x, layout.size, layout.cu_seqlens
    )
    built["to"] = layout.to("cpu")
    built["image"] = layout.image(1)
    built["image(-1)"] = layout.image(-1)
    built["cat"] = PatchLayout.cat([layout.image(2), built["patch_layout tensor"], layout.image(0)])
    built["from_dict"] = PatchLayout.from_dict(layout.to_dict())
    built["constructor without offsets"] = PatchLayout(
        *[
            getattr(layout, f)
            for f in ("patch_sizes", "image_sizes", "y", "x", "size", "cu_seqlens", "cells", "max_seqlen")
        ]
    )
    for name, l in built.items():
        assert l.offsets == tuple(l.cu_seqlens.tolist()), name
        assert all(isinstance(o, int) for o in l.offsets), name
        assert l.token_counts == tuple(l.num_tokens.tolist()), name
        assert l.max_seqlen == max(l.token_counts), name
    assert built["cat"].boxes(0).tolist() == layout.boxes(2).tolist()
    assert built["cat"].boxes(3).tolist() == layout.boxes(0).tolist()
    with pytest.raises(ValueError, match="offsets"):
        PatchLayout(
            layout.patch_sizes,
            layout.image_sizes,
            layout.y,
            layout.x,
            layout.size,
            layout.cu_seqlens,
            layout.cells,
            layout.max_seqlen,
            (0,),
        )


def test_size_counts_and_image_index_match_a_direct_count():
    layout = aptvit.patch_layout(
        [photo(n, (128, 192))[0] for n in ("astronaut", "camera", "coffee")], (16, 32, 64), budget=0.25
    )
    image = torch.repeat_interleave(torch.arange(3), torch.tensor(layout.token_counts))
    assert torch.equal(layout.image_index, image)
    counts = layout.size_counts()
    for s in layout.patch_sizes:
        want = [sum(1 for _, _, z in layout.boxes(i).tolist() if z == s) for i in range(3)]
        assert counts[s].tolist() == want, s
        assert sum(want) > 0, f"the case should use every size, {s} unused"
    assert sum(counts[s] * (s // 16) ** 2 for s in counts).tolist() == [8 * 12] * 3
