"""The backend interface and its registry: what an attention backend is, how one is chosen, how it is called.

A backend is an object (``Backend``) that knows

* where it can run (``available(device, dtype, dropout, grad)``);
* what it needs once per forward (``context(packed, key_bias, dtype) -> AttentionContext``): built from the plan
  before the first block and shared by every block, e.g. a padded-row index or a flex ``BlockMask``, the key bias
  in the form its kernel takes;
* how to attend (``attend(q, k, v, ctx, dropout_p, scale)``), and the same as a plain function of the plan's
  tensors (``run``, the arguments of ``varlen_attention``);
* which kernel it last ran (``last_kernel``, for benchmarks and debugging).

``BACKENDS`` maps names to backends; ``register_backend`` adds a kernel function as a backend, ``resolve_backend``
turns "auto" into the fastest available one. Model code holds a backend's name (a runtime setting, never saved) and
asks the registry for its object; no other module names a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ...core.io import InputError
from .environment import half

# what "auto" tries per device type, fastest first; any other device: AUTO_DEFAULT, then backends that read no host
# offsets (a static plan has none)
AUTO_ORDER = {"cuda": ("flash", "varlen", "flex", "pad")}
AUTO_DEFAULT = "loop"
FP32_INFERENCE_FIRST = "pad"  # CUDA fp32 inference: SDPA's memory-efficient kernel, nothing to compile


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without dispatching a no-op ``to`` (an op per block is host time at batch 1)."""
    return t if t.dtype == dtype else t.to(dtype)


@dataclass(frozen=True)
class AttentionContext:
    """What every attention call of one forward shares (``Backend.context``, made once per forward).

    Attributes:
        backend: the backend object.
        packed: the batch's plan (``cu_seqlens``, ``max_seqlen``, host ``offsets``, sequence ids ``seq``).
        key_bias: (N,) logit bias of every key in the form the backend's kernel takes, or None.
        state: the backend's own per-forward state (a padded-row index, a ``BlockMask``), or None.
    """

    backend: "Backend"
    packed: Any
    key_bias: Optional[torch.Tensor] = None
    state: Any = None


class Backend:
    """An attention backend (see the module docstring). Subclass it, or wrap a kernel function.

    Args:
        run: ``run(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias) -> out``,
            the arguments of ``varlen_attention`` (``key_bias`` last, None for no bias); a subclass defines its own.
        available: ``available(device, dtype, dropout, grad) -> bool`` (``dropout``: attention dropout is on;
            ``grad``: a backward will follow); replaces the subclass's check when given.
        reads_host_offsets: the kernel reads ``offsets`` (Python ints) rather than device tensors, so a captured CUDA
            graph would freeze the first batch's sequence boundaries (``CUDAGraphRunner`` refuses it) and a static
            plan (no host offsets) cannot use it.

    Class attributes:
        sdpa_mask: the kernel is torch's SDPA with the key bias as an additive float mask in the query's dtype: the
            bias is cast once per forward, and one sequence (batch 1) may run as timm's own SDPA call.
        traceable: on a static plan (``PackedBatch.static``) the context and the kernel are plain tensor ops of
            fixed shapes (no host offsets, no compiled or device-only kernel), so a graph exporter takes them as
            they are (``aptvit.export`` runs the backends that say so).

    Attributes:
        last_kernel: the kernel this backend last ran, e.g. "aten._flash_attention_forward" (the varlen backend's
            inference path) or "varlen_attn (cuDNN)"; the function's name for a backend made from a kernel
            function; None before the first call and after ``clear_last_kernel()``. A benchmark reads it to say
            what it timed. One object per registered name serves every model, so it is the last call of any of
            them; it is written only outside compiled code (a compiled forward leaves it as eager code set it).
    """

    name: str = ""  # set by ``register_backend``
    reads_host_offsets: bool = False
    sdpa_mask: bool = False
    traceable: bool = False
    last_kernel: Optional[str] = None

    def __init__(
        self,
        run: Optional[Callable[..., torch.Tensor]] = None,
        available: Optional[Callable[[torch.device, torch.dtype, bool, bool], bool]] = None,
        reads_host_offsets: Optional[bool] = None,
    ) -> None:
        if run is not None:
            self._kernel_function = run
            self._kernel_name = getattr(run, "__qualname__", None) or type(run).__name__
        if available is not None:
            self.available = available
        if reads_host_offsets is not None:
            self.reads_host_offsets = reads_host_offsets

    _kernel_function: Optional[Callable[..., torch.Tensor]] = None  # ``run=`` given: the kernel function

    def run(self, q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
        if self._kernel_function is None:
            raise NotImplementedError(f"{type(self).__name__} defines no run and was given no kernel function")
        self.note_kernel(self._kernel_name)
        return self._kernel_function(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias)

    def note_kernel(self, kernel: str) -> None:
        """Record ``kernel`` as ``last_kernel`` (called by the backend just before it runs the kernel)."""
        if not torch.compiler.is_compiling():  # a traced attribute write would be a side effect of the graph
            self.last_kernel = kernel

    def clear_last_kernel(self) -> None:
        """Forget the kernel last run (``last_kernel`` is None until the next call)."""
        self.last_kernel = None

    def available(self, device: torch.device, dtype: torch.dtype, dropout: bool = False, grad: bool = False) -> bool:
        return True

    def context(self, packed, key_bias: Optional[torch.Tensor], dtype: torch.dtype) -> AttentionContext:
        """What every block of one forward over ``packed`` needs (``dtype``: the dtype q, k, v will have)."""
        if key_bias is not None and self.sdpa_mask:  # SDPA's float mask in q's dtype: rounded once per forward
            key_bias = as_dtype(key_bias, dtype)
        return AttentionContext(self, packed, key_bias)

    def attend(self, q, k, v, ctx: AttentionContext, dropout_p: float, scale: Optional[float]) -> torch.Tensor:
        """softmax(q k^T * scale + key_bias) v inside each sequence of ``ctx.packed``: (N, H, hd) -> (N, H, hd)."""
        p = ctx.packed
        return self.run(q, k, v, p.cu_seqlens, p.max_seqlen, dropout_p, scale, p.offsets, None, p.seq, ctx.key_bias)


BACKENDS: Dict[str, Backend] = {}


def register_backend(
    name: str,
    run,
    available: Optional[Callable] = None,
    overwrite: bool = False,
    reads_host_offsets: bool = False,
) -> Backend:
    """Make an attention kernel selectable by name (``convert(..., attention=name)``, ``--attention``).

    ``run``: a kernel function (see ``Backend``; with ``available`` its availability check), or a ``Backend``
    object. ``reads_host_offsets``: the kernel uses the host offsets (see ``Backend``), so CUDA graphs cannot hold it.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise InputError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in BACKENDS and not overwrite:
        raise InputError(f"attention backend {name!r} is already registered; pass overwrite=True to replace it")
    if isinstance(run, Backend):
        backend = run
    else:
        if available is None:
            raise InputError(
                f"register_backend({name!r}, run, available): a kernel function needs its availability check"
            )
        backend = Backend(run, available, reads_host_offsets)
    backend.name = name
    BACKENDS[name] = backend
    return backend


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
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    dropout: bool = False,
    grad: bool = False,
    host_offsets: bool = True,
) -> str:
    """The concrete backend for ``name`` ("auto" picks), or a ValueError if it cannot run here.

    ``host_offsets=False``: the plan has no host offsets (a static plan), so backends that read them are out.
    """
    check_backend(name)
    ok = available_backends(device, dtype, dropout, grad)
    if not host_offsets:
        if name != "auto" and BACKENDS[name].reads_host_offsets:
            others = [n for n in ok if not BACKENDS[n].reads_host_offsets]
            raise InputError(
                f"attention {name!r} reads the sequence offsets on the host, which a static plan (static=True) "
                f"does not have; use attention='auto' or one of {others}"
            )
        ok = [n for n in ok if not BACKENDS[n].reads_host_offsets]
    if name == "auto":
        order = AUTO_ORDER.get(torch.device(device).type, (AUTO_DEFAULT,))
        if torch.device(device).type == "cuda" and not grad and not half(dtype):
            # fp32 inference: "pad" is SDPA's memory-efficient kernel on the padded batch, nothing to compile;
            # flex would compile (seconds on each new shape class) and run its fp32 Triton kernel, with a block
            # mask built per forward, to save only the padding (at most the spread of token counts in a batch)
            order = (FP32_INFERENCE_FIRST,) + tuple(c for c in order if c != FP32_INFERENCE_FIRST)
        for candidate in (*order, *ok):
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
    """Attention inside each packed sequence: softmax(q k^T * scale + key_bias[key]) v, as a plain function.

    Args:
        q, k, v: (N, H, hd) packed queries, keys, values.
        cu_seqlens: (S+1,) int32 sequence offsets.
        max_seqlen: longest sequence (or a static upper bound).
        backend: a registered backend's name (``resolve_backend`` picks one for "auto").
        dropout_p: attention dropout probability (training only).
        scale: softmax scale, default hd ** -0.5.
        offsets: ``cu_seqlens`` as Python ints (read from the device by kernels that need them when missing).
        pad_index: (N,) row of every token in the padded (S, max_seqlen) layout (derived when missing).
        seq: (N,) sequence of every token (derived when missing).
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

