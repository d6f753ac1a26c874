"""Choosing patch sizes: the greedy quadtree of APT, a token-budget mode, and ``patch_layout``.

Selection (APT_NOTES "Selection"): from the largest size down, a patch of size s is taken where its
score is strictly below the threshold for s and none of its cells is taken yet; the cells left at
the end get base-size patches. Patches of size s sit on the grid of size s anchored at the
top-left corner, so a patch is always entirely inside the image and grids of different sizes nest.

Budget mode: one threshold t per image is shared by every size, and t is the smallest value that
brings the image to at most ``budget`` tokens. Scores of different sizes are compared directly:
every built-in score is a per-pixel quantity (bits of entropy, mean |Laplacian|, per-pixel MSE),
so "score < t" means the same amount of detail for a 64-px and a 32-px patch, and the most
homogeneous regions, whatever their size, merge first. The token count can only fall as t
rises (each threshold only adds merges), so the search is a binary search over the image's own
sorted scores and a smaller budget never gives more tokens. The count lands within one merge of the
budget (a merge of size s removes up to (s/p)^2 - 1 tokens).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .layout import PatchLayout, check_patch_sizes, from_boxes
from .pixels import check_images, grayscale_255, group_by_size
from .scoring import SCORERS, Scorer

# Defaults keyed by the scale factor size / base size, per built-in scorer. Entropy: the APT
# paper's 5.5 bits for 2x; the others were calibrated to keep about as many tokens as entropy on
# the scikit-image photos (see benchmarks/calibrate_thresholds.py).
DEFAULT_THRESHOLDS: Dict[str, Dict[int, float]] = {
    "entropy": {2: 5.5, 4: 4.0, 8: 3.5},
    "laplacian": {2: 0.069, 4: 0.012, 8: 0.007},
    "upsample": {2: 2.4e-4, 4: 1.9e-5, 8: 2.9e-6},
}

Images = Union[torch.Tensor, Sequence[torch.Tensor]]
MAX_BINS = 65536


def default_thresholds(patch_sizes: Sequence[int], scorer: str = "entropy") -> Dict[int, float]:
    """The documented default thresholds for ``patch_sizes`` and a built-in scorer, keyed by size."""
    sizes = check_patch_sizes(patch_sizes)
    if scorer not in DEFAULT_THRESHOLDS:
        raise ValueError(f"no default thresholds for scorer {scorer!r}; pass thresholds= or budget=")
    table = DEFAULT_THRESHOLDS[scorer]
    out = {}
    for s in sizes[1:]:
        k = s // sizes[0]
        out[s] = table.get(k, min(table.values()))
    return out


def check_thresholds(thresholds: Mapping[int, float], sizes: Tuple[int, ...]) -> Dict[int, float]:
    """Validate thresholds keyed by patch size (every key a non-base size of ``sizes``)."""
    if not isinstance(thresholds, Mapping):
        raise TypeError(
            f"thresholds must be a dict keyed by patch size such as {{32: 5.5, 64: 4.0}}, got {thresholds!r}"
        )
    out = {}
    for key, value in thresholds.items():
        key = int(key) if isinstance(key, numbers.Integral) and not isinstance(key, bool) else key  # numpy ints too
        if isinstance(key, bool) or not isinstance(key, int) or key not in sizes[1:]:
            raise ValueError(
                f"thresholds key {key!r} is not a non-base patch size of patch_sizes={sizes}; "
                f"keys must be among {sizes[1:]}"
            )
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"thresholds[{key}] must be a number, got {value!r}")
        out[key] = float(value)
    return out


def check_budget(budget) -> Union[int, float]:
    """Validate a token budget: a float fraction of base tokens in (0, 1], or an int count >= 1.

    Returns:
        The budget as a Python int or float (numpy scalars are numbers too).
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a fraction in (0, 1] or an int token count, got {budget!r}")
    budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget as a float is a fraction of base tokens in (0, 1], got {budget}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget as an int is a token count per image and must be >= 1, got {budget}")
    return budget


def _budget_tokens(budget, num_base: int) -> int:
    """Tokens allowed for an image of ``num_base`` base cells."""
    budget = check_budget(budget)
    if isinstance(budget, float):
        return max(1, math.floor(budget * num_base + 1e-9))
    return budget


def check_layout_settings(sizes: Tuple[int, ...], thresholds, budget, scorer, bins: int) -> Optional[Dict[int, float]]:
    """Validate the settings of a layout; return the thresholds to use.

    Returns:
        The checked thresholds, the scorer's defaults when neither thresholds nor budget is given,
        or None in budget mode.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be an int from 2 to {MAX_BINS}, got {bins!r}")
    if thresholds is not None and budget is not None:
        raise ValueError("pass either thresholds= or budget=, not both")
    if isinstance(scorer, str):
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; choose one of {sorted(SCORERS)} or pass a callable")
        if thresholds is None and budget is None:
            thresholds = default_thresholds(sizes, scorer)
    elif callable(scorer):
        if thresholds is None and budget is None:
            raise ValueError("a custom scorer has no default thresholds; pass thresholds= or budget=")
    else:
        raise TypeError(f"scorer must be a name in {sorted(SCORERS)} or a callable, got {scorer!r}")
    if budget is not None:
        check_budget(budget)
    return check_thresholds(thresholds, sizes) if thresholds is not None else None


def select_patches(
    scores: Dict[int, torch.Tensor], thresholds: Dict[int, torch.Tensor], base_size: int, grid: Tuple[int, int]
) -> Dict[int, torch.Tensor]:
    """Greedy quadtree selection, largest size first.

    Args:
        scores: {size: (B, H // size, W // size)} for every size in ``thresholds``.
        thresholds: {size: (B,)} per-image thresholds; a patch merges where score < threshold.
        base_size: p.
        grid: (H / p, W / p).

    Returns:
        {size: (B, H // size, W // size) bool}: the patches taken, base size included.
    """
    first = next(iter(scores.values()))
    b = first.shape[0]
    hc, wc = grid
    covered = torch.zeros(b, hc, wc, dtype=torch.bool, device=first.device)
    picks = {}
    for s in sorted(thresholds, reverse=True):
        k = s // base_size
        h, w = hc // k, wc // k
        free = ~covered[:, : h * k, : w * k].reshape(b, h, k, w, k).any(4).any(2)
        pick = (scores[s] < thresholds[s].view(-1, 1, 1)) & free
        picks[s] = pick
        covered[:, : h * k, : w * k] |= pick.repeat_interleave(k, 1).repeat_interleave(k, 2)
    picks[base_size] = ~covered
    return picks


def _count(picks: Dict[int, torch.Tensor]) -> torch.Tensor:
    return sum(p.flatten(1).sum(1) for p in picks.values())


def budget_thresholds(
    scores: Dict[int, torch.Tensor], base_size: int, grid: Tuple[int, int], max_tokens: torch.Tensor
) -> torch.Tensor:
    """Per image, the smallest shared threshold that leaves at most ``max_tokens`` tokens.

    Args:
        scores: {size: (B, h_s, w_s)} for every non-base size.
        max_tokens: (B,) long, token budget per image (feasible: not below the all-merged count).

    Returns:
        (B,) float thresholds to use for every size (``-inf`` where no merge is needed).
    """
    cand = torch.cat([v.flatten(1) for v in scores.values()], dim=1).sort(dim=1).values  # (B, M)
    b, m = cand.shape
    inf = torch.full((b, 1), math.inf, device=cand.device, dtype=cand.dtype)
    # Threshold for "merge every score <= cand[:, j]"; index -1 (stored at 0) means merge nothing.
    thr_table = torch.cat([-inf, torch.nextafter(cand, inf.expand_as(cand))], dim=1)  # (B, M + 1)
    lo = torch.full((b,), -1, dtype=torch.long, device=cand.device)  # known too many tokens (or sentinel)
    hi = torch.full((b,), m, dtype=torch.long, device=cand.device)  # known within budget
    for _ in range(max(1, math.ceil(math.log2(m + 2)))):
        mid = ((lo + hi) // 2).clamp_(min=0)
        thr = thr_table.gather(1, mid[:, None])[:, 0]
        ok = _count(select_patches(scores, {s: thr for s in scores}, base_size, grid)) <= max_tokens
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return thr_table.gather(1, hi[:, None])[:, 0]


def patch_layout(
    images: Images,
    patch_sizes: Sequence[int] = (16, 32, 64),
    thresholds: Optional[Mapping[int, float]] = None,
    budget: Optional[Union[int, float]] = None,
    scorer: Union[str, Scorer] = "entropy",
    bins: int = 512,
) -> PatchLayout:
    """Cut every image into a mix of patch sizes.

    Args:
        images: (B, C, H, W) or a list of (C, H, W) tensors (sizes may differ); C in {1, 3};
            uint8 in [0, 255] or float in [0, 1]; any device. H and W multiples of the base size.
        patch_sizes: ascending sizes, the base size times powers of two, e.g. (16, 32, 64).
        thresholds: {size: threshold}; a patch of that size merges where its score < threshold.
            A size without a threshold is never used. Mutually exclusive with ``budget``.
        budget: at most this many tokens per image: a float in (0, 1] is a fraction of the base
            tokens, an int a token count. See the module docstring for how sizes are compared.
        scorer: "entropy" (default), "laplacian", "upsample", or a callable
            ``scorer(gray (B, H, W) in [0, 255], sizes, base_size) -> {size: (B, H // size, W // size)}``.
        bins: histogram bins for the entropy scorer (equal width over [0, 255]).

    With neither ``thresholds`` nor ``budget``, the scorer's ``DEFAULT_THRESHOLDS`` are used.

    Returns:
        PatchLayout of the batch, tokens packed image by image in raster order.
    """
    sizes = check_patch_sizes(patch_sizes)
    base = sizes[0]
    fixed = check_layout_settings(sizes, thresholds, budget, scorer, bins)  # before any work
    if isinstance(scorer, str):
        score_fn = functools.partial(SCORERS[scorer], bins=bins) if scorer == "entropy" else SCORERS[scorer]
    else:
        score_fn = scorer
    scored = sorted(fixed) if fixed is not None else list(sizes[1:])

    groups = group_by_size(images)
    for idx, batch in groups:
        check_images(batch, name="images" if isinstance(images, torch.Tensor) else f"images[{idx[0]}]")
    n_images = sum(len(idx) for idx, _ in groups)
    image_sizes: List[Tuple[int, int]] = [(0, 0)] * n_images
    parts = []
    for idx, batch in groups:
        b, _, h, w = batch.shape
        if h % base or w % base:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the base patch size {base}; "
                f"pad it first with aptvit.pad_to_multiple(images, {base}) or resize it"
            )
        for i in idx:
            image_sizes[i] = (h, w)
        grid = (h // base, w // base)
        scores = score_fn(grayscale_255(batch), scored, base) if scored else {}
        _check_scores(scores, scored, b, h, w, batch.device)
        if budget is not None:
            max_tokens = _budget_tokens(budget, grid[0] * grid[1])
            thr = _budget_for_group(scores, base, grid, max_tokens, (h, w))
            per_size = {s: thr for s in scored}
        else:
            dtype = next(iter(scores.values())).dtype if scores else torch.float32
            per_size = {s: _exact_threshold(fixed[s], b, dtype, batch.device) for s in scored}
        picks = select_patches(scores, per_size, base, grid) if scored else {base: torch.ones(b, *grid, dtype=torch.bool, device=batch.device)}
        index = torch.tensor(idx, device=batch.device)
        for s, pick in picks.items():
            bi, row, col = pick.nonzero(as_tuple=True)
            parts.append((index[bi], row * s, col * s, torch.full_like(row, s)))

    device = parts[0][0].device
    image, y, x, size = (torch.cat([p[k].to(device) for p in parts]) for k in range(4))
    max_h = max(h for h, _ in image_sizes)
    max_w = max(w for _, w in image_sizes)
    order = torch.argsort((image * max_h + y) * max_w + x)
    counts = torch.bincount(image, minlength=n_images)
    cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return from_boxes(sizes, tuple(image_sizes), y[order], x[order], size[order], cu)


def _budget_for_group(scores, base, grid, max_tokens: int, image_size) -> torch.Tensor:
    b = next(iter(scores.values())).shape[0] if scores else 1
    device = next(iter(scores.values())).device if scores else None
    everything = {s: torch.full((b,), math.inf, device=device) for s in scores}
    min_tokens = int(_count(select_patches(scores, everything, base, grid)).max()) if scores else grid[0] * grid[1]
    if max_tokens < min_tokens:
        raise ValueError(
            f"budget of {max_tokens} tokens is below the {min_tokens} tokens that the largest patch sizes "
            f"allow for a {image_size[0]}x{image_size[1]} image; raise budget or add larger patch_sizes"
        )
    if not scores:
        return torch.full((b,), -math.inf)
    limit = torch.full((b,), max_tokens, dtype=torch.long, device=device)
    return budget_thresholds(scores, base, grid, limit)


def _exact_threshold(value: float, b: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(B,) threshold in the scores' dtype such that ``score < it`` iff ``score < value`` exactly.

    Rounding a float64 threshold to float32 to nearest could make a score equal to the rounded
    value merge or not merge by accident; rounding towards +inf keeps the strict comparison exact.
    """
    t = torch.tensor(value, dtype=dtype)
    if float(t) < value:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return t.to(device).expand(b)


def _check_scores(scores, sizes, b, h, w, device) -> None:
    for s in sizes:
        got = scores.get(s) if isinstance(scores, Mapping) else None
        want = (b, h // s, w // s)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else got
            raise ValueError(f"scorer returned {shape} for patch size {s}; expected a tensor of shape {want}")
        if not got.is_floating_point() or got.device != torch.device(device):
            raise ValueError(f"scorer must return floating point scores on {device}, got {got.dtype} on {got.device} for patch size {s}")
        if bool(torch.isnan(got).any()):
            raise ValueError(f"scorer returned NaN scores for patch size {s}")
