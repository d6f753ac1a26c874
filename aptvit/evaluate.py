"""``aptvit eval``: top-1, top-5, tokens kept and images per second on an ImageFolder split.

Works for an APT checkpoint (``--checkpoint RUN_DIR/model.safetensors``) and for the unconverted
timm model (``--model NAME --pretrained --uniform``), on one process or under torchrun.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .core.io import InputError, atomic_write, check_side, check_writable, reading
from .data import (
    LayoutDataset,
    ShardedSampler,
    build_transform,
    check_image_folder,
    eval_crop,
    image_files,
    image_folder,
    make_loader,
    seeded_subset,
    to_head_rows,
)
from .distributed import all_reduce_sum, setup_distributed
from .images import normalise
from .models import ModelSource
from .runtime import autocast, resolve_dtype

logger = logging.getLogger(__name__)


@torch.inference_mode()
def evaluate(
    model,
    dataset: LayoutDataset,
    batch_size: int,
    workers: int,
    dist,
    mean,
    std,
    skip_bad_images: bool = False,
    uniform: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Accuracy and speed of ``model`` on ``dataset`` (reduced over ranks).

    Args:
        model: an APTViT (layouts come from the loader) or, with ``uniform``, a plain timm model.
        dtype: compute precision (autocast for bf16/fp16).

    Returns:
        {"top1", "top5" (percent), "tokens_kept", "images_per_s", "images", "bad_images"}.
    """
    from .progress import progress as progress_bar

    was_training = model.training
    model.eval()
    static = not uniform and model.config.static  # the whole forward on the device: no plan from the workers
    sampler = ShardedSampler(len(dataset), dist.rank, dist.world, shuffle=False, equal_shares=False)
    plan = None if uniform or static else model.planner
    loader = make_loader(dataset, sampler, batch_size, workers, drop_last=False, plan=plan)
    counts = _Counts()
    for batch in progress_bar(loader, desc="eval", enabled=progress and dist.main):
        counts.bad += batch.count_bad(skip_bad_images)
        if batch.images.shape[0] == 0:
            continue
        images = normalise(batch.images.to(dist.device), mean, std)
        labels = batch.labels.to(dist.device)
        start = time.perf_counter()
        with autocast(dist.device, dtype):
            if plan is None:
                logits = model(images)
            else:
                logits = model(images, packed=batch.packed.to(dist.device, non_blocking=True))
        n_tokens, n_base = _token_counts(model, batch, images, uniform, static)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        counts.seconds += time.perf_counter() - start
        counts.add(logits.float(), labels, n_tokens, n_base)
    totals = _Counts(*all_reduce_sum(counts.sums(), dist))
    seconds = all_reduce_sum([counts.seconds], dist)[0] / dist.world
    model.train(was_training)
    if totals.seen == 0:
        raise InputError("no image of the evaluation set could be read")
    return totals.result(seconds)


@dataclass
class _Counts:
    """What ``evaluate`` sums over batches (and then over ranks)."""

    correct1: float = 0.0
    correct5: float = 0.0
    seen: float = 0.0
    tokens: float = 0.0
    base: float = 0.0
    bad: float = 0.0
    seconds: float = 0.0  # this rank's model time (averaged over ranks, not summed)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, n_tokens, n_base) -> None:
        """One batch: (B, classes) float logits, (B,) labels, its tokens run and the base tokens it stands for."""
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        self.correct1 += (top5[:, 0] == labels).sum().item()
        self.correct5 += (top5 == labels[:, None]).any(-1).sum().item()
        self.seen += labels.shape[0]
        self.tokens += n_tokens
        self.base += n_base

    def sums(self) -> list:
        return [self.correct1, self.correct5, self.seen, self.tokens, self.base, self.bad]

    def result(self, seconds: float) -> dict:
        return {
            "top1": 100 * self.correct1 / self.seen,
            "top5": 100 * self.correct5 / self.seen,
            "tokens_kept": self.tokens / max(1.0, self.base),
            "images_per_s": self.seen / max(seconds, 1e-9),
            "images": int(self.seen),
            "bad_images": int(self.bad),
        }


def _token_counts(model, batch, images: torch.Tensor, uniform: bool, static: bool):
    """(tokens the forward ran, base-size tokens the images hold) of one batch."""
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    if static:  # what runs: k slots per image, padding included
        return b * model.static_tokens((h, w)), b * (h // model.patch_size) * (w // model.patch_size)
    if uniform:
        n = b * (h // model.patch_embed.patch_size[0]) * (w // model.patch_embed.patch_size[1])
        return n, n
    return batch.layout.total_tokens, int(batch.layout.num_base_tokens.sum())


def default_workers() -> int:
    """Loader processes when none are asked for: the CPUs this process may use, less one for the main process,
    at most 8 (0 on one CPU: the images are then read in the main process)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


def eval_command(
    source: ModelSource,
    data=None,
    uniform=False,
    size=None,
    batch_size=64,
    workers=None,
    json_path=None,
    skip_bad_images=False,
    teacher=None,
    limit=None,
) -> dict:
    """``aptvit eval``: build the model, load the split, evaluate, print and optionally write JSON.

    Args:
        workers: loader processes (None: ``default_workers()``, what the machine has).
        source: the model, its weights, device, dtype, attention backend and layout settings
            (``aptvit.models.ModelSource``); ``uniform`` evaluates its timm model unconverted.
        teacher: also measure agreement with this uniform teacher (``aptvit.teacher.build_teacher``: a checkpoint,
            a timm model name, or "uniform" for the model's own weights), on labelled or unlabelled images.
        limit: at most this many images, a seeded draw from the whole split (``data.seeded_subset``; None or 0: all).
    """
    workers = _check_options(source, size, batch_size, workers, json_path, limit)
    dist = setup_distributed(source.device)
    compute_dtype = resolve_dtype(source.dtype, dist.device)
    if teacher is not None and uniform:
        raise InputError("--teacher measures how an APT model follows a uniform one; drop --uniform")
    split = _eval_split(data, source.checkpoint, teacher)  # the images and, when labelled, their classes
    model, timm_model, mean, std, layout_fn = _eval_models(source, uniform)
    items = _check_head(split.items, timm_model, teacher, split.folder)  # evaluation never replaces a head
    model.to(dist.device)
    cfg = timm_model.pretrained_cfg or {}
    patch = model.patch_size if not uniform else timm_model.patch_embed.patch_size[0]
    size = _eval_size(size or split.saved_size or cfg.get("input_size", (3, 224, 224))[-1], patch, source, split.meta)
    samples = seeded_subset(items.samples if items is not None else image_files(split.folder), limit)
    dataset = LayoutDataset(samples, build_transform(size, False, mean, std, **eval_crop(cfg)), layout_fn)
    result = {}
    if items is not None:
        result = evaluate(
            model, dataset, batch_size, workers, dist, mean, std, skip_bad_images, uniform=uniform, dtype=compute_dtype
        )
    if teacher is not None:
        result.update(
            _teacher_agreement(
                model,
                timm_model,
                teacher,
                source.model,
                dataset,
                size,
                batch_size,
                workers,
                dist,
                skip_bad_images,
                compute_dtype,
            )
        )
    result.update(
        device=dist.device.type,
        dtype=str(compute_dtype).replace("torch.", ""),
        model=source.model or split.meta.get("architecture", ""),
        checkpoint=str(source.checkpoint) if source.checkpoint else None,
        uniform=uniform,
        size=size,
    )
    if dist.main:
        _log_result(result, uniform, teacher is not None, top5=timm_model.num_classes > 5)
        if json_path:
            atomic_write(Path(json_path), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return result


def _check_options(source: ModelSource, size, batch_size, workers, json_path, limit=None) -> int:
    """The options checked before any work (the dtype's name, sizes, counts, the JSON path); the loader processes."""
    resolve_dtype(source.dtype, "cpu")  # checks the name; resolved for the device later
    if size is not None:
        check_side(size, "--size")
    workers = default_workers() if workers is None else workers
    for name, value, low in (("--batch-size", batch_size, 1), ("--workers", workers, 0), ("--limit", limit or 0, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} {value} must be an integer >= {low}")
    if json_path:
        check_writable(json_path)  # now, not after the whole evaluation
    return workers


@dataclass
class _Split:
    """The images ``aptvit eval`` reads: the folder, its labelled items (None: images only, for agreement with a
    teacher) and the checkpoint's metadata (its classes and input size)."""

    folder: Path
    items: object
    meta: dict
    saved_size: int


def _eval_split(data, checkpoint, teacher) -> _Split:
    """The split ``--data`` names, labelled when it has class folders (always without ``--teacher``), and the
    checkpoint's classes checked against its class folders."""
    from .nn.checkpoint import read_metadata

    labelled = teacher is None or _has_class_folders(data)
    folder = check_image_folder(data, "val") if labelled else _split_folder(data)
    items = image_folder(folder) if labelled else None
    meta = read_metadata(checkpoint) if checkpoint else {}
    with reading(checkpoint, "checkpoint", "its 'classes' or 'input_size' metadata is malformed"):
        classes = json.loads(meta["classes"]) if "classes" in meta else None
        saved_size = int(meta.get("input_size", 0))
    if items is not None and classes is not None and classes != items.classes:
        if sorted(classes) == sorted(items.classes):
            # the checkpoint's classes in another order than the sorted folders: each label becomes its head row
            items.samples, items.classes = to_head_rows(items.samples, items.classes, classes), list(classes)
        elif teacher is not None:
            logger.info(f"{folder}: the checkpoint's classes are not these class folders: agreement with the teacher only")
            items = None
        else:
            raise InputError(class_mismatch(classes, items.classes, folder))
    return _Split(folder, items, meta, saved_size)


def _eval_models(source: ModelSource, uniform: bool):
    """(the model to evaluate, its timm model, the pixel mean and std, the loader's layout function) on the CPU."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if uniform:
        model = timm_model = source.build_timm()  # models.py logs on rank 0 only
        cfg = timm_model.pretrained_cfg or {}
        return model, timm_model, cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD), None
    model, timm_model = source.build()
    mean, std = model.pixel_mean_std()
    # static: the model makes its layout on the device (exactly k tokens per image), the workers only read images
    return model, timm_model, mean, std, None if model.config.static else model.planner.layout


def _check_head(items, timm_model, teacher, folder):
    """``items`` when the model has one class per class folder; with a teacher, None (agreement only) otherwise."""
    if teacher is not None and items is not None and timm_model.num_classes != len(items.classes):
        logger.info(
            f"{folder}: {count(len(items.classes), 'class folder')} for {count(timm_model.num_classes, 'class')}: "
            "agreement only"
        )
        return None
    if items is not None and timm_model.num_classes != len(items.classes):
        raise InputError(
            f"the model has {count(timm_model.num_classes, 'class')} but {folder} has "
            f"{count(len(items.classes), 'class folder')}; "
            "evaluate a checkpoint trained on these classes"
        )
    return items


def _eval_size(size: int, patch: int, source: ModelSource, meta: Mapping) -> int:
    """The input side, checked (a multiple of the patch size, now rather than in a loader worker)."""
    size = check_side(size, "input size")
    if size % patch:
        low, high = size // patch * patch, (size // patch + 1) * patch
        raise InputError(
            f"--size {size} is not a multiple of the patch size {patch} of {source.model or meta.get('architecture')}; "
            f"use {low or high}{f' or {high}' if low else ''}"
        )
    return size


def _log_result(result: dict, uniform: bool, with_teacher: bool, top5: bool) -> None:
    """The result in a line or two. ``top5``: the model has more than 5 classes (with at most 5, top-5 is 100%
    whatever the model does, so the line leaves it out; the JSON keeps it)."""
    bad = result["bad_images"]
    skipped = f", {count(bad, 'unreadable image')} skipped" if bad else ""
    accuracy = ""
    if "top1" in result:
        accuracy = f"top-1 {result['top1']:.2f}%  " + (f"top-5 {result['top5']:.2f}%  " if top5 else "")
    logger.info(
        f"{accuracy}tokens kept {result['tokens_kept']:.1%}  "
        f"{result['images_per_s']:.1f} img/s  ({result['images']} images{skipped}{', uniform ViT' if uniform else ''})"
    )
    if with_teacher:
        same = f"top-1 agreement {result['agreement']:.2f}%  " if "agreement" in result else ""
        kl = f"KL {result['kl']:.4f}  " if "kl" in result else ""
        logger.info(
            f"teacher {result['teacher']}: {same}{kl}cosine pre-logits {result['cosine_pre_logits']:.4f}  "
            f"dense {result['cosine_dense']:.4f}"
        )


def class_mismatch(saved, found, folder) -> str:
    """Why a checkpoint's classes ``saved`` are not the class folders ``found``, naming the classes that differ."""
    only_saved = [c for c in saved if c not in found]
    only_found = [c for c in found if c not in saved]

    def some(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if only_saved or only_found:
        what = "; ".join(
            part
            for part in (
                f"only in the checkpoint: {some(only_saved)}" if only_saved else "",
                f"only in {folder}: {some(only_found)}" if only_found else "",
            )
            if part
        )
    else:
        what = f"the same names in another order ({some(saved)})"
    return (
        f"the checkpoint's {count(len(saved), 'class')} are not the {count(len(found), 'class folder')} of {folder} "
        f"({what}); evaluate on the classes it was trained on"
    )


def count(n: int, noun: str) -> str:
    """'1 class', '2 classes', '1 step', '3 steps'."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "x", "ch", "sh")) else f"{n} {noun}s"


def _has_class_folders(data) -> bool:
    """Whether the split ``aptvit eval --data`` names (DIR/val/ or DIR) has class folders."""
    folder = _split_folder(data)
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())


def _split_folder(data) -> Path:
    root = Path(data)
    return root / "val" if (root / "val").is_dir() else root


def _teacher_agreement(
    model, timm_model, teacher, model_name, dataset, size, batch_size, workers, dist, skip_bad_images, dtype
) -> dict:
    """``aptvit.teacher.agreement`` of the APT ``model`` with ``teacher`` (keys prefixed by nothing: agreement,
    cosine_pre_logits, cosine_dense; tokens and speed are the student's, as ``evaluate``'s)."""
    from .teacher import agreement, build_teacher

    # "uniform": the model's own weights (a copy: the APT model shares the timm model's modules)
    built = build_teacher(teacher, timm_model, model_name or timm_model.pretrained_cfg.get("architecture"))
    built.check_student(model, size)
    result = agreement(
        model.to(dist.device), built.to(dist.device), dataset, batch_size, workers, dist, skip_bad_images, dtype
    )
    return {**result, "teacher": str(teacher)}
