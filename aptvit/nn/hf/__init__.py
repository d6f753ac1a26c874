"""Hugging Face ``transformers`` vision towers: CLIP, SigLIP, DINOv2 (with and without registers) and ViT.

``aptvit.convert(hf_model)`` maps the HF weights onto the matching timm architecture (``to_timm``: timm's
``VisionTransformer``, which only resamples positions as the HF class does) and converts that: the result is an
``APTViT`` like any converted timm ViT (layouts, attention backends, area bias, budget and static modes,
``forward_dense``, ``encode_tokens``, saving, export). With nothing merged it computes what the HF model computes.
``hf_outputs`` gives the HF class's own outputs in packed form, ``llava_features`` LLaVA's feature selection.
``transformers`` is needed only to convert (``pip install 'aptvit[hf]'``); a saved model loads without it.
"""

from .convert import (
    SPECS,
    build_twin,
    fit_head,
    is_hf_model,
    require_transformers,
    spec_of,
    to_timm,
    twin_from_metadata,
)
from .outputs import HFOutputs, PackedHidden, VisualTokens, check_against_hf, hf_outputs, llava_features
from .twin import HFVisionTransformer

__all__ = [
    "SPECS",
    "HFOutputs",
    "HFVisionTransformer",
    "PackedHidden",
    "VisualTokens",
    "build_twin",
    "check_against_hf",
    "fit_head",
    "hf_outputs",
    "is_hf_model",
    "llava_features",
    "require_transformers",
    "spec_of",
    "to_timm",
    "twin_from_metadata",
]
