"""Semantic segmentation with an APT encoder vs the uniform ViT, same step budget (runs on 2 CPU cores).

    python examples/segmentation.py [--steps 400] [--quick | --smoke]

Data: generated 256x256 scenes, a plain gradient or a textured background (or half of each), with
1-3 objects (ellipses, rectangles, triangles: fine, anti-aliasing-free boundaries). Class 1 objects
are a flat warm colour, class 2 objects carry fine cool stripes; class 0 is the background.

Model: a small ViT (patch 16, dim 192, depth 6) trained from scratch with a light decoder on the
learned ViTDet simple pyramid (scales 4, 2, 1; ``aptvit.nn.heads.SegmentationDecoder``). The uniform
model runs timm's forward_features; each APT variant runs ``apt.forward_dense`` with a scorer (entropy,
upsampling error, Laplacian, at their default thresholds) and an unmerge mode ("repeat" or "smooth"). All
start from the same weights and see the same batches.

Reported: mIoU on 160 held-out scenes, training images/s and inference images/s (encoder + head,
batch 8, alternating, warm-up, medians, torch.inference_mode; APT's layout included).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

import aptvit
from aptvit.bench import alternating_medians
from aptvit.nn.heads import SegmentationDecoder

SIZE, CLASSES = 256, 3


def scene(rng: np.random.Generator):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = (np.cos(a) * xx + np.sin(a) * yy) / (SIZE * 1.5) + 0.5
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    img = c0 + (c1 - c0) * t[..., None] + rng.normal(0, 1.0, (SIZE, SIZE, 3))
    kind = rng.integers(0, 3)  # 0 plain, 1 textured, 2 half textured
    if kind:
        texture = rng.normal(0, 28, (SIZE // 4, SIZE // 4, 1)).repeat(4, 0).repeat(4, 1) + rng.normal(
            0, 12, (SIZE, SIZE, 1)
        )
        mask = np.ones((SIZE, SIZE, 1)) if kind == 1 else (xx < SIZE / 2)[..., None]
        img = img + texture * mask
    label = np.zeros((SIZE, SIZE), dtype=np.int64)
    for _ in range(rng.integers(1, 4)):
        cls = rng.integers(1, CLASSES)
        cy, cx = rng.uniform(30, SIZE - 30, 2)
        r1, r2 = rng.uniform(12, 45, 2)
        shape = rng.integers(0, 3)
        if shape == 0:
            inside = ((yy - cy) / r1) ** 2 + ((xx - cx) / r2) ** 2 <= 1
        elif shape == 1:
            inside = (np.abs(yy - cy) <= r1) & (np.abs(xx - cx) <= r2)
        else:
            inside = (yy - cy + r1 >= 0) & (np.abs(xx - cx) * r1 <= (yy - cy + r1) * r2 / 2) & (yy - cy <= r1)
        if cls == 1:
            fill = np.array([230.0, rng.uniform(120, 170), 40.0])[None, None]
            img = np.where(inside[..., None], fill + rng.normal(0, 2, (SIZE, SIZE, 3)), img)
        else:
            stripes = ((xx + yy) % 4 < 2)[..., None] * 70.0
            fill = np.array([40.0, 90.0, 210.0])[None, None] + stripes
            img = np.where(inside[..., None], fill, img)
        label[inside] = cls
    return img.clip(0, 255).astype(np.uint8), label


def dataset(n: int, seed: int):
    rng = np.random.default_rng(seed)
    pairs = [scene(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
    return images, labels


def make_encoder(seed: int):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=SIZE,
        embed_dim=192,
        depth=6,
        num_heads=3,
        num_classes=0,
        dynamic_img_size=True,
        drop_path_rate=0.0,
    )


def uniform_dense(vit):
    def fn(x):
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens :]
        return tokens.reshape(x.shape[0], SIZE // 16, SIZE // 16, -1).permute(0, 3, 1, 2)

    return fn


def miou(pred: torch.Tensor, label: torch.Tensor) -> float:
    ious = []
    for c in range(CLASSES):
        inter = ((pred == c) & (label == c)).sum().item()
        union = ((pred == c) | (label == c)).sum().item()
        if union:
            ious.append(inter / union)
    return 100 * float(np.mean(ious))


def train(name, dense_fn, params, decoder, images, labels, steps, batch, mean, std, lr=1e-3):
    opt = torch.optim.AdamW(list(params) + list(decoder.parameters()), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    speeds = []
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        x = ((images[idx].float() / 255) - mean) / std
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / steps))
        start = time.perf_counter()
        loss = F.cross_entropy(decoder(dense_fn(x)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        speeds.append(batch / (time.perf_counter() - start))
        if step % 50 == 0 or step == steps - 1:
            print(f"  {name} step {step:4d} loss {loss.item():.3f}", flush=True)
    return statistics.median(speeds[5:]) if len(speeds) > 5 else statistics.median(speeds)


@torch.inference_mode()
def evaluate(dense_fn, decoder, images, labels, mean, std, batch=8):
    preds = []
    for i in range(0, images.shape[0], batch):
        x = ((images[i : i + batch].float() / 255) - mean) / std
        preds.append(decoder(dense_fn(x)).argmax(1))
    return miou(torch.cat(preds), labels)


def inference_speed(fns: dict, images, mean, std, batch=8, runs=5, warmup=1):
    """Images per second of each fn (aptvit.bench's alternating medians, under inference_mode)."""
    x = ((images[: batch * 4].float() / 255) - mean) / std
    seconds = alternating_medians(fns, x.split(batch), runs, warmup)
    return {k: x.shape[0] / v for k, v in seconds.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--val", type=int, default=160)
    parser.add_argument(
        "--variants",
        default="entropy:repeat,entropy:smooth,upsample:repeat,laplacian:repeat",
        help="APT encoders to train, SCORER:UNMERGE (unmerge: repeat or smooth)",
    )
    parser.add_argument("--quick", action="store_true", help="10 steps on 32 scenes")
    parser.add_argument("--smoke", action="store_true", help="seconds: 1 step, 2 scenes, 2 variants (the test suite's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.train, args.val = 1, 2, 2, 2
        args.variants = "entropy:repeat,upsample:smooth"
    elif args.quick:
        args.steps, args.train, args.val = 10, 32, 16
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    train_x, train_y = dataset(args.train, seed=0)
    val_x, val_y = dataset(args.val, seed=1)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)

    results, fns = {}, {}
    base_decoder = SegmentationDecoder(192, CLASSES)  # patch 16: logits at SIZE x SIZE
    uniform_vit = make_encoder(0)
    kept = {"uniform": 1.0}
    for name in ["uniform"] + [f"APT {v.replace(':', ' ')}" for v in args.variants.split(",")]:
        vit = copy.deepcopy(uniform_vit)
        decoder = copy.deepcopy(base_decoder)
        if name == "uniform":
            fn, params = uniform_dense(vit), vit.parameters()
        else:
            _, scorer, unmerge = name.split()
            apt = aptvit.convert(vit, scorer=scorer)  # the scorer's default thresholds (README)
            apt.pretrained_cfg.update(mean=(0.5,) * 3, std=(0.5,) * 3)
            smooth = unmerge == "smooth"
            fn, params = (lambda a, s: lambda x: a.forward_dense(x, smooth=s))(apt, smooth), apt.parameters()
            kept[name] = (
                aptvit.patch_layout(val_x, (16, 32, 64), scorer=scorer).num_tokens.float().mean().item()
                / (SIZE // 16) ** 2
            )
        print(f"training {name}", flush=True)
        train_speed = train(name, fn, params, decoder, train_x, train_y, args.steps, args.batch, mean, std)
        for m in (vit, decoder):
            m.eval()
        results[name] = {"miou": evaluate(fn, decoder, val_x, val_y, mean, std), "train_img_s": train_speed}
        fns[name] = (lambda f, d: lambda x: d(f(x)))(fn, decoder)
    speeds = inference_speed(fns, val_x, mean, std, runs=1 if args.smoke else 5)
    print(
        f"\n{args.train} train / {args.val} val scenes at {SIZE}px, {args.steps} steps of batch {args.batch}; "
        f"{(time.perf_counter() - t0) / 60:.1f} min in all"
    )
    print("| encoder (scorer, unmerge) | tokens kept | mIoU (%) | train img/s | inference img/s | inference speedup |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {kept[name]:.1%} | {r['miou']:.1f} | {r['train_img_s']:.1f} | {speeds[name]:.1f} | {speeds[name] / speeds['uniform']:.2f}x |"
        )


if __name__ == "__main__":
    main()
