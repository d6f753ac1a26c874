"""Adaptive patch embedding: one token per patch, whatever its size, with the ViT's own projection.

A patch of size s = k * p becomes (APT_NOTES section 4):

    proj(area_average(patch) to p x p)                       # (a) what the pretrained ViT sees
  + detail_proj_s(merge^log2(k)(proj of its k x k sub-patches))  # (b) zero at initialisation
  + mean of the base position embeddings it covers           # (c) = area resampling of the grid

(a) uses exact area averaging (an average pool of the whole image by k), never aliased bilinear.
(b) reuses the base-grid embeddings, merged by one 2x2-stride-2 conv applied log2(k) times, then a
linear layer per size whose weight and bias start at zero, so a freshly converted model is
exactly the "resize only" model. (c) is exact and cheap: position embeddings are averaged over
the same cells whose pixels were averaged.

This module owns only the new parameters; the ViT's projection, norm and position grid are
passed in, so its state dict keys stay timm's.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class AdaptivePatchEmbed(nn.Module):
    """The detail path of large patches, and the assembly of every token's embedding.

    Args:
        dim: embedding width D.
        patch_sizes: ascending patch sizes; the first is the ViT's patch size p.
    """

    def __init__(self, dim: int, patch_sizes: Sequence[int], device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_sizes = tuple(patch_sizes)
        self.detail_merge = nn.Conv2d(dim, dim, kernel_size=2, stride=2, **dd)
        self.detail_proj = nn.ModuleDict({str(s): nn.Linear(dim, dim, **dd) for s in self.patch_sizes[1:]})
        self.reset_detail()

    def reset_detail(self) -> None:
        """Zero the detail output layers: large tokens become exactly the resize-only embedding."""
        for layer in self.detail_proj.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def detail(self, sub_patches: torch.Tensor, size: int) -> torch.Tensor:
        """Detail term of patches of one size.

        Args:
            sub_patches: (N, D, k, k) base-size embeddings of each patch's sub-patches.
            size: the patch size s = k * p.

        Returns:
            (N, D).
        """
        d = sub_patches
        for _ in range(int(math.log2(d.shape[-1]))):
            d = self.detail_merge(d)
        return self.detail_proj[str(size)](d.flatten(1))

    def forward(
        self,
        images: torch.Tensor,
        image: torch.Tensor,
        y: torch.Tensor,
        x: torch.Tensor,
        size: torch.Tensor,
        proj: nn.Module,
        norm: nn.Module,
        pos_grid: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Embed the listed patches of a same-size batch of images.

        Args:
            images: (B, C, H, W) normalised as the ViT expects.
            image, y, x, size: (N,) long, each token's image (index into ``images``), top-left
                corner and side in pixels.
            proj: the ViT's patch projection (a p x p, stride p conv).
            norm: the ViT's patch-embedding norm (usually Identity), applied like timm does.
            pos_grid: (1, D, H/p, W/p) position embeddings of the base grid, or None.

        Returns:
            (N, D) token embeddings, in the order of the input lists.
        """
        p = self.patch_sizes[0]
        base = norm(proj(images).permute(0, 2, 3, 1))  # (B, H/p, W/p, D)
        parts, order = [], []
        for s in self.patch_sizes:
            sel = (size == s).nonzero().squeeze(1)
            b, i, j = image[sel], y[sel] // s, x[sel] // s
            if s == p:
                tok = base[b, i, j]
                if pos_grid is not None:
                    tok = tok + pos_grid[0, :, i, j].T
            else:
                k = s // p
                # (b) always runs, on an empty batch if need be, so every new parameter gets a
                # gradient each step (DDP with find_unused_parameters=False needs that)
                ar = torch.arange(k, device=images.device)
                rows, cols = i[:, None] * k + ar, j[:, None] * k + ar  # (N_s, k)
                sub = base[b[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N_s, k, k, D)
                tok = self.detail(sub.permute(0, 3, 1, 2), s)
                if sel.numel():
                    resized = norm(proj(F.avg_pool2d(images, k)).permute(0, 2, 3, 1))  # (B, H/s, W/s, D)
                    tok = resized[b, i, j] + tok
                    if pos_grid is not None:
                        tok = tok + F.avg_pool2d(pos_grid, k)[0, :, i, j].T
            parts.append(tok)
            order.append(sel)
        order_all = torch.cat(order)
        inverse = torch.empty_like(order_all)
        inverse[order_all] = torch.arange(order_all.shape[0], device=order_all.device)
        return torch.cat(parts).index_select(0, inverse)
