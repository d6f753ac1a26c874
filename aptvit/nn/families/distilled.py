"""timm's ``VisionTransformerDistilled``: DeiT with a distillation token (``deit_*_distilled_*``).

A ``VisionTransformer`` in everything but its prefix and head: two prefix tokens (class, then distillation, both
with their own position entries unless ``no_embed_class``) and two classifiers, ``head`` on the class token and
``head_dist`` on the distillation token. As timm: the logits are their average, except in training with
``set_distilled_training(True)``, which returns the pair (class logits, distillation logits) for a distillation
loss; ``pre_logits`` is the average of the two tokens.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ...core.packed import PackedBatch
from .vit import ViTFamily


class DistilledFamily(ViTFamily):
    name = "distilled"
    timm_classes = ("VisionTransformerDistilled",)
    timm_modules = ("timm.models.deit",)
    tiny = {"deit_distilled": ("deit_tiny_distilled_patch16_224", {})}
    readme = {
        "models": "distilled DeiT `deit_*_distilled_*`",
        "prefix": "class + distillation token",
        "positions": "absolute (mean over a patch's cells)",
        "pooling": "both tokens, two heads (averaged; a pair in distilled training)",
    }

    def accepts(self, model: nn.Module) -> bool:
        from timm.models.deit import VisionTransformerDistilled

        return type(model) is VisionTransformerDistilled

    def check(self, model: nn.Module) -> Optional[str]:
        if model.num_reg_tokens:
            return "register tokens with a distillation token are not supported"
        return super().check(model)

    def prefix_params(self, apt) -> Tuple[torch.Tensor, ...]:
        return (apt.cls_token, apt.dist_token)

    def pool_prefix(self, apt) -> bool:
        return False

    def forward_head(self, apt, x: torch.Tensor, packed: PackedBatch, pre_logits: bool = False):
        """timm's ``VisionTransformerDistilled.forward_head`` on the two prefix tokens of every image."""
        x, x_dist = x.index_select(0, packed.prefix_pos[:, 0]), x.index_select(0, packed.prefix_pos[:, 1])
        x, x_dist = apt.head_drop(x), apt.head_drop(x_dist)
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = apt.head(x), apt.head_dist(x_dist)
        if apt.timm_model.distilled_training and apt.training:
            return x, x_dist  # separate predictions for a distillation loss, as timm
        return (x + x_dist) / 2

    def classifiers(self, apt) -> Tuple[nn.Module, ...]:
        return (apt.head, apt.head_dist)

    def timm_args(self, vit: nn.Module) -> Dict:
        args = super().timm_args(vit)
        del args["class_token"], args["reg_tokens"]  # fixed by the class (its two prefix tokens)
        return args

    def max_position_prefix(self, args: Dict) -> int:
        return 2
