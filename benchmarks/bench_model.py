"""timm forward vs APT forward on the scikit-image photos: tokens kept, FLOP ratio, speedup, efficiency.

    python benchmarks/bench_model.py [--runs 5] [--json out.json] [--smoke]

ViT-S/16 and ViT-B/16 (random weights, dynamic_img_size=True), photos resized to 224, 384 and 448,
batch 1 and 8, default thresholds {32: 5.5, 64: 4.0}. Runs alternate between the two models after
warm-up, under torch.inference_mode; times are medians per image. Same code as `aptvit bench`.
``--smoke``: a tiny ViT at 64, one run, in seconds (what the test suite runs).
"""

import argparse
import datetime
import platform

import torch

from aptvit.bench import format_table, run_bench, write_json
from aptvit.models import build_models
from aptvit.photos import PHOTO_NAMES, load_photo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--sizes", default="224,384,448")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="seconds: vit_tiny_patch16_224 at 64, one run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.models, args.sizes = 1, "vit_tiny_patch16_224", "64"
    photos = [load_photo(name) for name in PHOTO_NAMES]
    models = []
    for name in args.models.split(","):
        apt, vit = build_models(name)
        models.append((name, vit.eval(), apt.eval()))
    rows = run_bench(models, [int(s) for s in args.sizes.split(",")], [1, 8], photos, runs=args.runs)
    when = datetime.date.today().isoformat()
    print(
        f"{when}, {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"8 scikit-image photos, thresholds 32=5.5,64=4.0, runs={args.runs}"
    )
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, {"date": when, "torch": torch.__version__})


if __name__ == "__main__":
    main()
