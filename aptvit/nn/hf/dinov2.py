"""DINOv2 (``Dinov2Model``) and DINOv2 with registers (``Dinov2WithRegistersModel``) as timm's
``VisionTransformer``: class token, layer scale, the final norm on every token; with registers, register tokens
after the class token.

Positions. Both resample the patch grid bicubic at another size, without antialiasing (``Dinov2Model``) or with it
(``Dinov2WithRegistersModel``). The class token's position is never resampled: with registers (which get no
position) it is folded into timm's class token (timm's ``no_embed_class``), as timm's own DINOv2-with-registers
weights are.

HF outputs: ``last_hidden_state`` after the final norm; ``pooler_output`` its class token (timm's pooled features).
``use_swiglu_ffn`` (the giant model's SwiGLU MLP) is not converted.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from ...core.io import InputError
from .base import Spec, blocks, common_kwargs, count, rename, take


class Dinov2Spec(Spec):
    name = "dinov2"
    classes = ("Dinov2Model", "Dinov2WithRegistersModel")
    module = "dinov2"
    processor = {  # BitImageProcessor, as every facebook/dinov2-* checkpoint ships it
        "size": {"shortest_edge": 256},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "resample": 3,  # PIL's bicubic
        "image_mean": (0.485, 0.456, 0.406),
        "image_std": (0.229, 0.224, 0.225),
    }
    processor_size = True  # 224 px, although the configs say image_size 518 (the pre-training size)
    config_keys = (
        "hidden_size",
        "mlp_ratio",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
        "qkv_bias",
        "use_swiglu_ffn",
        "num_register_tokens",
    )
    ignored = ("embeddings.mask_token",)  # masked-image pre-training only

    def parts(self, hf):
        registers = type(hf).__name__ == "Dinov2WithRegistersModel"
        return hf, {"registers": registers}, {}

    def resample(self, options) -> Dict[str, Any]:
        return {"interpolation": "bicubic", "antialias": bool(options.get("registers"))}

    def vit_kwargs(self, cfg, options):
        if cfg.get("use_swiglu_ffn"):
            raise InputError("DINOv2 with use_swiglu_ffn=True (the giant model's SwiGLU MLP) is not supported")
        ratio = cfg.get("mlp_ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 64:
            raise InputError(f"Hugging Face config mlp_ratio {ratio!r} is not a number in (0, 64]")
        regs = count(cfg, "num_register_tokens") if options.get("registers") else 0
        return dict(
            common_kwargs(cfg),
            mlp_ratio=float(ratio),  # HF's width is int(hidden_size * mlp_ratio), as timm's
            class_token=True,
            reg_tokens=regs,
            no_embed_class=bool(regs),
            global_pool="token",
            fc_norm=False,
            qkv_bias=bool(cfg.get("qkv_bias", True)),
            init_values=1.0,  # layer scale present; its values come from the weights
        )

    def state(self, hf: Dict, cfg: Mapping[str, Any], options) -> Dict:
        cls, pos = take(hf, "embeddings.cls_token"), take(hf, "embeddings.position_embeddings")
        out = rename(hf, {"embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm"})
        if options.get("registers"):  # the class position, never resampled, joins the class token
            out.update(
                cls_token=cls + pos[:, :1], pos_embed=pos[:, 1:], reg_token=take(hf, "embeddings.register_tokens")
            )
        else:
            out.update(cls_token=cls, pos_embed=pos)
        names = dict(norm1="norm1", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                     proj="attention.o_proj", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2",
                     ls1="layer_scale1.lambda1", ls2="layer_scale2.lambda1")  # fmt: skip
        out.update(blocks(hf, cfg["num_hidden_layers"], "encoder.layer.", names))
        return out
