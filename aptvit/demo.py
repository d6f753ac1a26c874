"""``aptvit demo``: the main job on an embedded default, no arguments, under two minutes on 2 CPU cores."""

from __future__ import annotations

import logging
from pathlib import Path

from .core.io import atomic_write

logger = logging.getLogger(__name__)


def demo(out="aptvit-demo", model: str = "vit_small_patch16_224", size: int = 384, runs: int = 3) -> None:
    """Draw the layouts of the bundled photos into ``out`` and benchmark ``model`` at ``size`` on them."""
    from .bench import bench_command
    from .images import fit_image
    from .models import ModelSource
    from .photos import PHOTO_NAMES, load_photo
    from .viz import show

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    files = []
    for name in PHOTO_NAMES[:4]:
        img, _ = fit_image(load_photo(name), (448, None), 64)
        path = out / f"{name}.png"
        atomic_write(path, lambda tmp: Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
        files.append(path)
    logger.info(f"== layouts (entropy, thresholds 32=5.5,64=4.0) of {len(files)} scikit-image photos at 448 ==")
    show(files, out_dir=out, heatmap=True)
    logger.info(f"pictures: {out.resolve()}/*_apt.png")
    logger.info(f"\n== benchmark: timm {model} vs its APT conversion at {size}, {len(PHOTO_NAMES)} photos ==")
    bench_command(
        ModelSource(model), str(size), [1, 8], runs=runs, warmup=1, out=out / "bench.json", plot_path=out / "bench.png"
    )
