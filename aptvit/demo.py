"""``aptvit demo``: the main job on an embedded default, no arguments, under two minutes on 2 CPU cores."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .core.io import InputError, atomic_write, make_folder

logger = logging.getLogger(__name__)

# What the demo draws: these photos, resized to DEMO_SIZE (shorter side), with patches up to 4x the base size
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
DEMO_SIZE = 448
DEMO_PATCH_SIZES = (16, 32, 64)
BENCH_FILES = ("bench.json", "bench.png")


def demo_files(names=DEMO_PHOTOS) -> set:
    """The names of the files the demo writes into its folder: each photo, its picture and layout, the benchmark's."""
    return {f"{n}{suffix}" for n in names for suffix in (".png", "_apt.png", "_apt.json")} | set(BENCH_FILES)


def check_demo_folder(out) -> None:
    """The demo replaces its own earlier files in ``out`` (a rerun just works) and nothing else: a folder that holds
    any other file (hidden ones aside) is refused before anything is written, so that ``--out ~/Pictures`` cannot
    replace a photo of the same name."""
    out = Path(out)
    if not out.is_dir():
        return
    own = demo_files()
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in own)
    if others:
        raise InputError(
            f"--out {str(out)!r} holds files the demo did not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); give a new or empty folder (the demo replaces its own files "
            "there on each run)"
        )


def save_photos(out, size: int = DEMO_SIZE, names=DEMO_PHOTOS) -> list:
    """The bundled photos ``names`` as PNGs in ``out``, resized (shorter side ``size``), never padded: the files
    the demo draws, and that ``aptvit show`` draws the same way."""
    from PIL import Image

    from .images import fit_image
    from .photos import load_photo

    out = make_folder(out)
    files = []
    for name in names:
        img, _ = fit_image(load_photo(name), (size, None), 1)  # a multiple of 1: resized, not padded
        path = out / f"{name}.png"
        atomic_write(path, lambda tmp: Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
        files.append(path)
    return files


def demo_layouts(out="aptvit-demo", size: int = DEMO_SIZE, width: Optional[int] = None, dpi: Optional[int] = None):
    """Save the bundled photos into ``out`` (``save_photos``) and draw their layouts exactly as
    ``aptvit show PHOTO.png --size SIZE --patch-sizes 16,32,64 --heatmap --json --overwrite`` does. The files of an
    earlier demo in ``out`` are replaced; a folder with other files is refused (``check_demo_folder``).

    Returns:
        ``show``'s results, one per photo.
    """
    from .viz import DPI, layout_description, show

    out = Path(out)
    check_demo_folder(out)
    files = save_photos(out, size)
    sizes = ",".join(map(str, DEMO_PATCH_SIZES))
    logger.info(
        f"== layouts of {len(files)} scikit-image photos at {size} px: {layout_description(DEMO_PATCH_SIZES)} =="
    )
    logger.info(
        f"(each as: aptvit show {out}/PHOTO.png --size {size} --patch-sizes {sizes} --heatmap --json --overwrite)"
    )
    results = show(
        files,
        size=(size, None),
        patch_sizes=DEMO_PATCH_SIZES,
        out_dir=out,
        heatmap=True,
        write_json=True,
        width=width,
        dpi=dpi or DPI,
        overwrite=True,  # its own earlier pictures (check_demo_folder)
    )
    logger.info(f"pictures: {out.resolve()}/*_apt.png")
    return results


def demo(
    out="aptvit-demo",
    model: str = "vit_small_patch16_224",
    size: int = 384,
    runs: int = 3,
    bench: bool = True,
    photo_size: int = DEMO_SIZE,
) -> None:
    """Draw the layouts of the bundled photos into ``out`` (``demo_layouts`` at ``photo_size``) and benchmark
    ``model`` at ``size`` on them (``bench``: False draws only), with the pictures' patch sizes
    (``DEMO_PATCH_SIZES``), so that the speed measured is that of the layouts drawn."""
    from .bench import bench_command
    from .models import ModelSource
    from .photos import PHOTO_NAMES

    demo_layouts(out, photo_size)
    if not bench:
        return
    sizes = "/".join(map(str, DEMO_PATCH_SIZES))
    logger.info(
        f"\n== benchmark: timm {model} vs its APT conversion with patch sizes {sizes} (as in the pictures), "
        f"{len(PHOTO_NAMES)} bundled photos center-cropped to {size}x{size} =="
    )
    bench_command(
        ModelSource(model, layout={"patch_sizes": DEMO_PATCH_SIZES}),
        str(size),
        [1, 8],
        runs=runs,
        warmup=1,
        out=Path(out) / "bench.json",
        plot_path=Path(out) / "bench.png",
        steadier=f"aptvit bench --model {model} --size {size} --patch-sizes {sizes.replace('/', ',')} --runs 20",
    )
