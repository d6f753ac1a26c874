"""Hostile and careless input (issue 11): no silent success, no stuck run folders, one clear line for every failure.

``test_one_line_errors`` is the table: an argv, the exit code, a regular expression for the one line on stderr.
The ``test_item*`` functions take the numbered items of the issue one by one.
"""

import json
import os
import re
import struct
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aptvit
from aptvit.cli import main
from aptvit.distributed import Dist

from ..tiny import tiny_vit
from .helpers import MODEL, finetune_argv, make_folder, one_line, run


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` (1-bit gray) with tiny compressed data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def with_metadata(src: Path, dst: Path, **changes) -> Path:
    """A copy of a safetensors file with metadata entries changed (None: removed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, a good two-class aptvit checkpoint and a collection of broken and hostile files."""
    root = tmp_path_factory.mktemp("world")
    data = make_folder(root / "data", train=4, val=2)
    good = root / "good.safetensors"
    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=2), thresholds={32: 6.0}), good)
    blob = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    torch.save(tiny_vit("vit_cls").state_dict(), root / "weights.pth")
    (root / "renamed.safetensors").write_bytes((root / "weights.pth").read_bytes())
    with_metadata(good, root / "nometa.safetensors", aptvit=None)
    args = json.loads(aptvit.nn.checkpoint.read_metadata(good)["timm_args"])
    with_metadata(
        good,
        root / "checkpoint_path.safetensors",
        timm_args=json.dumps({**args, "checkpoint_path": str(root / "weights.pth")}),
    )
    with_metadata(good, root / "huge.safetensors", timm_args=json.dumps({**args, "img_size": [100000, 100000]}))
    png_header_only(root / "bomb.png", 20000, 20000)
    (root / "adir").mkdir()
    os.symlink(root / "loop.png", root / "loop.png")
    (img,) = [data / "val" / "plain" / "0.png"]
    Image.open(img).convert("RGB").save(root / "a.png")
    return {"root": root, "data": data, "good": good, "img": root / "a.png"}


TABLE = [
    # item 4: a silently ignored size
    (["eval", "--checkpoint", "{root}/good.safetensors", "--data", "{data}", "--size", "0"], 2, r"--size 0 .*must be"),
    # item 5: every failure one line with exit 2
    (
        ["eval", "--checkpoint", "{root}/truncated.safetensors", "--data", "{data}"],
        2,
        r"cannot read checkpoint .*truncated\.safetensors",
    ),
    (
        ["eval", "--checkpoint", "{root}/renamed.safetensors", "--data", "{data}"],
        2,
        r"cannot read checkpoint .*renamed\.safetensors",
    ),
    (["eval", "--checkpoint", "{root}/nometa.safetensors", "--data", "{data}"], 2, r"nometa\.safetensors.*'aptvit'"),
    (["eval", "--checkpoint", "{root}/adir", "--data", "{data}"], 2, r"adir.* is a directory"),
    (
        ["eval", "--checkpoint", "{root}/good.safetensors", "--data", "{data}", "--json", "{root}/adir"],
        2,
        r"cannot write .*adir.*is a directory",
    ),
    (["show", "{root}/bomb.png"], 2, r"bomb\.png.*pixels"),
    (
        ["finetune", "--model", MODEL, "--data", "{data}", "--out", "{root}/aug", "--augment", "bogus"],
        2,
        r"--augment 'bogus'",
    ),
    # item 6: sizes against the documented limit, metadata keys against an allow-list
    (
        ["eval", "--checkpoint", "{root}/good.safetensors", "--data", "{data}", "--size", "100000"],
        2,
        r"--size 100000 .*limit",
    ),
    (["show", "{img}", "--size", "100000"], 2, r"--size 100000 .*limit"),
    (["bench", "--model", MODEL, "--size", "100000"], 2, r"--size 100000 .*limit"),
    (
        ["eval", "--checkpoint", "{root}/checkpoint_path.safetensors", "--data", "{data}"],
        2,
        r"timm_args.*checkpoint_path",
    ),
    (["eval", "--checkpoint", "{root}/huge.safetensors", "--data", "{data}"], 2, r"img_size .*limit"),
    # item 7: messages that say what is wrong
    (["show", "{root}/adir"], 2, r"adir' is a directory"),
    (["show", "{root}/loop.png"], 2, r"loop\.png' is a symbolic link loop"),
    (["bench", "--model", MODEL, "--images", "{img}"], 2, r"--images .*a\.png' is a file, not a folder"),
    (["bench", "--model", MODEL, "--size", "0"], 2, r"--size 0 .*must be"),
    (["bench", "--model", "resnet18"], 2, r"resnet18 is not a supported ViT"),
    (["show", "{img}", "--thresholds", "32=5,32=1"], 2, r"--thresholds .*32 more than once"),
]


@pytest.mark.parametrize("argv, code, pattern", TABLE, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in TABLE])
def test_one_line_errors(world, capsys, argv, code, pattern):
    argv = [a.format(root=world["root"], data=world["data"], img=world["img"]) for a in argv]
    got, out, err = run(capsys, *argv)
    assert got == code, err
    assert re.search(pattern, one_line(err)), err


# ---------------------------------------------------------------------------------------------- item 1
def _set(argv, option, value):
    """``argv`` with ``option`` set to ``value`` (replaced when present, appended otherwise)."""
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
        return argv
    return argv + [option, value]


def test_item1_resume_refuses_changed_settings_by_name_and_runs_from_anywhere(tmp_path, capsys, monkeypatch):
    make_folder(tmp_path / "data", train=4, val=2)
    monkeypatch.chdir(tmp_path)
    base = finetune_argv("data", "run", "--lr", "1e-3")
    code, out, err = run(capsys, *base, "--max-steps", "1")
    assert code == 0, err
    config = (tmp_path / "run" / "config.json").read_text()
    assert json.loads(config)["data"] == str(tmp_path / "data")  # absolute: the run resumes from anywhere
    for option, value in (
        ("--model", "deit_tiny_patch16_224"),
        ("--data", "/nonexistent"),
        ("--size", "64"),
        ("--lr", "1"),
        ("--batch-size", "2"),
        ("--thresholds", "32=5"),
        ("--dtype", "bf16"),
    ):
        code, out, err = run(capsys, *_set(base, option, value), "--resume")
        assert code == 2, (option, err)
        assert re.search(f"{option} .*cannot change", one_line(err)), err
    assert (tmp_path / "run" / "config.json").read_text() == config
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # only what was given counts: --size, --lr, ... left out keep the run's own; run control may change
    code, out, err = run(
        capsys,
        "finetune",
        "--model",
        MODEL,
        "--data",
        tmp_path / "data",
        "--out",
        tmp_path / "run",
        "--resume",
        "--max-steps",
        "2",
        "--workers",
        "0",
        "--log-every",
        "1",
    )
    assert code == 0, err
    assert [m["step"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())][-1] == 2


# ---------------------------------------------------------------------------------------------- item 2
def _strict_json(line: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def test_item2_a_diverged_run_fails_keeps_the_last_good_checkpoint_and_eval_refuses_nan(tmp_path, capsys):
    from safetensors.torch import load_file

    from aptvit.train import DivergedError, Run, TrainState

    data = make_folder(tmp_path / "data", train=16, val=2)  # 8 steps per epoch
    argv = finetune_argv(data, tmp_path / "run", "--log-every", "1")
    code, out, err = run(capsys, *argv, "--max-steps", "1")
    assert code == 0, err
    good = load_file(str(tmp_path / "run" / "model.safetensors"))
    code, out, err = run(capsys, *argv, "--resume", "--max-steps", "8")
    assert code == 0, err
    # a learning rate of 1e4 gives a NaN loss within a few steps (weight decay alone multiplies every weight by -499):
    # the run stops at that step, before its update, and long before the epoch's end would save the NaN weights
    code, out, err = run(capsys, *_set(argv, "--out", tmp_path / "diverged"), "--lr", "1e4")
    assert code == 2 and re.search(
        r"step [2-7]: the loss is (nan|inf): the run diverged .*no checkpoint was written", one_line(err)
    ), err
    for line in (tmp_path / "diverged" / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)  # valid JSON, no bare NaN
    # a checkpoint of weights that are no longer finite is refused; the good one on disk stays
    model = aptvit.convert(tiny_vit("vit_cls", num_classes=2), thresholds={32: 6.0})
    with torch.no_grad():
        model.timm_model.head.weight.fill_(float("nan"))
    folder = Run(tmp_path / "run", main=True)
    folder.saved_step = 8
    with pytest.raises(DivergedError, match="weights hold nan or inf.*last good checkpoint \\(step 8\\)"):
        TrainState(epoch=1, batches_in_epoch=0, global_step=9).save(
            folder, model, torch.optim.SGD(model.parameters(), lr=1.0), cfg_for(data, tmp_path / "run"), Dist()
        )
    assert load_file(str(tmp_path / "run" / "model.safetensors")).keys() == good.keys()
    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(tmp_path / "run" / "model.safetensors")).values())
    code, out, err = run(capsys, *_set(argv, "--out", tmp_path / "inf"), "--lr", "inf")
    assert code == 2 and "--lr" in one_line(err) and not (tmp_path / "inf").exists()
    # eval refuses non-finite weights
    aptvit.save(model, tmp_path / "nan.safetensors")
    code, out, err = run(
        capsys, "eval", "--checkpoint", tmp_path / "nan.safetensors", "--data", data, "--size", "32", "--workers", "0"
    )
    assert code == 2 and re.search(r"nan\.safetensors.*non-finite", one_line(err)), err
    assert "top-1" not in out


def cfg_for(data, out):
    from aptvit.train import TrainConfig

    return TrainConfig(model=MODEL, data=str(data), out=str(out), size=32, device="cpu")


# ---------------------------------------------------------------------------------------------- item 3
def test_item3_a_failed_start_leaves_a_restartable_folder(tmp_path, capsys):
    data = make_folder(tmp_path / "data", train=4, val=2)
    argv = finetune_argv(data, tmp_path / "run", "--max-steps", "1")
    # an impossible budget is found before anything is written
    code, out, err = run(capsys, *argv[:6], tmp_path / "budget", *argv[7:-4], "--patch-sizes", "16", "--budget", "1")
    assert code == 2 and "budget" in one_line(err) and not (tmp_path / "budget").exists(), err
    # a bad image found after the start: the same command runs again once the image is fixed
    good = (data / "train" / "plain" / "0.png").read_bytes()
    for i in range(4):
        (data / "train" / "plain" / f"{i}.png").write_text("not a png")
    code, out, err = run(capsys, *argv)
    assert code == 2 and "cannot read image" in one_line(err)
    for i in range(4):
        (data / "train" / "plain" / f"{i}.png").write_bytes(good)
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    # --resume of a folder without a checkpoint starts from the beginning; a kill's temporaries are removed
    for name in ("model.safetensors", "train_state.pt"):
        (tmp_path / "run" / name).unlink()
    orphan = tmp_path / "run" / ".model.safetensors.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    code, out, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "metrics.jsonl",
        "model.safetensors",
        "train_state.pt",
    ]


# ---------------------------------------------------------------------------------------------- item 4
def test_item4_sixteen_bit_and_transparent_images_read_the_same_in_show_and_in_training(tmp_path):
    from aptvit.data import LayoutDataset, build_transform
    from aptvit.images import read_image

    gray16 = np.full((32, 32), 0x4000, dtype=np.uint16)  # a quarter of the 16-bit range: dark gray, not white
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode.startswith("I")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:16] = (200, 10, 10, 255)  # top half opaque red, bottom half fully transparent (black underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert int(read_image(tmp_path / "gray16.png").float().mean()) in (63, 64)
    transform = build_transform(32, False, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)
    for name in ("gray16.png", "rgba.png"):
        crop = LayoutDataset([(str(tmp_path / name), 0)], transform, None)[0][0]
        assert torch.equal(crop, read_image(tmp_path / name)), name


def test_item4_eval_counts_what_it_evaluated_and_show_keeps_every_picture(tmp_path, capsys):
    data = make_folder(tmp_path / "data", train=1, val=2)
    model = aptvit.convert(tiny_vit("vit_cls", num_classes=2), thresholds={32: 6.0})
    aptvit.save(model, tmp_path / "m.safetensors")
    (data / "val" / "plain" / "0.png").write_text("broken")
    code, out, err = run(
        capsys,
        "eval",
        "--checkpoint",
        tmp_path / "m.safetensors",
        "--data",
        data,
        "--size",
        "32",
        "--workers",
        "0",
        "--skip-bad-images",
    )
    assert code == 0, err
    assert "3 images" in out and "1 unreadable image skipped" in out, out
    img = data / "val" / "stripes" / "0.png"
    Image.open(img).save(tmp_path / "a.png")
    Image.open(img).convert("RGB").save(tmp_path / "a.jpg")
    code, out, err = run(capsys, "show", tmp_path / "a.png", tmp_path / "a.jpg", "--out", tmp_path / "shown")
    assert code == 0, err
    assert len(list((tmp_path / "shown").glob("*.png"))) == 2


def test_item4_an_evaluation_that_failed_at_an_epoch_end_is_redone_on_resume(tmp_path, capsys, info_log):
    data = make_folder(tmp_path / "data", train=2, val=1)
    good = (data / "val" / "plain" / "0.png").read_bytes()
    (data / "val" / "plain" / "0.png").write_text("broken")
    argv = finetune_argv(data, tmp_path / "run", evaluate=True)
    code, out, err = run(capsys, *argv)
    assert code == 2 and "cannot read image" in one_line(err)
    (data / "val" / "plain" / "0.png").write_bytes(good)
    code, out, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    evals = [
        m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "eval"
    ]
    assert [m["epoch"] for m in evals] == [1] and "top-1" in info_log.text


# ---------------------------------------------------------------------------------------------- item 5
@contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A small tmpfs at ``path`` (root only); always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_item5_file_failures_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    data = make_folder(tmp_path / "data", train=4, val=2)
    argv = finetune_argv(data, tmp_path / "run", "--max-steps", "1")
    assert run(capsys, *argv)[0] == 0
    blob = (tmp_path / "run" / "model.safetensors").read_bytes()
    (tmp_path / "run" / "model.safetensors").write_bytes(blob[:1000])
    code, out, err = run(capsys, *argv, "--resume", "--max-steps", "2")
    assert code == 2 and re.search(r"cannot read checkpoint .*model\.safetensors", one_line(err)), err

    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=2), thresholds={32: 6.0}), tmp_path / "m.safetensors")
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        code, out, err = run(
            capsys,
            "eval",
            "--checkpoint",
            tmp_path / "m.safetensors",
            "--data",
            data,
            "--size",
            "32",
            "--workers",
            "0",
            "--json",
            ro / "e.json",
        )
        assert code == 2 and re.search(r"cannot write .*e\.json.*read-only", one_line(err)), err
        assert "top-1" not in out  # refused before the work, not after it
        code, out, err = run(
            capsys, "bench", "--model", MODEL, "--size", "32", "--batch", "1", "--runs", "1", "--out", ro / "b.json"
        )
        assert code == 2 and re.search(r"cannot write .*b\.json.*read-only", one_line(err)), err
    with tmpfs(tmp_path / "full", "256k") as full:
        code, out, err = run(capsys, *argv[:6], full / "run", *argv[7:])
        assert code == 2 and re.search(r"cannot write .*full/run.*no space left on device", one_line(err)), err

    # a bug (an error raised outside aptvit's own checks) is not dressed up as a user error
    monkeypatch.setattr("aptvit.viz.show", lambda *a, **k: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):
        main(["show", str(tmp_path / "whatever.png")])


# ---------------------------------------------------------------------------------------------- item 6
def test_item6_hostile_metadata_and_sizes_are_refused_before_allocating(world, monkeypatch):
    import timm

    calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k) or pytest.fail("allocated"))
    for name, pattern in (("checkpoint_path", "checkpoint_path"), ("huge", "img_size")):
        with pytest.raises(ValueError, match=pattern):
            aptvit.load(world["root"] / f"{name}.safetensors")
    assert calls == []
    from aptvit.images import MAX_SIDE, check_side

    assert MAX_SIDE >= 4096 and check_side(MAX_SIDE, "--size") == MAX_SIDE
    with pytest.raises(ValueError, match="limit"):
        check_side(MAX_SIDE + 1, "--size")


# ---------------------------------------------------------------------------------------------- item 7
def test_item7_messages_say_what_is_wrong(world, tmp_path, capsys):
    from aptvit.core.quadtree import patch_layout

    # malformed run files name the file
    data = make_folder(tmp_path / "data", train=4, val=2)
    argv = finetune_argv(data, tmp_path / "run", "--max-steps", "1")
    assert run(capsys, *argv)[0] == 0
    (tmp_path / "run" / "config.json").write_text("{not json")
    code, out, err = run(capsys, *argv, "--resume")
    assert code == 2 and re.search(r"config\.json", one_line(err)), err
    # numpy scalars are numbers
    img = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    assert patch_layout(img, budget=np.int64(8)).total_tokens <= 8
    assert patch_layout(img, budget=np.float32(0.5)).total_tokens <= 8
    assert patch_layout(img, thresholds={np.int64(32): np.float32(100.0)}).total_tokens == 4
    model = aptvit.convert(tiny_vit("vit_cls"), budget=np.float32(0.5))
    aptvit.save(model, tmp_path / "np.safetensors")
    assert aptvit.load(tmp_path / "np.safetensors").config.budget == 0.5
