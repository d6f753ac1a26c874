"""FLOP counts of a ViT forward (multiply-add = 2 FLOPs), uniform or adaptive.

Counted: the patch projection, every linear layer, attention's two matmuls, the APT detail path and
the head; not counted: norms, activations, softmax, additions (a few percent, equal on both sides).
"""
from __future__ import annotations

import math
from typing import Mapping

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


def detail_flops(counts: Mapping[int, torch.Tensor], dim: int) -> torch.Tensor:
    """FLOPs of the APT detail path: {scale factor k: number of k x k tokens} -> total.

    Per token: the 2x2-stride-2 conv at each of log2(k) levels, then the dim x dim linear.
    """
    total = 0.0
    for k, n in counts.items():
        convs = sum((k // 2**level) ** 2 for level in range(1, int(math.log2(k)) + 1))
        total = total + n.double() * (convs * 2 * 4 * dim * dim + 2 * dim * dim)
    return torch.as_tensor(total, dtype=torch.float64)
