"""Packed variable-length sequences: index arithmetic, prefix insertion, padding, gather to a grid.

A packed batch stores the tokens of B images one after another in a (T, ...) tensor with
``cu_seqlens`` (B+1,) offsets. A ViT adds P prefix tokens (class, registers) in front of each
image's patch tokens, so its packed sequence is, per image, [prefix (P), patches (N_i)].
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def seq_index(cu_seqlens: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """(T,) long: which sequence every packed token belongs to.

    Args:
        total: T when the caller knows it (a tensor's length): then nothing waits for the device; without it
            the output size is read back from ``cu_seqlens``.
    """
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=cu_seqlens.device), counts, output_size=total)


def position_in_seq(cu_seqlens: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """(T,) long: position of every packed token inside its own sequence (``total``: as in ``seq_index``)."""
    seq = seq_index(cu_seqlens, total)
    return torch.arange(seq.shape[0], device=cu_seqlens.device) - cu_seqlens.long()[seq]


def place_rows(rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """(n, ...) tensor whose row ``index[i]`` is ``rows[i]`` (a permutation when len(index) == n).

    Differentiable in ``rows``; used to put tokens computed in groups back into packing order.
    """
    return rows.new_empty(n, *rows.shape[1:]).index_copy(0, index, rows)


def add_prefix_to_cu_seqlens(cu_seqlens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B+1,) offsets of the sequences once every one has ``num_prefix`` tokens in front."""
    steps = torch.arange(cu_seqlens.shape[0], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return cu_seqlens + steps * num_prefix


def insert_prefix(patches: torch.Tensor, prefix: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Put each sequence's prefix tokens in front of its patch tokens.

    Args:
        patches: (T, D) packed patch tokens.
        prefix: (B, P, D) prefix tokens of every sequence.
        cu_seqlens: (B+1,) offsets of ``patches``.

    Returns:
        (T + B * P, D), per sequence [prefix, patches].
    """
    b, p = prefix.shape[:2]
    if p == 0:
        return patches
    seq = seq_index(cu_seqlens, patches.shape[0])
    patch_pos = torch.arange(patches.shape[0], device=patches.device) + (seq + 1) * p
    starts = add_prefix_to_cu_seqlens(cu_seqlens, p)[:-1].long()
    prefix_pos = (starts[:, None] + torch.arange(p, device=patches.device)).reshape(-1)
    rows = torch.cat([patches, prefix.reshape(b * p, -1)])
    return place_rows(rows, torch.cat([patch_pos, prefix_pos]), rows.shape[0])


def split_prefix(x: torch.Tensor, cu_seqlens: torch.Tensor, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``insert_prefix``.

    Args:
        x: (T + B * P, D) packed sequence with prefix tokens.
        cu_seqlens: (B+1,) offsets of the patch tokens only (without prefix).

    Returns:
        patches (T, D) and prefix (B, P, D).
    """
    b = cu_seqlens.shape[0] - 1
    if num_prefix == 0:
        return x, x.new_zeros(b, 0, x.shape[-1])
    seq = seq_index(cu_seqlens)
    patch_pos = torch.arange(seq.shape[0], device=x.device) + (seq + 1) * num_prefix
    starts = add_prefix_to_cu_seqlens(cu_seqlens, num_prefix)[:-1].long()
    prefix_pos = starts[:, None] + torch.arange(num_prefix, device=x.device)
    return x.index_select(0, patch_pos), x[prefix_pos]


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed (T, ...) to padded (B, L, ...) with L = max_seqlen, zeros in the padding.

    Returns:
        padded (B, L, ...) and valid (B, L) bool.
    """
    b = cu_seqlens.shape[0] - 1
    seq, pos = seq_index(cu_seqlens, x.shape[0]), position_in_seq(cu_seqlens, x.shape[0])
    padded = x.new_zeros(b, max_seqlen, *x.shape[1:])
    padded = padded.index_put((seq, pos), x)
    valid = torch.zeros(b, max_seqlen, dtype=torch.bool, device=x.device)
    valid[seq, pos] = True
    return padded, valid


def gather_to_grid(tokens: torch.Tensor, cell_index: torch.Tensor) -> torch.Tensor:
    """Spread packed tokens back onto the base grid: every cell gets the token that covers it.

    Args:
        tokens: (T, D) packed patch tokens.
        cell_index: (B, h, w) long, packed index of the token covering each cell.

    Returns:
        (B, D, h, w).
    """
    b, h, w = cell_index.shape
    return tokens.index_select(0, cell_index.reshape(-1)).view(b, h, w, -1).permute(0, 3, 1, 2)
