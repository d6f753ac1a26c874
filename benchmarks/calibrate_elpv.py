"""``aptvit calibrate`` on elpv, the fine-grained case: does a setting keep the source's top-1 within 0.5 point?

    python benchmarks/calibrate_elpv.py [--work /tmp/aptvit-elpv] [--results docs/results/calibrate_elpv]
        [--max-drop 0.5] [--calibrate "--timing-images 16 --runs 3"] [--until folders] [--quick]
        [every option of benchmarks/real_elpv.py: --size, --train, --val, --test, --seed, --threads, ...]

The source is ``benchmarks/real_elpv.py``'s (DINOv2 ViT-S/14 + a linear head chosen on val; cached in ``--work`` and
shared with it), saved once more as an aptvit checkpoint (``aptvit.save`` of its conversion: its classes and input
size in the metadata), the file a user hands to ``aptvit calibrate``. The val and test cells are written as class
folders in ``--work`` (never in the repository: the data's licence forbids shipping it).

Then, as a user would, in a fresh process: ``aptvit calibrate --checkpoint SOURCE --data VAL --max-drop 0.5``
(calibrate's default grid unless ``--calibrate`` adds options; ``--clock thread``, one torch thread: the machine is
shared). Every choice is made on val. Its outputs (calibration.{json,md,png}, model.safetensors when a setting keeps
the target, the command's last lines, its exit status) are copied to ``--results``.{json,md,png}, with one line more,
measured once on the test split: the chosen setting (the written model.safetensors; when nothing keeps the target, the
closest setting calibrate names), the source, and the lower resolution with the nearest token count, each with its
top-1 and its paired difference to the source (standard error of the per-cell differences, and the cells only one of
them got right), the images read as ``calibrate`` reads them.

``--quick``: a tiny random ViT on synthetic cells (real_elpv's), a two-setting grid, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

import aptvit  # noqa: E402
from aptvit.core.io import atomic_write  # noqa: E402
from benchmarks import real_elpv as elpv  # noqa: E402

QUICK_CALIBRATE = "--sizes 56,42 --budgets 0.5 --thresholds none --timing-images 4 --runs 1 --warmup 0"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other options go to real_elpv.py.")
    p.add_argument("--max-drop", type=float, default=0.5, help="calibrate's target: points of val top-1")
    p.add_argument("--calibrate", default="", help="more `aptvit calibrate` options, one string")
    p.add_argument("--results", default="docs/results/calibrate_elpv")
    p.add_argument("--until", choices=("folders", "all"), default="all", help="folders: stop before calibrate")
    p.add_argument("--reuse", action="store_true", help="the last calibrate run's outputs in --work, not a new run, if the same command made them")
    own, rest = p.parse_known_args(argv)
    args = elpv.parse_args(rest)
    for k, v in vars(own).items():
        setattr(args, k, v)
    if args.quick:
        args.calibrate = f"{QUICK_CALIBRATE} {args.calibrate}".strip()
    return args


def source_checkpoint(args, work: Path, x, y) -> Path:
    """The elpv source (real_elpv's cached timm checkpoint) as an aptvit checkpoint calibrate reads."""
    timm_path, _, _ = elpv.build_source(x, y, args, work)
    path = work / f"calibrate_source_{elpv.cache_keys(args)['source']}.safetensors"
    if not path.is_file() or args.quick:
        meta = {"classes": json.dumps(list(elpv.CLASSES)), "input_size": str(args.size)}
        aptvit.save(aptvit.convert(elpv.load_source(timm_path, args.size, args.quick)), path, extra_metadata=meta)
    return path


def folders(args, work: Path, x, y) -> Path:
    """work/calibrate_folders_<key>/{val,test}/<class>/*.png (lossless: the cells as real_elpv feeds them)."""
    keys = elpv.cache_keys(args)
    root = work / f"calibrate_folders_{keys['test_features']}"
    if not (root / "test").is_dir() or args.quick:
        shutil.rmtree(root, ignore_errors=True)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name in ("val", "test"):
            elpv.write_folder(tmp, name, x[name], y[name])
        tmp.rename(root)
    return root


def calibrate_command(args, checkpoint: Path, data: Path, out: Path) -> list:
    """The ``aptvit calibrate`` command line of this run (``python -m aptvit calibrate ...``)."""
    cmd = [sys.executable, "-m", "aptvit", "calibrate", "--checkpoint", str(checkpoint), "--data", str(data)]
    cmd += ["--size", str(args.size), "--max-drop", f"{args.max_drop:g}", "--out", str(out), "--limit", "0"]
    cmd += ["--batch-size", str(args.batch), "--workers", "0", "--clock", "thread", "--device", "cpu"]
    return cmd + shlex.split(args.calibrate)


def shown(cmd: list) -> str:
    """``cmd`` as a user types it (``aptvit calibrate ...``)."""
    return shlex.join(["aptvit", *cmd[3:]])


def reusable(out: Path, cmd: list):
    """The run recorded in ``out`` when the same command made it (another ``--calibrate`` or ``--max-drop`` sweeps
    another grid), else None. A change of calibrate's own defaults between the runs is not seen."""
    path = out / "run.json"
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    if run.get("command") != shown(cmd):
        elpv.log(f"--reuse: {path} was made by another command ({run.get('command')}); running calibrate again")
        return None
    return run


def run_calibrate(args, cmd: list, out: Path) -> dict:
    """``aptvit calibrate`` (``cmd``) in a fresh process, as a user runs it: its exit status and its last lines."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    elpv.log("$ " + shown(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "\r" not in ln]
    elpv.log("\n".join(lines[-40:]))
    if proc.returncode not in (0, 2) or not (out / "calibration.json").is_file():
        raise SystemExit(f"aptvit calibrate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {
        "command": shown(cmd),
        "exit_status": proc.returncode,
        "last_lines": lines[-12:],
        "seconds": time.perf_counter() - t0,
    }


@torch.inference_mode()
def test_predictions(model: aptvit.APTViT, uniform: bool, folder: Path, size: int, classes, batch: int) -> tuple:
    """(predicted head row per image, the image's class as a head row, mean patch tokens) of ``model`` at ``size``
    on the class folders of ``folder``: the images read, cropped and laid out as ``aptvit calibrate`` does."""
    from aptvit.calibrate import _apt_outputs, find_samples
    from aptvit.data import LayoutDataset, ShardedSampler, build_transform, eval_crop, make_loader
    from aptvit.images import normalise
    from aptvit.teacher import timm_outputs

    samples, labelled, _, note = find_samples(folder, 0, classes, len(classes))
    assert labelled, note
    mean, std = model.pixel_mean_std()
    transform = build_transform(size, False, mean, std, **eval_crop(model.pretrained_cfg))
    loader = make_loader(
        LayoutDataset(samples, transform, None), ShardedSampler(len(samples), shuffle=False, equal_shares=False),
        batch, 0, drop_last=False,
    )  # fmt: skip
    preds, labels, tokens = [], [], []
    for b in loader:
        x = normalise(b.images, mean, std)
        if uniform:
            logits, n = timm_outputs(model.timm_model, x).logits, torch.full((len(x),), (size // model.patch_size) ** 2)
        else:
            out, n, _ = _apt_outputs(model, x, b.images)
            logits = out.logits
        preds.append(logits.argmax(-1))
        labels.append(b.labels)
        tokens.append(n.double())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), float(torch.cat(tokens).mean())


def row_model(source: aptvit.APTViT, row: dict) -> aptvit.APTViT:
    """The model of one row of calibration.json: the source (uniform rows run its timm model), or its conversion
    with the row's APT settings, its area bias included (a row written before calibrate swept the bias ran the
    checkpoint's own)."""
    if row["kind"] != "apt":
        return source
    thresholds = {int(k): v for k, v in row["thresholds"].items()} if row["thresholds"] else None
    bias = row.get("area_bias")
    return aptvit.convert(
        source.timm_model, patch_sizes=tuple(row["patch_sizes"]), scorer=row["scorer"], budget=row["budget"],
        thresholds=thresholds, area_bias=source.config.area_bias if bias is None else bias,
    ).eval()  # fmt: skip


def test_line(args, report: dict, source_ckpt: Path, out: Path, data: Path) -> List[dict]:
    """The test split, once: the chosen (or closest) setting, the source and the nearest lower resolution."""
    rows = report["rows"]
    source_row = rows[0]
    if report["chosen"] is not None:
        pick = next(r for r in rows if r["name"] == report["chosen"])
        model, role = aptvit.load(out / "model.safetensors").eval(), "chosen (model.safetensors)"
    else:  # the closest setting calibrate named in its message
        others = [r for r in rows[1:] if r["top1_drop"] is not None]
        pick = min(others, key=lambda r: r["top1_drop"])
        role = "closest on val (no setting kept the target)"
        model = None
    lowres = [r for r in rows if r["kind"] == "lower resolution" and r is not pick]
    entries = [(source_row, "source"), (pick, role)]
    if lowres:
        entries.append(
            (min(lowres, key=lambda r: abs(r["token_share"] - pick["token_share"])), "nearest lower resolution")
        )
    source = aptvit.load(source_ckpt).eval()
    classes = list(elpv.CLASSES)
    results = []
    for r, what in entries:
        m = model if what.startswith("chosen") else row_model(source, r)
        pred, label, tokens = test_predictions(m, r["kind"] != "apt", data / "test", r["size"], classes, args.batch)
        results.append({"name": r["name"], "role": what, "size": r["size"], "val_top1": r["top1"],
                        "val_speedup": r["speedup"], "tokens": tokens, "right": (pred == label).tolist()})  # fmt: skip
    ref = np.asarray(results[0]["right"], dtype=float)
    for e in results:
        ok = np.asarray(e["right"], dtype=float)
        e["top1"] = 100 * float(ok.mean())
        if e is not results[0]:
            e.update({k: v for k, v in elpv.paired(ok.astype(bool), ref.astype(bool)).items()})
    return results


def markdown(report: dict, run: dict, test: List[dict], meta: dict) -> str:
    lines = [
        f"# aptvit calibrate on elpv (val {meta['subsets']['val']} cells, --max-drop {meta['max_drop']:g})",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}; load average {meta['load_average']}).",
        "",
        "Calibrate's own command (val split):",
        "",
        "```",
        run["command"],
        "```",
        "",
        f"Its exit status: {run['exit_status']}; its last lines:",
        "",
        "```",
        *run["last_lines"],
        "```",
        "",
        "## calibration.md (val)",
        "",
        meta["table"],
        "",
        f"**Chosen:** {report['chosen']}",
        "",
        f"**Why:** {report['reason']}",
        "",
        f"## The test split, once ({len(test[0]['right'])} cells)",
        "",
        "| setting | role | size | val top-1 % | val speed | test top-1 % | vs source (points) | only it / only source right |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in test:
        diff = f"{e['difference']:+.2f} +- {e['paired_se']:.2f}" if "difference" in e else ""
        only = f"{e['only_method_right']} / {e['only_source_right']}" if "difference" in e else ""
        lines.append(
            f"| {e['name']} | {e['role']} | {e['size']} | {e['val_top1']:.2f} | {e['val_speedup']:.2f}x | "
            f"{e['top1']:.2f} | {diff} | {only} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load_start = time.perf_counter(), os.getloadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    x, y, _, sizes = elpv.subset_crops(args, work)
    checkpoint = source_checkpoint(args, work, x, y)
    data = folders(args, work, x, y)
    elpv.log(f"source {checkpoint}; folders {data}")
    if args.until == "folders":
        return 0
    out = work / f"calibrate_out_{elpv.cache_keys(args)['test_features']}"
    cmd = calibrate_command(args, checkpoint, data / "val", out)
    run = reusable(out, cmd) if args.reuse else None
    if run is None:
        shutil.rmtree(out, ignore_errors=True)
        run = run_calibrate(args, cmd, out)
        atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1)))
    report = json.loads((out / "calibration.json").read_text())
    test = test_line(args, report, checkpoint, out, data)
    meta = {
        "command": "python benchmarks/calibrate_elpv.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"CPU, {os.cpu_count()} cores (shared), {args.threads} torch thread(s)",
        "load_average": {"start": [round(v, 2) for v in load_start], "end": [round(v, 2) for v in os.getloadavg()]},
        "size": args.size,
        "subsets": sizes,
        "seed": args.seed,
        "max_drop": args.max_drop,
        "minutes": (time.perf_counter() - t0) / 60,
        "table": (out / "calibration.md").read_text().strip(),
    }
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    compact = [{**e, "right": "".join(str(int(v)) for v in e["right"])} for e in test]
    doc = {**{k: v for k, v in meta.items() if k != "table"}, "calibrate": run, "calibration": report, "test": compact}
    atomic_write(results.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    atomic_write(results.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown(report, run, test, meta)))
    atomic_write(results.with_suffix(".png"), lambda tmp: shutil.copyfile(out / "calibration.png", tmp))
    for e in test:
        elpv.log(f"test {e['name']} ({e['role']}): {e['top1']:.2f}%"
                 + (f", {e['difference']:+.2f} +- {e['paired_se']:.2f} points" if "difference" in e else ""))  # fmt: skip
    elpv.log(f"wrote {results}.{{json,md,png}} ({meta['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
