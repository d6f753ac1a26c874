"""The benchmark and example scripts still run (tiny settings); their real outputs are in BENCHMARKS.md."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv, timeout=3600):
    # a guard against a hung script, not a speed check: the quick conversion experiment alone takes ~4.5 CPU minutes,
    # and a shared, busy machine stretched it to ~25 min of wall time (pytest -n 2 at a load of 10 on 2 cores)
    result = subprocess.run(
        [sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_mllm_projector_example():
    out = run("examples/mllm_projector.py")
    lines = [l for l in out.splitlines() if l.startswith("image ")]
    assert len(lines) == 2
    for line in lines:
        kept, base = (
            int(w)
            for w in line.split(" visual tokens instead of ")[0].split()[-1:] + line.split("instead of ")[1].split()[:1]
        )
        assert kept <= base // 2


def test_segmentation_example_quick():
    out = run("examples/segmentation.py", "--quick", "--variants", "entropy:repeat,upsample:smooth")
    rows = [l for l in out.splitlines() if l.startswith("| uniform") or l.startswith("| APT")]
    assert len(rows) == 3


def test_conversion_experiment_quick(tmp_path):
    out = run("benchmarks/convert_experiment.py", "--quick", "--out", tmp_path)
    rows = [l for l in out.splitlines() if l.startswith("| ") and "%" in l and not l.startswith("| model")]
    assert len(rows) == 4 and (tmp_path / "results.json").is_file()
