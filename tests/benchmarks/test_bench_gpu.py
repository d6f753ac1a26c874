"""benchmarks/bench_gpu.py is run for the first time on a lent GPU with minutes to spare: its code must already work.

The quick variant (tiny model, CPU) goes through every line the GPU run does except the CUDA-only checks; a
failing check or timing row is recorded in the JSON instead of stopping the run.
"""

import json
import sys

from benchmarks import bench_gpu


def _run(tmp_path, monkeypatch, *extra, code=0):
    out = tmp_path / "b.json"
    argv = ["bench_gpu.py", "--quick", "--device", "cpu", "--no-compile", "--out", str(out), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench_gpu.main() == code
    return json.loads(out.read_text())


def test_quick_run_on_the_cpu_passes_its_checks_and_times_every_row(tmp_path, monkeypatch):
    import torch

    # TF32 on, as cuDNN's default is: the exactness check must turn it off (and restore it)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        result = _run(tmp_path, monkeypatch)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    checks = result["checks"]
    assert checks["nothing_merged_ieee_fp32"] is True and checks["nothing_merged_attention"] == "pad"
    assert checks["graph_runner_static_b1_vs_plain"] <= 1e-5 and checks["attention_kernels"]
    small = result["graph_rows"][0]
    assert small["static_graph_img_s"] > 0 and small["static_img_s"] > 0 and small["attention_kernels"]
    assert small["graphs_captured"] >= 1 and small["static_graphs_captured"] == 1
    assert checks["nothing_merged_vs_timm_fp32"] < 1e-4 and checks["layout_device_equals_cpu"] is True
    assert checks["auto_backend_inference"] == "loop"
    assert not [k for k, v in checks.items() if isinstance(v, str) and v.startswith("error")]
    assert len(result["rows"]) == len(bench_gpu.QUICK + bench_gpu.QUICK_SMALL)
    assert all(r["speedup"] > 0 for r in result["rows"]) and len(result["graph_rows"]) == 1


def test_a_broken_kernel_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """A failing check or timing row is recorded, the rest still runs, and the exit code says it failed."""

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(bench_gpu, "bench_config", broken)
    monkeypatch.setattr(bench_gpu.CUDAGraphRunner, "__call__", broken)
    result = _run(tmp_path, monkeypatch, code=1)
    checks = result["checks"]
    for b in (1, 2):  # the second graph check ran after the first one broke
        assert checks[f"graph_runner_b{b}_vs_plain"].startswith("error: RuntimeError: no kernel image")
    assert [r["config"] for r in result["rows"]] == [list(c) for c in bench_gpu.QUICK + bench_gpu.QUICK_SMALL]
    assert all(r["error"].startswith("RuntimeError: no kernel image") for r in result["rows"])


def test_rows_past_the_deadline_are_skipped_and_saved(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch, "--deadline", "0")
    assert [r.get("skipped") for r in result["rows"]] == ["past --deadline"] * 3
