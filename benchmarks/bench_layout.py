"""Layout speed: entropy layouts of real photos vs. one ViT-B/16 forward at 448 on this machine.

    python benchmarks/bench_layout.py [--smoke]

Prints ms per image for 32 photos at 448x448 and 4 at 1024x1024 (thresholds and budget mode),
and, in the same run, timm's vit_base_patch16_224 (dynamic_img_size) forward at 448 on one image.
``--smoke``: two photos at 64 and a tiny ViT, in seconds (what the test suite runs).
"""

import argparse
import statistics
import time

import timm
import torch

import aptvit
from aptvit.photos import photo_batch


def median_ms(fn, runs=7, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sizes, a tiny ViT")
    args = parser.parse_args(argv)
    sizes, (model_name, side, runs) = [(32, 448), (4, 1024)], ("vit_base_patch16_224", 448, 5)
    if args.smoke:
        sizes, (model_name, side, runs) = [(2, 64)], ("vit_tiny_patch16_224", 64, 1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for count, size in sizes:
        images = photo_batch(count, size)
        for label, kwargs in [
            ("thresholds 32=5.5,64=4.0", dict(thresholds={32: 5.5, 64: 4.0})),
            ("budget 0.5", dict(budget=0.5)),
        ]:
            ms = median_ms(lambda: aptvit.patch_layout(images, (16, 32, 64), **kwargs), runs, 1) / count
            kept = aptvit.patch_layout(images, (16, 32, 64), **kwargs).num_tokens.float().mean() / (size // 16) ** 2
            rows.append((count, size, label, ms, float(kept)))
    model = timm.create_model(model_name, pretrained=False, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, side, side)
    with torch.inference_mode():
        vit_ms = median_ms(lambda: model(x), runs=runs, warmup=1)
    print(f"{model_name} forward at {side}, batch 1: {vit_ms:.0f} ms")
    print(f"| images | size | mode | layout ms/image | tokens kept | share of the {model_name}@{side} forward |")
    print("|---|---|---|---|---|---|")
    for count, size, label, ms, kept in rows:
        print(f"| {count} | {size} | {label} | {ms:.1f} | {kept:.0%} | {ms / vit_ms:.2%} |")


if __name__ == "__main__":
    main()
