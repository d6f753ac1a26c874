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

How each adds ``key_bias``: "loop" and "pad" as SDPA's additive float mask ("pad": with -inf on the padded keys),
"flex" as a score modifier, "flash" and "varlen" (whose kernels take no bias) exactly through extra head
dimensions (``key_bias_columns``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.io import InputError
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
        run: ``run(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias) -> out``,
            with the arguments of ``varlen_attention`` (``key_bias`` last, None for no bias).
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
        raise InputError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in BACKENDS and not overwrite:
        raise InputError(f"attention backend {name!r} is already registered; pass overwrite=True to replace it")
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
        raise InputError(f"unknown attention backend {name!r}; choose one of {backend_choices()}")
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
        raise InputError(
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
        raise InputError(f"unknown attention backend {backend!r}; choose one of {tuple(BACKENDS)}")
    if key_bias is not None and tuple(key_bias.shape) != (q.shape[0],):
        raise InputError(f"key_bias must have one value per token, shape ({q.shape[0]},), got {tuple(key_bias.shape)}")
    return BACKENDS[backend].run(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias)


def _loop_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    """SDPA once per sequence, on views of the packed tensor (``key_bias`` as an additive float mask)."""
    bounds = offsets if offsets is not None else cu_seqlens.tolist()
    _record("loop", "scaled_dot_product_attention (per sequence)")
    bias = as_dtype(key_bias, q.dtype) if key_bias is not None else None  # SDPA wants a float mask in q's dtype
    # (H, N, hd) once, then per sequence a slice (none for a single one): few ops, since at batch 1 the host's
    # work per op is what a thin model's time is made of (benchmarks/bench_host.py)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    whole = len(bounds) == 2 and bounds[0] == 0 and bounds[1] == q.shape[1]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (q, k, v) if whole else (t[:, lo:hi] for t in (q, k, v))  # (H, n, hd)
        mask = (bias if whole else bias[lo:hi]).view(1, 1, hi - lo) if bias is not None else None
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=dropout_p, scale=scale))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)).transpose(0, 1)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without dispatching a no-op ``to`` (an op per block is host time at batch 1)."""
    return t if t.dtype == dtype else t.to(dtype)


BIAS_COLUMNS = 2  # a bias value split into a high and a low half-precision part: ~16 mantissa bits instead of 8


def bias_head_dim(head_dim: int, multiple: int = 8) -> int:
    """The head size ``key_bias_columns`` pads to: ``head_dim`` plus the bias columns, up to a multiple of 8 (the
    granularity of the flash kernels' head sizes)."""
    return -(-(head_dim + BIAS_COLUMNS) // multiple) * multiple


def key_bias_columns(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, scale: float, multiple: int = 8
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A per-key logit bias for kernels that take none, exactly, through extra head dimensions.

    With q' = [q, 1, 1, 0...] and k' = [k, hi, lo, 0...], where hi + lo = key_bias / scale (hi: the bias rounded to the
    tensors' dtype, lo: the rounding error, rounded again), every logit becomes scale * q'.k' = scale * q.k +
    key_bias[key]. The kernels multiply in half precision and accumulate in float32, so the products with 1 are exact
    and the sum's only error is that of splitting the bias in two: at most 2**-16 of the bias in bf16 (measured: 2e-6 of
    it; one column alone would be off by up to 2**-8 of it, 7e-3 of a logit for a 4x patch), 2**-22 in fp16. v gets
    zeros (kernels that need one head size for q, k and v); slice the output to ``head_dim``.

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
        raise InputError(
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
    _record("flash", "flash_attn.flash_attn_varlen_func")
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p, softmax_scale=scale)
    return out[..., :hd]


def _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p:
        raise InputError("the 'varlen' backend has no attention dropout; use 'flash' or 'pad' when training")
    q, k, v = _as_autocast_half(q, k, v)
    hd, cu = v.shape[-1], cu_seqlens.to(torch.int32)
    if _direct_flash(q) and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        # inference: the flash kernel itself, never cuDNN (see the module docstring), no custom-op overhead
        if key_bias is not None:
            q, k, v, scale = _with_bias_columns(q, k, v, key_bias, scale, "varlen")
        _record("varlen", "aten._flash_attention_forward")
        return _aten_flash(q, k, v, cu, max_seqlen, scale)[..., :hd]
    fixed = not _varlen_takes_scale()  # fixed: its scale is the given head size ** -0.5
    if key_bias is not None:
        if fixed:  # fold our scale into q; the bias columns are then built for the padded head size's scale
            q = q * ((hd**-0.5 if scale is None else scale) * bias_head_dim(hd) ** 0.5)
            scale = bias_head_dim(hd) ** -0.5
        q, k, v, scale = _with_bias_columns(q, k, v, key_bias, scale, "varlen")
    elif fixed and scale is not None:  # fold ours into q
        q = q * (scale * hd**0.5)
    _record("varlen", f"varlen_attn ({_varlen_route(q, k, v, max_seqlen)})")
    out = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **({} if fixed else {"scale": scale}))
    return out[..., :hd]


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
        mask = q.new_full((rows,), float("-inf")).index_copy_(0, pad_index, as_dtype(key_bias, q.dtype))
    _record("pad", "scaled_dot_product_attention (padded, masked)")
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=mask.view(s, 1, 1, max_seqlen), dropout_p=dropout_p, scale=scale
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


def _flex_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
    """flex_attention with a block-diagonal mask: token i sees token j iff they belong to the same sequence;
    ``key_bias`` is a score modifier (in the kernel's float32 scores).

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
    score_mod = None
    if key_bias is not None:
        bias = key_bias.float()

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[kv_idx]

    return fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale)[0].transpose(0, 1)


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


SDPA_BACKENDS = ("loop", "pad")  # backends that are torch's SDPA with an additive float mask


def one_sequence(packed, backend: str) -> bool:
    """Attention over ``packed`` is one plain SDPA call: a single sequence spans every packed row (batch 1 without
    padding; read from host ints, so a captured plan keeps its control flow: ``CUDAGraphRunner`` keys its graphs by
    ``num_seqs``) and the backend is SDPA, so it needs no mask but the key bias, and no slicing.

    Then ``packed_self_attention`` runs timm's own shapes ((1, H, N, hd), the same ops as timm's ``Attention``),
    the same math as "loop" and "pad" on one sequence.
    """
    offsets = packed.offsets
    return backend in SDPA_BACKENDS and offsets is not None and len(offsets) == 2


def skip_noop(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, except that a module that does nothing is not called at all: a ``nn.Dropout`` in eval mode or
    with p = 0 (it would still dispatch an op) and a ``nn.Identity`` (a Python call; timm's blocks hold six, e.g.
    q/k norms and layer scales switched off). At batch 1 a thin model's time is its host's work per op and per call.
    A module with forward hooks is always called, so that the hooks run."""
    kind = type(module)
    if kind is not nn.Identity and not (kind is nn.Dropout and not (module.training and module.p > 0)):
        return module(x)
    return module(x) if module._forward_hooks or module._forward_pre_hooks else x


def _one_sequence_attention(attn: nn.Module, x: torch.Tensor, key_bias: Optional[torch.Tensor], backend: str):
    """``packed_self_attention`` of a single sequence (``one_sequence``): timm's ``Attention.forward`` on (1, N, D)."""
    t = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(1, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (1, H, N, hd) each
    q, k = skip_noop(attn.q_norm, q), skip_noop(attn.k_norm, k)
    mask = as_dtype(key_bias, q.dtype).view(1, 1, 1, t) if key_bias is not None else None  # one bias row per key
    _record(backend, "scaled_dot_product_attention (one sequence)")
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
        pad_index: ``backend_context(backend, packed)``, computed once per forward: the padded-row index ("pad")
            or the ``BlockMask`` ("flex").
        key_bias: (N,) logit bias of every key (``packed.key_bias`` for area-proportional attention), or None.
        rotate: ``rotate(q, k) -> (q, k)`` on (N, H, hd) tensors, applied after the q/k norms and before the
            kernel: rotary positions (a RoPE family's per-token tables, ``nn.families.base``), on every backend.

    Returns:
        (N, D).
    """
    if rotate is None and one_sequence(packed, backend):  # batch 1: timm's own shapes, no mask, no slicing
        return _one_sequence_attention(attn, x, key_bias, backend)
    t = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).view(t, 3, attn.num_heads, attn.head_dim).unbind(1)  # (N, H, hd) each
    q, k = skip_noop(attn.q_norm, q), skip_noop(attn.k_norm, k)
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
        pad_index=pad_index if backend == "pad" else None,
        seq=pad_index if backend == "flex" and pad_index is not None else packed.seq,
        key_bias=key_bias,
    )
    out = out.reshape(t, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    out = skip_noop(norm, out) if norm is not None else out
    if gate is not None:
        out = out * gate
    return skip_noop(attn.proj_drop, attn.proj(out))
