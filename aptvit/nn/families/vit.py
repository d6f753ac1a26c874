"""timm's ``VisionTransformer``: ViT, DeiT, CLIP towers, DINOv2 with registers, SigLIP (attention pool).

Prefix: class token and/or register tokens. Positions: one absolute table, resampled to the image's grid as timm
does, a merged patch taking the mean of its cells' entries. Blocks: timm's ``Block`` (pre-norm attention + MLP,
optional q/k norm, layer scale, stochastic depth per image). Pooling: timm's ``global_pool`` ("token", an
area-weighted "avg", "max", "avgmax", "") or its ``AttentionPoolLatent`` ("map"), then ``fc_norm`` and the head.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ...core.packed import PackedBatch
from ..attention import packed_self_attention, skip_noop
from ..embed import position_bank
from .base import BlockContext, Family, check_patch_embed, drop_path_packed, mlp_forward, mlp_ratio_of
from .pool import GLOBAL_POOLS, attention_pool, check_attention_pool, pool_tokens


def _identity(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity)


class ViTFamily(Family):
    name = "vit"
    timm_classes = ("VisionTransformer",)
    timm_modules = ("timm.models.vision_transformer", "timm.models.deit")
    TIMM_ARGS = (
        "class_token",
        "reg_tokens",
        "no_embed_class",
        "pos_embed",
        "pre_norm",
        "fc_norm",
        "final_norm",
        "qkv_bias",
        "qk_norm",
        "init_values",
        "num_classes",
        "global_pool",
        "img_size",
        "patch_size",
        "in_chans",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "drop_rate",
        "drop_path_rate",
        "attn_drop_rate",
        "proj_drop_rate",
        "pos_drop_rate",
    )
    tiny = {
        "vit_cls": ("vit_tiny_patch16_224", {}),
        "vit_avg_no_cls": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False)),
        "deit": ("deit_tiny_patch16_224", {}),
        "clip_prenorm": ("vit_base_patch16_clip_224", {}),
        "reg_dinov2_p14": ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
        "qknorm_layerscale": (
            "vit_tiny_patch16_224",
            dict(qk_norm=True, init_values=0.5, global_pool="avgmax", reg_tokens=2),
        ),
        "siglip_map": ("vit_base_patch16_siglip_224", {}),
    }
    readme = {
        "models": "`vit_*`, `deit_*`, CLIP `vit_*_clip_*`, DINOv2 / registers `vit_*_reg*`, SigLIP `vit_*_siglip_*`",
        "prefix": "class and/or register tokens",
        "positions": "absolute (mean over a patch's cells)",
        "pooling": "token, avg (area-weighted), max, avgmax, map (attention pool, own image only)",
    }

    # ---- which models
    def accepts(self, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        # exactly timm's class, or a subclass that declares it changes nothing but how its positions resample
        # (``pos_resample``; ``nn.hf``'s twins of Hugging Face models)
        return type(model) is VisionTransformer or (
            isinstance(model, VisionTransformer) and getattr(type(model), "positions_only_subclass", False) is True
        )

    def check(self, model: nn.Module) -> Optional[str]:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        why = check_patch_embed(model)
        if why:
            return why
        if model.attn_pool is not None:
            if model.global_pool != "map":
                return f"global_pool={model.global_pool!r} (attention pooling) is not supported"
            why = check_attention_pool(model.attn_pool)
            if why:
                return why
        elif model.global_pool not in GLOBAL_POOLS:
            return f"global_pool={model.global_pool!r} is not supported"
        if not isinstance(model.patch_drop, nn.Identity):
            return "patch dropout is not supported; create the model with patch_drop_rate=0"
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block:
                return f"blocks[{i}] is {type(blk).__name__}, not timm's Block"
            if type(blk.attn) is not Attention:
                return f"blocks[{i}].attn is {type(blk.attn).__name__}, not timm's Attention"
        return None

    # ---- prefix tokens and positions
    def prefix_params(self, apt) -> Tuple[torch.Tensor, ...]:
        """The prefix token parameters, (1, n, D) each, in timm's order."""
        return tuple(t for t in (getattr(apt, "cls_token", None), getattr(apt, "reg_token", None)) if t is not None)

    def pool_prefix(self, apt) -> bool:
        """timm's ``pool_include_prefix``, where the pool reads patch tokens (avg / max / avgmax / map)."""
        include = bool(getattr(apt.timm_model, "pool_include_prefix", False))
        return include and apt.global_pool in ("avg", "max", "avgmax", "map")

    def position_params(self, apt):
        return (getattr(apt, "pos_embed", None), *self.prefix_params(apt))

    def pos_embed_grid(self, apt, grid: Tuple[int, int]):
        """Position embeddings for a (H/p, W/p) grid, resampled as timm does: (1, D, h, w) and prefix (1, P', D)."""
        pos = getattr(apt, "pos_embed", None)
        if pos is None:
            return None, None
        from timm.layers import resample_abs_pos_embed

        n_prefix = 0 if apt.timm_model.no_embed_class else apt.num_prefix_tokens
        old = tuple(apt.patch_embed.grid_size)
        if tuple(grid) != old:
            resample = getattr(apt.timm_model, "pos_resample", None) or {}  # a Hugging Face twin resamples as HF
            pos = resample_abs_pos_embed(pos, new_size=grid, old_size=old, num_prefix_tokens=n_prefix, **resample)
        grid_pos = pos[:, n_prefix:].reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
        return grid_pos, (pos[:, :n_prefix] if n_prefix else None)

    def positions(self, apt, groups):
        pos_banks, prefix_pos = [], None
        for _, (h, w) in groups:
            pos_grid, prefix_pos = self.pos_embed_grid(apt, (h // apt.patch_size, w // apt.patch_size))
            if pos_grid is not None:
                pos_banks.append(position_bank(pos_grid, apt.patch_sizes))
        pos = torch.cat(pos_banks + [pos_banks[0].new_zeros(1, pos_banks[0].shape[1])]) if pos_banks else None
        prefix = self.prefix_params(apt)
        if prefix:
            prefix = torch.cat(prefix, dim=1)[0]  # (P, D)
            prefix = prefix + prefix_pos[0] if prefix_pos is not None else prefix
        return pos, (prefix if len(prefix) else None)

    # ---- blocks and head
    def block(self, apt, blk: nn.Module, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """timm's ``Block.forward`` on packed tokens (drop path per image)."""
        packed = ctx.packed
        a = packed_self_attention(blk.attn, blk.norm1(x), ctx.attention)
        x = x + drop_path_packed(skip_noop(blk.ls1, a), blk.drop_path1, packed.seq, packed.num_seqs, ctx.training)
        y = skip_noop(blk.ls2, mlp_forward(blk.mlp, blk.norm2(x)))
        return x + drop_path_packed(y, blk.drop_path2, packed.seq, packed.num_seqs, ctx.training)

    def pool(self, apt, x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
        """timm's ``VisionTransformer.pool`` on packed tokens: (N, D) -> (B, D)."""
        pool = apt.timm_model.attn_pool  # a registered module of ``apt`` too, when present
        if pool is not None:
            bias = packed.key_bias if apt.config.area_bias else None  # keys weigh as the cells they cover
            return attention_pool(pool, x, packed, key_bias=bias)
        return pool_tokens(x, packed, apt.global_pool)

    def forward_head(self, apt, x: torch.Tensor, packed: PackedBatch, pre_logits: bool = False) -> torch.Tensor:
        x = skip_noop(apt.head_drop, skip_noop(apt.fc_norm, self.pool(apt, x, packed)))
        return x if pre_logits else apt.head(x)

    def head_flops(self, apt, tokens: torch.Tensor) -> torch.Tensor:
        """The classifier, plus an attention pool's matmuls: keys and values of every token, the latent queries'
        scores and weighted sums over them, and its projection and MLP per latent."""
        flops = super().head_flops(apt, tokens)
        pool = apt.timm_model.attn_pool
        if pool is None:
            return flops
        n = tokens.double() + (apt.num_prefix_tokens if self.pool_prefix(apt) else 0)
        width, latents = pool.num_heads * pool.head_dim, pool.latent_len
        kv = 2.0 * pool.kv.in_features * pool.kv.out_features * n
        per_latent = sum(  # q, proj and the MLP: once per latent query
            2.0 * m.in_features * m.out_features
            for m in pool.modules()
            if isinstance(m, nn.Linear) and m is not pool.kv
        )
        return flops + kv + latents * (per_latent + 4.0 * width * n)

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    # ---- checkpoints
    def timm_args(self, vit: nn.Module) -> Dict:
        """Everything the family varies (prefix tokens, norms, q/k norm, layer scale, biases, pooling), read off the
        instance, so that a tiny or customised model re-creates from its architecture name alone."""
        blk = vit.blocks[0] if len(vit.blocks) else None
        args = {
            "class_token": bool(vit.has_class_token),
            "reg_tokens": int(vit.num_reg_tokens),
            "no_embed_class": bool(vit.no_embed_class),
            "pos_embed": "learn" if vit.pos_embed is not None else "none",
            "pre_norm": not _identity(vit.norm_pre),
            "fc_norm": not _identity(vit.fc_norm),
            "final_norm": not (_identity(vit.norm) and _identity(vit.fc_norm)),
            "qkv_bias": blk is not None and blk.attn.qkv.bias is not None,
            "qk_norm": blk is not None and not _identity(blk.attn.q_norm),
            "init_values": 1e-5 if blk is not None and not _identity(blk.ls1) else None,  # value: from the weights
            "num_classes": vit.num_classes,
            "global_pool": vit.global_pool,
            "img_size": list(vit.patch_embed.img_size),
            "patch_size": vit.patch_embed.patch_size[0],
            "in_chans": vit.patch_embed.proj.in_channels,
            "embed_dim": vit.embed_dim,
            "depth": len(vit.blocks),
            "num_heads": vit.blocks[0].attn.num_heads if len(vit.blocks) else 1,
        }
        fc1 = getattr(vit.blocks[0].mlp, "fc1", None) if len(vit.blocks) else None
        if isinstance(fc1, nn.Linear) and type(vit.blocks[0].mlp).__name__ == "Mlp":
            args["mlp_ratio"] = mlp_ratio_of(fc1.out_features, vit.embed_dim)
        return args

    def max_position_prefix(self, args: Dict) -> int:
        return 1 + int(args.get("reg_tokens") or 0)
