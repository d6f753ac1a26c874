"""Self-attention over packed variable-length sequences, with interchangeable backends, one module each.

Every backend computes the same thing: softmax(q k^T * scale + key_bias) v inside each sequence, never across
sequences. The linear layers around attention run on the packed (T, D) tensor; only this step needs to know where
sequences start and end. ``key_bias`` (optional, (N,), one value per key) is added to every logit of that key:
area-proportional attention adds log(cells a token covers), so a token that stands for four base patches gets as
much attention as those four would (ToMe's proportional attention).

Backends (``BACKENDS``; each a ``base.Backend`` object that owns its availability, its per-forward context and its
handling of the key bias):
    "loop"    (``loop.py``) SDPA once per sequence, on views of the packed tensor (fastest on CPU).
    "pad"     (``pad.py``) pad to the longest sequence, mask the padded keys, one batched SDPA (any device).
    "flash"   (``flash.py``) flash-attn's ``flash_attn_varlen_func`` (CUDA sm80+, fp16/bf16, importable).
    "varlen"  (``varlen.py``) torch's flash kernel on packed sequences (CUDA sm80+, fp16/bf16, no dropout).
    "flex"    (``flex.py``) torch's ``flex_attention`` with a block-diagonal ``BlockMask`` built once per forward.
    "auto"    the fastest available: "loop" on CPU; on CUDA "flash", then "varlen" (half precision), then "flex",
              then "pad" (``AUTO_ORDER``), except fp32 inference, which prefers "pad" (``resolve_backend``).

A new backend is one module with a ``Backend`` subclass (or a kernel function), registered with ``register_backend``.
The backend is a runtime choice of a model, never saved with it. Every backend reads what it needs from the planned
batch (``core.packed.PackedBatch``) and its own context; none reads a value from the device.
"""

from __future__ import annotations

from .base import (
    AUTO_DEFAULT,
    AUTO_ORDER,
    BACKENDS,
    AttentionContext,
    Backend,
    as_dtype,
    available_backends,
    backend_choices,
    check_backend,
    register_backend,
    resolve_backend,
    varlen_attention,
)
from .bias_columns import BIAS_COLUMNS, MAX_KERNEL_HEAD_DIM, bias_head_dim, key_bias_columns
from .flash import FlashBackend
from .flex import FLEX_BLOCK, FlexBackend, flex_block_mask
from .loop import LoopBackend
from .packed import one_sequence, packed_self_attention, skip_noop
from .pad import PadBackend
from .varlen import VarlenBackend

register_backend("loop", LoopBackend())
register_backend("pad", PadBackend())
register_backend("flash", FlashBackend())
register_backend("varlen", VarlenBackend())
register_backend("flex", FlexBackend())

__all__ = [
    "AUTO_DEFAULT",
    "AUTO_ORDER",
    "BACKENDS",
    "BIAS_COLUMNS",
    "FLEX_BLOCK",
    "MAX_KERNEL_HEAD_DIM",
    "AttentionContext",
    "Backend",
    "FlashBackend",
    "FlexBackend",
    "LoopBackend",
    "PadBackend",
    "VarlenBackend",
    "as_dtype",
    "available_backends",
    "backend_choices",
    "bias_head_dim",
    "check_backend",
    "flex_block_mask",
    "key_bias_columns",
    "one_sequence",
    "packed_self_attention",
    "register_backend",
    "resolve_backend",
    "skip_noop",
    "varlen_attention",
]
