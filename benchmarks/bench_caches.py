"""What each cache aptvit once kept would save of a real forward: an alternating A/B on ViT-S/16 and ViT-B/16.

    python benchmarks/bench_caches.py [--models vit_small_patch16_224,vit_base_patch16_224] [--sizes 224,384]
                                      [--batches 1,8] [--runs 7] [--warmup 2] [--threads 0] [--json out.json]
    python benchmarks/bench_caches.py --smoke      # seconds: what the test suite runs

aptvit keeps no caches. Earlier versions kept five kinds, added to cut host time at batch 1 on a ViT of width 16;
the library's rule is that a cache stays only if it saves at least 2% of a real forward. Each is re-created here as
a memo around the current code (the same keys the old caches used), so the A/B is "the same code with and without
it":

* ``layout tables``: the layout's constant index tables (``quadtree.grid_tables``, the entropy scorer's cell keys,
  c log c table and ones) and its checked settings (``quadtree._layout_settings``), kept per shape and settings;
* ``positions``: the family's position bank and prefix rows (``Family.positions``), kept per image size;
* ``zero detail``: the embedding's detail path left out while its output layers are the zeros of a fresh
  conversion (``AdaptivePatchEmbed.add_detail`` skipped);
* ``all``: the three together.

(The fifth, the pixel mean / std tensors on the device, served only the static path's layout, not timed here.)
Timed: ``apt(images)`` (layout, plan, forward) under ``torch.inference_mode``, random weights (timm's init: the
token counts depend on the photos, not the weights), default settings (entropy thresholds, patch sizes (16, 32)),
bundled photos resized to each size. Variants alternate within each run (``aptvit.bench.alternating_medians``); the
saving is 1 - median(variant) / median(none).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import time

import timm
import torch

import aptvit
from aptvit.bench import add_clock_option, alternating_medians, clock_named, resize
from aptvit.core import quadtree, scoring
from aptvit.core.io import InputError
from aptvit.images import normalise
from aptvit.nn.embed import AdaptivePatchEmbed
from aptvit.photos import PHOTO_NAMES, load_photo


def _memo(fn, key_of):
    table = {}

    def wrapped(*args, **kwargs):
        key = key_of(*args, **kwargs)
        if key not in table:
            table[key] = fn(*args, **kwargs)
        return table[key]

    return wrapped


def _settings_key(patch_sizes, thresholds, budget, scorer, scorer_args):
    return repr((patch_sizes, thresholds, budget, scorer, scorer_args))


def cache_patches(family) -> dict:
    """{variant: [(object, attribute, replacement)]}: each old cache as a memo around today's function."""
    tables = [
        (quadtree, "grid_tables", _memo(quadtree.grid_tables, lambda *a: tuple(map(str, a)))),
        (quadtree, "_layout_settings", _memo(quadtree._layout_settings, _settings_key)),
        (scoring, "_entropy_tables", _memo(scoring._entropy_tables, lambda *a: tuple(map(str, a)))),
        (scoring, "_xlogx_table", _memo(scoring._xlogx_table, lambda *a: tuple(map(str, a)))),
        (scoring, "_ones", _memo(scoring._ones, lambda *a: tuple(map(str, a)))),
    ]
    positions = [
        (
            family,
            "positions",
            _memo(family.positions, lambda apt, groups: (id(apt), tuple(hw for _, hw in groups))),
        )
    ]
    detail = [(AdaptivePatchEmbed, "add_detail", lambda self, tokens, shape: tokens)]
    return {"none": [], "layout tables": tables, "positions": positions, "zero detail": detail,
            "all": tables + positions + detail}  # fmt: skip


@contextlib.contextmanager
def patched(patches):
    saved = [(obj, name, obj.__dict__.get(name, None), name in obj.__dict__) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value, had in saved:
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


def measure(
    model_name: str, size: int, batch: int, runs: int, warmup: int, depth=None, clock=time.perf_counter
) -> dict:
    torch.manual_seed(0)
    extra = {"depth": depth} if depth else {}
    vit = timm.create_model(model_name, pretrained=False, dynamic_img_size=True, **extra).eval()
    apt = aptvit.convert(vit).eval()
    mean, std = apt.pixel_mean_std()
    photos = [load_photo(PHOTO_NAMES[i % len(PHOTO_NAMES)]) for i in range(batch)]
    x = normalise(resize(photos, (size, size)), mean, std)
    variants = cache_patches(apt.family)
    reference = apt(x)

    def run(patches):
        def fn(_):
            with patched(patches):
                return apt(x)

        return fn

    for name, patches in variants.items():  # every variant computes the same logits (a cache must not change them)
        with torch.inference_mode(), patched(patches):
            assert torch.allclose(apt(x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max())), name
    seconds = alternating_medians({n: run(p) for n, p in variants.items()}, [0], runs=runs, warmup=warmup, clock=clock)
    base = seconds["none"]
    return {
        "model": model_name,
        "size": size,
        "batch": batch,
        "tokens": apt.make_layout(x).total_tokens,
        "ms": {n: 1000 * s for n, s in seconds.items()},
        "saving": {n: 1.0 - s / base for n, s in seconds.items() if n != "none"},
    }


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--sizes", default="224,384")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_clock_option(parser)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (seconds): the test suite's run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        clock = clock_named(args.clock)
    except InputError as e:
        parser.error(str(e))
    if args.smoke:
        rows = [measure("vit_small_patch16_224", 64, 1, runs=1, warmup=0, depth=1)]
    else:
        rows = []
        for m in args.models.split(","):
            for s in args.sizes.split(","):
                for b in args.batches.split(","):
                    rows.append(measure(m, int(s), int(b), args.runs, args.warmup, clock=clock))
                    print(json.dumps(rows[-1]), flush=True)  # each row as it comes (a long run on a shared machine)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}, "
        f"runs={args.runs}, {args.clock} clock, load {load:.2f} (1 min average at the end)"
    )
    names = list(rows[0]["saving"])
    print("| model | size | batch | tokens | none ms | " + " | ".join(f"{n} saves" for n in names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        savings = " | ".join(f"{100 * r['saving'][n]:+.1f}%" for n in names)
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['tokens']} | {r['ms']['none']:.1f} | {savings} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
