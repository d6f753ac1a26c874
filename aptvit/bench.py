"""Benchmark: timm's uniform ViT against its APT conversion on the same images, on this machine.

One "run" of a configuration pushes every image through the model once (batch 1: one forward
per image; batch 8: one forward per 8 images). Runs of the two models alternate, warm-up runs come
first, everything is under ``torch.inference_mode``, and the reported times are medians. The APT
time includes computing the layout from the pixels (the honest end-to-end number); the layout
time is also reported on its own.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .core.io import InputError, atomic_write
from .images import center_crop_resize, normalise
from .models import ModelSource
from .nn.model import APTViT, model_flops
from .runtime import autocast

logger = logging.getLogger(__name__)

# What a benchmark times with (--clock): elapsed time, or this thread's CPU time, which other processes on a shared
# machine do not inflate but which counts all of torch's work only when torch runs on this one thread
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def add_clock_option(parser, default: str = "wall", threads_option: Optional[str] = "--threads") -> None:
    """Add ``--clock wall|thread`` to an ``argparse`` parser.

    Args:
        threads_option: the option that sets torch's threads, which ``--clock thread`` needs at 1 (``clock_named``
            checks it); None where the command times on one thread by itself.
    """
    one = f" (with {threads_option} 1)" if threads_option else " (timing on one torch thread)"
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default=default,
        help=f"time by elapsed time (wall), or by this thread's CPU time{one}, which other processes on a shared "
        f"machine do not inflate (thread) (default {default})",
    )


def clock_named(name: str, threads_option: Optional[str] = "--threads") -> Callable[[], float]:
    """The clock ``CLOCKS[name]``, for a timing about to run on torch's current threads.

    Raises:
        InputError: an unknown name, or "thread" while torch runs on more than one thread (its CPU time would
            miss the other threads' work); ``threads_option`` is the option to name (None: no check, the caller
            sets one thread itself while timing).
    """
    if name not in CLOCKS:
        raise InputError(f"--clock {name!r} must be one of {', '.join(CLOCKS)}")
    if name == "thread" and threads_option and torch.get_num_threads() != 1:
        raise InputError(
            f"--clock thread counts this thread's CPU time only, and torch runs on {torch.get_num_threads()} "
            f"threads: give {threads_option} 1, or --clock wall"
        )
    return CLOCKS[name]


@dataclass
class BenchRow:
    """One (model, size, batch) measurement; times are milliseconds per image."""

    model: str
    size: str
    batch: int
    images: int
    base_tokens: float  # per image
    tokens: float  # per image, mean
    kept: float  # tokens / base_tokens
    flop_ratio: float  # uniform FLOPs / APT FLOPs
    timm_ms: float
    apt_ms: float
    layout_ms: float
    speedup: float  # timm_ms / apt_ms
    efficiency: float  # speedup / flop_ratio
    layout_share: float  # layout_ms / apt_ms
    apt_given_ms: float = 0.0  # APT with the plan made beforehand (e.g. in data-loader workers)
    device: str = "cpu"
    dtype: str = "float32"


def resize(photos: Sequence[torch.Tensor], size) -> torch.Tensor:
    """(N, 3, h, w) uint8: every (3, H, W) photo resized and center-cropped to ``size`` = (h, w)."""
    return torch.stack([center_crop_resize(p, tuple(size)) for p in photos])


def alternating_medians(
    fns: Dict[str, Callable],
    chunks: Sequence,
    runs: int = 5,
    warmup: int = 2,
    on_run: Optional[Callable[[], None]] = None,
    sync: Optional[Callable[[], None]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, float]:
    """Median seconds for each ``fn`` to process every chunk once, under ``torch.inference_mode``.

    Warm-up passes first; then each run calls every fn in turn, the order reversed every other run
    so that drift in machine speed hits all alike. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before
    each clock read, so that queued device work is timed. ``clock``: wall time by default; ``time.thread_time``
    counts only this thread's CPU time, which other processes on a shared machine do not inflate (valid with
    ``torch.set_num_threads(1)``, where every op runs on the calling thread).
    """
    times: Dict[str, List[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for r in range(warmup + runs):
            for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                if sync:
                    sync()
                start = clock()
                for c in chunks:
                    fns[name](c)
                if sync:
                    sync()
                if r >= warmup:
                    times[name].append(clock() - start)
            if r >= warmup and on_run:
                on_run()
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_config(
    timm_model: torch.nn.Module,
    apt: APTViT,
    images: torch.Tensor,
    batch: int,
    runs: int = 5,
    warmup: int = 2,
    name: str = "",
    on_run: Optional[Callable[[], None]] = None,
    dtype: torch.dtype = torch.float32,
    clock: Callable[[], float] = time.perf_counter,
) -> BenchRow:
    """Time timm vs APT on ``images`` (N, 3, H, W) normalised, on their device, in batches of ``batch``.

    Three APT timings: end to end (layout and plan included), the layout alone, and with the plan made
    beforehand ("layout given": what a data loader that plans in its workers gives the model).
    """
    n, device = images.shape[0], images.device
    chunks = list(range(0, n, batch))
    parts = {i: images[i : i + batch] for i in chunks}
    with torch.inference_mode(), autocast(device, dtype):
        layouts = {i: apt.make_layout(parts[i]) for i in chunks}
        plans = {i: apt.prepare(parts[i], layouts[i]) for i in chunks}
        flops = [model_flops(apt, l) for l in layouts.values()]
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def timed(fn):
        def run(i):
            with autocast(device, dtype):
                return fn(i)

        return run

    fns = {
        "timm": timed(lambda i: timm_model(parts[i])),
        "apt": timed(lambda i: apt(parts[i])),
        "layout": timed(lambda i: apt.make_layout(parts[i])),
        "apt_given": timed(lambda i: apt.forward_packed(parts[i], plans[i])),
    }
    seconds = alternating_medians(fns, chunks, runs, warmup, on_run, sync, clock)
    uniform = torch.cat([f["uniform"] for f in flops]).sum().item()
    adaptive = torch.cat([f["apt"] for f in flops]).sum().item()
    base = sum(int(l.num_base_tokens.sum()) for l in layouts.values()) / n
    tokens = sum(l.total_tokens for l in layouts.values()) / n
    timm_ms, apt_ms, layout_ms, given_ms = (seconds[k] * 1000 / n for k in ("timm", "apt", "layout", "apt_given"))
    speedup, ratio = timm_ms / apt_ms, uniform / adaptive
    return BenchRow(
        model=name,
        size=f"{images.shape[-2]}x{images.shape[-1]}",
        batch=batch,
        images=n,
        base_tokens=base,
        tokens=tokens,
        kept=tokens / base,
        flop_ratio=ratio,
        timm_ms=timm_ms,
        apt_ms=apt_ms,
        layout_ms=layout_ms,
        speedup=speedup,
        efficiency=speedup / ratio,
        layout_share=layout_ms / apt_ms,
        apt_given_ms=given_ms,
        device=device.type,
        dtype=str(dtype).replace("torch.", ""),
    )


def format_table(rows: List[BenchRow]) -> str:
    """A Markdown table of benchmark rows."""
    lines = [
        "| model | size | batch | tokens kept | FLOP ratio | timm ms/img | APT ms/img | speedup | efficiency | layout share "
        "| APT, layout given ms/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.size} | {r.batch} | {r.tokens:.0f}/{r.base_tokens:.0f} ({r.kept:.0%}) | {r.flop_ratio:.2f}x | "
            f"{r.timm_ms:.2f} | {r.apt_ms:.2f} | {r.speedup:.2f}x | {r.efficiency:.2f} | {r.layout_share:.1%} | {r.apt_given_ms:.2f} |"
        )
    return "\n".join(lines)


def write_json(rows: List[BenchRow], path, extra: Optional[Dict] = None) -> None:
    """Write rows (and ``extra`` facts such as the machine) as JSON, atomically."""
    payload = {**(extra or {}), "rows": [asdict(r) for r in rows]}
    text = json.dumps(payload, indent=2)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def plot(rows: List[BenchRow], path) -> None:
    """Speedup and tokens kept per (size, batch), one panel each, as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in rows})
    labels = [f"{r.size} b{r.batch}" + (f"\n{r.model.split('_patch')[0]}" if len(models) > 1 else "") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.3 * len(rows) + 2), 4))
    axes[0].bar(labels, [r.speedup for r in rows], color="tab:blue", label="measured speedup")
    axes[0].plot(labels, [r.flop_ratio for r in rows], "k_", markersize=20, label="FLOP ratio")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("x faster than timm")
    axes[0].legend()
    axes[1].bar(labels, [100 * r.kept for r in rows], color="tab:orange")
    axes[1].set_ylabel("tokens kept (%)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    fig.suptitle(", ".join(models), fontsize=9)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def how_to_read(runs: int, steadier: str) -> str:
    """The line printed under the table: what a speedup is, why it is noisy, and how to get a steadier one."""
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs now" if hasattr(os, "getloadavg") else ""
    return (
        f"how to read: speedup = timm ms / APT ms, medians of {runs} run(s) alternating in this one process: one "
        f"noisy ratio, not a steady figure; other work on this machine shifts it{load}; for steadier numbers run "
        f"{steadier} on an idle machine"
    )


def run_bench(
    models: Sequence,
    sizes: Sequence,
    batches: Sequence[int],
    photos: Sequence[torch.Tensor],
    runs: int = 5,
    warmup: int = 2,
    progress: bool = True,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    clock: Callable[[], float] = time.perf_counter,
) -> List[BenchRow]:
    """The full grid: every model x size x batch.

    Args:
        models: (name, timm model, APT model) triples, in eval mode.
        sizes: (h, w) pairs or ints (squares); photos are resized and center-cropped to each.
        photos: (3, H, W) uint8 images of any size.
    """
    from .progress import progress as progress_bar

    sizes = [(s, s) if isinstance(s, int) else tuple(s) for s in sizes]
    total = len(models) * len(sizes) * len(batches) * runs
    rows = []
    with progress_bar(total=total, desc="bench", unit="run", enabled=progress) as bar:
        for name, model, apt in models:
            mean, std = apt.pixel_mean_std()
            for size in sizes:
                images = normalise(resize(photos, size).to(device), mean, std)
                for batch in batches:
                    # drawn with the next step (a redraw now would print a line per configuration off a terminal)
                    bar.set_postfix_str(f"{name} {size[0]}x{size[1]} batch {batch}", refresh=False)
                    rows.append(
                        bench_config(
                            model,
                            apt,
                            images,
                            batch,
                            runs,
                            warmup,
                            name,
                            on_run=lambda: bar.update(1),
                            dtype=dtype,
                            clock=clock,
                        )
                    )
    return rows


def bench_command(
    source: ModelSource,
    sizes,
    batches,
    images=None,
    runs=5,
    warmup=2,
    out=None,
    plot_path=None,
    steadier: str = "it again with more --runs (e.g. --runs 20)",
) -> List[BenchRow]:
    """``aptvit bench``: build the models, check the sizes, run the grid, print/write the results.

    Args:
        source: the model, its weights, device, dtype, attention backend and layout settings
            (``aptvit.models.ModelSource``).
        steadier: what to run for steadier numbers, as the line under the table says (``how_to_read``).
    """
    from .images import list_images, read_image
    from .photos import PHOTO_NAMES, load_photo
    from .runtime import resolve_device, resolve_dtype
    from .viz import describe_settings

    if runs < 1 or warmup < 0:
        raise InputError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
    if not batches or min(batches) < 1:
        raise InputError(f"--batch sizes must be >= 1, got {batches}")
    compute_dtype = resolve_dtype(source.dtype, "cpu")  # a bad name fails before any work
    where = resolve_device(source.device)
    compute_dtype = resolve_dtype(source.dtype, where)
    apt, timm_model = source.build()
    model = source.model
    apt.eval().to(where), timm_model.eval().to(where)
    p = apt.patch_size
    parsed = []
    for text in str(sizes).split(","):
        h, _, w = text.lower().partition("x")
        try:
            hw = (int(h), int(w or h))
        except ValueError:
            raise InputError(f"--size {text!r} must be a number or HxW, e.g. 384 or 384x640") from None
        if hw[0] % p or hw[1] % p or min(hw) <= 0:
            raise InputError(
                f"--size {hw[0]}x{hw[1]} is not a multiple of the base patch size {p} of {apt.pretrained_cfg.get('architecture') or model}"
            )
        parsed.append(hw)
    photos = [read_image(f) for f in list_images(images)] if images else [load_photo(n) for n in PHOTO_NAMES]
    logger.info(
        f"{len(photos)} images from {images or 'scikit-image (bundled photos)'}; settings: patch sizes "
        f"{'/'.join(map(str, apt.config.patch_sizes))}, "
        f"{describe_settings(apt.config.scorer, apt.config.thresholds, apt.config.budget)}"
        + (" (static: exactly k tokens per image, padding counted as tokens)" if apt.config.static else "")
    )
    name = apt.pretrained_cfg.get("architecture") or model
    logger.info(f"device {where}, {str(compute_dtype).replace('torch.', '')}")
    rows = run_bench(
        [(name, timm_model, apt)], parsed, batches, photos, runs, warmup, device=where, dtype=compute_dtype
    )
    logger.info(format_table(rows))
    logger.info(how_to_read(runs, steadier))
    if out:
        write_json(
            rows,
            out,
            {
                "config": apt.config.to_dict(),
                "runs": runs,
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
            },
        )
        logger.info(f"results: {out}")
    if plot_path:
        plot(rows, plot_path)
        logger.info(f"plot: {plot_path}")
    return rows
