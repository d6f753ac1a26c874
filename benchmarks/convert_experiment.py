"""Table 2's conversion protocol in miniature, on this machine (< 30 min on 2 CPU cores).

    python benchmarks/convert_experiment.py [--out /tmp/aptvit-convert] [--quick | --smoke]

1. Generate a 4-class data set (64x64): a smooth colour gradient with mild noise (large plain
   regions) and one 12x12 textured glyph at a random place whose 1-2 px pattern is the class
   (horizontal / vertical stripes, checkerboard, period-4 diagonal). Averaging 2x2 pixels erases
   three of the four patterns, so merging the glyph's patch loses the answer.
2. Train the "fine-tuned source model": a small uniform ViT (patch 4, 256 tokens, dim 128, depth 4)
   from scratch, through ``aptvit.train.finetune`` with thresholds that never merge (= timm's ViT).
3. Report on the held-out split, accuracy and images/s of
   - the source model (uniform ViT, timm forward),
   - the converted model before fine-tuning (= the resize-only model: the detail path is zero),
   - after one epoch of APT fine-tuning,
   - Random: the same token count per image with a random patch choice, fine-tuned the same way.
   Throughput: batches of 64, models alternating, warm-up, medians, torch.inference_mode; APT's
   layout computation is included, Random's layouts are precomputed (model only).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aptvit.bench import alternating_medians
from aptvit.core.layout import PatchLayout
from aptvit.core.quadtree import patch_layout
from aptvit.data import LayoutDataset, build_transform, image_folder
from aptvit.distributed import Dist
from aptvit.evaluate import evaluate
from aptvit.images import normalise
from aptvit.nn.checkpoint import load
from aptvit.nn.config import APTConfig
from aptvit.train import TrainConfig, finetune

CLASSES = ("horizontal", "vertical", "checker", "diagonal")
SIZE, GLYPH = 64, 12
PATCH_SIZES = [4, 8, 16]
APT_THRESHOLDS = {8: 3.0, 16: 3.2}
NEVER = {8: -1.0, 16: -1.0}
MODEL = "vit_tiny_patch16_224"
MODEL_ARGS = dict(patch_size=4, img_size=SIZE, embed_dim=128, depth=4, num_heads=4)


def glyph(cls: int, rng: np.random.Generator) -> np.ndarray:
    i, j = np.mgrid[0:GLYPH, 0:GLYPH]
    pattern = [i % 2, j % 2, (i + j) % 2, ((i + j) // 2) % 2][cls].astype(float) * 2 - 1
    return pattern * rng.choice([-1, 1]) * 50 + rng.normal(0, 15, pattern.shape)


def sample(cls: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    a = rng.uniform(0, 2 * np.pi)
    t = np.cos(a) * xx + np.sin(a) * yy
    t = (t - t.min()) / (t.max() - t.min())
    c0 = rng.uniform(60, 195, 3)
    c1 = c0 + rng.uniform(-25, 25, 3)  # a gentle gradient: plain regions a 4x patch can take
    img = c0 + (c1 - c0) * t[..., None] + rng.normal(0, 1.0, (SIZE, SIZE, 3))
    y0, x0 = rng.integers(0, SIZE - GLYPH + 1, 2)
    img[y0 : y0 + GLYPH, x0 : x0 + GLYPH] += glyph(cls, rng)[..., None]
    return img.clip(0, 255).astype(np.uint8)


def make_dataset(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    if (root / "val").is_dir():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n // len(CLASSES)):
                Image.fromarray(sample(c, rng)).save(folder / f"{k:05d}.png")
    return root


def random_scores(gray, sizes, base):
    """A scorer that ignores the pixels: the paper's "Random" patch choice (seeded per sample by the loader)."""
    b, h, w = gray.shape
    return {s: torch.rand(b, h // s, w // s) for s in sizes}


def random_same_count(crop: torch.Tensor):
    """Random layout with (at most, as close as sizes allow) the APT layout's token count."""
    n = patch_layout(crop, PATCH_SIZES, thresholds=APT_THRESHOLDS).total_tokens
    return patch_layout(crop, PATCH_SIZES, budget=n, scorer=random_scores)


APT_LAYOUT = functools.partial(patch_layout, patch_sizes=PATCH_SIZES, thresholds=APT_THRESHOLDS)


def accuracy(model, data: Path, layout_fn, uniform=False) -> dict:
    mean, std = model.pixel_mean_std() if not uniform else (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    items = image_folder(data / "val")
    dataset = LayoutDataset(
        items.samples, build_transform(SIZE, False, mean, std, crop_pct=1.0), None if uniform else layout_fn
    )
    return evaluate(model, dataset, 64, 2, Dist(), mean, std, uniform=uniform, progress=False)


def throughput(fns: dict, images: torch.Tensor, runs: int = 7, warmup: int = 2, batch: int = 64) -> dict:
    """Images per second of each fn(batch) -> logits (aptvit.bench's alternating medians)."""
    seconds = alternating_medians(fns, images.split(batch), runs, warmup)
    return {k: images.shape[0] / v for k, v in seconds.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/aptvit-convert")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--source-epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a small run of the whole pipeline (minutes)")
    parser.add_argument("--smoke", action="store_true", help="seconds: every step on a few images (the test suite's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train, args.val, args.source_epochs = 16, 8, 1
    elif args.quick:
        args.train, args.val, args.source_epochs = 256, 128, 1
    out = Path(args.out)
    t0 = time.perf_counter()
    data = make_dataset(out / "data", args.train, args.val)
    common = dict(
        model=MODEL,
        model_args=MODEL_ARGS,
        data=str(data),
        size=SIZE,
        augment="none",
        batch_size=8 if args.smoke else 64,
        workers=0 if args.smoke else 2,
        log_every=20,
        eval=False,
    )

    source_dir = out / "source"
    if not (source_dir / "model.safetensors").is_file():
        finetune(
            TrainConfig(
                out=str(source_dir),
                epochs=args.source_epochs,
                apt=APTConfig(PATCH_SIZES, thresholds=NEVER),
                lr=1e-3,
                warmup=0.1,
                drop_path=0.1,
                **common,
            ),
        )
    t_source = time.perf_counter() - t0
    tuned = {}
    for name, layout_fn in (("apt", None), ("random", random_same_count)):
        run_dir = out / f"{name}_1ep"
        if not (run_dir / "model.safetensors").is_file():
            finetune(
                TrainConfig(
                    out=str(run_dir),
                    checkpoint=str(source_dir / "model.safetensors"),
                    epochs=1,
                    apt=APTConfig(PATCH_SIZES, thresholds=APT_THRESHOLDS),
                    lr=3e-4,
                    warmup=0.1,
                    drop_path=0.1,
                    **common,
                ),
                layout_fn=layout_fn,
            )
        tuned[name] = load(run_dir / "model.safetensors", model=None).eval()

    source = load(source_dir / "model.safetensors").eval()  # APT wrapper of the source; never merges
    timm_source = source.timm_model.eval()
    resize_only = load(source_dir / "model.safetensors").eval()
    resize_only.configure(thresholds=dict(APT_THRESHOLDS))

    rows = {
        "source (uniform ViT)": accuracy(timm_source, data, None, uniform=True),
        "converted, before fine-tuning (resize only)": accuracy(resize_only, data, APT_LAYOUT),
        "APT, 1 epoch": accuracy(tuned["apt"], data, APT_LAYOUT),
        "Random (same token count), 1 epoch": accuracy(tuned["random"], data, random_same_count),
    }
    # throughput on the val images, batches of 64; APT and Random compute their layouts inside
    mean, std = source.pixel_mean_std()
    items = image_folder(data / "val")
    val = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p, _ in items.samples[:512]]
    )
    x = normalise(val, mean, std)
    # Random's layouts are made outside the timed region: a per-image random choice is no product path
    random_layouts = {
        c.data_ptr(): PatchLayout.cat([random_same_count(val[i : i + 1]) for i in range(k, k + c.shape[0])])
        for k, c in zip(range(0, 512, 64), x.split(64))
    }

    def random_forward(c):
        return tuned["random"](c, layout=random_layouts[c.data_ptr()])

    speed = throughput(
        {
            "source (uniform ViT)": timm_source,
            "APT, 1 epoch": tuned["apt"],
            "Random (same token count), 1 epoch": random_forward,
        },
        x,
    )
    speed["converted, before fine-tuning (resize only)"] = None
    total = time.perf_counter() - t0
    print(
        f"train {args.train}, val {args.val}, source epochs {args.source_epochs}; source training {t_source / 60:.1f} min, "
        f"whole experiment {total / 60:.1f} min"
    )
    print("| model | top-1 (%) | tokens kept | images/s (batch 64) | vs source |")
    print("|---|---|---|---|---|")
    base_speed = speed["source (uniform ViT)"]
    for name, r in rows.items():
        s = speed.get(name)
        print(
            f"| {name} | {r['top1']:.1f} | {r['tokens_kept']:.1%} | {f'{s:.0f}' if s else '(as APT)'} | {f'{s / base_speed:.2f}x' if s else ''} |"
        )
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "images_per_s": speed, "minutes": total / 60}, indent=2)
    )


if __name__ == "__main__":
    main()
