"""The real photos bundled with scikit-image, as uint8 tensors: the default inputs of demos and benchmarks."""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .core.io import MissingDependency

PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
)


def load_photo(name: str, size: Union[int, Tuple[int, int], None] = None) -> torch.Tensor:
    """One scikit-image photo as (3, H, W) uint8, area-resized to ``size`` (int = square) if given."""
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - scikit-image is a dev/demo dependency
        raise MissingDependency("the bundled photos need scikit-image: pip install scikit-image") from e
    img = getattr(skimage.data, name)()
    img = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    if size is None:
        return x
    size = (size, size) if isinstance(size, int) else tuple(size)
    y = F.interpolate(
        x[None].float(), size=size, mode="area" if size[0] <= x.shape[1] else "bicubic", align_corners=None
    )
    return y[0].round().clamp(0, 255).to(torch.uint8)


def photo_batch(count: int, size, names=PHOTO_NAMES) -> torch.Tensor:
    """(count, 3, H, W) uint8: the photos cycled, every other round mirrored so that repeats differ."""
    base = [load_photo(n, size) for n in names]
    out = []
    for i in range(count):
        img = base[i % len(base)]
        if (i // len(base)) % 2:
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out)
