"""Rotary position embeddings (RoPE) for patches of mixed sizes: coordinates and sin/cos tables, pure tensors.

A merged patch is rotated at its *centre*, in base-grid units: a patch of k x k base cells whose top-left cell
is (r, c) sits at (r + (k - 1) / 2, c + (k - 1) / 2) in the cell-index units where base cell i sits at i
(timm's convention for the centre of a cell). Each RoPE flavour then maps that centre exactly as timm maps
an integer cell index, so with base-size patches only every table equals timm's ``get_embed()``:

    flavour (timm class)                  grid ("kind")  coordinates                         angles
    axial, EVA-02 / PE / RoPE-ViT         "index"        (c + offset) [/ grid * ref]         coord * bands
      (``RotaryEmbeddingCat``)
    mixed, learned per block and head     "index"        c                                   x * fx + y * fy
      (``RotaryEmbeddingMixed``)
    DINOv3 (``RotaryEmbeddingDinoV3``)    "centered"     2 (c + 0.5 + offset) / norm - 1     2 pi coord / periods
    multimodal (``RotaryEmbeddingMRope``) "index"        (0, row, col) picked per channel    coord * inv_freq

The tables are built for every row of a packed sequence at once, with coordinate 0 (angle 0: sin 0, cos 1,
an exact identity rotation) for the rows that timm never rotates (class and register tokens, bucket padding).
Everything here is shape-static and reads no tensor value on the host: it runs inside a compiled or captured
forward. DINOv3's coordinate augmentation (shift / jitter / rescale) is a training-time option of timm's module
that is off at evaluation; it is not reproduced here (the caller refuses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .io import InputError
from .layout import PatchLayout, to_device

KINDS = ("index", "centered")
NORMALIZE = ("separate", "min", "max")


@dataclass(frozen=True)
class RopeGrid:
    """How a flavour turns a centre in cell units into its coordinates (timm's ``_build_grid`` settings).

    Attributes:
        kind: "index" (cell index plus offset) or "centered" (DINOv3: 0.5-centred, normalised, mapped to [-1, 1]).
        offset: timm's ``grid_offset``, added to every coordinate (PE uses 1).
        ref: timm's ``ref_feat_shape`` (H, W) or None: "index" coordinates rescaled from the image's grid onto
            this reference grid (EVA-02 fine-tuned at another resolution).
        indexing: "ij" (coordinates (row, col)) or "xy" (coordinates (col, row)), timm's ``grid_indexing``.
        normalize: "centered" only: divide each axis by its own grid side ("separate"), or both by the smaller
            ("min") or the larger ("max").
    """

    kind: str = "index"
    offset: float = 0.0
    ref: Optional[Tuple[int, int]] = None
    indexing: str = "ij"
    normalize: str = "separate"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"RopeGrid kind must be one of {KINDS}, got {self.kind!r}")
        if self.indexing not in ("ij", "xy"):
            raise InputError(f"RopeGrid indexing must be 'ij' or 'xy', got {self.indexing!r}")
        if self.normalize not in NORMALIZE:
            raise InputError(f"RopeGrid normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.ref is not None and self.kind != "index":
            raise InputError("RopeGrid ref (timm's ref_feat_shape) only applies to 'index' grids")


def patch_centres(y: torch.Tensor, x: torch.Tensor, size: torch.Tensor, base: int) -> torch.Tensor:
    """(T, 2) float32 centre (row, col) of every patch in base-cell units: cell i at i, a k-cell patch from
    cell r at r + (k - 1) / 2.

    Args:
        y, x: (T,) top-left corners in pixels; size: (T,) patch sides in pixels; base: the base patch size.
    """
    # (2y + size - base) / (2 base) is exact in float32 (half-integers), and y / base for base-size patches
    rows = (2 * y + size - base).to(torch.float32) / (2 * base)
    cols = (2 * x + size - base).to(torch.float32) / (2 * base)
    return torch.stack([rows, cols], dim=-1)


def layout_centres(layout: PatchLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every patch token's centre and its image's base grid: ((T, 2) float32 (row, col), (T, 2) float32 (h, w)).

    The grid sizes are host ints (one small non-blocking copy); nothing is read back from the device.
    """
    centres = patch_centres(layout.y, layout.x, layout.size, layout.base_size)
    grids = to_device([v for hw in layout.grid_sizes for v in hw], torch.float32, layout.device).view(-1, 2)
    counts = to_device(list(layout.token_counts), torch.long, layout.device)
    per_token = grids.repeat_interleave(counts, dim=0, output_size=layout.total_tokens)
    return centres, per_token


def grid_coords(centres: torch.Tensor, grid_hw: torch.Tensor, grid: RopeGrid) -> torch.Tensor:
    """Coordinates (T, 2) of centres (T, 2) (row, col) on images of base grids grid_hw (T, 2) (h, w).

    The same float32 operations in the same order as timm's ``_build_grid`` on integer indices, so a base-size
    patch gets timm's coordinate exactly. Channels are (row, col) for "ij", (col, row) for "xy".
    """
    c = centres.to(torch.float32)
    hw = grid_hw.to(torch.float32)
    if grid.kind == "index":
        c = c + grid.offset
        if grid.ref is not None:
            # column by column with Python scalars, not a tensor made here: a traced constant that torch.export
            # cannot save inside a ``scan`` (the exported program's per-image layout)
            c = c / hw
            c = torch.stack((c[:, 0] * grid.ref[0], c[:, 1] * grid.ref[1]), dim=-1)
    else:  # "centered"
        if grid.normalize == "separate":
            denom = hw
        else:
            pick = torch.amin if grid.normalize == "min" else torch.amax
            denom = pick(hw, dim=-1, keepdim=True)
        c = 2.0 * ((c + 0.5 + grid.offset) / denom) - 1.0
    return c.flip(-1) if grid.indexing == "xy" else c


def packed_coords(coords: torch.Tensor, patch_pos: torch.Tensor, total: int) -> torch.Tensor:
    """Patch coordinates (T, 2) scattered to the packed rows (N, 2); 0 (the identity rotation) everywhere else."""
    return coords.new_zeros(total, coords.shape[-1]).index_copy(0, patch_pos, coords)


def rope_layout(values: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """Per-frequency values (..., F) to the (..., 2F) layout of timm's ``apply_rot_embed``: interleaved
    [f0, f0, f1, f1, ...], or [f0, f1, ..., f0, f1, ...] with ``rotate_half``."""
    return torch.cat([values, values], dim=-1) if rotate_half else values.repeat_interleave(2, dim=-1)


def sincos_table(angles: torch.Tensor, rotate_half: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(..., F) angles to timm's concatenated table (..., 4F) = [sin, cos], each in ``rope_layout``."""
    sin, cos = rope_layout(angles.sin(), rotate_half), rope_layout(angles.cos(), rotate_half)
    table = torch.cat([sin, cos], dim=-1)
    return table if dtype is None else table.to(dtype)


def axial_angles(coords: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """``RotaryEmbeddingCat``: (N, 2) coordinates, (F,) bands -> (N, 2F) angles, channel-major."""
    return (coords[..., None] * bands.to(torch.float32)).flatten(-2)


def dinov3_angles(coords: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    """``RotaryEmbeddingDinoV3``: (N, 2) coordinates in [-1, 1], (F,) periods -> (N, 2F) angles."""
    periods = periods.to(torch.float32)
    return (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1)


def mixed_angles(coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``RotaryEmbeddingMixed``: (N, 2) coordinates, learned freqs (2, depth, heads, F) -> (depth, heads, N, F).

    Differentiable in ``freqs`` (they are trained), float32 as timm's ``get_mixed_freqs``.
    """
    f = freqs.float()
    return coords[:, 0].unsqueeze(-1) * f[0].unsqueeze(-2) + coords[:, 1].unsqueeze(-1) * f[1].unsqueeze(-2)


def mrope_angles(coords: torch.Tensor, inv_freq: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """``RotaryEmbeddingMRope``: (N, 2) (row, col) coordinates, (F,) frequencies, (F,) axis per channel (0 the
    temporal axis, always at 0 for images; 1 row; 2 col) -> (N, F) angles."""
    pos = torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=-1).index_select(-1, axis)
    return pos * inv_freq.to(torch.float32)
