"""The ``aptvit`` command line: argument parsing only; the work is in viz, bench, train, evaluate.

Every user error (a missing file, a bad option, an unknown model) is one line on stderr and exit
code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Dict, List, Optional, Union

from . import __version__
from .runtime import DEVICES, DTYPE_CHOICES


class CLIError(Exception):
    """A user error with a message worth showing as is."""


# ---------------------------------------------------------------------------------------------- parsing helpers
def parse_int_list(text: str, name: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise CLIError(f"{name} {text!r} must be comma-separated integers, e.g. 16,32,64")
    return values


def parse_thresholds(text: str) -> Dict[int, float]:
    """'32=5.5,64=4.0' -> {32: 5.5, 64: 4.0}."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(key)] = float(value)
        except ValueError:
            raise CLIError(
                f"--thresholds {text!r} is not SIZE=VALUE[,SIZE=VALUE...] with patch sizes in pixels, e.g. 32=5.5,64=4.0"
            ) from None
    return out


def parse_budget(text: str) -> Union[int, float]:
    """'0.5' -> 0.5 (fraction of base tokens); '300' -> 300 (tokens per image)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise CLIError(f"--budget {text!r} must be a fraction such as 0.5 or a token count such as 300") from None


def layout_settings(args) -> dict:
    """thresholds= / budget= from --thresholds / --budget (at most one)."""
    if args.thresholds and args.budget:
        raise CLIError("give --thresholds or --budget, not both")
    if args.thresholds:
        return {"thresholds": parse_thresholds(args.thresholds)}
    if args.budget:
        return {"budget": parse_budget(args.budget)}
    return {}


def check_model_name(name: str) -> str:
    import timm

    if timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
    hint = f"; closest timm names: {', '.join(close)}" if close else "; see timm.list_models('vit_*')"
    raise CLIError(f"unknown model {name!r}{hint}")


def add_layout_options(p: argparse.ArgumentParser, patch_default: Optional[str]) -> None:
    p.add_argument("--patch-sizes", default=patch_default, help="ascending patch sizes, e.g. 16,32,64 (default: the model's p,2p,4p)")
    p.add_argument("--thresholds", help="SIZE=VALUE pairs, e.g. 32=5.5,64=4.0 (default: the scorer's documented defaults)")
    p.add_argument("--budget", help="at most this many tokens per image: a fraction (0.5) or a count (300)")
    p.add_argument("--scorer", choices=["entropy", "laplacian", "upsample"], help="content score (default: entropy)")


def add_runtime_options(p: argparse.ArgumentParser, device_default: Optional[str] = "auto") -> None:
    p.add_argument("--device", choices=DEVICES, default=device_default, help="where to run (default auto: CUDA when available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="compute precision (default auto: bf16 on CUDA, fp32 on CPU)")


def add_weights_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the model hub)")
    g.add_argument("--checkpoint", help="weights to load: .safetensors (timm or aptvit) or .pth (loaded with weights_only=True)")


# ---------------------------------------------------------------------------------------------- commands
def cmd_show(args) -> int:
    from .images import parse_size
    from .viz import show

    size = parse_size(args.size) if args.size else None
    show(args.images, size=size, patch_sizes=parse_int_list(args.patch_sizes, "--patch-sizes"), scorer=args.scorer or "entropy",
         out_dir=args.out, write_json=args.json, heatmap=args.heatmap, **layout_settings(args))
    return 0


def cmd_bench(args) -> int:
    from .bench import bench_command

    bench_command(
        model=check_model_name(args.model), sizes=args.size, batches=parse_int_list(args.batch, "--batch"),
        images=args.images, layout=layout_settings(args), scorer=args.scorer,
        patch_sizes=parse_int_list(args.patch_sizes, "--patch-sizes") if args.patch_sizes else None,
        runs=args.runs, warmup=args.warmup, out=args.out, plot_path=args.plot, pretrained=args.pretrained,
        checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
    )
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    demo(args.out, model=check_model_name(args.model), size=args.size, runs=args.runs)
    return 0


def cmd_finetune(args) -> int:
    from .train import RUN_CONTROL, TrainConfig, finetune

    layout = layout_settings(args)
    # run-control options given on the command line (the others keep their defaults, or, on --resume, the run's)
    given = {"epochs": args.epochs, "max_steps": args.max_steps, "workers": args.workers, "save_every": args.save_every,
             "log_every": args.log_every, "skip_bad_images": args.skip_bad_images or None, "eval": False if args.no_eval else None,
             "device": args.device, "deterministic": args.deterministic or None}
    control = {k: v for k, v in given.items() if v is not None and k in RUN_CONTROL}
    cfg = TrainConfig(
        model=check_model_name(args.model), data=args.data, out=args.out, pretrained=args.pretrained, checkpoint=args.checkpoint,
        size=args.size, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        patch_sizes=parse_int_list(args.patch_sizes, "--patch-sizes") if args.patch_sizes else None, scorer=args.scorer,
        thresholds=layout.get("thresholds"), budget=layout.get("budget"), drop_path=args.drop_path, warmup=args.warmup,
        augment=args.augment, dtype=args.dtype, **control,
        **({"new_layer_lr_scale": args.new_layer_lr_scale} if args.new_layer_lr_scale is not None else {}),
    )
    finetune(cfg, resume=args.resume, overrides=control)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import eval_command

    eval_command(checkpoint=args.checkpoint, model_name=check_model_name(args.model) if args.model else None,
                 pretrained=args.pretrained, data=args.data, uniform=args.uniform, size=args.size,
                 batch_size=args.batch_size, workers=args.workers, json_path=args.json,
                 skip_bad_images=args.skip_bad_images, device=args.device, dtype=args.dtype,
                 layout=dict(layout_settings(args), scorer=args.scorer,
                             patch_sizes=parse_int_list(args.patch_sizes, "--patch-sizes") if args.patch_sizes else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aptvit", description="Adaptive Patch Transformers: faster timm ViTs with a content-aware mix of patch sizes."
    )
    parser.add_argument("--version", action="version", version=f"aptvit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("show", help="draw the patch layout of images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--size", help="resize: one number = shorter side (keeps aspect, pads to the base patch), or HxW")
    add_layout_options(p, "16,32,64")
    p.add_argument("--out", help="folder for the pictures (default: beside each image)")
    p.add_argument("--json", action="store_true", help="also write the boxes as JSON")
    p.add_argument("--heatmap", action="store_true", help="add a panel with the score of the 2x patches")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("bench", help="timm forward vs APT forward on your images")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--size", default="384", help="comma-separated sizes (224,384) or HxW, multiples of the patch size")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--images", help="folder of images (default: the photos bundled with scikit-image)")
    add_layout_options(p, None)
    add_weights_options(p)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--plot", help="write a PNG of speedup and tokens kept")
    add_runtime_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="layouts of the bundled photos and a short benchmark (no arguments needed)")
    p.add_argument("--out", default="aptvit-demo", help="folder for the pictures")
    p.add_argument("--model", default="vit_small_patch16_224", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=384, help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=3, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("finetune", help="convert a timm ViT and fine-tune it on an ImageFolder (train/ and val/)")
    p.add_argument("--model", required=True)
    add_weights_options(p)
    p.add_argument("--data", required=True, help="folder with train/ and val/, one sub-folder per class")
    p.add_argument("--out", required=True, help="run directory (must not exist unless --resume)")
    p.add_argument("--epochs", type=int, help="default 1")
    p.add_argument("--size", type=int, default=384)
    add_layout_options(p, None)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of all steps")
    p.add_argument("--new-layer-lr-scale", type=float,
                   help="lr multiplier of the new zero-initialised detail-path layers apt.* (default 10)")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--augment", default="rand-m9-mstd0.5-inc1", help="timm auto-augment string, or 'none' (no random crop either)")
    p.add_argument("--workers", type=int, help="loader processes (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(--epochs, --max-steps, --workers, --save-every, --log-every, --no-eval, --skip-bad-images may change)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images instead of stopping")
    p.add_argument("--max-steps", type=int, help="stop (and checkpoint) after this many optimizer steps")
    p.add_argument("--save-every", type=int, help="also checkpoint every N steps (default 0: at epoch ends)")
    p.add_argument("--log-every", type=int, help="default 10")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end of each epoch")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels: bit-exact --resume on CUDA too (slower)")
    add_runtime_options(p, device_default=None)  # None: the run's own device on --resume
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="top-1/top-5, tokens kept and img/s on an ImageFolder split")
    p.add_argument("--checkpoint", help="an aptvit model.safetensors, or timm weights with --model")
    p.add_argument("--model", help="timm model name (for --pretrained, timm checkpoints and --uniform)")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--data", required=True, help="the split to evaluate (a folder of class folders, or DIR with val/)")
    p.add_argument("--uniform", action="store_true", help="evaluate the unconverted timm model (the baseline)")
    p.add_argument("--size", type=int, help="input size (default: the checkpoint's or the model's)")
    add_layout_options(p, None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument("--skip-bad-images", action="store_true")
    add_runtime_options(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("aptvit: interrupted", file=sys.stderr)
        return 130
    except (CLIError, RuntimeError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, ImportError) as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"aptvit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
