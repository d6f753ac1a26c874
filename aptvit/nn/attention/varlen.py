"""``varlen``: torch's flash kernel on packed sequences (CUDA sm80+, fp16/bf16, no dropout).

Inference calls ``aten._flash_attention_forward`` directly: ``varlen_attn`` would route sequences longer than 128
through cuDNN on sm90/sm100, whose graph cache is keyed by the total token count (a rebuild per batch) and whose
custom op costs ~2x flash's host time. With gradients, ``varlen_attn`` (its backward; only in the torch versions that
register one; torch 2.9 takes no ``scale``: it is folded into q). The key bias goes in through extra head dimensions
(``bias_columns``).
"""

from __future__ import annotations

import torch

from ...core.io import InputError
from . import environment as env
from .base import Backend
from .bias_columns import as_autocast_half, bias_head_dim, with_bias_columns


def torch_varlen_attention(
    q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None, *, note=None
):
    """``note``: called with the name of the kernel this call runs (``VarlenBackend`` passes its ``note_kernel``)."""
    from torch.nn.attention.varlen import varlen_attn

    note = note or (lambda kernel: None)

    if dropout_p:
        raise InputError("the 'varlen' backend has no attention dropout; use 'flash' or 'pad' when training")
    q, k, v = as_autocast_half(q, k, v)
    hd, cu = v.shape[-1], cu_seqlens.to(torch.int32)
    if _direct_flash(q) and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        # inference: the flash kernel itself, never cuDNN (see the module docstring), no custom-op overhead
        if key_bias is not None:
            q, k, v, scale = with_bias_columns(q, k, v, key_bias, scale, "varlen")
        note("aten._flash_attention_forward")
        return _aten_flash(q, k, v, cu, max_seqlen, scale)[..., :hd]
    fixed = not env.varlen_takes_scale()  # fixed: its scale is the given head size ** -0.5
    if key_bias is not None:
        if fixed:  # fold our scale into q; the bias columns are then built for the padded head size's scale
            q = q * ((hd**-0.5 if scale is None else scale) * bias_head_dim(hd) ** 0.5)
            scale = bias_head_dim(hd) ** -0.5
        q, k, v, scale = with_bias_columns(q, k, v, key_bias, scale, "varlen")
    elif fixed and scale is not None:  # fold ours into q
        q = q * (scale * hd**0.5)
    note(f"varlen_attn ({_varlen_route(q, k, v, max_seqlen)})")
    out = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **({} if fixed else {"scale": scale}))
    return out[..., :hd]


def _direct_flash(q: torch.Tensor) -> bool:
    """torch's flash kernel can be called directly here (CUDA tensors, the aten op present)."""
    return q.is_cuda and env.FOUND["aten_flash"]


def _aten_flash(q, k, v, cu, max_seqlen, scale):
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, False, False, scale=scale
    )[0]


def _varlen_route(q, k, v, max_seqlen) -> str:
    """Which kernel ``varlen_attn`` picks inside (its private check; "flash or cuDNN" when it cannot be read)."""
    try:
        from torch.nn.attention.varlen import _can_use_cudnn

        return "cuDNN" if _can_use_cudnn(q, k, v, max_seqlen, [-1, -1]) else "flash"
    except Exception:  # noqa: BLE001 -- a private helper of torch: absent or changed in other versions
        return "flash or cuDNN"


class VarlenBackend(Backend):
    """CUDA sm80+, fp16/bf16, no dropout; gradients where this torch registers ``varlen_attn``'s backward."""

    def run(self, *args, **kwargs):
        return torch_varlen_attention(*args, **kwargs, note=self.note_kernel)

    def available(self, device, dtype, dropout=False, grad=False) -> bool:
        if not (
            env.cuda(device) and env.half(dtype) and not dropout and env.has_torch_varlen() and env.has_sm80(device)
        ):
            return False
        return not grad or env.varlen_has_backward()
