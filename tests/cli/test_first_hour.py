"""A new user's first hour (issue 29): pictures that state what they draw, and messages that help.

Each ``test_item*`` takes one numbered item of the issue; ``MESSAGES`` is the table of one-line errors (argv, exit
code, a regular expression for the line on stderr).
"""

import json
import re

import numpy as np
import pytest
from PIL import Image

import aptvit
from aptvit.cli import main
from aptvit.core.quadtree import default_thresholds
from aptvit.nn.config import APTConfig

from ..tiny import tiny_vit
from .helpers import MODEL, finetune_argv, make_folder, metrics, one_line, run


def noise_png(path, h, w, seed=0):
    """A PNG of random colours: no pixel of it is the figure's white background."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 200, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------- item 1
def test_item1_the_demo_draws_what_its_header_states_on_unpadded_photo_copies(tmp_path, capsys):
    from aptvit.demo import DEMO_PHOTOS
    from aptvit.photos import load_photo

    code, out, err = run(capsys, "demo", "--out", tmp_path, "--layouts-only", "--photo-size", "64")
    assert code == 0, err
    header = re.search(r"patch sizes ([\d/]+), (\w+) scorer, thresholds ([\d=., ]+) ==", out)
    assert header, out
    sizes = [int(s) for s in header[1].split("/")]
    stated = dict(pair.split("=") for pair in header[3].split(", "))
    for name in DEMO_PHOTOS:
        shown = json.loads((tmp_path / f"{name}_apt.json").read_text())
        assert shown["patch_sizes"] == sizes and shown["layout"]["patch_sizes"] == sizes
        assert shown["scorer"] == header[2] == APTConfig.scorer
        assert {k: float(v) for k, v in shown["thresholds"].items()} == {k: float(v) for k, v in stated.items()}
        # the saved copy is the resized photo itself: no black padding strips
        h, w = load_photo(name).shape[-2:]
        with Image.open(tmp_path / f"{name}.png") as im:
            assert (im.height, im.width) == (64, round(w * 64 / h)) if h <= w else (round(h * 64 / w), 64), name


def test_item1_show_json_records_the_thresholds_used(tmp_path, capsys):
    path = noise_png(tmp_path / "a.png", 64, 96)
    code, out, err = run(capsys, "show", path, "--json")
    assert code == 0, err
    shown = json.loads((tmp_path / "a_apt.json").read_text())
    used = default_thresholds((16, 32), APTConfig.scorer)
    assert shown["thresholds"] == {str(k): v for k, v in used.items()} and shown["budget"] is None
    code, out, err = run(capsys, "show", path, "--json", "--thresholds", "32=5,64=3", "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "a_apt.json").read_text())["thresholds"] == {"32": 5.0, "64": 3.0}


def photo_rows(png) -> int:
    """Rows of the picture that are mostly not the white background: the photo's height as drawn."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((pixels < 245).any(-1).mean(1) > 0.8).sum())


def test_item1_the_photo_fills_the_picture_at_its_aspect_and_width_and_dpi_are_options(tmp_path, capsys):
    h, w = 448, 608
    path = noise_png(tmp_path / "wide.png", h, w)
    code, out, err = run(capsys, "show", path)
    assert code == 0, err
    with Image.open(tmp_path / "wide_apt.png") as im:
        width, height = im.size
    assert width == 640  # the default, one panel
    # the photo takes the width (less thin margins) at its own aspect; the title and legend bands are small
    assert photo_rows(tmp_path / "wide_apt.png") >= 0.95 * width * h / w
    assert height <= 1.0 * width * h / w + 2 * 0.62 * 110 + 2
    code, out, err = run(capsys, "show", path, "--heatmap", "--width", "900", "--dpi", "150", "--overwrite")
    assert code == 0, err
    with Image.open(tmp_path / "wide_apt.png") as im:
        assert im.size[0] == 900
    code, out, err = run(capsys, "show", path, "--width", "10")
    assert code == 2 and re.search(r"--width 10 must be", one_line(err)), err


def test_item1_the_base_size_swatch_is_not_white_on_white():
    from matplotlib.colors import to_rgb

    from aptvit.viz import legend_handles

    for handle in legend_handles((16, 32, 64), {16: 1, 32: 2, 64: 3}):
        assert sum(to_rgb(handle.get_edgecolor())) / 3 < 0.5, handle.get_label()


def test_item1_pictures_state_the_scorer_and_budget(tmp_path, capsys, monkeypatch):
    import aptvit.viz

    titles = []
    draw = aptvit.viz.draw_layout
    monkeypatch.setattr(aptvit.viz, "draw_layout", lambda *a, **k: titles.append(k["subtitle"]) or draw(*a, **k))
    path = noise_png(tmp_path / "a.png", 64, 64)
    assert run(capsys, "show", path, "--budget", "0.5", "--scorer", "laplacian")[0] == 0
    assert run(capsys, "show", path, "--thresholds", "32=5", "--overwrite")[0] == 0
    assert titles == [
        "patch sizes 16/32, laplacian scorer, budget 0.5 of the base tokens",
        f"patch sizes 16/32, {APTConfig.scorer} scorer, thresholds 32=5",
    ]


# ---------------------------------------------------------------------------------------------- the one-line table
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, a good two-class aptvit checkpoint, one with other class names, a JPEG and an image that is no image."""
    root = tmp_path_factory.mktemp("first_hour")
    data = make_folder(root / "data", train=2, val=1)
    model = aptvit.convert(tiny_vit("vit_cls", num_classes=2), thresholds={32: 6.0})
    aptvit.save(model, root / "good.safetensors", extra_metadata={"classes": json.dumps(["plain", "stripes"])})
    aptvit.save(model, root / "cats.safetensors", extra_metadata={"classes": json.dumps(["cat", "stripes"])})
    Image.open(data / "val" / "plain" / "0.png").convert("RGB").save(root / "photo.jpg")
    (root / "fake.jpg").write_text("not an image")
    return root


MESSAGES = [
    # item 7: a missing checkpoint, a JPEG as a checkpoint, --static in the command line's words, class names
    (
        ["eval", "--checkpoint", "{root}/nope.safetensors", "--data", "{root}/data"],
        r"'[^']*nope\.safetensors' does not exist$",
    ),
    (
        ["eval", "--model", MODEL, "--checkpoint", "{root}/photo.jpg", "--data", "{root}/data"],
        r"photo\.jpg' is a JPEG image: give a \.safetensors file or weights saved with torch\.save",
    ),
    (["bench", "--model", MODEL, "--static", "--size", "32"], r"--static needs a token budget .*give --budget 0\.5"),
    (
        ["eval", "--checkpoint", "{root}/good.safetensors", "--data", "{root}/data", "--static", "--size", "32"],
        r"--static needs a token budget.*good\.safetensors has none",
    ),
    (
        ["eval", "--checkpoint", "{root}/cats.safetensors", "--data", "{root}/data", "--size", "32"],
        r"only in the checkpoint: cat; only in .*val: plain",
    ),
    # item 3: the size against the model's patch, before any loader worker
    (
        ["eval", "--checkpoint", "{root}/good.safetensors", "--data", "{root}/data", "--size", "230"],
        r"--size 230 is not a multiple of the patch size 16 .*use 224 or 240",
    ),
    # item 4: a new run names what it needs, --resume needs only --out
    (["finetune", "--out", "{root}/run"], r"--model \(or an aptvit --checkpoint\) and --data are needed for a new run \(--resume needs only --out\)"),
    (["finetune", "--resume", "--out", "{root}/run"], r"--resume: .*run' is not a run directory"),
]


@pytest.mark.parametrize("argv, pattern", MESSAGES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in MESSAGES])
def test_item7_one_line_messages(world, capsys, argv, pattern):
    code, out, err = run(capsys, *[a.format(root=world) for a in argv])
    assert code == 2 and re.search(pattern, one_line(err)), err


def test_item7_show_checks_every_image_before_writing_any(world, tmp_path, capsys):
    code, out, err = run(capsys, "show", world / "photo.jpg", world / "fake.jpg", "--out", tmp_path)
    assert code == 2 and re.search(r"cannot read image .*fake\.jpg", one_line(err)), err
    assert list(tmp_path.iterdir()) == [] and "photo.jpg" not in out


def test_item7_debug_is_accepted_after_the_command(world, capsys):
    from aptvit.core.io import UserError

    with pytest.raises(UserError, match="fake.jpg"):
        main(["show", str(world / "fake.jpg"), "--debug"])
    assert run(capsys, "show", world / "fake.jpg")[0] == 2  # the default stays off


@pytest.fixture
def hub_out_of_reach(tmp_path, monkeypatch):
    """No model hub and an empty cache: the hub library would retry for about a minute and a half."""
    from huggingface_hub import constants

    import aptvit.models

    monkeypatch.setattr(aptvit.models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_item7_pretrained_without_the_hub_fails_at_once_in_one_line(world, capsys, hub_out_of_reach):
    code, out, err = run(capsys, "eval", "--model", MODEL, "--pretrained", "--data", world / "data", "--size", "32")
    assert code == 2 and "Retrying" not in err, err
    assert re.search(
        rf"could not load pretrained weights for {MODEL} \(the model hub cannot be reached .*\); use --checkpoint",
        one_line(err),
    )
    argv = ["eval", "--checkpoint", world / "good.safetensors", "--data", world / "data", "--size", "32"]
    code, out, err = run(capsys, *argv, "--teacher", MODEL, "--workers", "0")
    assert code == 2 and re.search(r"give --teacher a local file", one_line(err)) and "--checkpoint" not in err, err


def test_item7_the_hub_probe_says_no_for_a_closed_port(monkeypatch):
    from huggingface_hub import constants

    from aptvit.models import hub_reachable

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert hub_reachable(timeout=1.0) is False


# ---------------------------------------------------------------------------------------------- item 3
def _refuse(crop):
    from aptvit.core.io import InputError

    raise InputError("layout: this crop is refused")


def test_item3_a_user_error_in_a_loader_worker_keeps_its_message(world):
    from aptvit.core.io import InputError
    from aptvit.data import LayoutDataset, ShardedSampler, build_transform, make_loader

    dataset = LayoutDataset(
        [(str(world / "photo.jpg"), 0)], build_transform(32, False, (0.5,) * 3, (0.5,) * 3), _refuse
    )
    loader = make_loader(dataset, ShardedSampler(1, shuffle=False), 1, workers=1, drop_last=False)
    with pytest.raises(InputError) as e:
        next(iter(loader))
    assert str(e.value) == "layout: this crop is refused"


# ---------------------------------------------------------------------------------------------- items 4, 6, 8
def test_item4_6_8_resume_with_out_only_and_the_terminal_sees_the_loss(tmp_path, capsys):
    data = make_folder(tmp_path / "data", train=2, val=1)  # 4 images, batches of 4: 1 step per epoch
    code, out, err = run(capsys, *finetune_argv(data, tmp_path / "run", "--log-every", "1", evaluate=True))
    assert code == 0, err
    assert re.search(r"^epoch 1/1 step 1/1: loss \d+\.\d{4}, lr ", out, re.M), out  # item 6
    assert "1 step per epoch" in out and "2 classes" in out and "1 steps" not in out  # item 8
    # item 4: only --out (and what changes): the run's --model, --data, sizes and settings stay
    code, out, err = run(capsys, "finetune", "--resume", "--out", tmp_path / "run", "--epochs", "2", "--workers", "0")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["epochs"] == 2 and config["model"] == MODEL
    # item 8: train and eval lines count epochs the same way (from 1)
    assert [(m["kind"], m["epoch"], m["step"]) for m in metrics(tmp_path / "run")] == [
        ("train", 1, 1),
        ("eval", 1, 1),
        ("train", 2, 2),
        ("eval", 2, 2),
    ]
    code, out, err = run(capsys, "finetune", "--resume", "--out", tmp_path / "run", "--workers", "0")
    assert code == 0 and len(metrics(tmp_path / "run")) == 4, err  # nothing left to do: config.json said 2 epochs


def test_item6_distill_without_val_prints_the_loss(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        noise_png(folder / f"{i}.png", 40, 40, seed=i)
    source = tmp_path / "source.safetensors"
    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=2), thresholds={32: 6.0}), source)
    argv = ["finetune", "--model", MODEL, "--checkpoint", source, "--data", folder, "--out", tmp_path / "run"]
    code, out, err = run(capsys, *argv, "--distill", "--size", "32", "--batch-size", "4", "--workers", "0")
    assert code == 0, err
    assert re.search(r"step 1/1: loss \d+\.\d{4}", out), out


def test_item8_help_and_defaults():
    from aptvit.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for command, options in {
        "bench": ("--model", "--runs", "--warmup"),
        "eval": ("--pretrained", "--batch-size", "--workers", "--skip-bad-images"),
        "calibrate": (
            "--pretrained", "--batch-size", "--workers", "--timing-images", "--runs", "--warmup", "--skip-bad-images"
        ),
    }.items():
        actions = {a.option_strings[0]: a for a in commands[command]._actions if a.option_strings}
        for option in options:
            text = actions[option].help or ""
            assert len(text) > 10, (command, option)
            assert actions[option].nargs == 0 or "default" in text, (command, option, text)
    actions = {a.option_strings[0]: a for a in commands["finetune"]._actions if a.option_strings}
    assert actions["--no-eval"].help.startswith("skip the evaluation")


def test_item8_every_command_reads_the_same_image_files(tmp_path):
    from aptvit.data import image_files, image_folder
    from aptvit.images import IMAGE_SUFFIXES, list_images

    folder = tmp_path / "c"
    folder.mkdir()
    for suffix in sorted(IMAGE_SUFFIXES):
        (folder / f"x{suffix}").write_bytes(b"")
    (folder / "notes.txt").write_text("")
    names = {p.name for p in list_images(folder)}
    assert names == {f"x{s}" for s in IMAGE_SUFFIXES}  # bench --images
    assert {p[0].split("/")[-1] for p in image_files(folder)} == names  # --distill, eval --teacher
    assert {p[0].split("/")[-1] for p in image_folder(tmp_path).samples} == names  # finetune, eval


def test_item8_plurals():
    from aptvit.evaluate import count

    assert [count(1, "class"), count(2, "class"), count(1, "step"), count(0, "step")] == [
        "1 class",
        "2 classes",
        "1 step",
        "0 steps",
    ]


def test_item8_eval_prints_kl_and_its_default_workers_fit_the_machine(world, capsys, recwarn):
    import os

    from aptvit.evaluate import default_workers

    assert 0 <= default_workers() < max(2, len(os.sched_getaffinity(0)))
    code, out, err = run(
        capsys,
        "eval",
        "--checkpoint",
        world / "good.safetensors",
        "--data",
        world / "data",
        "--size",
        "32",
        "--teacher",
        "uniform",
    )
    assert code == 0, err
    assert re.search(r"KL \d+\.\d{4}", out), out
    assert not [w for w in recwarn if "worker" in str(w.message)], [str(w.message) for w in recwarn]
