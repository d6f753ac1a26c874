"""timm's ``Eva``: EVA-02 (``eva02_*``), DINOv3 (``vit_*_dinov3``), Perception Encoder (``vit_pe_core_*``), RoPE-ViT
(``vit_*_rope_*``) and the other models of ``timm.models.eva``.

Prefix: class and/or register tokens, in timm's order (class, registers). Positions: an optional absolute table
(as the ViT family: resampled to the image's grid, a merged patch taking the mean of its cells' entries) and rotary
positions (``core.rope``): every patch is rotated at its centre in base-grid units (fractional for a merged patch),
with the model's own flavour (axial ``RotaryEmbeddingCat``, learned per-block ``RotaryEmbeddingMixed``, DINOv3's
``RotaryEmbeddingDinoV3``, ``RotaryEmbeddingMRope``); prefix and padding rows get the identity rotation, which is
timm's treatment of the prefix tokens (``num_prefix_tokens`` rows are never rotated). Blocks: ``EvaBlock`` (pre-norm,
layer scales ``gamma_1`` / ``gamma_2``) and ``EvaBlockPostNorm``; attention ``EvaAttention`` (fused qkv with q / v
biases and a zero k bias, or separate projections) or timm's ``AttentionRope`` (grouped-query too), q / k norms,
the rotation applied on the packed q / k after their norms, then any backend's kernel. MLPs (``Mlp``, ``GluMlp``,
``SwiGLU``) run per token as they are. Pooling: timm's ``Eva.pool``: avg (area-weighted, prefix excluded), max,
avgmax, token, or the attention pool ("map", PE), which in ``Eva`` sees the prefix tokens too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.io import InputError
from ...core.packed import PackedBatch
from ...core.rope import (
    RopeGrid,
    axial_angles,
    dinov3_angles,
    grid_coords,
    layout_centres,
    mixed_angles,
    mrope_angles,
    packed_coords,
    sincos_table,
)
from .base import BlockContext, check_patch_embed, drop_path_packed, mlp_ratio_of
from .pool import GLOBAL_POOLS, check_attention_pool
from .vit import ViTFamily


def _identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


# ---------------------------------------------------------------------------------------------- rotary positions
def rope_flavour(rope: nn.Module) -> str:
    """The flavour of a timm RoPE module: "cat", "mixed", "dinov3" or "mrope" (ValueError for any other)."""
    from timm.layers import pos_embed_sincos as ps

    kinds = {
        ps.RotaryEmbeddingCat: "cat",
        ps.RotaryEmbeddingMixed: "mixed",
        ps.RotaryEmbeddingDinoV3: "dinov3",
        ps.RotaryEmbeddingMRope: "mrope",
    }
    if type(rope) not in kinds:
        raise InputError(f"rotary embedding {type(rope).__name__} is not supported")
    return kinds[type(rope)]


def rope_grid(rope: nn.Module) -> RopeGrid:
    """The coordinate settings of a timm RoPE module (``core.rope.RopeGrid``), read off the module."""
    flavour = rope_flavour(rope)
    if flavour == "cat":
        ref = tuple(int(v) for v in rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
        return RopeGrid("index", float(rope.grid_offset), ref, rope.grid_indexing)
    if flavour == "dinov3":
        return RopeGrid("centered", float(rope.grid_offset), None, rope.grid_indexing, rope.normalize_coords)
    return RopeGrid("index", 0.0, None, rope.grid_indexing)  # mixed and mrope: plain cell indices


def check_rope(rope: Optional[nn.Module]) -> Optional[str]:
    """Why a timm RoPE module cannot be evaluated at fractional centres here, or None."""
    if rope is None:
        return None
    try:
        flavour = rope_flavour(rope)
    except ValueError as e:
        return str(e)
    if getattr(rope, "aug_active", False):
        return (
            "RoPE coordinate augmentation (rope_shift_coords / rope_jitter_coords / rope_rescale_coords) is not "
            "supported; create the model without it"
        )
    if flavour == "cat" and getattr(rope, "grid_type", "index") != "index":
        return f"RotaryEmbeddingCat with grid_type={rope.grid_type!r} (in_pixels) is not supported"
    return None


@dataclass(frozen=True)
class RopeTables:
    """One forward's rotary tables, for every packed row.

    Attributes:
        table: (N, 1, 2 hd) [sin, cos] shared by every block and head, or (depth, N, H, 2 hd) per block and head
            (mixed RoPE's learned frequencies); identity rows (sin 0, cos 1) for prefix and padding tokens.
        half: timm's ``rotate_half`` layout (else interleaved pairs).
        per_block: ``table`` has a leading block dimension.
    """

    table: torch.Tensor
    half: bool
    per_block: bool

    def for_block(self, index: int) -> torch.Tensor:
        return self.table[index] if self.per_block else self.table


def rope_tables(rope: nn.Module, packed: PackedBatch) -> RopeTables:
    """The [sin, cos] tables of every packed row for ``rope`` (a timm RoPE module), from the plan.

    Shape-static device ops on the plan's layout (no host sync); learned frequencies (mixed) keep their gradient.
    """
    flavour = rope_flavour(rope)
    centres, grids = layout_centres(packed.layout)
    coords = packed_coords(grid_coords(centres, grids, rope_grid(rope)), packed.patch_pos, packed.total)
    if flavour == "mixed":  # (depth, H, N, F) -> (depth, N, H, 2 hd): the packed (N, H, hd) layout of q and k
        table = sincos_table(mixed_angles(coords, rope.freqs), False).permute(0, 2, 1, 3)
        return RopeTables(table, False, True)
    if flavour == "cat":
        angles, half = axial_angles(coords, rope.bands), bool(rope.rotate_half)
    elif flavour == "dinov3":
        angles, half = dinov3_angles(coords, rope.periods), bool(rope.rotate_half)
    else:  # mrope: always the half layout
        angles, half = mrope_angles(coords, rope.inv_freq, rope.axis), True
    return RopeTables(sincos_table(angles, half)[:, None], half, False)


def rotate(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, half: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm's ``apply_rot_embed_cat`` on packed (N, H, hd) q and k (identity rows leave prefix tokens exactly as
    they are), then timm's ``type_as(v)``."""
    from timm.layers import apply_rot_embed_cat

    return apply_rot_embed_cat(q, table, half=half), apply_rot_embed_cat(k, table, half=half)


# ---------------------------------------------------------------------------------------------- attention
def eva_qkv(attn: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (N, H, hd), k and v (N, H_kv, hd) of ``EvaAttention`` or ``AttentionRope`` on packed x (N, D), with
    their own projections and biases (EvaAttention's fused q / zero-k / v bias, added in or after the matmul)."""
    t, heads = x.shape[0], attn.num_heads
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.view(t, 3, heads, -1).unbind(1)
    else:
        kv_heads = getattr(attn, "num_kv_heads", heads)
        q = attn.q_proj(x).view(t, heads, -1)
        k = attn.k_proj(x).view(t, kv_heads, -1)
        v = attn.v_proj(x).view(t, kv_heads, -1)
    return q, k, v


def eva_attention(
    attn: nn.Module,
    x: torch.Tensor,
    ctx: BlockContext,
    table: Optional[torch.Tensor],
    half: bool,
) -> torch.Tensor:
    """timm's ``EvaAttention`` / ``AttentionRope`` forward on packed tokens (N, D) -> (N, D).

    The rotation (``table`` from ``rope_tables``) is applied to q and k after their norms and before the kernel,
    so every backend sees rotated q / k; grouped-query k / v heads are repeated after it, as timm does. The
    backend's context (``ctx.attention``) carries the key bias of area-proportional attention.
    """
    t = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = eva_qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if table is not None:
        q, k = rotate(q, k, table, half)
        q, k = q.type_as(v), k.type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = ctx.attention.backend.attend(q, k, v, ctx.attention, attn.attn_drop.p if attn.training else 0.0, attn.scale)
    out = attn.norm(out.reshape(t, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


# ---------------------------------------------------------------------------------------------- the family
class EvaFamily(ViTFamily):
    name = "eva"
    timm_classes = ("Eva",)
    timm_modules = ("timm.models.eva",)
    TIMM_ARGS = (
        "class_token",
        "num_reg_tokens",
        "no_embed_class",
        "use_abs_pos_emb",
        "use_rot_pos_emb",
        "rope_type",
        "rope_temperature",
        "rope_grid_offset",
        "rope_grid_indexing",
        "rope_rotate_half",
        "ref_feat_shape",
        "attn_type",
        "qkv_fused",
        "qkv_bias",
        "qk_norm",
        "num_kv_heads",
        "init_values",
        "attn_only_layer_scale",
        "swiglu_mlp",
        "scale_mlp",
        "scale_attn_inner",
        "use_post_norm",
        "use_pre_transformer_norm",
        "use_post_transformer_norm",
        "use_fc_norm",
        "attn_pool_num_heads",
        "attn_pool_mlp_ratio",
        "dynamic_img_size",
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
        # EVA-02: absolute table + axial RoPE on a reference grid, fused qkv with q / v biases, GluMlp, avg + fc_norm
        "eva02": ("eva02_tiny_patch14_224", dict(img_size=112)),
        # EVA-02 B/L style without its absolute table: separate q / k / v projections, SwiGLU with its norm
        "eva02_sep_no_abs": ("eva02_base_patch14_448", dict(img_size=112, use_abs_pos_emb=False)),
        # DINOv3: class + 4 registers, DINOv3 RoPE (centred, normalised, half layout), layer scales, no qkv bias
        "dinov3": ("vit_small_patch16_dinov3", dict(img_size=128)),
        # RoPE-ViT mixed: AttentionRope, learned per-block frequencies, class token pooling, layer scales
        "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=128)),
        # Perception Encoder: pre-norm, axial RoPE (offset 1, xy, reference grid) + absolute table, attention pool
        "pe_map": ("vit_pe_core_tiny_patch16_384", dict(img_size=128, attn_pool_num_heads=2)),
    }
    readme = {
        "models": "EVA-02 `eva02_*`, DINOv3 `vit_*_dinov3`, Perception Encoder `vit_pe_core_*`, RoPE-ViT "
        "`vit_*_rope_*`",
        "prefix": "class and/or register tokens (never rotated)",
        "positions": "absolute (mean over a patch's cells) and/or RoPE at the patch's centre "
        "(axial, mixed, DINOv3, MRoPE)",
        "pooling": "avg (area-weighted), max, avgmax, token, map (attention pool)",
    }

    # ---- which models
    def accepts(self, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return type(model) is Eva

    def check(self, model: nn.Module) -> Optional[str]:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

        why = check_patch_embed(model)
        if why:
            return why
        if model.patch_drop is not None:
            return "patch dropout is not supported; create the model with patch_drop_rate=0"
        if model.attn_pool is not None:
            why = check_attention_pool(model.attn_pool)
            if why:
                return why
        elif model.global_pool not in GLOBAL_POOLS:
            return f"global_pool={model.global_pool!r} is not supported"
        why = check_rope(model.rope)
        if why:
            return why
        for i, blk in enumerate(model.blocks):
            if type(blk) not in (EvaBlock, EvaBlockPostNorm):
                return f"blocks[{i}] is {type(blk).__name__}, not timm's EvaBlock or EvaBlockPostNorm"
            if type(blk.attn) not in (EvaAttention, AttentionRope):
                return f"blocks[{i}].attn is {type(blk.attn).__name__}, not timm's EvaAttention or AttentionRope"
        return None

    # ---- prefix tokens and positions (the absolute table: the ViT family's, same attribute names and order)
    def pool_prefix(self, apt) -> bool:
        """timm's ``Eva.pool``: the attention pool sees every token; avg / max leave the prefix out."""
        return apt.timm_model.attn_pool is not None

    def token_tables(self, apt, packed: PackedBatch) -> Optional[RopeTables]:
        rope = apt.timm_model.rope
        return None if rope is None else rope_tables(rope, packed)

    # ---- blocks
    def block(self, apt, blk: nn.Module, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """timm's ``EvaBlock`` / ``EvaBlockPostNorm`` forward on packed tokens (stochastic depth per image)."""
        from timm.models.eva import EvaBlockPostNorm

        tables: Optional[RopeTables] = ctx.tables
        table = half = None
        if tables is not None:
            index = next(i for i, b in enumerate(apt.blocks) if b is blk) if tables.per_block else 0
            table, half = tables.for_block(index), tables.half
        packed, training = ctx.packed, ctx.training

        def drop(y, module):
            return drop_path_packed(y, module, packed.seq, packed.num_seqs, training)

        if type(blk) is EvaBlockPostNorm:
            x = x + drop(blk.norm1(eva_attention(blk.attn, x, ctx, table, half)), blk.drop_path1)
            return x + drop(blk.norm2(blk.mlp(x)), blk.drop_path2)
        a = eva_attention(blk.attn, blk.norm1(x), ctx, table, half)
        x = x + drop(a if blk.gamma_1 is None else blk.gamma_1 * a, blk.drop_path1)
        m = blk.mlp(blk.norm2(x))
        return x + drop(m if blk.gamma_2 is None else blk.gamma_2 * m, blk.drop_path2)

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "reg_token", "rope.freqs"}

    # ---- checkpoints
    def timm_args(self, model: nn.Module) -> Dict:
        """Everything the family varies, read off the instance, so that a tiny or customised model re-creates from
        its architecture name alone."""
        from timm.layers import AttentionRope, GluMlp, SwiGLU
        from timm.models.eva import EvaBlockPostNorm

        blk = model.blocks[0] if len(model.blocks) else None
        attn = blk.attn if blk is not None else None
        rope = model.rope
        args = {
            "class_token": model.cls_token is not None,
            "num_reg_tokens": int(model.reg_token.shape[1]) if model.reg_token is not None else 0,
            "no_embed_class": bool(model.no_embed_class),
            "use_abs_pos_emb": model.pos_embed is not None,
            "use_rot_pos_emb": rope is not None,
            "use_pre_transformer_norm": not _identity(model.norm_pre),
            "use_post_transformer_norm": not _identity(model.norm),
            "use_fc_norm": not _identity(model.fc_norm),
            "dynamic_img_size": bool(model.dynamic_img_size),
            "num_classes": model.num_classes,
            "global_pool": model.global_pool,
            "img_size": list(model.patch_embed.img_size),
            "patch_size": model.patch_embed.patch_size[0],
            "in_chans": model.patch_embed.proj.in_channels,
            "embed_dim": model.embed_dim,
            "depth": len(model.blocks),
            "num_heads": attn.num_heads if attn is not None else 1,
        }
        if rope is not None:
            flavour = rope_flavour(rope)
            args["rope_type"] = flavour
            args["rope_temperature"] = float(rope.temperature)
            args["rope_grid_indexing"] = rope.grid_indexing
            if flavour in ("cat", "dinov3"):
                args["rope_grid_offset"] = float(rope.grid_offset)
                args["rope_rotate_half"] = bool(rope.rotate_half)
            if flavour == "cat":
                args["ref_feat_shape"] = list(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
        if attn is not None:
            rope_attn = type(attn) is AttentionRope
            args["attn_type"] = "rope" if rope_attn else "eva"
            args["qkv_fused"] = attn.qkv is not None
            if attn.qkv is not None:
                args["qkv_bias"] = (attn.qkv.bias is not None) if rope_attn else (attn.q_bias is not None)
            else:
                args["qkv_bias"] = attn.q_proj.bias is not None
            args["qk_norm"] = not _identity(attn.q_norm)
            args["scale_attn_inner"] = not _identity(attn.norm)
            if rope_attn and attn.num_kv_heads != attn.num_heads:
                args["num_kv_heads"] = [int(b.attn.num_kv_heads) for b in model.blocks]
            post = type(blk) is EvaBlockPostNorm
            args["use_post_norm"] = post
            if not post:
                args["init_values"] = 1e-5 if blk.gamma_1 is not None else None  # the value: from the weights
                args["attn_only_layer_scale"] = blk.gamma_1 is not None and blk.gamma_2 is None
            mlp = blk.mlp
            args["swiglu_mlp"] = isinstance(mlp, (GluMlp, SwiGLU))
            args["scale_mlp"] = not _identity(getattr(mlp, "norm", None))
            # timm's EvaBlock builds int(dim * mlp_ratio) hidden features for Mlp, SwiGLU and GluMlp alike (GluMlp's
            # fc1 holds both halves, 2x that): fc2's input width is the hidden width of all three
            args["mlp_ratio"] = mlp_ratio_of(mlp.fc2.in_features, model.embed_dim)
        if model.attn_pool is not None:
            pool = model.attn_pool
            args["attn_pool_num_heads"] = pool.num_heads
            if pool.mlp is not None:
                args["attn_pool_mlp_ratio"] = mlp_ratio_of(pool.mlp.fc1.out_features, model.embed_dim)
        return args

    def max_position_prefix(self, args: Dict) -> int:
        return int(args.get("class_token", True)) + int(args.get("num_reg_tokens") or 0)
