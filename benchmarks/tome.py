"""Token Merging (ToMe) for timm's VisionTransformer, written from the paper's description.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023. In every block, between the
attention and the MLP branch, ``r`` tokens are merged away by bipartite soft matching:

1. split the tokens alternately into two sets A (even positions) and B (odd positions);
2. similarity = cosine similarity of the attention keys (averaged over heads);
3. each token of A draws an edge to its most similar token of B;
4. the ``r`` most similar edges are kept; each such A token is merged into its B token;
5. merging is a size-weighted average (size = how many input patches a token stands for), and the
   sizes add up;
6. attention is proportional: log(size) is added to the attention logits of each key, so a merged
   token counts as the patches it stands for.

The class token is never merged. Unmerged A tokens keep their order, followed by B. This is an
independent implementation for the benchmark; no code from the authors' repository was used.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

Merge = Callable[[torch.Tensor], torch.Tensor]


def max_merge(n: int, protect_first: int = 1) -> int:
    """How many tokens one matching can remove from ``n``: the unprotected tokens of A (even positions)."""
    return (n + 1) // 2 - (protect_first + 1) // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: int = 1) -> Merge:
    """The merge of ``r`` tokens chosen by bipartite soft matching on ``metric``.

    Args:
        metric: (B, N, C) per-token features to compare (the keys).
        r: tokens to remove; at most the size of set A that may merge.
        protect_first: leading tokens (class token) that never merge; they stay in front.

    Returns:
        ``merge(x (B, N, C')) -> (B, N - r, C')`` that sums merged tokens (callers weight by size).
    """
    if protect_first not in (0, 1):
        raise ValueError(f"protect_first must be 0 or 1 (the class token), got {protect_first}")
    r = min(r, max_merge(metric.shape[1], protect_first))
    if r <= 0:
        return lambda x: x
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, |A|, |B|)
    protected = torch.arange(a.shape[1], device=metric.device) * 2 < protect_first
    scores = scores.masked_fill(protected[None, :, None], -torch.inf)
    best, best_b = scores.max(dim=-1)  # (B, |A|)
    order = best.argsort(dim=-1, descending=True)
    merged_a = order[:, :r]  # A tokens that merge away
    kept_a = order[:, r:].sort(dim=-1).values  # the rest keep their order (the class token first)
    into_b = best_b.gather(1, merged_a)

    def merge(x: torch.Tensor) -> torch.Tensor:
        xa, xb = x[:, ::2], x[:, 1::2]
        c = x.shape[-1]
        src = xa.gather(1, merged_a[..., None].expand(-1, -1, c))
        xb = xb.scatter_add(1, into_b[..., None].expand(-1, -1, c), src)
        return torch.cat([xa.gather(1, kept_a[..., None].expand(-1, -1, c)), xb], dim=1)

    return merge


def merge_weighted(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged tokens: x (B, N, C), size (B, N, 1) -> (B, N - r, C), (B, N - r, 1)."""
    total = merge(size)
    return merge(x * size) / total, total


def proportional_attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm's ``Attention`` with log(size) added to every key's logit; also returns the keys (mean over heads).

    Args:
        attn: a timm ``Attention`` module.
        x: (B, N, C) normalised input.
        size: (B, N, 1) patches per token.

    Returns:
        output (B, N, C) and keys (B, N, head_dim).
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = size.log().transpose(1, 2)[:, None]  # (B, 1, 1, N): one bias per key
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.to(q.dtype), dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    y = attn.norm(y.transpose(1, 2).reshape(b, n, -1))
    return attn.proj_drop(attn.proj(y)), k.mean(dim=1)


def token_schedule(tokens: int, r: Union[int, Sequence[int]], depth: int, prefix: int = 1) -> List[Tuple[int, int]]:
    """(tokens into the block, tokens merged in it) per block, the merge capped as ``bipartite_soft_matching`` caps it."""
    rs = [r] * depth if isinstance(r, int) else list(r)
    if len(rs) != depth:
        raise ValueError(f"r has {len(rs)} entries for {depth} blocks")
    out, n = [], tokens
    for ri in rs:
        ri = max(0, min(ri, max_merge(n, prefix)))
        out.append((n, ri))
        n -= ri
    return out


class ToMeViT(nn.Module):
    """A timm VisionTransformer (shared, not copied) that merges ``r`` tokens in every block.

    Supports the plain timm ViT (class token, no registers, no layer-scale gates beyond timm's own
    ``ls1``/``ls2``); pooling "token", or "avg" weighted by token size.
    """

    def __init__(self, vit: nn.Module, r: Union[int, Sequence[int]] = 0) -> None:
        super().__init__()
        if getattr(vit, "global_pool", None) not in ("token", "avg"):
            raise ValueError(
                f"ToMeViT supports global_pool 'token' or 'avg', got {getattr(vit, 'global_pool', None)!r}"
            )
        if vit.num_prefix_tokens != 1 - int(vit.global_pool == "avg" and vit.cls_token is None):
            raise ValueError("ToMeViT supports one class token (or none with avg pooling), no register tokens")
        if any(getattr(b.attn, "gate", None) is not None for b in vit.blocks):
            raise ValueError("ToMeViT does not support gated attention")
        self.vit = vit
        self.r = r

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Final tokens (B, N', C) after the norm, and their sizes (B, N', 1)."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        schedule = token_schedule(x.shape[1], self.r, len(vit.blocks), vit.num_prefix_tokens)
        for blk, (_, r) in zip(vit.blocks, schedule):
            a, keys = proportional_attention(blk.attn, blk.norm1(x), size)
            x = x + blk.drop_path1(blk.ls1(a))
            if r:
                x, size = merge_weighted(bipartite_soft_matching(keys, r, vit.num_prefix_tokens), x, size)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return vit.norm(x), size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) for normalised images (B, C, H, W)."""
        vit = self.vit
        x, size = self.forward_features(x)
        if vit.global_pool == "token":
            x = x[:, 0]
        else:
            p = vit.num_prefix_tokens
            x = (x[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)
        return vit.head(vit.head_drop(vit.fc_norm(x)))


def tome_flops(vit: nn.Module, r: Union[int, Sequence[int]], tokens: int) -> float:
    """FLOPs per image, counted as ``aptvit.core.flops`` counts them, plus the matching's similarity matmul.

    Args:
        vit: the timm ViT.
        r: tokens merged per block.
        tokens: patch tokens of the input (without the class token).
    """
    p = vit.num_prefix_tokens
    dim = vit.embed_dim
    patch = vit.patch_embed.patch_size[0]
    total = 2.0 * tokens * vit.patch_embed.proj.in_channels * patch * patch * dim + 2.0 * dim * vit.num_classes
    for blk, (n, ri) in zip(vit.blocks, token_schedule(tokens + p, r, len(vit.blocks), p)):
        attn_linear = (
            blk.attn.qkv.in_features * blk.attn.qkv.out_features
            + blk.attn.proj.in_features * blk.attn.proj.out_features
        )
        mlp = sum(m.in_features * m.out_features for m in blk.mlp.modules() if isinstance(m, nn.Linear))
        attn_dim = blk.attn.num_heads * blk.attn.head_dim
        total += 2 * n * attn_linear + 4 * n * n * attn_dim + 2 * (n - ri) * mlp
        if ri:
            total += 2 * ((n + 1) // 2) * (n // 2) * blk.attn.head_dim  # cosine similarity of A against B
    return float(total)
