"""Everything the GPU runtime issue (#9) asks of a GPU, in one command: correctness first, then the timings.

    PYTHONPATH=. python3 benchmarks/bench_gpu.py --out $OUT/bench_gpu.json     # one GPU, under 8 minutes
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --quick --device cpu          # the same code, tiny, on a CPU

Correctness (random weights): nothing merged equals timm in fp32 (TF32 off, attention "pad": an exactness check
must not compare TF32 convolutions or a compiled kernel); every attention backend that runs here agrees with
"pad" (bf16 forward, fp32 flex forward and backward), and the kernel each one ran is recorded; the CUDA-graph
runner (bucketed and static) equals the plain forward; the layout computed on the device equals the CPU one; host
synchronisations counted with ``torch.cuda.set_sync_debug_mode`` (0 in ``apt(x, layout=...)``, at most 1 in
``patch_layout``).

Timings (bf16 autocast on CUDA, ``torch.inference_mode``, real photos center-cropped plus random crops, default
thresholds unless said): timm vs APT end to end (layout included), the layout alone, APT with the plan made
beforehand ("layout given"), FLOP ratio, speedup. ViT-B/384 at batch 1, 8 and 64 also: eager timm, ``torch.compile``d
timm (the fair baseline for a graphed APT), ``CUDAGraphRunner`` bucketed (bf16 weights), the static path
(``static=True``, the budget's or the measured token count) eager and through the static runner, and the attention
kernel that ran. Timm and APT alternate, warm-up first, medians (``aptvit.bench.alternating_medians``). Every row
is saved as soon as it is measured; no row starts after ``--deadline``. Needs only torch, timm, numpy and
scikit-image (no aptvit install: run from the repository with PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aptvit  # noqa: E402
from aptvit.bench import BenchRow, alternating_medians, bench_config, format_table  # noqa: E402
from aptvit.core.io import atomic_write  # noqa: E402
from aptvit.images import center_crop_resize, normalise  # noqa: E402
from aptvit.nn import attention  # noqa: E402
from aptvit.nn.attention import available_backends, resolve_backend  # noqa: E402
from aptvit.nn.graphs import CUDAGraphRunner  # noqa: E402
from aptvit.photos import PHOTO_NAMES, load_photo  # noqa: E402
from aptvit.runtime import autocast, resolve_device  # noqa: E402

FULL = [  # model, input size, batch, budget (None: default thresholds)
    ("vit_base_patch16_224", 224, 256, None),
    ("vit_base_patch16_384", 384, 128, None),
    ("vit_base_patch16_384", 384, 128, 0.45),
    ("vit_large_patch16_384", 384, 64, None),
    ("vit_large_patch14_clip_336", 336, 64, None),
    ("vit_large_patch16_384", 448, 32, None),
]
SMALL = [
    ("vit_base_patch16_384", 384, 1, None),
    ("vit_base_patch16_384", 384, 8, None),
    ("vit_base_patch16_384", 384, 64, None),
    ("vit_base_patch16_384", 384, 1, 0.45),
]
QUICK = [("vit_tiny_patch16_224", 64, 4, None), ("vit_tiny_patch16_224", 64, 4, 0.45)]
QUICK_SMALL = [("vit_tiny_patch16_224", 64, 1, None)]


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def photos_and_crops(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8: the bundled photos center-cropped, then random crops of them (real content)."""
    g = torch.Generator().manual_seed(seed)
    photos = [load_photo(name) for name in PHOTO_NAMES]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        if i >= len(photos):  # a random crop of 40-100% of the shorter side, anywhere
            h, w = img.shape[-2:]
            side = int(min(h, w) * (0.4 + 0.6 * torch.rand(1, generator=g).item()))
            y = int(torch.randint(0, h - side + 1, (1,), generator=g))
            x = int(torch.randint(0, w - side + 1, (1,), generator=g))
            img = img[:, y : y + side, x : x + side]
        out.append(center_crop_resize(img, (size, size)))
    return torch.stack(out)


def build(name: str, budget, device, num_classes: int = 1000, **kw):
    import timm

    vit = (
        timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=num_classes, **kw)
        .eval()
        .to(device)
    )
    apt = aptvit.convert(vit, budget=budget).eval()
    return vit, apt


@contextlib.contextmanager
def no_tf32():
    """fp32 as IEEE fp32 on CUDA: cuDNN convolutions and cuBLAS matmuls default to TF32 (10-bit mantissas), which
    alone puts timm's patch embedding ~2e-4 away from an fp32 reference."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def kernels_ran() -> dict:
    """{backend name: the kernel it last ran} (``Backend.last_kernel``) for every registered backend that ran one."""
    return {name: b.last_kernel for name, b in attention.BACKENDS.items() if b.last_kernel is not None}


def clear_kernels() -> None:
    for backend in attention.BACKENDS.values():
        backend.clear_last_kernel()


def static_copy(apt, budget):
    """A copy of ``apt`` on the static path (``static=True``) with ``budget`` tokens per image."""
    return copy.deepcopy(apt).configure(budget=budget, static=True)


def count_syncs(fn) -> int:
    """Host synchronisations made by ``fn()`` on CUDA (``torch.cuda.set_sync_debug_mode("warn")``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


class Checks(dict):
    """{name: value} of the checks; ``run`` records ``fn``'s result (when not None) as ``name``'s value, and an
    exception as the value instead of stopping."""

    def run(self, name: str, fn) -> None:
        try:
            value = fn()
            if value is not None:
                self[name] = value
        except Exception as e:  # noqa: BLE001 -- a broken kernel must not cost the rest of a lent GPU's minutes
            self[name] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            traceback.print_exc(limit=3)


def check_setup(device, quick: bool, n: int):
    """The model pair of the checks (ViT-B/16 at 224, or a tiny one), ``n`` photos for it, and the compute dtype."""
    name, size = ("vit_tiny_patch16_224", 64) if quick else ("vit_base_patch16_224", 224)
    vit, apt = build(name, None, device)
    mean, std = apt.pixel_mean_std()
    x = normalise(photos_and_crops(n, size).to(device), mean, std)
    return vit, apt, x, torch.bfloat16 if device.type == "cuda" else torch.float32


def correctness(device, quick: bool) -> dict:
    """The checks, as {name: value}; a failing check is recorded and printed as FAIL, the next ones still run."""
    out = Checks()
    vit, apt, x, dtype = check_setup(device, quick, 4)
    state = {}

    def exact():  # fp32 as fp32 (no TF32) and the plain "pad" kernel on both sides of the comparison
        apt.configure(thresholds={s: -1.0 for s in apt.patch_sizes[1:]}, attention="pad")
        try:
            with no_tf32():
                out["nothing_merged_ieee_fp32"] = not (
                    torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
                )
                out["nothing_merged_vs_timm_fp32"] = rel(apt(x), vit(x))
                out["nothing_merged_attention"] = resolve_backend(apt.attention, device, torch.float32)
        finally:
            apt.configure(thresholds=None, attention="auto")

    def layouts():
        state["layout"] = layout = apt.make_layout(x)
        out["tokens_kept"] = layout.total_tokens / float(layout.num_base_tokens.sum())
        cpu_layout = apt.make_layout(x.cpu())  # the layout needs only the settings, not the weights
        out["layout_device_equals_cpu"] = bool(
            torch.equal(cpu_layout.cells, layout.cells.cpu()) and torch.equal(cpu_layout.size, layout.size.cpu())
        )

    def backends():
        out["auto_backend_inference"] = resolve_backend("auto", device, dtype)
        out["auto_backend_training"] = resolve_backend("auto", device, dtype, grad=True)
        ref = None
        for backend in available_backends(device, dtype):
            if backend == "loop" and device.type == "cuda":
                continue

            def one(backend=backend):
                nonlocal ref
                apt.configure(attention=backend)
                with autocast(device, dtype):
                    y = apt(x, layout=state["layout"])
                ref = y if ref is None else ref
                out[f"backend_{backend}_{str(dtype)[6:]}_vs_first"] = rel(y, ref)

            out.run(f"backend_{backend}_{str(dtype)[6:]}_vs_first", one)
        apt.configure(attention="auto")
        out["attention_kernels"] = kernels_ran()

    def graph_check(model, name, b):
        runner = CUDAGraphRunner(model, dtype=dtype)
        # the first call captures, the second replays with other images (and another layout, maybe one bucket);
        # judged against the plain forward of the runner's own (bf16-weight) model, and reported, not judged,
        # against the autocast forward, which rounds differently (fp32 weights, fp32 layer norms)
        batches = (x[:b], x[b : 2 * b].flip(-1))
        got = [runner(xs) for xs in batches]
        out[f"{name}_vs_plain"] = max(rel(y, _plain(runner, xs)) for y, xs in zip(got, batches))
        out[f"{name}_rel_diff_to_autocast"] = max(
            rel(y, _auto(model, xs, device, dtype)) for y, xs in zip(got, batches)
        )

    def graphs(b):
        graph_check(apt, f"graph_runner_b{b}", b)

    def static_graphs(b):
        graph_check(static_copy(apt, 0.5), f"graph_runner_static_b{b}", b)

    with torch.inference_mode():
        out.run("nothing_merged_vs_timm_fp32", exact)
        out.run("layout_device_equals_cpu", layouts)
        out.run("backends", backends)
        for b in (1, 2):
            out.run(f"graph_runner_b{b}_vs_plain", lambda b=b: graphs(b))
        for b in (1, 2):
            out.run(f"graph_runner_static_b{b}_vs_plain", lambda b=b: static_graphs(b))
        if device.type == "cuda":
            layout = state.get("layout")
            out.run("syncs_apt_with_layout", lambda: count_syncs(lambda: apt(x, layout=layout)))
            out.run("syncs_apt_without_layout", lambda: count_syncs(lambda: apt(x)))
            out.run("syncs_patch_layout", lambda: count_syncs(lambda: apt.make_layout(x)))

    def flex_training():  # fp32 on CUDA uses flex; gradients agree with pad
        apt.train()
        grads = {}
        for backend in ("flex", "pad"):
            apt.configure(attention=backend)
            apt.zero_grad()
            apt(x, layout=state["layout"]).square().mean().backward()
            grads[backend] = torch.cat([q.grad.flatten() for q in apt.parameters() if q.grad is not None])
        out["flex_fp32_grad_vs_pad"] = rel(grads["flex"], grads["pad"])

    def auto_training():  # a bf16 training step with whatever "auto" picks for training
        apt.train().configure(attention="auto")
        apt.zero_grad()
        with autocast(device, dtype):
            loss = apt(x).float().square().mean()
        loss.backward()
        out["auto_bf16_train_step_finite"] = bool(torch.isfinite(loss)) and all(
            bool(torch.isfinite(q.grad).all()) for q in apt.parameters() if q.grad is not None
        )

    if device.type == "cuda":
        out.run("flex_fp32_grad_vs_pad", flex_training)
        out.run("auto_bf16_train_step_finite", auto_training)
    apt.configure(attention="auto").eval()
    report(out)
    return dict(out)


def failed(k: str, v) -> bool:
    """Whether check ``k`` with value ``v`` failed (an error, a difference past its tolerance, a host sync)."""
    return (
        (isinstance(v, str) and v.startswith("error"))
        or (isinstance(v, float) and "vs" in k and v > (2e-2 if "bfloat16" in k or "graph" in k else 1e-4))
        or (k.startswith("syncs_") and v > (1 if "without" in k or "patch_layout" in k else 0))
        or v is False
    )


def report(out: dict) -> None:
    for k, v in out.items():
        print(f"{'FAIL' if failed(k, v) else 'ok  '} {k}: {v}", flush=True)


def compiled(device, quick: bool) -> dict:
    """``torch.compile(apt.forward_packed)`` (inductor) against eager, and its compile time."""
    out = Checks()
    _, apt, x, dtype = check_setup(device, quick, 8)

    def run():
        fn = torch.compile(apt.forward_packed, fullgraph=True, dynamic=True)
        with torch.inference_mode(), autocast(device, dtype):
            packed = apt.prepare(x)
            start = time.time()
            y = fn(x, packed)
            out["compile_seconds"] = time.time() - start
            out["compiled_vs_eager"] = rel(y, apt.forward_packed(x, packed))
            other = apt.prepare(x.flip(-1))  # another token count: no recompile expected with dynamic shapes
            start = time.time()
            fn(x.flip(-1), other)
            out["second_shape_seconds"] = time.time() - start

    out.run("compiled_vs_eager", run)
    report(out)
    return dict(out)


def _plain(runner, x):
    """The runner's model (its bf16 copy for bf16) run eagerly on ``x``: what its graphs must reproduce."""
    model = runner.compute
    return model.forward_packed(x.to(runner.dtype), model.prepare(x))


def _auto(apt, x, device, dtype):
    with autocast(device, dtype):
        return apt(x)


def timings(device, configs, small, runs: int, warmup: int, save, deadline: float, compile_timm: bool = True) -> list:
    """The timing rows; each row is saved as soon as it is measured (``save(rows, graph_rows)``), a failing row is
    recorded and skipped, and rows that would start after ``deadline`` (time.time()) are skipped."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, graph_rows = [], []
    for config in configs + small:
        if time.time() > deadline:
            print(f"  skipped {config}: past --deadline", flush=True)
            rows.append({"config": list(config), "skipped": "past --deadline"})
        else:
            try:
                _time_one(device, dtype, config, config in small, runs, warmup, rows, graph_rows, compile_timm)
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: the other rows still run
                traceback.print_exc(limit=3)
                rows.append({"config": list(config), "error": f"{type(e).__name__}: {e}"[:300]})
                _BUILT.clear()
                _COMPILED.clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        save(rows, graph_rows)
    return rows, graph_rows


_BUILT: dict = {}


def _compiled_timm(vit, device):
    """timm's model through ``torch.compile`` (inductor on CUDA; aot_eager elsewhere, which compiles in seconds),
    one per model: the batch sizes after the first recompile once with a dynamic batch, not once each."""
    key = id(vit)
    if key not in _COMPILED:
        _COMPILED.clear()
        _COMPILED[key] = torch.compile(vit, backend="inductor" if device.type == "cuda" else "aot_eager")
    return _COMPILED[key]


_COMPILED: dict = {}


def _time_one(device, dtype, config, with_graph, runs, warmup, rows, graph_rows, compile_timm=True) -> None:
    name, size, batch, budget = config
    key = (name, budget)
    if key not in _BUILT:
        _BUILT.clear()  # one model pair on the GPU at a time
        _COMPILED.clear()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        _BUILT[key] = build(name, budget, device)
    vit, apt = _BUILT[key]
    mean, std = apt.pixel_mean_std()
    n = batch * (2 if batch > 1 else 8)
    images = normalise(photos_and_crops(n, size).to(device), mean, std)
    label = f"{name}{'' if budget is None else f' budget {budget}'}"
    t0 = time.time()
    row = bench_config(vit, apt, images, batch, runs, warmup, label, dtype=dtype)
    rows.append(asdict(row))
    if with_graph:
        runner = CUDAGraphRunner(apt, dtype=dtype)
        chunks = list(images.split(batch))
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        budget_used = budget if budget is not None else row.kept  # the static path at the measured token count
        static = static_copy(apt, budget_used)
        static_runner = CUDAGraphRunner(static, dtype=dtype)
        timm_compiled = _compiled_timm(vit, device) if compile_timm else None

        def under_autocast(model):
            def fn(c):
                with autocast(device, dtype):
                    return model(c)

            return fn

        fns = {
            "timm": under_autocast(vit),
            "apt": under_autocast(apt),
            "graph": runner,
            "static": under_autocast(static),
            "static_graph": static_runner,
        }
        if timm_compiled is not None:
            fns["timm_compiled"] = under_autocast(timm_compiled)
        clear_kernels()
        sec = alternating_medians(fns, chunks, runs, warmup, sync=sync)
        graph_rows.append(
            {
                "model": label,
                "size": size,
                "batch": batch,
                "timm_img_s": n / sec["timm"],
                "timm_compiled_img_s": n / sec["timm_compiled"] if "timm_compiled" in sec else None,
                "apt_img_s": n / sec["apt"],
                "apt_graph_img_s": n / sec["graph"],
                "static_budget": budget_used,
                "static_img_s": n / sec["static"],
                "static_graph_img_s": n / sec["static_graph"],
                "graph_speedup": sec["timm"] / sec["graph"],
                "static_graph_speedup": sec["timm"] / sec["static_graph"],
                "static_graph_vs_compiled_timm": sec["timm_compiled"] / sec["static_graph"]
                if "timm_compiled" in sec
                else None,
                "flop_ratio": row.flop_ratio,
                "graph_speedup_over_flop_ratio": sec["timm"] / sec["graph"] / row.flop_ratio,
                "graphs_captured": runner.captures,
                "static_graphs_captured": static_runner.captures,
                "attention_kernels": kernels_ran(),
            }
        )
    print(f"  {label} {size} b{batch}: {time.time() - t0:.1f}s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes (a smoke run, e.g. on a CPU)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=420, help="seconds after which no new timing row starts")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile check (the slowest)")
    parser.add_argument("--out", default="bench_gpu.json", help="results, rewritten after every row")
    args = parser.parse_args()
    device = resolve_device(args.device)
    start = time.time()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import timm

    payload = {
        "date": str(datetime.date.today()),
        "device": card,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "checks": {},
        "rows": [],
        "graph_rows": [],
    }

    def save(**parts) -> None:
        payload.update(parts, seconds=time.time() - start)
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1, default=str)))

    print(f"{payload['date']}, {card}, torch {torch.__version__}, timm {timm.__version__}", flush=True)
    save(checks=correctness(device, args.quick))
    print(f"checks done in {time.time() - start:.0f}s", flush=True)
    configs, small = (QUICK, QUICK_SMALL) if args.quick else (FULL, SMALL)
    runs, warmup = (1, 1) if args.quick else (args.runs, args.warmup)
    with torch.inference_mode():
        rows, graph_rows = timings(
            device,
            configs,
            small,
            runs,
            warmup,
            lambda r, g: save(rows=r, graph_rows=g),
            deadline=start + args.deadline,
            compile_timm=not args.no_compile,
        )
    _BUILT.clear()
    print(format_table([BenchRow(**r) for r in rows if "error" not in r and "skipped" not in r]))
    for r in rows:
        if "error" in r or "skipped" in r:
            print(f"FAIL row {r}")
    print(
        "\n| model | size | batch | timm img/s | timm compiled img/s | APT img/s | APT graph img/s | static img/s "
        "| static graph img/s | static graph speedup | FLOP ratio | graph speedup / FLOP ratio | attention |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for g in graph_rows:
        compiled_timm = "-" if g["timm_compiled_img_s"] is None else f"{g['timm_compiled_img_s']:.1f}"
        print(
            f"| {g['model']} | {g['size']} | {g['batch']} | {g['timm_img_s']:.1f} | {compiled_timm} | "
            f"{g['apt_img_s']:.1f} | {g['apt_graph_img_s']:.1f} | {g['static_img_s']:.1f} | "
            f"{g['static_graph_img_s']:.1f} | {g['static_graph_speedup']:.2f}x | {g['flop_ratio']:.2f}x | "
            f"{g['graph_speedup_over_flop_ratio']:.2f} | {', '.join(sorted(set(g['attention_kernels'].values())))} |"
        )
    if not args.no_compile:
        save(compile=compiled(device, args.quick))
    save()
    checks = {**payload["checks"], **payload.get("compile", {})}
    bad = [k for k, v in checks.items() if failed(k, v)] + [str(r["config"]) for r in rows if "error" in r]
    print(f"{time.time() - start:.0f}s in all; results: {args.out}; {len(bad)} failed{': ' if bad else ''}{bad or ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
