"""Self-attention over packed variable-length sequences, with interchangeable backends.

Every backend computes the same thing: softmax(q k^T * scale + key_bias) v inside each sequence, never across
sequences. The linear layers around attention run on the packed (T, D) tensor; only this step
needs to know where sequences start and end. ``key_bias`` (optional, (N,), one value per key) is added to every
logit of that key: area-proportional attention adds log(cells a token covers), so a token that stands for four
base patches gets as much attention as those four would (ToMe's proportional attention).

Backends:
    "loop"    SDPA once per sequence, on views of the packed tensor (fastest on CPU: no padding,
              and the per-image call overhead is small next to the matmuls).
    "pad"     pad to the longest sequence, mask the padded keys, one batched SDPA (any device).
    "flash"   flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, package installed).
    "varlen"  torch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, no dropout; gradients only in
              the torch versions that register its backward).
    "flex"    torch's ``flex_attention`` with a block-diagonal (document) mask, compiled: CUDA, any dtype
              (the fp32 backend on CUDA), trains, no dropout. (It runs eagerly on the CPU without
              gradients, which the tests use to check its values.)
    "auto"    the fastest available: "loop" on CPU; on CUDA "flash", then "varlen" (half precision), then
              "flex", then "pad" (``AUTO_ORDER``).

``BACKENDS`` is the registry: each name carries its kernel and its availability check (device, dtype, dropout,
gradients); ``register_backend`` adds one. The backend is a runtime choice of a model, never saved with it.

Every backend reads what it needs from the planned batch (``core.packed.PackedBatch``): the device offsets,
the host offsets ("loop"), the padded-row index ("pad"), the sequence id of each token ("flex"); none reads a
value from the device.

How each adds ``key_bias``: "loop" and "pad" as SDPA's additive float mask ("pad": with -inf on the padded keys),
"flex" as a score modifier, "flash" and "varlen" (whose kernels take no bias) exactly through extra head
dimensions (``key_bias_columns``).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packed import pad_rows
from ..core.packing import seq_index

AUTO_ORDER = {"cuda": ("flash", "varlen", "flex", "pad")}  # what "auto" tries per device type, fastest first
AUTO_DEFAULT = "loop"  # "auto" on any other device


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _find_torch_varlen() -> dict:
    """What torch's ``varlen_attn`` offers: present, a ``scale`` argument (not in torch 2.9), a backward (not in
    the first versions)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # registers its ops too
    except ImportError:
        return {"varlen": False, "varlen_scale": False, "varlen_backward": False}
    try:
        backward = hasattr(torch.ops.torch_attn, "_varlen_attn_backward")
    except RuntimeError:  # no such op namespace in this build
        backward = False
    return {
        "varlen": True,
        "varlen_scale": "scale" in inspect.signature(varlen_attn).parameters,
        "varlen_backward": backward,
    }


def _find_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# What this environment offers, found once at import: the availability checks run inside the forward, and
# torch.compile(fullgraph=True) traces constants where an import or ``inspect`` would break the graph.
_FOUND = {
    "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    "flex": _find_flex(),
    **_find_torch_varlen(),
}


def _has_flash_attn() -> bool:
    return _FOUND["flash_attn"]


def _has_torch_varlen() -> bool:
    return _FOUND["varlen"]


def _varlen_takes_scale() -> bool:
    """torch 2.9's ``varlen_attn`` has no ``scale`` argument; later versions do."""
    return _FOUND["varlen_scale"]


def _varlen_has_backward() -> bool:
    """Whether this torch registers a backward for ``varlen_attn`` (the first versions had none)."""
    return _FOUND["varlen_backward"]


def _has_flex() -> bool:
    return _FOUND["flex"]


@dataclass(frozen=True)
class Backend:
    """An attention backend: its kernel and where it can run.

    Attributes:
        run: ``run(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias) -> out``,
            with the arguments of ``varlen_attention`` (``key_bias`` last, None for no bias).
        available: ``available(device, dtype, dropout, grad) -> bool``: whether it runs there (``dropout``:
            attention dropout is on, i.e. training with ``attn_drop > 0``; ``grad``: a backward will follow).
    """

    run: Callable[..., torch.Tensor]
    available: Callable[[torch.device, torch.dtype, bool, bool], bool]


BACKENDS: Dict[str, Backend] = {}


def register_backend(
    name: str, run: Callable[..., torch.Tensor], available: Callable, overwrite: bool = False
) -> Backend:
    """Make an attention kernel selectable by name (``convert(..., attention=name)``, ``--attention``)."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in BACKENDS and not overwrite:
        raise ValueError(f"attention backend {name!r} is already registered; pass overwrite=True to replace it")
    BACKENDS[name] = Backend(run, available)
    return BACKENDS[name]


def backend_choices() -> Tuple[str, ...]:
    """Every name ``attention=`` accepts: "auto" and the registered backends."""
    return ("auto", *BACKENDS)


def available_backends(
    device: torch.device, dtype: torch.dtype, dropout: bool = False, grad: bool = False
) -> List[str]:
    """Backends that can run on ``device`` with ``dtype`` (``dropout``: attention dropout is on; ``grad``: a
    backward will follow)."""
    return [name for name, b in BACKENDS.items() if b.available(torch.device(device), dtype, dropout, grad)]


def check_backend(name: str) -> str:
    if name not in backend_choices():
        raise ValueError(f"unknown attention backend {name!r}; choose one of {backend_choices()}")
    return name


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype, dropout: bool = False, grad: bool = False
) -> str:
    """The concrete backend for ``name`` ("auto" picks), or a ValueError if it cannot run here."""
    check_backend(name)
    ok = available_backends(device, dtype, dropout, grad)
    if name == "auto":
        for candidate in AUTO_ORDER.get(torch.device(device).type, (AUTO_DEFAULT,)):
            if candidate in ok:
                return candidate
        return AUTO_DEFAULT
    if name not in ok:
        needs = (" and attention dropout" if dropout else "") + (" with gradients" if grad else "")
        raise ValueError(
            f"attention backend {name!r} cannot run on {device} with {dtype}{needs}; available here: {ok} "
            "(attention 'auto', or --attention auto, picks one)"
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
    pad_index: Optional[torch.Tensor] = None,
    seq: Optional[torch.Tensor] = None,
    key_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention inside each packed sequence: softmax(q k^T * scale + key_bias[key]) v.

    Args:
        q, k, v: (N, H, hd) packed queries, keys, values.
        cu_seqlens: (S+1,) int32 sequence offsets.
        max_seqlen: longest sequence (or a static upper bound).
        backend: a concrete backend ("loop", "pad", "flash", "varlen", "flex"); see ``resolve_backend``.
        dropout_p: attention dropout probability (training only).
        scale: softmax scale, default hd ** -0.5.
        offsets: ``cu_seqlens`` as Python ints ("loop"; read from the device when missing).
        pad_index: (N,) row of every token in the padded (S, max_seqlen) layout ("pad"; derived when missing).
        seq: (N,) sequence of every token ("flex"; derived when missing).
        key_bias: (N,) float added to the logits of every key (``PackedBatch.key_bias``: log of its area); None
            for plain attention.

    Returns:
        (N, H, hd).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {tuple(BACKENDS)}")
    if key_bias is not None and tuple(key_bias.shape) != (q.shape[0],):
        raise ValueError(f"key_bias must have one value per token, shape ({q.shape[0]},), got {tuple(key_bias.shape)}")
    return BACKENDS[backend].run(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias)


def _loop_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    """SDPA once per sequence, on views of the packed tensor (``key_bias`` as an additive float mask)."""
    bounds = offsets if offsets is not None else cu_seqlens.tolist()
    bias = key_bias.to(q.dtype) if key_bias is not None else None  # SDPA wants a float mask in the query's dtype
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[lo:hi].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, hd)
        mask = bias[lo:hi].view(1, 1, 1, hi - lo) if bias is not None else None
        outs.append(
            F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=dropout_p, scale=scale)[0].transpose(
                0, 1
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs)


BIAS_COLUMNS = 2  # a bias value split into a high and a low half-precision part: ~16 mantissa bits instead of 8


def bias_head_dim(head_dim: int, multiple: int = 8) -> int:
    """The head size ``key_bias_columns`` pads to: ``head_dim`` plus the bias columns, up to a multiple of 8 (the
    granularity of the flash kernels' head sizes)."""
    return -(-(head_dim + BIAS_COLUMNS) // multiple) * multiple


def key_bias_columns(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, scale: float, multiple: int = 8
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A per-key logit bias for kernels that take none, exactly, through extra head dimensions.

    With q' = [q, 1, 1, 0...] and k' = [k, hi, lo, 0...], where hi + lo = key_bias / scale (hi: the bias rounded to
    the tensors' dtype, lo: the rounding error, rounded again), every logit becomes
    scale * q'.k' = scale * q.k + key_bias[key]. The kernels multiply in half precision and accumulate in float32,
    so the products with 1 are exact and the sum's only error is that of splitting the bias in two: about
    2**-17 of the bias in bf16 (one column alone would be off by 2**-9, 5e-3 of a logit for a 4x patch), 2**-23
    in fp16. v gets zeros (kernels that need one head size for q, k and v); slice the output to ``head_dim``.

    Args:
        q, k, v: (N, H, hd) in the kernel's dtype.
        key_bias: (N,) float.
        scale: the softmax scale the kernel will apply (pass it to the kernel).
        multiple: pad the head size to a multiple of this.

    Returns:
        q', k', v': (N, H, ``bias_head_dim(hd)``).
    """
    n, heads, hd = q.shape
    extra = bias_head_dim(hd, multiple) - hd
    target = key_bias.float() / scale
    hi = target.to(k.dtype)
    lo = (target - hi.float()).to(k.dtype)
    zeros = q.new_zeros(n, heads, extra - BIAS_COLUMNS)
    ones = q.new_ones(n, heads, BIAS_COLUMNS)
    cols = torch.stack([hi, lo], 1)[:, None].expand(n, heads, BIAS_COLUMNS)
    return (
        torch.cat([q, ones, zeros], -1),
        torch.cat([k, cols, zeros.to(k.dtype)], -1),
        torch.cat([v, v.new_zeros(n, heads, extra)], -1),
    )


def _as_autocast_half(q, k, v):
    """Half-precision kernels: under autocast q/k may come out of a float32 LayerNorm (qk_norm)."""
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else v.dtype
    return (t.to(half) for t in (q, k, v))


MAX_KERNEL_HEAD_DIM = 256  # the largest head size of the flash kernels


def _with_bias_columns(q, k, v, key_bias, scale, name):
    """q', k', v' with ``key_bias`` in extra head dimensions, and the scale to pass (the original head size's)."""
    hd = q.shape[-1]
    scale = hd**-0.5 if scale is None else scale  # the padded head size would change the kernel's default
    if bias_head_dim(hd) > MAX_KERNEL_HEAD_DIM:
        raise ValueError(
            f"the {name!r} backend adds key_bias through {BIAS_COLUMNS} extra head dimensions, and head size {hd} "
            f"leaves no room under its limit of {MAX_KERNEL_HEAD_DIM}; use attention 'flex' or 'pad'"
        )
    return (*key_bias_columns(q, k, v, key_bias, scale), scale)


def _flash_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    from flash_attn import flash_attn_varlen_func

    q, k, v = _as_autocast_half(q, k, v)
    hd = v.shape[-1]
    if key_bias is not None:
        q, k, v, scale = _with_bias_columns(q, k, v, key_bias, scale, "flash")
    cu = cu_seqlens.to(torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, softmax_scale=scale)
    return out[..., :hd]


def _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p:
        raise ValueError("the 'varlen' backend has no attention dropout; use 'flash' or 'pad' when training")
    q, k, v = _as_autocast_half(q, k, v)
    hd, fixed = v.shape[-1], not _varlen_takes_scale()  # fixed: its scale is the given head size ** -0.5
    if key_bias is not None:
        if fixed:  # fold our scale into q; the bias columns are then built for the padded head size's scale
            q = q * ((hd**-0.5 if scale is None else scale) * bias_head_dim(hd) ** 0.5)
            scale = bias_head_dim(hd) ** -0.5
        q, k, v, scale = _with_bias_columns(q, k, v, key_bias, scale, "varlen")
    elif fixed and scale is not None:  # fold ours into q
        q = q * (scale * hd**0.5)
    cu = cu_seqlens.to(torch.int32)
    out = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **({} if fixed else {"scale": scale}))
    return out[..., :hd]


def _pad_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
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
        mask = q.new_full((rows,), float("-inf")).index_copy_(0, pad_index, key_bias.to(q.dtype))
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=mask.view(s, 1, 1, max_seqlen), dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2).reshape(rows, heads, hd).index_select(0, pad_index)


_COMPILED_FLEX = None


def _flex_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    """flex_attention with a block-diagonal mask: token i sees token j iff they belong to the same sequence;
    ``key_bias`` is a score modifier (in the kernel's float32 scores)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[0]
    if seq is None:
        seq = seq_index(cu_seqlens, n)

    def same_sequence(b, h, q_idx, kv_idx):
        return seq[q_idx] == seq[kv_idx]

    mask = create_block_mask(same_sequence, None, None, n, n, device=q.device)
    fn = flex_attention
    if q.device.type == "cuda":  # eager flex_attention materialises the scores; compiled, it is a fused kernel
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
        fn = _COMPILED_FLEX
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, N, hd)
    if v.dtype != q.dtype or k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    score_mod = None
    if key_bias is not None:
        bias = key_bias.float()

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[kv_idx]

    return fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale)[0].transpose(0, 1)


def _varlen_available(device, dtype, dropout, grad) -> bool:
    if not (_cuda(device) and _half(dtype) and not dropout and _has_torch_varlen()):
        return False
    return not grad or _varlen_has_backward()


register_backend("loop", _loop_attention, lambda device, dtype, dropout, grad: True)
register_backend("pad", _pad_attention, lambda device, dtype, dropout, grad: True)
register_backend(
    "flash", _flash_attention, lambda device, dtype, dropout, grad: _cuda(device) and _half(dtype) and _has_flash_attn()
)
register_backend("varlen", _torch_varlen_attention, _varlen_available)
# no flex backward on the CPU, and the CPU has faster backends anyway
register_backend(
    "flex", _flex_attention, lambda device, dtype, dropout, grad: _cuda(device) and not dropout and _has_flex()
)


def packed_self_attention(
    attn: nn.Module,
    x: torch.Tensor,
    packed,
    backend: str,
    pad_index: Optional[torch.Tensor] = None,
    key_bias: Optional[torch.Tensor] = None,
    rotate: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> torch.Tensor:
    """Run a timm ``Attention`` module on packed tokens, using its own layers and settings.

    The projections, q/k norms, output norm, gate and dropouts are the module's own; only the
    softmax(q k^T) v step is replaced by ``varlen_attention``.

    Args:
        attn: timm ``Attention``.
        x: (N, D) packed tokens.
        packed: the batch's ``PackedBatch`` (offsets, indices).
        backend: a concrete backend.
        pad_index: ``core.packed.pad_rows`` of the batch, for the "pad" backend (computed once per forward).
        key_bias: (N,) logit bias of every key (``packed.key_bias`` for area-proportional attention), or None.
        rotate: ``rotate(q, k) -> (q, k)`` on (N, H, hd) tensors, applied after the q/k norms and before the
            kernel: rotary positions (a RoPE family's per-token tables, ``nn.families.base``), on every backend.

    Returns:
        (N, D).
    """
    t = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).view(t, 3, attn.num_heads, attn.head_dim).unbind(1)  # (N, H, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rotate is not None:
        q, k = rotate(q, k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = varlen_attention(
        q,
        k,
        v,
        packed.cu_seqlens,
        packed.max_seqlen,
        backend,
        dropout_p,
        attn.scale,
        offsets=packed.offsets,
        pad_index=pad_index,
        seq=packed.seq,
        key_bias=key_bias,
    )
    out = out.reshape(t, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
