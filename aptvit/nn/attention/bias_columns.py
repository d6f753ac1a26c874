"""A per-key logit bias for kernels that take none (flash-attn, torch's flash kernel), exactly, through extra head
dimensions: q' = [q, 1, 1, 0..], k' = [k, hi, lo, 0..] with hi + lo = bias / scale (see ``key_bias_columns``)."""

from __future__ import annotations

from typing import Tuple

import torch

from ...core.io import InputError

BIAS_COLUMNS = 2  # a bias value split into a high and a low half-precision part: ~16 mantissa bits instead of 8


def bias_head_dim(head_dim: int, multiple: int = 8) -> int:
    """The head size ``key_bias_columns`` pads to: ``head_dim`` plus the bias columns, up to a multiple of 8 (the
    granularity of the flash kernels' head sizes)."""
    return -(-(head_dim + BIAS_COLUMNS) // multiple) * multiple


def key_bias_columns(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, scale: float, multiple: int = 8
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A per-key logit bias for kernels that take none, exactly, through extra head dimensions.

    With q' = [q, 1, 1, 0...] and k' = [k, hi, lo, 0...], where hi + lo = key_bias / scale (hi: the bias rounded to the
    tensors' dtype, lo: the rounding error, rounded again), every logit becomes scale * q'.k' = scale * q.k +
    key_bias[key]. The kernels multiply in half precision and accumulate in float32, so the products with 1 are exact
    and the sum's only error is that of splitting the bias in two: at most 2**-16 of the bias in bf16 (measured: 2e-6 of
    it; one column alone would be off by up to 2**-8 of it, 7e-3 of a logit for a 4x patch), 2**-22 in fp16. v gets
    zeros (kernels that need one head size for q, k and v); slice the output to ``head_dim``.

    Args:
        q, k, v: (N, H, hd) in the kernel's dtype.
        key_bias: (N,) float.
        scale: the softmax scale the kernel will apply (pass it to the kernel).
        multiple: pad the head size to a multiple of this.

    Returns:
        q', k', v': (N, H, ``bias_head_dim(hd)``).
    """
    n, heads, hd = q.shape
    extra = bias_head_dim(hd, multiple) - hd
    target = key_bias.float() / scale
    hi = target.to(k.dtype)
    lo = (target - hi.float()).to(k.dtype)
    zeros = q.new_zeros(n, heads, extra - BIAS_COLUMNS)
    ones = q.new_ones(n, heads, BIAS_COLUMNS)
    cols = torch.stack([hi, lo], 1)[:, None].expand(n, heads, BIAS_COLUMNS)
    return (
        torch.cat([q, ones, zeros], -1),
        torch.cat([k, cols, zeros.to(k.dtype)], -1),
        torch.cat([v, v.new_zeros(n, heads, extra)], -1),
    )


def as_autocast_half(q, k, v):
    """Half-precision kernels: under autocast q/k may come out of a float32 LayerNorm (qk_norm)."""
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else v.dtype
    return (t.to(half) for t in (q, k, v))


MAX_KERNEL_HEAD_DIM = 256  # the largest head size of the flash kernels


def with_bias_columns(q, k, v, key_bias, scale, name):
    """q', k', v' with ``key_bias`` in extra head dimensions, and the scale to pass (the original head size's)."""
    hd = q.shape[-1]
    scale = hd**-0.5 if scale is None else scale  # the padded head size would change the kernel's default
    if bias_head_dim(hd) > MAX_KERNEL_HEAD_DIM:
        raise InputError(
            f"the {name!r} backend adds key_bias through {BIAS_COLUMNS} extra head dimensions, and head size {hd} "
            f"leaves no room under its limit of {MAX_KERNEL_HEAD_DIM}; use attention 'flex' or 'pad'"
        )
    return (*key_bias_columns(q, k, v, key_bias, scale), scale)
