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
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .io import InputError
from .layout import PatchLayout, to_device
from .pixels import size_groups

Groups = Tuple[Tuple[Tuple[int, ...], Tuple[int, int]], ...]  # ((image indices), (H, W)) per same-size group


@dataclass(eq=False)
class PackedBatch:
    """A planned batch: the layout plus the index tensors the model's static forward needs.

    Attributes:
        layout: the patch layout (T patch tokens in packing order).
        groups: per same-size group, the image indices and (H, W); the bank is built group by group.
        num_prefix: P, prefix tokens per image.
        offsets: (B+1 [+1],) Python ints, sequence starts in the packed sequence (incl. prefix and padding);
            None for a static plan (``core.static``), whose offsets live on the device only.
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
        key_bias: (N,) float32, log of the base cells every token covers (log 4 for a 2x patch, 0 for base
            patches, prefix and padding tokens): the attention-logit bias of area-proportional attention
            (``APTConfig.area_bias``), which a merged key gets so that it weighs as much as the cells it replaces.
        pad: dummy tokens at the end (0 unless padded to a bucket).
        static: a static plan (``core.static.plan_static``): k slots per image, shapes from (B, H, W, k) only;
            image i's padding slots are sequence 2i + 1 of their own and its real tokens sequence 2i.
    """

    layout: PatchLayout
    groups: Groups
    num_prefix: int
    offsets: Optional[Tuple[int, ...]]
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
    key_bias: torch.Tensor
    pad: int = 0
    static: bool = False

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


def pos_bank_rows(groups: Groups, patch_sizes: Sequence[int]) -> List[List[int]]:
    """Host plan of the position bank: per group, per patch size, its first row (the grid width is the token
    bank's, ``bank_rows``)."""
    plan, row = [], 0
    for _, (h, w) in groups:
        per_group = []
        for s in patch_sizes:
            per_group.append(row)
            row += (h // s) * (w // s)
        plan.append(per_group)
    return plan


def pos_bank_size(groups: Groups, patch_sizes: Sequence[int]) -> int:
    """Rows of the position bank without its final zero row."""
    return sum((h // s) * (w // s) for _, (h, w) in groups for s in patch_sizes)


class BankEntry(NamedTuple):
    """Where one (group, patch size) lives in the banks: the host table ``plan_packed`` looks tokens up in."""

    start: int  # first row in the token bank
    per_image: int  # rows per image, (H // s) * (W // s)
    cols: int  # grid width, W // s (of the token bank and of the position bank alike)
    pos_start: int  # first row in the position bank (no image dimension: positions are shared)


class Row(NamedTuple):
    """The named columns of every packed row (a patch token, a prefix token or a padding token).

    ``plan_packed`` fills them per kind of row and scatters them into place in one ``index_copy``.
    """

    token_src: object  # bank row
    pos_src: object  # position-bank row (the zero row for prefix and padding)
    seq: object  # attention sequence
    pool_seq: object  # pooling row: the image, or the dump row for tokens left out
    area: object  # pooling weight before normalisation: base cells covered (1 for a pooled prefix token)


class HostTable:
    """Named lists of host ints, sent to the device in one copy (``to``), then read back by name."""

    def __init__(self) -> None:
        self.parts: Dict[str, List[int]] = {}

    def add(self, name: str, values) -> None:
        self.parts[name] = list(values)

    def add_rows(self, name: str, rows: Sequence[NamedTuple]) -> None:
        """Rows of a NamedTuple, flattened in the order of its fields (``to`` gives them back as (n, fields))."""
        self.parts[name] = [v for r in rows for v in r]

    def to(self, device) -> Dict[str, torch.Tensor]:
        flat = [v for part in self.parts.values() for v in part]
        tensors = to_device(flat, torch.long, device).split([len(p) for p in self.parts.values()])
        return dict(zip(self.parts, tensors))


def bank_entries(groups: Groups, patch_sizes: Sequence[int]) -> List[BankEntry]:
    """``BankEntry`` of every (group, patch size), group-major, sizes ascending (index ``g * len(sizes) + level``)."""
    return [
        BankEntry(*e, q)
        for pg, qg in zip(bank_rows(groups, patch_sizes), pos_bank_rows(groups, patch_sizes))
        for e, q in zip(pg, qg)
    ]


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
    in one copy (a ``HostTable``); the per-token work is a few elementwise ops and one scatter on the layout's
    device. In steps: the sequences' offsets (``_sequences``), the host tables (``_host_tables``), the patch
    tokens' rows (``_patch_rows``), every row in packed order (``_packed_rows``).

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
    seqs = _sequences(layout, num_prefix, pad_to, max_seqlen)
    dev = _host_tables(layout, groups, seqs, num_prefix, pool_prefix).to(layout.cu_seqlens.device)
    patch_pos, patch_rows = _patch_rows(layout, groups, num_prefix, dev)
    rows = _packed_rows(layout.batch_size, patch_pos, patch_rows, dev)
    # the cells a patch covers, k * k, as a logit bias; prefix and padding tokens (area 0 or 1) stand for one token:
    # log 1 = 0
    key_bias = rows.area.clamp(min=1).float().log_()
    return PackedBatch(
        layout=layout,
        groups=groups,
        num_prefix=num_prefix,
        offsets=seqs.offsets,
        max_seqlen=seqs.longest,
        num_seqs=seqs.num_seqs,
        cu_seqlens=dev["cu_seqlens"].to(torch.int32),
        seq=rows.seq,
        token_src=rows.token_src,
        pos_src=rows.pos_src,
        patch_pos=patch_pos,
        prefix_pos=dev["prefix_pos"].view(layout.batch_size, num_prefix),
        pool_weight=rows.area / dev["cells"][rows.pool_seq],
        pool_seq=rows.pool_seq,
        key_bias=key_bias,
        pad=seqs.pad,
    )


class _Sequences(NamedTuple):
    """The packed sequences of a plan, as host ints."""

    offsets: Tuple[int, ...]  # sequence starts (prefix tokens included), then the padding's sequence when padded
    layout_offsets: Tuple[int, ...]  # the layout's offsets (patch tokens only)
    n_real: int  # rows of real tokens (patches and prefix tokens)
    pad: int  # padding rows after them
    num_seqs: int
    longest: int  # max_seqlen: the longest sequence, or the static bound asked for


def _sequences(layout: PatchLayout, num_prefix: int, pad_to: int, max_seqlen: Optional[int]) -> _Sequences:
    b, t = layout.batch_size, layout.total_tokens
    offsets = layout_offsets(layout)
    n_real = t + b * num_prefix
    pad = (-n_real) % pad_to if pad_to else 0
    n, num_seqs = n_real + pad, b + (1 if pad else 0)
    seq_offsets = tuple(o + i * num_prefix for i, o in enumerate(offsets)) + ((n,) if pad else ())
    longest = max((seq_offsets[i + 1] - seq_offsets[i] for i in range(num_seqs)), default=0)
    if max_seqlen is not None:
        if max_seqlen < longest:
            raise InputError(f"max_seqlen {max_seqlen} is below the longest sequence {longest}")
        longest = max_seqlen
    return _Sequences(seq_offsets, offsets, n_real, pad, num_seqs, longest)


def _host_tables(
    layout: PatchLayout, groups: Groups, seqs: _Sequences, num_prefix: int, pool_prefix: bool
) -> "HostTable":
    """Every table of host ints the plan looks up: the bank entries, each image's pooled cells, the prefix and
    padding rows and their packed positions, the offsets, each image's token count (one copy to the device)."""
    sizes = layout.patch_sizes
    p, b, P = sizes[0], layout.batch_size, num_prefix
    n_sizes, m, pos_zero = len(sizes), bank_size(groups, sizes), pos_bank_size(groups, sizes)
    level_of = [0] * (sizes[-1] // p + 1)  # scale factor -> index of its size
    for lv, s in enumerate(sizes):
        level_of[s // p] = lv
    group_key, local = [0] * b, [0] * b  # per image: its group's first entry in the bank table; index in group
    cells = [1] * (seqs.num_seqs + 1)  # pooled weight per image: its base cells (+ prefix tokens), for normalising
    for g, (idx, (h, w)) in enumerate(groups):
        for j, i in enumerate(idx):
            group_key[i], local[i], cells[i] = g * n_sizes, j, (h // p) * (w // p) + (P if pool_prefix else 0)
    dump = seqs.num_seqs  # the pooling row of tokens that are not pooled
    prefix_rows = [
        Row(token_src=m + j, pos_src=pos_zero, seq=i, pool_seq=i if pool_prefix else dump, area=int(pool_prefix))
        for i in range(b)
        for j in range(P)
    ]
    pad_rows_ = [Row(token_src=0, pos_src=pos_zero, seq=b, pool_seq=dump, area=0)] * seqs.pad
    offsets = seqs.layout_offsets
    host = HostTable()
    host.add("level_of", level_of)
    host.add_rows("bank", bank_entries(groups, sizes))
    host.add("cells", cells)
    host.add("prefix_pos", [seqs.offsets[i] + j for i in range(b) for j in range(P)])
    host.add_rows("prefix_rows", prefix_rows)
    host.add_rows("pad_rows", pad_rows_)
    host.add("pad_pos", list(range(seqs.n_real, seqs.n_real + seqs.pad)))
    host.add("cu_seqlens", list(seqs.offsets))
    host.add("counts", [offsets[i + 1] - offsets[i] for i in range(b)])
    if len(groups) > 1:
        host.add("group_key", group_key)
        host.add("local", local)
    return host


def _patch_rows(layout: PatchLayout, groups: Groups, num_prefix: int, dev: Dict[str, torch.Tensor]):
    """(patch_pos (T,), ``Row`` of every patch token): its image, packed position and bank rows (a lookup in the
    bank table)."""
    device, P, b, t = layout.cu_seqlens.device, num_prefix, layout.batch_size, layout.total_tokens
    p, one_group = layout.patch_sizes[0], len(groups) == 1
    img = torch.repeat_interleave(dev["counts"], output_size=t)
    # token j of image i sits after i + 1 images' prefix tokens: j + (i + 1) * P (fresh tensors: updated in place)
    patch_pos = torch.arange(P, t + P, dtype=torch.long, device=device)
    patch_pos = patch_pos.add_(img, alpha=P) if P and b > 1 else patch_pos
    k = layout.size // p
    key = dev["level_of"][k] if one_group else dev["group_key"][img] + dev["level_of"][k]
    e = BankEntry(*dev["bank"].view(-1, len(BankEntry._fields))[key].unbind(1))
    # the patch's cell on its size's grid, row-major: the token and the position grids of a size have the same width
    cell = (layout.y // layout.size).mul_(e.cols).add_(layout.x // layout.size)
    local_img = img if one_group else dev["local"][img]
    rows = Row(
        token_src=(local_img * e.per_image).add_(e.start).add_(cell) if b > 1 else e.start + cell,
        pos_src=e.pos_start + cell,
        seq=img,
        pool_seq=img,
        area=k * k,
    )
    return patch_pos, rows


def _packed_rows(b: int, patch_pos: torch.Tensor, patch_rows: Row, dev: Dict[str, torch.Tensor]) -> Row:
    """Every packed row at once, by name: patch, prefix and padding rows scattered into packed order."""
    width = len(Row._fields)
    patch_table, prefix_table, pad_table = (
        torch.stack(list(patch_rows), 1),
        dev["prefix_rows"].view(-1, width),
        dev["pad_rows"].view(-1, width),
    )
    if b == 1:  # already in packed order: prefix tokens, patches, padding (three ops fewer at batch 1)
        return Row(*torch.cat([prefix_table, patch_table, pad_table]).unbind(1))
    # each image's prefix tokens in front of its patches
    dest = torch.cat([patch_pos, dev["prefix_pos"], dev["pad_pos"]])
    table = torch.cat([patch_table, prefix_table, pad_table])
    return Row(*torch.empty_like(table).index_copy_(0, dest, table).unbind(1))


def pad_rows(seq: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """(N,) row of every packed token in a padded (S, max_seqlen) layout: sequence * max_seqlen + position."""
    position = torch.arange(seq.shape[0], device=seq.device) - cu_seqlens.to(torch.long)[seq]
    return seq * max_seqlen + position


def groups_of(images) -> Groups:
    """Same-size groups of a (B, C, H, W) tensor (one group) or a list of (C, H, W) tensors, by shape.

    Only shapes are read: no tensor values, no device access (``pixels.size_groups`` validates and groups).
    """
    groups = size_groups(images)
    if isinstance(images, torch.Tensor):
        return ((tuple(groups[0]), (int(images.shape[-2]), int(images.shape[-1]))),)
    return tuple((tuple(idx), (int(images[idx[0]].shape[-2]), int(images[idx[0]].shape[-1]))) for idx in groups)


def bucket(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(n / multiple) * multiple)
