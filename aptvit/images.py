"""Reading user images: any file PIL opens, as uint8 tensors, resized and padded the way the CLI documents."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .core.io import MAX_SIDE, InputError, check_side, reading  # noqa: F401 (MAX_SIDE, check_side: re-exported)
from .core.layout import to_device
from .core.pixels import pad_to_multiple

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) images (B, C, H, W) to float32 normalised as a model expects, on their device."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    # built on the host and copied without blocking: torch.tensor(..., device="cuda") would wait for the GPU
    m = to_device(mean, torch.float32, images.device).view(1, -1, 1, 1) * scale
    s = to_device(std, torch.float32, images.device).view(1, -1, 1, 1) * scale
    return (images.float() - m) / s


def to_rgb(im):
    """An opened PIL image as 8-bit RGB, the one way ``show``, training and evaluation all see it.

    EXIF orientation is applied; transparent pixels go on white (not on whatever colour they hide);
    16-bit and 32-bit grayscale is scaled to 8 bits (PIL's own conversion clips it to almost white).
    """
    import numpy as np
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit samples (PNG, TIFF): 0..65535
            values = values / 257.0
        elif values.size and values.max() <= 1.0:  # float images in 0..1
            values = values * 255.0
        im = Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)  # transparent pixels become white, not black
    return im.convert("RGB")


def read_image(path: Union[str, Path]) -> torch.Tensor:
    """(3, H, W) uint8 RGB from any image PIL reads (grayscale, 16-bit, RGBA, palette are converted by ``to_rgb``).

    Raises:
        UserError naming the file when it is missing, a directory or unreadable (also a decompression bomb:
        more pixels than PIL's ``Image.MAX_IMAGE_PIXELS`` allows).
    """
    from PIL import Image

    path = Path(path)
    with reading(path, "image"):
        with Image.open(path) as im:
            rgb = to_rgb(im)
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def list_images(folder: Union[str, Path], what: str = "image folder") -> List[Path]:
    """Image files directly inside ``folder``, sorted (``what`` names the folder in errors, e.g. "--images")."""
    folder = Path(folder)
    with reading(folder, what):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{what} {str(folder)!r} is a file, not a folder of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}")
    return files


def parse_size(text: str) -> Tuple[int, Optional[int]]:
    """'448' -> (448, None) (shorter side, keep aspect); '384x640' -> (384, 640) (height x width)."""
    try:
        parts = [int(t) for t in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise InputError(f"--size {text!r} must be one positive number (shorter side) or HEIGHTxWIDTH such as 384x640")
    for v in parts:
        check_side(v, "--size" if len(parts) == 1 else f"--size {text}")
    return (parts[0], None) if len(parts) == 1 else (parts[0], parts[1])


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(img.shape[-2:]):
        return img
    shrink = h <= img.shape[-2] and w <= img.shape[-1]
    out = F.interpolate(img[None].float(), size=(h, w), mode="area" if shrink else "bicubic")
    return out[0].round().clamp(0, 255).to(torch.uint8)


def fit_image(
    img: torch.Tensor, size: Tuple[int, Optional[int]], multiple: int
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Resize for ``aptvit show``: one number keeps the aspect (shorter side = number) and pads to a
    multiple of the base patch; HEIGHTxWIDTH must already be a multiple.

    Returns:
        (3, H', W') uint8 and the (bottom, right) padding that was added.
    """
    h, w = img.shape[-2:]
    if size[1] is None:
        scale = size[0] / min(h, w)
        img = _resize(img, max(1, round(h * scale)), max(1, round(w * scale)))
    else:
        if size[0] % multiple or size[1] % multiple:
            raise InputError(
                f"--size {size[0]}x{size[1]} is not a multiple of the base patch size {multiple}; "
                f"use multiples of {multiple}, or one number to keep the aspect and pad"
            )
        img = _resize(img, size[0], size[1])
    padded = pad_to_multiple(img, multiple)
    return padded, (padded.shape[-2] - img.shape[-2], padded.shape[-1] - img.shape[-1])


def center_crop_resize(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize the shorter side to cover ``size`` (h, w), then center-crop to exactly ``size`` (timm's eval style)."""
    th, tw = size
    h, w = img.shape[-2:]
    scale = max(th / h, tw / w)
    img = _resize(img, max(th, round(h * scale)), max(tw, round(w * scale)))
    top = (img.shape[-2] - th) // 2
    left = (img.shape[-1] - tw) // 2
    return img[:, top : top + th, left : left + tw]
