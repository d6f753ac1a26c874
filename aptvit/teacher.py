"""A frozen uniform teacher for an APT student: ``--distill`` trains against it, ``aptvit eval --teacher`` measures
agreement with it.

The teacher is a plain timm ViT run on the full uniform grid: by default the source weights themselves (a copy
made before training; the student shares the source's modules), or ``--teacher``: an aptvit checkpoint (its timm
weights, run uniformly), timm weights of the run's architecture, or a timm model name (pretrained, from the hub).
Each model normalises the uint8 crops with its own mean and std. The losses and figures are pure tensor
functions in ``aptvit.core.distill``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Optional

import torch
from torch import nn

from .core.distill import Outputs, agreement_sums
from .core.io import InputError
from .distributed import all_reduce_sum
from .images import normalise
from .nn.dense import unmerge_packed
from .runtime import autocast

logger = logging.getLogger(__name__)

UNIFORM = "uniform"  # eval --teacher uniform: the evaluated model's own weights, run uniformly


def timm_outputs(model: nn.Module, images: torch.Tensor) -> Outputs:
    """A timm ViT's ``Outputs`` for normalised images (B, 3, H, W): one forward on the full grid."""
    feats = model.forward_features(images)  # (B, prefix + h * w, D), final norm applied
    pre = model.forward_head(feats, pre_logits=True)
    logits = model.forward_head(feats) if model.num_classes else None  # timm's own head: both of a distilled DeiT
    p = model.patch_embed.patch_size
    h, w = images.shape[-2] // p[0], images.shape[-1] // p[1]
    dense = feats[:, model.num_prefix_tokens :].transpose(1, 2).reshape(feats.shape[0], -1, h, w)
    return Outputs(logits, pre, dense)


def apt_outputs(apt: nn.Module, images: torch.Tensor, packed) -> Outputs:
    """An ``APTViT``'s ``Outputs`` from one packed forward (same-size images): logits and pre-logits as ``forward``
    pools them, dense features as ``forward_dense`` unmerges them."""
    x, _ = apt._run_packed(images, packed)
    y = apt.norm(x)
    pre = apt.forward_head(y, pre_logits=True, packed=packed)
    return Outputs(apt.head(pre) if apt.num_classes else None, pre, unmerge_packed(y, packed))


class Student(nn.Module):
    """``apt`` whose forward returns its ``Outputs`` (what DDP wraps in a --distill run: its forward must be the
    module's own for the gradients to be averaged)."""

    def __init__(self, apt: nn.Module):
        super().__init__()
        self.apt = apt

    def forward(self, images: torch.Tensor, packed) -> Outputs:
        return apt_outputs(self.apt, images, packed)


class Teacher:
    """A frozen timm ViT and its normalisation: ``teacher(uint8 crops) -> Outputs`` without gradients.

    Args:
        model: the timm ViT (set to eval mode, its parameters frozen).
        source: what it was built from (for messages).
        input_size: the size it was trained at, when its file says so (an aptvit checkpoint), else None.
    """

    def __init__(self, model: nn.Module, source: str, input_size: Optional[int] = None):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.model = model.eval().requires_grad_(False)
        self.source, self.input_size = source, input_size
        cfg = model.pretrained_cfg or {}
        self.mean, self.std = cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)

    def to(self, device) -> "Teacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor) -> Outputs:
        """``crops``: uint8 (B, 3, S, S) on the model's device (each model normalises them its own way)."""
        return timm_outputs(self.model, normalise(crops, self.mean, self.std))

    def check_student(self, apt: nn.Module, size: int) -> None:
        """One clear error when ``apt`` cannot be compared with this teacher on ``size``-pixel crops.

        Raises:
            InputError: another input size, a patch size that does not divide ``size``, a head on one side only or
                of another number of classes, another feature width or another base grid.
        """
        t, name = self.model, f"the teacher ({self.source})"
        if self.input_size and self.input_size != size:
            raise InputError(
                f"{name} was trained at {self.input_size} px but the student runs at {size} px; "
                f"give --size {self.input_size} or a teacher trained at {size} px"
            )
        tp = t.patch_embed.patch_size[0]
        if size % tp:
            raise InputError(f"{name} has patch size {tp}, which does not divide the input size {size}")
        if t.num_classes != apt.num_classes:
            raise InputError(
                f"{name} has {t.num_classes or 'no'} output classes and the student {apt.num_classes or 'no'}; "
                "distil from a teacher with the student's head (or both without one)"
            )
        if t.num_features != apt.timm_model.num_features or tp != apt.patch_size:
            raise InputError(
                f"{name} has {t.num_features} features on a {tp}-px grid and the student {apt.timm_model.num_features} on a "
                f"{apt.patch_size}-px grid; their features cannot be compared: use a teacher of the same family"
            )


def build_teacher(teacher: Optional[str], source: Optional[nn.Module] = None, model_name: Optional[str] = None):
    """The frozen ``Teacher`` (on the CPU).

    Args:
        teacher: None or "uniform": ``source`` itself (copied); a file: an aptvit checkpoint (its timm weights) or
            timm weights of ``model_name``'s architecture; otherwise a timm model name (pretrained, from the hub).
        source: the uniform timm model the student was converted from (its weights before any training).
        model_name: the architecture for timm weights.

    Raises:
        InputError: a teacher name that is neither a file nor a timm model (and ``build_models``' errors).
    """
    from .models import build_timm, create_timm
    from .nn.checkpoint import load, read_metadata

    if teacher in (None, UNIFORM):
        if source is None:
            raise InputError("no teacher: give --teacher (a checkpoint or a timm model name)")
        return Teacher(copy.deepcopy(source), "the source weights, run uniformly")
    if os.path.exists(teacher):
        meta = read_metadata(teacher)
        if meta.get("format") == "aptvit":
            size = int(meta["input_size"]) if str(meta.get("input_size", "")).isdigit() else None
            return Teacher(load(teacher).timm_model, teacher, size)
        return Teacher(build_timm(model_name, False, teacher), teacher)
    import timm

    if not timm.is_model(teacher):
        raise InputError(f"--teacher {teacher!r} is neither a file nor a timm model name")
    logger.info(f"teacher: timm pretrained {teacher}")
    hint = "give --teacher a local file (an aptvit checkpoint or timm weights of --model's architecture)"
    return Teacher(create_timm(teacher, pretrained=True, hint=hint), teacher)


@torch.inference_mode()
def agreement(
    apt: nn.Module,
    teacher: Teacher,
    dataset,
    batch_size: int,
    workers: int,
    dist,
    skip_bad_images: bool = False,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict:
    """How closely ``apt`` follows ``teacher`` on ``dataset`` (a ``LayoutDataset`` with the student's layouts),
    reduced over ranks.

    Returns:
        {"agreement" (percent of images whose top-1 class is the teacher's) and "kl" (the mean KL(teacher ||
        student) of the logits), only when both have a head;
        "cosine_pre_logits", "cosine_dense" (the mean over images of the cosine between the student's and the
        teacher's pre-logits / dense features, each image's mean over its cells), "tokens_kept",
        "images_per_s" (the student's), "images", "bad_images"}.
    """
    from .data import ShardedSampler, make_loader
    from .progress import progress as progress_bar

    was_training = apt.training
    apt.eval()
    mean, std = apt.pixel_mean_std()
    sampler = ShardedSampler(len(dataset), dist.rank, dist.world, shuffle=False, equal_shares=False)
    loader = make_loader(dataset, sampler, batch_size, workers, drop_last=False, plan=apt.planner)
    names = ["cosine_dense", "cosine_pre_logits"] + (
        ["kl", "same_top1"] if apt.num_classes and teacher.model.num_classes else []
    )
    sums = dict.fromkeys(names, 0.0)
    seen = tokens = base = bad = seconds = 0.0
    for batch in progress_bar(loader, desc="agreement", enabled=progress and dist.main):
        bad += batch.count_bad(skip_bad_images)
        if batch.images.shape[0] == 0:
            continue
        crops = batch.images.to(dist.device)
        start = time.perf_counter()
        with autocast(dist.device, dtype):
            student = apt_outputs(apt, normalise(crops, mean, std), batch.packed.to(dist.device))
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        with autocast(dist.device, dtype):
            target = teacher(crops)
        for k, v in agreement_sums(student, target).items():
            sums[k] += float(v)
        seen += crops.shape[0]
        tokens += batch.layout.total_tokens
        base += int(batch.layout.num_base_tokens.sum())
    totals = all_reduce_sum([sums[k] for k in names] + [seen, tokens, base, bad], dist)
    seconds = all_reduce_sum([seconds], dist)[0] / dist.world
    apt.train(was_training)
    sums, (seen, tokens, base, bad) = dict(zip(names, totals[: len(names)])), totals[len(names) :]
    if seen == 0:
        raise InputError("no image of the evaluation set could be read")
    result = {}
    if "same_top1" in sums:
        result["agreement"] = 100 * sums["same_top1"] / seen
        result["kl"] = sums["kl"] / seen
    result.update(
        cosine_pre_logits=sums["cosine_pre_logits"] / seen,
        cosine_dense=sums["cosine_dense"] / seen,
        tokens_kept=tokens / max(1.0, base),
        images_per_s=seen / max(seconds, 1e-9),
        images=int(seen),
        bad_images=int(bad),
    )
    return result
