"""``convert``: from a timm ViT to an APT model (saving and loading: ``aptvit.nn.checkpoint``)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn

from ..core.io import UserTypeError
from .config import APTConfig
from .families import check_supported
from .model import APTViT


def convert(
    model: nn.Module,
    config: Optional[APTConfig] = None,
    *,
    attention: str = "auto",
    image_processor: Any = None,
    **settings,
) -> APTViT:
    """Wrap a timm ViT so that it runs on adaptive patch layouts.

    Args:
        model: a timm model of a supported family (``aptvit.nn.families``; pretrained or fine-tuned); shared, not
            copied. Or a Hugging Face CLIP / SigLIP / DINOv2 / ViT vision model (``aptvit.nn.hf``): its weights are
            copied into the matching timm architecture first.
        config: the conversion settings; default ``APTConfig()`` (entropy scorer, its default thresholds,
            patch sizes (p, 2p) for the model's patch size p).
        attention: the attention backend, a runtime choice not saved with the model (see ``APTViT``).
        image_processor: for a Hugging Face model, its image processor (``AutoImageProcessor.from_pretrained`` of the
            same checkpoint, or a dict of its settings): the resize, crop and normalisation that ``pretrained_cfg``
            then holds, as a timm model's does (default: the family's usual one, ``aptvit.nn.hf.to_timm``).
        **settings: ``APTConfig`` fields that override ``config``'s: ``patch_sizes``, ``thresholds``, ``budget``
            (tokens per image: fraction of base tokens in (0, 1], or an int), ``scorer``, ``scorer_args``,
            ``area_bias`` (area-proportional attention, see ``APTConfig``).

    Returns:
        APTViT whose state dict is the timm model's plus ``adaptive_embed.*``. With thresholds that never merge
        it computes exactly what the timm model computes.
    """
    if type(model).__module__.startswith("transformers."):  # a Hugging Face tower: its timm twin (nn.hf)
        from .hf import to_timm

        model = to_timm(model, image_processor=image_processor)
    elif image_processor is not None:
        raise UserTypeError(
            "image_processor is for Hugging Face models; a timm model's preprocessing is its pretrained_cfg"
        )
    check_supported(model)
    if isinstance(config, (tuple, list)):  # aptvit 0.1: convert(model, patch_sizes, ...)
        warnings.warn(
            "convert(model, patch_sizes) is deprecated: pass convert(model, patch_sizes=...) or an APTConfig",
            DeprecationWarning,
            stacklevel=2,
        )
        config, settings = None, {"patch_sizes": config, **settings}
    config = config if config is not None else APTConfig()
    if not isinstance(config, APTConfig):
        raise UserTypeError(f"config must be an APTConfig, got {type(config).__name__}")
    settings = {k: v for k, v in settings.items() if not (k == "patch_sizes" and v is None)}
    config = config.replace(**settings) if settings else config
    return APTViT(model, config, attention=attention)
