"""Building the models a command needs: timm weights (pretrained, checkpoint, random) and the APT conversion.

One place for what bench, finetune and eval share: hub errors become one line, aptvit and timm
checkpoints are told apart, a new label set gets a fresh head, and layout settings from the
command line are applied through the validated ``configure``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .core.io import InputError, UserError
from .distributed import main_process_only
from .nn.checkpoint import (
    check_checkpoint_file,
    load,
    load_timm_weights,
    read_config,
    read_metadata,
    read_state_dict,
)
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub's host answers within ``timeout`` seconds (True behind a proxy, which a direct
    connection cannot judge): offline, the hub library would retry for a minute and a half before failing."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True  # offline already (fails at once), or a proxy decides
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline():
    """The hub library in offline mode for the block: the local cache only, no request and no retry."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def create_timm(name: str, pretrained: bool = False, hint: str = "use --checkpoint PATH with a local file", **kwargs):
    """``timm.create_model`` with dynamic image size; a failed download is one clear RuntimeError.

    With ``pretrained`` and the hub out of reach, only the local cache is tried: the failure comes at once.

    Args:
        hint: what to do when the weights cannot be had, appended to the error.
    """
    import timm

    check_vit_name(name)
    reachable = pretrained and hub_reachable()
    try:
        with _hub_offline() if pretrained and not reachable else nullcontext():
            return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
    except Exception as e:  # hub errors come in many types; the user needs the one line
        if not pretrained:
            raise
        why = (
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if reachable
            else "the model hub cannot be reached and they are not in the local cache"
        )
        raise HubError(f"could not load pretrained weights for {name} ({why}); {hint}") from None


def check_readable(checkpoint) -> None:
    """A clear error now if ``checkpoint`` is missing, a directory, unreadable or no checkpoint at all (an image),
    before its format is guessed."""
    if checkpoint:
        check_checkpoint_file(checkpoint)


def check_finite(model: nn.Module, source) -> None:
    """Refuse weights that hold NaN or inf (a diverged run's): they give numbers, not predictions."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(
                f"checkpoint {str(source)!r} holds non-finite weights (NaN or inf, first in {name}): "
                "the run that wrote it diverged; use an earlier checkpoint"
            )


HEAD_KEYS = ("head.weight", "head.bias")


def is_aptvit_checkpoint(path) -> bool:
    """Whether ``path`` is an aptvit checkpoint (weights and conversion settings) rather than timm weights."""
    return read_metadata(path).get("format") == "aptvit"


@dataclass(frozen=True)
class ModelSource:
    """Where a command's model comes from and how it runs: the options ``bench`` and ``eval`` share.

    Attributes:
        model: timm architecture name (an aptvit checkpoint brings its own and may leave this None).
        pretrained: timm's pretrained weights (needs the model hub).
        checkpoint: an aptvit ``.safetensors`` (weights and settings) or timm weights.
        device, dtype: see ``aptvit.runtime`` (auto: CUDA with bf16 autocast when available, else CPU fp32).
        attention: the APT model's attention backend ("auto" or a name in ``aptvit.nn.attention.BACKENDS``).
        layout: ``APTConfig`` fields that override the model's settings (patch_sizes=, thresholds=, budget=, ...).
    """

    model: Optional[str] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    layout: Dict = field(default_factory=dict)

    def build(self, num_classes: Optional[int] = None) -> Tuple[APTViT, nn.Module]:
        """The APT model and the timm model it wraps (``build_models``), on the CPU."""
        return build_models(
            self.model, self.pretrained, self.checkpoint, num_classes, layout=self.layout, attention=self.attention
        )

    def build_timm(self, num_classes: Optional[int] = None) -> nn.Module:
        """The unconverted timm model (``build_timm``: the uniform baseline), on the CPU."""
        return build_timm(self.model, self.pretrained, self.checkpoint, num_classes)


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
    if checkpoint and is_aptvit_checkpoint(checkpoint):
        apt = load(checkpoint, timm_kwargs={k: v for k, v in timm_kwargs.items() if k != "num_classes"})
        arch = apt.pretrained_cfg.get("architecture", "?")
        if name and name != arch:
            logger.info(f"{checkpoint} holds a {arch}; using it instead of {name}")
        if num_classes is not None and num_classes != apt.num_classes:
            logger.info(f"{checkpoint}: head has {apt.num_classes} classes, the data {num_classes}: new head")
            apt.reset_classifier(num_classes)
        # a config replaces the checkpoint's settings as a whole (every field, None included), not merged
        settings = {**config.to_kwargs(), **layout} if config is not None else layout
        sizes = tuple(settings.get("patch_sizes") or apt.patch_sizes)
        if len(apt.patch_sizes) == 1 and sizes != apt.patch_sizes:
            # a uniform fine-tune's checkpoint has no detail-path weights to lose: convert its timm model again
            logger.info(f"{checkpoint} has one patch size ({apt.patch_size}): converted again with {sizes}")
            apt = convert(apt.timm_model, apt.config.replace(**settings), attention=attention)
        apt.configure(attention=attention, **settings)
        check_finite(apt, checkpoint)
        logger.info(f"weights: {checkpoint} (aptvit checkpoint)")
        return apt, apt.timm_model
    if not name:
        raise InputError("give --model NAME (with --pretrained or a timm --checkpoint), or an aptvit --checkpoint")
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
    if checkpoint and is_aptvit_checkpoint(checkpoint):
        raise InputError("--uniform evaluates a timm model; this checkpoint is an aptvit model (drop --uniform)")
    if not name:
        raise InputError("--uniform needs --model NAME")
    if checkpoint and num_classes is None:
        classes = checkpoint_classes(checkpoint)
        num_classes = classes if classes is not None else 0
    model = create_timm(name, pretrained, **({"num_classes": num_classes} if num_classes is not None else {}))
    if checkpoint:
        load_timm_checkpoint(model, checkpoint, new_head_ok=False)
        check_finite(model, checkpoint)
    return model
