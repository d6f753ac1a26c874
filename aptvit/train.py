"""``aptvit finetune``: convert a fine-tuned timm ViT and fine-tune it (APT_NOTES section 7).

Recipe defaults from the paper: AdamW (wd 0.05), cosine schedule with warm-up stepped per optimizer
step, label smoothing 0.1, drop path 0.1, RandAugment m9 (timm's create_transform), gradient
clipping; bf16 autocast on CUDA, fp32 on CPU. One process or many through torchrun (DDP: nccl on
CUDA, gloo on CPU); only rank 0 writes and logs. Every file is written atomically; ``--resume`` continues
mid-epoch exactly where the last checkpoint stopped.

The steps of ``finetune``, each usable alone: ``resolve_config`` (the settings, new run or resume),
``find_images`` + ``load_data`` (the data), ``build_model`` + ``make_optimizer``, ``TrainState`` (where
the run stands; its ``save`` and ``restore`` are the checkpoint), ``train_one_epoch`` and ``evaluate_epoch``.
Progress goes to the ``aptvit.train`` logger at INFO (the CLI prints it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .core.io import (
    InputError,
    UserError,
    atomic_write,
    atomic_write_many,
    check_side,
    check_writable,
    reading,
    remove_temporaries,
    writing,
)
from .core.quadtree import patch_layout
from .data import LayoutDataset, ShardedSampler, build_transform, check_image_folder, image_folder, make_loader
from .distributed import Dist, all_gather_objects, all_reduce_sum, setup_distributed
from .evaluate import evaluate
from .images import normalise
from .models import build_models, conversion_settings
from .nn.attention import backend_choices, resolve_backend
from .nn.checkpoint import TIMM_ARGS, read_metadata, saver
from .nn.config import APTConfig
from .runtime import DEVICES, autocast, resolve_dtype, set_deterministic

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

logger = logging.getLogger(__name__)

# What a resumed run may change; everything else comes from the run's config.json.
RUN_CONTROL = (
    "epochs",
    "max_steps",
    "workers",
    "skip_bad_images",
    "save_every",
    "log_every",
    "eval",
    "device",
    "deterministic",
    "attention",
)


@dataclass
class TrainConfig:
    """Everything a run needs; saved as RUN_DIR/config.json."""

    model: str
    data: str
    out: str
    pretrained: bool = False
    checkpoint: Optional[str] = None
    epochs: int = 1
    size: int = 384
    # the conversion settings (saved with the weights); None: APTConfig's defaults for a timm model, an aptvit
    # checkpoint's own settings; given with an aptvit checkpoint, they replace its settings
    apt: Optional[APTConfig] = None
    augment: str = "rand-m9-mstd0.5-inc1"  # timm auto-augment string, or "none"
    model_args: Dict = field(default_factory=dict)  # extra timm.create_model arguments
    batch_size: int = 64
    lr: float = 5e-5
    min_lr: float = 1e-6
    warmup: float = 0.05  # fraction of all optimizer steps
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    clip_grad: float = 1.0
    # lr multiplier of the new apt.* layers (the detail path): its output layer starts at zero and AdamW moves a
    # weight by about lr per step, so at the fine-tuning lr one epoch leaves it near zero. 10 was chosen on the
    # Fashion-MNIST validation split over 1 and 30 (benchmarks/real_conversion.py, docs/real_conversion.md)
    new_layer_lr_scale: float = 10.0
    workers: int = 4
    seed: int = 0
    skip_bad_images: bool = False
    max_steps: Optional[int] = None  # stop (and save) after this many optimizer steps; the schedule is unchanged
    save_every: int = 0  # also checkpoint every N steps (0: at the end of each epoch only)
    log_every: int = 10
    eval: bool = True
    device: str = "auto"  # auto: CUDA when available (one GPU per torchrun process), else the CPU
    dtype: str = "auto"  # compute precision: auto = bf16 autocast on CUDA, fp32 on the CPU
    deterministic: bool = False  # deterministic kernels: bit-exact resume on CUDA too (slower)
    attention: str = "auto"  # attention backend (a runtime choice: may change on resume)
    classes: List[str] = field(default_factory=list)

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["apt"] = self.apt.to_dict() if self.apt is not None else None
        return json.dumps(d, indent=2)

    @staticmethod
    def from_json(text: str) -> "TrainConfig":
        """Settings saved by ``to_json``, or by aptvit 0.1 (the layout settings as four top-level fields)."""
        d = json.loads(text)
        old = {k: v for k in LAYOUT_FIELDS if k in d and (v := d.pop(k)) is not None}
        if old:  # 0.1: the given fields on top of an aptvit checkpoint's own settings (as its command line did)
            if old.get("thresholds") is not None:
                old["thresholds"] = {int(k): float(v) for k, v in old["thresholds"].items()}
            source = d.get("checkpoint")
            d["apt"] = conversion_settings(source if source and os.path.isfile(source) else None, **old)
        elif d.get("apt") is not None:
            d["apt"] = APTConfig.from_dict(d["apt"])
        return TrainConfig(**d)


# what the command line sets of an APTConfig (aptvit 0.1 saved the first four at the top of config.json)
LAYOUT_FIELDS = ("patch_sizes", "thresholds", "budget", "scorer", "scorer_args", "area_bias")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine to ``min_lr``, per optimizer step."""
    warm = max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> List[dict]:
    """AdamW parameter groups: no weight decay for biases, norms and ``no_weight_decay()`` (as timm's
    factory does), and ``lr_scale`` = ``cfg.new_layer_lr_scale`` for the new ``apt.*`` layers."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: Dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim <= 1 or name.endswith(".bias") or name in skip else cfg.weight_decay
        scale = cfg.new_layer_lr_scale if name.startswith("apt.") else 1.0
        groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale})["params"].append(
            param
        )
    return list(groups.values())


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "train_state.pt")
CHECKPOINT_FILES = ("model.safetensors", "train_state.pt")


class DivergedError(UserError, FloatingPointError):
    """The loss or the weights stopped being finite: the run stops, its last good checkpoint stays."""


def _option(key: str) -> str:
    if key == "apt":
        return "/".join(_option(k) for k in LAYOUT_FIELDS)
    return "--no-eval" if key == "eval" else f"--{key.replace('_', '-')}"


def _json_safe(value):
    """``value`` with non-finite floats as None: metrics.jsonl stays JSON (no bare NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------ the run folder and its checkpoint
class Run:
    """The files of one run directory, all written atomically (rank 0 only): settings, metrics, and which
    checkpoint is on disk (``TrainState.save`` / ``TrainState.restore`` write and read the checkpoint)."""

    def __init__(self, folder: Path, main: bool):
        self.folder, self.main = Path(folder), main
        self.metrics: List[str] = []
        self.saved_step: Optional[int] = None  # the step of the checkpoint on disk (None: none yet)

    def start(self, cfg: "TrainConfig", fresh: bool) -> None:
        """Remove what a killed run left half-written; a fresh start also replaces the settings and metrics."""
        if not self.main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.folder, RUN_FILES)
        if fresh:
            with writing(self.folder / "metrics.jsonl"):
                (self.folder / "metrics.jsonl").unlink(missing_ok=True)
            atomic_write(self.folder / "config.json", lambda tmp: Path(tmp).write_text(cfg.to_json()))

    def read_metrics(self, up_to_step: int) -> None:
        """The metrics of the steps a resume does not redo."""
        path = self.folder / "metrics.jsonl"
        with reading(path, "metrics", "fix or delete the damaged line"):
            records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
            self.metrics = [json.dumps(r) for r in records if r["step"] <= up_to_step]

    def has_eval(self, step: int) -> bool:
        return any(r["kind"] == "eval" and r["step"] == step for r in map(json.loads, self.metrics))

    def log_metrics(self, record: dict) -> None:
        if not self.main:
            return
        self.metrics.append(json.dumps(_json_safe(record), allow_nan=False))
        text = "\n".join(self.metrics) + "\n"
        atomic_write(self.folder / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))

    def diverged(self, step: int, what: str, cfg: TrainConfig) -> DivergedError:
        kept = (
            f"the last good checkpoint (step {self.saved_step}) stays in {self.folder}"
            if self.saved_step is not None
            else f"no checkpoint was written; {self.folder} can start again"
        )
        return DivergedError(f"step {step}: {what}: the run diverged (lower --lr, now {cfg.lr:g}); {kept}")


@dataclass
class TrainState:
    """Where the run stands: what a checkpoint saves besides the weights and the optimizer.

    On disk (the pair ``save`` writes and ``restore`` reads): model.safetensors (the weights, with the
    settings, classes and ``global_step`` in its metadata) and train_state.pt, a dict with the keys
    ``optimizer``, ``epoch``, ``batches_in_epoch``, ``global_step`` and ``rng`` (every rank's RNG states).
    """

    epoch: int = 0
    batches_in_epoch: int = 0  # consumed batches of ``epoch``, steps or not: a resume skips that many
    global_step: int = 0  # optimizer steps taken
    bad_images: int = 0  # unreadable images this process skipped (not saved: a resumed run counts anew)

    @property
    def at_epoch_end(self) -> bool:
        """Whether an epoch has just ended (no batch of the next one is done yet)."""
        return self.epoch > 0 and self.batches_in_epoch == 0

    def save(self, run: Run, apt, optimizer, cfg: TrainConfig, dist: Dist) -> None:
        """Weights (+ settings, classes, step) and the training state; every rank's RNG is kept.

        Every rank calls it (the RNG states are gathered); only rank 0 writes.

        Raises:
            DivergedError: the weights are no longer finite; the last good checkpoint stays.
        """
        if not all(bool(torch.isfinite(p).all()) for p in apt.parameters()):  # the same weights on every rank
            raise run.diverged(self.global_step, "the weights hold nan or inf", cfg)
        rng = all_gather_objects(_rng_state(), dist)  # collective: every rank calls it
        run.saved_step = self.global_step
        if not run.main:
            return
        model = saver(
            apt,
            model_args=cfg.model_args,
            extra_metadata={
                "classes": json.dumps(cfg.classes),
                "global_step": str(self.global_step),
                "input_size": str(cfg.size),
            },
        )
        state = {
            "optimizer": optimizer.state_dict(),
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "global_step": self.global_step,
            "rng": rng,
        }
        # both written first, then renamed back to back: the pair stays consistent
        atomic_write_many(
            [
                (run.folder / "model.safetensors", model),
                (run.folder / "train_state.pt", lambda tmp: torch.save(state, tmp)),
            ]
        )

    @classmethod
    def restore(cls, run: Run, optimizer, dist: Dist) -> "TrainState":
        """What ``save`` wrote into ``run``: the optimizer's state and this rank's RNGs are set, the metrics of
        the steps to redo dropped. The weights are the caller's to load (``build_model``).

        Raises:
            InputError: a damaged pair, a pair from two different steps, or another number of processes.
        """
        out = run.folder
        hint = "the checkpoint is damaged; delete model.safetensors and train_state.pt to start the run again"
        with reading(out / "train_state.pt", "training state", hint):
            saved = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
            state = cls(saved["epoch"], saved["batches_in_epoch"], saved["global_step"])
            rng = saved["rng"]
        saved_step = read_metadata(out / "model.safetensors").get("global_step")
        if saved_step != str(state.global_step):
            raise InputError(
                f"{out}: model.safetensors (step {saved_step}) and train_state.pt (step {state.global_step}) "
                "are from different steps (a crash between the two writes?); resume is not possible"
            )
        with reading(out / "train_state.pt", "training state", hint):
            optimizer.load_state_dict(saved["optimizer"])
        if len(rng) != dist.world:
            raise InputError(f"{out} was saved by {len(rng)} process(es); resume it with as many, not {dist.world}")
        _set_rng_state(rng[dist.rank])
        run.read_metrics(state.global_step)  # drop what the resume redoes
        run.saved_step = state.global_step
        return state


# ------------------------------------------------------------------------------------------------------------- settings
def _validate(cfg: TrainConfig) -> None:
    for name, value, low in (
        ("epochs", cfg.epochs, 1),
        ("batch_size", cfg.batch_size, 1),
        ("size", cfg.size, 1),
        ("log_every", cfg.log_every, 1),
        ("save_every", cfg.save_every, 0),
        ("workers", cfg.workers, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} ({_option(name)}) must be an int >= {low}, got {value!r}")
    check_side(cfg.size, "--size")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise InputError(f"max_steps (--max-steps) must be >= 1, got {cfg.max_steps}")
    for name, value in (
        ("lr", cfg.lr),
        ("warmup", cfg.warmup),
        ("drop_path", cfg.drop_path),
        ("min_lr", cfg.min_lr),
        ("weight_decay", cfg.weight_decay),
        ("clip_grad", cfg.clip_grad),
        ("label_smoothing", cfg.label_smoothing),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} ({_option(name)}) must be a finite number, got {value!r}")
    if not 0.0 <= cfg.drop_path < 1.0:
        raise InputError(f"drop_path (--drop-path) must be in [0, 1), got {cfg.drop_path}")
    resolve_dtype(cfg.dtype, "cpu")  # a clear error for an unknown name, before any work
    if cfg.device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, got {cfg.device!r}")
    if cfg.attention not in backend_choices():
        raise InputError(f"attention (--attention) must be one of {backend_choices()}, got {cfg.attention!r}")
    if (
        isinstance(cfg.new_layer_lr_scale, bool)
        or not isinstance(cfg.new_layer_lr_scale, (int, float))
        or not cfg.new_layer_lr_scale > 0
        or not math.isfinite(cfg.new_layer_lr_scale)
    ):
        raise InputError(
            f"new_layer_lr_scale (--new-layer-lr-scale) must be a finite number > 0, got {cfg.new_layer_lr_scale}"
        )
    if not 0.0 <= cfg.warmup < 1.0 or cfg.lr <= 0:
        raise InputError(
            f"warmup (--warmup) must be a fraction in [0, 1) and lr (--lr) > 0, got {cfg.warmup} and {cfg.lr}"
        )
    unknown = sorted(set(cfg.model_args) - set(TIMM_ARGS))
    if unknown:
        raise InputError(f"model_args {unknown} are not allowed; choose among {', '.join(TIMM_ARGS)}")
    build_transform(cfg.size, True, (0.5,) * 3, (0.5,) * 3, augment=cfg.augment)  # timm parses the augment string


def _saved_setting(saved: TrainConfig, key: str):
    """The run's value of ``key``: a TrainConfig field, or one of the conversion settings it holds."""
    if key in LAYOUT_FIELDS:
        return getattr(saved.apt, key) if saved.apt is not None else None
    return getattr(saved, key)


def _same_setting(key: str, given, saved) -> bool:
    if key == "apt":  # config.json holds the settings the run resolved (patch sizes filled in, defaults)
        if given is None:
            return True  # nothing given: the run's own
        if saved is not None and given.patch_sizes is None and saved.patch_sizes is not None:
            given = given.for_patch_size(saved.patch_sizes[0])
    if given is None or saved is None:
        return given is saved
    if key in ("data", "checkpoint"):
        return os.path.abspath(given) == os.path.abspath(saved)
    if key == "patch_sizes":
        return list(given) == list(saved)
    if key == "thresholds":
        return {int(k): float(v) for k, v in given.items()} == {int(k): float(v) for k, v in saved.items()}
    return given == saved


def resolve_config(cfg: TrainConfig, resume: bool, overrides: Optional[Dict]) -> Tuple[TrainConfig, bool]:
    """The run's settings, and whether it continues from a checkpoint in ``cfg.out``.

    A new run may use an empty folder, or one that a failed start left without a checkpoint. ``resume``
    takes the settings of the run's config.json; ``overrides`` (all of ``cfg`` when None) may change only
    ``RUN_CONTROL``, any other difference is refused by name. A run folder without a checkpoint starts again.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a folder for the run")
    present = {n for n in RUN_FILES if (out / n).is_file()}
    if not resume:
        others = (
            [p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp")]
            if out.is_dir()
            else []
        )
        if others or present & set(CHECKPOINT_FILES):
            raise FileExistsError(
                f"run directory {str(out)!r} exists and is not empty; pass --resume to continue it or choose another --out"
            )
        absolute = {k: os.path.abspath(v) for k in ("data", "checkpoint") if (v := getattr(cfg, k))}
        return dataclasses.replace(cfg, **absolute), False
    config = out / "config.json"
    if not config.is_file():
        raise InputError(
            f"--resume: {str(out)!r} is not a run directory (no config.json); start the run without --resume"
        )
    with reading(config, "run settings", "fix it, or delete the run directory and start again"):
        saved = TrainConfig.from_json(config.read_text())
    # overrides may name the conversion settings one by one (the command line's options) or as "apt"
    changes = overrides if overrides is not None else {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    refused = [
        f"{_option(k)} {v!r} (the run's: {_saved_setting(saved, k)!r})"
        for k, v in changes.items()
        if k not in RUN_CONTROL and k not in ("out", "classes") and not _same_setting(k, v, _saved_setting(saved, k))
    ]
    if refused:
        allowed = ", ".join(_option(k) for k in RUN_CONTROL)
        raise InputError(
            f"--resume: {'; '.join(refused)} cannot change (config.json holds the run's settings); "
            f"only {allowed} may; start a new --out for other settings"
        )
    saved.out = cfg.out  # where the run is now (the folder may have moved)
    saved.max_steps = None  # the interrupted run's stop point is not this run's: to the end unless given
    for key, value in changes.items():
        if key in RUN_CONTROL:
            setattr(saved, key, value)
    checkpoint = present & set(CHECKPOINT_FILES)
    if len(checkpoint) == 1:
        raise InputError(
            f"--resume: {str(out)!r} holds only {checkpoint.pop()} of the checkpoint pair (a crash between the "
            "two renames?); delete it to start the run again"
        )
    return saved, bool(checkpoint)


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


# ----------------------------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """The run's datasets and this rank's share of the training set."""

    train: LayoutDataset
    val: LayoutDataset
    sampler: ShardedSampler
    batches_per_epoch: int  # full batches in this rank's share (the last partial one is dropped)


def find_images(cfg: TrainConfig) -> Tuple[ImageFolder, ImageFolder]:
    """The train/ and val/ folders of ``cfg.data`` (``torchvision.datasets.ImageFolder``), and their classes
    set in ``cfg.classes``.

    Raises:
        InputError: a missing or empty split, train and val classes that differ, or classes that are not the
            resumed run's own.
    """
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


def load_data(
    cfg: TrainConfig, folders: Tuple[ImageFolder, ImageFolder], apt, layout_fn: Optional[Callable], dist: Dist
) -> TrainData:
    """Datasets that crop with the model's normalisation and lay out every crop in the loader's workers.

    Args:
        folders: ``find_images(cfg)``.
        apt: the model (its pixel mean/std, eval crop and layout settings).
        layout_fn: ``layout_fn(crop (1, 3, S, S) uint8) -> PatchLayout``; None: ``patch_layout`` with the model's
            settings.

    Raises:
        InputError: the layout fails on a blank crop (an impossible budget), or there is not one full batch.
    """
    train_set, val_set = folders
    mean, std = apt.pixel_mean_std()
    layout_fn = layout_fn or functools.partial(patch_layout, **apt.config.layout_kwargs())
    _check_layout(layout_fn, cfg.size)
    train = LayoutDataset(
        train_set.samples, build_transform(cfg.size, True, mean, std, augment=cfg.augment), layout_fn, cfg.seed
    )
    # the model's own eval crop, as `aptvit eval` uses it on the saved checkpoint
    val_transform = build_transform(cfg.size, False, mean, std, apt.pretrained_cfg.get("crop_pct"))
    val = LayoutDataset(val_set.samples, val_transform, layout_fn, cfg.seed)
    sampler = ShardedSampler(len(train), dist.rank, dist.world, shuffle=True, seed=cfg.seed)
    batches_per_epoch = len(sampler) // cfg.batch_size
    if batches_per_epoch == 0:
        raise InputError(f"batch_size {cfg.batch_size} is larger than the {len(sampler)} training images per process")
    return TrainData(train, val, sampler, batches_per_epoch)


def epoch_loader(data: TrainData, apt, state: TrainState, cfg: TrainConfig):
    """The loader of ``state.epoch`` from its next batch on (``state.batches_in_epoch`` are done)."""
    data.sampler.set_epoch(state.epoch, skip=state.batches_in_epoch * cfg.batch_size)
    data.train.set_epoch(state.epoch)
    return make_loader(data.train, data.sampler, cfg.batch_size, cfg.workers, drop_last=True, plan=apt.planner())


# ---------------------------------------------------------------------------------------------------------------- model
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
    with _quiet(continues or not dist.main):
        if continues:
            apt, _ = build_models(
                None,
                checkpoint=Path(cfg.out) / "model.safetensors",
                num_classes=len(cfg.classes),
                timm_kwargs=timm_kwargs,
                attention=cfg.attention,
            )
        else:
            apt, _ = build_models(
                cfg.model,
                cfg.pretrained,
                cfg.checkpoint,
                len(cfg.classes),
                timm_kwargs={**timm_kwargs, **cfg.model_args},
                attention=cfg.attention,
                config=cfg.apt,  # the run's settings as a whole (they replace an aptvit checkpoint's own)
            )
            cfg.apt = apt.config  # config.json records the settings the run trains with
    apt.to(dist.device)
    if cfg.size % apt.patch_size:
        raise InputError(f"size {cfg.size} is not a multiple of the patch size {apt.patch_size}")
    # an attention backend that cannot train here fails now, not at the first step after config.json is written
    resolve_backend(apt.attention, dist.device, resolve_dtype(cfg.dtype, dist.device), grad=True)
    return apt


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
    """The schedule's ``lr`` times each group's ``lr_scale`` (the new apt.* layers learn faster)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ------------------------------------------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class Schedule:
    """The run's length in optimizer steps."""

    batches_per_epoch: int
    total: int  # the lr schedule's length: every epoch's batches (max_steps only stops early)
    stop: int  # the step this call stops at: max_steps, or total

    @staticmethod
    def of(cfg: TrainConfig, batches_per_epoch: int) -> "Schedule":
        total = batches_per_epoch * cfg.epochs
        return Schedule(batches_per_epoch, total, cfg.max_steps if cfg.max_steps is not None else total)


@dataclass
class _Window:
    """Sums over the steps since the last metrics line (this rank's; ``record`` adds up the ranks')."""

    loss: float = 0.0
    steps: int = 0
    images: int = 0
    tokens: int = 0
    base: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, batch) -> None:
        self.loss += loss
        self.steps += 1
        self.images += batch.images.shape[0]
        self.tokens += batch.layout.total_tokens
        self.base += int(batch.layout.num_base_tokens.sum())

    def record(self, state: TrainState, optimizer, dist: Dist) -> dict:
        """The metrics line of the window (a collective: every rank calls it)."""
        loss, steps, images, tokens, base = all_reduce_sum(
            [self.loss, self.steps, self.images, self.tokens, self.base], dist
        )
        return {
            "kind": "train",
            "epoch": state.epoch,
            "step": state.global_step,
            "loss": loss / max(1, steps),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": images / (time.perf_counter() - self.start),
            "tokens_kept": tokens / max(1, base),
            "bad_images": state.bad_images,
        }


def _count_bad(batch, cfg: TrainConfig) -> int:
    """How many of the batch's files could not be read; an error unless ``cfg.skip_bad_images``."""
    if batch.bad and not cfg.skip_bad_images:
        raise InputError(f"cannot read image {batch.bad[0]}; pass --skip-bad-images to skip unreadable files")
    return len(batch.bad)


def _update(apt, loss: torch.Tensor, optimizer, cfg: TrainConfig) -> None:
    """One optimizer step on ``loss``'s gradients, clipped to norm ``cfg.clip_grad`` (0: no clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(apt.parameters(), cfg.clip_grad)
    optimizer.step()


def train_one_epoch(
    model, apt, loader, optimizer, state: TrainState, cfg: TrainConfig, schedule: Schedule, run: Run, dist: Dist
) -> dict:
    """One pass over ``loader`` (the rest of ``state.epoch``): one optimizer step per batch, the lr set per step.

    Logs a metrics line every ``cfg.log_every`` steps, at the epoch's last batch and at ``schedule.stop``; saves
    a checkpoint every ``cfg.save_every`` steps and at ``schedule.stop``, where it stops. Advances ``state``.

    Args:
        model: what computes the loss: ``apt`` or its DDP wrapper.
        apt: the model itself (its parameters are clipped and saved).
        loader: ``epoch_loader``'s batches (``aptvit.data.Batch``, planned for ``apt``).

    Returns:
        The last metrics line ({} when none was logged).

    Raises:
        DivergedError: a non-finite loss: the run stops before that step; the last good checkpoint stays.
        InputError: an unreadable image without ``cfg.skip_bad_images``.
    """
    from tqdm import tqdm

    model.train()
    mean, std = apt.pixel_mean_std()
    dtype = resolve_dtype(cfg.dtype, dist.device)
    bar = tqdm(
        loader,
        desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
        initial=state.batches_in_epoch,
        total=schedule.batches_per_epoch,
        disable=None if dist.main else True,
        leave=False,
    )
    window, metrics = _Window(), {}
    for batch in bar:
        state.batches_in_epoch += 1  # consumed, whether or not it becomes a step (resume skips by batches)
        state.bad_images += _count_bad(batch, cfg)
        # every rank must take the step or none (DDP's collectives): skip when any rank has nothing
        if all_reduce_sum([float(batch.images.shape[0] == 0)], dist)[0] > 0:
            continue
        set_lr(optimizer, lr_at(state.global_step, schedule.total, cfg))
        images = normalise(batch.images.to(dist.device, non_blocking=True), mean, std)
        with autocast(dist.device, dtype):
            logits = model(images, packed=batch.packed.to(dist.device, non_blocking=True))  # planned in the workers
            loss = F.cross_entropy(logits.float(), batch.labels.to(dist.device), label_smoothing=cfg.label_smoothing)
        loss_value = loss.item()  # a host sync per step: a non-finite loss must stop the run before its update
        if all_reduce_sum([float(not math.isfinite(loss_value))], dist)[0] > 0:  # every rank stops, before the step
            raise run.diverged(state.global_step + 1, f"the loss is {loss_value}", cfg)
        _update(apt, loss, optimizer, cfg)
        state.global_step += 1
        window.add(loss_value, batch)
        step = state.global_step
        if step % cfg.log_every == 0 or state.batches_in_epoch == schedule.batches_per_epoch or step == schedule.stop:
            metrics = window.record(state, optimizer, dist)
            run.log_metrics(metrics)
            kept = f"{metrics['tokens_kept']:.0%}"
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", img_s=f"{metrics['images_per_s']:.1f}", kept=kept)
            window = _Window()
        if step >= schedule.stop or (cfg.save_every and step % cfg.save_every == 0):
            state.save(run, apt, optimizer, cfg, dist)
        if step >= schedule.stop:
            break
    bar.close()
    return metrics


def evaluate_epoch(apt, data: TrainData, state: TrainState, cfg: TrainConfig, run: Run, dist: Dist) -> dict:
    """Evaluate on the val split (as ``aptvit eval`` would on the checkpoint) and log the result as a metrics line."""
    mean, std = apt.pixel_mean_std()
    dtype = resolve_dtype(cfg.dtype, dist.device)
    result = evaluate(apt, data.val, cfg.batch_size, cfg.workers, dist, mean, std, cfg.skip_bad_images, dtype=dtype)
    result = {"kind": "eval", "epoch": state.epoch, "step": state.global_step, **result}
    run.log_metrics(result)
    if dist.main:
        logger.info(
            f"epoch {state.epoch}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%, "
            f"tokens kept {result['tokens_kept']:.1%}, {result['images_per_s']:.1f} img/s"
        )
    return result


def start_or_restore(run: Run, optimizer, cfg: TrainConfig, continues: bool, resume: bool, dist: Dist) -> TrainState:
    """The state to go on from: the run's last checkpoint when it ``continues``, the start otherwise; then the run
    folder is made ready (``Run.start``)."""
    state = TrainState()
    if continues:
        state = TrainState.restore(run, optimizer, dist)
        if dist.main:
            logger.info(f"resumed {run.folder} at epoch {state.epoch}, step {state.global_step}")
    elif resume and dist.main:
        logger.info(f"{run.folder} has no checkpoint yet: starting the run from the beginning")
    run.start(cfg, fresh=not continues)
    return state


def finetune(
    cfg: TrainConfig,
    resume: bool = False,
    layout_fn: Optional[Callable] = None,
    overrides: Optional[Dict] = None,
) -> dict:
    """Fine-tune an APT conversion of ``cfg.model`` on ``cfg.data``; returns the last metrics.

    Everything is checked (settings, data, model, budget against the size, a writable ``cfg.out``) before
    anything is written; a failure before the first checkpoint leaves a folder that starts again. Progress
    goes to the ``aptvit.train`` logger (INFO, rank 0 only).

    Args:
        resume: continue the run in ``cfg.out`` from its last checkpoint (or from its start when it has
            none); its config.json wins. The ``RUN_CONTROL`` fields of ``overrides`` (all of ``cfg`` when
            None) may change; a different value of any other field is refused by name.
        layout_fn: ``layout_fn(crop (1, 3, S, S) uint8) -> PatchLayout``, run in the workers; default
            ``patch_layout`` with the model's settings (the conversion experiment passes a random one).

    Raises:
        DivergedError: the loss or the weights stopped being finite (the last good checkpoint stays).
    """
    _validate(cfg)
    cfg, continues = resolve_config(cfg, resume, overrides)
    _validate(cfg)
    dist = setup_distributed(cfg.device)
    if dist.main:
        check_writable(Path(cfg.out), folder=True)
    folders = find_images(cfg)
    apt = build_model(cfg, continues, dist)
    data = load_data(cfg, folders, apt, layout_fn, dist)
    model, optimizer, run = distribute(apt, dist), make_optimizer(apt, cfg), Run(Path(cfg.out), dist.main)
    torch.manual_seed(cfg.seed + 1000 * dist.rank)  # drop-path / dropout draws differ between ranks
    state = start_or_restore(run, optimizer, cfg, continues, resume, dist)
    schedule = Schedule.of(cfg, data.batches_per_epoch)
    if dist.main:
        logger.info(_summary(apt, data, cfg, dist))
    set_deterministic(cfg.deterministic)
    metrics: dict = {}
    if continues and cfg.eval and state.at_epoch_end and not run.has_eval(state.global_step):
        metrics = evaluate_epoch(apt, data, state, cfg, run, dist)  # that epoch's evaluation failed or was killed
    while state.epoch < cfg.epochs and state.global_step < schedule.stop:
        loader = epoch_loader(data, apt, state, cfg)
        metrics = train_one_epoch(model, apt, loader, optimizer, state, cfg, schedule, run, dist) or metrics
        if state.batches_in_epoch >= schedule.batches_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            state.save(run, apt, optimizer, cfg, dist)
            if cfg.eval:
                metrics = evaluate_epoch(apt, data, state, cfg, run, dist)
    _finish(apt, state, run, dist)
    return metrics


def _summary(apt, data: TrainData, cfg: TrainConfig, dist: Dist) -> str:
    return (
        f"{apt.pretrained_cfg.get('architecture', cfg.model)}: {len(data.train)} train / {len(data.val)} val images, "
        f"{len(cfg.classes)} classes, {dist.world} process(es) on {dist.device.type}, "
        f"{data.batches_per_epoch} steps per epoch"
    )


def _finish(apt, state: TrainState, run: Run, dist: Dist) -> None:
    """Check that the ranks agree, and say what was skipped and where the run is."""
    if dist.world > 1:
        _check_in_sync(apt, dist)
    if not dist.main:
        return
    if state.bad_images:
        logger.info(f"skipped {state.bad_images} unreadable image(s)")
    logger.info(f"run directory: {run.folder}")


def _check_in_sync(apt, dist: Dist) -> None:
    """All ranks must hold the same weights after DDP steps; say so (or fail loudly)."""
    total = torch.stack([p.detach().double().sum() for p in apt.parameters()]).sum().reshape(1).to(dist.device)
    gathered = [torch.zeros_like(total) for _ in range(dist.world)]
    torch.distributed.all_gather(gathered, total)
    values = [float(g) for g in gathered]
    if max(values) != min(values):
        raise RuntimeError(f"ranks diverged: parameter sums {values}")
    if dist.main:
        logger.info(f"weights identical across {dist.world} ranks (parameter sum {values[0]:.6f})")
