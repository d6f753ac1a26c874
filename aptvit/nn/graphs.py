"""CUDA graphs for small batches: pad the packed token count to a bucket, capture once, replay.

At batch 1 a ViT forward on a GPU is bound by Python and kernel launches, not by the GPU (issue #9: 12 ms of
CPU time against 1.6 ms of GPU time). ``forward_packed`` has static control flow given its ``PackedBatch``, so
it can be captured: the runner plans every batch with its token count padded up to a multiple of ``bucket``
(the padding is a dummy sequence of its own that no real token attends to) and a static ``max_seqlen``, keeps
static input buffers per (image shape, padded count), and replays one captured graph per such key. Only the
layout (one host sync, unless given) and the small plan run eagerly.

On a device other than CUDA the runner runs the same padded plan eagerly (what the CPU tests check).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Dict, Optional

import torch

from ..core.layout import PatchLayout
from ..core.packed import PackedBatch


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    images: torch.Tensor
    packed: PackedBatch
    output: torch.Tensor
    keep_alive: tuple  # cached position rows the graph reads: they must outlive it


class CUDAGraphRunner:
    """Logits of an ``APTViT`` through captured CUDA graphs (inference only).

    Args:
        model: the APT model, in eval mode, on a CUDA device (any other device: eager, same padded plan).
        bucket: pad the packed token count up to a multiple of this; fewer buckets = fewer captures, more padding.
        dtype: compute precision: autocast to it (fp16/bf16) or fp32. Autocast runs with its weight cache off,
            as graph capture requires.
        max_graphs: captured graphs kept (least recently used dropped beyond it).

    Example::

        runner = aptvit.nn.CUDAGraphRunner(apt.eval().cuda(), bucket=64, dtype=torch.bfloat16)
        logits = runner(images)           # first call per (shape, bucket) captures, later ones replay
    """

    def __init__(self, model, bucket: int = 64, dtype: torch.dtype = torch.float32, max_graphs: int = 32) -> None:
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"bucket must be a positive int, got {bucket!r}")
        self.model, self.bucket, self.dtype, self.max_graphs = model, bucket, dtype, max_graphs
        self.graphs: Dict[tuple, _Graph] = {}
        self.pool = None

    def _autocast(self, device: torch.device):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype, cache_enabled=False)

    def max_seqlen(self, images: torch.Tensor) -> int:
        """A static bound on any sequence of these images: all base cells plus prefix tokens, or the padding."""
        p = self.model.patch_size
        return max((images.shape[-2] // p) * (images.shape[-1] // p) + self.model.num_prefix_tokens, self.bucket)

    def plan(self, images: torch.Tensor, layout: Optional[PatchLayout] = None) -> PackedBatch:
        """The padded, statically bounded plan of a batch (the same on every device)."""
        return self.model.prepare(images, layout, pad_to=self.bucket, max_seqlen=self.max_seqlen(images))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, layout: Optional[PatchLayout] = None) -> torch.Tensor:
        """Logits (B, num_classes) for normalised images (B, C, H, W)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError("CUDAGraphRunner takes a (B, C, H, W) tensor: graphs need one image size per batch")
        if self.model.training:
            raise ValueError("CUDAGraphRunner is for inference: call model.eval() first")
        packed = self.plan(images, layout)
        if images.device.type != "cuda":
            with self._autocast(images.device):
                return self.model.forward_packed(images, packed)
        key = (
            tuple(images.shape),
            images.dtype,
            packed.total,
            packed.num_seqs,
            self.dtype,
            self.model.attention,
            self.model.config.area_bias,  # captured in the graph's math (the bias values are copied in like the plan)
        )
        entry = self.graphs.pop(key, None) or self._capture(images, packed)
        self.graphs[key] = entry  # most recently used last
        while len(self.graphs) > self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        entry.images.copy_(images, non_blocking=True)
        for f in fields(PackedBatch):
            static = getattr(entry.packed, f.name)
            if isinstance(static, torch.Tensor):
                static.copy_(getattr(packed, f.name), non_blocking=True)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(self, images: torch.Tensor, packed: PackedBatch) -> _Graph:
        static_images = images.clone()
        static_packed = packed  # freshly planned for this call: its tensors become the static buffers
        keep_alive = self.model._position_rows(packed.groups)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._autocast(images.device):
            for _ in range(2):  # warm-up: kernel autotuning and lazy initialisation happen outside the capture
                self.model.forward_packed(static_images, static_packed)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every captured graph
        with torch.cuda.graph(graph, pool=self.pool), self._autocast(images.device):
            output = self.model.forward_packed(static_images, static_packed)
        return _Graph(graph, static_images, static_packed, output, keep_alive)
