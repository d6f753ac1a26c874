"""The original ViT (``ViTModel``) as timm's ``VisionTransformer``: class token with a position, the final norm on
every token, and HF's pooler (a linear and tanh on the class token) as the head.

HF outputs: ``last_hidden_state`` after the final norm; ``pooler_output`` the pooler's output (timm's head, so
``apt(images)`` is it; None for a model built with ``add_pooling_layer=False``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from torch import nn

from ...core.io import InputError
from .base import VIT_CONFIG_KEYS, Spec, blocks, common_kwargs, count, mlp_ratio, rename, take


class ViTSpec(Spec):
    name = "vit"
    classes = ("ViTModel",)
    module = "vit"
    config_keys = VIT_CONFIG_KEYS + (
        "qkv_bias",
        "pooler_output_size",
        "pooler_act",
    )
    # ViTImageProcessor: squashed to a square, bilinear
    processor = {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": 0.5, "image_std": 0.5}
    ignored = ("embeddings.mask_token",)

    def parts(self, hf):
        return hf, {"pooler": hf.pooler is not None}, {}

    def vit_kwargs(self, cfg, options):
        return dict(
            common_kwargs(cfg),
            mlp_ratio=mlp_ratio(count(cfg, "intermediate_size"), cfg["hidden_size"]),
            class_token=True,
            global_pool="token",
            fc_norm=False,
            qkv_bias=bool(cfg.get("qkv_bias", True)),
        )

    def head(self, cfg, options) -> Optional[nn.Module]:
        if not options.get("pooler"):
            return None
        if cfg.get("pooler_act", "tanh") != "tanh":
            raise InputError(f"ViT pooler_act {cfg.get('pooler_act')!r} is not supported (only tanh)")
        out = cfg.get("pooler_output_size") or cfg["hidden_size"]
        return nn.Sequential(
            nn.Linear(cfg["hidden_size"], count({"pooler_output_size": out}, "pooler_output_size")), nn.Tanh()
        )

    def state(self, hf: Dict, cfg: Mapping[str, Any], options) -> Dict:
        out = {
            "cls_token": take(hf, "embeddings.cls_token"),
            "pos_embed": take(hf, "embeddings.position_embeddings"),
            **rename(hf, {"embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm"}),
        }
        names = dict(norm1="layernorm_before", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                     proj="attention.o_proj", norm2="layernorm_after", fc1="mlp.fc1", fc2="mlp.fc2")  # fmt: skip
        out.update(blocks(hf, cfg["num_hidden_layers"], "layers.", names))
        if options.get("pooler"):
            out.update(rename(hf, {"pooler.dense": "head.0"}))
        return out

    def pooler(self, options):
        return "logits" if options.get("pooler") else None
