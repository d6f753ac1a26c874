"""Scores against plain per-patch reference loops (numpy.histogram, explicit convolutions)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from aptvit.core.pixels import grayscale_255
from aptvit.core.scoring import bin_index, entropy_scores, laplacian_scores, upsampling_error_scores


def numpy_entropy(values: np.ndarray, bins: int) -> float:
    counts, _ = np.histogram(values.astype(np.float64), bins=bins, range=(0, 255))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@st.composite
def gray_images(draw):
    base = draw(st.sampled_from([2, 4, 7, 8]))
    levels = draw(st.integers(1, 3))
    k = 2 ** (levels - 1)
    # any number of base cells, odd ones included: a coarser grid drops the last row/column that has no parent
    h = draw(st.integers(k, 3 * k)) * base + draw(st.integers(0, base - 1))
    w = draw(st.integers(k, 3 * k)) * base + draw(st.integers(0, base - 1))
    channels = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    palette = draw(st.integers(1, 256))  # few levels -> low entropy, many -> high
    img = (torch.randint(0, palette, (2, channels, h, w), generator=g) * (255 // max(1, palette - 1))).clamp(0, 255)
    sizes = [base * 2**k for k in range(levels)]
    return img.to(torch.uint8), sizes, base


@given(gray_images(), st.sampled_from([2, 7, 64, 256, 512]))
def test_entropy_matches_numpy_histogram_loop_for_every_scale(case, bins):
    img, sizes, base = case
    gray = grayscale_255(img)
    scores = entropy_scores(gray, sizes, base, bins=bins)
    g = gray.numpy()
    for s in sizes:
        b, gh, gw = scores[s].shape
        assert (gh, gw) == (img.shape[2] // s, img.shape[3] // s)
        for n in range(b):
            for i in range(gh):
                for j in range(gw):
                    want = numpy_entropy(g[n, i * s : (i + 1) * s, j * s : (j + 1) * s], bins)
                    assert scores[s][n, i, j].item() == pytest.approx(want, abs=2e-4)


def test_bin_index_matches_numpy_including_255_and_edges():
    bins = 512
    edges = torch.arange(bins + 1, dtype=torch.float32) * 255.0 / bins
    values = torch.cat([edges, edges - 1e-3, torch.rand(1000) * 255]).clamp(0, 255)
    want = np.digitize(values.double().numpy(), np.linspace(0, 255, bins + 1)) - 1
    want = np.clip(want, 0, bins - 1)
    assert np.array_equal(bin_index(values, bins).numpy(), want)
    assert bin_index(torch.tensor([255.0]), bins).item() == bins - 1


@pytest.mark.parametrize("h, w", [(20, 28), (44, 12), (12, 52)])  # 5x7, 11x3, 3x13 base cells
def test_entropy_on_odd_grids_keeps_the_top_left_patches(h, w):
    g = torch.Generator().manual_seed(h * w)
    img = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    img[:, :, :4] = 9  # a plain first row of cells: scores change if it is the one dropped
    img[:, :, :, :4] = 200
    gray = grayscale_255(img)
    scores = entropy_scores(gray, [4, 8, 16], 4, bins=64)
    g = gray.numpy()
    for s in (4, 8, 16):
        assert scores[s].shape == (2, h // s, w // s)
        for n in range(2):
            for i in range(h // s):
                for j in range(w // s):
                    want = numpy_entropy(g[n, i * s : (i + 1) * s, j * s : (j + 1) * s], 64)
                    assert scores[s][n, i, j].item() == pytest.approx(want, abs=2e-4), (s, n, i, j)


def test_entropy_chunked_equals_unchunked(monkeypatch):
    import aptvit.core.scoring as scoring

    gray = grayscale_255(torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8))
    full = entropy_scores(gray, [16, 32, 64], 16)
    monkeypatch.setattr(scoring, "_MAX_HIST_ENTRIES", 16 * 512 * 2)  # two images per chunk
    chunked = scoring.entropy_scores(gray, [16, 32, 64], 16)
    for s in full:
        assert torch.equal(full[s], chunked[s])


@pytest.mark.parametrize(
    "h, w, sizes", [(24, 40, [4, 8]), (20, 28, [4, 8, 16]), (23, 30, [8, 16])]
)  # odd grids: 5x7, 5x7 -> 2x3 -> 1x1
def test_laplacian_matches_explicit_reflect_convolution(h, w, sizes):
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (1, 1, h, w), generator=g, dtype=torch.uint8)
    gray = grayscale_255(img)
    scores = laplacian_scores(gray, sizes, 4)
    x = np.pad(gray[0].numpy() / 255.0, 1, mode="reflect")
    lap = np.zeros((h, w))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            weight = -8.0 if dy == dx == 0 else 1.0
            lap += weight * x[1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx]
    lap = np.abs(lap)
    for s in sizes:
        assert scores[s].shape == (1, h // s, w // s)
        for i in range(h // s):
            for j in range(w // s):
                want = lap[i * s : (i + 1) * s, j * s : (j + 1) * s].mean()
                assert scores[s][0, i, j].item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_upsampling_error_matches_per_patch_loop_and_is_zero_on_flat_patches():
    g = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (2, 3, 32, 48), generator=g, dtype=torch.uint8)
    img[:, :, :16, :16] = 77  # one flat 16-px patch
    gray = grayscale_255(img)
    scores = upsampling_error_scores(gray, [4, 8, 16], 4)
    assert torch.equal(scores[4], torch.zeros(2, 8, 12))
    for s in (8, 16):
        for n in range(2):
            for i in range(32 // s):
                for j in range(48 // s):
                    patch = gray[n, i * s : (i + 1) * s, j * s : (j + 1) * s][None, None] / 255.0
                    small = F.avg_pool2d(patch, s // 4)
                    back = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
                    assert scores[s][n, i, j].item() == pytest.approx(
                        ((back - patch) ** 2).mean().item(), rel=1e-5, abs=1e-9
                    )
    assert scores[16][:, 0, 0].abs().max() < 1e-12


def test_laplacian_ignores_the_callers_autocast():
    """The layout must not depend on the context it is computed in: under autocast a conv would run in bf16 (and
    on CUDA in TF32), moving scores across thresholds."""
    from aptvit.core.quadtree import patch_layout

    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 64, 64, generator=g) ** 3  # a spread of local contrasts around the thresholds
    gray = grayscale_255(images)
    ref = laplacian_scores(gray, [8, 16, 32], 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = laplacian_scores(gray, [8, 16, 32], 8)
        layout = patch_layout(images, (8, 16, 32), scorer="laplacian", budget=0.5)
    for s in ref:
        assert got[s].dtype == torch.float32 and torch.equal(got[s], ref[s]), s
    plain = patch_layout(images, (8, 16, 32), scorer="laplacian", budget=0.5)
    assert torch.equal(layout.size, plain.size) and torch.equal(layout.cells, plain.cells)
