"""APT from a Hugging Face tower against the HF model's own forward, on the CPU: speedup / FLOP ratio.

    pip install 'aptvit[hf]'
    python benchmarks/bench_hf.py [--runs 3] [--batches 1,8] [--layers 12] [--threads 1] [--clock thread|wall]
                                  [--out docs/results/hf] [--smoke]

Models (random weights, the real structure; no hub here): ``transformers.CLIPVisionModel`` ViT-B/16 at 336 px
(openai/clip-vit-base-patch16's tower, its positions resampled to 336 by HF's ``interpolate_pos_encoding``) and
``transformers.SiglipVisionModel`` ViT-B/16 at 384 px (google/siglip-base-patch16-384), each converted with the
library's defaults (``aptvit.convert(hf)``: entropy, patch sizes p / 2p; the area bias until 2026-12-07, off
since). The 8 scikit-image photos,
normalised as each model expects, in batches of 1 and 8; HF's forward (``hf(pixel_values=x)``, sdpa attention)
and the APT forward (layout included) alternate after warm-up (``aptvit.bench.alternating_medians``), medians per
image. FLOP ratio: uniform over APT FLOPs (``model_flops``), efficiency: speedup / FLOP ratio. With ``--threads 1
--clock thread`` the times are this thread's CPU seconds, which other processes on a shared machine do not inflate.
``--layers`` fewer than 12 keeps each block as it is and weighs the embedding and the layout more (a cheaper,
conservative run). Writes ``<out>.md`` and ``<out>.json`` (atomically). ``--smoke``: 2-layer models at 64 px, one run (seconds).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aptvit  # noqa: E402
from aptvit.bench import add_clock_option, alternating_medians, clock_named  # noqa: E402
from aptvit.core.io import InputError, atomic_write  # noqa: E402
from aptvit.images import normalise  # noqa: E402
from aptvit.nn.model import model_flops  # noqa: E402
from aptvit.photos import PHOTO_NAMES, load_photo  # noqa: E402


def models(smoke: bool, layers: int = 12):
    """(name, HF model, side, interpolate_pos_encoding) of the benchmark (random weights, eval mode)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    layers = 2 if smoke else layers
    common = dict(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=16, num_hidden_layers=layers
    )
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=224, **common)).eval()
    siglip = SiglipVisionModel(SiglipVisionConfig(image_size=64 if smoke else 384, **common)).eval()
    return [
        ("CLIPVisionModel B/16", clip, 64 if smoke else 336, True),
        ("SiglipVisionModel B/16", siglip, 64 if smoke else 384, False),
    ]


def bench(name, hf, side, interpolate, photos, batch, runs, warmup, clock):
    apt = aptvit.convert(hf).eval()
    mean, std = apt.pixel_mean_std()
    images = normalise(torch.stack([load_photo(n, side) for n in photos]), mean, std)
    chunks = list(range(0, len(images), batch))
    parts = {i: images[i : i + batch] for i in chunks}
    kw = {"interpolate_pos_encoding": True} if interpolate else {}
    with torch.inference_mode():
        layouts = [apt.make_layout(parts[i]) for i in chunks]
        flops = [model_flops(apt, layout) for layout in layouts]
    fns = {"hf": lambda i: hf(pixel_values=parts[i], **kw), "apt": lambda i: apt(parts[i])}
    seconds = alternating_medians(fns, chunks, runs, warmup, clock=clock)
    uniform = float(sum(f["uniform"].sum() for f in flops))
    adaptive = float(sum(f["apt"].sum() for f in flops))
    tokens = sum(layout.total_tokens for layout in layouts) / len(images)
    base = (side // 16) ** 2
    hf_ms, apt_ms = (seconds[k] * 1000 / len(images) for k in ("hf", "apt"))
    ratio, speedup = uniform / adaptive, hf_ms / apt_ms
    return dict(
        model=name, size=side, batch=batch, tokens=tokens, base_tokens=base, flop_ratio=ratio, hf_ms=hf_ms,
        apt_ms=apt_ms, speedup=speedup, efficiency=speedup / ratio,
    )  # fmt: skip


def table(rows):
    lines = [
        "| model | size | batch | tokens kept | FLOP ratio | HF ms/img | APT ms/img | speedup | efficiency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch']} | {r['tokens']:.0f}/{r['base_tokens']} "
            f"({r['tokens'] / r['base_tokens']:.0%}) | {r['flop_ratio']:.2f}x | {r['hf_ms']:.1f} | {r['apt_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r['efficiency']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=12, help="blocks of each model (12: the real ViT-B)")
    add_clock_option(parser, default="thread")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    parser.add_argument("--smoke", action="store_true", help="seconds: 2-layer models at 64 px, one run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.warmup = 1, 0
    torch.set_num_threads(args.threads)
    try:
        clock = clock_named(args.clock)
    except InputError as e:
        parser.error(str(e))
    photos = PHOTO_NAMES[:8]
    start = time.time()
    rows = []
    for name, hf, side, interpolate in models(args.smoke, args.layers):
        for batch in [int(b) for b in args.batches.split(",")]:
            rows.append(bench(name, hf, side, interpolate, photos, batch, args.runs, args.warmup, clock))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    facts = {
        "command": "python benchmarks/bench_hf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads,
        "layers": 2 if args.smoke else args.layers,
        "clock": args.clock,
        "load_average_at_end": load,
        "minutes": round((time.time() - start) / 60, 1),
        "photos": list(photos),
    }
    text = (
        table(rows) + f"\n\n{facts['date']}, {facts['machine']}, {args.threads} thread(s), {args.clock} clock, "
        f"{facts['layers']} layers, {args.runs} runs after {args.warmup} warm-up, load average {load} (at the end), {len(photos)} photos\n"
    )
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        atomic_write(
            out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({**facts, "rows": rows}, indent=2))
        )
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
