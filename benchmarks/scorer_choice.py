"""Which scorer should be the default? Entropy, Laplacian and the residual scorer, on validation data only.

    python benchmarks/scorer_choice.py --only calibrate   # thresholds, on training photos
    python benchmarks/scorer_choice.py --only fidelity    # real_fidelity's zero-shot validation rows, per scorer
    python benchmarks/scorer_choice.py --only top1        # zero-shot top-1 on Imagenette val photos
    python benchmarks/scorer_choice.py --only pictures    # before/after layouts on real photos
    python benchmarks/scorer_choice.py --quick            # seconds: tiny random ViT, scikit-image photos

Stages (each caches its rows in ``--work``; the outputs ``--results``.json / _table.md / .png are rewritten from
every cached row after each stage):

- calibrate: for every scale factor k, the residual scorer's threshold is the quantile of its scores (pooled over
  ``--calib`` Imagenette TRAIN photos at 224 px and the real-fidelity training photos, the scenes that
  ``real_fidelity.py`` never evaluates, at 224 and 448 px) that lets as many k-size patches pass as entropy's
  default threshold does: the default token share stays comparable.
- fidelity: ``real_fidelity.py``'s zero-shot validation rows (DINOv2 ViT-S/14, the library's defaults: sizes
  14/28, area bias) for each scorer at ``--budgets`` at 224 px (``--val`` photos) and 448 px (``--large-val``):
  dense and class cosine to the uniform model. The entropy rows are real_fidelity's "APT entropy + area bias
  sizes=14/28" rows.
- top1: zero-shot top-1 on ``--top1-val`` Imagenette VAL photos (a seeded sample, every class), each scorer at its
  default thresholds and at ``--budgets``, beside the uniform source. The source: ``--source`` (a fine-tuned timm
  checkpoint, ``vit_small_patch14_dinov2`` with 10 classes) when given, else a stand-in: a linear probe (logistic
  regression) on the DINOv2 class token trained on ``--probe-train`` Imagenette TRAIN photos.
- pictures: each photo's layout at the default thresholds of each scorer (sizes 16/32, the photo at its own size).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

import aptvit  # noqa: E402
from aptvit.core.io import atomic_write  # noqa: E402
from aptvit.core.pixels import grayscale_255  # noqa: E402
from aptvit.core.quadtree import default_thresholds  # noqa: E402
from aptvit.core.scoring import SCORERS  # noqa: E402
from benchmarks import real_fidelity as rf  # noqa: E402

COMPARED = ("entropy", "laplacian", "residual")
IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
PICTURES = (  # Imagenette val photos with an out-of-focus or smooth background, and a dark subject on a plain ground
    "n03445777/n03445777_172.JPEG",
    "n03445777/n03445777_1311.JPEG",
    "n03888257/n03888257_38102.JPEG",
    "n03445777/n03445777_16051.JPEG",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def imagenette_files(root: Path, split: str, n: int, seed: int) -> List[tuple]:
    """(path, class index) of ``n`` photos of ``root/split``: a seeded sample of each class folder, in turn."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    per = [sorted(glob.glob(str(root / split / c / "*"))) for c in classes]
    rng = random.Random(seed)
    for files in per:
        rng.shuffle(files)
    out = []
    for i in range(max(len(f) for f in per)):
        for label, files in enumerate(per):
            if i < len(files) and len(out) < n:
                out.append((files[i], label))
    return out


def read_rgb(path: str, size: Optional[int] = None) -> torch.Tensor:
    """(3, H, W) uint8; ``size``: centre square resized (bicubic, antialiased)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------- calibrate
def calibrate(gray_batches: Sequence[torch.Tensor], base: int = 16, factors=(2, 4, 8)) -> Dict[int, dict]:
    """{k: {"entropy_pass": fraction, "residual": threshold}}: the residual scorer's threshold passing as many
    k-size patches as entropy's default."""
    pooled = {name: {k: [] for k in factors} for name in ("entropy", "residual")}
    for gray in gray_batches:
        sizes = [base * k for k in factors if base * k <= min(gray.shape[-2:])]
        for name in pooled:
            scores = SCORERS[name].fn(gray, sizes, base, **SCORERS[name].params)
            for s in sizes:
                pooled[name][s // base].append(scores[s].flatten())
    out = {}
    for k in factors:
        if not pooled["entropy"][k]:
            continue
        e = torch.cat(pooled["entropy"][k])
        frac = float((e < SCORERS["entropy"].thresholds[k]).double().mean())
        q = float(torch.quantile(torch.cat(pooled["residual"][k]).double(), frac))
        out[k] = {"entropy_pass": frac, "residual": round(q, 2), "patches": int(e.numel())}
    return out


def calibration_photos(args) -> List[torch.Tensor]:
    """Grayscale batches: Imagenette TRAIN photos at 224 and real_fidelity's training photos at 224 and 448."""
    if args.quick:
        return [grayscale_255(rf.load_photos([f"skimage:{n}" for n in ("camera", "astronaut")], 128))]
    from benchmarks import fidelity_distill as fd

    files = imagenette_files(Path(args.imagenette), "train", args.calib, seed=1)
    out = [grayscale_255(torch.stack([read_rgb(f) for f, _ in files[i : i + 64]])) for i in range(0, len(files), 64)]
    sources = rf.photo_sources()
    split = rf.split_photos(0, sources)
    train = [s for s in fd.train_sources(sources, split["val"] + split["test"], rf.scene_key)]
    for size in (224, 448):
        out.append(grayscale_255(rf.load_photos(train, size)))
    return out


# ---------------------------------------------------------------------------------------------- fidelity
def fidelity_rows(args, cache: dict, save) -> None:
    sources = [f"skimage:{n}" for n in rf.SKIMAGE_PHOTOS] if args.quick else rf.photo_sources()
    val = rf.split_photos(0, sources)["val"]
    from benchmarks import real_weights

    work = Path(args.work)
    two = (rf.PATCH, 2 * rf.PATCH)
    for size, n in ((args.sizes[0], args.val), *((s, args.large_val) for s in args.sizes[1:])):
        photos = val[:n]
        src = rf.tiny_source(size) if args.quick else rf.real_source(size, real_weights.DEFAULT_CACHE)
        px = rf.load_photos(photos, size)
        x = rf.normalise(px)
        key = hashlib.sha1(json.dumps([photos, size, args.quick]).encode()).hexdigest()[:10]
        ref_file = work / f"ref-{key}.pt"
        ref = None
        for budget in args.budgets:
            for scorer in COMPARED:
                rk = f"fidelity|{size}|val|{len(photos)}|{budget}|{scorer}"
                if rk in cache:
                    continue
                if ref is None:
                    if ref_file.is_file():
                        ref = torch.load(ref_file)
                    else:
                        ref = rf.reference(src, x, args.batch)
                        atomic_write(ref_file, lambda tmp: torch.save(ref, tmp))
                m = rf.apt_method(src, budget, scorer, True, sizes=two)
                start = time.perf_counter()
                res = rf.evaluate(m, x, px, ref, src, args.batch)[""]
                cache[rk] = {"size": size, "photos": len(photos), "budget": budget, "scorer": scorer, **res}
                save()
                log(f"{rk}: {res} ({time.perf_counter() - start:.0f} s)")


# ---------------------------------------------------------------------------------------------- top-1
def _tiny_classifier():
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, embed_dim=32, depth=2, num_heads=2, num_classes=10
    ).eval()


def source_model(args, cache: dict, save):
    """(timm classifier at 224 px, description): ``--source``, else DINOv2 with a linear probe trained here."""
    import timm

    if args.quick:
        return _tiny_classifier(), "tiny random ViT (smoke run)"
    if args.source:
        from safetensors.torch import load_file

        # saved at DINOv2's own 518 px position grid: resampled to the input size at run time
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10, dynamic_img_size=True)
        model.load_state_dict(load_file(args.source))
        return model.eval(), f"fine-tuned source {args.source}"
    from benchmarks import real_weights

    vit = real_weights.load_backbone(224)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=10)
    state = {**vit.state_dict()}
    pk = f"probe|{args.probe_train}"
    if pk not in cache:
        files = imagenette_files(Path(args.imagenette), "train", args.probe_train, seed=2)
        feats, labels = [], []
        with torch.inference_mode():
            for i in range(0, len(files), args.batch):
                chunk = files[i : i + args.batch]
                x = rf.normalise(torch.stack([read_rgb(f, 224) for f, _ in chunk]).float() / 255)
                feats.append(vit.forward_head(vit.forward_features(x), pre_logits=True))
                labels += [c for _, c in chunk]
        w, b = fit_probe(torch.cat(feats), torch.tensor(labels), 10)
        cache[pk] = {"weight": w.tolist(), "bias": b.tolist(), "photos": len(files)}
        save()
        log(f"probe trained on {len(files)} Imagenette train photos")
    state["head.weight"] = torch.tensor(cache[pk]["weight"])
    state["head.bias"] = torch.tensor(cache[pk]["bias"])
    model.load_state_dict(state)
    return model.eval(), f"DINOv2 ViT-S/14 + linear probe on {args.probe_train} Imagenette train photos (stand-in)"


def fit_probe(feats: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 500, wd: float = 1e-4):
    """Multinomial logistic regression (L-BFGS, weight decay ``wd``) on standardised-free features: (W, b)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(feats.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(feats), labels) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin.weight.detach(), lin.bias.detach()


def top1_rows(args, cache: dict, save) -> None:
    model, desc = source_model(args, cache, save)
    size = 56 if args.quick else 224
    files = (
        [(f"skimage:{n}", i % 10) for i, n in enumerate(rf.SKIMAGE_PHOTOS)]
        if args.quick
        else imagenette_files(Path(args.imagenette), "val", args.top1_val, seed=3)
    )
    tag = hashlib.sha1(json.dumps([desc, [f for f, _ in files]]).encode()).hexdigest()[:8]
    labels = torch.tensor([c for _, c in files])
    x = rf.normalise(
        rf.load_photos([f for f, _ in files], size)
        if args.quick
        else torch.stack([read_rgb(f, size) for f, _ in files]).float() / 255
    )
    base = (size // rf.PATCH) ** 2
    settings = [("source", None, None)] + [(s, "default", None) for s in COMPARED]
    settings += [(s, "budget", b) for b in args.budgets for s in COMPARED]
    for scorer, mode, budget in settings:
        rk = f"top1|{tag}|{scorer}|{mode}|{budget}"
        if rk in cache:
            continue
        start = time.perf_counter()
        preds, tokens = [], []
        with torch.inference_mode():
            if scorer == "source":
                apt = None
            elif mode == "default":
                apt = aptvit.convert(model, scorer=scorer)
            else:
                apt = aptvit.convert(model, budget=budget, scorer=scorer)
            for i in range(0, len(x), args.batch):
                xb = x[i : i + args.batch]
                if apt is None:
                    preds.append(model(xb).argmax(1))
                    tokens.append(torch.ones(len(xb), dtype=torch.float64))
                else:
                    layout = apt.make_layout(xb)
                    preds.append(apt(xb, layout=layout).argmax(1))
                    tokens.append(layout.num_tokens.double() / base)
        correct = (torch.cat(preds) == labels).tolist()
        cache[rk] = {
            "scorer": scorer, "mode": mode, "budget": budget, "source": desc, "photos": len(files),
            "top1": float(np.mean(correct)), "tokens_kept": float(torch.cat(tokens).mean()), "correct": correct,
        }  # fmt: skip
        save()
        log(
            f"{rk}: top-1 {cache[rk]['top1']:.4f}, tokens {cache[rk]['tokens_kept']:.3f} ({time.perf_counter() - start:.0f} s)"
        )


# ---------------------------------------------------------------------------------------------- pictures
def pictures(args, out: Path) -> None:
    """One row per photo, one column per scorer: the layout at the scorer's default thresholds (sizes 16/32),
    the base-size patches tinted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if args.quick:
        imgs = [(n, read_skimage(n)) for n in ("coffee", "chelsea")]
    else:
        imgs = [(Path(p).name, read_rgb(str(Path(args.imagenette) / "val" / p))) for p in PICTURES]
    sizes = (16, 32)
    fig, axes = plt.subplots(len(imgs), len(COMPARED), figsize=(3.2 * len(COMPARED), 3.4 * len(imgs)), squeeze=False)
    for row, (name, img) in zip(axes, imgs):
        h, w = img.shape[-2] // 16 * 16, img.shape[-1] // 16 * 16
        img = img[:, :h, :w]
        for ax, scorer in zip(row, COMPARED):
            thr = default_thresholds(sizes, scorer)
            layout = aptvit.patch_layout(img[None], sizes, thresholds=thr, scorer=scorer)
            ax.imshow(img.permute(1, 2, 0).numpy())
            for y, x0, s in zip(layout.y.tolist(), layout.x.tolist(), layout.size.tolist()):
                base = s == sizes[0]
                face = (1.0, 0.15, 0.1, 0.35) if base else "none"
                ax.add_patch(Rectangle((x0 - 0.5, y - 0.5), s, s, facecolor=face, edgecolor=(1, 1, 1, 0.7), lw=0.5))
            n, cells = layout.total_tokens, (h // 16) * (w // 16)
            ax.set_title(f"{name}\n{scorer} < {thr[32]:g}: {n}/{cells} tokens ({n / cells:.0%})", fontsize=8)
            ax.axis("off")
    fig.suptitle("default thresholds, sizes 16/32; tinted: kept at 16 px", fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def read_skimage(name: str) -> torch.Tensor:
    return (rf.load_photos([f"skimage:{name}"], 128)[0] * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------- output
def write_outputs(cache: dict, out: Path) -> None:
    lines = ["## Fidelity (validation photos, zero-shot, sizes 14/28, area bias): dense / class cosine", ""]
    lines += ["| size | photos | budget | " + " | ".join(COMPARED) + " |", "|---|---|---|" + "---|" * len(COMPARED)]
    fid = [v for k, v in cache.items() if k.startswith("fidelity|")]
    for size, n, budget in sorted({(r["size"], r["photos"], r["budget"]) for r in fid}, key=lambda t: (t[0], -t[2])):
        cells = []
        for s in COMPARED:
            hit = [r for r in fid if (r["size"], r["photos"], r["budget"], r["scorer"]) == (size, n, budget, s)]
            cells.append(f"{hit[0]['dense_cos']:.4f} / {hit[0]['class_cos']:.4f}" if hit else "-")
        lines.append(f"| {size} | {n} | {budget:.0%} | " + " | ".join(cells) + " |")
    top = [v for k, v in cache.items() if k.startswith("top1|")]
    if top:
        src = [r for r in top if r["scorer"] == "source"]
        lines += ["", f"## Zero-shot top-1, Imagenette val photos ({top[0]['photos']}); source: {top[0]['source']}", ""]
        lines += ["| setting | scorer | tokens kept | top-1 | paired diff to entropy (SE) |", "|---|---|---|---|---|"]
        for r in src:
            lines.append(f"| uniform | source | 100% | {r['top1']:.2%} | |")
        for r in top:
            if r["scorer"] == "source":
                continue
            ent = [e for e in top if e["scorer"] == "entropy" and (e["mode"], e["budget"]) == (r["mode"], r["budget"])]
            diff = ""
            if ent and r["scorer"] != "entropy":
                d = np.array(r["correct"], float) - np.array(ent[0]["correct"], float)
                diff = f"{d.mean():+.2%} ({d.std(ddof=1) / np.sqrt(len(d)):.2%})"
            setting = "default thresholds" if r["mode"] == "default" else f"budget {r['budget']:.0%}"
            lines.append(f"| {setting} | {r['scorer']} | {r['tokens_kept']:.1%} | {r['top1']:.2%} | {diff} |")
    cal = cache.get("calibrate")
    if cal:
        lines += ["", "## Residual scorer thresholds (pass as many patches as entropy's defaults; training photos)", ""]
        lines += ["| scale factor | entropy passes | residual threshold | patches |", "|---|---|---|---|"]
        for k, v in sorted(cal.items(), key=lambda t: int(t[0])):
            lines.append(f"| {k} | {v['entropy_pass']:.1%} | {v['residual']} | {v['patches']} |")
    text = "\n".join(lines) + "\n"
    atomic_write(out.with_name(out.name + "_table.md"), lambda tmp: Path(tmp).write_text(text))
    slim = {
        k: {kk: vv for kk, vv in v.items() if kk != "correct"} for k, v in cache.items() if not k.startswith("probe")
    }
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(slim, indent=1)))
    print(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("calibrate", "fidelity", "top1", "pictures"), action="append", default=None)
    p.add_argument("--sizes", default="224,448")
    p.add_argument("--budgets", default="0.5,0.35")
    p.add_argument("--val", type=int, default=35, help="real_fidelity validation photos at the first size")
    p.add_argument("--large-val", type=int, default=8, help="real_fidelity validation photos at the larger sizes")
    p.add_argument("--calib", type=int, default=300, help="Imagenette train photos for the thresholds")
    p.add_argument("--probe-train", type=int, default=300, help="Imagenette train photos for the stand-in probe")
    p.add_argument("--top1-val", type=int, default=300, help="Imagenette val photos for top-1")
    p.add_argument("--source", default=None, help="a fine-tuned timm checkpoint (10 classes, 224 px) for top-1")
    p.add_argument("--imagenette", default=str(IMAGENETTE))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/aptvit-scorer-choice")
    p.add_argument("--results", default="docs/results/scorer_choice")
    p.add_argument("--quick", action="store_true", help="seconds: a tiny random ViT on scikit-image photos")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = "56" if args.sizes == p.get_default("sizes") else args.sizes
        args.val, args.large_val, args.calib = min(args.val, 2), min(args.large_val, 2), 2
        args.work += "-quick"
        args.results = args.results + "-quick" if args.results == p.get_default("results") else args.results
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.only = args.only or ["calibrate", "fidelity", "top1", "pictures"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_file = work / "rows.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    def save():
        atomic_write(cache_file, lambda tmp: Path(tmp).write_text(json.dumps(cache)))

    if "calibrate" in args.only and "calibrate" not in cache:
        cache["calibrate"] = {str(k): v for k, v in calibrate(calibration_photos(args)).items()}
        save()
        log(f"calibrated: {cache['calibrate']}")
    if "fidelity" in args.only:
        fidelity_rows(args, cache, save)
    if "top1" in args.only:
        top1_rows(args, cache, save)
    if "pictures" in args.only:
        pictures(args, out.with_name(out.name + "_layouts.png"))
    write_outputs(cache, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
