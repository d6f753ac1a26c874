"""timm attention modules run on packed tokens: their own layers, the softmax(q k^T) v step through a backend."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionContext, as_dtype


def skip_noop(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, except that a module that does nothing is not called at all: a ``nn.Dropout`` in eval mode or
    with p = 0 (it would still dispatch an op) and a ``nn.Identity`` (a Python call; timm's blocks hold six, e.g.
    q/k norms and layer scales switched off). At batch 1 a thin model's time is its host's work per op and per call.
    A module with forward hooks is always called, so that the hooks run."""
    kind = type(module)
    if kind is not nn.Identity and not (kind is nn.Dropout and not (module.training and module.p > 0)):
        return module(x)
    return module(x) if module._forward_hooks or module._forward_pre_hooks else x


def one_sequence(ctx: AttentionContext) -> bool:
    """Attention over the plan is one plain SDPA call: a single sequence spans every packed row (batch 1 without
    padding; read from host ints, so a captured plan keeps its control flow: ``CUDAGraphRunner`` keys its graphs by
    ``num_seqs``) and the backend is SDPA with a float mask (``Backend.sdpa_mask``), so it needs no mask but the key
    bias, and no slicing.

    Then ``packed_self_attention`` runs timm's own shapes ((1, H, N, hd), the same ops as timm's ``Attention``),
    the same math as the backend on one sequence.
    """
    offsets = ctx.packed.offsets
    return ctx.backend.sdpa_mask and offsets is not None and len(offsets) == 2


def _one_sequence_attention(attn: nn.Module, x: torch.Tensor, ctx: AttentionContext):
    """``packed_self_attention`` of a single sequence (``one_sequence``): timm's ``Attention.forward`` on (1, N, D)."""
    t, key_bias = x.shape[0], ctx.key_bias
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(1, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (1, H, N, hd) each
    q, k = skip_noop(attn.q_norm, q), skip_noop(attn.k_norm, k)
    mask = as_dtype(key_bias, q.dtype).view(1, 1, 1, t) if key_bias is not None else None  # one bias row per key
    ctx.backend.note_kernel("scaled_dot_product_attention (one sequence)")
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=attn.scale)
    out = out.transpose(1, 2).reshape(t, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    out = skip_noop(norm, out) if norm is not None else out
    if gate is not None:
        out = out * gate
    return skip_noop(attn.proj_drop, attn.proj(out))


def packed_self_attention(
    attn: nn.Module,
    x: torch.Tensor,
    ctx: AttentionContext,
    rotate: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> torch.Tensor:
    """Run a timm ``Attention`` module on packed tokens, using its own layers and settings.

    The projections, q/k norms, output norm, gate and dropouts are the module's own; only the softmax(q k^T) v
    step is the backend's (``ctx.backend.attend``).

    Args:
        attn: timm ``Attention``.
        x: (N, D) packed tokens.
        ctx: the forward's ``AttentionContext`` (``Backend.context``: the plan, the key bias, the backend's state).
        rotate: ``rotate(q, k) -> (q, k)`` on (N, H, hd) tensors, applied after the q/k norms and before the
            kernel: rotary positions (a RoPE family's per-token tables, ``nn.families.base``), on every backend.

    Returns:
        (N, D).
    """
    if rotate is None and one_sequence(ctx):  # batch 1: timm's own shapes, no mask, no slicing
        return _one_sequence_attention(attn, x, ctx)
    t = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).view(t, 3, attn.num_heads, attn.head_dim).unbind(1)  # (N, H, hd) each
    q, k = skip_noop(attn.q_norm, q), skip_noop(attn.k_norm, k)
    if rotate is not None:
        q, k = rotate(q, k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = ctx.backend.attend(q, k, v, ctx, dropout_p, attn.scale)
    out = out.reshape(t, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    out = skip_noop(norm, out) if norm is not None else out
    if gate is not None:
        out = out * gate
    return skip_noop(attn.proj_drop, attn.proj(out))
