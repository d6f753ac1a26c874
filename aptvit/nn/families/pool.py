"""Pooling packed tokens per image, for every family: class token, area-weighted mean / max, attention pool.

All of them read the plan's per-token tables (``prefix_pos``, ``pool_seq``, ``pool_weight``): gathers, scatters and
elementwise math, no host sync, no data-dependent shape, and never a token of one image in another's result.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...core.packed import PackedBatch

GLOBAL_POOLS = ("token", "avg", "max", "avgmax", "")  # what ``pool_tokens`` computes ("": no pooling)


def pool_tokens(x: torch.Tensor, packed: PackedBatch, pool: str) -> torch.Tensor:
    """timm's ``global_pool_nlc`` on packed tokens; the average weighs each token by the base cells it covers.

    Args:
        x: (N, D) packed final tokens.
        pool: "token" (the first prefix token), "avg", "max", "avgmax" or "" (x unchanged).

    Returns:
        (B, D), or x for "".
    """
    b = packed.batch_size
    if pool == "token":
        return x.index_select(0, packed.prefix_pos[:, 0])
    if pool not in ("avg", "max", "avgmax"):
        return x
    rows = packed.num_seqs + 1  # one dump row for the tokens that are not pooled
    avg = mx = None
    if pool != "max":
        weighted = x * packed.pool_weight.to(x.dtype)[:, None]
        avg = x.new_zeros(rows, x.shape[1]).index_add_(0, packed.pool_seq, weighted)[:b]
    if pool != "avg":
        index = packed.pool_seq[:, None].expand_as(x)
        mx = x.new_full((rows, x.shape[1]), float("-inf")).scatter_reduce_(0, index, x, "amax")[:b]
    return avg if pool == "avg" else mx if pool == "max" else 0.5 * (mx + avg)


def check_attention_pool(pool: nn.Module) -> Optional[str]:
    """Why a timm ``AttentionPoolLatent`` cannot run packed, or None."""
    from timm.layers import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        return f"attention pool {type(pool).__name__} is not timm's AttentionPoolLatent"
    if pool.pos_embed is not None:
        return "an attention pool with its own position embedding (pos_embed='abs') is not supported"
    if pool.pool not in ("token", "avg", ""):
        return f"attention pool type {pool.pool!r} is not supported"
    return None


def attention_pool(
    pool: nn.Module, x: torch.Tensor, packed: PackedBatch, key_bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` on packed tokens: every image's latent queries attend to its own tokens only.

    A cross-attention with one softmax per (image, head, latent) over that image's pooled tokens (``pool_seq``;
    the prefix tokens take part only where the plan pools them), computed as a segment softmax: per-token scores,
    the per-image maximum by ``scatter_reduce``, sums by ``index_add``. Static shapes, no padding, no host sync.

    Args:
        pool: timm ``AttentionPoolLatent`` (its q / kv projections, q / k norms, output projection, MLP).
        x: (N, D) packed final tokens.
        key_bias: (N,) float added to every key's score (e.g. the log of its area in base cells, so that a
            merged token weighs as the cells it covers); None for timm's pool.

    Returns:
        (B, out_features) pooled ("token" / "avg" over the latents), or (B, L, out_features) for pool type "".
    """
    n, b = x.shape[0], packed.batch_size
    heads, hd, latents = pool.num_heads, pool.head_dim, pool.latent_len
    rows = packed.num_seqs + 1  # images, the padding sequence, a dump row for tokens that are not pooled
    owner = packed.pool_seq  # (N,) the image whose queries see this token, or the dump row

    q = pool.q(pool.latent[0]).view(latents, heads, hd)
    k, v = pool.kv(x).view(n, 2, heads, hd).unbind(1)  # (N, H, hd)
    q, k = pool.q_norm(q), pool.k_norm(k)
    scores = torch.einsum("nhd,lhd->nhl", k, q.to(k.dtype)) * pool.scale  # (N, H, L)
    if key_bias is not None:
        scores = scores + key_bias.to(scores.dtype)[:, None, None]
    # softmax within each image: subtract its max (a constant per softmax: no gradient needed through it)
    index = owner[:, None, None].expand_as(scores)
    peak = scores.new_full((rows, heads, latents), float("-inf")).scatter_reduce_(0, index, scores.detach(), "amax")
    e = (scores - peak.index_select(0, owner)).exp()
    total = scores.new_zeros(rows, heads, latents).index_add_(0, owner, e)
    weight = e / total.index_select(0, owner)  # (N, H, L)
    out = x.new_zeros(rows, heads, latents, hd).index_add_(0, owner, weight[..., None] * v[:, :, None, :].to(x.dtype))
    out = out[:b].permute(0, 2, 1, 3).reshape(b, latents, heads * hd)  # timm: (B, L, C)

    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    if pool.pool == "avg":
        return out.mean(1)
    return out
