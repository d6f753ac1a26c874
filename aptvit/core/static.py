"""The fully static path: exactly k tokens per image, the layout and the plan built on the device, no host read.

Every shape depends only on (B, H, W, k) and the model's prefix count, never on pixel values, so the whole
forward, layout included, can be captured as one CUDA graph or compiled with ``torch.compile(fullgraph=True)``.

* ``static_layout``: budget mode (``quadtree.budget_thresholds``, the same shared threshold per image and the
  same selection as ``patch_layout(budget=...)``), then packed into exactly ``k`` slots per image. The
  selection lands at most k real tokens (within one merge of it, since a merge removes 3 or 15 tokens at
  once); the slots left over are *padding tokens*: ``size == 0``, ``y == x == 0``, covering no cell. So the
  layout's ``offsets`` are ``(0, k, 2k, ...)`` on the host without reading anything back.
* ``pad_static``: the same padded form of any layout with at most k tokens per image (host work: it reads
  the layout's host offsets), e.g. a layout made in data-loader workers, or a non-static one in tests.
* ``plan_static``: the ``PackedBatch`` of a padded layout. Image i owns the fixed slice ``i*L : (i+1)*L`` of
  the packed sequence (L = P + k): its P prefix tokens, its real tokens, then its padding tokens. The
  sequences are ``2i`` (prefix + real tokens) and ``2i + 1`` (its padding, possibly empty), so no real token
  attends to a padding token, padding is never pooled, and every offset is computed on the device.

Nothing here validates pixel values (that would need a host read): float pixels are clamped to [0, 1] and
NaN reads as 0 for the layout (a NaN image still gives NaN logits in the model).
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Union

import torch

from .io import InputError, UserTypeError
from .layout import PatchLayout, check_patch_sizes
from .packed import Groups, PackedBatch, Row, bank_entries, bank_size, pos_bank_size
from .pixels import check_image_shape, grayscale_255
from .quadtree import (
    _budget_tokens,
    _check_scores,
    budget_thresholds,
    check_budget,
    check_budget_reachable,
    select_patches,
)
from .scoring import Scorer, get_scorer


def static_tokens(budget: Union[int, float], image_size, patch_sizes) -> int:
    """k, the fixed token count per image of a static layout: the budget's tokens, at most the base cells.

    Raises:
        ValueError: when the budget is below what the largest patch sizes allow (as in budget mode).
    """
    sizes = check_patch_sizes(patch_sizes)
    h, w = image_size
    base_cells = (h // sizes[0]) * (w // sizes[0])
    k = min(_budget_tokens(budget, base_cells), base_cells)
    check_budget_reachable(k, (h, w), sizes)
    return k


def static_layout(
    images: torch.Tensor,
    patch_sizes=(16, 32, 64),
    budget: Union[int, float] = 0.5,
    scorer: Union[str, Scorer] = "entropy",
    scorer_args: Optional[Mapping] = None,
) -> PatchLayout:
    """Budget-mode layout with exactly k tokens per image (padding included), computed on the device, no host read.

    Args:
        images: (B, C, H, W), uint8 in [0, 255] or float in [0, 1] (clamped, not checked), C in {1, 3};
            H and W multiples of the base size.
        patch_sizes, budget, scorer, scorer_args: as ``patch_layout`` (a budget is required).

    Returns:
        PatchLayout of B * k tokens, ``cu_seqlens = (0, k, 2k, ...)``; in image i, its real tokens first
        (raster order, the tokens ``patch_layout(budget=budget)`` gives), then padding tokens (``size == 0``).
    """
    sizes = check_patch_sizes(patch_sizes)
    if budget is None:
        raise InputError("a static layout needs a token budget (budget=0.5 or an int count), not thresholds")
    check_budget(budget)
    if not isinstance(images, torch.Tensor):
        raise UserTypeError(
            f"a static layout needs one (B, C, H, W) tensor of same-size images, got {type(images).__name__}; "
            "stack same-size images, or turn static off for a list of different sizes"
        )
    check_image_shape(images)
    base = sizes[0]
    b, _, h, w = images.shape
    if h % base or w % base:
        raise InputError(
            f"image size {h}x{w} is not a multiple of the base patch size {base}; "
            f"pad it first with aptvit.pad_to_multiple(images, {base}) or resize it"
        )
    k = static_tokens(budget, (h, w), sizes)
    if not isinstance(scorer, str):
        params = dict(scorer_args or {})
    elif torch.compiler.is_compiling():  # checked when the settings were made; the JSON check does not trace
        params = {**get_scorer(scorer).params, **dict(scorer_args or {})}
    else:
        params = get_scorer(scorer).resolve_params(scorer, scorer_args)
    score_fn = get_scorer(scorer).fn if isinstance(scorer, str) else scorer
    score_fn = functools.partial(score_fn, **params) if params else score_fn
    grid = (h // base, w // base)
    device = images.device
    if images.is_floating_point():
        images = images.float().nan_to_num(nan=0.0).clamp(0.0, 1.0)  # no range check: that would read back
    gray = grayscale_255(images)
    if len(sizes) > 1:
        scored = list(sizes[1:])
        scores = score_fn(gray, scored, base)
        _check_scores(scores, scored, b, h, w, device)  # shapes, dtypes, devices: host facts
        dtype = next(iter(scores.values())).dtype
        scores = {s: v.clamp(max=torch.finfo(dtype).max) for s, v in scores.items()}  # as budget mode
        limit = torch.full((b,), k, dtype=torch.long, device=device)
        thr = budget_thresholds(scores, base, grid, limit)
        cover, _ = select_patches(scores, {s: thr for s in scored}, base, grid)
    else:
        cover = torch.full((b, *grid), base, dtype=torch.long, device=device)
    return _pack_static(sizes, (h, w), cover, k)


def _pack_static(sizes, image_size, cover: torch.Tensor, k: int) -> PatchLayout:
    """k slots per image from the cover grid (``select_patches``): real tokens in raster order, then padding."""
    base = sizes[0]
    b, hc, wc = cover.shape
    c, device = hc * wc, cover.device
    scale = cover // base
    rows = torch.arange(hc, device=device).view(1, hc, 1)
    cols = torch.arange(wc, device=device).view(1, 1, wc)
    row0, col0 = rows - rows % scale, cols - cols % scale  # top-left cell of the covering patch
    corner = ((row0 == rows) & (col0 == cols)).view(b, c)
    rank = corner.long().cumsum(1)  # (B, C): 1-based index of a corner within its image
    images = torch.arange(b, device=device).view(b, 1)
    cells = rank.gather(1, (row0 * wc + col0).view(b, c)) - 1 + images * k
    # the n-th corner of an image is its first cell where the running count reaches n; past the last: c
    want = torch.arange(1, k + 1, device=device).expand(b, k).contiguous()
    flat = torch.searchsorted(rank, want)  # (B, k) in [0, c]
    real = flat < c
    flat = flat.clamp(max=c - 1)
    size = cover.view(b, c).gather(1, flat) * real
    y, x = flat // wc * base * real, flat % wc * base * real
    cu = (torch.arange(b + 1, device=device) * k).to(torch.int32)
    offsets = tuple(i * k for i in range(b + 1))
    return PatchLayout(
        tuple(sizes), ((image_size[0], image_size[1]),) * b, y.view(-1), x.view(-1), size.view(-1), cu,
        cells.view(-1), k, offsets,
    )  # fmt: skip


def pad_static(layout: PatchLayout, k: int) -> PatchLayout:
    """A layout with at most k tokens per image in the padded form of ``static_layout`` (host offsets, no read).

    Args:
        layout: same-size images, every image at most ``k`` tokens.
        k: slots per image.
    """
    if not layout.same_size:
        raise InputError(f"a static layout needs same-size images, got sizes {sorted(set(layout.image_sizes))}")
    counts = layout.token_counts
    if max(counts) > k:
        raise InputError(f"an image of this layout has {max(counts)} tokens, more than the static k = {k}")
    b, device = layout.batch_size, layout.device
    # destination slot of every token: its rank in its image, after image i's start i * k
    img = layout.image_index
    start = layout.cu_seqlens[:-1].long()
    slot = torch.arange(layout.total_tokens, device=device) - start[img] + img * k

    def place(t: torch.Tensor) -> torch.Tensor:
        return t.new_zeros(b * k).index_copy_(0, slot, t)

    gh, gw = layout.grid_sizes[0]
    cell_img = torch.arange(b, device=device).repeat_interleave(gh * gw)
    cells = layout.cells - start[cell_img] + cell_img * k
    cu = (torch.arange(b + 1, device=device) * k).to(torch.int32)
    return PatchLayout(
        layout.patch_sizes, layout.image_sizes, place(layout.y), place(layout.x), place(layout.size), cu, cells, k,
        tuple(i * k for i in range(b + 1)),
    )  # fmt: skip


def real_tokens(layout: PatchLayout) -> PatchLayout:
    """The layout without its padding tokens (``size == 0``): a plain layout again (host work, reads back)."""
    keep = layout.size > 0
    counts = keep.view(layout.batch_size, -1).sum(1) if layout.same_size else None
    if counts is None:
        raise InputError("real_tokens expects a static layout (same-size images)")
    new_index = keep.long().cumsum(0) - 1
    offsets = [0]
    for c in counts.tolist():
        offsets.append(offsets[-1] + int(c))
    cu = torch.tensor(offsets, dtype=torch.int32, device=layout.device)
    return PatchLayout(
        layout.patch_sizes, layout.image_sizes, layout.y[keep], layout.x[keep], layout.size[keep], cu,
        new_index[layout.cells], max(offsets[i + 1] - offsets[i] for i in range(layout.batch_size)), tuple(offsets),
    )  # fmt: skip


def plan_static(layout: PatchLayout, groups: Groups, num_prefix: int, pool_prefix: bool = False) -> PackedBatch:
    """The ``PackedBatch`` of a static layout (``static_layout`` / ``pad_static``), all on the device, no host read.

    Image i holds rows ``i*L : (i+1)*L`` (L = P + k): prefix, real tokens, padding. Sequences: 2i (prefix and
    real tokens) and 2i + 1 (the padding, empty when the image needs all k). The bank rows are found by
    arithmetic over the few patch sizes (a lookup table would be a host-to-device copy, which a captured graph
    cannot hold).

    Args:
        layout: a static layout: ``cu_seqlens == (0, k, 2k, ...)``, padding tokens of size 0.
        groups: one group (same-size images).
        num_prefix: P.
        pool_prefix: prefix tokens take part in average pooling.

    Returns:
        PackedBatch with ``static=True`` and ``offsets=None`` (the sequence offsets live on the device only).
    """
    _check_static(layout, groups)
    b, k, P, device = layout.batch_size, layout.max_seqlen, num_prefix, layout.device
    seqlen, num_seqs = P + k, 2 * b
    slots, real = _slot_rows(layout, groups, dump=num_seqs)  # (B, k) each
    prefix = _prefix_rows(layout, groups, P, pool_prefix, dump=num_seqs)  # (B, P) each
    rows = Row(*(torch.cat([a.expand(b, P), s.expand(b, k)], 1).reshape(-1) for a, s in zip(prefix, slots)))
    starts = torch.arange(b, device=device) * seqlen  # every image's first row
    h, w = groups[0][1]
    cells = (h // layout.patch_sizes[0]) * (w // layout.patch_sizes[0]) + (P if pool_prefix else 0)
    return PackedBatch(
        layout=layout,
        groups=groups,
        num_prefix=P,
        offsets=None,
        max_seqlen=seqlen,
        num_seqs=num_seqs,
        cu_seqlens=_static_cu_seqlens(starts, P + real.sum(1), seqlen),
        seq=rows.seq,
        token_src=rows.token_src,
        pos_src=rows.pos_src,
        patch_pos=(starts.view(b, 1) + P + torch.arange(k, device=device)).view(-1),
        prefix_pos=starts.view(b, 1) + torch.arange(P, device=device).view(1, P),
        pool_weight=rows.area / cells,
        pool_seq=rows.pool_seq,
        key_bias=torch.cat([torch.zeros(b, P, device=device), slots.area.clamp(min=1).float().log()], 1).view(-1),
        static=True,
    )


def _check_static(layout: PatchLayout, groups: Groups) -> None:
    """``plan_static``'s input: one group of same-size images, k tokens per image (padding included)."""
    if len(groups) != 1:
        raise InputError("a static plan needs one (B, C, H, W) batch of same-size images")
    b, k = layout.batch_size, layout.max_seqlen
    if layout.total_tokens != b * k or tuple(layout.offsets) != tuple(i * k for i in range(b + 1)):
        raise InputError("plan_static needs a static layout (k tokens per image, padding included): see pad_static")


def _slot_rows(layout: PatchLayout, groups: Groups, dump: int):
    """The (B, k) patch slots' ``Row``: bank rows by arithmetic over the sizes, and which slots are real (not padding).

    ``dump``: the pooling segment of rows that do not pool (one past the last sequence).
    """
    sizes, b, k = layout.patch_sizes, layout.batch_size, layout.max_seqlen
    p = sizes[0]
    size = layout.size.view(b, k)
    real = size > 0
    scale = size // p
    here = [scale == s // p for s in sizes]
    entry = None  # per slot, the BankEntry of its size (a where over the few sizes; 0 for padding)
    for lv, e in enumerate(bank_entries(groups, sizes)):
        entry = [torch.where(here[lv], v, 0 if entry is None else old) for v, old in zip(e, entry or e)]
    start, per_image, cols, pos_start = entry
    safe = size.clamp(min=1)
    row, col = layout.y.view(b, k) // safe, layout.x.view(b, k) // safe
    img = torch.arange(b, device=layout.device).view(b, 1)
    slots = Row(
        token_src=(start + img * per_image + row * cols + col) * real,
        pos_src=torch.where(real, pos_start + row * cols + col, pos_bank_size(groups, sizes)),  # as wide a grid
        seq=2 * img + (~real).long(),
        pool_seq=torch.where(real, img, dump),
        area=scale * scale,
    )
    return slots, real


def _prefix_rows(layout: PatchLayout, groups: Groups, P: int, pool_prefix: bool, dump: int) -> Row:
    """The (B, P) prefix rows' ``Row``: the prefix rows after the token bank, the zero position row, sequence 2i."""
    b, device = layout.batch_size, layout.device
    img = torch.arange(b, device=device).view(b, 1)
    j = torch.arange(P, device=device).view(1, P)
    ones = torch.ones(b, P, dtype=torch.long, device=device)
    return Row(
        token_src=(bank_size(groups, layout.patch_sizes) + j) * ones,
        pos_src=ones * pos_bank_size(groups, layout.patch_sizes),
        seq=2 * img * ones,
        pool_seq=(img if pool_prefix else torch.full_like(img, dump)) * ones,
        area=ones * int(pool_prefix),
    )


def _static_cu_seqlens(starts: torch.Tensor, used: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(2B+1,) int32 offsets of sequences 2i (``used`` rows from ``starts[i]``) and 2i + 1 (the rest of the slice)."""
    ends = starts + used
    return torch.cat([starts.new_zeros(1), torch.stack([ends, starts + seqlen], 1).view(-1)]).to(torch.int32)
