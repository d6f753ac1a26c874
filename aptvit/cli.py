"""The ``aptvit`` command line: argument parsing only; the work is in viz, bench, train, evaluate.

Every user error (a missing file, a bad option, an unknown model, a full disk) is one line on stderr and
exit code 2; ``--debug`` shows the traceback instead. A user error is exactly a ``UserError`` (``core.io``: raised
wherever the user's input is at fault: reading or writing a file, checking an argument; its subclasses are also
the ``ValueError`` / ``TypeError`` / ``OSError`` / ``ImportError`` the Python API documents), or torch running out
of memory (the machine's limit: a smaller batch or size fixes it). Anything else (inside torch, by the
interpreter, a ``ValueError`` from aptvit's own arithmetic) is a bug and keeps its traceback.

What the commands report goes through ``logging`` (the "aptvit" loggers, at INFO); while ``main`` runs, a handler
prints each message bare on stdout, so the command line shows them and a library user sees nothing unasked.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from contextlib import contextmanager
from typing import Dict, List, Optional, Union

from . import __version__
from .core.io import MAX_SIDE, InputError, UserError
from .runtime import DEVICES, DTYPE_CHOICES


# ---------------------------------------------------------------------------------------------- parsing helpers
def parse_int_list(text: str, name: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise InputError(f"{name} {text!r} must be comma-separated integers, e.g. 16,32,64")
    return values


def parse_thresholds(text: str) -> Dict[int, float]:
    """'32=5.5,64=4.0' -> {32: 5.5, 64: 4.0}."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            size, threshold = int(key), float(value)
        except ValueError:
            raise InputError(
                f"--thresholds {text!r} is not SIZE=VALUE[,SIZE=VALUE...] with patch sizes in pixels, e.g. 32=5.5,64=4.0"
            ) from None
        if size in out:
            raise InputError(f"--thresholds {text!r} gives size {size} more than once; give each patch size once")
        out[size] = threshold
    return out


def parse_budget(text: str) -> Union[int, float]:
    """'0.5' -> 0.5 (fraction of base tokens); '300' -> 300 (tokens per image)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise InputError(f"--budget {text!r} must be a fraction such as 0.5 or a token count such as 300") from None


def parse_scorer_args(text: str) -> Dict[str, object]:
    """'bins=256' -> {"bins": 256}: each value read as JSON (a number, true, a list...), else kept as a string."""
    import json

    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--scorer-args {text!r} is not NAME=VALUE[,NAME=VALUE...], e.g. bins=256")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def layout_settings(args) -> dict:
    """The layout options given on the command line, as ``APTConfig`` fields (those left out are not in it):
    patch_sizes=, thresholds= or budget= (at most one), scorer=, scorer_args=, area_bias= (commands that run a model),
    static= (bench, eval)."""
    if args.thresholds and args.budget:
        raise InputError("give --thresholds or --budget, not both")
    out = {
        "patch_sizes": parse_int_list(args.patch_sizes, "--patch-sizes") if args.patch_sizes else None,
        "thresholds": parse_thresholds(args.thresholds) if args.thresholds else None,
        "budget": parse_budget(args.budget) if args.budget else None,
        "scorer": args.scorer,
        "scorer_args": parse_scorer_args(args.scorer_args) if args.scorer_args else None,
        "area_bias": getattr(args, "area_bias", None),  # None: not given (show draws layouts, it has no model)
        "static": True if getattr(args, "static", False) else None,  # bench and eval have --static
    }
    return {k: v for k, v in out.items() if v is not None}


def default_of(source, name: str):
    """The default of field ``name`` of a dataclass, or of parameter ``name`` of a function: the one source
    of every default that the command line shows or uses."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(source):
        (f,) = [f for f in dataclasses.fields(source) if f.name == name]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default
    return inspect.signature(source).parameters[name].default


def check_static(args) -> None:
    """``--static`` runs exactly k tokens per image: it needs a budget, given or in an aptvit --checkpoint."""
    if not getattr(args, "static", False) or args.budget:
        return
    if args.thresholds:
        raise InputError(
            "--static needs --budget, not --thresholds: exactly k tokens per image; drop --static for thresholds"
        )
    if args.checkpoint:
        from .models import check_readable
        from .nn.checkpoint import read_config

        check_readable(args.checkpoint)
        saved = read_config(args.checkpoint)
        if saved is not None and saved.budget is not None:
            return
    held = f"; {args.checkpoint} has none" if args.checkpoint else ""
    raise InputError(
        f"--static needs a token budget (exactly k tokens per image){held}: give --budget 0.5 (a fraction of the "
        "base tokens) or --budget 100 (a count), or drop --static"
    )


def model_source(args, model: Optional[str]):
    """The ``ModelSource`` of bench's and eval's shared options (weights, runtime, layout; see their adders)."""
    from .models import ModelSource

    check_static(args)
    return ModelSource(
        model=model,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        layout=layout_settings(args),
    )


def checkpoint_architecture(path: Optional[str]) -> Optional[str]:
    """The architecture an aptvit checkpoint at ``path`` names (None for no file, timm weights or no name)."""
    if not path or not os.path.isfile(path):
        return None  # a missing file is reported where it is read
    from .models import check_readable, is_aptvit_checkpoint
    from .nn.checkpoint import read_metadata

    check_readable(path)
    return (read_metadata(path).get("architecture") or None) if is_aptvit_checkpoint(path) else None


def check_model_name(name: str) -> str:
    import timm

    if timm.is_model(name):
        from .models import check_vit_name

        return check_vit_name(name)
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
    hint = f"; closest timm names: {', '.join(close)}" if close else "; see timm.list_models('vit_*')"
    raise InputError(f"unknown model {name!r}{hint}")


def add_static_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--static",
        action="store_true",
        help="the fully static path: exactly k tokens per image (k from the budget; needs --budget or a checkpoint "
        "with one), layout and plan on the device with no host read (one CUDA graph holds the whole forward)",
    )


def add_layout_options(p: argparse.ArgumentParser, patch_default: str = "the model's p,2p", model: bool = True) -> None:
    """The conversion settings as options; ``model``: the command runs a model (adds --area-bias)."""
    p.add_argument("--patch-sizes", help=f"ascending patch sizes, e.g. 16,32,64 (default: {patch_default})")
    p.add_argument(
        "--thresholds", help="SIZE=VALUE pairs, e.g. 32=5.5,64=4.0 (default: the scorer's documented defaults)"
    )
    p.add_argument("--budget", help="at most this many tokens per image: a fraction (0.5) or a count (300)")
    from .core.scoring import SCORERS
    from .nn.config import APTConfig

    p.add_argument("--scorer", choices=sorted(SCORERS), help=f"content score (default: {APTConfig.scorer})")
    p.add_argument(
        "--scorer-args",
        help="the scorer's parameters as NAME=VALUE pairs, e.g. bins=256 for entropy (default: the registered ones)",
    )
    if model:
        p.add_argument(
            "--area-bias",
            action=argparse.BooleanOptionalAction,
            help="area-proportional attention: a merged token is attended as much as the patches it replaces "
            f"(default: the checkpoint's setting, else {APTConfig.area_bias})",
        )


def add_picture_options(p: argparse.ArgumentParser) -> None:
    from .viz import DPI, PANEL_WIDTH

    p.add_argument("--width", type=int, help=f"width of each picture in pixels (default: {PANEL_WIDTH} per panel)")
    p.add_argument(
        "--dpi", type=int, default=DPI, help=f"resolution: higher gives larger text for the same width (default {DPI})"
    )


def add_runtime_options(p: argparse.ArgumentParser, default: Optional[str] = "auto") -> None:
    from .nn.attention import backend_choices

    p.add_argument(
        "--attention",
        choices=backend_choices(),
        default=default,
        help="attention backend (default auto: the fastest that runs on the device and dtype)",
    )
    p.add_argument(
        "--device", choices=DEVICES, default=default, help="where to run (default auto: CUDA when available)"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=default,
        help="compute precision (default auto: bf16 on CUDA, fp32 on CPU)",
    )


def add_weights_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the model hub)")
    g.add_argument(
        "--checkpoint", help="weights to load: .safetensors (timm or aptvit) or .pth (loaded with weights_only=True)"
    )


# ---------------------------------------------------------------------------------------------- commands
def cmd_show(args) -> int:
    from .images import parse_size
    from .viz import show

    show(  # only the options given: show's own defaults for the rest
        args.images,
        out_dir=args.out,
        write_json=args.json,
        heatmap=args.heatmap,
        width=args.width,
        dpi=args.dpi,
        overwrite=args.overwrite,
        **({"size": parse_size(args.size)} if args.size else {}),
        **layout_settings(args),
    )
    return 0


def check_bench_sizes(text: str) -> None:
    """Every --size of bench positive and within the limit (the multiple of the patch is checked with the model)."""
    from .core.io import check_side

    for item in text.split(","):
        try:
            sides = [int(t) for t in item.lower().split("x")]
        except ValueError:
            continue  # bench names the malformed item
        for side in sides:
            check_side(side, f"--size {item}" if len(sides) > 1 else "--size")


def cmd_bench(args) -> int:
    from .bench import bench_command
    from .core.io import check_writable
    from .images import list_images

    check_bench_sizes(args.size)
    if args.images:
        list_images(args.images, what="--images")
    for path in (args.out, args.plot):  # before the minutes of timing, not after them
        if path:
            check_writable(path)
    bench_command(
        model_source(args, check_model_name(args.model)),
        sizes=args.size,
        batches=parse_int_list(args.batch, "--batch"),
        images=args.images,
        runs=args.runs,
        warmup=args.warmup,
        out=args.out,
        plot_path=args.plot,
    )
    return 0


def cmd_demo(args) -> int:
    from .core.io import check_side, check_writable
    from .demo import demo

    check_writable(args.out, folder=True)
    demo(
        args.out,
        model=check_model_name(args.model),
        size=args.size,
        runs=args.runs,
        bench=not args.layouts_only,
        photo_size=check_side(args.photo_size, "--photo-size"),
    )
    return 0


def cmd_finetune(args) -> int:
    from .models import conversion_settings
    from .train import TrainConfig, finetune

    # only the options given on the command line (every default is None): the others keep TrainConfig's defaults,
    # or on --resume the run's own, and only a given option can be a change that --resume refuses
    given = {name: getattr(args, name) for name in finetune_settings() if getattr(args, name) is not None}
    own = None if args.resume or "model" in given else checkpoint_architecture(args.checkpoint)
    if own:  # an aptvit checkpoint brings its model (a converted Hugging Face tower's too, "hf:<class>")
        given["model"] = own
    needed = [n for n, f in finetune_settings().items() if has_no_default(f) and n not in given]
    if args.resume and "out" in given:  # what was left out is the run's own
        from .train import read_run_config

        saved = read_run_config(given["out"])
        given.update({n: getattr(saved, n) for n in needed if n != "out"})
    elif needed:
        from .train import option_name

        names = " and ".join(option_name(n) + (" (or an aptvit --checkpoint)" if n == "model" else "") for n in needed)
        raise InputError(
            f"{names} {'is' if len(needed) == 1 else 'are'} needed for a new run (--resume needs only --out)"
        )
    if args.model is not None:  # a name typed (one from a checkpoint or the resumed run is that model's own)
        given["model"] = check_model_name(args.model)
    settings = layout_settings(args)
    # the conversion settings: the given ones on top of an aptvit --checkpoint's own (or APTConfig's defaults); a
    # resumed run has its own (its config.json, its weights) and only compares what was given: the original
    # --checkpoint need not exist any more
    apt = conversion_settings(args.checkpoint, **settings) if settings and not args.resume else None
    finetune(TrainConfig(**given, apt=apt), resume=args.resume, overrides={**given, **settings})
    return 0


def cmd_eval(args) -> int:
    from .evaluate import eval_command

    eval_command(
        model_source(args, check_model_name(args.model) if args.model else None),
        data=args.data,
        uniform=args.uniform,
        size=args.size,
        batch_size=args.batch_size,
        workers=args.workers,
        json_path=args.json,
        skip_bad_images=args.skip_bad_images,
        teacher=args.teacher,
        limit=args.limit,
    )
    return 0


def parse_thresholds_items(items: List[str]) -> List[object]:
    """calibrate's --thresholds: each item 'default' or SIZE=VALUE[,SIZE=VALUE...]; 'none' alone: no thresholds."""
    if items == ["none"]:
        return []
    return [t if t == "default" else parse_thresholds(t) for t in items]


def cmd_calibrate(args) -> int:
    from .calibrate import DEFAULT_BUDGETS, calibrate_command

    budgets = args.budgets or ",".join(map(str, DEFAULT_BUDGETS))
    from .models import ModelSource

    source = ModelSource(  # the settings to sweep are calibrate's own options, not the model's
        model=check_model_name(args.model) if args.model else None,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
    )
    calibrate_command(
        source,
        data=args.data,
        size=args.size,
        sizes=parse_int_list(args.sizes, "--sizes") if args.sizes else None,
        budgets=[] if budgets == "none" else [parse_budget(b) for b in budgets.split(",") if b.strip()],
        thresholds=parse_thresholds_items(args.thresholds),
        scorers=args.scorers.split(",") if args.scorers else None,
        patch_sizes=[parse_int_list(t, "--patch-sizes") for t in args.patch_sizes] if args.patch_sizes else None,
        area_bias=args.area_bias,
        max_drop=args.max_drop,
        min_agreement=args.min_agreement,
        min_cosine=args.min_cosine,
        confidence=args.confidence,
        limit=args.limit,
        batch_size=args.batch_size,
        workers=args.workers,
        timing_images=args.timing_images,
        runs=args.runs,
        warmup=args.warmup,
        out=args.out,
        skip_bad_images=args.skip_bad_images,
        clock=args.clock,
    )
    return 0


def cmd_export(args) -> int:
    from .core.io import check_side
    from .export import export_command

    if args.size is not None:
        check_side(args.size, "--size")
    export_command(
        check_model_name(args.model) if args.model else None,
        args.out,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        layout=layout_settings(args),
        size=args.size,
        attention=args.attention,
        format=args.format,
        pre_logits=args.pre_logits,
        dense=args.dense,
        check=not args.no_check,
    )
    return 0


def add_calibrate_parser(sub) -> None:
    from .calibrate import AREA_BIAS_SWEEPS, DEFAULT_BUDGETS, calibrate
    from .core.scoring import SCORERS

    p = sub.add_parser(
        "calibrate",
        help="sweep thresholds / budgets, scorers, patch sizes and lower resolutions on your images; "
        "pick the cheapest setting that keeps a target",
    )
    p.add_argument("--data", required=True, help="a folder of images; class folders (as eval's) give top-1")
    p.add_argument("--checkpoint", help="an aptvit model.safetensors, or timm weights with --model")
    p.add_argument("--model", help="timm model name (for --pretrained and timm checkpoints)")
    p.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights of --model (needs the model hub)"
    )
    p.add_argument(
        "--size",
        type=int,
        help=f"the source's input size (default: the checkpoint's or the model's; at most {MAX_SIDE})",
    )
    p.add_argument(
        "--sizes",
        help="comma-separated sizes to try, each a lower resolution and a size for APT (default: the input "
        "size and the multiples of the patch size that keep about 75%%, 50%%, 35%% of its tokens)",
    )
    p.add_argument(
        "--budgets",
        help="comma-separated token budgets, fractions or counts, or 'none' "
        f"(default {','.join(map(str, DEFAULT_BUDGETS))})",
    )
    p.add_argument(
        "--thresholds",
        nargs="+",
        default=["default"],
        metavar="T",
        help="threshold settings to try, each 'default' (the scorer's) or SIZE=VALUE[,SIZE=VALUE]; 'none' for none "
        "(default: default)",
    )
    p.add_argument(
        "--scorers", help=f"comma-separated scorers from {', '.join(sorted(SCORERS))} (default: the model's)"
    )
    p.add_argument(
        "--area-bias",
        choices=tuple(AREA_BIAS_SWEEPS),
        default=default_of(calibrate, "area_bias"),
        help="each APT setting without and with area-proportional attention (both, the default: which is better "
        "depends on your data), or with that one only",
    )
    p.add_argument(
        "--patch-sizes",
        nargs="+",
        metavar="SIZES",
        help="patch-size sets to try, e.g. 14,28 14,28,56 (default: the model's; p,2p for a model of one size)",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--max-drop", type=float, help="target: at most this many points of top-1 below the source (needs labels)"
    )
    target.add_argument(
        "--min-agreement", type=float, help="target: at least this fraction of images with the source's top-1 class"
    )
    target.add_argument("--min-cosine", type=float, help="target: at least this class cosine to the source")
    p.add_argument(
        "--confidence",
        type=float,
        help="with --max-drop: the top-1 drop plus this many standard errors must be within it (default 1; 0: the "
        "drop alone, which on few images picks the luckiest of many settings)",
    )
    p.add_argument(
        "--limit", type=int, default=default_of(calibrate, "limit"), help="at most this many images (0: all)"
    )
    p.add_argument(
        "--out", default="aptvit-calibrate", help="folder for calibration.{json,md,png} and model.safetensors"
    )
    for option, what in (  # calibrate's own defaults, shown by argparse
        ("--batch-size", "images per batch"),
        ("--workers", "loader processes"),
        ("--timing-images", "images of each speed measurement"),
        ("--runs", "timed runs of each setting, alternating with the source"),
        ("--warmup", "untimed runs first"),
    ):
        default = default_of(calibrate, option[2:].replace("-", "_"))
        p.add_argument(option, type=int, default=default, help=f"{what} (default %(default)s)")
    from .bench import add_clock_option

    add_clock_option(p, default_of(calibrate, "clock"), threads_option=None)  # calibrate times on one thread itself
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip (and count) unreadable images instead of stopping"
    )
    add_runtime_options(p)
    p.set_defaults(func=cmd_calibrate)


def finetune_settings() -> Dict[str, object]:
    """The ``TrainConfig`` fields that ``aptvit finetune`` has an option for (declared ``cli=True``), by name."""
    from .train import FIELDS

    return {name: f for name, f in FIELDS.items() if f.metadata["cli"]}


def has_no_default(f) -> bool:
    """Whether a ``TrainConfig`` field has no default: a new run must be given it (--model, --data, --out)."""
    import dataclasses

    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def add_setting_options(p: argparse.ArgumentParser) -> None:
    """One option per ``finetune_settings()`` field, generated from its declaration: the name (``option_name``),
    the type (the field's), the help (with the field's default) and ``--resume``'s list (``RUN_CONTROL``).

    Every default is None: the command line passes on only what was given (a new run takes TrainConfig's defaults,
    a resumed run its own). A field without a default must be given (``cmd_finetune`` checks it: --resume needs only
    --out); booleans are flags.
    """
    import typing

    from .nn.attention import backend_choices
    from .train import RUN_CONTROL, TrainConfig, option_name

    choices = {"device": DEVICES, "dtype": DTYPE_CHOICES, "attention": backend_choices()}
    extra = {"size": f"at most {MAX_SIDE}"}
    hints = typing.get_type_hints(TrainConfig)
    weights = p.add_mutually_exclusive_group()  # --pretrained or --checkpoint
    for name, f in finetune_settings().items():
        kind = hints[name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        required = has_no_default(f)
        default = None if required else default_of(TrainConfig, name)
        notes = [f"default {default}"] if kind is not bool and default is not None else []
        notes += [extra[name]] if name in extra else []
        text = " ".join([f.metadata["help"]] * bool(f.metadata["help"]) + [f"({', '.join(notes)})"] * bool(notes))
        group = weights if name in ("pretrained", "checkpoint") else p
        if kind is bool:
            # a flag gives the value that is not the default (--no-eval: eval=False)
            group.add_argument(option_name(name), dest=name, action="store_const", const=not default, help=text)
        else:
            group.add_argument(
                option_name(name), dest=name, type=kind, required=name == "out", choices=choices.get(name), help=text
            )
    may_change = ", ".join(option_name(n) for n in RUN_CONTROL)
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run in --out from its last checkpoint (or from its start when it has none); only "
        f"{may_change} may change",
    )


def build_parser() -> argparse.ArgumentParser:
    from .bench import bench_command
    from .demo import DEMO_SIZE
    from .evaluate import default_workers, eval_command
    from .viz import SHOW_BASE_SIZE

    parser = argparse.ArgumentParser(
        prog="aptvit",
        description="Adaptive Patch Transformers: faster timm ViTs with a content-aware mix of patch sizes.",
    )
    parser.add_argument("--version", action="version", version=f"aptvit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("show", help="draw the patch layout of images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--size", help="resize: one number = shorter side (keeps aspect, pads to the base patch), or HxW")
    add_layout_options(
        p, f"{SHOW_BASE_SIZE} and the sizes --thresholds names, else {SHOW_BASE_SIZE},{2 * SHOW_BASE_SIZE}", model=False
    )
    p.add_argument(
        "--out", help="folder for NAME_apt.png (and NAME_apt.json), created if missing (default: beside each image)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing NAME_apt.png/.json files (default: refuse them)"
    )
    p.add_argument("--json", action="store_true", help="also write the boxes as JSON")
    p.add_argument("--heatmap", action="store_true", help="add a panel with the score of the 2x patches")
    add_picture_options(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("bench", help="timm forward vs APT forward on your images")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (default vit_base_patch16_224)")
    p.add_argument("--size", default="384", help="comma-separated sizes (224,384) or HxW, multiples of the patch size")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--images", help="folder of images (default: the photos bundled with scikit-image)")
    add_layout_options(p)
    add_static_option(p)
    add_weights_options(p)
    p.add_argument(
        "--runs",
        type=int,
        default=default_of(bench_command, "runs"),
        help=f"timed runs of each setting, the median reported (default {default_of(bench_command, 'runs')})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=default_of(bench_command, "warmup"),
        help=f"untimed runs before them (default {default_of(bench_command, 'warmup')})",
    )
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--plot", help="write a PNG of speedup and tokens kept")
    add_runtime_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="layouts of the bundled photos and a short benchmark (no arguments needed)")
    p.add_argument(
        "--out",
        default="aptvit-demo",
        help="folder for the pictures, created if missing; a rerun replaces the demo's own files there, a folder "
        "with other files is refused (default aptvit-demo)",
    )
    p.add_argument("--layouts-only", action="store_true", help="draw the layouts, skip the benchmark")
    p.add_argument("--model", default="vit_small_patch16_224", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=384, help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--photo-size", type=int, default=DEMO_SIZE, help=argparse.SUPPRESS)  # the layouts' (tests)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("finetune", help="convert a timm ViT and fine-tune it on an ImageFolder (train/ and val/)")
    add_setting_options(p)  # generated from TrainConfig's declarations
    add_layout_options(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="top-1/top-5, tokens kept and img/s on an ImageFolder split")
    p.add_argument("--checkpoint", help="an aptvit model.safetensors, or timm weights with --model")
    p.add_argument("--model", help="timm model name (for --pretrained, timm checkpoints and --uniform)")
    p.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights of --model (needs the model hub)"
    )
    p.add_argument("--data", required=True, help="the split to evaluate (a folder of class folders, or DIR with val/)")
    p.add_argument("--uniform", action="store_true", help="evaluate the unconverted timm model (the baseline)")
    p.add_argument("--limit", type=int, help="at most this many images, a seeded draw from the split (default: all)")
    p.add_argument(
        "--size", type=int, help=f"input size (default: the checkpoint's or the model's; at most {MAX_SIDE})"
    )
    add_layout_options(p)
    add_static_option(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=default_of(eval_command, "batch_size"),
        help=f"images per batch (default {default_of(eval_command, 'batch_size')})",
    )
    p.add_argument(
        "--workers",
        type=int,
        help=f"loader processes (default: the CPUs less one, at most 8; here {default_workers()})",
    )
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip (and count) unreadable images instead of stopping"
    )
    p.add_argument(
        "--teacher",
        help="also report agreement with this teacher, run uniformly (top-1 agreement, feature cosines; labels or "
        "not): an aptvit checkpoint, timm weights of --model's architecture, a timm model name, or 'uniform' "
        "(the evaluated model's own weights)",
    )
    add_runtime_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write the static model as one ONNX or torch.export graph, layout inside")
    p.add_argument("--model", help="timm model name (with --pretrained or timm --checkpoint weights)")
    add_weights_options(p)
    p.add_argument("--size", type=int, help="input side in pixels (default: the model's input size)")
    add_layout_options(p)
    from .nn.attention import backend_choices

    p.add_argument("--attention", choices=backend_choices(), default="auto", help="attention in the graph: auto or pad")
    p.add_argument("--format", choices=("onnx", "torch"), default="onnx", help="onnx, or a torch.export program")
    p.add_argument("--out", required=True, help="the file to write (e.g. model.onnx)")
    p.add_argument("--dense", action="store_true", help="add the dense grid (B, D, H/p, W/p) as a second output")
    p.add_argument("--pre-logits", action="store_true", help="output the pooled features instead of the logits")
    p.add_argument("--no-check", action="store_true", help="skip the check of the written graph on real photos")
    p.set_defaults(func=cmd_export)
    add_calibrate_parser(sub)
    for p in sub.choices.values():  # also after the command: aptvit eval ... --debug
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return parser


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is the user's to fix (one line, exit 2) rather than a bug (a traceback): its type says."""
    import torch

    return isinstance(e, (UserError, torch.OutOfMemoryError))


class _PrintHandler(logging.Handler):
    """Prints each record's bare message on the current ``sys.stdout`` (looked up per record: tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:
            self.handleError(record)


@contextmanager
def printing_logs():
    """While it is open, the "aptvit" loggers' INFO messages are printed on stdout, once each.

    Idempotent: inside another ``printing_logs`` (``main`` called from a command) it adds nothing. The handler
    goes away on exit, so that ``main`` called twice in one process prints each line once and the library,
    used after it, is silent again.
    """
    logger = logging.getLogger("aptvit")
    if any(isinstance(h, _PrintHandler) for h in logger.handlers):
        yield
        return
    handler, level = _PrintHandler(), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        with printing_logs():
            return args.func(args)
    except KeyboardInterrupt:
        print("aptvit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        import torch

        if isinstance(e, torch.OutOfMemoryError):  # not HubError, the other RuntimeError of the family
            message = f"out of memory ({message}); lower --batch-size or --size"
        print(f"aptvit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
