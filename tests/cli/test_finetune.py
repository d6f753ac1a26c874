"""finetune / eval end to end on a generated ImageFolder: files, learning, exact resume, DDP, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aptvit.train import finetune

from ..tiny import tiny_hf_config
from .helpers import MODEL, finetune_argv, make_folder, metrics, run
from .helpers import train_config as cfg


def test_finetune_cli_writes_every_file_and_eval_reads_them(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    code, out, err = run(
        capsys,
        "finetune",
        "--model",
        MODEL,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--max-steps",
        "3",
        "--log-every",
        "1",
        "--thresholds",
        "32=6",
    )
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["config.json", "metrics.jsonl", "model.safetensors", "train_state.pt"]
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["global_step"] == 3 and state["batches_in_epoch"] == 3
    train = [m for m in metrics(tmp_path / "run") if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3] and all(0 < m["tokens_kept"] <= 1 for m in train)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["classes"] == ["plain", "stripes"] and config["apt"]["thresholds"] == {"32": 6.0}

    code, out, err = run(
        capsys,
        "eval",
        "--checkpoint",
        tmp_path / "run" / "model.safetensors",
        "--data",
        data / "val",
        "--json",
        tmp_path / "eval.json",
        "--workers",
        "0",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] == 8 and 0 <= result["top1"] <= result["top5"] <= 100
    assert 0 < result["tokens_kept"] <= 1 and result["images_per_s"] > 0 and result["size"] == 32
    assert "top-1" in out


def test_uniform_baseline_eval(tmp_path, capsys):
    import timm

    data = make_folder(tmp_path / "data")
    torch.save(timm.create_model(MODEL, num_classes=2).state_dict(), tmp_path / "timm.pth")
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        MODEL,
        "--checkpoint",
        tmp_path / "timm.pth",
        "--data",
        data,
        "--uniform",
        "--size",
        "32",
        "--workers",
        "0",
        "--json",
        tmp_path / "u.json",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "u.json").read_text())
    assert result["tokens_kept"] == 1.0 and result["uniform"] and result["images"] == 8


def test_loss_falls_on_a_set_the_model_can_memorise(tmp_path):
    data = make_folder(tmp_path / "data", train=4, val=2)
    # random weights, trained from scratch: one lr for every block (layer decay is for a pretrained model)
    finetune(cfg(data, tmp_path / "run", epochs=10, eval=False, lr=3e-4, layer_decay=1.0))
    losses = [m["loss"] for m in metrics(tmp_path / "run") if m["kind"] == "train"]
    assert len(losses) == 20
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs CUDA: exact resume there needs --deterministic"
            ),
        ),
    ],
)
def test_resume_is_exact(tmp_path, device):
    data = make_folder(tmp_path / "data")  # 16 train images, batch 4: 4 steps per epoch
    kw = dict(epochs=2, eval=False, drop_path=0.1, workers=2, device=device, deterministic=device == "cuda")
    finetune(cfg(data, tmp_path / "whole", max_steps=6, **kw))
    finetune(cfg(data, tmp_path / "split", max_steps=2, **kw))  # stop mid-epoch
    finetune(cfg(data, tmp_path / "split", max_steps=6, **kw), resume=True)
    whole = [(m["step"], m["loss"]) for m in metrics(tmp_path / "whole") if m["kind"] == "train"]
    split = [(m["step"], m["loss"]) for m in metrics(tmp_path / "split") if m["kind"] == "train"]
    assert [s for s, _ in split] == [1, 2, 3, 4, 5, 6]  # each step logged once, in order
    assert split == whole
    import aptvit

    a, b = (aptvit.load(tmp_path / d / "model.safetensors") for d in ("whole", "split"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())), (
        "same final weights"
    )


def test_resume_refuses_a_checkpoint_pair_from_different_steps(tmp_path):
    data = make_folder(tmp_path / "data")
    finetune(cfg(data, tmp_path / "run", max_steps=2, eval=False))
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    state["global_step"] = 1
    torch.save(state, tmp_path / "run" / "train_state.pt")
    with pytest.raises(ValueError, match="different steps"):
        finetune(cfg(data, tmp_path / "run", max_steps=4, eval=False), resume=True)


def test_loading_samples_leaves_the_callers_rngs_alone(tmp_path):
    import random

    from aptvit.data import LayoutDataset, build_transform, image_folder

    data = make_folder(tmp_path / "data", train=2, val=1)
    items = image_folder(data / "train")
    dataset = LayoutDataset(items.samples, build_transform(32, True, (0.5,) * 3, (0.5,) * 3), None, seed=3)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = dataset[1][0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert torch.equal(dataset[1][0], a), "the augmentation of a sample is seeded by its index"


def test_eval_layout_options_override_the_checkpoint(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    finetune(cfg(data, tmp_path / "run", max_steps=1, eval=False))
    code, out, err = run(
        capsys,
        "eval",
        "--checkpoint",
        tmp_path / "run" / "model.safetensors",
        "--data",
        data,
        "--budget",
        "0.25",
        "--scorer",
        "laplacian",
        "--workers",
        "0",
        "--json",
        tmp_path / "e.json",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["tokens_kept"] <= 0.25


def test_eval_static_gives_the_dynamic_accuracy_at_exactly_k_tokens(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    finetune(cfg(data, tmp_path / "run", max_steps=1, eval=False))
    results = {}
    for extra in ((), ("--static",)):
        argv = ["eval", "--checkpoint", tmp_path / "run" / "model.safetensors", "--data", data, "--size", "64"]
        code, out, err = run(capsys, *argv, "--budget", "0.3", "--workers", "0", "--json", tmp_path / "e.json", *extra)
        assert code == 0, err
        results[extra] = json.loads((tmp_path / "e.json").read_text())
    dynamic, static = results[()], results[("--static",)]
    assert static["tokens_kept"] == 4 / 16 and dynamic["tokens_kept"] <= 4 / 16  # k = floor(0.3 * 16), padding counted
    assert (static["top1"], static["top5"]) == (dynamic["top1"], dynamic["top5"])


def test_existing_run_dir_without_resume_is_refused(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_text("precious")
    code, out, err = run(
        capsys, "finetune", "--model", MODEL, "--data", data, "--out", tmp_path / "run", "--size", "32"
    )
    assert code == 2 and "exists and is not empty" in err and "--resume" in err
    assert (tmp_path / "run" / "model.safetensors").read_text() == "precious"


def _bad_data(tmp_path, kind):
    data = make_folder(tmp_path / "data")
    if kind == "missing train":
        shutil.rmtree(data / "train")
        (data / "train").mkdir()
    elif kind == "empty class":
        for f in (data / "train" / "plain").iterdir():
            f.unlink()
    elif kind == "classes differ":
        (data / "val" / "stripes").rename(data / "val" / "dots")
    elif kind in ("unreadable", "skip"):
        (data / "train" / "plain" / "0.png").write_text("not a png")
    return data


@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("missing train", [], "has no class folders"),
        ("empty class", [], "no images"),
        ("classes differ", [], "train and val classes differ"),
        ("unreadable", [], "cannot read image .*plain/0.png.*--skip-bad-images"),
        ("checkpoint", ["--checkpoint", "{ckpt}"], "checkpoint does not match the model"),
    ],
)
def test_bad_input_is_one_clear_message(tmp_path, capsys, kind, extra, message):
    import re

    import timm

    data = _bad_data(tmp_path, kind)
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=2).state_dict(), tmp_path / "other.pth")
    extra = [e.format(ckpt=tmp_path / "other.pth") for e in extra]
    code, out, err = run(
        capsys,
        "finetune",
        "--model",
        MODEL,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--size",
        "32",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--max-steps",
        "1",
        "--no-eval",
        *extra,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_skip_bad_images_skips_and_counts(tmp_path, capsys, info_log):
    data = _bad_data(tmp_path, "skip")
    code, out, err = run(
        capsys,
        "finetune",
        "--model",
        MODEL,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--size",
        "32",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--max-steps",
        "1",
        "--no-eval",
        "--skip-bad-images",
    )
    assert code == 0, err
    assert "skipped 1 unreadable image" in info_log.text
    assert metrics(tmp_path / "run")[-1]["bad_images"] == 1


def test_ddp_two_cpu_processes_step_in_sync(tmp_path):
    data = make_folder(tmp_path / "data")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "aptvit",
            "finetune",
            "--model",
            MODEL,
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--size",
            "32",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--max-steps",
            "2",
            "--no-eval",
            "--device",
            "cpu",
        ],  # two CPU processes, whatever GPUs the machine has
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights identical across 2 ranks" in result.stdout
    assert "2 processes" in result.stdout
    assert result.stdout.count("steps per epoch") == 1, result.stdout  # rank 1 logs nothing
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_resume_takes_run_control_options_from_the_command_line(tmp_path, capsys):
    data = _bad_data(tmp_path, "skip")
    base = finetune_argv(data, tmp_path / "run", "--log-every", "1", thresholds=None)
    code, out, err = run(capsys, *base, "--max-steps", "1", "--skip-bad-images")
    assert code == 0, err
    (data / "train" / "stripes" / "1.png").write_text("broken too")
    code, out, err = run(capsys, *base, "--resume", "--max-steps", "2")  # the saved run skips bad images
    assert code == 0, err
    code, out, err = run(capsys, *base[:-2], "--resume", "--epochs", "2")  # no --max-steps: to the end
    assert code == 0, err
    steps = [m["step"] for m in metrics(tmp_path / "run") if m["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 8, steps  # 2 epochs x 4 batches, no step logged twice
    code, out, err = run(capsys, *base, "--resume", "--lr", "1", "--epochs", "3", "--max-steps", "9")
    assert code == 2 and "--lr 1.0 (the run's: 5e-05) cannot change" in err, err  # not run control: refused by name
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 5e-5
    assert metrics(tmp_path / "run")[-1]["lr"] <= 5e-5


def test_finetune_from_a_headless_checkpoint_and_from_an_aptvit_checkpoint_with_other_classes(tmp_path):
    import timm

    import aptvit

    data = make_folder(tmp_path / "data")
    tower = timm.create_model(MODEL, num_classes=0)  # a DINOv2/CLIP-style tower: no head
    torch.save(tower.state_dict(), tmp_path / "tower.pth")
    finetune(cfg(data, tmp_path / "a", checkpoint=str(tmp_path / "tower.pth"), max_steps=1, eval=False))
    ten = aptvit.convert(timm.create_model(MODEL, num_classes=10), budget=0.5)
    aptvit.save(ten, tmp_path / "ten.safetensors")
    finetune(
        cfg(
            data, tmp_path / "b", checkpoint=str(tmp_path / "ten.safetensors"), thresholds=None, max_steps=1, eval=False
        )
    )
    again = aptvit.load(tmp_path / "b" / "model.safetensors")
    assert again.num_classes == 2 and again.config.budget == 0.5  # new head, the checkpoint's own settings


def test_in_run_eval_equals_aptvit_eval_on_the_saved_checkpoint(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    finetune(cfg(data, tmp_path / "run", epochs=1, eval=True))
    in_run = [m for m in metrics(tmp_path / "run") if m["kind"] == "eval"][-1]
    code, out, err = run(
        capsys,
        "eval",
        "--checkpoint",
        tmp_path / "run" / "model.safetensors",
        "--data",
        data,
        "--workers",
        "0",
        "--json",
        tmp_path / "e.json",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["top1"] == in_run["top1"] and result["tokens_kept"] == in_run["tokens_kept"]


def test_eval_refuses_a_model_whose_classes_are_not_the_folders(tmp_path, capsys):
    import timm

    data = make_folder(tmp_path / "data")
    torch.save(timm.create_model(MODEL, num_classes=5).state_dict(), tmp_path / "five.pth")
    code, out, err = run(
        capsys, "eval", "--model", MODEL, "--checkpoint", tmp_path / "five.pth", "--data", data, "--size", "32"
    )
    assert code == 2 and "has 5 classes but" in err and "2 class folders" in err


def test_a_torchrun_process_leaves_its_process_group_at_exit(tmp_path):
    """``setup_distributed`` destroys the process group at exit: a group still alive while the interpreter tears
    down can abort a process whose run succeeded (seen once in the two-process finetune above, under load)."""
    script = tmp_path / "job.py"
    script.write_text(
        "import atexit, os, torch\n"
        "from aptvit.distributed import setup_distributed\n"
        "say = lambda line: os.write(1, (line + '\\n').encode())  # one write: the two processes share the pipe\n"
        "atexit.register(lambda: say(f'group alive at exit: {torch.distributed.is_initialized()}'))\n"
        "dist = setup_distributed('cpu')\n"
        "say(f'rank {dist.rank} of {dist.world}')\n"
    )  # atexit runs last-in first-out: the check registered first runs after setup_distributed's own hook
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("of 2") == 2, result.stdout
    assert result.stdout.count("group alive at exit: False") == 2, result.stdout


def test_a_missing_train_folder_is_named(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    shutil.rmtree(data / "train")
    code, out, err = run(
        capsys, "finetune", "--model", MODEL, "--data", data, "--out", tmp_path / "run", "--size", "32"
    )
    assert code == 2 and "has no train/ folder" in err


def test_finetune_starts_from_an_aptvit_checkpoint_without_model(tmp_path, capsys):
    """An aptvit checkpoint names its model, as ``eval`` and ``calibrate`` read it: ``--model`` is not needed, and a
    saved Hugging Face conversion (architecture "hf:<class>", no timm name) fine-tunes from the command line too."""
    import timm

    import aptvit

    transformers = pytest.importorskip("transformers")
    data = make_folder(tmp_path / "data")
    tower = transformers.CLIPVisionModel(tiny_hf_config(transformers.CLIPVisionConfig, image_size=32))
    sources = {
        "timm": aptvit.convert(timm.create_model(MODEL, num_classes=2, img_size=32)),
        "hf": aptvit.convert(
            tower, image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
        ),
    }
    for name, apt in sources.items():
        path = tmp_path / f"{name}.safetensors"
        aptvit.save(apt, path)
        argv = finetune_argv(data, tmp_path / name, "--max-steps", "2", "--checkpoint", path)
        argv.remove("--model"), argv.remove(MODEL)
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["model"] == apt.pretrained_cfg["architecture"]
        trained = aptvit.load(tmp_path / name / "model.safetensors")
        assert trained.num_classes == 2 and trained.pretrained_cfg["architecture"] == config["model"]
    code, out, err = run(capsys, "finetune", "--out", tmp_path / "hf", "--resume", "--max-steps", "3")
    assert code == 0, err  # the resumed run names its model "hf:CLIPVisionModel", no timm name
    assert [m["step"] for m in metrics(tmp_path / "hf") if m["kind"] == "train"][-1] == 3
