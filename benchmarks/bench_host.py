"""Host cost at batch 1: a ViT so thin that its math is free, so the wall time is the host's work.

    python benchmarks/bench_host.py [--runs 200] [--sizes 224,384] [--patch-sizes 16,32,64 16,32] [--clock wall|thread]
                                    [--json out.json]
    python benchmarks/bench_host.py --smoke        # seconds: what the test suite runs

Width 16, depth 12 (every timm ViT the issue lists has 12+ blocks), random weights, one bundled photo resized
to each size, batch 1, one thread. Alternating medians (``aptvit.bench.alternating_medians``), of wall time or, with
``--clock thread``, of this thread's CPU time (``time.thread_time``: other processes on a shared machine inflate it far
less than wall time; every op runs on the calling thread at one thread), of:

* ``timm``: the timm model's forward;
* ``apt(x)``: layout, plan and forward (default thresholds, the dynamic path);
* ``forward_packed``: the same model with the plan made beforehand (what data-loader workers give it);
* ``static apt(x)``: the fully static path (``static=True``, budget 0.5), layout on the device, no host read:
  in eager mode its host cost is its op count (the budget's binary search is ~log2(candidates) selections);
  captured as one CUDA graph, all of it is one replay.

Every row names its patch sizes (``--patch-sizes``, each a comma list starting at the ViT's 16; default both
(16, 32, 64) and (16, 32)), so a change of the library's default sizes does not move these numbers.

Targets (issue 16): ``apt(x)`` <= 1.2x timm and ``forward_packed`` <= 1.0x timm. Also printed: aten ops
dispatched per call (tests/dispatch.py's counter, when run from the repository), and per stage of ``apt(x)``
(the layout, the plan given the layout, the packed forward: its embedding, one block against one of timm's, the
head), the load-independent measure of the host's work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import timm
import torch

import aptvit
from aptvit.bench import add_clock_option, alternating_medians, clock_named, resize
from aptvit.images import normalise
from aptvit.photos import load_photo


def thin_vit(depth: int = 12, width: int = 16, heads: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, embed_dim=width, depth=depth, num_heads=heads, dynamic_img_size=True
    ).eval()


def count_ops(fn) -> int:
    """aten ops one call dispatches (0 when the counter is not importable, i.e. outside the repository)."""
    try:
        from tests.dispatch import OpCounter
    except ImportError:
        return 0
    with torch.inference_mode(), OpCounter() as ops:
        fn()
    return ops.total


def stage_ops(vit: torch.nn.Module, apt, x: torch.Tensor) -> dict:
    """aten ops of each stage of ``apt(x)`` (and of one timm block, next to one of ours)."""
    with torch.inference_mode():
        layout = apt.planner.layout(x)
        packed = apt.planner(x, layout)
        tokens = apt.embed_packed(x, packed)
        ctx = apt.block_context(tokens, packed)
    return {
        "layout": count_ops(lambda: apt.planner.layout(x)),
        "plan": count_ops(lambda: apt.planner(x, layout)),
        "embed": count_ops(lambda: apt.embed_packed(x, packed)),
        "block": count_ops(lambda: apt.family.block(apt, apt.blocks[0], tokens, ctx)),
        "timm block": count_ops(lambda: vit.blocks[0](tokens[None])),
        "head": count_ops(lambda: apt.forward_head(apt.norm(tokens), packed=packed)),
    }


def measure(
    size: int,
    runs: int,
    warmup: int,
    depth: int = 12,
    patch_sizes=(16, 32, 64),
    clock=time.perf_counter,
    width: int = 16,
    heads: int = 1,
) -> dict:
    vit = thin_vit(depth, width, heads)
    apt = aptvit.convert(vit, patch_sizes=patch_sizes).eval()
    static = aptvit.convert(vit, patch_sizes=patch_sizes, budget=0.5, static=True).eval()
    mean, std = apt.pixel_mean_std()
    x = normalise(resize([load_photo("astronaut")], (size, size)), mean, std)
    with torch.inference_mode():
        packed = apt.planner(x)
    fns = {
        "timm": lambda _: vit(x),
        "apt(x)": lambda _: apt(x),
        "forward_packed": lambda _: apt.forward_packed(x, packed),
        "static apt(x)": lambda _: static(x),
    }
    seconds = alternating_medians(fns, [0], runs=runs, warmup=warmup, clock=clock)
    ops = {name: count_ops(lambda f=fn: f(0)) for name, fn in fns.items()}
    base = seconds["timm"]
    return {
        "size": size,
        "patch_sizes": tuple(patch_sizes),
        "tokens": packed.layout.total_tokens,
        "static_k": static.static_tokens((size, size)),
        "ms": {name: 1000 * s for name, s in seconds.items()},
        "vs_timm": {name: s / base for name, s in seconds.items()},
        "ops": ops,
        "stage_ops": stage_ops(vit, apt, x),
    }


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--sizes", default="224,384")
    parser.add_argument(
        "--patch-sizes", nargs="+", default=["16,32,64", "16,32"], help="patch size lists, each like 16,32,64"
    )
    add_clock_option(parser, threads_option=None)  # one torch thread always
    parser.add_argument("--width", type=int, default=16, help="embedding width (384 with --heads 6: ViT-S)")
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (seconds): the test suite's run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    patch_sizes = [tuple(int(v) for v in p.split(",")) for p in args.patch_sizes]
    clock = clock_named(args.clock, threads_option=None)
    if args.smoke:
        rows = [measure(64, runs=2, warmup=1, depth=2, patch_sizes=patch_sizes[0], clock=clock)]
    else:
        rows = [
            measure(int(s), args.runs, args.warmup, patch_sizes=ps, clock=clock, width=args.width, heads=args.heads)
            for ps in patch_sizes
            for s in args.sizes.split(",")
        ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, timm {timm.__version__}, 1 thread, batch 1, width {args.width}, runs={args.runs}, {args.clock} clock, "
        f"load {load:.2f}"
    )
    names = list(rows[0]["ms"])
    print("| patch sizes | size | tokens (static k) | " + " | ".join(f"{n} ms (x timm, ops)" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r['ms'][n]:.2f} ({r['vs_timm'][n]:.2f}x, {r['ops'][n]})" for n in names]
        sizes = ",".join(map(str, r["patch_sizes"]))
        print(f"| {sizes} | {r['size']} | {r['tokens']} ({r['static_k']}) | " + " | ".join(cells) + " |")
    stages = list(rows[0]["stage_ops"])
    print("\naten ops per stage of apt(x)")
    print("| patch sizes | size | " + " | ".join(stages) + " |")
    print("|---|---|" + "---|" * len(stages))
    for r in rows:
        sizes = ",".join(map(str, r["patch_sizes"]))
        print(f"| {sizes} | {r['size']} | " + " | ".join(str(r["stage_ops"][n]) for n in stages) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
