"""What this environment offers the attention kernels, found once at import.

The availability checks run inside the forward, and ``torch.compile(fullgraph=True)`` traces constants where an
import or ``inspect`` would break the graph, so every probe runs here, once.
"""

from __future__ import annotations

import functools
import inspect
from typing import Tuple

import torch


def half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def find_torch_varlen() -> dict:
    """What torch's ``varlen_attn`` offers: present, a ``scale`` argument (not in torch 2.9), a backward (not in
    the first versions)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # registers its ops too
    except ImportError:
        return {"varlen": False, "varlen_scale": False, "varlen_backward": False}
    try:
        backward = hasattr(torch.ops.torch_attn, "_varlen_attn_backward")
    except RuntimeError:  # no such op namespace in this build
        backward = False
    return {
        "varlen": True,
        "varlen_scale": "scale" in inspect.signature(varlen_attn).parameters,
        "varlen_backward": backward,
    }


def find_flash_attn() -> bool:
    """flash-attn importable, not merely installed: a wheel built for another torch or CUDA is found by
    ``find_spec`` and then fails at import (undefined symbols), so only a real import counts."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # noqa: BLE001 -- ImportError, OSError or RuntimeError from a broken build: unavailable
        return False
    return True


def find_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


FOUND = {
    "flash_attn": find_flash_attn(),
    "flex": find_flex(),
    "aten_flash": hasattr(torch.ops.aten, "_flash_attention_forward"),
    **find_torch_varlen(),
}


def has_flash_attn() -> bool:
    return FOUND["flash_attn"]


def has_torch_varlen() -> bool:
    return FOUND["varlen"]


def varlen_takes_scale() -> bool:
    """torch 2.9's ``varlen_attn`` has no ``scale`` argument; later versions do."""
    return FOUND["varlen_scale"]


def varlen_has_backward() -> bool:
    """Whether this torch registers a backward for ``varlen_attn`` (the first versions had none)."""
    return FOUND["varlen_backward"]


def has_flex() -> bool:
    return FOUND["flex"]


@functools.lru_cache(maxsize=None)
def capability(index: int) -> Tuple[int, int]:
    """A CUDA device's compute capability (a fact of the hardware, read once per device)."""
    return tuple(torch.cuda.get_device_capability(index))


def has_sm80(device) -> bool:
    """Compute capability 8.0 or above (Ampere+), which the flash kernels need."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0)
