"""``pad``: the sequences padded to the longest, the padded keys masked, one batched SDPA (any device; CUDA's fp32
inference backend). Its per-forward context is the padded row of every packed token; the key bias is SDPA's
additive float mask, with -inf on the padded keys."""

from __future__ import annotations

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


class PadBackend(Backend):
    """Any device, any dtype, dropout and gradients; the device offsets only (CUDA graphs, static plans)."""

    sdpa_mask = True

    def run(self, *args, **kwargs):
        self.note_kernel("scaled_dot_product_attention (padded, masked)")
        return pad_attention(*args, **kwargs)

    def context(self, packed, key_bias, dtype) -> AttentionContext:
        ctx = super().context(packed, key_bias, dtype)
        return AttentionContext(self, packed, ctx.key_bias, pad_rows(packed.seq, packed.cu_seqlens, packed.max_seqlen))

    def attend(self, q, k, v, ctx: AttentionContext, dropout_p, scale):
        p = ctx.packed
        return self.run(
            q, k, v, p.cu_seqlens, p.max_seqlen, dropout_p, scale, p.offsets, ctx.state, p.seq, ctx.key_bias
        )
