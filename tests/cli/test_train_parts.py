"""The steps of ``finetune`` one by one: the checkpoint state, one epoch of training, the per-step lr schedule."""

import logging
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

import aptvit
from aptvit.core.io import InputError
from aptvit.data import Batch
from aptvit.distributed import Dist
from aptvit.train import (
    DivergedError,
    Run,
    Schedule,
    TrainState,
    build_model,
    epoch_loader,
    find_images,
    load_data,
    lr_at,
    make_optimizer,
    train_one_epoch,
)

from ..tiny import tiny_vit
from .helpers import make_folder, metrics, train_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("parts") / "data", train=8, val=1)  # 16 training images


def tiny_apt():
    return aptvit.convert(tiny_vit("vit_cls", num_classes=2), thresholds={32: 6.0})


class Setup:
    """A tiny model, its optimizer, a started run folder and one epoch's batches held in memory (4 batches of 4)."""

    def __init__(self, data_dir, out, **settings):
        self.cfg = train_config(data_dir, out, augment="none", **settings)
        self.apt = tiny_apt()
        self.data = load_data(self.cfg, find_images(self.cfg), self.apt, None, Dist())
        self.batches = list(epoch_loader(self.data, self.apt, TrainState(), self.cfg))
        self.optimizer = make_optimizer(self.apt, self.cfg)
        self.run = Run(out, main=True)
        self.run.start(self.cfg, fresh=True)
        self.steps = []  # per optimizer step: [(lr, lr_scale) per group]
        self.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.steps.append([(g["lr"], g["lr_scale"]) for g in opt.param_groups])
        )

    def epoch(self, state: TrainState, batches=None) -> dict:
        schedule = Schedule.of(self.cfg, self.data.batches_per_epoch)
        batches = self.batches if batches is None else batches
        return train_one_epoch(self.apt, self.apt, batches, self.optimizer, state, self.cfg, schedule, self.run, Dist())


def test_train_state_save_then_restore_round_trips(tmp_path, data_dir):
    cfg = train_config(data_dir, tmp_path / "run", classes=["plain", "stripes"])
    apt = tiny_apt()
    optimizer = make_optimizer(apt, cfg)
    torch.manual_seed(1)
    for p in apt.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # AdamW now holds moments and a step count
    run = Run(tmp_path / "run", main=True)
    run.start(cfg, fresh=True)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    TrainState(epoch=1, batches_in_epoch=3, global_step=7, bad_images=2).save(run, apt, optimizer, cfg, Dist())
    next_draws = (torch.rand(3), random.random(), np.random.rand())

    torch.manual_seed(99)  # everything a restore must put back is moved away
    random.seed(99)
    np.random.seed(99)
    fresh = make_optimizer(apt, cfg)
    again = Run(tmp_path / "run", main=True)
    state = TrainState.restore(again, fresh, Dist())

    assert (state.epoch, state.batches_in_epoch, state.global_step) == (1, 3, 7)
    assert state.bad_images == 0  # a count of this process's skips, not part of the checkpoint
    assert again.saved_step == 7
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], next_draws[0]) and draws[1:] == next_draws[1:]
    want, got = optimizer.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert want["state"].keys() == got["state"].keys() and len(want["state"]) == len(list(apt.parameters()))
    for key, saved in want["state"].items():
        assert saved.keys() == got["state"][key].keys()
        assert all(torch.equal(saved[k], got["state"][key][k]) for k in saved), key
    # the file format old runs were written in
    on_disk = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert set(on_disk) == {"optimizer", "epoch", "batches_in_epoch", "global_step", "rng"}
    with safe_open(str(tmp_path / "run" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["global_step"] == "7"
    loaded = aptvit.load(tmp_path / "run" / "model.safetensors").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in apt.state_dict().items())


def test_restore_refuses_another_number_of_processes(tmp_path, data_dir):
    cfg = train_config(data_dir, tmp_path / "run", classes=["plain", "stripes"])
    apt = tiny_apt()
    run = Run(tmp_path / "run", main=True)
    run.start(cfg, fresh=True)
    TrainState(global_step=1).save(run, apt, make_optimizer(apt, cfg), cfg, Dist())
    with pytest.raises(InputError, match=r"saved by 1 process\(es\); resume it with as many, not 2"):
        TrainState.restore(run, make_optimizer(apt, cfg), Dist(rank=0, world=2))


def test_one_epoch_takes_one_step_per_batch_and_logs_each(tmp_path, data_dir):
    setup = Setup(data_dir, tmp_path / "run", epochs=2)
    state = TrainState()
    last = setup.epoch(state)
    assert len(setup.steps) == 4
    assert (state.epoch, state.batches_in_epoch, state.global_step) == (0, 4, 4)  # the caller ends the epoch
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4] and last["step"] == 4
    assert setup.run.saved_step is None  # neither max_steps nor save_every: the caller saves at the epoch's end
    group_steps = {int(s["step"]) for s in setup.optimizer.state_dict()["state"].values()}
    assert group_steps == {4}


def test_one_epoch_stops_and_saves_at_max_steps(tmp_path, data_dir):
    setup = Setup(data_dir, tmp_path / "run", epochs=2, max_steps=3)
    state = TrainState()
    setup.epoch(state)
    assert len(setup.steps) == 3
    assert (state.batches_in_epoch, state.global_step) == (3, 3)
    saved = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert (saved["batches_in_epoch"], saved["global_step"]) == (3, 3) and setup.run.saved_step == 3


def test_an_unreadable_batch_is_consumed_but_is_no_step(tmp_path, data_dir):
    setup = Setup(data_dir, tmp_path / "run", skip_bad_images=True)
    nothing = Batch(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), None, ["a.png"])
    state = TrainState()
    setup.epoch(state, [setup.batches[0], nothing, *setup.batches[1:3]])
    assert len(setup.steps) == 3
    assert (state.batches_in_epoch, state.global_step, state.bad_images) == (4, 3, 1)
    assert metrics(tmp_path / "run")[-1]["bad_images"] == 1


def test_lr_follows_the_schedule_per_step_with_each_groups_scale(tmp_path, data_dir):
    setup = Setup(
        data_dir,
        tmp_path / "run",
        epochs=2,
        warmup=0.25,
        lr=1e-3,
        min_lr=1e-5,
        new_layer_lr_scale=10.0,
        layer_decay=1.0,
    )
    setup.epoch(TrainState())
    total = 8  # 2 epochs x 4 batches: 2 warm-up steps, then the cosine
    expected = [lr_at(step, total, setup.cfg) for step in range(4)]
    assert expected[0] < expected[1] and expected[3] < expected[2]  # the epoch sees the warm-up and the cosine
    assert {scale for step in setup.steps for _, scale in step} == {1.0, 10.0}
    for step, groups in enumerate(setup.steps):
        for lr, scale in groups:
            assert lr == pytest.approx(expected[step] * scale, rel=1e-12), (step, scale)


def test_a_non_finite_loss_stops_before_its_step(tmp_path, data_dir):
    setup = Setup(data_dir, tmp_path / "run")
    with torch.no_grad():
        setup.apt.timm_model.head.bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in setup.apt.state_dict().items()}
    state = TrainState()
    with pytest.raises(DivergedError, match="step 1: the loss is nan: the run diverged .*no checkpoint was written"):
        setup.epoch(state)
    assert setup.steps == [] and state.global_step == 0
    after = setup.apt.state_dict()
    assert all(_same(before[k], after[k]) for k in after)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize(
    "continues, dist, tells",
    [(False, Dist(), True), (True, Dist(), False), (False, Dist(rank=1, world=2), False)],
    ids=["new run", "resume", "rank 1"],
)
def test_build_model_says_how_it_built_the_model_once(
    tmp_path, data_dir, monkeypatch, info_log, continues, dist, tells
):
    def fake_build_models(*args, **kwargs):
        logging.getLogger("aptvit.models").info("weights: random")
        logging.getLogger("aptvit.models").warning("a warning")
        return tiny_apt(), None

    monkeypatch.setattr("aptvit.train.model.build_models", fake_build_models)
    build_model(train_config(data_dir, tmp_path / "run", classes=["plain", "stripes"]), continues, dist)
    # a resume rebuilds from its own checkpoint (nothing to tell); other ranks would repeat rank 0
    assert ("weights: random" in info_log.text) == tells
    assert "a warning" in info_log.text  # warnings always pass
    assert logging.getLogger("aptvit").level == logging.INFO  # as the caller had it
