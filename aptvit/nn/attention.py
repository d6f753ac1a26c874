"""Self-attention over packed variable-length sequences, with interchangeable backends.

Every backend computes the same thing: softmax(q k^T * scale) v inside each sequence, never across
sequences. The linear layers around attention run on the packed (T, D) tensor; only this step
needs to know where sequences start and end.

Backends:
    "loop"    SDPA once per sequence, on views of the packed tensor (fastest on CPU: no padding,
              and the per-image call overhead is small next to the matmuls).
    "pad"     pad to the longest sequence, mask the padded keys, one batched SDPA (any device).
    "flash"   flash-attn's ``flash_attn_varlen_func`` (CUDA sm80+, fp16/bf16, the package importable).
    "varlen"  torch's flash kernel on packed sequences (CUDA sm80+, fp16/bf16, no dropout). Inference calls
              ``aten._flash_attention_forward`` directly: ``varlen_attn`` would route sequences longer than 128
              through cuDNN on sm90/sm100, whose graph cache is keyed by the total token count (a rebuild per
              batch) and whose custom op costs ~2x flash's host time. With gradients, ``varlen_attn`` (its
              backward; only in the torch versions that register one).
    "flex"    torch's ``flex_attention`` with a block-diagonal (document) mask, compiled: CUDA, any dtype
              (the fp32 training backend on CUDA), no dropout. The ``BlockMask`` is built once per forward from
              the plan (``backend_context``) at the level of 128 x 128 blocks, never as an N x N mask. (It runs
              eagerly on the CPU without gradients, which the tests use to check its values.)
    "auto"    the fastest available: "loop" on CPU; on CUDA "flash", then "varlen" (half precision), then
              "flex", then "pad" (``AUTO_ORDER``), except fp32 inference, which prefers "pad" (``resolve_backend``).

``BACKENDS`` is the registry: each name carries its kernel and its availability check (device, dtype, dropout,
gradients); ``register_backend`` adds one. The backend is a runtime choice of a model, never saved with it.

Every backend reads what it needs from the planned batch (``core.packed.PackedBatch``): the device offsets,
the host offsets ("loop"), the padded-row index ("pad"), the sequence id of each token ("flex"); none reads a
value from the device.
"""

from __future__ import annotations

import functools
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


def _find_flash_attn() -> bool:
    """flash-attn importable, not merely installed: a wheel built for another torch or CUDA is found by
    ``find_spec`` and then fails at import (undefined symbols), so only a real import counts."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # noqa: BLE001 -- ImportError, OSError or RuntimeError from a broken build: unavailable
        return False
    return True


def _find_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# What this environment offers, found once at import: the availability checks run inside the forward, and
# torch.compile(fullgraph=True) traces constants where an import or ``inspect`` would break the graph.
_FOUND = {
    "flash_attn": _find_flash_attn(),
    "flex": _find_flex(),
    "aten_flash": hasattr(torch.ops.aten, "_flash_attention_forward"),
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


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _has_sm80(device) -> bool:
    """Compute capability 8.0 or above (Ampere+), which the flash kernels need; read once per device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0)


# the kernel each backend last ran ({backend: kernel}), for benchmarks; written outside compiled code only
KERNELS: Dict[str, str] = {}


def _record(backend: str, kernel: str) -> None:
    if not torch.compiler.is_compiling():
        KERNELS[backend] = kernel


@dataclass(frozen=True)
class Backend:
    """An attention backend: its kernel and where it can run.

    Attributes:
        run: ``run(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq) -> out``, with the
            arguments of ``varlen_attention``.
        available: ``available(device, dtype, dropout, grad) -> bool``: whether it runs there (``dropout``:
            attention dropout is on, i.e. training with ``attn_drop > 0``; ``grad``: a backward will follow).
        reads_host_offsets: the kernel reads ``offsets`` (Python ints) rather than device tensors, so a captured
            CUDA graph would freeze the first batch's sequence boundaries (``CUDAGraphRunner`` refuses it).
    """

    run: Callable[..., torch.Tensor]
    available: Callable[[torch.device, torch.dtype, bool, bool], bool]
    reads_host_offsets: bool = False


BACKENDS: Dict[str, Backend] = {}


def register_backend(
    name: str,
    run: Callable[..., torch.Tensor],
    available: Callable,
    overwrite: bool = False,
    reads_host_offsets: bool = False,
) -> Backend:
    """Make an attention kernel selectable by name (``convert(..., attention=name)``, ``--attention``).

    ``reads_host_offsets``: the kernel uses the host offsets (see ``Backend``), so CUDA graphs cannot hold it.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in BACKENDS and not overwrite:
        raise ValueError(f"attention backend {name!r} is already registered; pass overwrite=True to replace it")
    BACKENDS[name] = Backend(run, available, reads_host_offsets)
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
        order = AUTO_ORDER.get(torch.device(device).type, (AUTO_DEFAULT,))
        if torch.device(device).type == "cuda" and not grad and not _half(dtype):
            # fp32 inference: "pad" is SDPA's memory-efficient kernel on the padded batch, nothing to compile;
            # flex would compile (seconds on each new shape class) and run its fp32 Triton kernel, with a block
            # mask built per forward, to save only the padding (at most the spread of token counts in a batch)
            order = ("pad",) + tuple(c for c in order if c != "pad")
        for candidate in order:
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
) -> torch.Tensor:
    """Attention inside each packed sequence.

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

    Returns:
        (N, H, hd).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {tuple(BACKENDS)}")
    return BACKENDS[backend].run(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq)


def _loop_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq):
    """SDPA once per sequence, on views of the packed tensor."""
    bounds = offsets if offsets is not None else cu_seqlens.tolist()
    _record("loop", "scaled_dot_product_attention (per sequence)")
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[lo:hi].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, hd)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p, scale=scale)[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _as_autocast_half(q, k, v):
    """Half-precision kernels: under autocast q/k may come out of a float32 LayerNorm (qk_norm)."""
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else v.dtype
    return (t.to(half) for t in (q, k, v))


def _flash_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq):
    from flash_attn import flash_attn_varlen_func

    q, k, v = _as_autocast_half(q, k, v)
    cu = cu_seqlens.to(torch.int32)
    _record("flash", "flash_attn.flash_attn_varlen_func")
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, softmax_scale=scale)


def _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq):
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p:
        raise ValueError("the 'varlen' backend has no attention dropout; use 'flash' or 'pad' when training")
    q, k, v = _as_autocast_half(q, k, v)
    cu = cu_seqlens.to(torch.int32)
    if _direct_flash(q) and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        # inference: the flash kernel itself, never cuDNN (see the module docstring), no custom-op overhead
        _record("varlen", "aten._flash_attention_forward")
        return _aten_flash(q, k, v, cu, max_seqlen, scale)
    _record("varlen", f"varlen_attn ({_varlen_route(q, k, v, max_seqlen)})")
    if _varlen_takes_scale():
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)
    if scale is not None:  # its fixed scale is head_dim ** -0.5: fold ours into q
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)


def _direct_flash(q: torch.Tensor) -> bool:
    """torch's flash kernel can be called directly here (CUDA tensors, the aten op present)."""
    return q.is_cuda and _FOUND["aten_flash"]


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


def _pad_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq):
    """One batched SDPA over the sequences padded to ``max_seqlen``; padded keys get no weight."""
    n, heads, hd = q.shape
    s = cu_seqlens.shape[0] - 1
    if pad_index is None:  # a direct call without a plan: derive it (data-dependent, fine off the hot path)
        pad_index = pad_rows(seq_index(cu_seqlens, n), cu_seqlens, max_seqlen)
    rows = s * max_seqlen

    def pad(t):
        return t.new_zeros(rows, heads, hd).index_copy(0, pad_index, t).view(s, max_seqlen, heads, hd).transpose(1, 2)

    valid = torch.zeros(rows, dtype=torch.bool, device=q.device).index_fill_(0, pad_index, True)
    _record("pad", "scaled_dot_product_attention (padded, masked)")
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=valid.view(s, 1, 1, max_seqlen), dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2).reshape(rows, heads, hd).index_select(0, pad_index)


_COMPILED_FLEX = None
FLEX_BLOCK = 128  # flex_attention's default sparse block size


def flex_block_mask(seq: torch.Tensor, block: int = FLEX_BLOCK):
    """The block-diagonal ``BlockMask`` of a packed batch, from its (N,) nondecreasing sequence ids.

    Built at the level of ``block`` x ``block`` tiles (a (N / block)^2 table, not the N x N mask that
    ``create_block_mask`` evaluates in eager mode: 1.4 GB for N = 37k), with static shapes and no host read:
    a tile is skipped when its query and key tiles share no sequence, *full* (no mask evaluated) when both lie
    inside one sequence, and partial otherwise (the mask ``seq[q] == seq[kv]`` decides per element).
    """
    from torch.nn.attention.flex_attention import BlockMask

    n = seq.shape[0]
    nb = -(-n // block)
    padded = torch.cat([seq, seq[-1:].expand(nb * block - n)]).view(nb, block)
    first, last = padded[:, 0], padded[:, -1]
    touch = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])  # (nb, nb) tiles sharing a sequence
    whole = first == last
    if n % block:  # the last tile is partly past the end: let the mask (and flex's bounds) handle it
        whole = whole & (torch.arange(nb, device=seq.device) < nb - 1)
    full = touch & whole[:, None] & whole[None, :]  # two single-sequence tiles that touch: the same sequence
    partial = touch & ~full

    def ordered(dense):  # (num_blocks, indices) per query tile: the kept tiles first
        num = dense.sum(-1, dtype=torch.int32)
        idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    def same_sequence(b, h, q_idx, kv_idx):
        return seq[q_idx] == seq[kv_idx]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, block, same_sequence, seq_lengths=(n, n))


def backend_context(backend: str, packed):
    """What ``backend`` needs once per forward, built from the plan (not per layer): the padded-row index
    ("pad"), the ``BlockMask`` ("flex"), else None. Pass it to ``packed_self_attention`` in every block."""
    if backend == "pad":
        return pad_rows(packed.seq, packed.cu_seqlens, packed.max_seqlen)
    if backend == "flex":
        return flex_block_mask(packed.seq)
    return None


def _flex_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq):
    """flex_attention with a block-diagonal mask: token i sees token j iff they belong to the same sequence.

    ``seq``: the (N,) sequence ids, or the batch's ``BlockMask`` (``backend_context``, built once per forward).
    """
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if isinstance(seq, BlockMask):
        mask = seq
    else:  # a direct call: build the mask here
        mask = flex_block_mask(seq if seq is not None else seq_index(cu_seqlens, q.shape[0]))
    _record("flex", "flex_attention (compiled)" if q.device.type == "cuda" else "flex_attention (eager)")
    fn = flex_attention
    if q.device.type == "cuda":  # eager flex_attention materialises the scores; compiled, it is a fused kernel
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
        fn = _COMPILED_FLEX
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, N, hd)
    if v.dtype != q.dtype or k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return fn(q, k, v, block_mask=mask, scale=scale)[0].transpose(0, 1)


def _varlen_available(device, dtype, dropout, grad) -> bool:
    if not (_cuda(device) and _half(dtype) and not dropout and _has_torch_varlen() and _has_sm80(device)):
        return False
    return not grad or _varlen_has_backward()


register_backend("loop", _loop_attention, lambda device, dtype, dropout, grad: True, reads_host_offsets=True)
register_backend("pad", _pad_attention, lambda device, dtype, dropout, grad: True)
register_backend(
    "flash",
    _flash_attention,
    lambda device, dtype, dropout, grad: _cuda(device) and _half(dtype) and _has_flash_attn() and _has_sm80(device),
)
register_backend("varlen", _torch_varlen_attention, _varlen_available)
# no flex backward on the CPU, and the CPU has faster backends anyway
register_backend(
    "flex", _flex_attention, lambda device, dtype, dropout, grad: _cuda(device) and not dropout and _has_flex()
)


def packed_self_attention(
    attn: nn.Module, x: torch.Tensor, packed, backend: str, pad_index: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Run a timm ``Attention`` module on packed tokens, using its own layers and settings.

    The projections, q/k norms, output norm, gate and dropouts are the module's own; only the
    softmax(q k^T) v step is replaced by ``varlen_attention``.

    Args:
        attn: timm ``Attention``.
        x: (N, D) packed tokens.
        packed: the batch's ``PackedBatch`` (offsets, indices).
        backend: a concrete backend.
        pad_index: ``backend_context(backend, packed)``, computed once per forward: the padded-row index ("pad")
            or the ``BlockMask`` ("flex").

    Returns:
        (N, D).
    """
    t = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).view(t, 3, attn.num_heads, attn.head_dim).unbind(1)  # (N, H, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
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
        pad_index=pad_index if backend == "pad" else None,
        seq=pad_index if backend == "flex" and pad_index is not None else packed.seq,
    )
    out = out.reshape(t, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
