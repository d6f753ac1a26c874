"""The model and its optimizer: ``build_model`` (the APT conversion, or a resumed run's own weights), ``distribute``
(DDP under torchrun), ``make_optimizer`` over ``param_groups``, and the lr schedule (``lr_at``, ``set_lr``)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..core.io import InputError, reading
from ..distributed import Dist
from ..models import build_models, checkpoint_classes
from ..nn.attention import resolve_backend
from ..nn.checkpoint import read_metadata
from ..runtime import resolve_dtype
from .config import TrainConfig

logger = logging.getLogger("aptvit.train")


@contextlib.contextmanager
def _quiet(when: bool):
    """Hold back the package's INFO messages while ``when`` (other ranks repeat rank 0; a resume rebuilds the model
    from its own checkpoint, which is nothing to report). Warnings still pass."""
    package = logging.getLogger("aptvit")
    level = package.level
    if when:
        package.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package.setLevel(level)


def build_model(cfg: TrainConfig, continues: bool, dist: Dist):
    """The APT model on ``dist.device``: converted from ``cfg.model`` (+ ``cfg.checkpoint``), or, when the run
    ``continues``, its own last weights (the original source, file or hub, is not needed any more).

    Raises:
        InputError: ``cfg.size`` is not a multiple of the model's patch size (and ``build_models``' errors).
    """
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    timm_kwargs = {"drop_path_rate": cfg.drop_path}
    num_classes = None if cfg.distill else len(cfg.classes)  # --distill keeps the source's head (or none)
    with _quiet(continues or not dist.main):
        if continues:
            apt, _ = build_models(
                None,
                checkpoint=Path(cfg.out) / "model.safetensors",
                num_classes=num_classes,
                timm_kwargs=timm_kwargs,
                attention=cfg.attention,
            )
        else:
            apt, _ = build_models(
                cfg.model,
                cfg.pretrained,
                cfg.checkpoint,
                num_classes,
                timm_kwargs={**timm_kwargs, **cfg.model_args},
                attention=cfg.attention,
                config=cfg.apt,  # the run's settings as a whole (they replace an aptvit checkpoint's own)
            )
            cfg.apt = apt.config  # config.json records the settings the run trains with
            if cfg.checkpoint and not cfg.distill:  # --distill keeps the head as it is: no labels meet it
                match_head_to_classes(apt, cfg.checkpoint, cfg.classes)
    apt.to(dist.device)
    if cfg.size % apt.patch_size:
        raise InputError(f"size {cfg.size} is not a multiple of the patch size {apt.patch_size}")
    # an attention backend that cannot train here fails now, not at the first step after config.json is written
    resolve_backend(apt.attention, dist.device, resolve_dtype(cfg.dtype, dist.device), grad=True)
    return apt


def match_head_to_classes(apt, checkpoint, classes: Sequence[str]) -> None:
    """Line up the head that ``apt`` kept from ``checkpoint`` with the data's ``classes`` (the class folders,
    which ImageFolder numbers in sorted order).

    A checkpoint that names its classes (the ``classes`` metadata of a .safetensors file: aptvit's runs write it)
    has its head's rows put into the folders' order, or gets a new head when the names are others; a head that
    names none is taken to be in the folders' order, with a warning. Without this, a head trained on another
    order (e.g. "functional", "defective") would be trained against swapped labels without a word.

    Raises:
        InputError: the checkpoint's ``classes`` metadata is not a JSON list of names.
    """
    head = apt.get_classifier()
    if not isinstance(head, torch.nn.Linear) or head.out_features != len(classes):
        return  # a new head (build_models replaced one of another size), none, or a pair of distilled heads
    meta = read_metadata(checkpoint)
    if "classes" not in meta:
        if checkpoint_classes(checkpoint) == len(classes):  # the checkpoint's own head was kept
            logger.warning(
                f"{checkpoint} does not name its classes: its head's rows are taken to be the class folders in "
                f"sorted order ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
            )
        return
    with reading(checkpoint, "checkpoint", "its 'classes' metadata is malformed"):
        saved = json.loads(meta["classes"])
    if not (isinstance(saved, list) and all(isinstance(c, str) for c in saved) and len(set(saved)) == len(saved)):
        raise InputError(
            f"checkpoint {str(checkpoint)!r}: its 'classes' metadata is malformed (not a list of distinct names: "
            f"{meta['classes'][:80]})"
        )
    if saved == list(classes):
        return
    if sorted(saved) != sorted(classes):
        logger.info(f"{checkpoint}: head trained on other classes ({', '.join(map(str, saved[:5]))}): new head")
        apt.reset_classifier(len(classes))
        return
    order = torch.tensor([saved.index(c) for c in classes])
    with torch.no_grad():
        head.weight.copy_(head.weight[order])
        if head.bias is not None:
            head.bias.copy_(head.bias[order])
    logger.info(f"{checkpoint}: head rows reordered from its classes' order to the class folders'")


def build_teacher(cfg: TrainConfig, apt, continues: bool, dist: Dist):
    """The frozen uniform ``aptvit.teacher.Teacher`` of a --distill run on ``dist.device`` (None without --distill),
    checked against the student.

    ``cfg.teacher``, or the source weights: in a new run a copy of ``apt``'s own before any step; a resumed run
    rebuilds them from ``cfg.model`` / ``cfg.checkpoint`` with the run's seed (the same random weights too), so the
    source must still be there.

    Raises:
        InputError: a teacher that cannot be compared with the student (``Teacher.check_student``).
    """
    from ..teacher import build_teacher as build

    if not cfg.distill:
        return None
    with _quiet(not dist.main):
        source = None
        if cfg.teacher is None:
            if continues:
                torch.manual_seed(cfg.seed)
                with _quiet(True):
                    _, source = build_models(
                        cfg.model, cfg.pretrained, cfg.checkpoint, None, timm_kwargs=cfg.model_args, config=cfg.apt
                    )
            else:
                source = apt.timm_model
        teacher = build(cfg.teacher, source, cfg.model)
    teacher.check_student(apt, cfg.size)
    return teacher.to(dist.device)


def distribute(apt, dist: Dist) -> torch.nn.Module:
    """``apt`` itself in one process; wrapped in DDP (which averages the gradients) under torchrun."""
    if dist.world == 1:
        return apt
    return torch.nn.parallel.DistributedDataParallel(
        apt, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
    )


def make_optimizer(apt, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's AdamW over ``param_groups`` (each group keeps its ``lr_scale`` for ``set_lr``)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(param_groups(apt, cfg), "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's ``lr`` times each group's ``lr_scale`` (the new adaptive_embed.* layers learn faster)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine to ``min_lr``, per optimizer step."""
    warm = max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def is_new_layer(name: str) -> bool:
    """Whether the parameter called ``name`` belongs to the layers the conversion adds (the zero-initialised detail
    path), which learn at ``new_layer_lr_scale`` times the lr."""
    return name.startswith("adaptive_embed.")


def layer_depths(model: torch.nn.Module) -> Dict[str, int]:
    """Each parameter's depth for layer-wise lr decay, from the model's ``group_matcher`` (timm's grouping):
    0 the embedding (tokens, positions, patch projection), ``i + 1`` block ``i``, the deepest the final norm and
    the head (a parameter no group names counts as the head)."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise InputError(f"{type(model).__name__} has no group_matcher: give --layer-decay 1 (no decay) for it")
    depth = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    deepest = max(depth.values(), default=0) + 1
    return {name: depth.get(name, deepest) for name, _ in model.named_parameters()}


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> List[dict]:
    """AdamW parameter groups: no weight decay for biases, norms and ``no_weight_decay()`` (as timm's
    factory does); ``lr_scale`` = ``cfg.new_layer_lr_scale`` for the new layers (``is_new_layer``) and, for
    every other parameter, ``cfg.layer_decay ** (deepest - its depth)`` (``layer_depths``: the head 1, the last
    block ``layer_decay``, the embedding the least; 1 for all when ``layer_decay`` is 1)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    depth = layer_depths(model) if cfg.layer_decay != 1 else {}
    deepest = max(depth.values(), default=0)
    groups: Dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim <= 1 or name.endswith(".bias") or name in skip else cfg.weight_decay
        if is_new_layer(name):
            scale = cfg.new_layer_lr_scale
        else:
            scale = cfg.layer_decay ** (deepest - depth[name]) if depth else 1.0
        groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale})["params"].append(
            param
        )
    return list(groups.values())
