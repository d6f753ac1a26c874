"""``PackedBatch``: everything about a batch whose shape depends on its data, planned once before the forward.

The model's tensor math (``APTViT.forward_packed``) then has static control flow: it only gathers, scatters
and multiplies with the index tensors planned here, so a GPU never waits for the host inside it, and the math
can be compiled (``torch.compile``), captured (CUDA graphs, with the token count padded to a bucket) or exported.

The packed sequence holds, image after image, ``[prefix tokens (P), patch tokens (N_i)]``, then optionally
``pad`` dummy tokens that form one more sequence of their own (no real token attends to them, and they are
left out of every output). Its N = T + B * P + pad rows are built in one gather from a *bank*: the embedding
of every patch of every size, computed densely per size (see ``nn.embed.AdaptivePatchEmbed.bank``):

    bank rows, per group of same-size images g, per patch size s (ascending):
        b_g images x (H_g // s) x (W_g // s) cells, row-major, image-major
    then the P prefix rows (class / register tokens with their positions)

and the position embeddings from a matching *position bank* (per group and size, no image dimension; one zero
row at the end for prefix and padding tokens).

Planning uses only host integers (image sizes, the layout's ``offsets``) and shape-static tensor ops, so it
runs without a device sync on the layout's device; on the CPU (data-loader workers) it costs microseconds, and
``PackedBatch.to(device, non_blocking=True)`` moves the result in one go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import List, Optional, Sequence, Tuple

import torch

from .layout import PatchLayout, to_device

Groups = Tuple[Tuple[Tuple[int, ...], Tuple[int, int]], ...]  # ((image indices), (H, W)) per same-size group


@dataclass(eq=False)
class PackedBatch:
    """A planned batch: the layout plus the index tensors the model's static forward needs.

    Attributes:
        layout: the patch layout (T patch tokens in packing order).
        groups: per same-size group, the image indices and (H, W); the bank is built group by group.
        num_prefix: P, prefix tokens per image.
        offsets: (B+1 [+1],) Python ints, sequence starts in the packed sequence (incl. prefix and padding).
        max_seqlen: longest sequence (Python int; an upper bound when padded for graphs).
        num_seqs: B, or B + 1 when padding tokens form their own sequence.
        cu_seqlens: (num_seqs + 1,) int32, ``offsets`` on the device.
        seq: (N,) long, sequence of every packed token (B for padding).
        token_src: (N,) long, bank row of every packed token.
        pos_src: (N,) long, position-bank row (the last, zero, row for prefix and padding tokens).
        patch_pos: (T,) long, packed position of every patch token of the layout.
        prefix_pos: (B, P) long, packed positions of every image's prefix tokens.
        pool_weight: (N,) float32, average-pooling weight (area for patches, 1 for pooled prefix tokens),
            normalised to sum to 1 per image; 0 for tokens left out.
        pool_seq: (N,) long, image of every pooled token; ``num_seqs`` (a dump row) for tokens left out.
        pad: dummy tokens at the end (0 unless padded to a bucket).
    """

    layout: PatchLayout
    groups: Groups
    num_prefix: int
    offsets: Tuple[int, ...]
    max_seqlen: int
    num_seqs: int
    cu_seqlens: torch.Tensor
    seq: torch.Tensor
    token_src: torch.Tensor
    pos_src: torch.Tensor
    patch_pos: torch.Tensor
    prefix_pos: torch.Tensor
    pool_weight: torch.Tensor
    pool_seq: torch.Tensor
    pad: int = 0

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    @property
    def total(self) -> int:
        """N: rows of the packed sequence (patches, prefix tokens, padding)."""
        return int(self.seq.shape[0])

    @property
    def device(self) -> torch.device:
        return self.seq.device

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """The same plan on ``device`` (pinned, asynchronous copies with ``non_blocking`` from the CPU to CUDA)."""
        device = torch.device(device)

        def move(t):
            if isinstance(t, torch.Tensor):
                if non_blocking and device.type == "cuda" and t.device.type == "cpu" and torch.cuda.is_available():
                    t = t.pin_memory()
                return t.to(device, non_blocking=non_blocking)
            if isinstance(t, PatchLayout):
                return t.to(device, non_blocking=non_blocking)
            return t

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def pin_memory(self) -> "PackedBatch":
        """The same plan in page-locked host memory (``DataLoader(pin_memory=True)`` calls this; without it the
        loader hands the plan back unpinned and every "non-blocking" copy to the GPU blocks). Needs an accelerator."""

        def pin(t):
            return t.pin_memory() if isinstance(t, (torch.Tensor, PatchLayout)) else t

        return replace(self, **{f.name: pin(getattr(self, f.name)) for f in fields(self)})


def layout_offsets(layout: PatchLayout) -> Tuple[int, ...]:
    """The layout's sequence offsets as Python ints (its host copy; a device read only for old layouts)."""
    offsets = getattr(layout, "offsets", None)
    return tuple(offsets) if offsets is not None else tuple(layout.cu_seqlens.tolist())


def bank_rows(groups: Groups, patch_sizes: Sequence[int]) -> List[List[Tuple[int, int, int]]]:
    """Host plan of the bank: per group, per patch size, (first row, rows per image, grid width).

    Returns:
        ``plan[g][level]`` for every group and every patch size (ascending), plus the total row count as
        ``plan[-1][0][0]`` is not used: see ``bank_size``.
    """
    plan, row = [], 0
    for idx, (h, w) in groups:
        per_group = []
        for s in patch_sizes:
            rows_per_image, cols = (h // s) * (w // s), w // s
            per_group.append((row, rows_per_image, cols))
            row += len(idx) * rows_per_image
        plan.append(per_group)
    return plan


def bank_size(groups: Groups, patch_sizes: Sequence[int]) -> int:
    """Rows of the token bank (without the prefix rows)."""
    return sum(len(idx) * (h // s) * (w // s) for idx, (h, w) in groups for s in patch_sizes)


def pos_bank_rows(groups: Groups, patch_sizes: Sequence[int]) -> List[List[Tuple[int, int]]]:
    """Host plan of the position bank: per group, per patch size, (first row, grid width)."""
    plan, row = [], 0
    for _, (h, w) in groups:
        per_group = []
        for s in patch_sizes:
            per_group.append((row, w // s))
            row += (h // s) * (w // s)
        plan.append(per_group)
    return plan


def pos_bank_size(groups: Groups, patch_sizes: Sequence[int]) -> int:
    """Rows of the position bank without its final zero row."""
    return sum((h // s) * (w // s) for _, (h, w) in groups for s in patch_sizes)


def plan_packed(
    layout: PatchLayout,
    groups: Groups,
    num_prefix: int,
    pool_prefix: bool = False,
    pad_to: int = 0,
    max_seqlen: Optional[int] = None,
) -> PackedBatch:
    """Plan the packed sequence of ``layout`` for a ViT with ``num_prefix`` prefix tokens.

    Everything that depends only on host integers (image sizes, offsets) is computed on the host and moved
    in one copy; the per-token work is a few elementwise ops and one scatter on the layout's device.

    Args:
        layout: the patch layout (on any device; the plan is built there without device syncs).
        groups: per same-size group of the input images: (image indices, (H, W)).
        num_prefix: P.
        pool_prefix: prefix tokens take part in average pooling (timm's ``pool_include_prefix``).
        pad_to: pad the packed sequence with dummy tokens (a sequence of their own) up to a multiple of this
            (CUDA-graph buckets); 0 for none.
        max_seqlen: a static upper bound to report instead of the real longest sequence (graph buckets).

    Returns:
        PackedBatch on the layout's device.
    """
    device = layout.cu_seqlens.device
    sizes = layout.patch_sizes
    p, b, t, P = sizes[0], layout.batch_size, layout.total_tokens, num_prefix
    offsets = layout_offsets(layout)
    n_real = t + b * P
    pad = (-n_real) % pad_to if pad_to else 0
    n, num_seqs = n_real + pad, b + (1 if pad else 0)
    seq_offsets = tuple(o + i * P for i, o in enumerate(offsets)) + ((n,) if pad else ())
    longest = max((seq_offsets[i + 1] - seq_offsets[i] for i in range(num_seqs)), default=0)
    if max_seqlen is not None:
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen {max_seqlen} is below the longest sequence {longest}")
        longest = max_seqlen

    # ---- host tables, one copy to the device
    plan, pos_plan = bank_rows(groups, sizes), pos_bank_rows(groups, sizes)
    n_sizes, m, pos_zero = len(sizes), bank_size(groups, sizes), pos_bank_size(groups, sizes)
    level_of = [0] * (sizes[-1] // p + 1)  # scale factor -> index of its size
    for lv, s in enumerate(sizes):
        level_of[s // p] = lv
    group_key, local = [0] * b, [0] * b  # per image: its group's first row in the (group, size) table; index in group
    cells = [1] * (num_seqs + 1)  # pooled weight per image: its base cells (+ prefix tokens), for normalising
    for g, (idx, (h, w)) in enumerate(groups):
        for j, i in enumerate(idx):
            group_key[i], local[i], cells[i] = g * n_sizes, j, (h // p) * (w // p) + (P if pool_prefix else 0)
    table = [v for pg, qg in zip(plan, pos_plan) for e, q in zip(pg, qg) for v in (*e, *q)]  # (G * S, 5)
    prefix_pos = [seq_offsets[i] + j for i in range(b) for j in range(P)]
    dump = num_seqs  # the pooling row of tokens that are not pooled
    prefix_cols = [
        v
        for i in range(b)
        for j in range(P)
        for v in (m + j, pos_zero, i, i if pool_prefix else dump, int(pool_prefix))
    ]
    pad_cols = [v for _ in range(pad) for v in (0, pos_zero, b, dump, 0)]
    counts = [offsets[i + 1] - offsets[i] for i in range(b)]
    one_group = len(groups) == 1
    parts = [
        level_of,
        table,
        cells,
        prefix_pos,
        prefix_cols,
        pad_cols,
        list(range(n_real, n)),
        list(seq_offsets),
        counts,
    ] + ([] if one_group else [group_key, local])
    host = to_device([v for part in parts for v in part], torch.long, device)
    level_of, table, cells, prefix_pos, prefix_cols, pad_cols, pad_pos, cu_seqlens, counts, *per_image = host.split(
        [len(part) for part in parts]
    )

    # ---- per patch token: image, packed position, bank rows (a (group, size) table lookup)
    img = torch.repeat_interleave(counts, output_size=t)
    patch_pos = torch.arange(t, dtype=torch.long, device=device)
    if P:
        patch_pos = patch_pos + (img + 1) * P
    k = layout.size // p
    key = level_of[k] if one_group else per_image[0][img] + level_of[k]
    e0, e1, e2, e3, e4 = table.view(-1, 5)[key].unbind(1)  # bank start, rows per image, cols, pos start, pos cols
    row, col = layout.y // layout.size, layout.x // layout.size
    bank_row = e0 + (img if one_group else per_image[1][img]) * e1 + row * e2 + col
    pos_row = e3 + row * e4 + col

    # ---- every packed row at once: [bank row, position row, sequence, pooling row, pooling weight]
    dest = torch.cat([patch_pos, prefix_pos, pad_pos])
    cols = torch.cat(
        [torch.stack([bank_row, pos_row, img, img, k * k], 1), prefix_cols.view(-1, 5), pad_cols.view(-1, 5)]
    )
    token_src, pos_src, seq, pool_seq, weight = torch.empty_like(cols).index_copy_(0, dest, cols).unbind(1)
    return PackedBatch(
        layout=layout,
        groups=groups,
        num_prefix=P,
        offsets=seq_offsets,
        max_seqlen=longest,
        num_seqs=num_seqs,
        cu_seqlens=cu_seqlens.to(torch.int32),
        seq=seq,
        token_src=token_src,
        pos_src=pos_src,
        patch_pos=patch_pos,
        prefix_pos=prefix_pos.view(b, P),
        pool_weight=weight / cells[pool_seq],
        pool_seq=pool_seq,
        pad=pad,
    )


def plan_for_images(images, layout: PatchLayout, num_prefix: int, pool_prefix: bool = False) -> PackedBatch:
    """``plan_packed`` for a (B, C, H, W) batch or a list of images: what data-loader workers call (picklable)."""
    return plan_packed(layout, groups_of(images), num_prefix, pool_prefix)


def pad_rows(seq: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """(N,) row of every packed token in a padded (S, max_seqlen) layout: sequence * max_seqlen + position."""
    position = torch.arange(seq.shape[0], device=seq.device) - cu_seqlens.to(torch.long)[seq]
    return seq * max_seqlen + position


def groups_of(images) -> Groups:
    """Same-size groups of a (B, C, H, W) tensor (one group) or a list of (C, H, W) tensors, by shape.

    Only shapes are read: no tensor values, no device access.
    """
    if isinstance(images, torch.Tensor):
        return ((tuple(range(images.shape[0])), (int(images.shape[-2]), int(images.shape[-1]))),)
    found = {}
    for i, im in enumerate(images):
        found.setdefault((int(im.shape[-2]), int(im.shape[-1])), []).append(i)
    return tuple((tuple(idx), hw) for hw, idx in found.items())


def bucket(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(n / multiple) * multiple)
