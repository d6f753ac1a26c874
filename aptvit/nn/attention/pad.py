"""``pad``: the sequences padded to the longest, the padded keys masked, one batched SDPA (any device; CUDA's fp32
inference backend). Its per-forward context is the padded row of every packed token; the key bias is SDPA's
additive float mask, with -inf on the padded keys.

A static plan (``PackedBatch.static``: image i owns the fixed rows ``i*L : (i+1)*L``, its own sequence first, then
its padding slots) needs no padding and no gathers at all: the packed (N, H, hd) tensor is a view of (B, L, H, hd),
and one SDPA over (B, H, L, hd) attends inside each image with the image's padding-slot keys masked (``FixedRows``).
That is plain fixed-shape tensor math (no index tensors, no per-block mask), so the backend is ``traceable``: an
exporter can take it as it is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ...core.packed import pad_rows
from ...core.packing import seq_index
from .base import AttentionContext, Backend, as_dtype


def pad_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    """One batched SDPA over the sequences padded to ``max_seqlen``; padded keys get no weight (``key_bias``: an
    additive float mask with -inf on the padded keys)."""
    n, heads, hd = q.shape
    s = cu_seqlens.shape[0] - 1
    if pad_index is None:  # a direct call without a plan: derive it (data-dependent, fine off the hot path)
        pad_index = pad_rows(seq_index(cu_seqlens, n), cu_seqlens, max_seqlen)
    rows = s * max_seqlen

    def pad(t):
        return t.new_zeros(rows, heads, hd).index_copy(0, pad_index, t).view(s, max_seqlen, heads, hd).transpose(1, 2)

    if key_bias is None:
        mask = torch.zeros(rows, dtype=torch.bool, device=q.device).index_fill_(0, pad_index, True)
    else:  # SDPA wants a float mask in the query's dtype
        mask = q.new_full((rows,), float("-inf")).index_copy_(0, pad_index, as_dtype(key_bias, q.dtype))
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=mask.view(s, 1, 1, max_seqlen), dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2).reshape(rows, heads, hd).index_select(0, pad_index)


class FixedRows(NamedTuple):
    """The context of a static plan: every image's L rows are one (B, L) block of the packed tensor.

    Attributes:
        rows: L, the rows of one image (prefix + k slots).
        mask: SDPA's mask, (B, 1, 1, L): bool (True where a key may be seen), or float (the key bias, -inf on the
            padding slots) in the query's dtype.
    """

    rows: int
    mask: torch.Tensor


def fixed_rows(packed, key_bias) -> FixedRows:
    """The ``FixedRows`` of a static plan: a key is seen when it is in its image's first sequence (the prefix and
    real tokens come first in every image, the padding slots after them).

    Padding-slot queries then attend to their image's real keys: their rows hold finite values that nothing reads
    (never pooled, covering no cell), so the real tokens' outputs are exactly those of one sequence per image.
    """
    length = packed.max_seqlen
    seq = packed.seq.view(-1, length)
    seen = (seq == seq[:, :1]).view(-1, 1, 1, length)  # (B, 1, 1, L)
    if key_bias is None:
        return FixedRows(length, seen)
    return FixedRows(length, key_bias.view(-1, 1, 1, length).masked_fill(~seen, float("-inf")))


def fixed_rows_attention(q, k, v, state: FixedRows, dropout_p, scale):
    """One SDPA over (B, H, L, hd) views of the packed (N, H, hd) q, k, v: (N, H, hd)."""
    n, heads, hd = q.shape

    def per_image(t):
        return t.view(-1, state.rows, heads, hd).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        per_image(q), per_image(k), per_image(v), attn_mask=state.mask, dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2).reshape(n, heads, hd)


class PadBackend(Backend):
    """Any device, any dtype, dropout and gradients; the device offsets only (CUDA graphs, static plans)."""

    sdpa_mask = True
    traceable = True  # a static plan runs as fixed-shape views and one SDPA (``FixedRows``)

    def run(self, *args, **kwargs):
        self.note_kernel("scaled_dot_product_attention (padded, masked)")
        return pad_attention(*args, **kwargs)

    def context(self, packed, key_bias, dtype) -> AttentionContext:
        ctx = super().context(packed, key_bias, dtype)
        if packed.static:
            return AttentionContext(self, packed, ctx.key_bias, fixed_rows(packed, ctx.key_bias))
        return AttentionContext(self, packed, ctx.key_bias, pad_rows(packed.seq, packed.cu_seqlens, packed.max_seqlen))

    def attend(self, q, k, v, ctx: AttentionContext, dropout_p, scale):
        if isinstance(ctx.state, FixedRows):
            self.note_kernel("scaled_dot_product_attention (fixed rows per image)")
            return fixed_rows_attention(q, k, v, ctx.state, dropout_p, scale)
        p = ctx.packed
        return self.run(
            q, k, v, p.cu_seqlens, p.max_seqlen, dropout_p, scale, p.offsets, ctx.state, p.seq, ctx.key_bias
        )
