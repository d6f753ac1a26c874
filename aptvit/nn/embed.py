"""Adaptive patch embedding: one token per patch, whatever its size, with the ViT's own projection.

A patch of size s = k * p becomes:

    proj(area_average(patch) to p x p)                            # (a) what the pretrained ViT sees
  + detail_proj_s(merge^log2(k)(proj of its k x k sub-patches))  # (b) zero at initialisation
  + mean of the base position embeddings it covers                # (c) = area resampling of the grid

(a) uses exact area averaging (2x2 average pools, repeated), never aliased bilinear. (b) reuses the base-grid
embeddings, merged by one 2x2-stride-2 conv applied log2(k) times, then a linear layer per size whose weight
and bias start at zero, so a freshly converted model is exactly the "resize only" model. (c) is exact and
cheap: position embeddings are averaged over the same cells whose pixels were averaged.

Every size is embedded densely, over its whole grid (a *bank* of embeddings, ``bank``), and the model then
gathers the tokens its layout chose in one ``index_select``. The grids of the larger sizes hold 1/4, 1/16, ...
of the base cells, so this costs a few percent of the patch embedding and about 1% of a ViT forward, and in
exchange the shapes never depend on the layout: the forward has no per-size selection, no host sync, and can
be compiled or captured in a CUDA graph (the FLOP count, ``model_flops``, includes it).

This module owns only the new parameters; the ViT's projection, norm and position grid are passed in, so its
state dict keys stay timm's.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Non-overlapping p x p patches as rows, in the (C, p, p) order of a conv weight.

    Args:
        images: (B, C, H, W); rows/columns beyond the last whole patch are ignored.

    Returns:
        (B * (H // p) * (W // p), C * p * p), image-major, row-major.
    """
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    if (gh * patch, gw * patch) != (h, w):
        images = images[:, :, : gh * patch, : gw * patch]
    x = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * gh * gw, c * patch * patch)


def area_halve(t: torch.Tensor) -> torch.Tensor:
    """(..., h, w) -> (..., h // 2, w // 2): the mean of every 2x2 block (empty when a side is below 2)."""
    h, w = t.shape[-2:]
    if h < 2 or w < 2:  # a grid too small for this size: no patch of it exists
        return t.new_zeros(*t.shape[:-2], h // 2, w // 2)
    if t.device.type == "cpu" and t.dim() == 4:
        # avg_pool2d's CPU kernel takes twice as long as four strided adds in its own order, (((a + b) + c) + d) / 4,
        # which give the same bits (tests/nn/test_host_cost.py)
        t = t[..., : h // 2 * 2, : w // 2 * 2]
        return (t[..., ::2, ::2] + t[..., ::2, 1::2] + t[..., 1::2, ::2] + t[..., 1::2, 1::2]) * 0.25
    return F.avg_pool2d(t, 2)


class AdaptivePatchEmbed(nn.Module):
    """The detail path of large patches, and the bank of every size's embeddings.

    Args:
        dim: embedding width D.
        patch_sizes: ascending patch sizes; the first is the ViT's patch size p.
    """

    def __init__(self, dim: int, patch_sizes: Sequence[int], device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_sizes = tuple(patch_sizes)
        # only with large sizes: a parameter that never gets a gradient would break DDP
        self.detail_merge = nn.Conv2d(dim, dim, kernel_size=2, stride=2, **dd) if len(self.patch_sizes) > 1 else None
        self.detail_proj = nn.ModuleDict({str(s): nn.Linear(dim, dim, **dd) for s in self.patch_sizes[1:]})
        self.reset_detail()

    def reset_detail(self) -> None:
        """Zero the detail output layers: large tokens become exactly the resize-only embedding."""
        for layer in self.detail_proj.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def merge(self, grid: torch.Tensor) -> torch.Tensor:
        """The 2x2 stride-2 detail conv on a channels-last grid, as one matmul over 2x2 blocks.

        Args:
            grid: (B, h, w, D); a trailing odd row/column has no parent and is dropped.

        Returns:
            (B, h // 2, w // 2, D).
        """
        b, h, w, d = grid.shape
        blocks = grid[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, d)
        blocks = blocks.permute(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, d * 4)  # (channel, row, col) as the conv
        return F.linear(blocks, self.detail_merge.weight.reshape(d, -1), self.detail_merge.bias)

    def bank(self, images: torch.Tensor, proj: nn.Module, norm: nn.Module) -> torch.Tensor:
        """Embeddings (without positions) of every patch of every size, on each size's own grid.

        The base patches and the area-averaged patches of every size go through the ViT's projection in one
        matmul (a p x p stride-p conv is a matmul over non-overlapping patches, which a GPU runs fastest).

        Args:
            images: (B, C, H, W) normalised as the ViT expects.
            proj: the ViT's patch projection (a p x p, stride p conv); norm: its patch-embedding norm.

        Returns:
            (sum over sizes s of B * (H // s) * (W // s), D): size by size (ascending), each grid image-major
            and row-major, the layout ``core.packed.plan_packed`` indexes.
        """
        tokens = self.resized(images, proj, norm)
        return tokens if len(self.patch_sizes) == 1 else self.add_detail(tokens, images.shape)

    def resized(self, images: torch.Tensor, proj: nn.Module, norm: nn.Module) -> torch.Tensor:
        """(a): every size's patches area-averaged to p x p and projected, in one matmul: the bank without (b)."""
        p = self.patch_sizes[0]
        grids, pixels, k = [images], images, 1
        for s in self.patch_sizes[1:]:
            while k < s // p:
                pixels, k = area_halve(pixels), k * 2  # exact area averaging, one octave at a time
            grids.append(pixels)
        rows = torch.cat([patchify(g, p) for g in grids]) if len(grids) > 1 else patchify(images, p)
        return norm(F.linear(rows, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias))  # (R, D)

    def add_detail(self, tokens: torch.Tensor, image_shape) -> torch.Tensor:
        """(b): the detail path added to the rows of the larger sizes of ``resized``'s bank (same shape out).

        It runs whatever the weights: a fresh conversion's zero output layers add exactly 0.
        """
        p, b = self.patch_sizes[0], image_shape[0]
        gh, gw = image_shape[-2] // p, image_shape[-1] // p
        n_base = b * gh * gw
        detail, k, added = tokens[:n_base].view(b, gh, gw, -1), 1, []
        for s in self.patch_sizes[1:]:
            while k < s // p:
                detail, k = self.merge(detail), k * 2  # sub-patch embeddings merged one octave at a time
            added.append(self.detail_proj[str(s)](detail).reshape(-1, tokens.shape[-1]))
        return torch.cat([tokens[:n_base], tokens[n_base:] + torch.cat(added)])


def position_bank(pos_grid: torch.Tensor, patch_sizes: Sequence[int]) -> torch.Tensor:
    """(c): position embeddings of every patch of every size: the base grid area-averaged per size.

    Args:
        pos_grid: (1, D, H/p, W/p) position embeddings of the base grid.

    Returns:
        (sum over sizes s of (H // s) * (W // s), D), size by size, row-major.
    """
    rows, grid, k = [], pos_grid, 1
    for s in patch_sizes:
        while k < s // patch_sizes[0]:
            grid, k = area_halve(grid), k * 2
        rows.append(grid[0].flatten(1).t())
    return rows[0] if len(rows) == 1 else torch.cat(rows)
