"""CLIP's vision tower (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``) as timm's
``VisionTransformer``: class token with a position, a LayerNorm before the blocks (``pre_layrnorm``: timm's
``norm_pre``), no patch bias, the final norm (``post_layernorm``) on the class token.

HF outputs: ``last_hidden_state`` is the last block's output *before* the final norm; ``pooler_output`` the
normed class token (timm's pooled features); ``image_embeds`` (with projection) the projection of it (timm's head,
a linear without bias). LLaVA reads ``hidden_states[-2]``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from torch import nn

from .base import VIT_CONFIG_KEYS, Spec, blocks, common_kwargs, count, mlp_ratio, rename, take

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPSpec(Spec):
    name = "clip"
    classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
    module = "clip"
    config_keys = VIT_CONFIG_KEYS
    processor = {  # CLIPImageProcessor: the shorter side to the crop, bicubic
        "size": {"shortest_edge": 224},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "resample": 3,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }
    last_normed = False

    def parts(self, hf):
        name = type(hf).__name__
        if name == "CLIPVisionModel":
            return hf, {}, {}
        proj = hf.visual_projection.weight
        return hf.vision_model, {"projection_dim": int(proj.shape[0])}, {"visual_projection.weight": proj}

    def vit_kwargs(self, cfg, options):
        return dict(
            common_kwargs(cfg),
            mlp_ratio=mlp_ratio(count(cfg, "intermediate_size"), cfg["hidden_size"]),
            class_token=True,
            global_pool="token",
            pre_norm=True,  # also: no patch-embedding bias, as CLIP's conv
            fc_norm=False,
            qkv_bias=True,
        )

    def head(self, cfg, options) -> Optional[nn.Module]:
        if "projection_dim" not in options:
            return None
        return nn.Linear(cfg["hidden_size"], count(options, "projection_dim"), bias=False)

    def state(self, hf: Dict, cfg: Mapping[str, Any], options) -> Dict:
        out = {
            "cls_token": take(hf, "embeddings.class_embedding").reshape(1, 1, -1),
            "pos_embed": take(hf, "embeddings.position_embedding.weight").unsqueeze(0),
            "patch_embed.proj.weight": take(hf, "embeddings.patch_embedding.weight"),
            **rename(hf, {"pre_layrnorm": "norm_pre", "post_layernorm": "norm"}),
        }
        names = dict(norm1="layer_norm1", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     proj="self_attn.out_proj", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")  # fmt: skip
        out.update(blocks(hf, cfg["num_hidden_layers"], "encoder.layers.", names))
        if "projection_dim" in options:
            out["head.weight"] = take(hf, "visual_projection.weight")
        return out

    def embeds(self, options):
        return "image_embeds" if "projection_dim" in options else None
