"""Every command through the CLI's entry point, on small inputs: files written, numbers consistent, errors one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from aptvit.cli import main
from aptvit.core.layout import PatchLayout

from ..conftest import photo
from ..tiny import tiny_vit


def write_images(folder, size=(96, 128)):
    """RGB, grayscale, RGBA and palette PNGs made from real photos."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo("coffee", size)[0].permute(1, 2, 0).numpy()
    paths = []
    for mode in ("RGB", "L", "RGBA", "P"):
        img = Image.fromarray(rgb).convert(mode)
        path = folder / f"coffee_{mode}.png"
        img.save(path)
        paths.append(path)
    return paths


def run(capsys, *argv):
    argv = [str(a) for a in argv]
    if argv and argv[0] == "bench":
        argv += ["--device", "cpu"]  # these tests mean the CPU, whatever the machine has
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "aptvit 0.2.0" in capsys.readouterr().out
    code, out, _ = run(capsys)
    assert code == 0 and all(c in out for c in ("show", "bench", "demo"))


def test_show_writes_valid_pngs_and_consistent_json(tmp_path, capsys):
    paths = write_images(tmp_path / "in")
    code, out, err = run(capsys, "show", *paths, "--size", "100", "--out", tmp_path / "out", "--json", "--heatmap")
    assert code == 0, err
    lines = [l for l in out.splitlines() if "tokens" in l]
    assert len(lines) == 4 and all("%" in l and "padded" in l for l in lines)  # 100 px is padded to 112
    for path in paths:
        png = tmp_path / "out" / f"{path.stem}_apt.png"
        with Image.open(png) as im:
            im.verify()
        data = json.loads((tmp_path / "out" / f"{path.stem}_apt.json").read_text())
        assert (
            data["height"] % 16 == 0 and data["width"] % 16 == 0 and data["padding_bottom"] + data["padding_right"] > 0
        )
        assert 0 < data["tokens"] <= data["base_tokens"] == (data["height"] // 16) * (data["width"] // 16)
        assert sum(data["counts"].values()) == data["tokens"]
        layout = PatchLayout.from_dict(data["layout"])  # validates the exact tiling
        assert layout.total_tokens == data["tokens"]


def test_show_budget_and_scorers_beside_the_image(tmp_path, capsys):
    (path,) = write_images(tmp_path)[:1]
    for scorer in ("laplacian", "upsample"):
        code, out, err = run(capsys, "show", path, "--budget", "0.5", "--scorer", scorer, "--json", "--overwrite")
        assert code == 0, err
        data = json.loads((tmp_path / f"{path.stem}_apt.json").read_text())
        assert data["tokens"] <= data["base_tokens"] // 2 and data["scorer"] == scorer
    assert (tmp_path / f"{path.stem}_apt.png").is_file()


def test_show_draws_the_sizes_a_conversion_would_use(tmp_path, capsys):
    (path,) = write_images(tmp_path)[:1]
    for extra, sizes in [
        ([], (16, 32)),
        (["--thresholds", "32=5,64=4"], (16, 32, 64)),
        (["--patch-sizes", "16,64"], (16, 64)),
    ]:
        code, out, err = run(capsys, "show", path, "--json", "--overwrite", *extra)
        assert code == 0, err
        data = json.loads((tmp_path / f"{path.stem}_apt.json").read_text())
        assert PatchLayout.from_dict(data["layout"]).patch_sizes == sizes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "{tmp}/missing.png"], "missing.png' does not exist"),
        (["show", "{tmp}/broken.png"], "cannot read image '.*broken.png'"),
        (["show", "{img}", "--thresholds", "32:5.5"], "is not SIZE=VALUE"),
        (["show", "{img}", "--size", "100x64"], "not a multiple of the base patch size 16"),
        (["show", "{img}", "--thresholds", "48=1"], "not a non-base patch size"),
        (["bench", "--model", "vit_tiny_patch16_22"], "closest timm names: vit_tiny_patch16_224"),
        (["bench", "--model", "vit_tiny_patch16_224", "--size", "100"], "not a multiple of the base patch size 16"),
        (
            ["bench", "--model", "vit_tiny_patch16_224", "--checkpoint", "{tmp}/other.pth"],
            "checkpoint does not match the model; missing: blocks",
        ),
        (["bench", "--model", "vit_tiny_patch16_224", "--images", "{tmp}/empty"], "no images"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    torch.save(tiny_vit("vit_cls").state_dict(), tmp_path / "other.pth")
    (img,) = write_images(tmp_path / "imgs")[:1]
    argv = [a.format(tmp=tmp_path, img=img) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "show", str(tmp_path / "missing.png")])


def test_bench_writes_json_and_plot(tmp_path, capsys):
    write_images(tmp_path / "imgs", size=(80, 80))
    code, out, err = run(
        capsys,
        "bench",
        "--model",
        "vit_tiny_patch16_224",
        "--size",
        "64,64x96",
        "--batch",
        "1,2",
        "--images",
        tmp_path / "imgs",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--out",
        tmp_path / "r.json",
        "--plot",
        tmp_path / "b.png",
        "--thresholds",
        "32=6,64=5",
    )
    assert code == 0, err
    assert "random" in out and "| vit_tiny_patch16_224 |" in out
    assert "bench:" not in err  # a run under a minute prints no progress line off a terminal (aptvit.progress)
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 4
    for r in rows:
        assert 0 < r["tokens"] <= r["base_tokens"] and r["kept"] <= 1
        assert r["flop_ratio"] > 0 and r["timm_ms"] > 0 and r["apt_ms"] > 0  # the bank can outweigh few merges at 64 px
        assert r["speedup"] == pytest.approx(r["timm_ms"] / r["apt_ms"]) and r["efficiency"] == pytest.approx(
            r["speedup"] / r["flop_ratio"]
        )
    assert {r["size"] for r in rows} == {"64x64", "64x96"} and {r["batch"] for r in rows} == {1, 2}
    with Image.open(tmp_path / "b.png") as im:
        im.verify()


def test_bench_loads_timm_and_aptvit_checkpoints(tmp_path, capsys):
    import timm

    import aptvit

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save({"model": model.state_dict()}, tmp_path / "timm.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=7).state_dict(), tmp_path / "finetuned.pth")
    aptvit.save(aptvit.convert(model, budget=0.5), tmp_path / "apt.safetensors")
    write_images(tmp_path / "imgs", size=(64, 64))
    for ckpt in ("timm.pth", "finetuned.pth", "apt.safetensors"):
        code, out, err = run(
            capsys,
            "bench",
            "--model",
            "vit_tiny_patch16_224",
            "--size",
            "64",
            "--batch",
            "1",
            "--images",
            tmp_path / "imgs",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--checkpoint",
            tmp_path / ckpt,
        )
        assert code == 0, err
        assert f"weights: {tmp_path / ckpt}" in out
    assert "budget 0.5" in out  # the aptvit file brought its own settings


def test_pretrained_without_network_is_a_clear_error(tmp_path):
    # a subprocess, so that the hub library reads HF_HUB_OFFLINE at import and fails at once; an empty cache of
    # its own, so that a machine whose cache already holds the weights still sees the failure
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        TORCH_HOME=str(tmp_path / "torch"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "aptvit", "bench", "--model", "vit_tiny_patch16_224", "--pretrained", "--size", "64"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "could not load pretrained weights for vit_tiny_patch16_224" in result.stderr
        and "--checkpoint" in result.stderr
    )


def test_demo_draws_and_benchmarks(tmp_path, capsys):
    code, out, err = run(
        capsys, "demo", "--out", tmp_path / "demo", "--model", "vit_tiny_patch16_224", "--size", "64", "--runs", "1"
    )
    assert code == 0, err
    pictures = sorted((tmp_path / "demo").glob("*_apt.png"))
    assert len(pictures) == 5 and str((tmp_path / "demo").resolve()) in out
    for png in pictures:
        with Image.open(png) as im:
            im.verify()
    assert json.loads((tmp_path / "demo" / "bench.json").read_text())["rows"]
    assert "settings: patch sizes 16/32/64, entropy scorer" in out  # the sizes its pictures show
    assert "how to read: speedup = timm ms / APT ms" in out and "--runs 20 on an idle machine" in out


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "aptvit", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "aptvit" in result.stdout


def test_alternating_medians_alternate_the_order_and_skip_warmup():
    from aptvit.bench import alternating_medians

    calls = []
    runs = []
    result = alternating_medians(
        {"a": lambda c: calls.append("a"), "b": lambda c: calls.append("b")},
        [torch.zeros(1)],
        runs=3,
        warmup=1,
        on_run=lambda: runs.append(len(calls)),
    )
    assert set(result) == {"a", "b"} and all(v >= 0 for v in result.values())
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then runs in alternating order
    assert runs == [4, 6, 8]


def test_alternating_medians_read_the_clock_they_are_given():
    """``clock=`` (e.g. ``time.thread_time`` on a shared machine): medians of its differences, not wall time."""
    from aptvit.bench import alternating_medians

    steps = {"a": 2, "b": 5}  # seconds each call of a / b advances the fake clock
    now = [0.0]

    def clock():
        return now[0]

    def fn(name):
        def run(c):
            now[0] += steps[name]

        return run

    result = alternating_medians({n: fn(n) for n in steps}, [0, 1], runs=3, warmup=1, clock=clock)
    assert result == {"a": 4.0, "b": 10.0}  # two chunks per run


def test_bench_and_eval_take_static(tmp_path, capsys):
    """--static: k tokens per image exactly (padding counted: it is computed); without a budget one clear error."""
    write_images(tmp_path / "imgs", size=(64, 64))
    args = ["--model", "vit_tiny_patch16_224", "--size", "64", "--batch", "1,2", "--images", tmp_path / "imgs"]
    args += ["--runs", "1", "--warmup", "0", "--out", tmp_path / "r.json", "--static"]
    code, out, err = run(capsys, "bench", *args, "--budget", "5")
    assert code == 0, err
    assert "static: exactly k tokens per image" in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["tokens"] == 5 and r["base_tokens"] == 16 for r in rows)
    code, out, err = run(capsys, "bench", *args)
    assert code == 2 and "--static needs a token budget" in err and len(err.strip().splitlines()) == 1
