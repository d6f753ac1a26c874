"""Counting what a GPU pays for, on the CPU: every aten op dispatched, and the data-dependent ones.

A data-dependent op (its output's shape or a Python value depends on tensor contents) makes a CUDA
program wait for the device: ``.item()``/``bool()``/``int()`` (``aten._local_scalar_dense``),
``nonzero``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ``unique``,
``masked_select``, ``bincount``, ``torch.equal``. ``.tolist()`` on a CPU tensor dispatches nothing;
on a CUDA tensor it shows as a copy to the CPU, which ``host_reads`` counts.
"""

from __future__ import annotations

from collections import Counter
from typing import List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ALWAYS_DATA_DEPENDENT = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.bincount",
    "aten.equal",
    "aten.is_nonzero",
    "aten.argwhere",
}


def _packet(func) -> str:
    return f"aten.{func.__name__.split('.')[0]}" if hasattr(func, "__name__") else str(func)


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)


class OpCounter(TorchDispatchMode):
    """Records every aten op; ``data_dependent`` lists the ones that would make a GPU wait on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.data_dependent: List[str] = []
        self.host_reads = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _packet(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        self.ops[name] += 1
        overload = str(func)
        if name in ALWAYS_DATA_DEPENDENT:
            self.data_dependent.append(overload)
        elif name == "aten.repeat_interleave" and "Tensor" in overload and kwargs.get("output_size") is None:
            if not (len(args) > 2 and args[2] is not None) and not any(
                isinstance(a, torch.Tensor) and a.dim() == 0 for a in args[1:2]
            ):
                self.data_dependent.append(overload)
        elif name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_") and _is_bool_index(
            args
        ):
            self.data_dependent.append(f"{overload} (boolean mask)")
        if name in ("aten._to_copy", "aten.copy_"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst_device = kwargs.get("device") if name == "aten._to_copy" else args[0].device
            if (
                isinstance(src, torch.Tensor)
                and src.device.type != "cpu"
                and dst_device is not None
                and torch.device(dst_device).type == "cpu"
            ):
                self.host_reads += 1
        return func(*args, **kwargs)


class HostReads(TorchFunctionMode):
    """Records every read of tensor values into Python (``.tolist()``, ``.item()``, ``bool()``, ``int()``, ...).

    ``OpCounter.host_reads`` sees a read only as a device-to-CPU copy, so on the CPU ``.tolist()`` (which
    dispatches no aten op) is invisible to it; a torch-function mode sees the Python call itself.
    """

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "__array__"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))
