"""``aptvit finetune``: convert a fine-tuned timm ViT and fine-tune it (APT_NOTES section 7).

Recipe defaults from the paper: AdamW (wd 0.05), cosine schedule with warm-up stepped per optimizer
step, label smoothing 0.1, drop path 0.1, RandAugment m9 (timm's create_transform), gradient
clipping; bf16 autocast on CUDA, fp32 on CPU. One process or many through torchrun (DDP: nccl on
CUDA, gloo on CPU); only rank 0 writes. Every file is written atomically; ``--resume`` continues
mid-epoch exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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
from .models import build_models
from .nn.attention import backend_choices
from .nn.checkpoint import TIMM_ARGS, read_metadata, saver
from .runtime import DEVICES, autocast, resolve_dtype, set_deterministic

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
    patch_sizes: Optional[List[int]] = None
    thresholds: Optional[Dict[int, float]] = None
    budget: Optional[float] = None
    scorer: Optional[str] = None  # None: entropy, or the checkpoint's own
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
        d = asdict(self)
        if self.thresholds is not None:
            d["thresholds"] = {str(k): v for k, v in self.thresholds.items()}
        return json.dumps(d, indent=2)

    @staticmethod
    def from_json(text: str) -> "TrainConfig":
        d = json.loads(text)
        if d.get("thresholds") is not None:
            d["thresholds"] = {int(k): float(v) for k, v in d["thresholds"].items()}
        return TrainConfig(**d)


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
    return "--no-eval" if key == "eval" else f"--{key.replace('_', '-')}"


def _json_safe(value):
    """``value`` with non-finite floats as None: metrics.jsonl stays JSON (no bare NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class Run:
    """The files of one run directory, all written atomically (rank 0 only); ``checkpoint`` and ``restore`` are a pair."""

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

    def checkpoint(
        self, apt, optimizer, cfg: TrainConfig, epoch: int, batches_in_epoch: int, global_step: int, dist: Dist
    ) -> None:
        """Weights (+ settings, classes, step) and the training state; every rank's RNG is kept.

        Raises:
            DivergedError when the weights are no longer finite: the last good checkpoint stays.
        """
        if not all(bool(torch.isfinite(p).all()) for p in apt.parameters()):  # the same weights on every rank
            raise self.diverged(global_step, "the weights hold nan or inf", cfg)
        rng = all_gather_objects(_rng_state(), dist)  # collective: every rank calls it
        self.saved_step = global_step
        if not self.main:
            return
        model = saver(
            apt,
            model_args=cfg.model_args,
            extra_metadata={
                "classes": json.dumps(cfg.classes),
                "global_step": str(global_step),
                "input_size": str(cfg.size),
            },
        )
        state = {
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "batches_in_epoch": batches_in_epoch,
            "global_step": global_step,
            "rng": rng,
        }
        # both written first, then renamed back to back: the pair stays consistent
        atomic_write_many(
            [
                (self.folder / "model.safetensors", model),
                (self.folder / "train_state.pt", lambda tmp: torch.save(state, tmp)),
            ]
        )

    def restore(self, optimizer, dist: Dist) -> Tuple[int, int, int]:
        """What ``checkpoint`` saved: optimizer, RNGs, metrics; returns (epoch, batches_in_epoch, global_step)."""
        out = self.folder
        hint = "the checkpoint is damaged; delete model.safetensors and train_state.pt to start the run again"
        with reading(out / "train_state.pt", "training state", hint):
            state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
            epoch, batches_in_epoch, global_step, rng = (
                state[k] for k in ("epoch", "batches_in_epoch", "global_step", "rng")
            )
        saved_step = read_metadata(out / "model.safetensors").get("global_step")
        if saved_step != str(global_step):
            raise InputError(
                f"{out}: model.safetensors (step {saved_step}) and train_state.pt (step {global_step}) "
                "are from different steps (a crash between the two writes?); resume is not possible"
            )
        with reading(out / "train_state.pt", "training state", hint):
            optimizer.load_state_dict(state["optimizer"])
        if len(rng) != dist.world:
            raise InputError(f"{out} was saved by {len(rng)} process(es); resume it with as many, not {dist.world}")
        _set_rng_state(rng[dist.rank])
        self.read_metrics(global_step)  # drop what the resume redoes
        self.saved_step = global_step
        return epoch, batches_in_epoch, global_step

    def diverged(self, step: int, what: str, cfg: TrainConfig) -> DivergedError:
        kept = (
            f"the last good checkpoint (step {self.saved_step}) stays in {self.folder}"
            if self.saved_step is not None
            else f"no checkpoint was written; {self.folder} can start again"
        )
        return DivergedError(f"step {step}: {what}: the run diverged (lower --lr, now {cfg.lr:g}); {kept}")


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


def _same_setting(key: str, given, saved) -> bool:
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
    changes = overrides if overrides is not None else asdict(cfg)
    refused = [
        f"{_option(k)} {v!r} (the run's: {getattr(saved, k)!r})"
        for k, v in changes.items()
        if k not in RUN_CONTROL and k not in ("out", "classes") and not _same_setting(k, v, getattr(saved, k))
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


def finetune(
    cfg: TrainConfig,
    resume: bool = False,
    layout_fn: Optional[Callable] = None,
    log: Callable = print,
    overrides: Optional[Dict] = None,
) -> dict:
    """Fine-tune an APT conversion of ``cfg.model`` on ``cfg.data``; returns the last metrics.

    Everything is checked (settings, data, model, budget against the size, a writable ``cfg.out``) before
    anything is written; a failure before the first checkpoint leaves a folder that starts again.

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
    out = Path(cfg.out)
    dist = setup_distributed(cfg.device)
    log_main = log if dist.main else (lambda *a, **k: None)
    if dist.main:
        check_writable(out, folder=True)

    train_dir, val_dir = (check_image_folder(cfg.data, split, required=True) for split in ("train", "val"))
    train_set, val_set = image_folder(train_dir), image_folder(val_dir)
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise InputError(f"train and val classes differ: only in train {only_train[:5]}, only in val {only_val[:5]}")
    if cfg.classes and cfg.classes != train_set.classes:
        raise InputError("the data's classes differ from the run's (config.json); resume with the same data")
    cfg.classes = list(train_set.classes)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    settings = {
        "thresholds": cfg.thresholds,
        "budget": cfg.budget,
        "scorer": cfg.scorer,
        "patch_sizes": tuple(cfg.patch_sizes) if cfg.patch_sizes else None,
    }
    if continues:  # the run's own last weights; the original source (file or hub) is not needed any more
        apt, _ = build_models(
            None,
            checkpoint=out / "model.safetensors",
            num_classes=len(cfg.classes),
            timm_kwargs={"drop_path_rate": cfg.drop_path},
            log=lambda *a, **k: None,
            attention=cfg.attention,
        )
    else:
        apt, _ = build_models(
            cfg.model,
            cfg.pretrained,
            cfg.checkpoint,
            len(cfg.classes),
            layout=settings,
            timm_kwargs={"drop_path_rate": cfg.drop_path, **cfg.model_args},
            log=log_main,
            attention=cfg.attention,
        )
    apt.to(dist.device)
    if cfg.size % apt.patch_size:
        raise InputError(f"size {cfg.size} is not a multiple of the patch size {apt.patch_size}")
    mean, std = apt.pixel_mean_std()
    layout_fn = layout_fn or functools.partial(patch_layout, **apt.config.layout_kwargs())
    _check_layout(layout_fn, cfg.size)
    train_data = LayoutDataset(
        train_set.samples, build_transform(cfg.size, True, mean, std, augment=cfg.augment), layout_fn, cfg.seed
    )
    # the model's own eval crop, as `aptvit eval` uses it on the saved checkpoint
    val_data = LayoutDataset(
        val_set.samples,
        build_transform(cfg.size, False, mean, std, apt.pretrained_cfg.get("crop_pct")),
        layout_fn,
        cfg.seed,
    )
    sampler = ShardedSampler(len(train_data), dist.rank, dist.world, shuffle=True, seed=cfg.seed)
    batches_per_epoch = len(sampler) // cfg.batch_size
    if batches_per_epoch == 0:
        raise InputError(f"batch_size {cfg.batch_size} is larger than the {len(sampler)} training images per process")
    total = batches_per_epoch * cfg.epochs  # the schedule's length; max_steps only stops early

    from timm.optim import create_optimizer_v2

    model = apt
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            apt, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    optimizer = create_optimizer_v2(param_groups(apt, cfg), "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(out, dist.main)
    torch.manual_seed(cfg.seed + 1000 * dist.rank)  # drop-path / dropout draws differ between ranks
    epoch, batches_in_epoch, global_step = 0, 0, 0
    if continues:
        epoch, batches_in_epoch, global_step = run.restore(optimizer, dist)
        log_main(f"resumed {out} at epoch {epoch}, step {global_step}")
    elif resume:
        log_main(f"{out} has no checkpoint yet: starting the run from the beginning")
    run.start(cfg, fresh=not continues)
    log_main(
        f"{apt.pretrained_cfg.get('architecture', cfg.model)}: {len(train_data)} train / {len(val_data)} val images, "
        f"{len(cfg.classes)} classes, {dist.world} process(es) on {dist.device.type}, {batches_per_epoch} steps per epoch"
    )

    set_deterministic(cfg.deterministic)
    dtype = resolve_dtype(cfg.dtype, dist.device)
    bad_images = 0
    metrics: dict = {}
    stop = cfg.max_steps if cfg.max_steps is not None else total
    from tqdm import tqdm

    def evaluate_epoch() -> dict:
        result = {
            "kind": "eval",
            "epoch": epoch,
            "step": global_step,
            **evaluate(apt, val_data, cfg.batch_size, cfg.workers, dist, mean, std, cfg.skip_bad_images, dtype=dtype),
        }
        run.log_metrics(result)
        log_main(
            f"epoch {epoch}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%, "
            f"tokens kept {result['tokens_kept']:.1%}, {result['images_per_s']:.1f} img/s"
        )
        return result

    if continues and cfg.eval and epoch > 0 and batches_in_epoch == 0 and not run.has_eval(global_step):
        metrics = evaluate_epoch()  # the evaluation of that epoch's end failed or was killed: redo it

    while epoch < cfg.epochs and global_step < stop:
        model.train()
        sampler.set_epoch(epoch, skip=batches_in_epoch * cfg.batch_size)
        train_data.set_epoch(epoch)
        loader = make_loader(train_data, sampler, cfg.batch_size, cfg.workers, drop_last=True, plan=apt.planner())
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            initial=batches_in_epoch,
            total=batches_per_epoch,
            disable=None if dist.main else True,
            leave=False,
        )
        window = {"loss": 0.0, "images": 0, "tokens": 0, "base": 0, "start": time.perf_counter(), "steps": 0}
        for batch in bar:
            batches_in_epoch += 1  # consumed, whether or not it becomes a step (resume skips by batches)
            if batch.bad:
                if not cfg.skip_bad_images:
                    raise InputError(
                        f"cannot read image {batch.bad[0]}; pass --skip-bad-images to skip unreadable files"
                    )
                bad_images += len(batch.bad)
            # every rank must take the step or none (DDP's collectives): skip when any rank has nothing
            if all_reduce_sum([float(batch.images.shape[0] == 0)], dist)[0] > 0:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step, total, cfg) * group.get("lr_scale", 1.0)
            images = normalise(batch.images.to(dist.device, non_blocking=True), mean, std)
            labels = batch.labels.to(dist.device)
            with autocast(dist.device, dtype):
                logits = model(images, packed=batch.packed.to(dist.device, non_blocking=True))  # planned in the workers
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            loss_value = loss.item()
            if all_reduce_sum([float(not math.isfinite(loss_value))], dist)[0] > 0:  # every rank stops, before the step
                raise run.diverged(global_step + 1, f"the loss is {loss_value}", cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(apt.parameters(), cfg.clip_grad)
            optimizer.step()
            global_step += 1
            window["loss"] += loss_value
            window["steps"] += 1
            window["images"] += images.shape[0]
            window["tokens"] += batch.layout.total_tokens
            window["base"] += int(batch.layout.num_base_tokens.sum())
            if global_step % cfg.log_every == 0 or batches_in_epoch == batches_per_epoch or global_step == stop:
                loss_sum, steps, imgs, tokens, base = all_reduce_sum(
                    [window["loss"], window["steps"], window["images"], window["tokens"], window["base"]], dist
                )
                seconds = time.perf_counter() - window["start"]
                metrics = {
                    "kind": "train",
                    "epoch": epoch,
                    "step": global_step,
                    "loss": loss_sum / max(1, steps),
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": imgs / seconds,
                    "tokens_kept": tokens / max(1, base),
                    "bad_images": bad_images,
                }
                run.log_metrics(metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    img_s=f"{metrics['images_per_s']:.1f}",
                    kept=f"{metrics['tokens_kept']:.0%}",
                )
                window.update(loss=0.0, images=0, tokens=0, base=0, start=time.perf_counter(), steps=0)
            if global_step >= stop or (cfg.save_every and global_step % cfg.save_every == 0):
                run.checkpoint(apt, optimizer, cfg, epoch, batches_in_epoch, global_step, dist)
            if global_step >= stop:
                break
        bar.close()
        if batches_in_epoch >= batches_per_epoch:
            epoch, batches_in_epoch = epoch + 1, 0
            run.checkpoint(apt, optimizer, cfg, epoch, batches_in_epoch, global_step, dist)
            if cfg.eval:
                metrics = evaluate_epoch()
    if dist.world > 1:
        _check_in_sync(apt, dist, log_main)
    if bad_images:
        log_main(f"skipped {bad_images} unreadable image(s)")
    log_main(f"run directory: {out}")
    return metrics


def _check_in_sync(apt, dist: Dist, log: Callable) -> None:
    """All ranks must hold the same weights after DDP steps; say so (or fail loudly)."""
    total = torch.stack([p.detach().double().sum() for p in apt.parameters()]).sum().reshape(1).to(dist.device)
    gathered = [torch.zeros_like(total) for _ in range(dist.world)]
    torch.distributed.all_gather(gathered, total)
    values = [float(g) for g in gathered]
    if max(values) != min(values):
        raise RuntimeError(f"ranks diverged: parameter sums {values}")
    log(f"weights identical across {dist.world} ranks (parameter sum {values[0]:.6f})")
