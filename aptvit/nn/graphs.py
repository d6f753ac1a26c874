"""CUDA graphs for small batches: static buffers, capture once per key, replay.

At batch 1 a ViT forward on a GPU is bound by Python and kernel launches, not by the GPU: the host's time per op
is several times the device's. Two modes:

* ``"static"`` (the default when ``model.config.static`` is set: a fixed token count per image, the layout
  computed on the device with no host read): the whole ``apt(images)``, layout included, is one graph per
  (image shape, dtype). A call is one copy into the static images and one replay.
* ``"bucketed"`` (any other model): ``forward_packed`` has static control flow given its ``PackedBatch``, so it
  is captured per (image shape, padded token count). The layout and the small plan run eagerly, with the one
  host read of the token count the plan needs (none when a layout is given, e.g. from data-loader workers);
  the packed count is padded up to a *relative* bucket (``bucket_granule``: steps of ~2.5-5% of the count,
  a power of two, so a batch of 64 and a batch of 1 both see a handful of buckets), the padding being a
  dummy sequence of its own that no real token attends to, and ``max_seqlen`` is a static bound.

Half precision (``dtype=torch.bfloat16`` / ``float16``) runs a copy of the model whose weights are cast once, at
construction, instead of autocast (which would recast every fp32 weight at each replay: ~130 cast kernels for a
ViT-B, since autocast's weight cache must be off inside a capture). The layout is still computed from the
caller's fp32 images, so it is the one the fp32 model would make.

The buffer, bucket and copy logic is the same without a capture (``capture=False``, automatic off CUDA): the
CPU tests exercise it, replay for replay, with the forward run eagerly on the static buffers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from ..core.io import InputError, UserTypeError
from ..core.layout import PatchLayout
from ..core.packed import PackedBatch
from .attention import BACKENDS, resolve_backend

MODES = ("bucketed", "static")

# plan fields whose length is the real patch count T, not the padded total: they differ between plans of one
# bucket and ``forward_packed`` does not read them, so they are neither copied nor kept in a captured plan
_PER_PATCH_FIELDS = ("patch_pos",)


def bucket_granule(n: int, step: float = 0.05, multiple: int = 8) -> int:
    """The padding multiple of a packed count ``n``: the largest power of two <= ``n * step`` (at least
    ``multiple``), so ``bucket(n, granule)`` is at most ~``step`` above ``n`` and buckets are ``step / 2`` to
    ``step`` of the count apart, whatever the batch size.
    """
    want = max(int(n * step), multiple, 1)
    return 1 << (want.bit_length() - 1)


@dataclass
class _Entry:
    images: torch.Tensor  # the static input buffer
    packed: Optional[PackedBatch]  # the static plan ("bucketed")
    output: Optional[torch.Tensor] = None  # the captured graph's output buffer
    graph: Optional["torch.cuda.CUDAGraph"] = None


class CUDAGraphRunner:
    """Logits of an ``APTViT`` through captured CUDA graphs (inference only).

    Args:
        model: the APT model, in eval mode (on CUDA to capture).
        bucket: a fixed padding multiple of the packed token count; None (default): relative buckets
            (``bucket_granule(n, step)``). Fewer buckets = fewer captures, more padding.
        dtype: compute precision: fp32, or fp16/bf16 through a copy of the model with weights cast once (change
            the model's weights? build a new runner).
        max_graphs: captured graphs kept; the least recently used is dropped beyond it.
        mode: "static" (the whole ``apt(x)`` per image shape; needs ``model.config.static``) or "bucketed"
            (``forward_packed`` per padded token count); None: "static" when ``model.config.static`` is set.
        capture: capture CUDA graphs (True), or run the same static buffers and copies eagerly (False);
            None: capture on CUDA only.
        step: relative bucket step (``bucket=None``).

    Example::

        runner = aptvit.nn.CUDAGraphRunner(apt.eval().cuda(), dtype=torch.bfloat16)
        logits = runner(images)           # the first call per key captures, later ones replay
    """

    def __init__(
        self,
        model,
        bucket: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        max_graphs: int = 64,
        mode: Optional[str] = None,
        capture: Optional[bool] = None,
        step: float = 0.05,
    ) -> None:
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
            raise InputError(f"bucket must be a positive int or None (relative buckets), got {bucket!r}")
        if not 0 < step < 1:
            raise InputError(f"step must be in (0, 1), a fraction of the token count, got {step!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise InputError(f"max_graphs must be a positive int, got {max_graphs!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InputError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        static = bool(getattr(model.config, "static", False))
        mode = mode if mode is not None else ("static" if static else "bucketed")
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES} or None, got {mode!r}")
        if mode == "static" and not static:
            raise InputError(
                "mode='static' needs a fixed token count per image: model.configure(budget=k, static=True) first"
            )
        self.model, self.bucket, self.dtype, self.max_graphs = model, bucket, dtype, max_graphs
        self.mode, self.capture, self.step = mode, capture, step
        self.compute = model if dtype == torch.float32 else _cast_copy(model, dtype)
        self.graphs: "OrderedDict[tuple, _Entry]" = OrderedDict()  # least recently used first
        self.captures = 0  # graphs captured (or static buffers made) so far; a replay adds none
        self.pool = None

    # ------------------------------------------------------------------ planning
    def max_seqlen(self, images: torch.Tensor, pad: int = 0) -> int:
        """A static bound on any sequence of these images: all base cells plus prefix tokens, or the padding."""
        p = self.model.patch_size
        return max((images.shape[-2] // p) * (images.shape[-1] // p) + self.model.num_prefix_tokens, pad)

    def granule(self, n: int) -> int:
        """The padding multiple for a packed count ``n`` (the fixed ``bucket``, or a relative one)."""
        return self.bucket if self.bucket is not None else bucket_granule(n, self.step)

    def plan(self, images: torch.Tensor, layout: Optional[PatchLayout] = None) -> PackedBatch:
        """The padded, statically bounded plan of a batch (the same on every device; "bucketed" mode).

        With ``layout`` given (e.g. computed on the CPU in data-loader workers) nothing reads from the device.
        """
        planner = self.model.planner
        layout = planner.layout(images) if layout is None else layout
        g = self.granule(layout.total_tokens + images.shape[0] * planner.num_prefix)
        return planner(images, layout, pad_to=g, max_seqlen=self.max_seqlen(images, g))

    def backend(self, device: torch.device) -> str:
        """The attention backend a capture on ``device`` uses; a ValueError for one that reads host offsets."""
        name = resolve_backend(self.model.attention, torch.device(device), self.dtype)
        if BACKENDS[name].reads_host_offsets:
            raise InputError(
                f"attention backend {name!r} reads the sequence offsets on the host, which a CUDA graph would freeze "
                "at its first batch; use configure(attention='auto') or another backend (e.g. 'pad') for graphs"
            )
        return name

    # ------------------------------------------------------------------ calls
    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, layout: Optional[PatchLayout] = None) -> torch.Tensor:
        """Logits (B, num_classes) for normalised images (B, C, H, W)."""
        if not isinstance(images, torch.Tensor):
            raise UserTypeError("CUDAGraphRunner takes a (B, C, H, W) tensor: graphs need one image size per batch")
        if self.model.training:
            raise InputError("CUDAGraphRunner is for inference: call model.eval() first")
        if self.compute is not self.model:  # the half-precision copy attends as the model is configured now
            self.compute.attention = self.model.attention
        capture = images.device.type == "cuda" if self.capture is None else self.capture
        if capture:
            self.backend(images.device)
        if self.mode == "static":
            if layout is not None:
                raise InputError("a static runner computes the layout inside its graph: call it without layout=")
            packed, key = None, (tuple(images.shape), images.dtype)
        else:
            packed = self.plan(images, layout)
            key = (tuple(images.shape), images.dtype, packed.total, packed.num_seqs)
        # area_bias is captured in the graph's math (the bias values are copied in like the plan)
        key = key + (self.dtype, self.model.attention, self.model.config.area_bias)
        entry = self.graphs.pop(key, None)
        if entry is None:
            entry = self._new_entry(images, packed, capture)
        self.graphs[key] = entry  # most recently used last
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        entry.images.copy_(images, non_blocking=True)
        if packed is not None:
            _copy_plan(entry.packed, packed)
        if entry.graph is not None:
            entry.graph.replay()
            return entry.output.clone()
        # no capture: the same static buffers, run eagerly (host-only fields such as ``offsets`` from this plan)
        static = None if packed is None else replace(entry.packed, offsets=packed.offsets, layout=packed.layout)
        return self._forward(entry.images, static)

    def _forward(self, images: torch.Tensor, packed: Optional[PackedBatch]) -> torch.Tensor:
        """The computation a graph holds: the whole model ("static") or ``forward_packed`` on a plan."""
        x = images.to(self.dtype)  # the input in the weights' dtype (a copy into the graph's own buffer)
        if packed is None:  # the layout from the caller's images, not the cast ones: the fp32 model's layout
            packed = self.compute.planner(images)
        return self.compute.forward_packed(x, packed)

    def _new_entry(self, images: torch.Tensor, packed: Optional[PackedBatch], capture: bool) -> _Entry:
        self.captures += 1
        static_packed = None
        if packed is not None:  # freshly planned for this call: its tensors become the static buffers
            static_packed = replace(packed, **{f: None for f in _PER_PATCH_FIELDS})
        entry = _Entry(images.clone(), static_packed)
        if not capture:
            return entry
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernel autotuning and lazy initialisation happen outside the capture
                self._forward(entry.images, entry.packed)
        torch.cuda.current_stream().wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every captured graph
        # thread_local: another thread's CUDA work (a data loader's pinned copies) does not abort this capture
        with torch.cuda.graph(entry.graph, pool=self.pool, capture_error_mode="thread_local"):
            entry.output = self._forward(entry.images, entry.packed)
        return entry


def _copy_plan(static: PackedBatch, packed: PackedBatch) -> None:
    """Copy a new plan of the same key into the static one, field by field (device to device, asynchronous)."""
    for f in fields(PackedBatch):
        dst, src = getattr(static, f.name), getattr(packed, f.name)
        if not isinstance(dst, torch.Tensor):
            continue
        if dst.shape != src.shape:  # every replayed field is sized by the key; a new field must be too
            raise RuntimeError(
                f"plan field {f.name!r} changed shape within a bucket: {tuple(dst.shape)} -> {tuple(src.shape)}"
            )
        dst.copy_(src, non_blocking=True)


def _cast_copy(model, dtype: torch.dtype):
    """A copy of ``model`` with its floating-point weights in ``dtype`` (cast once; the original is untouched)."""
    out = copy.deepcopy(model).to(dtype)
    return out.eval()
