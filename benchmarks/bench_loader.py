"""Where to compute layouts when fine-tuning: in the data-loader workers, or in the main process.

    python benchmarks/bench_loader.py [--steps 8] [--workers 2] [--smoke]

Trains vit_small_patch16_224 (random weights) at 224 on a generated ImageFolder for a few steps both ways
(same data, same batches) and prints images/s; layouts are entropy, thresholds 32=5.5, 64=4.0.
``--smoke``: a tiny ViT at 64, 2 steps of batch 2, one worker, in seconds (what the test suite runs).
"""

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from PIL import Image

import aptvit
from aptvit.core.quadtree import patch_layout
from aptvit.data import LayoutDataset, ShardedSampler, build_transform, image_folder, make_loader
from aptvit.images import normalise
from aptvit.photos import PHOTO_NAMES, load_photo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny ViT at 64, 2 steps, 1 worker")
    args = parser.parse_args(argv)
    model_name, size, photo_size, per_photo = "vit_small_patch16_224", 224, 320, 8
    if args.smoke:
        args.steps, args.batch, args.workers = 2, 2, 1
        model_name, size, photo_size, per_photo = "vit_tiny_patch16_224", 64, 96, 1
    root = Path(tempfile.mkdtemp())
    for i, name in enumerate(PHOTO_NAMES):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        for k in range(per_photo):
            img = load_photo(name, photo_size).permute(1, 2, 0).numpy()
            Image.fromarray(img[:, ::-1] if k % 2 else img).save(root / f"c{i % 2}" / f"{name}_{k}.png")
    items = image_folder(root)
    model = timm.create_model(model_name, num_classes=2, dynamic_img_size=True)
    apt = aptvit.convert(model)
    mean, std = apt.pixel_mean_std()
    opt = torch.optim.AdamW(apt.parameters(), 1e-5)
    transform = build_transform(size, True, mean, std)
    layout_fn = functools.partial(patch_layout, **apt.config.layout_kwargs())
    results = {}
    for where in ("workers", "main process", "workers", "main process"):
        dataset = LayoutDataset(items.samples, transform, layout_fn if where == "workers" else None)
        loader = make_loader(dataset, ShardedSampler(len(dataset)), args.batch, args.workers, drop_last=True)
        speeds = []
        it = iter(loader)
        for step in range(args.steps):
            start = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                it = iter(loader)
                batch = next(it)
            layout = batch.layout if where == "workers" else patch_layout(batch.images, **apt.config.layout_kwargs())
            loss = F.cross_entropy(apt(normalise(batch.images, mean, std), layout=layout), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step:  # the first step waits for the workers to start
                speeds.append(args.batch / (time.perf_counter() - start))
        results.setdefault(where, []).append(statistics.median(speeds))
    print(f"{model_name} at {size}, batch {args.batch}, {args.workers} workers, {args.steps} steps, 2 rounds each")
    for where, values in results.items():
        print(
            f"layouts in {where}: {statistics.mean(values):.1f} img/s (rounds: {', '.join(f'{v:.1f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
