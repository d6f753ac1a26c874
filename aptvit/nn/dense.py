"""Dense features from an APT encoder: back onto the base grid for segmentation / detection heads,
timm-compatible intermediates, a ViTDet-style simple pyramid, and packed tokens for multimodal LLMs.
Parameter-free only: the trainable heads are in ``aptvit.nn.heads``.

Unmerging is a gather through the layout's cell index: each base cell takes the feature of the token
that covers it ("repeat"). ``smooth=True`` instead box-filters each large token's area with a
window of its own size, so features blend across token borders ("smooth"). "repeat" is the default because a
segmentation head trained on the APT features scored better with it (``examples/segmentation.py``); "smooth" brings
the features closer to the uniform model's, so a frozen dense head trained on the uniform model should pass
``smooth=True``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..core.io import InputError
from ..core.layout import PatchLayout
from ..core.packing import gather_to_grid

SMOOTH_DEFAULT = False  # "repeat": what a head trained on the APT features scored better with (module docstring)


def unmerge(tokens: torch.Tensor, layout: PatchLayout, smooth: bool = SMOOTH_DEFAULT) -> torch.Tensor:
    """Packed patch tokens (T, D) onto the base grid (B, D, H/p, W/p) of same-size images.

    Args:
        tokens: (T, D) patch tokens in the layout's packing order (no prefix tokens).
        smooth: blend large tokens with their neighbours (box filter of the token's size) instead
            of repeating them over their cells.
    """
    grid = gather_to_grid(tokens, layout.cell_index)
    if not smooth or len(layout.patch_sizes) == 1:
        return grid
    p = layout.base_size
    cell_size = layout.size[layout.cell_index][:, None]  # (B, 1, h, w) size of the covering token
    out = grid
    for s in layout.patch_sizes[1:]:
        k = s // p
        blurred = F.avg_pool2d(grid, k + 1, stride=1, padding=k // 2, count_include_pad=False)
        blurred = blurred[..., : grid.shape[-2], : grid.shape[-1]]
        out = torch.where(cell_size == s, blurred, out)
    return out


def unmerge_packed(x: torch.Tensor, packed, smooth: bool = SMOOTH_DEFAULT) -> torch.Tensor:
    """Packed tokens with prefix (N, D) onto the base grid (B, D, H/p, W/p): one gather through the plan's cells."""
    layout = packed.layout
    if not smooth or len(layout.patch_sizes) == 1:
        b = layout.batch_size
        ((gh, gw),) = set(layout.grid_sizes)
        return gather_to_grid(x, packed.patch_pos[layout.cells].view(b, gh, gw))
    patches = x.index_select(0, packed.patch_pos)
    return unmerge(patches, layout, smooth)


def simple_pyramid(grid: torch.Tensor, scales: Sequence[float] = (4, 2, 1, 0.5)) -> List[torch.Tensor]:
    """ViTDet's simple feature pyramid without parameters: one map per scale of the base grid.

    Scales above 1 upsample bilinearly, 1 is the grid itself, below 1 max-pools (as ViTDet's 1/2 level).
    For the learned version (deconvolutions and convs), see ``aptvit.nn.heads.SimpleFeaturePyramid``.

    Args:
        grid: (B, D, h, w).
        scales: powers of two, e.g. (4, 2, 1, 0.5).

    Returns:
        [(B, D, h * s, w * s) for s in scales].
    """
    _check_scales(scales, grid.shape[-2:])
    out = []
    for s in scales:
        if s > 1:
            out.append(F.interpolate(grid, scale_factor=s, mode="bilinear", align_corners=False))
        elif s == 1:
            out.append(grid)
        else:
            k = int(round(1 / s))
            out.append(F.max_pool2d(grid, k, k))
    return out


def _check_scales(scales, hw) -> None:
    if isinstance(scales, (int, float)) or not len(scales):
        raise InputError(f"scales must be a non-empty sequence such as (4, 2, 1, 0.5), got {scales!r}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0 or not math.log2(s).is_integer():
            raise InputError(f"scales must be powers of two such as 4, 2, 1, 0.5; got {s!r} in {tuple(scales)}")
        if s < 1 and min(hw) * s < 1:
            raise InputError(f"scale {s} would make the {hw[0]}x{hw[1]} grid empty")


def _take_indices(depth: int, indices) -> Tuple[List[int], int]:
    """timm's feature_take_indices semantics (None = all, int n = last n, sequence = those), with clear errors."""
    if indices is None:
        indices = depth
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= depth:
            raise InputError(f"indices={indices} must be between 1 and the model depth {depth} (the last n blocks)")
        take = list(range(depth - indices, depth))
    else:
        try:
            take = [int(i) for i in indices]
        except (TypeError, ValueError):
            raise InputError(f"indices must be an int or a sequence of block indices, got {indices!r}") from None
        bad = [i for i in take if not -depth <= i < depth]
        if bad or not take:
            raise InputError(f"indices {list(indices)} out of range for a model of depth {depth}")
        take = [i % depth for i in take]
    return take, max(take)


def _require_one_size(images, layout: Optional[PatchLayout], packed=None) -> None:
    """Grids of different sizes cannot be stacked: say so before any work."""
    layout = packed.layout if packed is not None else layout
    sizes = {tuple(t.shape[-2:]) for t in images} if isinstance(images, (list, tuple)) else set()
    if len(sizes) > 1 or (layout is not None and not layout.same_size):
        raise InputError("dense outputs need images of one size; call once per image size")


class DenseMixin:
    """Dense and MLLM entry points of ``APTViT`` (built on its ``_run``). Each takes ``layout=`` (planned here) or
    a finished plan ``packed=`` (e.g. made in data-loader workers)."""

    def forward_dense(
        self, images, layout: Optional[PatchLayout] = None, smooth: bool = SMOOTH_DEFAULT, packed=None
    ) -> torch.Tensor:
        """(B, D, H/p, W/p): the final normalised features, each token's over the cells it covers.

        Equal to timm's ``forward_features`` without prefix tokens, reshaped to NCHW, when nothing merges.
        """
        _require_one_size(images, layout, packed)
        x, _, packed = self._run(images, layout, packed=packed)
        return unmerge_packed(self.norm(x), packed, smooth)

    def forward_intermediates(
        self,
        images,
        indices: Optional[Union[int, Sequence[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        layout: Optional[PatchLayout] = None,
        smooth: bool = SMOOTH_DEFAULT,
        packed=None,
    ):
        """timm's ``forward_intermediates`` on an APT layout: the same arguments, shapes and semantics.

        Intermediates are unmerged to the base grid: (B, D, H/p, W/p) for "NCHW", (B, H/p * W/p, D)
        for "NLC"; with ``return_prefix_tokens`` each is a (features, (B, P, D) prefix) pair. The final
        features (unless ``intermediates_only``) are ``norm(x)`` as (B, P + H/p * W/p, D), like timm's;
        ``output_dict`` returns timm's dict ("image_intermediates", "image_intermediates_prefix",
        "image_features") instead.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise InputError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = _take_indices(len(self.blocks), indices)
        _require_one_size(images, layout, packed)
        x, kept, packed = self._run(images, layout, take, last if stop_early else None, packed=packed)
        p = self.num_prefix_tokens
        feats, prefixes = [], []
        for i in take:
            y = self.norm(kept[i]) if norm else kept[i]
            grid = unmerge_packed(y, packed, smooth)
            feats.append(grid if output_fmt == "NCHW" else grid.flatten(2).transpose(1, 2))
            prefixes.append(y[packed.prefix_pos])
        final = None
        if not intermediates_only:
            y = self.norm(x)
            final = torch.cat(
                [y[packed.prefix_pos], unmerge_packed(y, packed, smooth).flatten(2).transpose(1, 2)], dim=1
            )
        if output_dict:
            out = {"image_intermediates": feats}
            if return_prefix_tokens and p:
                out["image_intermediates_prefix"] = prefixes
            if final is not None:
                out["image_features"] = final
            return out
        results = list(zip(feats, prefixes)) if return_prefix_tokens and p else feats
        return results if intermediates_only else (final, results)

    def encode_tokens(self, images, layout: Optional[PatchLayout] = None, layer: Optional[int] = None, packed=None):
        """Packed visual tokens for a multimodal LLM, fewer than the uniform ViT gives.

        Args:
            layer: None for the final normalised features; a block index (e.g. -2, as LLaVA-1.5
                takes the penultimate layer) for that block's output, not normalised.

        Returns:
            tokens (T, D) patch tokens (prefix tokens dropped), packed image by image in raster order,
            and the layout: ``layout.y``, ``layout.x``, ``layout.size`` (T,) give each token's box in
            pixels and ``layout.cu_seqlens`` where each image's tokens start. On the static path
            (``config.static``) every image has exactly k tokens: its padding tokens (``layout.size == 0``) last.
        """
        if layer is None:
            x, _, packed = self._run(images, layout, packed=packed)
            x = self.norm(x)
        else:
            (i,), _ = _take_indices(len(self.blocks), [layer])
            _, kept, packed = self._run(images, layout, [i], i, packed=packed)
            x = kept[i]
        return x.index_select(0, packed.patch_pos), packed.layout
