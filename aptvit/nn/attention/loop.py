"""``loop``: SDPA once per sequence, on views of the packed tensor (the CPU's backend: no padding, and the per-image
call overhead is small next to the matmuls). The key bias is SDPA's additive float mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, as_dtype


def loop_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    """SDPA once per sequence, on views of the packed tensor (``key_bias`` as an additive float mask)."""
    bounds = offsets if offsets is not None else cu_seqlens.tolist()
    bias = as_dtype(key_bias, q.dtype) if key_bias is not None else None  # SDPA wants a float mask in q's dtype
    # (H, N, hd) once, then per sequence a slice (none for a single one): few ops, since at batch 1 the host's
    # work per op is what a thin model's time is made of
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    whole = len(bounds) == 2 and bounds[0] == 0 and bounds[1] == q.shape[1]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (q, k, v) if whole else (t[:, lo:hi] for t in (q, k, v))  # (H, n, hd)
        mask = (bias if whole else bias[lo:hi]).view(1, 1, hi - lo) if bias is not None else None
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=dropout_p, scale=scale))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)).transpose(0, 1)


class LoopBackend(Backend):
    """Any device, any dtype, dropout and gradients; reads the plan's host offsets."""

    reads_host_offsets = True
    sdpa_mask = True

    def run(self, *args, **kwargs):
        self.note_kernel("scaled_dot_product_attention (per sequence)")
        return loop_attention(*args, **kwargs)
