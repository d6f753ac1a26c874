"""timm forward vs APT forward on the scikit-image photos: tokens kept, FLOP ratio, speedup, efficiency.

    python benchmarks/bench_model.py [--runs 5] [--models a,b] [--sizes 224,448] [--batches 1,8]
                                     [--patch-factors 1,2,4] [--threads 1] [--clock wall|thread] [--json out.json]
                                     [--smoke]

ViT-S/16 and ViT-B/16 by default (random weights, dynamic_img_size=True), photos resized to 224, 384 and 448,
batch 1 and 8, default thresholds (5.5 bits at 2p, 4.0 at 4p). The patch sizes are given explicitly as multiples of
each model's own patch (``--patch-factors``, (p, 2p, 4p) by default), so that a change of the library's default does
not move the numbers; any timm model a family converts can be listed (``--models
vit_small_patch16_224,eva02_small_patch14_224,vit_base_patch16_siglip_224``). Runs alternate between the two models
after warm-up, under torch.inference_mode; times are medians per image. Same code as `aptvit bench`. On a shared
machine ``--threads 1 --clock thread`` times this thread's CPU seconds, which other processes do not inflate.
``--smoke``: a tiny ViT at 64, one run, in seconds (what the test suite runs).
"""

import argparse
import datetime
import os
import platform

import torch

from aptvit.bench import add_clock_option, clock_named, format_table, run_bench, write_json
from aptvit.core.io import InputError
from aptvit.models import build_models
from aptvit.nn.convert import convert
from aptvit.photos import PHOTO_NAMES, load_photo


def ints(text):
    return [int(s) for s in text.split(",") if s]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--sizes", default="224,384,448")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--patch-factors", default="1,2,4", help="patch sizes as multiples of the model's patch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    add_clock_option(parser)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="seconds: vit_tiny_patch16_224 at 64, one run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.models, args.sizes = 1, "vit_tiny_patch16_224", "64"
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        clock = clock_named(args.clock)
    except InputError as e:
        parser.error(str(e))
    photos = [load_photo(name) for name in PHOTO_NAMES]
    models = []
    for name in args.models.split(","):
        _, vit = build_models(name)
        p = vit.patch_embed.patch_size[0]
        apt = convert(vit, patch_sizes=tuple(f * p for f in ints(args.patch_factors)))
        models.append((name, vit.eval(), apt.eval()))
    rows = run_bench(models, ints(args.sizes), ints(args.batches), photos, runs=args.runs, clock=clock)
    when = datetime.date.today().isoformat()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"{when}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load} (at the end), 8 scikit-image photos, "
        f"patch sizes {args.patch_factors} x p, default thresholds, runs={args.runs}, {args.clock} clock"
    )
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, {"date": when, "torch": torch.__version__, "load_average": load})


if __name__ == "__main__":
    main()
