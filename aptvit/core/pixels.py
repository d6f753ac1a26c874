"""Pixel input: validation, grayscale conversion and padding to a patch multiple.

Every scorer and layout starts here, so that bad input fails once, early, with a message that
names the argument, instead of deep inside torch.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .io import InputError, UserTypeError

# ITU-R BT.601 luma weights, as the APT reference code uses.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise a clear error unless ``images`` is a valid pixel batch.

    Costs one fused reduction and one host read for float pixels (none for uint8); ``patch_layout``
    calls the two halves itself so that the read joins its token count.

    Args:
        images: (B, C, H, W) with C in {1, 3}; uint8 in [0, 255] or floating point in [0, 1].
        name: argument name used in the error messages.
    """
    check_image_shape(images, name)
    lo_hi = pixel_range(images)
    if lo_hi is not None:
        lo, hi = lo_hi.tolist()
        check_pixel_range(lo, hi, name)


def check_image_shape(images: torch.Tensor, name: str = "images") -> None:
    """The checks of ``check_images`` that need no pixel values (type, shape, dtype): no device sync.

    Args:
        images: (B, C, H, W) with C in {1, 3}; uint8 or floating point.
        name: argument name used in the error messages.
    """
    if not isinstance(images, torch.Tensor):
        raise UserTypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        hint = " (a single image? add a batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise InputError(f"{name} must have 4 dimensions (B, C, H, W), got shape {tuple(images.shape)}{hint}")
    b, c, h, w = images.shape
    if b == 0:
        raise InputError(f"{name} is an empty batch (shape {tuple(images.shape)}); pass at least one image")
    if c not in (1, 3):
        raise InputError(f"{name} must have 1 or 3 channels (B, C, H, W), got C={c} in shape {tuple(images.shape)}")
    if h == 0 or w == 0:
        raise InputError(f"{name} has an empty side: shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise UserTypeError(f"{name} must be uint8 (0..255) or floating point (0..1), got dtype {images.dtype}")


def pixel_range(images: torch.Tensor) -> Optional[torch.Tensor]:
    """(2,) float64 (min, max) over the whole batch, on its device, without reading it; None for uint8.

    One fused reduction. NaN propagates through min and max, and inf shows as an infinite bound, so
    ``check_pixel_range`` can decide everything from these two numbers once they are on the host.
    """
    if images.dtype == torch.uint8:
        return None
    lo, hi = torch.aminmax(images)
    return torch.stack([lo, hi]).to(host_read_dtype(images.device))


def check_pixel_range(lo: float, hi: float, name: str = "images") -> None:
    """Raise a clear error unless float pixels with these bounds (from ``pixel_range``) are finite and in [0, 1]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{name} contains NaN or inf values")
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"{name} are floating point with values in [{lo:.4g}, {hi:.4g}]; float images must be in [0, 1] "
            "(scale uint8 by 1/255 or pass uint8; undo any mean/std normalisation first)"
        )


def host_read_dtype(device: torch.device) -> torch.dtype:
    """The dtype of values read back to the host in one piece: float64 (ints exact to 2**53); MPS has only float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def size_groups(images, name: str = "images") -> List[List[int]]:
    """The one validator of an image batch's structure: check it and group it by shape, dtype and device.

    Only shapes, dtypes and devices are read (no tensor values, no device access); the model (``APTViT``), the
    layout (``patch_layout``) and the plan (``core.packed.groups_of``) all call this.

    Args:
        images: a (B, C, H, W) tensor (one group), or a non-empty list of (C, H, W) tensors whose sizes may differ.
        name: how error messages call the argument.

    Returns:
        Index lists into the input, one per distinct (shape, dtype, device), in order of first appearance.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            hint = "; add a batch dimension with images.unsqueeze(0)" if images.dim() == 3 else ""
            raise InputError(f"{name} must have 4 dimensions (B, C, H, W), got shape {tuple(images.shape)}{hint}")
        return [list(range(images.shape[0]))]
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise UserTypeError(
            f"{name} must be a (B, C, H, W) tensor or a non-empty list of (C, H, W) tensors, got {type(images).__name__}"
        )
    groups: Dict[tuple, List[int]] = {}
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 3:
            shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
            raise InputError(f"{name}[{i}] must be a (C, H, W) tensor, got {shape}")
        groups.setdefault((tuple(im.shape), im.dtype, im.device), []).append(i)
    return list(groups.values())


def group_by_size(images, name: str = "images") -> List[Tuple[List[int], torch.Tensor]]:
    """Split a batch into same-size batches (``size_groups``, then one stacked tensor per group).

    Returns:
        [(indices into the input, (b, C, H, W) tensor)], one entry per distinct shape/dtype/device.
        Values are not checked here.
    """
    groups = size_groups(images, name)
    if isinstance(images, torch.Tensor):
        return [(groups[0], images)]
    return [(idx, torch.stack([images[i] for i in idx])) for idx in groups]


def grayscale_255(images: torch.Tensor) -> torch.Tensor:
    """Grayscale on the 0..255 scale, in float32.

    Args:
        images: (B, C, H, W), C in {1, 3}, uint8 in [0, 255] or float in [0, 1] (already checked).

    Returns:
        (B, H, W) float32 in [0, 255]. C = 1 is used as is; C = 3 uses ``GRAY_WEIGHTS``.
        A float image equal to ``uint8 / 255`` gives exactly the same values as the uint8 image.
    """
    x = images.float()
    if images.dtype == torch.uint8:
        if x.shape[1] == 1:
            return x[:, 0]
        gray = x[:, 0] * GRAY_WEIGHTS[0]
        gray += x[:, 1] * GRAY_WEIGHTS[1]
        gray += x[:, 2] * GRAY_WEIGHTS[2]
        return gray
    if x.shape[1] == 1:
        return x[:, 0] * 255.0
    # Channel by channel, each scaled to 0..255 and weighted in place: the float32 steps of (x * 255)[:, c] * w
    # summed in channel order (the same bits), without a full-size (B, 3, H, W) temporary: at batch 1 the passes
    # over a 224 px image then stay in the cache (host time at batch 1).
    gray = (x[:, 0] * 255.0).mul_(GRAY_WEIGHTS[0])
    gray += (x[:, 1] * 255.0).mul_(GRAY_WEIGHTS[1])
    gray += (x[:, 2] * 255.0).mul_(GRAY_WEIGHTS[2])
    return gray


def normalised_gray_255(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``grayscale_255`` of the pixels ``(images * std + mean).clamp(0, 1)`` of normalised model input, and its bounds,
    computed channel by channel: the same float32 steps (and bits), without the (B, C, H, W) pixels in between, so
    that at batch 1 every pass over a 224 px image stays in the cache (host time at batch 1).

    The pixels are clamped, so the only bad value left is NaN (it stays NaN through every step): the pixel range is
    the grayscale's bounds divided by 255, NaN exactly when a pixel is (one reduction over a third of the values).
    The bounds stay on the 0..255 scale and in float32: the caller divides them on the host, after its one read
    (two ops fewer per call than converting and dividing them here).

    Args:
        images: (B, C, H, W) floating point, normalised; C in {1, 3}.
        mean, std: C Python floats each (a scalar operand is rounded to float32 as a float32 tensor of it would be:
            the same bits, and no tensor to split or to copy to the device).

    Returns:
        gray (B, H, W) float32 in [0, 255], and (2,) float32 (min, max) of gray, in [0, 255] or NaN.
    """
    if not images.is_floating_point():
        raise UserTypeError(f"normalised images must be floating point, got {images.dtype}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise InputError(f"normalisation mean and std need one value per channel ({images.shape[1]})")
    weights = GRAY_WEIGHTS if images.shape[1] == 3 else (None,)
    x, gray = images if images.dtype == torch.float32 else images.float(), None
    for c, (m, s, weight) in enumerate(zip(mean, std, weights)):
        part = torch.mul(x[:, c], s).add_(m).clamp_(0.0, 1.0).mul_(255.0)
        part = part.mul_(weight) if weight is not None else part
        gray = part if gray is None else gray.add_(part)
    return gray, torch.stack(torch.aminmax(gray))


def pad_to_multiple(images: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Pad the bottom and right of images so that H and W are multiples of ``multiple``.

    Args:
        images: (..., H, W) tensor of any dtype.
        multiple: the base patch size (or the largest one, to let every region merge).
        value: fill value for the padding.

    Returns:
        (..., H', W') with H' = ceil(H / multiple) * multiple; the input itself when nothing is padded.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise InputError(f"multiple must be a positive int, got {multiple!r}")
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise UserTypeError("images must be a tensor of shape (..., H, W)")
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), value=value)
