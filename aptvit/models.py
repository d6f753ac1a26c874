"""Building the models a command needs: timm weights (pretrained, checkpoint, random) and the APT conversion.

One place for what bench, finetune and eval share: hub errors become one line, aptvit and timm
checkpoints are told apart, a new label set gets a fresh head, and layout settings from the
command line are applied through the validated ``configure``.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .core.io import InputError, UserError, reading
from .distributed import main_process_only
from .nn.checkpoint import load, load_timm_weights, read_config, read_metadata, read_state_dict
from .nn.config import APTConfig
from .nn.convert import convert
from .nn.families import supported, timm_modules
from .nn.model import APTViT

logger = logging.getLogger(__name__)
logger.addFilter(main_process_only)  # eval and finetune build the model on every rank; rank 0 tells


class HubError(UserError, RuntimeError):
    """Pretrained weights could not be downloaded (a RuntimeError for API callers)."""


def check_vit_name(name: str) -> str:
    """``name`` when timm builds it as a VisionTransformer, else an InputError before anything is created."""
    import timm

    module = timm.models.model_entrypoint(name).__module__ if timm.is_model(name) else ""
    if module not in timm_modules():  # the families' modules; each family's check then says which models convert
        raise InputError(f"{name} is not a supported ViT ({module or 'not a timm model'}); supported: {supported()}")
    return name


def create_timm(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` with dynamic image size; a failed download is one clear RuntimeError."""
    import timm

    check_vit_name(name)
    try:
        return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
    except Exception as e:  # hub errors come in many types; the user needs the one line
        if not pretrained:
            raise
        raise HubError(
            f"could not load pretrained weights for {name} ({type(e).__name__}: {e}); "
            "use --checkpoint PATH with a local file"
        ) from None


def check_readable(checkpoint) -> None:
    """A clear error now if ``checkpoint`` is missing, a directory or unreadable (before its format is guessed)."""
    if checkpoint:
        with reading(checkpoint, "checkpoint"):
            open(checkpoint, "rb").close()


def check_finite(model: nn.Module, source) -> None:
    """Refuse weights that hold NaN or inf (a diverged run's): they give numbers, not predictions."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(
                f"checkpoint {str(source)!r} holds non-finite weights (NaN or inf, first in {name}): "
                "the run that wrote it diverged; use an earlier checkpoint"
            )


HEAD_KEYS = ("head.weight", "head.bias")


def conversion_settings(checkpoint=None, **given) -> APTConfig:
    """The conversion settings of a run: ``given`` (``APTConfig`` fields) on top of an aptvit ``checkpoint``'s own
    settings, or on top of ``APTConfig()``'s defaults for a timm model."""
    check_readable(checkpoint)
    base = (read_config(checkpoint) if checkpoint else None) or APTConfig()
    return base.replace(**given) if given else base


def checkpoint_classes(path) -> Optional[int]:
    """Classes of a timm checkpoint's head (None when it has no head, e.g. a DINOv2 or CLIP tower)."""
    head = read_state_dict(path).get("head.weight")
    return int(head.shape[0]) if head is not None and head.dim() == 2 else None


def load_timm_checkpoint(model: nn.Module, path, new_head_ok: bool) -> None:
    """Strictly load timm weights; with ``new_head_ok`` a head of another size, or none, leaves a fresh one."""
    state = read_state_dict(path)
    own = model.state_dict()
    fresh = [k for k in HEAD_KEYS if k in own and (k not in state or state[k].shape != own[k].shape)]
    if fresh and new_head_ok:
        had = state["head.weight"].shape[0] if "head.weight" in state else "no"
        logger.info(f"{path}: head has {had} classes, the data {own['head.weight'].shape[0]}: new head")
        state = {**{k: v for k, v in state.items() if k not in HEAD_KEYS}, **{k: own[k] for k in fresh}}
    load_timm_weights(model, state)


def build_models(
    name: Optional[str],
    pretrained: bool = False,
    checkpoint=None,
    num_classes: Optional[int] = None,
    layout: Optional[Dict] = None,
    timm_kwargs: Optional[Dict] = None,
    attention: str = "auto",
    config: Optional[APTConfig] = None,
) -> Tuple[APTViT, nn.Module]:
    """The APT model and the timm model it wraps.

    Args:
        name: timm architecture (an aptvit checkpoint brings its own and may leave this None).
        checkpoint: aptvit ``.safetensors`` (weights and settings) or timm weights.
        num_classes: the label set to train/evaluate on; a checkpoint's head of another size is replaced.
        layout: conversion settings from the command line (thresholds=, budget=, scorer=, patch_sizes=);
            they override an aptvit checkpoint's own.
        timm_kwargs: extra ``timm.create_model`` arguments (drop_path_rate=, model arguments).
        attention: the attention backend to run with (a runtime choice; checkpoints do not carry one).
        config: the conversion settings as a whole (a fine-tuning run's): they replace an aptvit checkpoint's own;
            ``layout`` then overrides single fields of them.
    """
    check_readable(checkpoint)
    layout = {k: v for k, v in (layout or {}).items() if v is not None}
    timm_kwargs = dict(timm_kwargs or {})
    if num_classes is not None:
        timm_kwargs["num_classes"] = num_classes
    if checkpoint and read_metadata(checkpoint).get("format") == "aptvit":
        apt = load(checkpoint, timm_kwargs={k: v for k, v in timm_kwargs.items() if k != "num_classes"})
        arch = apt.pretrained_cfg.get("architecture", "?")
        if name and name != arch:
            logger.info(f"{checkpoint} holds a {arch}; using it instead of {name}")
        if num_classes is not None and num_classes != apt.num_classes:
            logger.info(f"{checkpoint}: head has {apt.num_classes} classes, the data {num_classes}: new head")
            apt.reset_classifier(num_classes)
        # a config replaces the checkpoint's settings as a whole (every field, None included), not merged
        apt.configure(attention=attention, **({**config.to_kwargs(), **layout} if config is not None else layout))
        check_finite(apt, checkpoint)
        logger.info(f"weights: {checkpoint} (aptvit checkpoint)")
        return apt, apt.timm_model
    if not name:
        raise ValueError("give --model NAME (with --pretrained or a timm --checkpoint), or an aptvit --checkpoint")
    if checkpoint and num_classes is None:  # e.g. a fine-tuned .pth: the head it was trained with
        classes = checkpoint_classes(checkpoint)
        timm_kwargs["num_classes"] = classes if classes is not None else 0
    model = create_timm(name, pretrained, **timm_kwargs)
    if checkpoint:
        load_timm_checkpoint(model, checkpoint, new_head_ok=num_classes is not None)
        check_finite(model, checkpoint)
        logger.info(f"weights: {checkpoint}")
    elif pretrained:
        logger.info(f"weights: timm pretrained {name}")
    else:
        logger.info("weights: random (no --pretrained or --checkpoint): timings are valid, predictions are not")
    return convert(model, config, attention=attention, **layout), model


def build_timm(
    name: Optional[str],
    pretrained: bool = False,
    checkpoint=None,
    num_classes: Optional[int] = None,
) -> nn.Module:
    """The unconverted timm model (the uniform baseline), with its weights."""
    check_readable(checkpoint)
    if checkpoint and read_metadata(checkpoint).get("format") == "aptvit":
        raise ValueError("--uniform evaluates a timm model; this checkpoint is an aptvit model (drop --uniform)")
    if not name:
        raise ValueError("--uniform needs --model NAME")
    if checkpoint and num_classes is None:
        classes = checkpoint_classes(checkpoint)
        num_classes = classes if classes is not None else 0
    model = create_timm(name, pretrained, **({"num_classes": num_classes} if num_classes is not None else {}))
    if checkpoint:
        load_timm_checkpoint(model, checkpoint, new_head_ok=False)
        check_finite(model, checkpoint)
    return model
