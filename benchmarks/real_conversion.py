"""The one-epoch conversion on real labelled images (Fashion-MNIST), beside ToMe, lower resolution and Random.

    python benchmarks/real_conversion.py [--data FOLDER] [--work /tmp/aptvit-real] [--results docs/results/real_conversion] [--quick | --smoke]

Data: ``apt-get install dataset-fashion-mnist`` (or ``--data`` with the four IDX files). 5,000 training
images are held out as the validation split used for every choice; the official 10,000-image test
split is reported once, at the end. Images: 28x28 grayscale, upsampled (bilinear) to 56x56, three
channels; a timm ``VisionTransformer`` with patch 4 (196 base tokens), trained from scratch (uniform)
as the source and cached in ``--work`` (reruns skip it; finished rows are cached there too).

Rows, each after exactly one epoch of fine-tuning from the source (over the fine-tuning subset) unless
zero-shot, at each token budget:
- APT zero-shot (resize only), APT one epoch, APT one epoch with the detail path frozen at zero;
- Random patch choice at the same token count (one epoch);
- uniform lower resolution with about the same token count (position embedding resampled, one epoch);
- ToMe (benchmarks/tome.py) zero-shot and one epoch, r chosen to match APT's FLOPs.
APT's new-layer learning-rate multiplier (``TrainConfig.new_layer_lr_scale``) is chosen on the
validation split at budget ``budgets[len(budgets) // 2]`` (35% with the defaults) and used by APT and Random.
Recipe: AdamW (wd 0.05, no decay on norms/biases/positions),
linear warm-up + cosine (``aptvit.train.lr_at``), label smoothing 0.1, drop path 0.1, gradient clipping 1,
random horizontal flips (no RandAugment: it is slow on this CPU and 28-px images).

Per row: test top-1, tokens kept (patch tokens per block, mean, / 196), FLOPs per image
(``aptvit.nn.model.model_flops`` for APT and Random, ``tome_flops`` otherwise) and images/s on this CPU
(batch 64, ``aptvit.bench.alternating_medians``, APT's and Random's layout computation included).
Written atomically: RESULTS.json, RESULTS.png (test top-1 against images/s, one curve per method) and
RESULTS_table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

import aptvit  # noqa: E402
from aptvit import PatchLayout, patch_layout  # noqa: E402
from aptvit.bench import alternating_medians  # noqa: E402
from aptvit.core.io import atomic_write  # noqa: E402
from aptvit.nn.model import model_flops  # noqa: E402
from aptvit.train import TrainConfig, lr_at, param_groups  # noqa: E402
from benchmarks.fashion_mnist import load_splits  # noqa: E402
from benchmarks.tome import ToMeViT, token_schedule, tome_flops  # noqa: E402

SIZE, PATCH, PATCH_SIZES = 56, 4, (4, 8)  # 56 is no multiple of 16: two sizes, at least 25% of the tokens
BASE_TOKENS = (SIZE // PATCH) ** 2
MODEL = "vit_tiny_patch16_224"
MEAN, STD = 0.5, 0.5  # the timm ViT's pretrained_cfg normalisation


# ---------------------------------------------------------------------------------------------- data
def upsample(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 56, 56) uint8, bilinear, rounded as an image file would store it."""
    x = torch.from_numpy(images).float()[:, None]
    out = torch.cat([F.interpolate(c, size=(SIZE, SIZE), mode="bilinear", align_corners=False) for c in x.split(4096)])
    return out.round().clamp(0, 255).to(torch.uint8)


def batch_pixels(gray: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) uint8 -> (pixels (B, 3, H, W) float in [0, 1], normalised model input)."""
    px = gray.float().div(255).expand(-1, 3, -1, -1).contiguous()
    return px, (px - MEAN) / STD


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- models
def create_vit(args, size: int = SIZE, drop_path: float = 0.0):
    import timm

    return timm.create_model(
        MODEL,
        pretrained=False,
        img_size=size,
        patch_size=PATCH,
        embed_dim=args.width,
        depth=args.depth,
        num_heads=args.heads,
        num_classes=10,
        drop_path_rate=drop_path,
    )


def random_scores(gray, sizes, base):
    """A scorer that ignores the pixels: the paper's Random patch choice (with a budget: same token count)."""
    b, h, w = gray.shape
    return {s: torch.rand(b, h // s, w // s) for s in sizes}


class Method:
    """One way of running the source model cheaper: what to train, how to run it, what it costs."""

    def __init__(self, module: torch.nn.Module, forward: Callable, stats: Callable, timed: Callable):
        self.module = module  # the parameters to train
        self.forward = forward  # (x normalised, px) -> (logits, state for stats)
        self.stats = stats  # state -> (patch tokens per block (B,), FLOPs (B,))
        self.timed = timed  # x normalised (B, 3, 56, 56) -> logits: what a user runs (layouts included)


def uniform_method(vit) -> Method:
    flops = tome_flops(vit, 0, BASE_TOKENS)
    return Method(
        vit,
        lambda x, px: (vit(x), x.shape[0]),
        lambda b: (torch.full((b,), float(BASE_TOKENS)), torch.full((b,), flops)),
        vit,
    )


def apt_method(vit, budget: float, random: bool = False) -> Method:
    """APT (entropy) or Random patch choice at ``budget`` (fraction of the base tokens), layouts from the pixels."""
    apt = aptvit.convert(vit, patch_sizes=PATCH_SIZES, budget=budget)
    apt.pretrained_cfg.update(mean=(MEAN,) * 3, std=(STD,) * 3)
    scorer = random_scores if random else "entropy"

    def layout_of(px):
        return patch_layout(px, PATCH_SIZES, budget=budget, scorer=scorer)

    def forward(x, px):
        layout = layout_of(px)
        return apt(x, layout=layout), layout

    def stats(layout: PatchLayout):
        return layout.num_tokens.double(), model_flops(apt, layout)["apt"]

    timed = apt if not random else (lambda x: apt(x, layout=layout_of(unnormalise(x))))
    return Method(apt, forward, stats, timed)


def lowres_method(source_state: dict, args, side: int) -> Method:
    """The source at a uniform ``side`` x ``side`` input: position embedding resampled, images resized (antialiased)."""
    from timm.layers import resample_abs_pos_embed

    vit = create_vit(args, side, args.drop_path)
    state = dict(source_state)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=(side // PATCH,) * 2, num_prefix_tokens=1)
    vit.load_state_dict(state)
    tokens = (side // PATCH) ** 2
    flops = tome_flops(vit, 0, tokens)

    def run(x):
        return vit(F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False))

    return Method(
        vit,
        lambda x, px: (run(x), x.shape[0]),
        lambda b: (torch.full((b,), float(tokens)), torch.full((b,), flops)),
        run,
    )


def tome_method(vit, r: int) -> Method:
    model = ToMeViT(vit, r)
    schedule = token_schedule(BASE_TOKENS + 1, r, len(vit.blocks))
    # patch tokens per block: each block's attention sees n, its MLP n - r; count the mean of the two
    mean_tokens = float(np.mean([n - 1 - ri / 2 for n, ri in schedule]))
    flops = tome_flops(vit, r, BASE_TOKENS)
    return Method(
        model,
        lambda x, px: (model(x), x.shape[0]),
        lambda b: (torch.full((b,), mean_tokens), torch.full((b,), flops)),
        model,
    )


# ---------------------------------------------------------------------------------------------- training
def train(
    method: Method, data: Tuple[torch.Tensor, torch.Tensor], epochs: int, cfg: TrainConfig, seed: int, log: Callable
) -> float:
    """``epochs`` passes over ``data`` (gray uint8 (N, 1, 56, 56), labels), the library's recipe; returns seconds."""
    images, labels = data
    module = method.module
    module.train()
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(param_groups(module, cfg), "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(images) // cfg.batch_size
    total, step, start = steps_per_epoch * epochs, 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for k in range(steps_per_epoch):
            idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            gray = images[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            gray = torch.where(flip[:, None, None, None], gray.flip(-1), gray)
            px, x = batch_pixels(gray)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg) * group.get("lr_scale", 1.0)
            logits, _ = method.forward(x, px)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == total:
                log(f"    step {step}/{total} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    module.eval()
    return time.perf_counter() - start


@torch.inference_mode()
def evaluate(method: Method, data: Tuple[torch.Tensor, torch.Tensor], batch: int = 64) -> dict:
    """Top-1 (%), tokens kept (patch tokens per block / 196) and FLOPs per image, means over ``data``."""
    method.module.eval()
    images, labels = data
    correct, tokens, flops = 0, 0.0, 0.0
    for k in range(0, len(images), batch):
        px, x = batch_pixels(images[k : k + batch])
        logits, state = method.forward(x, px)
        correct += int((logits.argmax(-1) == labels[k : k + batch]).sum())
        t, f = method.stats(state)
        tokens, flops = tokens + float(t.sum()), flops + float(f.sum())
    n = len(images)
    return {"top1": 100.0 * correct / n, "tokens_kept": tokens / n / BASE_TOKENS, "gflops": flops / n / 1e9}


@torch.inference_mode()
def detail_share(apt, data, n: int = 250) -> float:
    """How much the detail path adds to a large token: mean |detail| / mean |base-grid patch embedding|.

    The detail layers are hooked (their output is what a large token gains); the base-grid embedding is the
    ViT's own projection applied to the images here, not hooked, because the model calls its weight directly.
    """
    seen = {}

    def hook(module, inputs, output):  # returns None: the output is left alone
        seen.setdefault("detail", output.norm(dim=-1).mean())

    hooks = [layer.register_forward_hook(hook) for layer in apt.adaptive_embed.detail_proj.values()]
    px, x = batch_pixels(data[0][:n])
    try:
        apt(x, layout=apt.make_layout(x))
    finally:
        for h in hooks:
            h.remove()
    base = apt.patch_embed.proj(x).norm(dim=1).mean()  # (B, D, H/p, W/p): one norm per base patch
    return float(seen.get("detail", torch.tensor(0.0)) / base)


def layout_gflops(method: Method, images: torch.Tensor) -> float:
    """Mean GFLOPs per image of an APT method on ``images`` (layouts only: FLOPs do not depend on the weights)."""
    with torch.inference_mode():
        return (
            float(
                torch.cat(
                    [
                        method.stats(patch_layout(batch_pixels(c)[0], PATCH_SIZES, budget=method.module.config.budget))[
                            1
                        ]
                        for c in images.split(250)
                    ]
                ).mean()
            )
            / 1e9
        )


def throughput(fns: Dict[str, Callable], images: torch.Tensor, runs: int, warmup: int) -> Dict[str, float]:
    """Images/s of each fn on normalised batches of 64 (aptvit.bench's alternating medians)."""
    _, x = batch_pixels(images)
    chunks = list(x.split(64))
    seconds = alternating_medians(fns, chunks, runs, warmup)
    return {k: len(images) / v for k, v in seconds.items()}


# ---------------------------------------------------------------------------------------------- output
def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def table(rows: List[dict], source: dict) -> str:
    lines = [
        "| method | budget | test top-1 (%) | vs source | tokens kept | GFLOPs | images/s | vs source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = (
            f"{r['images_per_s']:.0f} | {r['images_per_s'] / source['images_per_s']:.2f}x"
            if r.get("images_per_s")
            else "(as below) | "
        )
        lines.append(
            f"| {r['name']} | {r['budget'] or '-'} | {r['top1']:.2f} | {r['top1'] - source['top1']:+.2f} | "
            f"{r['tokens_kept']:.0%} | {r['gflops']:.4f} | {speed} |"
        )
    return "\n".join(lines)


def plot(rows: List[dict], path: Path) -> None:
    """Test top-1 against images/s, one curve per method (rows with a measured speed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: Dict[str, List[Tuple[float, float]]] = {}
    for r in rows:
        if r.get("images_per_s"):
            curves.setdefault(r["curve"], []).append((r["images_per_s"], r["top1"]))
    for name, points in curves.items():
        points.sort()
        style = "*" if name == "source (uniform ViT)" else "o-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=name, markersize=12 if style == "*" else 5)
    ax.set_xlabel("images/s (this CPU, 1 thread, batch 64)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder with the four Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--work", default="/tmp/aptvit-real", help="cache: source model, finished rows")
    p.add_argument(
        "--results", default="docs/results/real_conversion", help="prefix of the .json, .png and _table.md outputs"
    )
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--source-train", type=int, default=7680, help="training subset of the source (images)")
    p.add_argument("--source-epochs", type=int, default=3)
    p.add_argument("--source-lr", type=float, default=2e-3)
    p.add_argument("--finetune-train", type=int, default=2560, help="the one epoch of fine-tuning: this many images")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning lr (every one-epoch row)")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--budgets", default="0.5,0.35", help="tokens kept, fractions of the 196 base tokens")
    p.add_argument(
        "--lr-scales", default="1,10,30", help="new-layer lr multipliers tried on the val split (middle budget)"
    )
    p.add_argument("--holdout", type=int, default=5000, help="training images held out as the validation split")
    p.add_argument("--val", type=int, default=5000, help="validation images used (of those held out)")
    p.add_argument("--test", type=int, default=10000, help="test images used (the official split has 10,000)")
    p.add_argument("--speed-images", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small run of the whole experiment (< 5 minutes)")
    p.add_argument("--smoke", action="store_true", help="seconds: every step on a few images (the test suite's)")
    args = p.parse_args(argv)
    if args.smoke:  # every row and output, too small to mean anything: what `make test` runs
        args.width, args.depth, args.source_train, args.source_epochs, args.finetune_train = 16, 1, 64, 1, 64
        args.holdout, args.val, args.test, args.speed_images, args.runs = 64, 64, 64, 64, 1
        args.lr_scales = "1,10"
    elif args.quick:
        args.source_train, args.source_epochs, args.finetune_train = 512, 1, 128
        args.val, args.test, args.speed_images, args.runs = 250, 500, 128, 1
        args.lr_scales = "1,10"
    if args.quick or args.smoke:
        tag = "-smoke" if args.smoke else "-quick"
        args.work = args.work + tag
        args.results = args.results + tag if args.results == "docs/results/real_conversion" else args.results
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.lr_scales = [float(s) for s in args.lr_scales.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {msg}", flush=True)

    try:
        splits = load_splits(args.data, val=args.holdout, seed=args.seed)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = np.random.default_rng(args.seed)
    train_idx = gen.permutation(len(splits["train"][0]))
    src_idx, ft_idx = (
        train_idx[: args.source_train],
        train_idx[: args.finetune_train],
    )  # the fine-tuning subset is part of the source's
    data = {
        "source": (upsample(splits["train"][0][src_idx]), torch.from_numpy(splits["train"][1][src_idx])),
        "finetune": (upsample(splits["train"][0][ft_idx]), torch.from_numpy(splits["train"][1][ft_idx])),
        "val": (upsample(splits["val"][0][: args.val]), torch.from_numpy(splits["val"][1][: args.val])),
        "test": (upsample(splits["test"][0][: args.test]), torch.from_numpy(splits["test"][1][: args.test])),
    }
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    key = json.dumps(
        {k: v for k, v in vars(args).items() if k not in ("work", "results", "runs", "speed_images", "threads")},
        sort_keys=True,
    )
    cache_file = work / "rows.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "rows": {}}

    def save_cache():
        write_text(cache_file, json.dumps(cache, indent=1))

    def base_cfg(**kw) -> TrainConfig:
        d = dict(
            model=MODEL,
            data="-",
            out="-",
            batch_size=64,
            lr=args.lr,
            warmup=0.1,
            weight_decay=0.05,
            label_smoothing=0.1,
            clip_grad=1.0,
            new_layer_lr_scale=1.0,
            layer_decay=1.0,  # one lr for every block, as its rows were measured (ToMe's wrapper has no groups)
        )
        d.update(kw)
        return TrainConfig(**d)

    # 1. the source: trained from scratch, uniform, cached
    source_key = json.dumps(
        [
            args.width,
            args.depth,
            args.heads,
            args.source_train,
            args.source_epochs,
            args.source_lr,
            args.seed,
            args.drop_path,
        ]
    )
    source_file = work / "source.pt"
    saved = torch.load(source_file, weights_only=True) if source_file.is_file() else None
    if saved is None or saved["key"] != source_key:
        log(
            f"training the source: {args.source_train} images x {args.source_epochs} epochs, width {args.width}, depth {args.depth}"
        )
        torch.manual_seed(args.seed)
        vit = create_vit(args, drop_path=args.drop_path)
        seconds = train(
            uniform_method(vit),
            data["source"],
            args.source_epochs,
            base_cfg(lr=args.source_lr, warmup=0.05),
            args.seed,
            log,
        )
        saved = {"key": source_key, "state": vit.state_dict(), "seconds": seconds}
        atomic_write(source_file, lambda tmp: torch.save(saved, tmp))
    source_state = saved["state"]
    timings = {"source_training_s": saved["seconds"]}

    def fresh_vit(size=SIZE):
        vit = create_vit(args, size, args.drop_path)
        vit.load_state_dict(source_state)
        return vit.eval()

    def row(
        name: str,
        build: Callable[[], Method],
        epochs: int,
        cfg: Optional[TrainConfig] = None,
        split: str = "test",
        freeze_detail: bool = False,
        extra: Optional[Callable[[Method], dict]] = None,
    ) -> dict:
        """Build, train one epoch (or none), evaluate on ``split``; cached by name."""
        cache_name = f"{split}:{name}"
        if cache_name in cache["rows"]:
            return cache["rows"][cache_name]
        torch.manual_seed(args.seed)
        method = build()
        seconds = 0.0
        if epochs:
            if freeze_detail:
                for n, p in method.module.named_parameters():
                    if n.startswith("adaptive_embed."):
                        p.requires_grad_(False)
            log(f"  fine-tuning {name}")
            seconds = train(method, data["finetune"], epochs, cfg or base_cfg(), args.seed + 1, log)
        result = {"name": name, **evaluate(method, data[split]), "train_s": seconds, **(extra(method) if extra else {})}
        log(
            f"  {split} {name}: top-1 {result['top1']:.2f}, tokens {result['tokens_kept']:.0%}, {result['gflops']:.4f} GFLOPs"
        )
        cache["rows"][cache_name] = result
        save_cache()
        return result

    # 2. the new-layer lr multiplier, chosen on the validation split at the middle budget
    mid = args.budgets[len(args.budgets) // 2]
    sweep = {}
    for scale in args.lr_scales:
        sweep[scale] = row(
            f"APT 1 epoch, new-layer lr x{scale:g}, budget {mid}",
            lambda: apt_method(fresh_vit(), mid),
            1,
            base_cfg(new_layer_lr_scale=scale),
            split="val",
            extra=lambda m: {"detail_share": detail_share(m.module, data["val"])},
        )
    best_scale = max(args.lr_scales, key=lambda s: (sweep[s]["top1"], -s))
    tried = ", ".join("x%g: %.2f" % (s, r["top1"]) for s, r in sweep.items())
    log(f"new-layer lr multiplier on val: {tried} -> x{best_scale:g}")

    # 3. the rows, on the test split
    rows: List[dict] = []
    source_row = row("source (uniform ViT)", lambda: uniform_method(fresh_vit()), 0)
    rows.append({**source_row, "curve": "source (uniform ViT)", "budget": None, "key": "source"})
    tome_r: Dict[float, int] = {}
    for budget in args.budgets:
        side = max(PATCH, PATCH * round(math.sqrt(BASE_TOKENS * budget)))
        # FLOPs do not depend on the weights: APT's on the validation images, then the ToMe r closest to them
        apt_gflops = layout_gflops(apt_method(fresh_vit(), budget), data["val"][0][:1000])
        vit = create_vit(args)
        tome_r[budget] = min(
            range(0, BASE_TOKENS // 2), key=lambda r: abs(tome_flops(vit, r, BASE_TOKENS) / 1e9 - apt_gflops)
        )
        r = tome_r[budget]
        specs = [
            ("APT zero-shot (resize only)", "APT zero-shot", lambda: apt_method(fresh_vit(), budget), 0, {}),
            (
                "APT 1 epoch",
                "APT 1 epoch",
                lambda: apt_method(fresh_vit(), budget),
                1,
                dict(
                    cfg=base_cfg(new_layer_lr_scale=best_scale),
                    extra=lambda m: {"detail_share": detail_share(m.module, data["val"])},
                ),
            ),
            (
                "APT 1 epoch, detail path frozen at 0",
                "APT 1 epoch, detail frozen",
                lambda: apt_method(fresh_vit(), budget),
                1,
                dict(freeze_detail=True),
            ),
            (
                "Random patches, 1 epoch",
                "Random 1 epoch",
                lambda: apt_method(fresh_vit(), budget, random=True),
                1,
                dict(cfg=base_cfg(new_layer_lr_scale=best_scale)),
            ),  # APT's recipe: Random has the same new layers
            (
                f"lower resolution {side}x{side}, 1 epoch",
                "lower resolution 1 epoch",
                lambda: lowres_method(source_state, args, side),
                1,
                {},
            ),
            (f"ToMe r={r} zero-shot", "ToMe zero-shot", lambda: tome_method(fresh_vit(), r), 0, {}),
            (f"ToMe r={r}, 1 epoch", "ToMe 1 epoch", lambda: tome_method(fresh_vit(), r), 1, {}),
        ]
        for name, curve, build, epochs, kw in specs:
            result = row(f"{name}, budget {budget}", build, epochs, **kw)
            rows.append({**result, "name": name, "curve": curve, "budget": budget, "key": f"{curve}@{budget}"})

    # 4. images/s: one model per (method, budget); trained and zero-shot share the compute
    log("timing")
    timers = {"source": fresh_vit()}
    for budget in args.budgets:
        side = max(PATCH, PATCH * round(math.sqrt(BASE_TOKENS * budget)))
        timers[f"apt@{budget}"] = apt_method(fresh_vit(), budget).timed
        timers[f"random@{budget}"] = apt_method(fresh_vit(), budget, random=True).timed
        timers[f"lowres@{budget}"] = lowres_method(source_state, args, side).timed
        timers[f"tome@{budget}"] = tome_method(fresh_vit(), tome_r[budget]).timed
    for fn in timers.values():
        if isinstance(fn, torch.nn.Module):
            fn.eval()
    timing_start = time.perf_counter()
    speed = throughput(timers, data["test"][0][: args.speed_images], args.runs, warmup=1)
    timings["throughput_s"] = time.perf_counter() - timing_start
    which = {
        "source": "source",
        "APT zero-shot": "apt",
        "APT 1 epoch": "apt",
        "APT 1 epoch, detail frozen": "apt",
        "Random 1 epoch": "random",
        "lower resolution 1 epoch": "lowres",
        "ToMe zero-shot": "tome",
        "ToMe 1 epoch": "tome",
    }
    for r in rows:
        kind = which["source" if r["key"] == "source" else r["curve"]]
        r["images_per_s"] = speed["source"] if kind == "source" else speed[f"{kind}@{r['budget']}"]

    # 5. outputs
    timings["total_s"] = time.perf_counter() - t0
    source = rows[0]
    results = {
        "settings": {k: v for k, v in vars(args).items()},
        "model": {
            "name": MODEL,
            "img_size": SIZE,
            "patch_size": PATCH,
            "patch_sizes": PATCH_SIZES,
            "width": args.width,
            "depth": args.depth,
            "heads": args.heads,
        },
        "new_layer_lr_scale": {"tried_on_val": {f"{s:g}": sweep[s] for s in args.lr_scales}, "chosen": best_scale},
        "tome_r": {f"{b:g}": r for b, r in tome_r.items()},
        "rows": rows,
        "timings_s": timings,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    out = Path(args.results)
    write_text(out.with_name(out.name + ".json"), json.dumps(results, indent=2))
    text = table(rows, source)
    write_text(out.with_name(out.name + "_table.md"), text + "\n")
    plot(rows, out.with_name(out.name + ".png"))
    print(text)
    log(
        f"source training {timings['source_training_s'] / 60:.1f} min, whole run {timings['total_s'] / 60:.1f} min; "
        f"results: {out}.json, {out}.png, {out}_table.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
