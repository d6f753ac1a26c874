"""``aptvit finetune``: convert a fine-tuned timm ViT and fine-tune it (APT_NOTES section 7).

Recipe defaults from the paper: AdamW (wd 0.05), cosine schedule with warm-up stepped per optimizer
step, label smoothing 0.1, drop path 0.1, RandAugment m9 (timm's create_transform), gradient
clipping; bf16 autocast on CUDA, fp32 on CPU. One process or many through torchrun (DDP: nccl on
CUDA, gloo on CPU); only rank 0 writes. Every file is written atomically; ``--resume`` continues
mid-epoch exactly where the last checkpoint stopped.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .core.io import atomic_write
from .core.quadtree import patch_layout
from .data import LayoutDataset, ShardedSampler, build_transform, check_image_folder, collate, image_folder, make_loader
from .evaluate import evaluate, normalise_batch
from .nn.convert import convert, load_timm_weights, read_metadata, read_state_dict, save
from .nn.convert import load as load_apt


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
    scorer: str = "entropy"
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
    workers: int = 4
    seed: int = 0
    skip_bad_images: bool = False
    max_steps: Optional[int] = None  # stop (and save) after this many optimizer steps; the schedule is unchanged
    save_every: int = 0  # also checkpoint every N steps (0: at the end of each epoch only)
    log_every: int = 10
    eval: bool = True
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


@dataclass
class Dist:
    """Where this process stands in a torchrun job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun job if there is one (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Dist(rank, world, device)


def all_reduce_sum(values: List[float], dist: Dist) -> List[float]:
    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def build_model(cfg: TrainConfig, num_classes: int, log: Callable = print):
    """The timm model with the run's weights, converted; returns (apt, timm model)."""
    import timm

    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes,
                                  drop_path_rate=cfg.drop_path, dynamic_img_size=True, **cfg.model_args)
    except Exception as e:
        if not cfg.pretrained:
            raise
        raise RuntimeError(f"could not load pretrained weights for {cfg.model} ({type(e).__name__}: {e}); use --checkpoint PATH") from None
    layout = {"thresholds": cfg.thresholds} if cfg.thresholds else {"budget": cfg.budget} if cfg.budget else {}
    kwargs = dict(layout, scorer=cfg.scorer, patch_sizes=cfg.patch_sizes)
    if cfg.checkpoint:
        if read_metadata(cfg.checkpoint).get("format") == "aptvit":
            apt = load_apt(cfg.checkpoint, model=model)
            if layout:  # this run's layout settings replace the checkpoint's
                apt.config.thresholds, apt.config.budget = layout.get("thresholds"), layout.get("budget")
            return apt, model
        state = read_state_dict(cfg.checkpoint)
        head = [k for k in ("head.weight", "head.bias") if k in state and state[k].shape != model.state_dict()[k].shape]
        if head:  # fine-tuning onto another label set: keep the body, start a fresh head
            log(f"checkpoint head has {state['head.weight'].shape[0]} classes, the data {num_classes}: head re-initialised")
            state = {k: v for k, v in state.items() if k not in head}
            state.update({k: v for k, v in model.state_dict().items() if k in head})
        load_timm_weights(model, state)
    return convert(model, **kwargs), model


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine to ``min_lr``, per optimizer step."""
    warm = max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


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


class Run:
    """The files of one run directory, all written atomically (rank 0 only)."""

    def __init__(self, folder: Path, main: bool):
        self.folder, self.main = Path(folder), main
        self.metrics: List[str] = []

    def log_metrics(self, record: dict) -> None:
        if not self.main:
            return
        self.metrics.append(json.dumps(record))
        text = "\n".join(self.metrics) + "\n"
        atomic_write(self.folder / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))

    def checkpoint(self, apt, optimizer, cfg: TrainConfig, epoch: int, step_in_epoch: int, global_step: int) -> None:
        if not self.main:
            return
        save(apt, self.folder / "model.safetensors", extra_metadata={"classes": json.dumps(cfg.classes), "global_step": str(global_step), "input_size": str(cfg.size)})
        state = {"optimizer": optimizer.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                 "global_step": global_step, "rng": _rng_state()}
        atomic_write(self.folder / "train_state.pt", lambda tmp: torch.save(state, tmp))


def finetune(cfg: TrainConfig, resume: bool = False, layout_fn: Optional[Callable] = None, log: Callable = print) -> dict:
    """Fine-tune an APT conversion of ``cfg.model`` on ``cfg.data``; returns the last metrics.

    Args:
        layout_fn: ``layout_fn(crop (1, 3, S, S) uint8) -> PatchLayout``, run in the workers; default
            ``patch_layout`` with the run's settings (the conversion experiment passes a random one).
    """
    dist = setup_distributed()
    out = Path(cfg.out)
    if resume:
        if not (out / "train_state.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {str(out)!r} (train_state.pt missing)")
        saved = TrainConfig.from_json((out / "config.json").read_text())
        saved.max_steps, saved.workers = cfg.max_steps, cfg.workers
        cfg = saved
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"run directory {str(out)!r} exists and is not empty; pass --resume to continue it or choose another --out")
    log_main = log if dist.main else (lambda *a, **k: None)

    train_dir, val_dir = check_image_folder(cfg.data, "train"), check_image_folder(cfg.data, "val")
    train_set, val_set = image_folder(train_dir), image_folder(val_dir)
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise ValueError(f"train and val classes differ: only in train {only_train[:5]}, only in val {only_val[:5]}")
    if cfg.classes and cfg.classes != train_set.classes:
        raise ValueError("the data's classes differ from the run's (config.json); resume with the same data")
    cfg.classes = list(train_set.classes)

    torch.manual_seed(cfg.seed)
    apt, _ = build_model(cfg, len(cfg.classes), log_main)
    apt.to(dist.device)
    p = apt.patch_size
    if cfg.size % p:
        raise ValueError(f"--size {cfg.size} is not a multiple of the patch size {p}")
    mean, std = apt.pixel_mean_std()
    layout_kwargs = dict(patch_sizes=apt.patch_sizes, thresholds=apt.config.thresholds, budget=apt.config.budget,
                         scorer=apt.config.scorer, bins=apt.config.bins)
    layout_fn = layout_fn or functools.partial(patch_layout, **layout_kwargs)
    train_data = LayoutDataset(train_set.samples, build_transform(cfg.size, True, mean, std, augment=cfg.augment), layout_fn, cfg.seed)
    val_data = LayoutDataset(val_set.samples, build_transform(cfg.size, False, mean, std), layout_fn, cfg.seed)
    sampler = ShardedSampler(len(train_data), dist.rank, dist.world, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(sampler)} training images per process")
    total = steps_per_epoch * cfg.epochs  # the schedule's length; --max-steps only stops early

    from timm.optim import create_optimizer_v2

    model = apt
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(apt, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    optimizer = create_optimizer_v2(apt, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(out, dist.main)
    epoch, step_in_epoch, global_step = 0, 0, 0
    if resume:
        state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
        apt.load_state_dict(read_state_dict(out / "model.safetensors"), strict=True)
        optimizer.load_state_dict(state["optimizer"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        _set_rng_state(state["rng"])
        run.metrics = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
        log_main(f"resumed {out} at epoch {epoch}, step {global_step}")
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(cfg.to_json()))
    log_main(f"{cfg.model}: {len(train_data)} train / {len(val_data)} val images, {len(cfg.classes)} classes, "
             f"{dist.world} process(es) on {dist.device.type}, {steps_per_epoch} steps per epoch")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda" else torch.autocast("cpu", enabled=False)
    bad_images = 0
    metrics: dict = {}
    stop = cfg.max_steps if cfg.max_steps is not None else total
    from tqdm import tqdm

    while epoch < cfg.epochs and global_step < stop:
        model.train()
        sampler.set_epoch(epoch, skip=step_in_epoch * cfg.batch_size)
        train_data.set_epoch(epoch)
        loader = make_loader(train_data, sampler, cfg.batch_size, cfg.workers, drop_last=True)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=step_in_epoch, total=steps_per_epoch,
                   disable=None if dist.main else True, leave=False)
        window = {"loss": 0.0, "images": 0, "tokens": 0, "base": 0, "start": time.perf_counter(), "steps": 0}
        for batch in bar:
            if batch.bad:
                if not cfg.skip_bad_images:
                    raise ValueError(f"cannot read image {batch.bad[0]}; pass --skip-bad-images to skip unreadable files")
                bad_images += len(batch.bad)
            if batch.images.shape[0] == 0:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step, total, cfg)
            images = normalise_batch(batch.images.to(dist.device, non_blocking=True), mean, std)
            labels = batch.labels.to(dist.device)
            with autocast:
                logits = model(images, layout=batch.layout.to(dist.device))
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(apt.parameters(), cfg.clip_grad)
            optimizer.step()
            global_step += 1
            step_in_epoch += 1
            window["loss"] += loss.item()
            window["steps"] += 1
            window["images"] += images.shape[0]
            window["tokens"] += batch.layout.total_tokens
            window["base"] += int(batch.layout.num_base_tokens.sum())
            if global_step % cfg.log_every == 0 or step_in_epoch == steps_per_epoch or global_step == stop:
                loss_sum, imgs = all_reduce_sum([window["loss"], window["images"]], dist)
                seconds = time.perf_counter() - window["start"]
                metrics = {"kind": "train", "epoch": epoch, "step": global_step, "loss": loss_sum / (window["steps"] * dist.world),
                           "lr": optimizer.param_groups[0]["lr"], "images_per_s": imgs / seconds,
                           "tokens_kept": window["tokens"] / max(1, window["base"]), "bad_images": bad_images}
                run.log_metrics(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", img_s=f"{metrics['images_per_s']:.1f}", kept=f"{metrics['tokens_kept']:.0%}")
                window.update(loss=0.0, images=0, tokens=0, base=0, start=time.perf_counter(), steps=0)
            if global_step >= stop or (cfg.save_every and global_step % cfg.save_every == 0):
                run.checkpoint(apt, optimizer, cfg, epoch, step_in_epoch, global_step)
            if global_step >= stop:
                break
        bar.close()
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
            run.checkpoint(apt, optimizer, cfg, epoch, step_in_epoch, global_step)
            if cfg.eval:
                metrics = {"kind": "eval", "epoch": epoch, "step": global_step,
                           **evaluate(apt, val_data, cfg.batch_size, cfg.workers, dist, mean, std, cfg.skip_bad_images)}
                run.log_metrics(metrics)
                log_main(f"epoch {epoch}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, "
                         f"tokens kept {metrics['tokens_kept']:.1%}, {metrics['images_per_s']:.1f} img/s")
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
