"""The run's data: ``find_images`` (the train/ and val/ ImageFolders and their classes), ``load_data`` (datasets
whose crops are laid out in the loader's workers) and ``epoch_loader`` (one epoch's batches, resumable mid-epoch)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import numpy as np
import torch

from ..core.io import InputError
from ..data import (
    LayoutDataset,
    ShardedSampler,
    build_transform,
    check_image_folder,
    eval_crop,
    image_files,
    image_folder,
    make_loader,
)
from ..distributed import Dist
from .config import TrainConfig
from .run import TrainState

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder


@dataclass
class TrainData:
    """The run's datasets and this rank's share of the training set."""

    train: LayoutDataset
    val: Optional[LayoutDataset]  # None: nothing to evaluate on (a --distill run on one folder of images)
    sampler: ShardedSampler
    batches_per_epoch: int  # full batches in this rank's share (the last partial one is dropped)


@dataclass
class Unlabelled:
    """The images of a --distill split (paths with the label 0, as ``LayoutDataset`` takes them)."""

    samples: List[Tuple[str, int]]


def find_images(cfg: TrainConfig) -> Tuple[ImageFolder, Optional[ImageFolder]]:
    """The train/ and val/ folders of ``cfg.data`` (``torchvision.datasets.ImageFolder``), and their classes
    set in ``cfg.classes``; with ``cfg.distill``, ``find_unlabelled``.

    Raises:
        InputError: a missing or empty split, train and val classes that differ, or classes that are not the
            resumed run's own.
    """
    if cfg.distill:
        return find_unlabelled(cfg.data)
    train_dir, val_dir = (check_image_folder(cfg.data, split, required=True) for split in ("train", "val"))
    train_set, val_set = image_folder(train_dir), image_folder(val_dir)
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise InputError(f"train and val classes differ: only in train {only_train[:5]}, only in val {only_val[:5]}")
    if cfg.classes and cfg.classes != train_set.classes:
        raise InputError("the data's classes differ from the run's (config.json); resume with the same data")
    cfg.classes = list(train_set.classes)
    return train_set, val_set


def find_unlabelled(data) -> Tuple[Unlabelled, Optional[Unlabelled]]:
    """The images of a --distill run, labels or not: those under ``data``/train/ and ``data``/val/ (in class
    folders or not) when ``data`` has a train/ folder; otherwise every image under ``data``, and no val split.

    Raises:
        InputError: ``data`` is not a folder, or a split holds no image.
    """
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"--data {str(root)!r} is not a folder; give a folder of images (or with train/ and val/)")
    if not (root / "train").is_dir():
        return Unlabelled(image_files(root)), None
    val = Unlabelled(image_files(root / "val")) if (root / "val").is_dir() else None
    return Unlabelled(image_files(root / "train")), val


def load_data(
    cfg: TrainConfig, folders: Tuple[ImageFolder, ImageFolder], apt, layout_fn: Optional[Callable], dist: Dist
) -> TrainData:
    """Datasets that crop with the model's normalisation and lay out every crop in the loader's workers.

    Args:
        folders: ``find_images(cfg)``.
        apt: the model (its pixel mean/std, eval crop and layout settings).
        layout_fn: ``layout_fn(crop (1, 3, S, S) uint8) -> PatchLayout``; None: the model's ``planner.layout``.

    Raises:
        InputError: the layout fails on a blank crop (an impossible budget), or there is not one full batch.
    """
    train_set, val_set = folders
    mean, std = apt.pixel_mean_std()
    layout_fn = layout_fn or apt.planner.layout
    _check_layout(layout_fn, cfg.size)
    train = LayoutDataset(
        train_set.samples, build_transform(cfg.size, True, mean, std, augment=cfg.augment), layout_fn, cfg.seed
    )
    # the model's own eval crop, as `aptvit eval` uses it on the saved checkpoint
    val_transform = build_transform(cfg.size, False, mean, std, **eval_crop(apt.pretrained_cfg))
    val = LayoutDataset(val_set.samples, val_transform, layout_fn, cfg.seed) if val_set is not None else None
    sampler = ShardedSampler(len(train), dist.rank, dist.world, shuffle=True, seed=cfg.seed)
    batches_per_epoch = len(sampler) // cfg.batch_size
    if batches_per_epoch == 0:
        raise InputError(f"batch_size {cfg.batch_size} is larger than the {len(sampler)} training images per process")
    return TrainData(train, val, sampler, batches_per_epoch)


def epoch_loader(data: TrainData, apt, state: TrainState, cfg: TrainConfig):
    """The loader of ``state.epoch`` from its next batch on (``state.batches_in_epoch`` are done)."""
    data.sampler.set_epoch(state.epoch, skip=state.batches_in_epoch * cfg.batch_size)
    data.train.set_epoch(state.epoch)
    return make_loader(data.train, data.sampler, cfg.batch_size, cfg.workers, drop_last=True, plan=apt.planner)


def _check_layout(layout_fn: Callable, size: int) -> None:
    """Run the layout once on a blank crop: an impossible budget fails before anything is written.

    The layout may draw random numbers (the conversion experiment's random layout): every RNG is put back.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            layout_fn(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
