"""``flash``: flash-attn's ``flash_attn_varlen_func`` on the packed sequences (CUDA sm80+, fp16/bf16, the package
importable). It takes no bias: the key bias goes in through extra head dimensions (``bias_columns``)."""

from __future__ import annotations

import torch

from . import environment as env
from .base import Backend
from .bias_columns import as_autocast_half, with_bias_columns


def flash_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    from flash_attn import flash_attn_varlen_func

    q, k, v = as_autocast_half(q, k, v)
    hd = v.shape[-1]
    if key_bias is not None:
        q, k, v, scale = with_bias_columns(q, k, v, key_bias, scale, "flash")
    cu = cu_seqlens.to(torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, softmax_scale=scale)
    return out[..., :hd]


class FlashBackend(Backend):
    """CUDA sm80+, fp16/bf16, flash-attn importable; dropout and gradients."""

    def run(self, *args, **kwargs):
        self.note_kernel("flash_attn.flash_attn_varlen_func")
        return flash_attention(*args, **kwargs)

    def available(self, device, dtype, dropout=False, grad=False) -> bool:
        return env.cuda(device) and env.half(dtype) and env.has_flash_attn() and env.has_sm80(device)
