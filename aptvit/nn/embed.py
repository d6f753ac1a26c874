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

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import place_rows


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
        # only with large sizes: a parameter that never gets a gradient would break DDP
        self.detail_merge = nn.Conv2d(dim, dim, kernel_size=2, stride=2, **dd) if len(self.patch_sizes) > 1 else None
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
            sub_patches: (N, k, k, D) base-size embeddings of each patch's sub-patches (channels last).
            size: the patch size s = k * p.

        Returns:
            (N, D).
        """
        d = sub_patches
        w = self.detail_merge.weight.flatten(1)  # (D, D * 2 * 2), input order (channel, row, col)
        while d.shape[1] > 1:
            n, h, _, c = d.shape
            # the 2x2 stride-2 conv as one matmul over non-overlapping 2x2 blocks (no per-call conv overhead)
            blocks = d.reshape(n, h // 2, 2, h // 2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(n, h // 2, h // 2, c * 4)
            d = F.linear(blocks, w, self.detail_merge.bias)
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
        # (B, H/p, W/p, D): every base cell, as timm embeds it; contiguous so that gathers read whole rows
        base = norm(proj(images).permute(0, 2, 3, 1)).contiguous()
        parts, order = [], []
        for s in self.patch_sizes:
            sel = (size == s).nonzero().squeeze(1)
            if s > p and sel.numel() == 0 and not (torch.is_grad_enabled() and self.training):
                continue
            b, i, j = image[sel], y[sel] // s, x[sel] // s
            if s == p:
                tok = base[b, i, j]
                if pos_grid is not None:
                    tok = tok + pos_grid[0].permute(1, 2, 0)[i, j]
            else:
                # (b) runs in training even on an empty selection, so that every new parameter gets
                # a (zero) gradient each step: DDP with find_unused_parameters=False needs that
                k = s // p
                tok = self.detail(_blocks(base, k, dims=(1, 2))[b, i, j], s)  # sub-patches (N_s, k, k, D)
                if sel.numel():
                    # (a) exact area average to p x p, then the ViT's own projection, chosen patches only
                    pix = F.avg_pool2d(_blocks(images, s, dims=(2, 3))[b, i, j], k)  # (N_s, C, p, p)
                    tok = norm(F.linear(pix.flatten(1), proj.weight.flatten(1), proj.bias)) + tok
                    if pos_grid is not None:
                        tok = tok + F.avg_pool2d(pos_grid, k)[0].permute(1, 2, 0)[i, j]
            parts.append(tok)
            order.append(sel)
        return place_rows(torch.cat(parts), torch.cat(order), image.shape[0])


def _blocks(t: torch.Tensor, n: int, dims) -> torch.Tensor:
    """View the two spatial ``dims`` of ``t`` as a grid of n x n blocks, grid first.

    (B, C, H, W) with dims (2, 3) -> (B, H//n, W//n, C, n, n);
    (B, H, W, D) with dims (1, 2) -> (B, H//n, W//n, n, n, D). Trailing rows/columns that do not
    fill a block are left out. Indexing the result with (image, row, col) gathers whole blocks.
    """
    h, w = t.shape[dims[0]], t.shape[dims[1]]
    gh, gw = h // n, w // n
    if dims == (2, 3):
        b, c = t.shape[:2]
        return t[:, :, : gh * n, : gw * n].reshape(b, c, gh, n, gw, n).permute(0, 2, 4, 1, 3, 5)
    b, d = t.shape[0], t.shape[-1]
    return t[:, : gh * n, : gw * n].reshape(b, gh, n, gw, n, d).permute(0, 1, 3, 2, 4, 5)
