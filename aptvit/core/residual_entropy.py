"""The "residual" scorer: entropy of what is left after removing the local mean, so gradients count as plain.

Plain intensity entropy counts grey levels: a smooth gradient (sky, an out-of-focus background) spans many levels
and scores as busy, while a patch of fine texture in a narrow range of levels scores as plain. Merging a smooth
gradient loses nothing (the patch embedding area-averages a merged patch to the base size, and a gradient survives
that), so a layout that keeps the blurred background at the base size and merges the subject looks backwards.

This scorer takes the residual ``r = gray - box_mean(gray)`` (a (2 * radius + 1)^2 box around every pixel), which
is exactly 0 on any linear ramp, and scores each patch by the entropy of its residuals quantised to ``bins``
equal steps over [-127.5, 127.5] (zero in the middle of a bin, so a ramp's rounding noise stays in one bin).
Texture, edges within ``radius`` pixels and noise above one step keep their spread; gradients and flat regions
score near 0 bits. The histogram machinery is ``entropy_scores``' (one scatter-add at the smallest size, coarser
sizes from 2x2 children), so the cost over entropy is the box filter: 2 * (2 * radius + 1) elementwise adds.

The box mean pads by odd reflection (``2 * edge - mirror``), which continues a linear ramp exactly, so a gradient
is plain up to the image border. Sums are fp32 elementwise with autocast off (as the Laplacian scorer's), so the
scores do not depend on the caller's autocast or on TF32 convolution defaults.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import torch

from .io import InputError
from .scoring import MAX_BINS, entropy_scores

MAX_RADIUS = 15


def _odd_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """``x`` extended by ``r`` values at both ends of ``dim`` by odd reflection about the end values
    (x[-k] = 2 x[0] - x[k]): a linear ramp continues linearly. (B, H, W) -> (B, H + 2r, W) or (B, H, W + 2r);
    needs r < the length of ``dim``."""
    n = x.shape[dim]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    before = 2.0 * first - x.narrow(dim, 1, r).flip(dim)
    after = 2.0 * last - x.narrow(dim, n - 1 - r, r).flip(dim)
    return torch.cat([before, x, after], dim)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2 * radius + 1)^2 box around every pixel, odd-reflected at the borders.

    Separable shifted sums in a fixed order (no conv: its precision follows autocast and TF32 settings).
    ``radius`` is reduced where an image side is too short for it.

    Args:
        x: (B, H, W) float32.
        radius: >= 1.

    Returns:
        (B, H, W) float32.
    """
    h, w = x.shape[-2:]
    out = x
    for dim, n in ((2, w), (1, h)):
        r = min(radius, n - 1)
        if r < 1:
            continue
        padded = _odd_pad(out, r, dim)
        total = padded.narrow(dim, 0, n)
        for k in range(1, 2 * r + 1):
            total = total + padded.narrow(dim, k, n)
        out = total / float(2 * r + 1)
    return out


def residual_entropy_scores(
    gray: torch.Tensor, sizes: Sequence[int], base_size: int, bins: int = 128, radius: int = 3
) -> Dict[int, torch.Tensor]:
    """Entropy (bits) of each patch's residuals from the local mean, for every requested size.

    Args:
        gray: (B, H, W) float32 in [0, 255].
        sizes: patch sizes to score, each ``base_size * 2**k``.
        base_size: the base patch size p.
        bins: quantisation steps of the residual over [-127.5, 127.5] (128: steps of about 2 grey levels).
        radius: the local mean's box is (2 * radius + 1) pixels wide.

    Returns:
        {size: (B, H // size, W // size) float32 entropy in bits}; 0 on flat patches and linear ramps.
    """
    with torch.autocast(gray.device.type, enabled=False):
        g = gray.float()
        residual = g - box_mean(g, radius)
        # zero at the centre of bin bins // 2 (an edge would split a ramp's rounding noise over two bins)
        centre = (bins // 2 + 0.5) * 255.0 / bins
        shifted = (residual + centre).clamp_(0.0, 255.0)
    return entropy_scores(shifted, sizes, base_size, bins=bins)


def check_residual_params(params: Mapping[str, Any]) -> None:
    """The residual scorer's parameters: ``bins`` an int in [2, MAX_BINS], ``radius`` an int in [1, MAX_RADIUS]."""
    bins, radius = params["bins"], params["radius"]
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
        raise InputError(f"bins must be an int from 2 to {MAX_BINS}, got {bins!r}")
    if isinstance(radius, bool) or not isinstance(radius, int) or not 1 <= radius <= MAX_RADIUS:
        raise InputError(f"radius must be an int from 1 to {MAX_RADIUS}, got {radius!r}")
