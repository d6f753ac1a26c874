"""The run folder and its checkpoint pair: ``Run`` (config.json, metrics.jsonl, which checkpoint is on disk) and
``TrainState`` (where the run stands; its ``save`` / ``restore`` write and read model.safetensors + train_state.pt).
Every file is written atomically, by rank 0 only."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from ..core.io import InputError, UserError, atomic_write, atomic_write_many, reading, remove_temporaries, writing
from ..distributed import Dist, all_gather_objects
from ..nn.checkpoint import read_metadata, saver
from .config import RUN_FILES, TrainConfig


class DivergedError(UserError, FloatingPointError):
    """The loss or the weights stopped being finite: the run stops, its last good checkpoint stays."""


def _json_safe(value):
    """``value`` with non-finite floats as None: metrics.jsonl stays JSON (no bare NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


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
    """The files of one run directory, all written atomically (rank 0 only): settings, metrics, and which
    checkpoint is on disk (``TrainState.save`` / ``TrainState.restore`` write and read the checkpoint)."""

    def __init__(self, folder: Path, main: bool):
        self.folder, self.main = Path(folder), main
        self.metrics: List[str] = []
        self.saved_step: Optional[int] = None  # the step of the checkpoint on disk (None: none yet)

    def start(self, cfg: TrainConfig, fresh: bool) -> None:
        """Remove what a killed run left half-written and write the settings (a resumed run's with what it changed,
        e.g. more --epochs, so that a later --resume goes on with them); a fresh start also clears the metrics."""
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
                # a --distill run keeps the source's head: it learnt no class names
                **({} if cfg.distill else {"classes": json.dumps(cfg.classes)}),
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
