"""The timm twin of a Hugging Face vision tower: timm's ``VisionTransformer`` holding the HF weights.

A Hugging Face ``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model`` (with or without registers) or
``ViTModel`` is a pre-norm ViT with the same layers as timm's ``VisionTransformer``; only the names differ (q, k, v
are separate linears there, one ``qkv`` here) and, at an image size other than the checkpoint's, how the position
table is resampled (HF: bicubic without antialiasing for CLIP, SigLIP, ViT and DINOv2, with it for DINOv2 with
registers; timm: bicubic with antialiasing). ``HFVisionTransformer`` is timm's class with exactly that one
difference: the resampling its HF original uses (``pos_resample``). Everything else, and with it the whole APT
machinery (``families.vit``), is timm's.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

METADATA_KEY = "hf_source"  # checkpoint metadata: {"class", "config", "options"} of the HF original (JSON)


class HFVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` that resamples its position table as its Hugging Face original does.

    Attributes:
        pos_resample: ``resample_abs_pos_embed`` arguments (``interpolation``, ``antialias``).
        hf_source: {"class": the HF class name, "config": the vision config it was built from (JSON types),
            "options": what the class adds to the config (a ViT pooler, a CLIP projection)}; saved with the weights.
    """

    # ``families.vit`` takes a subclass only when it declares that nothing but the position resampling differs
    positions_only_subclass = True

    def __init__(self, *args, pos_resample: Mapping[str, Any], hf_source: Mapping[str, Any], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pos_resample = dict(pos_resample)
        self.hf_source = json.loads(json.dumps(dict(hf_source)))  # JSON types only: it goes into the file

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``_pos_embed`` (``dynamic_img_size``: x is (B, H, W, C)) with the HF original's resampling."""
        to_cat = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is None:
            return torch.cat(to_cat + [x.view(x.shape[0], -1, x.shape[-1])], dim=1)
        if self.dynamic_img_size:
            b, h, w, c = x.shape
            pos_embed = resample_abs_pos_embed(
                self.pos_embed,
                new_size=(h, w),
                old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
                **self.pos_resample,
            )
            x = x.view(b, -1, c)
        else:
            pos_embed = self.pos_embed
        if self.no_embed_class:
            x = torch.cat(to_cat + [x + pos_embed], dim=1) if to_cat else x + pos_embed
        else:
            x = (torch.cat(to_cat + [x], dim=1) if to_cat else x) + pos_embed
        return self.pos_drop(x)

    def aptvit_metadata(self) -> Dict[str, str]:
        """What ``aptvit.save`` adds to the file so that ``aptvit.load`` re-creates this model from the file alone."""
        return {METADATA_KEY: json.dumps(self.hf_source)}
