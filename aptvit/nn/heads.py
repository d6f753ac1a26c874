"""Trainable heads on top of an APT encoder: the learned simple pyramid, a segmentation decoder, an MLLM projector.

They take what the encoder gives: ``apt.forward_dense`` (a (B, D, H/p, W/p) grid) for the pyramid and the
decoder, ``apt.encode_tokens`` (packed (T, D) tokens and their layout) for the projector. The parameter-free
pieces (``unmerge``, ``simple_pyramid``) live in ``aptvit.nn.dense``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layout import PatchLayout
from .dense import _check_scales


class SimpleFeaturePyramid(nn.Module):
    """The learned ViTDet simple feature pyramid: deconvolutions up, max-pool down, then 1x1 + 3x3 convs.

    Args:
        dim: channels of the ViT grid.
        out_dim: channels of every pyramid level.
        scales: powers of two, as in ``simple_pyramid``.
    """

    def __init__(self, dim: int, out_dim: int = 256, scales: Sequence[float] = (4, 2, 1, 0.5)) -> None:
        super().__init__()
        _check_scales(scales, (64, 64))
        self.scales = tuple(scales)
        self.levels = nn.ModuleList()
        for s in self.scales:
            layers: List[nn.Module] = []
            if s > 1:
                for step in range(int(math.log2(s))):
                    layers += [nn.ConvTranspose2d(dim, dim, 2, stride=2)] + (
                        [nn.GELU()] if step + 1 < math.log2(s) else []
                    )
            elif s < 1:
                layers.append(nn.MaxPool2d(int(round(1 / s))))
            layers += [
                nn.Conv2d(dim, out_dim, 1),
                nn.GroupNorm(1, out_dim),
                nn.Conv2d(out_dim, out_dim, 3, padding=1),
                nn.GroupNorm(1, out_dim),
            ]
            self.levels.append(nn.Sequential(*layers))

    def forward(self, grid: torch.Tensor) -> List[torch.Tensor]:
        """(B, dim, h, w) -> [(B, out_dim, h * s, w * s) for s in scales]."""
        return [level(grid) for level in self.levels]


class SegmentationDecoder(nn.Module):
    """A light semantic-segmentation decoder: learned simple pyramid, levels summed at the finest, 3x3 conv, classes.

    Every pyramid level is resized (bilinear) to the finest one and summed; a 3x3 conv + GroupNorm + GELU fuses
    them, a 1x1 conv gives the class logits, and a bilinear resize brings them to pixels.

    Args:
        dim: channels D of the encoder's grid.
        num_classes: classes to predict (background included).
        width: channels of the pyramid levels and of the fusion conv.
        scales: pyramid scales of the grid (powers of two), as in ``SimpleFeaturePyramid``.
        patch_size: pixels per grid cell p; the logits come out at the image size (h * p, w * p)
            unless ``forward`` gets another ``size``.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        width: int = 64,
        scales: Sequence[float] = (4, 2, 1),
        patch_size: int = 16,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pyramid = SimpleFeaturePyramid(dim, width, scales=scales)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU())
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, grid: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Class logits per pixel.

        Args:
            grid: (B, dim, h, w) encoder features, e.g. ``apt.forward_dense(images)``.
            size: (H, W) of the output; default (h * patch_size, w * patch_size).

        Returns:
            (B, num_classes, H, W) logits.
        """
        levels = self.pyramid(grid)
        top = levels[max(range(len(levels)), key=lambda i: self.pyramid.scales[i])]  # the finest level
        x = sum(
            F.interpolate(level, size=top.shape[-2:], mode="bilinear", align_corners=False)
            if level is not top
            else level
            for level in levels
        )
        size = tuple(size) if size is not None else (grid.shape[-2] * self.patch_size, grid.shape[-1] * self.patch_size)
        return F.interpolate(self.classify(self.fuse(x)), size=size, mode="bilinear", align_corners=False)


class BoxAwareProjector(nn.Module):
    """LLaVA's MLP projector plus a position code for variable-size tokens.

    A large APT token stands for several base cells, so each token gets a learned code of its box (centre y,
    centre x and side; y and the side divided by its image's height, x by its width) added before LLaVA's two-layer MLP.

    Args:
        vision_dim: D of the ViT.
        llm_dim: embedding width of the language model.
    """

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.box = nn.Linear(3, vision_dim)  # (centre y, centre x, size), all normalised to the image
        self.proj = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, tokens: torch.Tensor, layout: PatchLayout, num_prefix: int = 0) -> List[torch.Tensor]:
        """Project packed tokens into the language model's embedding space, one sequence per image.

        Args:
            tokens: (T, vision_dim) packed patch tokens, e.g. from ``apt.encode_tokens``; with ``num_prefix``,
                (B * num_prefix + T, vision_dim): each image's prefix tokens (e.g. a class token), then its patches.
            layout: their layout (T boxes, B images).
            num_prefix: prefix tokens per image; each gets the box of its whole image.

        Returns:
            B tensors (num_prefix + N_i, llm_dim), N_i = image i's patch count, ready to splice into prompts.
        """
        heights = torch.tensor([h for h, _ in layout.image_sizes], device=tokens.device)[layout.image_index]
        widths = torch.tensor([w for _, w in layout.image_sizes], device=tokens.device)[layout.image_index]
        half = layout.size / 2
        box = torch.stack([(layout.y + half) / heights, (layout.x + half) / widths, layout.size / heights], dim=1)
        if num_prefix:  # the whole image: centre (0.5, 0.5), side 1
            whole = box.new_tensor([0.5, 0.5, 1.0]).expand(layout.batch_size * num_prefix, 3)
            box = torch.cat([whole, box])[prefix_first_order(layout, num_prefix)]
        out = self.proj(tokens + self.box(box.to(tokens.dtype)))
        return list(out.split([n + num_prefix for n in layout.token_counts]))


def prefix_first_order(layout: PatchLayout, num_prefix: int) -> torch.Tensor:
    """The order that takes rows [B * num_prefix prefix rows (image-major), T patch rows (the layout's order)] to
    image by image [its prefix rows, its patch rows]: (B * num_prefix + T,) long (a stable sort by image)."""
    b = layout.batch_size
    image = torch.cat([torch.arange(b, device=layout.device).repeat_interleave(num_prefix), layout.image_index])
    return torch.sort(image, stable=True).indices
