"""The settings of a run, declared once: ``TrainConfig``, each field with its help, bounds and whether ``--resume``
may change it; their checks (``validate``) and the resume comparison (``resolve_config``).

A field's metadata (``setting``) holds:
    help: what the command line says of it (without the default, which is the field's own).
    bounds: a ``Bounds`` (a number setting's allowed values), checked by ``validate``; None: no numeric bound.
    resume_may_change: whether a resumed run may take a new value (run control); any other change is refused.
    cli: whether ``aptvit finetune`` has an option for it (False: the Python API and config.json only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..core.io import InputError, check_side, reading, user_os_error
from ..data import build_transform
from ..models import conversion_settings
from ..nn.attention import backend_choices
from ..nn.checkpoint import TIMM_ARGS
from ..nn.config import APTConfig
from ..runtime import DEVICES, resolve_dtype


@dataclass(frozen=True)
class Bounds:
    """The values a number setting may take: ``low`` / ``high`` (None: unbounded), inclusive unless ``*_open``.

    ``integer``: an int (not a bool); otherwise any finite int or float. A field whose default is None also
    takes None (not given).
    """

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an int" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            return (
                f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            )
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return kind

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def setting(
    default=dataclasses.MISSING,
    help: str = "",
    *,
    bounds: Optional[Bounds] = None,
    resume=False,
    cli=True,
    factory=dataclasses.MISSING,
):
    """A ``TrainConfig`` field with its declaration (see the module docstring)."""
    metadata = {"help": help, "bounds": bounds, "resume_may_change": resume, "cli": cli}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


INT_1 = Bounds(1, integer=True)
INT_0 = Bounds(0, integer=True)
FINITE = Bounds()
POSITIVE = Bounds(0, low_open=True)
FRACTION = Bounds(0, 1, high_open=True)


# The learning rates a run gets when none is given, by kind (``distill`` False / True). With labels: lr 5e-5 and the
# new layers at x1, chosen under layer decay 0.75 on 200 holdout train photos of Imagenette (a fine-tuned DINOv2
# ViT-S/14, one epoch of 450 photos): x1 / x3 / x10 gave 88.5 / 87.5 / 87.5 at budget 0.5, 89.5 / 88.5 / 89.0 at
# 0.35 and 90.0 / 90.0 / 89.0 at the default thresholds, and x10 was unstable on the larger val run
# (docs/results/imagenette_recipe.md); x10 had been chosen on Fashion-MNIST with tiny models trained here, without
# layer decay (benchmarks/real_conversion.py).
# Label-free distillation from a real pretrained ViT: lr 5e-6 and the new layers at x100 (5e-4), chosen on the
# validation photos of benchmarks/real_fidelity.py (DINOv2 ViT-S/14, 224 px, 150 steps of 8 crops, 50% of the
# tokens) among 2e-6 / 5e-6 / 1e-5 and x10 / x100 / x300: dense / class cosine 0.923 / 0.972, against 0.912 / 0.966
# at 2e-6 x10 and 0.900 / 0.959 at 1e-5 x100; at 2e-5 x10 the run drifted away from the teacher, so the labelled
# default would too.
KIND_DEFAULTS = {
    False: {"lr": 5e-5, "new_layer_lr_scale": 1.0},
    True: {"lr": 5e-6, "new_layer_lr_scale": 100.0},
}


def _by_kind(name: str) -> str:
    return f"default {KIND_DEFAULTS[False][name]:g}; with --distill {KIND_DEFAULTS[True][name]:g}"


@dataclass
class TrainConfig:
    """Everything a run needs; saved as RUN_DIR/config.json."""

    model: str = setting(help="timm model name (an aptvit --checkpoint brings its own)")
    data: str = setting(help="folder with train/ and val/, one sub-folder per class")
    out: str = setting(help="run directory (must not exist unless --resume)")
    pretrained: bool = setting(False, "timm's pretrained weights (needs the model hub)")
    checkpoint: Optional[str] = setting(
        None, "weights to load: .safetensors (timm or aptvit) or .pth (loaded with weights_only=True)"
    )
    epochs: int = setting(1, "", bounds=INT_1, resume=True)
    size: int = setting(384, "input size", bounds=INT_1)
    # the conversion settings (saved with the weights); None: APTConfig's defaults for a timm model, an aptvit
    # checkpoint's own settings; given with an aptvit checkpoint, they replace its settings
    apt: Optional[APTConfig] = setting(None, "the conversion settings (the layout options)", cli=False)
    augment: str = setting("rand-m9-mstd0.5-inc1", "timm auto-augment string, or 'none' (no random crop either)")
    model_args: Dict = setting(help="extra timm.create_model arguments", cli=False, factory=dict)
    batch_size: int = setting(64, "per process", bounds=INT_1)
    # lr and new_layer_lr_scale: None (not given) takes the run's kind's default, ``KIND_DEFAULTS``
    lr: Optional[float] = setting(None, f"peak learning rate ({_by_kind('lr')})", bounds=POSITIVE)
    min_lr: float = setting(1e-6, "the cosine schedule's end", bounds=FINITE, cli=False)
    warmup: float = setting(0.05, "warm-up as a fraction of all optimizer steps", bounds=FRACTION)
    weight_decay: float = setting(0.05, "AdamW's", bounds=FINITE, cli=False)
    label_smoothing: float = setting(0.1, "", bounds=FINITE, cli=False)
    drop_path: float = setting(0.1, "", bounds=FRACTION)
    clip_grad: float = setting(1.0, "gradient norm clipping (0: none)", bounds=FINITE, cli=False)
    # lr multiplier of the new adaptive_embed.* layers (the detail path): its output layer starts at zero and AdamW moves a
    # weight by about lr per step, so at the fine-tuning lr one epoch leaves it near zero
    new_layer_lr_scale: Optional[float] = setting(
        None,
        f"lr multiplier of the new zero-initialised detail-path layers adaptive_embed.* ({_by_kind('new_layer_lr_scale')})",
        bounds=POSITIVE,
    )
    # the blocks near the input learn slowest: one epoch at the fine-tuning lr over every weight otherwise moves the
    # early blocks' features away from what the later blocks and the head were trained on. 0.75 (BEiT / MAE's range
    # is 0.65-0.75) was chosen on held-out train photos of benchmarks/real_imagenette.py (a DINOv2 ViT-S/14 source,
    # 224 px, 18 steps of 16 photos, 200 held-out photos): uniform 88.5% after the epoch (source 88.5%, 74.0%
    # without decay), APT at 50% of the tokens 89.0% (57.5% without), --distill at 50% 88.5% (86.0% without);
    # 0.65 gave 89.5% / 88.0%, within the noise (a paired SE of about 2 points)
    layer_decay: float = setting(
        0.75,
        "layer-wise lr decay: block i of n learns at layer_decay^(n - i) times the lr, the embedding at "
        "layer_decay^(n + 1), the head at 1 (1: one lr for all); the new adaptive_embed.* layers keep their own scale",
        bounds=Bounds(0, 1, low_open=True),
    )
    workers: int = setting(4, "loader processes", bounds=INT_0, resume=True)
    seed: int = setting(0, "")
    skip_bad_images: bool = setting(False, "skip (and count) unreadable images instead of stopping", resume=True)
    # stop (and save) after this many optimizer steps; the schedule is unchanged
    max_steps: Optional[int] = setting(
        None, "stop (and checkpoint) after this many optimizer steps", bounds=INT_1, resume=True
    )
    save_every: int = setting(0, "also checkpoint every N steps (0: at epoch ends)", bounds=INT_0, resume=True)
    log_every: int = setting(10, "", bounds=INT_1, resume=True)
    eval: bool = setting(True, "skip the evaluation on val/ at the end of each epoch (default: evaluate)", resume=True)
    device: str = setting("auto", "where to run (auto: CUDA when available, one GPU per torchrun process)", resume=True)
    dtype: str = setting("auto", "compute precision (auto: bf16 autocast on CUDA, fp32 on the CPU)")
    deterministic: bool = setting(False, "deterministic kernels: bit-exact --resume on CUDA too (slower)", resume=True)
    attention: str = setting("auto", "attention backend (a runtime choice)", resume=True)
    # label-free conversion: match the frozen uniform teacher instead of labels
    distill: bool = setting(
        False,
        "train to match a frozen uniform teacher instead of labels (any images: --data DIR with train/ and val/, "
        "or one folder of them): KL on softened logits where there is a head, 1 - cosine on the pre-logits and "
        "the dense features where there is none",
    )
    teacher: Optional[str] = setting(
        None,
        "with --distill: an aptvit checkpoint, timm weights of --model's architecture, or a timm model name "
        "(default: the source weights, run uniformly)",
    )
    temperature: float = setting(
        2.0, "with --distill: the softening of the logits in the KL (the loss is T^2-scaled)", bounds=POSITIVE
    )
    classes: List[str] = setting(help="the data's classes (found in train/)", cli=False, factory=list)

    def __post_init__(self) -> None:
        for name, value in KIND_DEFAULTS[bool(self.distill)].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["apt"] = self.apt.to_dict() if self.apt is not None else None
        return json.dumps(d, indent=2)

    @staticmethod
    def from_json(text: str) -> "TrainConfig":
        """Settings saved by ``to_json``, or by aptvit 0.1 (the layout settings as four top-level fields)."""
        d = json.loads(text)
        for name, value in BEFORE_FIELD.items():  # a run saved before the field existed trained with this value
            d.setdefault(name, value)
        old = {k: v for k in LAYOUT_FIELDS if k in d and (v := d.pop(k)) is not None}
        if old:  # 0.1: the given fields on top of an aptvit checkpoint's own settings (as its command line did)
            if old.get("thresholds") is not None:
                old["thresholds"] = {int(k): float(v) for k, v in old["thresholds"].items()}
            source = d.get("checkpoint")
            d["apt"] = conversion_settings(source if source and os.path.isfile(source) else None, **old)
        elif d.get("apt") is not None:
            d["apt"] = APTConfig.from_dict(d["apt"])
        return TrainConfig(**d)


# fields a run's config.json may lack (saved before they existed), with the value such a run trained with: a resumed
# run must rebuild the optimizer's parameter groups its checkpoint holds
BEFORE_FIELD = {"layer_decay": 1.0}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# what a resumed run may change (run control); everything else comes from the run's config.json
RUN_CONTROL = tuple(name for name, f in FIELDS.items() if f.metadata["resume_may_change"])
# what the command line sets of an APTConfig (aptvit 0.1 saved the first four at the top of config.json)
LAYOUT_FIELDS = ("patch_sizes", "thresholds", "budget", "scorer", "scorer_args", "area_bias")


def option_name(key: str) -> str:
    """The command line's name of a setting (a TrainConfig field or one of ``LAYOUT_FIELDS``)."""
    if key == "apt":
        return "/".join(option_name(k) for k in LAYOUT_FIELDS)
    return "--no-eval" if key == "eval" else f"--{key.replace('_', '-')}"


def validate(cfg: TrainConfig) -> None:
    """Every setting against its declaration, and the few checks that need more than bounds.

    Raises:
        InputError: naming the first setting that is wrong and what it may be.
    """
    for name, f in FIELDS.items():
        value, bounds = getattr(cfg, name), f.metadata["bounds"]
        if bounds is not None and not (value is None and f.default is None) and not bounds.holds(value):
            raise InputError(f"{name} ({option_name(name)}) must be {bounds.describe()}, got {value!r}")
    check_side(cfg.size, "--size")
    resolve_dtype(cfg.dtype, "cpu")  # a clear error for an unknown name, before any work
    if cfg.device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, got {cfg.device!r}")
    if cfg.attention not in backend_choices():
        raise InputError(f"attention (--attention) must be one of {backend_choices()}, got {cfg.attention!r}")
    unknown = sorted(set(cfg.model_args) - set(TIMM_ARGS))
    if unknown:
        raise InputError(f"model_args {unknown} are not allowed; choose among {', '.join(TIMM_ARGS)}")
    if cfg.teacher is not None and not cfg.distill:
        raise InputError("--teacher names the model to distil from: give it with --distill")
    build_transform(cfg.size, True, (0.5,) * 3, (0.5,) * 3, augment=cfg.augment)  # timm parses the augment string


# ------------------------------------------------------------------------------------------------------------ resume
RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "train_state.pt")
CHECKPOINT_FILES = ("model.safetensors", "train_state.pt")


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
    if key == "teacher":
        return _absolute_teacher(given) == saved
    if key == "patch_sizes":
        return list(given) == list(saved)
    if key == "thresholds":
        return {int(k): float(v) for k, v in given.items()} == {int(k): float(v) for k, v in saved.items()}
    return given == saved


def _absolute_teacher(teacher: Optional[str]) -> Optional[str]:
    """A teacher file's absolute path; a teacher that is no file is a timm model name and stays as it is."""
    return os.path.abspath(teacher) if teacher and os.path.exists(teacher) else teacher


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its file settings absolute: the run resumes from anywhere."""
    paths = {k: os.path.abspath(v) for k in ("data", "checkpoint") if (v := getattr(cfg, k))}
    return dataclasses.replace(cfg, **paths, teacher=_absolute_teacher(cfg.teacher))


def read_run_config(out) -> TrainConfig:
    """The settings of the run in folder ``out`` (its config.json), for ``--resume``.

    Raises:
        InputError: ``out`` holds no config.json, or one that cannot be read.
    """
    config = Path(out) / "config.json"
    if not config.is_file():
        raise InputError(
            f"--resume: {str(out)!r} is not a run directory (no config.json); start the run without --resume"
        )
    with reading(config, "run settings", "fix it, or delete the run directory and start again"):
        return TrainConfig.from_json(config.read_text())


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
            raise user_os_error(
                FileExistsError(),
                f"run directory {str(out)!r} exists and is not empty; pass --resume to continue it or choose another --out",
            )
        return absolute_paths(cfg), False
    saved = read_run_config(out)
    # overrides may name the conversion settings one by one (the command line's options) or as "apt"
    changes = overrides if overrides is not None else {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    refused = [
        f"{option_name(k)} {v!r} (the run's: {_saved_setting(saved, k)!r})"
        for k, v in changes.items()
        if k not in RUN_CONTROL and k not in ("out", "classes") and not _same_setting(k, v, _saved_setting(saved, k))
    ]
    if refused:
        allowed = ", ".join(option_name(k) for k in RUN_CONTROL)
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
