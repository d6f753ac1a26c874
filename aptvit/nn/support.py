"""Which timm models ``aptvit.convert`` accepts, checked once, with a message that says why not."""

from __future__ import annotations

from torch import nn

from ..core.io import UserTypeError

SUPPORTED = (
    "timm VisionTransformer with standard Block/Attention blocks and a square conv patch embedding: "
    "vit_* with a class token, class-token-free average-pooled vit_*, deit_* (non-distilled), "
    "CLIP-style pre-norm vit_*_clip_*, register-token vit_*_reg* (DINOv2-style patch 14); "
    "patch sizes such as 14 and 16; global_pool in 'token', 'avg', 'max', 'avgmax' or ''"
)


def check_supported(model: nn.Module) -> None:
    """Raise TypeError naming the class and what is supported unless ``model`` can be converted."""
    from timm.layers import Attention, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    def fail(why: str):
        raise UserTypeError(f"cannot convert {type(model).__name__}: {why}. Supported: {SUPPORTED}")

    if type(model) is not VisionTransformer:
        fail("not a timm VisionTransformer (distilled, hybrid and other subclasses change the forward)")
    if type(model.patch_embed) is not PatchEmbed or not isinstance(model.patch_embed.proj, nn.Conv2d):
        fail(f"patch embedding {type(model.patch_embed).__name__} is not timm's conv PatchEmbed")
    ph, pw = model.patch_embed.patch_size
    if ph != pw or tuple(model.patch_embed.proj.stride) != (ph, pw):
        fail(f"patches must be square and non-overlapping, got patch_size {(ph, pw)}")
    if model.attn_pool is not None:
        fail(f"global_pool={model.global_pool!r} (attention pooling) is not supported")
    if model.global_pool not in ("token", "avg", "max", "avgmax", ""):
        fail(f"global_pool={model.global_pool!r} is not supported")
    if not isinstance(model.patch_drop, nn.Identity):
        fail("patch dropout is not supported; create the model with patch_drop_rate=0")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            fail(f"blocks[{i}] is {type(blk).__name__}, not timm's Block")
        if type(blk.attn) is not Attention:
            fail(f"blocks[{i}].attn is {type(blk.attn).__name__}, not timm's Attention")
