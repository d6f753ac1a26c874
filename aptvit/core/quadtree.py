"""Choosing patch sizes: the greedy quadtree of APT, a token-budget mode, and ``patch_layout``.

Selection: from the largest size down, a patch of size s is taken where its
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
budget (a merge of size s removes up to (s/p)^2 - 1 tokens). Whether a budget can be met at all is
decided on the host from the image size (``all_merged_tokens``).

On the device: everything runs on the images' device with static shapes (no ``nonzero``, boolean
masks, ``bincount`` or ``.item()``), in a number of kernels that does not depend on the batch size.
The only host read per image size brings back the token counts (cu_seqlens, max_seqlen) together with
the (min, max) of float pixels and a NaN-score flag; bad input is reported right after it, before the
layout is built. The boxes are valid by construction, so the layout skips ``from_boxes``' checks.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .io import InputError, UserTypeError
from .layout import PatchLayout, check_patch_sizes, to_device
from .pixels import (
    check_image_shape,
    check_pixel_range,
    grayscale_255,
    group_by_size,
    host_read_dtype,
    normalised_gray_255,
    pixel_range,
)
from .scoring import SCORERS, Scorer, get_scorer

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


def default_thresholds(patch_sizes: Sequence[int], scorer: str = "entropy") -> Dict[int, float]:
    """The registered scorer's default thresholds for ``patch_sizes``, keyed by size."""
    sizes = check_patch_sizes(patch_sizes)
    table = get_scorer(scorer).thresholds  # keyed by scale factor
    return {s: table.get(s // sizes[0], min(table.values())) for s in sizes[1:]}


def check_thresholds(thresholds: Mapping[int, float], sizes: Tuple[int, ...]) -> Dict[int, float]:
    """Validate thresholds keyed by patch size (every key a non-base size of ``sizes``)."""
    if not isinstance(thresholds, Mapping):
        raise UserTypeError(
            f"thresholds must be a dict keyed by patch size such as {{32: 5.5, 64: 4.0}}, got {thresholds!r}"
        )
    out = {}
    for key, value in thresholds.items():
        key = int(key) if isinstance(key, numbers.Integral) and not isinstance(key, bool) else key  # numpy ints too
        if isinstance(key, bool) or not isinstance(key, int) or key not in sizes[1:]:
            raise InputError(
                f"thresholds key {key!r} is not a non-base patch size of patch_sizes={sizes}; "
                f"keys must be among {sizes[1:]}"
            )
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise InputError(f"thresholds[{key}] must be a number, got {value!r}")
        out[key] = float(value)
    return out


def check_budget(budget) -> Union[int, float]:
    """Validate a token budget: a float fraction of base tokens in (0, 1], or an int count >= 1.

    Returns:
        The budget as a Python int or float (numpy scalars are numbers too).
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise UserTypeError(f"budget must be a fraction in (0, 1] or an int token count, got {budget!r}")
    budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise InputError(f"budget as a float is a fraction of base tokens in (0, 1], got {budget}")
    if isinstance(budget, int) and budget < 1:
        raise InputError(f"budget as an int is a token count per image and must be >= 1, got {budget}")
    return budget


def _budget_tokens(budget, num_base: int) -> int:
    """Tokens allowed for an image of ``num_base`` base cells."""
    budget = check_budget(budget)
    if isinstance(budget, float):
        return max(1, math.floor(budget * num_base + 1e-9))
    return budget


def check_layout_settings(
    sizes: Tuple[int, ...], thresholds, budget, scorer, scorer_args: Optional[Mapping] = None
) -> Tuple[Optional[Dict[int, float]], Dict]:
    """Validate the settings of a layout.

    Returns:
        (thresholds, scorer_args): the checked thresholds (the scorer's defaults when neither thresholds
        nor budget is given, None in budget mode) and the scorer's full parameters (a registered scorer's
        defaults updated with ``scorer_args``; ``scorer_args`` as given for a callable).
    """
    if thresholds is not None and budget is not None:
        raise InputError("pass either thresholds= or budget=, not both")
    if isinstance(scorer, str):
        params = get_scorer(scorer).resolve_params(scorer, scorer_args)
        if thresholds is None and budget is None:
            thresholds = default_thresholds(sizes, scorer)
    elif callable(scorer):
        params = dict(scorer_args or {})
        if thresholds is None and budget is None:
            raise InputError("a custom scorer has no default thresholds; pass thresholds= or budget= (or register it)")
    else:
        raise UserTypeError(f"scorer must be a name in {sorted(SCORERS)} or a callable, got {scorer!r}")
    if budget is not None:
        check_budget(budget)
    return (check_thresholds(thresholds, sizes) if thresholds is not None else None), params


def select_patches(
    scores: Dict[int, torch.Tensor], thresholds: Dict[int, torch.Tensor], base_size: int, grid: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy quadtree selection, largest size first, with static shapes (no host sync).

    Grids of different sizes nest (all anchored at the top-left corner), so a patch of size s is free
    exactly when no larger patch covers its top-left cell, and a free patch is free in every cell.

    Args:
        scores: {size: (B, H // size, W // size)} for every size in ``thresholds``.
        thresholds: {size: (B,)} per-image thresholds; a patch merges where score < threshold.
        base_size: p.
        grid: (H / p, W / p).

    Returns:
        cover (B, H / p, W / p) long, the side in pixels of the patch covering every base cell, and
        counts (B,) long, tokens per image.
    """
    b = next(iter(scores.values())).shape[0]
    device = next(iter(scores.values())).device
    hc, wc = grid
    cover = torch.zeros(b, hc, wc, dtype=torch.long, device=device)  # 0 = not covered yet
    counts = torch.zeros(b, dtype=torch.long, device=device)
    first = True
    for s in sorted(thresholds, reverse=True):
        k = s // base_size
        h, w = hc // k, wc // k
        if h == 0 or w == 0:
            continue
        pick = scores[s] < thresholds[s].view(-1, 1, 1)
        if not first:  # nothing is covered before the first size that fits
            pick &= cover[:, : h * k : k, : w * k : k] == 0
        first = False
        counts += pick.sum((1, 2))
        block = (pick.long() * s)[:, :, None, :, None].expand(b, h, k, w, k).reshape(b, h * k, w * k)
        cover[:, : h * k, : w * k] += block  # free blocks: disjoint from what is covered
    free = cover == 0
    counts += free.sum((1, 2))
    cover += free.long() * base_size
    return cover, counts


def budget_thresholds(
    scores: Dict[int, torch.Tensor], base_size: int, grid: Tuple[int, int], max_tokens: torch.Tensor
) -> torch.Tensor:
    """Per image, the smallest shared threshold that leaves at most ``max_tokens`` tokens.

    The token count of every candidate threshold at once, in a number of ops that depends on neither the
    batch nor the image size: a patch p of area a_p (in base cells) merges at a threshold "score <= c" exactly
    when s_p <= c < m_p, where m_p is the smallest score of the larger patches that contain it (a larger patch
    that merges covers p; one that does not leaves p free, see ``select_patches``). So

        tokens(c) = cells - sum_p (a_p - 1) * ([s_p <= c] - [max(m_p, s_p) <= c]),

    two weighted step functions of c, read off sorted scores with ``searchsorted``. The smallest candidate whose
    count is within budget is the one a binary search over the sorted scores would find (the count is monotone).

    Args:
        scores: {size: (B, h_s, w_s)} for every non-base size, finite or NaN (no +inf: see ``patch_layout``).
        max_tokens: (B,) long, token budget per image (feasible: not below the all-merged count).

    Returns:
        (B,) float thresholds to use for every size (``-inf`` where no merge is needed).
    """
    sizes = sorted(s for s, v in scores.items() if v.shape[1] and v.shape[2])  # the sizes with a patch at all
    first = next(iter(scores.values()))
    b, device, dtype = first.shape[0], first.device, first.dtype
    if not sizes:  # no patch larger than the base fits: nothing can merge
        return torch.full((b,), -math.inf, dtype=dtype, device=device)
    own, above, weight = [], [], []
    parent, parent_size, m = None, 0, None  # the next larger size's scores; per patch, the least score holding it
    for s in reversed(sizes):
        v = scores[s]
        if parent is None:
            m = torch.full_like(v, math.inf)  # the largest size: nothing holds it
        else:
            r = parent_size // s
            lo = torch.minimum(parent.nan_to_num(nan=math.inf), m)  # a NaN patch never merges: it leaves p free
            up = lo.repeat_interleave(r, 1).repeat_interleave(r, 2)
            m = torch.full_like(v, math.inf)  # a patch outside the larger grid has no parent
            m[:, : up.shape[1], : up.shape[2]] = up
        own.append(v.flatten(1))
        above.append(torch.maximum(m, v).flatten(1))  # m_p <= s_p: the interval is empty (NaN s_p: never merges)
        weight.append((s // base_size) ** 2 - 1)
        parent, parent_size = v, s
    w = torch.cat([torch.full((o.shape[1],), x, dtype=torch.long, device=device) for o, x in zip(own, weight)])
    w = w.expand(b, -1)

    def steps(values: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """sum of the weights of ``values`` <= ``at``, per image (NaN sorts last and is never <= anything)."""
        order = values.sort(dim=1)
        cum = torch.cat([w.new_zeros(b, 1), w.gather(1, order.indices).cumsum(1)], 1)
        return cum.gather(1, torch.searchsorted(order.values.contiguous(), at.contiguous(), right=True))

    cand = torch.cat(own, 1).sort(dim=1).values  # (B, M): "merge every score <= cand[:, j]"
    cells = grid[0] * grid[1]
    merged = steps(torch.cat(own, 1), cand) - steps(torch.cat(above, 1), cand)  # base cells saved, (B, M)
    ok = ((cells - merged) <= max_tokens[:, None]) & ~cand.isnan()  # a NaN threshold would merge nothing
    # the first candidate within budget (the count only falls as j grows); none within budget: all of them merge
    idx = torch.where(ok.any(1), ok.long().argmax(1), cand.shape[1] - 1)
    thr = torch.nextafter(cand.gather(1, idx[:, None])[:, 0], torch.full((b,), math.inf, dtype=dtype, device=device))
    none_needed = torch.full((b,), cells, dtype=torch.long, device=device) <= max_tokens
    return torch.where(none_needed, torch.full_like(thr, -math.inf), thr)


def check_budget_reachable(tokens: int, image_size: Tuple[int, int], sizes: Sequence[int]) -> None:
    """Raise InputError when ``tokens`` per image is fewer than ``sizes`` can reach on an (H, W) image (every
    patch that fits merged); with a single patch size nothing merges, and the error says which size to add."""
    fewest = all_merged_tokens(image_size, sizes)
    if tokens >= fewest:
        return
    h, w = image_size
    if min(h, w) < 2 * sizes[0]:
        fix = f"no patch larger than {sizes[0]} fits it, so nothing can merge: raise budget or give a larger image"
    elif len(sizes) == 1:  # e.g. a checkpoint fine-tuned at one size, given a budget
        fix = f"with the one patch size {sizes[0]} nothing merges: add a larger one (patch sizes {sizes[0]},{2 * sizes[0]})"
    else:
        fix = "raise budget or add larger patch_sizes"
    raise InputError(
        f"budget of {tokens} tokens is below the {fewest} tokens that the largest patch sizes allow for a "
        f"{h}x{w} image; {fix}"
    )


def all_merged_tokens(image_size: Tuple[int, int], sizes: Sequence[int]) -> int:
    """Tokens of an image where every patch that fits merges: the fewest that ``sizes`` allow.

    Host arithmetic only. The patches of sizes >= s cover the rectangle (H // s * s) x (W // s * s),
    because the grids nest; so size s adds that rectangle minus the next larger size's.

    Args:
        image_size: (H, W), multiples of ``sizes[0]``.
        sizes: ascending patch sizes, ``sizes[0]`` the base size (always usable).
    """
    h, w = image_size
    tokens, covered = 0, (0, 0)
    for s in sorted(sizes, reverse=True):
        rect = (h // s * s, w // s * s)
        tokens += (rect[0] * rect[1] - covered[0] * covered[1]) // (s * s)
        covered = rect
    return tokens


def patch_layout(
    images: Images,
    patch_sizes: Sequence[int] = (16, 32, 64),
    thresholds: Optional[Mapping[int, float]] = None,
    budget: Optional[Union[int, float]] = None,
    scorer: Union[str, Scorer] = "entropy",
    scorer_args: Optional[Mapping] = None,
    *,
    normalisation: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
) -> PatchLayout:
    """Cut every image into a mix of patch sizes.

    On the images' device, with a fixed number of kernels whatever the batch size and one host read
    per image size (the token counts, together with the validity of float pixels and scores).

    Args:
        images: (B, C, H, W) or a list of (C, H, W) tensors (sizes may differ); C in {1, 3};
            uint8 in [0, 255] or float in [0, 1]; any device. H and W multiples of the base size.
        patch_sizes: ascending sizes, the base size times powers of two, e.g. (16, 32, 64).
        thresholds: {size: threshold}; a patch of that size merges where its score < threshold.
            A size without a threshold is never used. Mutually exclusive with ``budget``.
        budget: at most this many tokens per image: a float in (0, 1] is a fraction of the base
            tokens, an int a token count. See the module docstring for how sizes are compared.
            A score of +inf counts as the least homogeneous but may still merge to meet the budget.
        scorer: a registered name ("entropy" (default), "laplacian", "upsample", see ``scoring.SCORERS``), or a
            callable ``scorer(gray (B, H, W) in [0, 255], sizes, base_size) -> {size: (B, H // size, W // size)}``.
        scorer_args: keyword parameters of the scorer, e.g. ``{"bins": 256}`` for entropy (its histogram bins,
            equal width over [0, 255]); a registered scorer's defaults fill the rest.
        normalisation: (mean, std), each C Python floats: the images are normalised model
            input (float), and the layout is that of the pixels ``(images * std + mean).clamp(0, 1)``, computed
            without a full-size copy of them (``pixels.normalised_gray_255``; what ``APTViT.make_layout`` passes).

    With neither ``thresholds`` nor ``budget``, the registered scorer's default thresholds are used.

    Returns:
        PatchLayout of the batch, tokens packed image by image in raster order.
    """
    sizes, fixed, score_fn, scored, check_nan = _layout_settings(patch_sizes, thresholds, budget, scorer, scorer_args)
    base = sizes[0]

    groups = group_by_size(images)
    names = ["images" if isinstance(images, torch.Tensor) else f"images[{idx[0]}]" for idx, _ in groups]
    for (idx, batch), name in zip(groups, names):  # everything the host can check, before any device work
        check_image_shape(batch, name=name)
        _, _, h, w = batch.shape
        if h % base or w % base:
            raise InputError(
                f"image size {h}x{w} is not a multiple of the base patch size {base}; "
                f"pad it first with aptvit.pad_to_multiple(images, {base}) or resize it"
            )
        if budget is not None:
            check_budget_reachable(_budget_tokens(budget, (h // base) * (w // base)), (h, w), sizes)
    settings = dict(
        sizes=sizes, scored=scored, score_fn=score_fn, fixed=fixed, budget=budget, norm=normalisation, check_nan=check_nan
    )
    parts = [_group_tokens(batch, name, **settings) for (_, batch), name in zip(groups, names)]
    if len(groups) == 1:
        return _layout(sizes, [groups[0][1].shape[-2:]] * len(groups[0][0]), parts[0])
    return _join_groups(sizes, groups, parts)


def _layout_settings(patch_sizes, thresholds, budget, scorer, scorer_args) -> tuple:
    """(sizes, checked thresholds or None, the scorer with its parameters bound, scored sizes, whether its scores need
    a NaN check (a callable, or a registered scorer not marked ``finite``)) of ``patch_layout``'s settings, checked
    on every call (a registered scorer is looked up each call, so that registering a name again takes effect)."""
    spec = SCORERS.get(scorer) if isinstance(scorer, str) else None
    sizes = check_patch_sizes(patch_sizes)
    fixed, params = check_layout_settings(sizes, thresholds, budget, scorer, scorer_args)  # before any work
    score_fn = get_scorer(scorer).fn if isinstance(scorer, str) else scorer
    score_fn = functools.partial(score_fn, **params) if params else score_fn
    scored = tuple(sorted(fixed)) if fixed is not None else sizes[1:]
    return sizes, fixed, score_fn, scored, bool(scored) and not (spec is not None and spec.finite)


class _Tokens(NamedTuple):
    """One same-size group's tokens, packed image by image in raster order (``_group_tokens``)."""

    y: torch.Tensor  # (T,) long
    x: torch.Tensor  # (T,) long
    size: torch.Tensor  # (T,) long
    cu_seqlens: torch.Tensor  # (b+1,) int32
    cells: torch.Tensor  # (b * H/p * W/p,) long, packed index of the token covering each cell
    offsets: Tuple[int, ...]  # cu_seqlens on the host


def _group_tokens(
    batch: torch.Tensor, name: str, sizes, scored, score_fn, fixed, budget, norm, check_nan: bool
) -> _Tokens:
    """The tokens of one same-size batch (b, C, H, W), already shape-checked, with one host read."""
    base = sizes[0]
    b, _, h, w = batch.shape
    grid = (h // base, w // base)
    device = batch.device
    if norm is None:
        lo_hi, scale = pixel_range(batch), 1.0  # checked after the one host read below
        gray = grayscale_255(batch)
    else:  # normalised input: its pixels' gray and the gray's bounds (the pixel range times 255), in one go
        (gray, lo_hi), scale = normalised_gray_255(batch, *norm), 255.0
    if lo_hi is not None:
        gray = torch.nan_to_num_(gray, nan=0.0)  # the scorers never see NaN: bin indices stay in range
    scores = score_fn(gray, list(scored), base) if scored else {}  # a list of its own for each call
    _check_scores(scores, scored, b, h, w, device)
    tables = grid_tables(tuple(sizes), tuple(scored), grid, b, device)
    z = None
    if scored:
        dtype = next(iter(scores.values())).dtype
        if budget is not None:
            # +inf would never pass a threshold and could leave the budget unreachable; the largest finite
            # score sorts last all the same
            scores = {s: v.clamp(max=torch.finfo(dtype).max) for s, v in scores.items()}
        # every scored size's scores side by side, then a NaN column: the column of cells outside a size's grid
        z = torch.cat([scores[s].reshape(b, -1) for s in scored] + [tables.nan_column(b, dtype)], 1)
        if budget is not None:
            limit = torch.full((b,), _budget_tokens(budget, grid[0] * grid[1]), dtype=torch.long, device=device)
            thr = budget_thresholds(scores, base, grid, limit).view(b, 1)
        else:
            thr = tables.thresholds(fixed, b, dtype)
        # a cell is covered by the largest size whose patch over it merges (the grids nest; see select_patches)
        lc = ((z < thr) * tables.code).index_select(1, tables.gather)  # (b, L * C): level * C if it merges, else 0
        lc = lc.view(b, len(scored), -1).amax(1) if len(scored) > 1 else lc
    else:
        lc = torch.zeros((b, grid[0] * grid[1]), dtype=torch.long, device=device)
    key = lc + tables.cell  # (b, C): level * C + cell, the row of every cell in the tables
    anchor = tables.anchor.gather(1, key).view(-1)  # flat (image, cell) of the top-left cell of its patch
    rank = (anchor == tables.flat).cumsum(0)  # a token sits at its top-left cell: 1-based packed index there

    # The one host read: token counts (cumulative, per image), plus the pixel bounds and a NaN-score flag to raise on;
    # ``cat`` promotes the bounds and the flag to the counts' dtype (float64: counts exact to 2**53), no cast of its own
    host = [rank.view(b, -1)[:, -1].to(host_read_dtype(device))]
    if lo_hi is not None:
        host.append(lo_hi)
    if check_nan:
        host.append(z.isnan().sum().view(1))  # b of them are the NaN column
    values = torch.cat(host).tolist() if len(host) > 1 else host[0].tolist()
    if lo_hi is not None:
        check_pixel_range(values[b] / scale, values[b + 1] / scale, name)
    if check_nan and values[-1] > b:
        bad = [s for s, v in scores.items() if bool(v.isnan().any())]  # error path only
        raise InputError(f"scorer returned NaN scores for patch size {bad[0]}")
    offsets = (0, *(int(v) for v in values[:b]))
    cells = rank.index_select(0, anchor).sub_(1)
    # the n-th token is at the first cell where the running count reaches n
    flat = torch.searchsorted(rank, torch.arange(1, offsets[-1] + 1, device=device))
    y, x, size = tables.boxes.index_select(1, key.view(-1).index_select(0, flat)).unbind(0)
    return _Tokens(y, x, size, to_device(offsets, torch.int32, device), cells, offsets)


class GridTables(NamedTuple):
    """Constant index tables of ``_group_tokens`` for one (patch sizes, scored sizes, grid, batch, device).

    Levels are indices into the patch sizes (0 = base); C = cells per image; M = scored patches per image.
    """

    gather: torch.Tensor  # (L * C,): per scored size (in ``scored`` order), per cell, its patch's column, M outside
    code: torch.Tensor  # (M + 1,) long: level * C of every column's size (0 for the NaN column)
    cell: torch.Tensor  # (C,) long: 0 .. C - 1
    anchor: torch.Tensor  # (b, levels * C) long: image * C + the top-left cell of the level's patch over the cell
    flat: torch.Tensor  # (b * C,) long: 0 .. b * C - 1
    boxes: torch.Tensor  # (3, levels * C) long: y, x in pixels of the cell, and the level's patch size
    scored: Tuple[int, ...]  # the scored sizes, in the order of the columns
    columns: Tuple[int, ...]  # scored patches per image, per scored size
    nan: Dict  # {(b, dtype): (b, 1) NaN}, filled on use
    thr: Dict  # {(thresholds, dtype): (M + 1,) thresholds}, filled on use

    def nan_column(self, b: int, dtype: torch.dtype) -> torch.Tensor:
        key = (b, dtype)
        if key not in self.nan:
            self.nan[key] = torch.full((b, 1), math.nan, dtype=dtype, device=self.cell.device)
        return self.nan[key]

    def thresholds(self, fixed: Dict[int, float], b: int, dtype: torch.dtype) -> torch.Tensor:
        """(M + 1,) or (b, M + 1) thresholds of every column, rounded so that ``score < it`` is exact."""
        key = (tuple(fixed.items()), dtype)
        if key in self.thr:
            return self.thr[key]
        device = self.cell.device
        if dtype in _HOST_FLOATS:  # rounded on the host: one copy, kept
            values = [v for s, n in zip(self.scored, self.columns) for v in [_host_threshold(fixed[s], dtype)] * n]
            out = torch.tensor(values + [0.0], dtype=dtype).to(device)
            self.thr[key] = out
            return out
        parts = [
            _exact_threshold(fixed[s], b, dtype, device)[:, None].expand(b, n) for s, n in zip(fixed, self.columns)
        ]
        return torch.cat(parts + [torch.zeros((b, 1), dtype=dtype, device=device)], 1)


def grid_tables(sizes: Tuple[int, ...], scored: Tuple[int, ...], grid: Tuple[int, int], b: int, device) -> GridTables:
    """``GridTables`` for these shapes: host arithmetic and one copy per table."""
    return _build_grid_tables(sizes, scored, grid, b, torch.device(device))


def _build_grid_tables(sizes, scored, grid, b, device) -> GridTables:
    base, (hc, wc) = sizes[0], grid
    c = hc * wc
    r = torch.arange(hc).view(hc, 1).expand(hc, wc).reshape(-1)
    q = torch.arange(wc).view(1, wc).expand(hc, wc).reshape(-1)
    columns, gather, code, start = [], [], [], 0
    for s in scored:
        k = s // base
        h, w = hc // k, wc // k
        inside = (r < h * k) & (q < w * k)
        columns.append(h * w)
        code.append(torch.full((h * w,), sizes.index(s) * c))
        gather.append(torch.where(inside, start + (r // k) * w + q // k, -1))
        start += h * w
    m = start
    gather = torch.cat(gather) if gather else torch.zeros(0, dtype=torch.long)
    gather = torch.where(gather < 0, m, gather)
    code = torch.cat(code + [torch.zeros(1, dtype=torch.long)])
    anchor, boxes = [], []
    for s in sizes:
        k = s // base
        anchor.append((r - r % k) * wc + q - q % k)
        boxes.append(torch.stack([r * base, q * base, torch.full_like(r, s)]))
    anchor = torch.cat(anchor)[None] + torch.arange(b).view(b, 1) * c
    return GridTables(
        gather=gather.to(device),
        code=code.to(device),
        cell=torch.arange(c).to(device),
        anchor=anchor.to(device),
        flat=torch.arange(b * c).to(device),
        boxes=torch.cat(boxes, 1).to(device),
        scored=tuple(scored),
        columns=tuple(columns),
        nan={},
        thr={},
    )


def _layout(sizes, image_sizes, tok: _Tokens) -> PatchLayout:
    """PatchLayout from tokens that are valid by construction (no re-validation, no device sync)."""
    counts = [hi - lo for lo, hi in zip(tok.offsets, tok.offsets[1:])]
    return PatchLayout(
        tuple(sizes),
        tuple((int(h), int(w)) for h, w in image_sizes),
        tok.y,
        tok.x,
        tok.size,
        tok.cu_seqlens,
        tok.cells,
        max(counts),
        tok.offsets,
    )


def _join_groups(sizes, groups, parts: List[_Tokens]) -> PatchLayout:
    """Put the tokens of several same-size groups back into the input order of the images."""
    n = sum(len(idx) for idx, _ in groups)
    where = [None] * n  # image -> (group, position in group)
    for g, (idx, _) in enumerate(groups):
        for j, i in enumerate(idx):
            where[i] = (g, j)
    device = parts[0].y.device
    image_sizes, fields, cells, offsets = [], ([], [], []), [], [0]
    for g, j in where:
        tok, (hh, ww) = parts[g], groups[g][1].shape[-2:]
        lo, hi = tok.offsets[j], tok.offsets[j + 1]
        for out, t in zip(fields, (tok.y, tok.x, tok.size)):
            out.append(t[lo:hi].to(device))
        n_cells = (hh // sizes[0]) * (ww // sizes[0])
        cells.append(tok.cells[j * n_cells : (j + 1) * n_cells].to(device) + (offsets[-1] - lo))
        offsets.append(offsets[-1] + hi - lo)
        image_sizes.append((hh, ww))
    cu = to_device(offsets, torch.int32, device)
    y, x, size = (torch.cat(f) for f in fields)
    return _layout(sizes, image_sizes, _Tokens(y, x, size, cu, torch.cat(cells), tuple(offsets)))


_HOST_FLOATS = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _host_threshold(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded towards +inf to ``dtype`` (one numpy has), so that ``score < it`` iff ``score < value``."""
    host = _HOST_FLOATS[dtype]
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as on the device
        t = host(value)
    if float(t) < value:
        t = np.nextafter(t, host(math.inf))
    return float(t)


def _exact_threshold(value: float, b: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(B,) threshold in the scores' dtype such that ``score < it`` iff ``score < value`` exactly.

    Rounding a float64 threshold to float32 to nearest could make a score equal to the rounded
    value merge or not merge by accident; rounding towards +inf keeps the strict comparison exact.
    Built on the device from the Python value (no copy from the host, no read back): rounded on the host for the
    dtypes numpy has (one op instead of seven), on the device otherwise (bfloat16).
    """
    if dtype in _HOST_FLOATS:
        return torch.full((b,), _host_threshold(value, dtype), dtype=dtype, device=device)  # exact: no rounding
    exact = torch.full((b,), value, dtype=host_read_dtype(device), device=device)
    t = exact.to(dtype)
    return torch.where(t.to(exact.dtype) < exact, torch.nextafter(t, torch.full_like(t, math.inf)), t)


def _check_scores(scores, sizes, b, h, w, device) -> None:
    """Shapes, dtypes and devices of a scorer's output (host checks; NaN is checked with the token counts)."""
    for s in sizes:
        got = scores.get(s) if isinstance(scores, Mapping) else None
        want = (b, h // s, w // s)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else got
            raise InputError(f"scorer returned {shape} for patch size {s}; expected a tensor of shape {want}")
        if not got.is_floating_point() or got.device != torch.device(device):
            raise InputError(
                f"scorer must return floating point scores on {device}, got {got.dtype} on {got.device} for patch size {s}"
            )
