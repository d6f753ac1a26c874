"""What the finetune tests share: a generated ImageFolder, the CLI runner, and a small CPU run's argv and config."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from aptvit.cli import main
from aptvit.nn.config import APTConfig
from aptvit.train import LAYOUT_FIELDS, TrainConfig

MODEL = "vit_tiny_patch16_224"


def one_line(err: str) -> str:
    """The CLI's error output, checked to be one line without a traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def make_folder(root: Path, classes=("plain", "stripes"), train=8, val=4, size=48, seed=0) -> Path:
    """ImageFolder whose class is visible everywhere: a reddish plain image vs a bluish one with stripes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.full((size, size, 3), rng.integers(60, 120), dtype=np.uint8)
                img[..., 0 if c == 0 else 2] = 220
                if c == 1:
                    img[: size // 2, : size // 2][::2] = 255
                img = (img.astype(int) + rng.integers(-3, 4, img.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def run(capsys, *argv):
    """``aptvit *argv`` in this process: (exit code, stdout, stderr); finetune and eval forced onto the CPU."""
    argv = [str(a) for a in argv]
    if argv[0] in ("finetune", "eval"):
        argv += ["--device", "cpu"]  # these tests mean the CPU, whatever the machine has
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def finetune_argv(data, out, *extra, thresholds="32=6", evaluate=False) -> list:
    """``aptvit finetune`` of a small run: 32-px crops, batches of 4, no workers, ``extra`` options appended.

    Args:
        thresholds: the ``--thresholds`` value (None: the model's default).
        evaluate: keep the evaluation at each epoch's end (otherwise ``--no-eval``).
    """
    argv = ["finetune", "--model", MODEL, "--data", data, "--out", out, "--size", "32", "--batch-size", "4"]
    argv += ["--workers", "0"] + ([] if evaluate else ["--no-eval"])
    argv += ["--thresholds", thresholds] if thresholds is not None else []
    return argv + list(extra)


def train_config(data, out, **kw) -> TrainConfig:
    """The settings of a small CPU run (``kw`` overrides them)."""
    base = dict(
        model=MODEL,
        data=str(data),
        out=str(out),
        size=32,
        batch_size=4,
        workers=0,
        log_every=1,
        lr=1e-3,
        drop_path=0.0,
        device="cpu",
    )  # these tests mean the CPU, GPU or not
    layout = {"thresholds": {32: 6.0}}  # the conversion settings, given one by one (None: not given)
    layout.update({k: kw.pop(k) for k in LAYOUT_FIELDS if k in kw})
    layout = {k: v for k, v in layout.items() if v is not None}
    base.update(kw)
    return TrainConfig(**base, apt=APTConfig(**layout) if layout else None)


def metrics(run_dir) -> list:
    """The records of RUN_DIR/metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
