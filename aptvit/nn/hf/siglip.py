"""SigLIP's vision tower (``SiglipVisionModel``, ``SiglipModel``; SigLIP 2's fixed-resolution checkpoints use the
same class) as timm's ``VisionTransformer``: no class token, the final norm (``post_layernorm``) on every token, and
a multi-head attention pool (``head``: one learned probe; timm's ``AttentionPoolLatent``, global_pool "map").

HF outputs: ``last_hidden_state`` after the final norm; ``pooler_output`` the attention pool's output (timm's pooled
features; None when the config has ``vision_use_head=False``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from .base import VIT_CONFIG_KEYS, Spec, blocks, common_kwargs, count, mlp_ratio, rename, take


class SiglipSpec(Spec):
    name = "siglip"
    classes = ("SiglipVisionModel", "SiglipModel")
    module = "siglip"
    config_keys = VIT_CONFIG_KEYS
    # SiglipImageProcessor: squashed to a square, bicubic
    processor = {"size": {"height": 224, "width": 224}, "resample": 3, "image_mean": 0.5, "image_std": 0.5}

    def parts(self, hf):
        vision = hf.vision_model if type(hf).__name__ == "SiglipModel" else hf
        return vision, {"use_head": bool(getattr(vision, "use_head", True))}, {}

    def vit_kwargs(self, cfg, options):
        head = options.get("use_head", True)
        return dict(
            common_kwargs(cfg),
            mlp_ratio=mlp_ratio(count(cfg, "intermediate_size"), cfg["hidden_size"]),
            class_token=False,
            global_pool="map" if head else "avg",  # without HF's head there is no pooler_output; avg is aptvit's
            fc_norm=False,
            qkv_bias=True,
        )

    def state(self, hf: Dict, cfg: Mapping[str, Any], options) -> Dict:
        d = cfg["hidden_size"]
        out = {
            "pos_embed": take(hf, "embeddings.position_embedding.weight").unsqueeze(0),
            **rename(hf, {"embeddings.patch_embedding": "patch_embed.proj", "post_layernorm": "norm"}),
        }
        names = dict(norm1="layer_norm1", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     proj="self_attn.out_proj", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")  # fmt: skip
        out.update(blocks(hf, cfg["num_hidden_layers"], "encoder.layers.", names))
        if options.get("use_head", True):
            w, b = take(hf, "head.attention.in_proj_weight"), take(hf, "head.attention.in_proj_bias")
            out.update(
                {
                    "attn_pool.latent": take(hf, "head.probe"),
                    "attn_pool.q.weight": w[:d],
                    "attn_pool.q.bias": b[:d],
                    "attn_pool.kv.weight": w[d:],
                    "attn_pool.kv.bias": b[d:],
                    **rename(
                        hf,
                        {
                            "head.attention.out_proj": "attn_pool.proj",
                            "head.layernorm": "attn_pool.norm",
                            "head.mlp.fc1": "attn_pool.mlp.fc1",
                            "head.mlp.fc2": "attn_pool.mlp.fc2",
                        },
                    ),
                }
            )
        return out

    def pooler(self, options):
        return "pre_logits" if options.get("use_head", True) else None
