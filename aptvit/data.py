"""ImageFolder data for fine-tuning and evaluation, with layouts computed in the loader workers.

Each sample is the un-normalised uint8 crop, its label and its own ``PatchLayout``; the collate
function stacks the crops and joins the layouts into one packed batch layout, so the main process
only normalises and runs the model. Augmentation is seeded per (seed, epoch, index): a resumed run
sees exactly the crops an uninterrupted one would, whatever worker draws them.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .core.io import InputError, UserError, reading, user_os_error
from .core.layout import PatchLayout
from .core.packed import PackedBatch
from .images import IMAGE_SUFFIXES, to_rgb


def check_image_folder(root, split: str, required: bool = False) -> Path:
    """The ``split`` folder of ``root``, checked.

    Args:
        required: the split must exist (fine-tuning needs train/ and val/); otherwise ``root`` itself
            may be that folder (``aptvit eval --data DIR/val``).
    """
    root = Path(root)
    if required and not (root / split).is_dir():
        raise user_os_error(
            FileNotFoundError(),
            f"{str(root)!r} has no {split}/ folder; expected {root}/train/<class>/... and {root}/val/<class>/...",
        )
    folder = root / split if (root / split).is_dir() else root
    if folder.exists() and not folder.is_dir():
        raise InputError(
            f"data folder {str(folder)!r} is a file; expected a folder with {split}/ and one folder per class"
        )
    with reading(folder, "data folder", f"expected {split}/ with one folder per class"):
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{str(folder)!r} has no class folders; expected ImageFolder layout {folder}/<class>/<image>")
    return folder


def seeded_subset(samples: Sequence, limit: Optional[int], seed: int = 0) -> list:
    """At most ``limit`` of ``samples``, a seeded draw kept in their order (None or 0: all of them): a sample of the
    whole folder, not its first classes, and the same one for ``eval --limit`` and ``calibrate --limit``."""
    if not limit or len(samples) <= limit:
        return list(samples)
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]


def image_files(folder: Path) -> List[tuple]:
    """Every image under ``folder`` (sub-folders included, sorted) as (path, 0): unlabelled samples for
    ``LayoutDataset`` (a --distill run, ``aptvit eval --teacher``).

    Raises:
        InputError: ``folder`` is not a folder, or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder; give a folder of images")
    with reading(folder, "data folder"):
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise InputError(f"{str(folder)!r} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [(str(p), 0) for p in paths]


def is_image_file(path) -> bool:
    """Whether ``path`` names an image by its suffix (``IMAGE_SUFFIXES``)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def image_folder(folder: Path):
    """torchvision's ImageFolder (paths and labels only; images are read by ``LayoutDataset``) of the files whose
    suffix is in ``IMAGE_SUFFIXES``, the one set of image files every command reads."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), loader=lambda p: p, is_valid_file=is_image_file)
    except FileNotFoundError as e:
        raise InputError(f"{folder}: {str(e).splitlines()[0]} (a class folder with no images?)") from None


def to_head_rows(samples: Sequence, found: Sequence[str], head: Sequence[str]) -> list:
    """``samples`` (path, label), labelled by their index in the sorted class folders ``found``, relabelled by the
    row of the model's head that holds the same class, ``head`` (the checkpoint's classes, the same names in the
    order it was trained with)."""
    rows = [list(head).index(c) for c in found]
    return [(path, rows[label]) for path, label in samples]


@dataclass
class Batch:
    """A packed training batch: uint8 crops, labels, their layout, and the files that could not be read."""

    images: torch.Tensor  # (B, 3, S, S) uint8
    labels: torch.Tensor  # (B,) long
    layout: Optional[PatchLayout]
    bad: List[str]
    packed: Optional[PackedBatch] = None  # the model's plan of the batch, made in the worker (see make_loader)

    def count_bad(self, skip_bad_images: bool) -> int:
        """How many of the batch's files could not be read; an ``InputError`` naming the first unless
        ``skip_bad_images`` (training, evaluation and agreement all read images this way)."""
        if self.bad and not skip_bad_images:
            raise InputError(f"cannot read image {self.bad[0]}; pass --skip-bad-images to skip unreadable files")
        return len(self.bad)

    def pin_memory(self) -> "Batch":
        """The batch in page-locked host memory: ``DataLoader(pin_memory=True)`` calls this on custom batch types
        (without it the batch stays unpinned and the "non-blocking" copies to the GPU block). Needs an accelerator."""
        return Batch(
            self.images.pin_memory(),
            self.labels.pin_memory(),
            None if self.layout is None else self.layout.pin_memory(),
            self.bad,
            None if self.packed is None else self.packed.pin_memory(),
        )


class LayoutDataset(torch.utils.data.Dataset):
    """ImageFolder samples as (uint8 crop, label, layout or None, bad path or None).

    Args:
        samples: (path, label) pairs.
        transform: a timm transform built with ``use_prefetcher=True`` (uint8 output, no normalisation).
        layout_fn: ``layout_fn(crop (1, 3, S, S) uint8) -> PatchLayout``: the model's ``apt.planner.layout`` (a
            method of a picklable object: the workers get a copy), or None for no layout.
        seed: base seed of the per-sample augmentation.
    """

    def __init__(self, samples: Sequence, transform, layout_fn: Optional[Callable], seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.layout_fn = layout_fn
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                img = to_rgb(im)  # as `aptvit show` reads it: EXIF rotation, transparency on white, 16-bit scaled
        except Exception as e:  # any decoding failure: report the file, never crash a worker
            return None, label, None, f"{path} ({type(e).__name__}: {e})"
        # seed the augmentation (and a random layout_fn) per sample, without touching the caller's RNGs
        sample_seed = (self.seed * 1_000_003 + self.epoch * 7_919 + index) % (2**31)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            try:
                crop = torch.from_numpy(np.ascontiguousarray(self.transform(img)))  # uint8 (3, S, S)
                layout = self.layout_fn(crop[None]) if self.layout_fn is not None else None
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return crop, label, layout, None


def collate(samples, plan: Optional[Callable] = None) -> Batch:
    """Stack crops, join layouts, plan the packed batch; unreadable samples are set aside in ``bad``.

    Args:
        plan: ``plan(images, layout) -> PackedBatch`` (the models ``planner``), run here, in the worker.
    """
    good = [s for s in samples if s[0] is not None]
    bad = [s[3] for s in samples if s[0] is None]
    if not good:
        return Batch(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), None, bad)
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([s[1] for s in good], dtype=torch.long)
    layout = PatchLayout.cat([s[2] for s in good]) if good[0][2] is not None else None
    packed = plan(images, layout) if plan is not None and layout is not None else None
    return Batch(images, labels, layout, bad, packed)


class ShardedSampler(torch.utils.data.Sampler):
    """Seeded per-epoch shuffle, split across ranks, resumable mid-epoch.

    Args:
        size: dataset length.
        rank, world: this process and the number of processes.
        shuffle: permute per epoch with ``seed + epoch`` (training); in order otherwise (evaluation).
        equal_shares: cut every rank's share to size // world (training: ranks step together);
            otherwise ranks split the data exactly, without repeats (evaluation sums counts).
    """

    def __init__(
        self, size: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0, equal_shares: bool = True
    ):
        self.size, self.rank, self.world, self.shuffle, self.seed = size, rank, world, shuffle, seed
        self.equal_shares = equal_shares
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start ``epoch``, skipping the first ``skip`` samples of this rank's share (resume)."""
        self.epoch, self.skip = epoch, skip

    def _share(self) -> List[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        share = order[self.rank :: self.world]
        return share[: self.size // self.world] if self.equal_shares else share

    def __iter__(self):
        return iter(self._share()[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self._share()) - self.skip)


def worker_error(e: BaseException) -> BaseException:
    """``e`` as raised in the loader worker: torch re-raises a worker's exception with a new message ("Caught
    InputError in DataLoader worker process 0." and the worker's traceback); a ``UserError`` gets its own message
    back, the last line of that traceback. Any other exception keeps torch's (its traceback is the point)."""
    text = str(e)
    if not isinstance(e, UserError) or not text.startswith("Caught ") or "DataLoader worker" not in text:
        return e
    prefixes = (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__qualname__}: ")
    lines = [line for line in text.splitlines() if line.startswith(prefixes)]
    if not lines:
        return e
    message = next(lines[-1][len(p) :] for p in prefixes if lines[-1].startswith(p))
    try:
        return type(e)(message)
    except Exception:  # a type that takes other arguments: torch's message stays
        return e


class _Loader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` whose iterator re-raises a worker's user error with its own message."""

    def __iter__(self):
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except UserError as e:
                original = worker_error(e)
                if original is e:
                    raise
                raise original from None
            yield batch


def make_loader(
    dataset: LayoutDataset,
    sampler: ShardedSampler,
    batch_size: int,
    workers: int,
    drop_last: bool,
    plan: Optional[Callable] = None,
):
    """A DataLoader with the packing collate (``plan``: the model's ``planner``, run in the workers); a user
    error in a worker reaches the caller with its own message (``worker_error``)."""
    return _Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(collate, plan=plan),
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # its own generator: starting an iterator must not draw from the global RNG, or a resumed
        # run's dropout / drop-path draws would shift (samples are seeded per index anyway)
        generator=torch.Generator().manual_seed(0),
    )


def eval_crop(pretrained_cfg: Optional[dict]) -> dict:
    """The evaluation crop a model's ``pretrained_cfg`` asks for, as ``build_transform``'s keywords: its
    ``crop_pct``, ``crop_mode`` and ``interpolation`` (timm's ``resolve_data_config`` reads the same keys; it
    falls back to bicubic, where ``create_transform`` alone would resize bilinearly) and aptvit's ``crop_offset``
    (a converted Hugging Face tower's "floor"; torchvision's "round" otherwise)."""
    cfg = pretrained_cfg or {}
    return dict(
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode"),
        interpolation=cfg.get("interpolation") or "bicubic",
        crop_offset=cfg.get("crop_offset") or "round",
    )


CROP_OFFSETS = ("round", "floor")  # how a center crop places an odd margin: torchvision's way, Hugging Face's


class FloorCenterCrop:
    """torchvision's ``CenterCrop`` of a PIL image with the offset floored, as Hugging Face image processors place
    it (torchvision rounds half to even: where the margin is odd the two crops can sit one pixel apart)."""

    def __init__(self, crop):
        self.crop = crop  # the torchvision CenterCrop it replaces; it still handles what is not a plain crop

    def __call__(self, img):
        crop_h, crop_w = self.crop.size
        if not hasattr(img, "crop") or crop_h > img.height or crop_w > img.width:
            return self.crop(img)  # a tensor, or a crop larger than the image (padded): torchvision's
        top, left = (img.height - crop_h) // 2, (img.width - crop_w) // 2
        return img.crop((left, top, left + crop_w, top + crop_h))

    def __repr__(self) -> str:
        return f"FloorCenterCrop(size={tuple(self.crop.size)})"


def build_transform(
    size: int,
    training: bool,
    mean,
    std,
    crop_pct: Optional[float] = None,
    augment: str = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    crop_mode: Optional[str] = None,
    crop_offset: str = "round",
):
    """timm's ``create_transform`` with uint8 output (``use_prefetcher``).

    Training: random-resized crop, flip and ``augment`` (a timm auto-augment string; the paper's
    RandAugment m9 by default). ``augment="none"`` trains on the evaluation transform (resize and
    center crop, nothing random), for data whose labels a random crop could cut away.
    Evaluation: resize by ``interpolation`` and crop by ``crop_pct`` / ``crop_mode``, the center crop's odd margin
    split as ``crop_offset`` says (``CROP_OFFSETS``); pass ``**eval_crop(cfg)``
    for a model's own (bicubic for timm's ViTs: a bilinear resize costs a lower resolution about 0.5 point of
    top-1 on Imagenette, BENCHMARKS.md section 2).
    """
    from timm.data import create_transform

    kwargs = dict(input_size=(3, size, size), use_prefetcher=True, mean=mean, std=std)
    if training and augment != "none":
        kwargs.update(is_training=True, auto_augment=augment, re_prob=0.0)
    else:
        crop = dict(crop_pct=1.0) if training else dict(crop_pct=crop_pct, crop_mode=crop_mode)
        kwargs.update(is_training=False, interpolation=interpolation, **crop)
    if not training or augment == "none":
        return _with_crop_offset(create_transform(**kwargs), crop_offset)
    try:  # timm's parser of the augment string asserts on what it does not know
        return posterize_any_bits(create_transform(**kwargs))
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise InputError(
            f"--augment {augment!r} is not a timm auto-augment string such as 'rand-m9-mstd0.5-inc1' "
            f"(or 'none'): {str(e) or type(e).__name__}"
        ) from None


def _with_crop_offset(transform, crop_offset: str):
    """timm's evaluation ``transform`` with its center crop placed as ``crop_offset`` says."""
    from torchvision import transforms

    if crop_offset not in CROP_OFFSETS:
        raise InputError(f"crop_offset must be one of {CROP_OFFSETS}, got {crop_offset!r}")
    if crop_offset == "floor":
        steps = transform.transforms
        steps[:] = [FloorCenterCrop(t) if isinstance(t, transforms.CenterCrop) else t for t in steps]
    return transform


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, also for 0 bits kept (a black image, what Pillow before 12 returned): RandAugment's
    increasing posterize ("inc1", the default augment) asks for 0 bits at magnitude 10, which a magnitude
    of 9 with its noise (mstd0.5) reaches on a few images per thousand, and newer Pillow raises on 0."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def posterize_any_bits(transform):
    """``transform`` (timm's, a ``Compose``) with the posterize of each of its op lists (RandAugment's) replaced by
    ``_posterize``; the transform itself, changed in place (timm's module is left as it is)."""
    from timm.data.auto_augment import posterize

    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is posterize:
                op.aug_fn = _posterize
    return transform
