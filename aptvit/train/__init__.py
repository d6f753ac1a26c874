"""``aptvit finetune``: convert a fine-tuned timm ViT and fine-tune it.

Recipe defaults from the paper: AdamW (wd 0.05), cosine schedule with warm-up stepped per optimizer
step, label smoothing 0.1, drop path 0.1, RandAugment m9 (timm's create_transform), gradient
clipping; bf16 autocast on CUDA, fp32 on CPU. One process or many through torchrun (DDP: nccl on
CUDA, gloo on CPU); only rank 0 writes and logs. Every file is written atomically; ``--resume`` continues
mid-epoch exactly where the last checkpoint stopped.

Where things are:
    loop.py    ``finetune`` (read it first: the run from top to bottom), ``train_one_epoch``, ``evaluate_epoch``.
    config.py  ``TrainConfig``: every setting declared once, with its help, bounds and whether ``--resume`` may
               change it (field metadata); ``validate`` and ``resolve_config`` (new run or resume) read them.
    run.py     ``Run`` (the run folder: config.json, metrics.jsonl) and ``TrainState`` (the checkpoint pair).
    data.py    ``find_images``, ``load_data``, ``epoch_loader``.
    model.py   ``build_model``, ``distribute``, ``make_optimizer`` / ``param_groups``, the lr schedule ``lr_at``.
Progress goes to the ``aptvit.train`` logger at INFO (the CLI prints it).
"""

from .config import (
    CHECKPOINT_FILES,
    FIELDS,
    LAYOUT_FIELDS,
    RUN_CONTROL,
    RUN_FILES,
    Bounds,
    TrainConfig,
    option_name,
    read_run_config,
    resolve_config,
    validate,
)
from .data import TrainData, epoch_loader, find_images, load_data
from .loop import Schedule, evaluate_epoch, finetune, start_or_restore, train_one_epoch
from .model import build_model, distribute, lr_at, make_optimizer, param_groups, set_lr
from .run import DivergedError, Run, TrainState

__all__ = [
    "CHECKPOINT_FILES",
    "FIELDS",
    "LAYOUT_FIELDS",
    "RUN_CONTROL",
    "RUN_FILES",
    "Bounds",
    "DivergedError",
    "Run",
    "Schedule",
    "TrainConfig",
    "TrainData",
    "TrainState",
    "build_model",
    "distribute",
    "epoch_loader",
    "evaluate_epoch",
    "find_images",
    "finetune",
    "load_data",
    "lr_at",
    "make_optimizer",
    "option_name",
    "param_groups",
    "read_run_config",
    "resolve_config",
    "set_lr",
    "start_or_restore",
    "train_one_epoch",
    "validate",
]
