"""FLOP counts of a ViT forward (multiply-add = 2 FLOPs), uniform or adaptive.

Counted: the patch projection, every linear layer, attention's two matmuls, the APT detail path and
the head; not counted: norms, activations, softmax, additions (a few percent, equal on both sides).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


def block_flops(tokens: torch.Tensor, linear_macs: int, attn_dim: int) -> torch.Tensor:
    """FLOPs of one transformer block on sequences of ``tokens`` (any shape) tokens.

    Args:
        tokens: sequence lengths.
        linear_macs: multiply-adds per token of all the block's linear layers (qkv, proj, MLP).
        attn_dim: heads x head dim.
    """
    n = tokens.double()
    return 2 * n * linear_macs + 2 * 2 * n * n * attn_dim  # linears; q k^T and (attn) v


def patch_embed_flops(cells: torch.Tensor, in_chans: int, patch: int, dim: int) -> torch.Tensor:
    """FLOPs of the p x p patch projection applied to ``cells`` patches."""
    return 2.0 * cells.double() * in_chans * patch * patch * dim


def bank_flops(
    grid: Tuple[int, int], patch_sizes: Sequence[int], in_chans: int, dim: int, detail: bool = True
) -> float:
    """FLOPs of the APT embedding bank of one image beyond the base projection (``nn.embed``).

    Every larger size s is embedded over its whole (h // k, w // k) grid (k = s / p): the resize projection and
    the D x D detail output layer per cell, and the 2x2 detail merge (4D -> D per parent cell) at each octave.

    Args:
        grid: (h, w) base cells of the image.
        detail: count the detail path (False: left out, as an inference forward does while its output layers are
            zero, ``AdaptivePatchEmbed.detail_is_zero``).
    """
    h, w = grid
    p, total, k = patch_sizes[0], 0.0, 1
    for s in patch_sizes[1:]:
        while k < s // p:
            k *= 2
            total += 2.0 * (h // k) * (w // k) * 4 * dim * dim * detail  # merge into this octave
        cells = (h // k) * (w // k)
        total += 2.0 * cells * in_chans * p * p * dim + 2.0 * cells * dim * dim * detail  # resize proj. + detail out
    return total
