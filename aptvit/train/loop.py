"""The training loop of ``aptvit finetune``, top to bottom: ``finetune`` sets the run up and walks the epochs;
``train_one_epoch`` is one pass of optimizer steps; ``evaluate_epoch`` the val split after each epoch."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..core.distill import distill_loss
from ..core.io import check_writable
from ..distributed import Dist, all_reduce_sum, setup_distributed
from ..evaluate import count, evaluate
from ..images import normalise
from ..runtime import autocast, resolve_dtype, set_deterministic
from ..teacher import Student, Teacher, agreement
from .config import TrainConfig, resolve_config, validate
from .data import TrainData, epoch_loader, find_images, load_data
from .model import build_model, build_teacher, distribute, lr_at, make_optimizer, set_lr
from .run import Run, TrainState

logger = logging.getLogger("aptvit.train")


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
    validate(cfg)
    cfg, continues = resolve_config(cfg, resume, overrides)
    validate(cfg)
    dist = setup_distributed(cfg.device)
    if dist.main:
        check_writable(Path(cfg.out), folder=True)
    folders = find_images(cfg)
    apt = build_model(cfg, continues, dist)
    teacher = build_teacher(cfg, apt, continues, dist)  # None unless --distill
    data = load_data(cfg, folders, apt, layout_fn, dist)
    model = distribute(Student(apt) if teacher is not None else apt, dist)  # what computes the loss
    optimizer, run = make_optimizer(apt, cfg), Run(Path(cfg.out), dist.main)
    torch.manual_seed(cfg.seed + 1000 * dist.rank)  # drop-path / dropout draws differ between ranks
    state = start_or_restore(run, optimizer, cfg, continues, resume, dist)
    schedule = Schedule.of(cfg, data.batches_per_epoch)
    if dist.main:
        logger.info(_summary(apt, data, cfg, dist))
    set_deterministic(cfg.deterministic)
    metrics: dict = {}
    if continues and cfg.eval and state.at_epoch_end and not run.has_eval(state.global_step):
        metrics = evaluate_epoch(apt, data, state, cfg, run, dist, teacher)  # that epoch's evaluation was killed
    while state.epoch < cfg.epochs and state.global_step < schedule.stop:
        loader = epoch_loader(data, apt, state, cfg)
        metrics = train_one_epoch(model, apt, loader, optimizer, state, cfg, schedule, run, dist, teacher) or metrics
        if state.batches_in_epoch >= schedule.batches_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            state.save(run, apt, optimizer, cfg, dist)
            if cfg.eval:
                metrics = evaluate_epoch(apt, data, state, cfg, run, dist, teacher) or metrics
    _finish(apt, state, run, dist)
    return metrics


def train_one_epoch(
    model,
    apt,
    loader,
    optimizer,
    state: TrainState,
    cfg: TrainConfig,
    schedule: Schedule,
    run: Run,
    dist: Dist,
    teacher: Optional[Teacher] = None,
) -> dict:
    """One pass over ``loader`` (the rest of ``state.epoch``): one optimizer step per batch, the lr set per step.

    Logs a metrics line every ``cfg.log_every`` steps, at the epoch's last batch and at ``schedule.stop``; saves
    a checkpoint every ``cfg.save_every`` steps and at ``schedule.stop``, where it stops. Advances ``state``.

    Args:
        model: what computes the loss: ``apt`` (``aptvit.teacher.Student(apt)`` with a teacher) or its DDP wrapper.
        apt: the model itself (its parameters are clipped and saved).
        loader: ``epoch_loader``'s batches (``aptvit.data.Batch``, planned for ``apt``).
        teacher: distil from it (``cfg.distill``: ``distill_loss`` against its outputs on the same crops) instead
            of the cross entropy with the labels.

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
        state.bad_images += batch.count_bad(cfg.skip_bad_images)
        # every rank must take the step or none (DDP's collectives): skip when any rank has nothing
        if all_reduce_sum([float(batch.images.shape[0] == 0)], dist)[0] > 0:
            continue
        set_lr(optimizer, lr_at(state.global_step, schedule.total, cfg))
        images = normalise(batch.images.to(dist.device, non_blocking=True), mean, std)
        with autocast(dist.device, dtype):
            out = model(images, packed=batch.packed.to(dist.device, non_blocking=True))  # planned in the workers
            if teacher is None:
                loss = F.cross_entropy(out.float(), batch.labels.to(dist.device), label_smoothing=cfg.label_smoothing)
            else:  # the teacher sees the same crops, uniformly, normalised its own way
                loss = distill_loss(out, teacher(batch.images.to(dist.device)), cfg.temperature)
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
            if dist.main:  # the terminal sees the loss too, not only metrics.jsonl (the bar is off without a TTY)
                logger.info(
                    f"epoch {metrics['epoch']}/{cfg.epochs} step {step}/{schedule.stop}: loss {metrics['loss']:.4f}, "
                    f"lr {metrics['lr']:.2e}, tokens kept {kept}, {metrics['images_per_s']:.1f} img/s"
                )
            window = _Window()
        if step >= schedule.stop or (cfg.save_every and step % cfg.save_every == 0):
            state.save(run, apt, optimizer, cfg, dist)
        if step >= schedule.stop:
            break
    bar.close()
    return metrics


def evaluate_epoch(
    apt, data: TrainData, state: TrainState, cfg: TrainConfig, run: Run, dist: Dist, teacher: Optional[Teacher] = None
) -> dict:
    """Evaluate on the val split (as ``aptvit eval`` would on the checkpoint: with the teacher, as ``aptvit eval
    --teacher``) and log the result as a metrics line; {} when there is no val split."""
    dtype = resolve_dtype(cfg.dtype, dist.device)
    if data.val is None:
        return {}
    if teacher is not None:
        result = agreement(apt, teacher, data.val, cfg.batch_size, cfg.workers, dist, cfg.skip_bad_images, dtype)
    else:
        mean, std = apt.pixel_mean_std()
        result = evaluate(apt, data.val, cfg.batch_size, cfg.workers, dist, mean, std, cfg.skip_bad_images, dtype=dtype)
    result = {"kind": "eval", "epoch": state.epoch, "step": state.global_step, **result}
    run.log_metrics(result)
    if dist.main:
        logger.info(f"epoch {state.epoch}: {describe(result)}")
    return result


def describe(result: dict) -> str:
    """The figures of an evaluation (``evaluate``'s or ``agreement``'s) in one line."""
    parts = [f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%"] if "top1" in result else []
    if "agreement" in result:
        parts.append(f"top-1 agreement with the teacher {result['agreement']:.2f}%")
    if "cosine_dense" in result:
        parts.append(
            f"cosine to the teacher {result['cosine_pre_logits']:.4f} (pre-logits) / "
            f"{result['cosine_dense']:.4f} (dense)"
        )
    parts.append(f"tokens kept {result['tokens_kept']:.1%}, {result['images_per_s']:.1f} img/s")
    return ", ".join(parts)


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
            "epoch": state.epoch + 1,  # the epoch in progress, counted from 1 as the evaluation after it is
            "step": state.global_step,
            "loss": loss / max(1, steps),
            # the schedule's lr (--lr's scale): each group's is it times its own lr_scale (layer decay, new layers)
            "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0),
            "images_per_s": images / (time.perf_counter() - self.start),
            "tokens_kept": tokens / max(1, base),
            "bad_images": state.bad_images,
        }


def _update(apt, loss: torch.Tensor, optimizer, cfg: TrainConfig) -> None:
    """One optimizer step on ``loss``'s gradients, clipped to norm ``cfg.clip_grad`` (0: no clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(apt.parameters(), cfg.clip_grad)
    optimizer.step()


def _summary(apt, data: TrainData, cfg: TrainConfig, dist: Dist) -> str:
    val = count(len(data.val), "val image") if data.val is not None else "no val split"
    target = "distilled from a uniform teacher" if cfg.distill else count(len(cfg.classes), "class")
    return (
        f"{apt.pretrained_cfg.get('architecture', cfg.model)}: {count(len(data.train), 'train image')} / {val}, "
        f"{target}, {count(dist.world, 'process')} on {dist.device.type}, "
        f"{count(data.batches_per_epoch, 'step')} per epoch"
    )


def _finish(apt, state: TrainState, run: Run, dist: Dist) -> None:
    """Check that the ranks agree, and say what was skipped and where the run is."""
    if dist.world > 1:
        _check_in_sync(apt, dist)
    if not dist.main:
        return
    if state.bad_images:
        logger.info(f"skipped {count(state.bad_images, 'unreadable image')}")
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
