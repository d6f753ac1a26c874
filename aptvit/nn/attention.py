"""Self-attention over packed variable-length sequences, with interchangeable backends.

Every backend computes the same thing: softmax(q k^T * scale) v inside each sequence, never across
sequences. The linear layers around attention run on the packed (T, D) tensor; only this step
needs to know where sequences start and end.

Backends:
    "loop"    SDPA once per sequence, on views of the packed tensor (fastest on CPU: no padding,
              and the per-image call overhead is small next to the matmuls).
    "pad"     pad to the longest sequence, mask the padded keys, one batched SDPA (any device).
    "flash"   flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, package installed).
    "varlen"  torch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, no dropout).
    "auto"    the fastest available: "loop" on CPU; "flash", then "varlen", then "pad" on CUDA.
"""
from __future__ import annotations

import importlib.util
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import pad_packed, unpad

BACKENDS = ("auto", "loop", "pad", "flash", "varlen")


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device, dtype: torch.dtype, dropout: bool = False) -> List[str]:
    """Backends that can run on ``device`` with ``dtype`` (``dropout``: attention dropout is on)."""
    out = ["loop", "pad"]
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _has_flash_attn():
            out.append("flash")
        if _has_torch_varlen() and not dropout:
            out.append("varlen")
    return out


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    return name


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, dropout: bool = False) -> str:
    """The concrete backend for ``name`` ("auto" picks), or a ValueError if it cannot run here."""
    check_backend(name)
    ok = available_backends(device, dtype, dropout)
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "loop"
        for candidate in ("flash", "varlen", "pad"):
            if candidate in ok:
                return candidate
    if name not in ok:
        raise ValueError(
            f"attention backend {name!r} cannot run on {device} with {dtype}"
            f"{' and attention dropout' if dropout else ''}; available here: {ok} (apt.configure(attention='auto') picks one)"
        )
    return name


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str = "loop",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    offsets: Optional[List[int]] = None,
) -> torch.Tensor:
    """Attention inside each packed sequence.

    Args:
        q, k, v: (T, H, hd) packed queries, keys, values.
        cu_seqlens: (B+1,) int32 sequence offsets.
        max_seqlen: longest sequence.
        backend: a concrete backend ("loop", "pad", "flash", "varlen"); see ``resolve_backend``.
        dropout_p: attention dropout probability (training only).
        scale: softmax scale, default hd ** -0.5.
        offsets: ``cu_seqlens`` as a Python list, to spare the "loop" backend a device sync per layer.

    Returns:
        (T, H, hd).
    """
    if backend == "loop":
        bounds = offsets if offsets is not None else cu_seqlens.tolist()
        outs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            qi, ki, vi = (t[lo:hi].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, hd)
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p, scale=scale)[0].transpose(0, 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    if backend == "pad":
        (qp, valid), kp, vp = pad_packed(q, cu_seqlens, max_seqlen), pad_packed(k, cu_seqlens, max_seqlen)[0], pad_packed(v, cu_seqlens, max_seqlen)[0]
        mask = valid[:, None, None, :]  # (B, 1, 1, L): padded keys get no weight
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
        return unpad(out.transpose(1, 2), cu_seqlens)
    if backend in ("flash", "varlen"):
        # half-precision kernels: under autocast q/k may come out of a float32 LayerNorm (qk_norm)
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else v.dtype
        q, k, v = (t.to(half) for t in (q, k, v))
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, softmax_scale=scale)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        if dropout_p:
            raise ValueError("the 'varlen' backend has no attention dropout; use 'flash' or 'pad' when training")
        cu = cu_seqlens.to(torch.int32)
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS[1:]}")


def packed_self_attention(
    attn: nn.Module,
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str,
    offsets: Optional[List[int]] = None,
) -> torch.Tensor:
    """Run a timm ``Attention`` module on packed tokens, using its own layers and settings.

    The projections, q/k norms, output norm, gate and dropouts are the module's own; only the
    softmax(q k^T) v step is replaced by ``varlen_attention``.

    Args:
        attn: timm ``Attention``.
        x: (T, D) packed tokens.

    Returns:
        (T, D).
    """
    t = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).view(t, 3, attn.num_heads, attn.head_dim).unbind(1)  # (T, H, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend, dropout_p, attn.scale, offsets)
    out = out.reshape(t, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
