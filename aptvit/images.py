"""Reading user images: any file PIL opens, as uint8 tensors, resized and padded the way the CLI documents."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .core.pixels import pad_to_multiple

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) images (B, C, H, W) to float32 normalised as a model expects, on their device."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * scale
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * scale
    return (images.float() - m) / s


def read_image(path: Union[str, Path]) -> torch.Tensor:
    """(3, H, W) uint8 RGB from any image PIL reads (grayscale, RGBA, palette are converted).

    Raises:
        FileNotFoundError / ValueError naming the file when it is missing or unreadable.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)  # transparent pixels become white, not black
            rgb = im.convert("RGB")
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None


def list_images(folder: Union[str, Path]) -> List[Path]:
    """Image files directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}")
    return files


def parse_size(text: str) -> Tuple[int, Optional[int]]:
    """'448' -> (448, None) (shorter side, keep aspect); '384x640' -> (384, 640) (height x width)."""
    try:
        parts = [int(t) for t in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or any(v <= 0 for v in parts):
        raise ValueError(f"--size {text!r} must be one positive number (shorter side) or HEIGHTxWIDTH such as 384x640")
    return (parts[0], None) if len(parts) == 1 else (parts[0], parts[1])


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(img.shape[-2:]):
        return img
    shrink = h <= img.shape[-2] and w <= img.shape[-1]
    out = F.interpolate(img[None].float(), size=(h, w), mode="area" if shrink else "bicubic")
    return out[0].round().clamp(0, 255).to(torch.uint8)


def fit_image(img: torch.Tensor, size: Tuple[int, Optional[int]], multiple: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
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
            raise ValueError(
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
