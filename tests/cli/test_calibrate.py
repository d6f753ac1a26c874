"""``aptvit calibrate``: the sweep's rows, lower resolution as a candidate, the target's choice, the written settings,
one line for every bad input, and the report written atomically."""

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import aptvit
from aptvit.calibrate import Row, Target, build_grid, choose, default_sizes, patch_models
from aptvit.core.io import InputError
from aptvit.data import build_transform
from aptvit.images import normalise, to_rgb

from ..tiny import tiny_vit
from .helpers import one_line, run

CAL = sys.modules["aptvit.calibrate"]  # ``aptvit.calibrate`` is the function; the module is its home
CLASSES = ["plain", "stripes"]
FAST = ["--timing-images", "4", "--runs", "1", "--warmup", "0", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Labelled and unlabelled images, a two-class aptvit checkpoint (with its classes) and a headless one."""
    root = tmp_path_factory.mktemp("calibrate")
    data = textures(root / "data")
    flat = root / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((data / "val").rglob("*.png"))):
        Image.open(p).save(flat / f"{i}.png")
    good = root / "tiny.safetensors"
    aptvit.save(trained_tiny(data / "val"), good, extra_metadata={"classes": json.dumps(CLASSES)})
    headless = root / "headless.safetensors"
    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=0)), headless)
    return {"root": root, "val": data / "val", "flat": flat, "good": good, "headless": headless}


def textures(root: Path, n: int = 12, size: int = 48, seed: int = 0) -> Path:
    """ROOT/val/<class>/*.png: blocky random textures, some with fine noise, classes drawn at random (a task that
    no setting but the source's own, fitted to it, gets right everywhere)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "val" / CLASSES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 256, (rng.integers(2, 7),) * 2 + (3,))
        img = np.kron(blocks, np.ones((size // len(blocks) + 1,) * 2 + (1,)))[:size, :size]
        if i % 3 == 0:
            img = img + rng.normal(0, 40, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def trained_tiny(folder):
    """A tiny APT model whose head is fitted (least squares) to the images of ``folder`` at 64 px: predictions that
    follow the images, so that settings can differ in top-1."""
    apt = aptvit.convert(tiny_vit("vit_cls", num_classes=2))
    paths = sorted(Path(folder).rglob("*.png"))
    labels = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
    vit = apt.timm_model
    with torch.no_grad():
        pre = vit.forward_head(vit.forward_features(eval_crops(paths, 64, apt)), pre_logits=True)
        ones = torch.ones(len(paths), 1)
        fit = torch.linalg.lstsq(torch.cat([pre, ones], 1), F.one_hot(labels, 2).float() * 2 - 1).solution
        vit.head.weight.copy_(fit[:-1].T)
        vit.head.bias.copy_(fit[-1])
    return apt


def argv(world, out, *extra, checkpoint="good", data="val"):
    return [
        "calibrate",
        "--checkpoint",
        world[checkpoint],
        "--data",
        world[data] if data in world else data,
        "--size",
        "64",
        "--out",
        out,
        *FAST,
        *extra,
    ]


def fake_speeds(speed_of):
    """A ``_measure`` whose speed-ups are ``speed_of(setting)`` (timings never go into tests)."""

    def measure(settings, *args, **kwargs):
        return [(100.0 * speed_of(s), speed_of(s)) for s in settings]

    return measure


# ---------------------------------------------------------------------------------------------- the rows
def eval_crops(paths, size, apt):
    """The normalised crops ``aptvit eval --size size`` feeds the model, computed here from the files."""
    mean, std = apt.pixel_mean_std()
    t = build_transform(size, False, mean, std, apt.pretrained_cfg.get("crop_pct"))
    crops = [torch.from_numpy(np.ascontiguousarray(t(to_rgb(Image.open(p))))) for p in paths]
    return normalise(torch.stack(crops), mean, std)


def test_rows_are_the_grid_with_lower_resolutions_measured_against_the_source(world):
    apt = aptvit.load(world["good"])
    before = apt.config
    result = aptvit.calibrate(
        apt,
        world["val"],
        size=64,
        sizes=[64, 48, 32],
        budgets=[0.5],
        thresholds=["default", {32: -1.0}],  # -1 bits: nothing ever merges
        timing_images=4,
        runs=1,
        warmup=0,
        workers=0,
        device="cpu",
        progress=False,
    )
    assert apt.config == before  # the model handed in is not reconfigured
    by = {r.name: r for r in result.rows}
    assert list(by)[0] == "source (64 px)" and result.labelled and result.images == 12
    assert {r.name for r in result.rows if r.kind == "lower resolution"} == {
        "lower resolution 48 px",
        "lower resolution 32 px",
    }
    for r in result.rows:  # the token count of a uniform row is its grid, relative to the source's 4 x 4
        if r.kind != "apt":
            assert r.tokens == (r.size // 16) ** 2 and r.token_share == pytest.approx((r.size / 64) ** 2)
    # budget 0.5 at 48 px (4 tokens) is below the 6 that 16/32 allow on a 3 x 3 grid: left out, not an error
    assert "APT entropy budget 0.5 at 48 px" not in by and "APT entropy budget 0.5" in by
    assert by["APT entropy budget 0.5"].tokens <= 8
    # a setting that merges nothing computes what the source computes
    same = by["APT entropy thresholds 32=-1"]
    assert same.tokens == 16 and same.agreement == 100.0 and same.top1 == by["source (64 px)"].top1
    assert same.cosine_pre_logits == pytest.approx(1.0, abs=1e-5) and same.cosine_dense == pytest.approx(1.0, abs=1e-5)
    # each APT row against the lower resolution nearest in tokens (16 tokens: 48 px's 9, not 32 px's 4), paired
    low48 = by["lower resolution 48 px"]
    assert same.versus == "lower resolution 48 px"
    assert same.top1_gain == pytest.approx(same.top1 - low48.top1) and low48.versus is None
    # the lower resolution's figures, computed here from the files: the source at 64 px, the same model at 32 px
    paths = sorted(world["val"].rglob("*.png"))
    labels = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
    vit = apt.timm_model
    with torch.no_grad():
        ref, low = vit.forward_features(eval_crops(paths, 64, apt)), vit.forward_features(eval_crops(paths, 32, apt))
        ref_pre, low_pre = vit.forward_head(ref, pre_logits=True), vit.forward_head(low, pre_logits=True)
        ref_top, low_top = vit.forward_head(ref).argmax(-1), vit.forward_head(low).argmax(-1)
        ref_dense = ref[:, 1:].transpose(1, 2).reshape(len(paths), -1, 4, 4)
        low_dense = F.interpolate(low[:, 1:].transpose(1, 2).reshape(len(paths), -1, 2, 2), (4, 4), mode="bilinear")
    row = by["lower resolution 32 px"]
    assert by["source (64 px)"].top1 == pytest.approx(100 * float((ref_top == labels).double().mean()))
    assert row.top1 == pytest.approx(100 * float((low_top == labels).double().mean()))
    assert row.agreement == pytest.approx(100 * float((low_top == ref_top).double().mean()))
    assert row.cosine_pre_logits == pytest.approx(float(F.cosine_similarity(low_pre, ref_pre).mean()), rel=1e-4)
    dense = F.cosine_similarity(low_dense, ref_dense, dim=1).flatten(1).mean(1).mean()
    assert row.cosine_dense == pytest.approx(float(dense), rel=1e-4)
    drop = (ref_top == labels).double() - (low_top == labels).double()
    assert row.top1_drop == pytest.approx(100 * float(drop.mean()))
    assert row.top1_se == pytest.approx(100 * float(drop.std() / len(drop) ** 0.5))


def test_apt_rows_are_paired_with_the_lower_resolution_nearest_in_tokens():
    from aptvit.calibrate import pair_with_lower_resolutions

    def row(name, kind, tokens):
        return Row(name, kind, 64, None, None, None, None, tokens, tokens / 16)

    rows = [row("src", "source", 16), row("low 9", "lower resolution", 9), row("low 4", "lower resolution", 4)]
    rows += [row("apt 8", "apt", 8), row("apt 5", "apt", 5), row("apt 6 unlabelled", "apt", 6)]
    ones = torch.ones(4, dtype=torch.float64)
    correct = [ones, torch.tensor([1.0, 1, 0, 0]), torch.tensor([1.0, 0, 0, 0]), ones, torch.tensor([1.0, 1, 1, 0])]
    pair_with_lower_resolutions(rows, correct + [None])
    by = {r.name: r for r in rows}
    assert (by["apt 8"].versus, by["apt 5"].versus) == ("low 9", "low 4")
    assert by["apt 8"].top1_gain == pytest.approx(50.0) and by["apt 5"].top1_gain == pytest.approx(50.0)
    diff = torch.tensor([0.0, 1, 1, 0])
    assert by["apt 5"].top1_gain_se == pytest.approx(100 * float(diff.std() / 2))
    assert by["apt 6 unlabelled"].versus is None and by["low 9"].top1_gain is None
    text = CAL.format_table(rows[:5])
    assert "- apt 5: +50.00 +- 28.87 points against low 4" in text


def test_a_uniform_checkpoint_is_calibrated_with_the_default_patch_sizes(world, tmp_path, capsys, monkeypatch, caplog):
    """A checkpoint of one patch size (a uniform fine-tune's) merges nothing as it is: calibrate tries APT at the
    library's default sizes p, 2p rather than sweeping lower resolutions only (or calling that nothing to sweep)."""
    uniform = aptvit.convert(aptvit.load(world["good"]).timm_model, patch_sizes=(16,))
    path = tmp_path / "uniform.safetensors"
    aptvit.save(uniform, path, extra_metadata={"classes": json.dumps(CLASSES)})
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 2.0 if s.kind == "apt" else 1.0))
    out = tmp_path / "out"
    extra = ("--sizes", "64", "--budgets", "0.5", "--thresholds", "none", "--area-bias", "off", "--min-cosine", "0.1")
    args = argv(world, out, *extra)
    args[args.index("--checkpoint") + 1] = path
    with caplog.at_level("INFO", logger="aptvit.calibrate"):
        code, printed, err = run(capsys, *args)
    assert code == 0, err
    rows = json.loads((out / "calibration.json").read_text())["rows"]
    apt_rows = [r for r in rows if r["kind"] == "apt"]
    assert [r["patch_sizes"] for r in apt_rows] == [[16, 32]] and apt_rows[0]["tokens"] <= 8
    assert "one patch size (16): trying APT with the default patch sizes 16/32" in caplog.text
    chosen = aptvit.load(out / "model.safetensors")  # the written model merges, with the sizes it was measured at
    assert chosen.patch_sizes == (16, 32) and chosen.config.budget == 0.5


def test_limit_draws_from_the_whole_folder_and_labels_need_a_matching_head(world, tmp_path):
    from aptvit.calibrate import find_samples

    samples, labelled, classes, note = find_samples(world["val"], 4, CLASSES, 2)
    assert len(samples) == 4 and labelled and classes == CLASSES and note == ""
    assert {label for _, label in samples} == {0, 1}  # a seeded draw, not the first class of a sorted list
    assert find_samples(world["val"], 4, CLASSES, 2) == (samples, labelled, classes, note)  # the same draw
    assert len(find_samples(world["val"], 0, None, 2)[0]) == 12  # 0: all
    # class folders that are not the head's: agreement only, and why
    assert find_samples(world["val"], None, None, 3)[1:] == (
        False,
        None,
        "2 class folders for the model's 3 classes: no top-1, agreement only",
    )
    assert (
        find_samples(world["val"], None, ["a", "b"], 2)[3]
        == "the class folders are not the checkpoint's classes: no top-1, agreement only"
    )
    assert find_samples(world["val"], None, None, 0)[3].startswith("the model has no classifier head")


def test_default_sizes_keep_about_75_50_35_percent_of_the_tokens():
    assert default_sizes(224, 14) == [224, 196, 154, 126]  # 100%, 77%, 47%, 32% of the 16 x 16 grid
    assert default_sizes(384, 16) == [384, 336, 272, 224]
    assert default_sizes(32, 16) == [32]  # never below two patches a side


def test_grid_counts_and_thresholds_follow_their_patch_sizes():
    settings, notes = build_grid(
        64, 16, [64, 32], [(16, 32), (16, 32, 64)], ["entropy", "upsample"], [0.5], ["default", {32: 5.0, 64: 4.0}]
    )
    apt = [s for s in settings if s.kind == "apt"]
    # per size, patch set and scorer: one budget and the default thresholds, plus the pair that names 32 and 64
    # (only on 16/32/64); at 32 px budget 0.5 is 2 tokens, below what a 2 x 2 grid allows with 32-px patches (1): kept
    assert len(apt) == 2 * (2 * 2 + 2 * 3) - 0
    assert notes == []
    named = [s for s in apt if s.thresholds == {32: 5.0, 64: 4.0}]
    assert {s.patch_sizes for s in named} == {(16, 32, 64)} and len(named) == 4
    defaults = [s for s in apt if s.scorer == "upsample" and s.budget is None and s.patch_sizes == (16, 32)]
    assert all(s.thresholds == aptvit.APTConfig(patch_sizes=(16, 32), scorer="upsample").thresholds for s in defaults)


def test_patch_sets_keep_the_checkpoints_detail_weights():
    apt = aptvit.convert(tiny_vit("vit_cls"), patch_sizes=(16, 32))
    with torch.no_grad():
        for param in apt.adaptive_embed.parameters():
            param.normal_()
    models = patch_models(apt, [(16, 32), (16, 32, 64)])
    for ps, model in models.items():
        assert model.timm_model is apt.timm_model and model is not apt
        mine = model.adaptive_embed.state_dict()
        for k, v in apt.adaptive_embed.state_dict().items():
            assert torch.equal(mine[k], v), (ps, k)
    assert not models[(16, 32, 64)].adaptive_embed.detail_proj["64"].weight.any()  # a size the checkpoint lacks: zero


# ---------------------------------------------------------------------------------------------- the choice
def row(name, kind="apt", speedup=1.0, tokens=10.0, top1=80.0, agreement=99.0, cos=0.99, source_top1=80.0):
    return Row(
        name=name,
        kind=kind,
        size=224,
        patch_sizes=None,
        scorer=None,
        budget=None,
        thresholds=None,
        tokens=tokens,
        token_share=tokens / 16,
        top1=top1,
        top1_drop=source_top1 - top1,
        top1_se=0.1,
        agreement=agreement,
        cosine_pre_logits=cos,
        speedup=speedup,
    )


def test_choose_takes_the_fastest_setting_that_keeps_the_target():
    rows = [
        row("source", "source", 1.0, 16, 80.0, 100.0, 1.0),
        row("mild", speedup=1.2, tokens=12, top1=79.9),
        row("fast", speedup=1.6, tokens=9, top1=79.5),  # exactly at the limit: kept
        row("fewest tokens", speedup=1.4, tokens=6, top1=79.6),
        row("too far", speedup=2.0, tokens=5, top1=79.0),
        row("half", "lower resolution", 1.5, 8, 79.8),
    ]
    drop_alone = Target(max_drop=0.5, confidence=0)
    best, reason = choose(rows, drop_alone)
    assert best.name == "fast"
    assert "fast: the fastest of the 4 settings that keep top-1 within 0.5 points of the source's 80.00%" in reason
    assert "fastest plain lower resolution that keeps it, 224 px, runs at 1.50x" in reason
    assert "standard error" not in reason
    rows[2].top1_se = 0.8  # the chosen setting's difference is noisier than the target: the reason says so
    best, reason = choose(rows, drop_alone)
    assert best.name == "fast" and reason.endswith(
        "; but its top-1 difference has a standard error of 0.80 points, more than the 0.5 asked: on these images "
        "the choice is within noise (more labelled images, a larger --limit, make it firmer)"
    )
    assert "standard error" not in choose(rows, Target(max_drop=1.0, confidence=0))[1]
    rows[2].speedup = 1.5  # a tie with the lower resolution: the fewer tokens win
    assert choose(rows, drop_alone)[0].name == "half"


def test_choose_is_never_worse_than_a_lower_resolution():
    rows = [
        row("source", "source", 1.0, 16, 80.0, 100.0, 1.0),
        row("apt", speedup=1.3, tokens=7, agreement=99.5),
        row("lower", "lower resolution", 1.45, 9, agreement=99.2),
    ]
    best, reason = choose(rows, Target(min_agreement=0.99))
    assert best.name == "lower" and "a plain lower resolution" in reason
    rows[2].agreement = 98.9  # the lower resolution no longer keeps it: APT does
    best, reason = choose(rows, Target(min_agreement=0.99))
    assert best.name == "apt" and "no plain lower resolution keeps it" in reason


def test_choose_never_picks_the_source_and_names_the_closest_when_nothing_keeps_the_target():
    rows = [
        row("source", "source", 1.0, 16, cos=1.0),
        row("near", speedup=1.2, cos=0.985),
        row("far", speedup=1.9, cos=0.95),
    ]
    best, reason = choose(rows, Target(min_cosine=0.99))
    assert best is None
    assert reason.startswith("no setting keeps class cosine to the source of at least 0.99; the closest is near")
    assert reason.endswith("the nearest target a setting keeps is --min-cosine 0.985")
    assert choose(rows[:1], Target(min_cosine=0.5)) == (
        None,
        "no setting besides the source to keep class cosine to the source of at least 0.5",
    )


@pytest.mark.parametrize(
    "target, figures, nearest",
    [  # the nearest target is rounded towards the setting, so that the setting keeps it
        # by default the drop plus one standard error (0.1 here): 1.234 + 0.1, 1.0 + 0.1
        (Target(max_drop=0.5), dict(top1=78.766), "--max-drop 1.34"),
        (Target(max_drop=0.5), dict(top1=79.0), "--max-drop 1.1"),
        (Target(min_agreement=0.99), dict(agreement=98.7654), "--min-agreement 0.9876"),
        (Target(min_cosine=0.999), dict(cos=0.987654), "--min-cosine 0.9876"),
    ],
)
def test_when_nothing_keeps_the_target_the_message_names_the_best_and_the_nearest_target_met(target, figures, nearest):
    rows = [row("source", "source", 1.0, 16), row("best", speedup=1.3, **figures), row("worse", top1=70.0, cos=0.9)]
    rows[2].agreement = 90.0
    best, reason = choose(rows, target)
    assert best is None and "the closest is best (" in reason and "1.30x the source's images/s" in reason
    assert reason.endswith(f"; the nearest target a setting keeps is {nearest}")
    option, value = nearest.split()
    met = Target(**{option[2:].replace("-", "_"): float(value)})
    assert met.met(rows[1]) and choose(rows, met)[0].name == "best"


def test_confidence_asks_the_drop_plus_its_standard_errors_to_keep_the_target():
    rows = [
        row("source", "source", 1.0, 16),
        row("lucky", speedup=2.9, top1=79.7),  # -0.3 points, but +- 2.1
        row("sure", speedup=1.4, top1=79.9),  # -0.1 points +- 0.3
        row("far", speedup=3.5, top1=75.0),
    ]
    rows[1].top1_se, rows[2].top1_se, rows[3].top1_se = 2.1, 0.3, 2.0
    assert choose(rows, Target(max_drop=0.5, confidence=0))[0].name == "lucky"  # the estimate alone: the cheapest
    best, reason = choose(rows, Target(max_drop=0.5))  # the default: the drop plus one standard error
    assert best.name == "sure" and Target(max_drop=0.5).confidence == 1
    best, reason = choose(rows, Target(max_drop=0.05, confidence=0))  # nothing: the nearest says --confidence 0
    assert best is None and reason.endswith("the nearest target a setting keeps is --max-drop 0.1 --confidence 0")
    best, reason = choose(rows, Target(max_drop=0.5, confidence=1))
    assert best.name == "sure" and "within 0.5 points of the source's 80.00% (the drop plus 1 standard error)" in reason
    best, reason = choose(rows, Target(max_drop=0.5, confidence=2))  # 0.1 + 2 x 0.3 = 0.7: none
    assert best is None and reason.endswith("the nearest target a setting keeps is --max-drop 0.7 --confidence 2")
    assert choose(rows, Target(max_drop=0.7, confidence=2))[0].name == "sure"
    assert Target(max_drop=0.5, confidence=0).value(rows[1]) == pytest.approx(0.3)  # 0: the drop itself


def test_noisy_timings_are_the_speedups_well_above_the_flop_ratio():
    rows = [row("source", "source", 1.0, 16), row("fair", speedup=1.9), row("noisy", speedup=3.1), row("slow")]
    for r, gflops in zip(rows, (12.0, 6.0, 6.0, 12.0)):
        r.gflops = gflops
    # 2x fewer FLOPs: up to 3x measured passes (1.5 x the FLOP ratio), above it is noise
    assert [r.name for r in CAL.noisy_timings(rows)] == ["noisy"]
    text = CAL.noisy_warning(CAL.noisy_timings(rows), rows[0], "wall")
    assert "noisy (3.10x measured, 2.00x fewer FLOPs)" in text and "raise --runs and --timing-images" in text
    assert "--clock thread" in text and "--clock thread" not in CAL.noisy_warning(rows[2:3], rows[0], "thread")
    rows[0].gflops = None  # nothing to compare with: no warning
    assert CAL.noisy_timings(rows) == []


def test_a_noisy_timing_is_warned_about_and_named_in_the_choice(world, tmp_path, capsys, monkeypatch, caplog):
    # the budget-0.5 setting "measures" 10x: far above what its FLOPs allow
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 10.0 if s.budget == 0.5 else 1.01))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="aptvit.calibrate"):
        code, printed, err = run(
            capsys, *argv(world, out, "--max-drop", "100", "--sizes", "64", "--budgets", "0.5", "--area-bias", "off")
        )
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "APT entropy budget 0.5 (10.00x measured" in warned[0]
    report = json.loads((out / "calibration.json").read_text())
    assert report["noisy_timings"] == ["APT entropy budget 0.5"]
    assert report["chosen"] == "APT entropy budget 0.5" and "its timing looks noisy" in report["reason"]
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["source (64 px)"]["gflops"] > rows["APT entropy budget 0.5"]["gflops"] > 0
    # an honest timing: no warning
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 1.01))
    caplog.clear()
    with caplog.at_level("WARNING", logger="aptvit.calibrate"):
        run(capsys, *argv(world, tmp_path / "out2", "--max-drop", "100", "--sizes", "64", "--budgets", "0.5"))  # both
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_gflops_are_what_runs_at_each_setting(world, monkeypatch):
    from aptvit.core.quadtree import patch_layout
    from aptvit.nn.model import model_flops

    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 1.0))
    apt = aptvit.load(world["good"])
    result = CAL.calibrate(apt, world["val"], size=64, sizes=[64, 48], budgets=[0.5], thresholds=[], workers=0)
    rows = {r.name: r for r in result.rows}
    paths = sorted(Path(world["val"]).rglob("*.png"))
    for name, size in (("source (64 px)", 64), ("lower resolution 48 px", 48)):
        crops = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)  # the uniform count needs the grid only
        want = float(model_flops(apt, patch_layout(crops, (16,)))["uniform"].mean())
        assert rows[name].gflops == pytest.approx(want / 1e9, rel=1e-9)
    mean, std = apt.pixel_mean_std()
    t = build_transform(64, False, mean, std, apt.pretrained_cfg.get("crop_pct"))
    crops = torch.stack([torch.from_numpy(np.ascontiguousarray(t(to_rgb(Image.open(p))))) for p in paths])
    model = apt.configure(budget=0.5, thresholds=None)
    want = float(model_flops(model, patch_layout(crops, **model.config.layout_kwargs()))["apt"].mean())
    assert rows["APT entropy budget 0.5"].gflops == pytest.approx(want / 1e9, rel=1e-9)


# ---------------------------------------------------------------------------------------------- class order
def swapped_checkpoint(world, tmp_path) -> Path:
    """The world's checkpoint with its head's rows and its classes listed in reverse order (the same model)."""
    swapped = tmp_path / "swapped.safetensors"
    apt = aptvit.load(world["good"])
    with torch.no_grad():
        apt.timm_model.head.weight.copy_(apt.timm_model.head.weight.flip(0))
        apt.timm_model.head.bias.copy_(apt.timm_model.head.bias.flip(0))
    aptvit.save(apt, swapped, extra_metadata={"classes": json.dumps(CLASSES[::-1])})
    return swapped


def test_class_folders_in_another_order_than_the_head_are_relabelled(world, tmp_path, capsys, monkeypatch):
    """A checkpoint whose head lists its classes unsorted (stripes, plain): the sorted class folders are read with
    each label as its head row, so top-1 is the same as the sorted checkpoint's."""
    from aptvit.calibrate import find_samples

    swapped = swapped_checkpoint(world, tmp_path)
    samples, labelled, classes, note = find_samples(world["val"], 0, CLASSES[::-1], 2)
    assert labelled and classes == CLASSES[::-1] and note == ""
    assert [CLASSES[::-1][label] for _, label in samples] == [Path(path).parent.name for path, _ in samples]
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 1.0 / (s.budget or 1.0)))
    tops = {}
    for name, ckpt in (("sorted", world["good"]), ("swapped", swapped)):
        out = tmp_path / name
        args = ["calibrate", "--checkpoint", ckpt, "--data", world["val"], "--size", "64", "--out", out, *FAST]
        code, printed, err = run(capsys, *args, "--max-drop", "100", "--sizes", "64", "--budgets", "0.5")
        assert code == 0, err
        tops[name] = [r["top1"] for r in json.loads((out / "calibration.json").read_text())["rows"]]
    assert tops["swapped"] == tops["sorted"] and tops["sorted"][0] > 50
    # the written copy keeps the head's order
    assert (
        json.loads(aptvit.nn.checkpoint.read_metadata(tmp_path / "swapped" / "model.safetensors")["classes"])
        == (CLASSES[::-1])
    )


def test_eval_reads_class_folders_in_another_order_than_the_head_as_calibrate_does(world, tmp_path, capsys):
    """``aptvit eval`` of a checkpoint whose head lists the folders' classes in another order: each label is read
    as its head row (as calibrate does), so its top-1 is the sorted checkpoint's, not a refusal."""
    swapped = swapped_checkpoint(world, tmp_path)
    tops = {}
    for name, ckpt in (("sorted", world["good"]), ("swapped", swapped)):
        out = tmp_path / f"{name}.json"
        args = ["eval", "--checkpoint", ckpt, "--data", world["val"], "--size", "64", "--workers", "0", "--json", out]
        code, printed, err = run(capsys, *args, "--device", "cpu")
        assert code == 0, err
        tops[name] = json.loads(out.read_text())["top1"]
    assert tops["swapped"] == tops["sorted"] and tops["sorted"] > 50


def test_max_drop_without_labels_says_why_once(world, tmp_path, capsys):
    three = tmp_path / "three"
    for i, p in enumerate(sorted(Path(world["val"]).rglob("*.png"))):
        (three / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.open(p).save(three / f"c{i % 3}" / f"{i}.png")
    code, printed, err = run(capsys, *argv(world, tmp_path / "out", "--max-drop", "1", data=str(three)))
    assert code == 2
    line = one_line(err)
    assert "--max-drop compares top-1, which needs labels: 3 class folders for the model's 2 classes" in line
    assert (printed + err).count("no top-1") == 1, printed + err


def test_max_drop_on_a_headless_model_points_to_the_target_that_works(world, tmp_path, capsys):
    """Without a head there is no top-1 and no agreement: the advice names --min-cosine only."""
    code, printed, err = run(capsys, *argv(world, tmp_path / "out", "--max-drop", "1", checkpoint="headless"))
    assert code == 2
    line = one_line(err)
    assert "use --min-cosine (the model has no head) instead" in line and "--min-agreement" not in line


def test_without_a_target_calibrate_says_it_writes_the_curve_only(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 1 / (s.budget or 1.0)))
    out = tmp_path / "out"
    code, printed, err = run(capsys, *argv(world, out, "--sizes", "64", "--budgets", "0.5", "--thresholds", "none"))
    assert code == 0, err
    assert "no target given (--max-drop, --min-agreement or --min-cosine): the curve only" in printed + err
    assert (out / "calibration.json").is_file() and not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- the written model
@pytest.mark.parametrize("winner", ["APT entropy budget 0.5", "lower resolution 48 px"])
def test_the_written_settings_load_back_and_reproduce_the_chosen_row(world, tmp_path, capsys, monkeypatch, winner):
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 3.0 if s.name(64, (16, 32)) == winner else 1.1))
    bars = []
    import tqdm

    real = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: bars.append(k.get("desc")) or real(*a, **k))
    out = tmp_path / "out"
    extra = ("--max-drop", "100", "--sizes", "64,48", "--budgets", "0.5", "--area-bias", "off")
    code, printed, err = run(capsys, *argv(world, out, *extra))
    assert code == 0, err
    assert "calibrate" in bars  # the sweep shows a progress bar
    report = json.loads((out / "calibration.json").read_text())
    assert report["chosen"] == winner and report["images"] == 12 and report["labelled"]
    chosen = next(r for r in report["rows"] if r["name"] == winner)
    assert f"chose {winner}: the fastest of the" in printed
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert winner in (out / "calibration.md").read_text()
    # the copy: the chosen settings, its size and the checkpoint's classes
    model = aptvit.load(out / "model.safetensors")
    meta = aptvit.nn.checkpoint.read_metadata(out / "model.safetensors")
    assert int(meta["input_size"]) == chosen["size"] and json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["calibration"])["chosen"]["name"] == winner
    if chosen["kind"] == "apt":
        assert model.config.budget == 0.5 and model.config.patch_sizes == (16, 32)
        assert model.config.scorer == "entropy" and model.config.area_bias is aptvit.APTConfig().area_bias
    else:  # a lower resolution: one patch size, nothing merges
        assert model.config.patch_sizes == (16,)
    # ``aptvit eval`` of the copy, at the size it carries, gives the chosen row's top-1 and tokens
    code, printed, err = run(
        capsys,
        "eval",
        "--checkpoint",
        out / "model.safetensors",
        "--data",
        world["val"],
        "--workers",
        "0",
        "--json",
        tmp_path / "eval.json",
    )
    assert code == 0, err
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["size"] == chosen["size"] and got["top1"] == pytest.approx(chosen["top1"])
    assert got["tokens_kept"] * (chosen["size"] // 16) ** 2 == pytest.approx(chosen["tokens"])


def test_unlabelled_images_give_agreement_and_a_min_agreement_target(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 1 / (s.budget or 1.0)))
    out = tmp_path / "out"
    extra = ("--min-agreement", "0.5", "--sizes", "64", "--budgets", "0.75,0.5", "--thresholds", "none")
    code, printed, err = run(capsys, *argv(world, out, *extra, "--area-bias", "off", data="flat"))
    assert code == 0, err
    report = json.loads((out / "calibration.json").read_text())
    assert not report["labelled"] and all(r["top1"] is None and r["agreement"] is not None for r in report["rows"])
    ok = [r for r in report["rows"] if r["kind"] != "source" and r["agreement"] >= 50]
    assert report["chosen"] == max(ok, key=lambda r: r["speedup"])["name"]


def test_a_headless_model_is_calibrated_on_its_features(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 1 / (s.budget or 1.0)))
    out = tmp_path / "out"
    extra = ("--min-cosine", "0.5", "--sizes", "64", "--budgets", "0.75,0.5", "--thresholds", "none")
    code, printed, err = run(capsys, *argv(world, out, *extra, checkpoint="headless"))
    assert code == 0, err
    report = json.loads((out / "calibration.json").read_text())
    assert all(r["top1"] is None and r["agreement"] is None for r in report["rows"])
    ok = [r for r in report["rows"] if r["kind"] != "source" and r["cosine_pre_logits"] >= 0.5]
    assert report["chosen"] == max(ok, key=lambda r: r["speedup"])["name"]
    assert aptvit.load(out / "model.safetensors").num_classes == 0


def test_thread_clock_times_on_one_thread_and_gives_the_threads_back(world, monkeypatch):
    import aptvit.bench

    seen = []
    original = aptvit.bench.alternating_medians

    def recording(*args, **kwargs):
        seen.append((torch.get_num_threads(), kwargs["clock"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(aptvit.bench, "alternating_medians", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = aptvit.calibrate(
            aptvit.load(world["good"]),
            world["val"],
            size=64,
            sizes=[64],
            budgets=[0.5],
            thresholds=[],
            timing_images=2,
            runs=1,
            warmup=0,
            workers=0,
            device="cpu",
            progress=False,
            clock="thread",
            area_bias=False,
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [(1, time.thread_time)] and result.facts["clock"] == "thread"
    with pytest.raises(ValueError, match="--clock 'cpu' must be one of wall, thread"):
        aptvit.calibrate(aptvit.load(world["good"]), world["val"], clock="cpu")


def test_the_command_lines_defaults_are_calibrates(monkeypatch):
    from aptvit import cli

    args = cli.build_parser().parse_args(["calibrate", "--data", "x"])
    for name in ("limit", "batch_size", "workers", "timing_images", "runs", "warmup", "clock", "area_bias"):
        assert getattr(args, name) == cli.default_of(aptvit.calibrate, name), name
    given = {}
    monkeypatch.setattr(CAL, "calibrate_command", lambda source, **kw: given.update(kw))
    assert cli.main(["calibrate", "--data", "x", "--model", "vit_tiny_patch16_224"]) == 0
    assert given["budgets"] == list(CAL.DEFAULT_BUDGETS) and given["thresholds"] == ["default"]
    assert given["sizes"] is None and given["scorers"] is None and given["patch_sizes"] is None
    assert given["confidence"] is None
    cli.main(
        [
            "calibrate",
            "--data",
            "x",
            "--checkpoint",
            "c",
            "--budgets",
            "none",
            "--thresholds",
            "32=5,64=4",
            "default",
            "--patch-sizes",
            "16,32",
            "16,32,64",
            "--sizes",
            "224,160",
            "--scorers",
            "entropy,upsample",
            "--max-drop",
            "1",
            "--confidence",
            "1.5",
        ]
    )
    assert given["max_drop"] == 1.0 and given["confidence"] == 1.5
    assert given["budgets"] == [] and given["thresholds"] == [{32: 5.0, 64: 4.0}, "default"]
    assert given["patch_sizes"] == [[16, 32], [16, 32, 64]] and given["sizes"] == [224, 160]
    assert given["scorers"] == ["entropy", "upsample"]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad(world):
    root = world["root"]
    (root / "empty").mkdir()
    (root / "texts").mkdir()
    (root / "texts" / "notes.txt").write_text("not an image")
    (root / "junk").mkdir()
    (root / "junk" / "a.png").write_bytes(b"not a png")
    (root / "afile").write_text("x")
    return root


BAD = [
    (["--data", "{root}/empty"], r"empty' holds no image"),
    (["--data", "{root}/texts"], r"texts' holds no image"),
    (["--data", "{root}/missing"], r"missing' is not a folder"),
    (["--data", "{root}/junk"], r"cannot read image .*a\.png.*--skip-bad-images"),
    (["--data", "{root}/junk", "--skip-bad-images"], r"no image of .*junk' could be read"),
    (
        ["--min-cosine", "1.0", "--sizes", "64", "--budgets", "0.25", "--thresholds", "none"],
        r"no setting keeps class cosine to the source of at least 1; the closest is APT entropy budget 0\.25 .*"
        r"calibration\.json",
    ),
    (["--data", "{flat}", "--max-drop", "1"], r"--max-drop compares top-1, which needs labels"),
    (["--checkpoint", "{root}/headless.safetensors", "--min-agreement", "0.9"], r"no classifier head"),
    (["--sizes", "64,50"], r"--sizes 50 is not a multiple of the model's patch size 16; e\.g\. 48 or 64"),
    (["--sizes", "128"], r"--sizes 128 is above the source's input size 64"),
    (["--sizes", "0"], r"--sizes 0 must be a positive number of pixels"),
    (["--size", "70"], r"--size 70 is not a multiple of the model's patch size 16"),
    (["--budgets", "1.5"], r"budget as a float is a fraction of base tokens in \(0, 1\], got 1\.5"),
    (["--min-agreement", "99"], r"--min-agreement 99 must be in \(0\.0, 1\.0\] \(a fraction"),
    (["--max-drop", "-1"], r"--max-drop -1 must be in \[0\.0, 100\.0\]"),
    (["--min-cosine", "0.9", "--confidence", "1"], r"--confidence goes with --max-drop"),
    (["--max-drop", "1", "--confidence", "-1"], r"--confidence -1\.0 must be a number of standard errors >= 0"),
    (["--thresholds", "64=4"], r"--thresholds 64=4 names sizes 64, but no --patch-sizes set has exactly those"),
    (["--patch-sizes", "8,16"], r"--patch-sizes 8,16 must start with the model's patch size 16"),
    (["--limit", "-1"], r"--limit -1 must be an integer >= 0"),
    (["--out", "{root}/afile"], r"cannot write .*afile"),
    (["--sizes", "64", "--budgets", "none", "--thresholds", "none"], r"nothing to sweep"),
    (["--sizes", "64", "--patch-sizes", "16"], r"with --patch-sizes 16 alone nothing merges; .*--patch-sizes 16,32"),
]


@pytest.mark.parametrize("extra, pattern", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(world, bad, tmp_path, capsys, extra, pattern):
    extra = [e.format(root=bad, flat=world["flat"]) for e in extra]
    args = argv(world, tmp_path / "out")
    for option in ("--data", "--checkpoint", "--out", "--size"):  # given again: replace the default
        if option in extra:
            i = args.index(option)
            del args[i : i + 2]
    code, out, err = run(capsys, *args, *extra)
    assert code == 2, err
    assert re.search(pattern, one_line(err)), err


def test_a_target_no_setting_keeps_still_writes_the_curve_and_no_model(world, tmp_path, capsys):
    out = tmp_path / "out"
    extra = ("--min-cosine", "1.0", "--sizes", "64", "--budgets", "0.25", "--thresholds", "none")
    code, printed, err = run(capsys, *argv(world, out, *extra))
    assert code == 2
    report = json.loads((out / "calibration.json").read_text())
    assert report["chosen"] is None and [r["name"] for r in report["rows"]] == [
        "source (64 px)",
        "APT entropy budget 0.25",
        "APT entropy budget 0.25 + area bias",
    ]
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- atomic files
def test_the_report_is_written_atomically(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "calibration.json").write_text("the last report")

    def broken_plot(result, path):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CAL, "plot", broken_plot)
    code, printed, err = run(capsys, *argv(world, out, "--max-drop", "100", "--sizes", "64", "--budgets", "0.5"))
    assert code == 2 and re.search(r"calibration\.png", one_line(err)), err
    # nothing half-written, nothing of the new set renamed in: the folder is as it was
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json"]
    assert (out / "calibration.json").read_text() == "the last report"


# ---------------------------------------------------------------------------------------------- the area bias
def test_each_apt_setting_is_tried_without_and_with_the_area_bias(world, tmp_path, capsys, monkeypatch):
    """The bias moves top-1 by points either way depending on the data (BENCHMARKS.md section 2), so calibrate tries
    both by default; the chosen one is what the written model runs, whatever the checkpoint's own setting."""
    ckpt = tmp_path / "biased.safetensors"
    aptvit.save(aptvit.load(world["good"]).configure(area_bias=True), ckpt)
    world = {**world, "biased": ckpt}
    result = CAL.calibrate(
        aptvit.load(ckpt), world["val"], size=64, sizes=[64], budgets=[0.25], thresholds=[], timing_images=2,
        runs=1, warmup=0, workers=0, device="cpu", progress=False,
    )  # fmt: skip
    by = {r.name: r for r in result.rows}
    assert list(by) == ["source (64 px)", "APT entropy budget 0.25", "APT entropy budget 0.25 + area bias"]
    plain, biased = by["APT entropy budget 0.25"], by["APT entropy budget 0.25 + area bias"]
    assert (plain.area_bias, biased.area_bias) == (False, True) and plain.tokens == biased.tokens
    assert plain.cosine_dense != biased.cosine_dense  # each ran as its name says, not as the checkpoint is
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 2.0 if s.area_bias else 1.5))
    for swept in ("both", "off"):  # the chosen twin is written with the bias it was measured with
        out = tmp_path / f"out_{swept}"
        extra = ("--min-cosine", "0", "--sizes", "64", "--budgets", "0.25", "--thresholds", "none")
        code, printed, err = run(capsys, *argv(world, out, *extra, "--area-bias", swept, checkpoint="biased"))
        assert code == 0, err
        report = json.loads((out / "calibration.json").read_text())
        rows = [r for r in report["rows"] if r["kind"] == "apt"]
        faithful = max(rows, key=lambda r: r["cosine_pre_logits"])  # twins: fidelity decides, not the timing
        assert report["chosen"] == faithful["name"]
        assert aptvit.load(out / "model.safetensors").config.area_bias is faithful["area_bias"]
    assert faithful["area_bias"] is False  # "off" on a biased checkpoint: written without the bias


@pytest.mark.parametrize("given, want", [("on", [True]), ("off", [False]), ("both", [False, True])])
def test_area_bias_option_picks_the_values_swept(world, tmp_path, capsys, monkeypatch, given, want):
    monkeypatch.setattr(CAL, "_measure", fake_speeds(lambda s: 1.0))
    out = tmp_path / "out"
    extra = ("--min-cosine", "0", "--sizes", "64", "--budgets", "0.5", "--thresholds", "none", "--area-bias", given)
    code, printed, err = run(capsys, *argv(world, out, *extra))
    assert code == 0, err
    rows = json.loads((out / "calibration.json").read_text())["rows"]
    assert [r["area_bias"] for r in rows if r["kind"] == "apt"] == want


def test_a_bad_area_bias_value_is_one_line(world, tmp_path, capsys):
    from aptvit.cli import build_parser

    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([str(a) for a in argv(world, tmp_path / "out", "--area-bias", "maybe")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "argument --area-bias: invalid choice: 'maybe'" in err and "'both'" in err
    with pytest.raises(InputError, match="--area-bias must be both, on or off"):
        CAL.calibrate(aptvit.load(world["good"]), world["val"], area_bias="maybe", workers=0)


def test_of_two_bias_twins_that_keep_the_target_the_more_faithful_is_chosen_not_the_luckier_timing():
    """Twins run the same tokens and FLOPs: their speed difference is noise, so fidelity decides between them."""
    setting = CAL.Setting("apt", 224, (16, 32), "entropy", {}, 0.5, None, area_bias=False)
    plain, biased = row("plain", speedup=1.9, top1=79.9), row("biased", speedup=2.0, top1=79.6)
    plain.setting, biased.setting = setting, dataclasses.replace(setting, area_bias=True)
    other = row("other APT", speedup=1.95, top1=79.5)
    rows = [row("source", kind="source"), plain, biased, other]
    best, reason = choose(rows, Target(max_drop=0.5, confidence=0))
    assert best is other  # faster than the better twin; the slower-measured twin is not held against it
    best, reason = choose([r for r in rows if r is not other], Target(max_drop=0.5, confidence=0))
    assert best is plain and "the only setting" in reason
    plain.top1 = biased.top1 = 79.9
    plain.top1_drop = biased.top1_drop = 0.1
    assert choose([rows[0], plain, biased], Target(max_drop=0.5, confidence=0))[0] is biased  # a tie: speed decides


def test_settings_are_timed_on_a_seeded_draw_from_the_whole_folder_not_its_first_class(world, monkeypatch):
    """Where the token count follows the content (thresholds), the first class of a folder read in class order can
    keep far more tokens than the average (Imagenette's first class 96%, all of it 83%), and its speed would not be
    the setting's: the timed images are ``timing_positions``' draw, the same images for every size."""
    spread = CAL.timing_positions(1982, 16)
    assert torch.equal(spread, CAL.timing_positions(1982, 16)) and torch.equal(spread, spread.sort().values)
    assert len(set(spread.tolist())) == 16 and int(spread.max()) > 1982 // 2  # not the first images
    assert len(CAL.timing_positions(3, 16)) == 3
    seen = {}

    def measure(settings, models, vit, timing, *args, **kwargs):
        seen.update({s: torch.cat(t) for s, t in timing.items()})
        return [(1.0, 1.0) for _ in settings]

    monkeypatch.setattr(CAL, "_measure", measure)
    apt = aptvit.load(world["good"])
    kw = dict(size=64, sizes=[64, 48], budgets=[0.5], thresholds=[], workers=0, batch_size=5, progress=False)
    result = CAL.calibrate(apt, world["val"], timing_images=4, **kw)
    paths = sorted(Path(world["val"]).rglob("*.png"))  # read in class order, 6 of each class
    at = CAL.timing_positions(len(paths), 4)
    assert {p.parent.name for p in (paths[i] for i in at)} == set(CLASSES)  # both classes are timed
    for size in (64, 48):
        want = eval_crops([paths[i] for i in at], size, apt)
        assert seen[size].shape == want.shape
        assert float((seen[size] - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert result.facts["timing_images"] == 4
