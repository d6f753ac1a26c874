"""Where and in what precision a command runs: ``--device {auto,cpu,cuda}`` and ``--dtype {auto,fp32,bf16,fp16}``.

One source for the choices of ``aptvit bench``, ``eval`` and ``finetune`` (and ``benchmarks/bench_gpu.py``):
``auto`` means CUDA when it is available; the default precision is bf16 autocast on CUDA, fp32 on the CPU
(bf16 matmuls are several times slower than fp32 on most CPUs).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .core.io import InputError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto",) + tuple(DTYPES)


def resolve_device(name: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """The torch device for ``name``; under torchrun, CUDA picks the process's ``LOCAL_RANK`` GPU.

    Raises:
        ValueError: for an unknown name, or "cuda" on a machine without a usable CUDA device.
    """
    if name not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    local = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if local >= torch.cuda.device_count():
        raise InputError(
            f"process {local} asks for GPU {local}, but this machine has {torch.cuda.device_count()}; "
            "start fewer processes per node or use --device cpu"
        )
    return torch.device("cuda", local)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``name`` on ``device`` (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPE_CHOICES}, got {name!r}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` for half precisions; a no-op context for fp32 (weights stay fp32 for training)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (bit-exact resume on CUDA); cuBLAS needs its workspace setting for that."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
