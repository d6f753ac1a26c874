"""``Planner``: the one object that turns a batch of images into the ``PackedBatch`` a model runs.

``APTViT.forward(images)`` is ``forward_packed(images, apt.planner(images))``; data-loader workers, the CUDA graph
runner, ``bench``, ``eval`` and ``finetune`` call the same object (it pickles: a worker gets a copy). A plan is made
in two steps, both here:

* the **layout** (``layout``): which patches of which sizes, from the conversion settings (``APTConfig``): budget or
  thresholds, scorer and its parameters. The dynamic path calls ``core.quadtree.patch_layout`` (one host read, the
  token counts); the static path (``config.static``) ``core.static.static_layout`` (k slots per image, on the device,
  no host read);
* the **plan** (``__call__``): the images' structure checked against the model and the layout checked against the
  images (host facts only), then ``core.packed.plan_packed`` (dynamic) or ``core.static.plan_static`` (static).

Images are either model input (floating point, normalised with the model's ``mean`` / ``std``: the layout undoes
the normalisation) or pixels as data-loader workers hold them (``uint8``, 0..255, used as they are). The planner holds
settings only (a frozen dataclass, no caches): any number of threads or processes may share one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from ..core.io import InputError, UserTypeError
from ..core.layout import PatchLayout, to_device
from ..core.packed import Groups, PackedBatch, groups_of, plan_packed
from ..core.pixels import size_groups
from ..core.quadtree import patch_layout
from ..core.static import pad_static, plan_static, static_layout, static_tokens
from .config import APTConfig

Images = Union[torch.Tensor, Sequence[torch.Tensor]]
__all__ = ["Planner", "Images"]


@dataclass(frozen=True)
class Planner:
    """Plans batches for one model: its conversion settings and the facts of its timm model that a plan needs.

    Attributes:
        config: the conversion settings, patch sizes filled in (``APTViT.config``).
        num_prefix: P, prefix tokens per image (class, distillation, register tokens).
        pool_prefix: the prefix tokens take part in average pooling (timm's ``pool_include_prefix``).
        in_chans: channels the model takes.
        mean, std: the normalisation of the model's input (one float per channel).
    """

    config: APTConfig
    num_prefix: int
    pool_prefix: bool
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @property
    def patch_sizes(self) -> Tuple[int, ...]:
        return tuple(self.config.patch_sizes)

    @property
    def patch_size(self) -> int:
        return self.config.patch_sizes[0]

    # ------------------------------------------------------------------ layout
    def layout_settings(self) -> dict:
        """The ``patch_layout`` arguments of these settings (patch_sizes, thresholds or budget, scorer, scorer_args):
        ``aptvit.patch_layout(pixels, **planner.layout_settings())`` lays pixels out as this model does."""
        return self.config.layout_kwargs()

    def static_tokens(self, image_size: Tuple[int, int]) -> int:
        """k, the tokens per image of the static path for (H, W) images, padding included."""
        if not self.config.static:
            raise InputError("static_tokens is the token count of the static path; configure(static=True, budget=...)")
        return static_tokens(self.config.budget, image_size, self.patch_sizes)

    def layout(self, images: Images, **overrides) -> PatchLayout:
        """The layout of ``images``: normalised model input (floating point) or ``uint8`` pixels.

        ``overrides`` replace the settings for this call (thresholds=, budget=, scorer=, scorer_args=, static=).
        """
        c = self.config.replace(**overrides) if overrides else self.config
        pixels = _is_pixels(images)
        with torch.no_grad():
            if pixels and not c.static:
                return patch_layout(images, **c.layout_kwargs())
            if not c.static and len(self.mean) == self.in_chans:
                # the gray of the pixels straight from the normalised input, no full-size pixels
                return patch_layout(images, **c.layout_kwargs(), normalisation=(self.mean, self.std))
            px = images if pixels else _map(self.pixels, images)
            if c.static:  # on the device, no host read: exactly k tokens per image (core.static)
                return static_layout(px, c.patch_sizes, c.budget, c.scorer, c.scorer_args)
            return patch_layout(px, **c.layout_kwargs())

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] of normalised images (B, C, H, W) or (C, H, W): ``(t * std + mean).clamp(0, 1)`` in float32.

        The per-channel constants are written on the device by fills (not copied from the host): a captured CUDA
        graph (the static path) can hold a fill, not a host-to-device copy. NaN stays NaN (``patch_layout`` reports
        it; the static layout reads it as 0).
        """
        shape = (-1, 1, 1) if images.dim() == 3 else (1, -1, 1, 1)
        m, s = (_channel_constants(v, images.device).view(shape) for v in (self.mean, self.std))
        return torch.mul(images.float(), s).add_(m).clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ plan
    def __call__(
        self, images: Images, layout: Optional[PatchLayout] = None, *, pad_to: int = 0, max_seqlen: Optional[int] = None
    ) -> PackedBatch:
        """The ``PackedBatch`` of ``images``: checked, laid out (unless ``layout`` is given), planned.

        Only shapes, dtypes and host integers are read; with a layout given nothing waits for the device. A layout
        on the CPU for images on CUDA is planned on the CPU and moved asynchronously.

        Args:
            images: (B, C, H, W) normalised model input or uint8 pixels, or a list of (C, H, W) of any sizes that
                are multiples of the patch size (dynamic path only).
            layout: a layout made elsewhere (``layout``, ``patch_layout``, data-loader workers); a static model pads
                one with at most k tokens per image to its k slots.
            pad_to: pad the packed token count to a multiple of this (CUDA-graph buckets; dynamic path).
            max_seqlen: a static upper bound on the sequence length (CUDA-graph buckets; dynamic path).

        Returns:
            PackedBatch on the images' device.
        """
        groups = self.check_images(images)
        device = _device_of(images)
        if self.config.static:
            packed = self._plan_static(images, groups, layout, pad_to, max_seqlen)
        else:
            layout = self.layout(images) if layout is None else layout
            self.check_layout(layout, groups, device)
            packed = plan_packed(layout, groups, self.num_prefix, self.pool_prefix, pad_to, max_seqlen)
        return packed if packed.device == device else packed.to(device, non_blocking=True)

    def _plan_static(self, images: Images, groups: Groups, layout, pad_to: int, max_seqlen) -> PackedBatch:
        """The static path: k slots per image, everything on the images' device, no host read; a given layout (at
        most k tokens per image) is padded to k slots on the host."""
        if pad_to or max_seqlen is not None:
            raise InputError("a static plan has fixed shapes already; pad_to= and max_seqlen= are for dynamic plans")
        if len(groups) != 1:
            raise InputError(
                "the static path (static=True) needs one (B, C, H, W) batch of same-size images; "
                "stack them, or configure(static=False) for a list of different sizes"
            )
        if layout is None:
            layout = self.layout(images)
        else:
            self.check_layout(layout, groups, _device_of(images))
            k = self.static_tokens(groups[0][1])
            if layout.max_seqlen != k or tuple(layout.offsets) != tuple(i * k for i in range(layout.batch_size + 1)):
                layout = pad_static(layout, k)
        return plan_static(layout, groups, self.num_prefix, self.pool_prefix)

    # ------------------------------------------------------------------ checks (host facts only)
    def check_images(self, images: Images) -> Groups:
        """Validate the batch's structure, channels, dtype and sizes (no device access); its same-size groups."""
        size_groups(images)  # the batch's structure (one validator for the model, the layout and the plan)
        batch = [images] if isinstance(images, torch.Tensor) else [t[None] for t in images]
        if len({(t.device, t.dtype) for t in batch}) != 1:
            raise InputError("images in a list must share one device and dtype")
        p = self.patch_size
        for t in batch:
            _, c, h, w = t.shape
            if t.shape[0] == 0:
                raise InputError("images is an empty batch")
            if c != self.in_chans:
                raise InputError(
                    f"images have {c} channels but the model takes {self.in_chans}: shape {tuple(t.shape)}"
                )
            if not (t.is_floating_point() or t.dtype == torch.uint8):
                raise UserTypeError(f"images must be floating point and normalised as the model expects, got {t.dtype}")
            if h % p or w % p or h == 0 or w == 0:
                raise InputError(
                    f"image size {h}x{w} is not a multiple of the patch size {p}; "
                    f"pad with aptvit.pad_to_multiple(images, {p}) or resize"
                )
        return groups_of(images)

    def check_layout(self, layout: PatchLayout, groups: Groups, device: torch.device) -> None:
        """The layout fits the images and the model's patch sizes (host facts only)."""
        if not isinstance(layout, PatchLayout):
            raise UserTypeError(f"layout must be a PatchLayout, got {type(layout).__name__}")
        n = sum(len(idx) for idx, _ in groups)
        if layout.batch_size != n:
            raise InputError(f"layout is for {layout.batch_size} images but images holds {n}")
        for idx, hw in groups:
            for i in idx:
                if tuple(layout.image_sizes[i]) != tuple(hw):
                    h, w = layout.image_sizes[i]
                    raise InputError(f"layout image {i} is {h}x{w} but the image is {hw[0]}x{hw[1]}")
        sizes = self.patch_sizes
        if layout.patch_sizes[0] != sizes[0] or not set(layout.patch_sizes) <= set(sizes):
            raise InputError(f"layout patch_sizes {layout.patch_sizes} do not fit this model's patch_sizes {sizes}")
        if layout.device != device and layout.device.type != "cpu":
            raise InputError(
                f"layout is on {layout.device} but images are on {device}; use layout.to(device) or a CPU layout"
            )


def _is_pixels(images: Images) -> bool:
    first = images if isinstance(images, torch.Tensor) else images[0]
    return first.dtype == torch.uint8


def _map(fn, images: Images):
    return fn(images) if isinstance(images, torch.Tensor) else [fn(t) for t in images]


def _device_of(images: Images) -> torch.device:
    return images.device if isinstance(images, torch.Tensor) else images[0].device


def _channel_constants(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """(C,) float32 ``values`` on ``device``, written by fills (capturable in a CUDA graph, unlike a host copy)."""
    if device.type == "cpu" or torch.compiler.is_compiling():
        return to_device(values, torch.float32, device)  # built from ops inside a traced graph (see to_device)
    out = torch.empty(len(values), dtype=torch.float32, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out
