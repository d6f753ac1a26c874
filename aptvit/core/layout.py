"""``PatchLayout``: which patches a batch of images is cut into, as packed tensors.

Tokens are packed image after image; inside an image they are in raster order of their top-left
corner (row-major), whatever their size, so a language model reading them sees a natural order.
All per-token tensors share one index space, the packed patch tokens (no prefix tokens):

    y, x, size      (T,)   top-left corner and side of every patch, in pixels
    cu_seqlens      (B+1,) token offsets of the images, as varlen attention kernels take them
    offsets         the same offsets as Python ints, so that the host never reads them from the device
    cells           (sum_i cells_i,) for every base cell of every image (image by image,
                    row-major), the packed index of the token that covers it

Images in one layout may have different sizes (a list of images); ``cell_index`` is then only
available per image, through ``cell_index_of(i)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .io import InputError, UserTypeError
from .packing import seq_index


@dataclass(eq=False)
class PatchLayout:
    """Packed description of the mixed-size patches of a batch of images.

    Attributes:
        patch_sizes: allowed patch sizes in pixels, ascending; ``patch_sizes[0]`` is the base size p.
        image_sizes: (H, W) in pixels of every image; multiples of p.
        y, x: (T,) long, top-left corner of every token's patch.
        size: (T,) long, side of every token's patch (one of ``patch_sizes``).
        cu_seqlens: (B+1,) int32, ``cu_seqlens[i]:cu_seqlens[i+1]`` are image i's tokens.
        cells: (C,) long, packed token index covering each base cell, image by image, row-major.
        max_seqlen: longest image in tokens (a Python int, so kernels need no device sync).
        offsets: ``cu_seqlens`` as a tuple of B+1 Python ints, for everything the host needs (slicing,
            counts, ``max_seqlen``) without a device sync. Every constructor fills it; when left out it
            is read from ``cu_seqlens`` once (a sync on a GPU).
    """

    patch_sizes: Tuple[int, ...]
    image_sizes: Tuple[Tuple[int, int], ...]
    y: torch.Tensor
    x: torch.Tensor
    size: torch.Tensor
    cu_seqlens: torch.Tensor
    cells: torch.Tensor
    max_seqlen: int
    offsets: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.offsets is None:
            self.offsets = tuple(int(v) for v in self.cu_seqlens.tolist())
        self.offsets = tuple(self.offsets)
        if len(self.offsets) != len(self.image_sizes) + 1:
            raise InputError(f"offsets must have {len(self.image_sizes) + 1} entries (B+1), got {len(self.offsets)}")

    # ------------------------------------------------------------------ shape facts
    @property
    def base_size(self) -> int:
        return self.patch_sizes[0]

    @property
    def batch_size(self) -> int:
        return len(self.image_sizes)

    @property
    def device(self) -> torch.device:
        return self.y.device

    @property
    def total_tokens(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_tokens(self) -> torch.Tensor:
        """(B,) long: tokens per image."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def grid_sizes(self) -> Tuple[Tuple[int, int], ...]:
        """(H / p, W / p) of every image."""
        p = self.base_size
        return tuple((h // p, w // p) for h, w in self.image_sizes)

    @property
    def num_base_tokens(self) -> torch.Tensor:
        """(B,) long: tokens per image if every patch had the base size."""
        return to_device([gh * gw for gh, gw in self.grid_sizes], torch.long, self.device)

    @property
    def same_size(self) -> bool:
        return len(set(self.image_sizes)) == 1

    @property
    def token_counts(self) -> Tuple[int, ...]:
        """Tokens per image as Python ints (from ``offsets``: no device sync)."""
        return tuple(hi - lo for lo, hi in zip(self.offsets, self.offsets[1:]))

    @property
    def image_index(self) -> torch.Tensor:
        """(T,) long: the image each packed token belongs to."""
        # output_size from the host offsets: repeat_interleave need not read the counts back first
        counts = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(
            torch.arange(self.batch_size, device=self.device), counts, output_size=self.total_tokens
        )

    @property
    def areas(self) -> torch.Tensor:
        """(T,) long: base cells covered by each token, (size / p) ** 2; the weight for average pooling."""
        return (self.size // self.base_size) ** 2

    @property
    def cell_offsets(self) -> torch.Tensor:
        """(B+1,) long: offsets of each image's cells in ``cells``."""
        return to_device(
            list(itertools.accumulate([0] + [gh * gw for gh, gw in self.grid_sizes])), torch.long, self.device
        )

    @property
    def cell_index(self) -> torch.Tensor:
        """(B, H/p, W/p) long: packed index of the token covering every base cell (same-size images)."""
        if not self.same_size:
            raise InputError(
                f"images in this layout differ in size ({sorted(set(self.image_sizes))}); use cell_index_of(i)"
            )
        gh, gw = self.grid_sizes[0]
        return self.cells.view(self.batch_size, gh, gw)

    def cell_index_of(self, i: int) -> torch.Tensor:
        """(H_i/p, W_i/p) long: packed index of the token covering every base cell of image i."""
        gh, gw = self.grid_sizes[i]
        start = sum(a * b for a, b in self.grid_sizes[:i])
        return self.cells[start : start + gh * gw].view(gh, gw)

    def boxes(self, i: int) -> torch.Tensor:
        """(N_i, 3) long: y, x, size in pixels of image i's patches, in packing order."""
        if not -self.batch_size <= i < self.batch_size:
            raise IndexError(f"image index {i} out of range for a layout of {self.batch_size} images")
        i %= self.batch_size
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return torch.stack([self.y[lo:hi], self.x[lo:hi], self.size[lo:hi]], dim=1)

    def size_counts(self) -> Dict[int, torch.Tensor]:
        """{patch size: (B,) long tokens of that size per image}."""
        n = len(self.patch_sizes)
        level = torch.zeros_like(self.size)  # position of every token's size in patch_sizes
        for j, s in enumerate(self.patch_sizes[1:], 1):
            level += (self.size == s).long() * j
        key = self.image_index * n + level
        counts = torch.zeros(self.batch_size * n, dtype=torch.long, device=self.device)
        counts.index_add_(0, key, torch.ones((), dtype=torch.long, device=self.device).expand(key.shape[0]))
        counts = counts.view(self.batch_size, n)
        return {s: counts[:, j] for j, s in enumerate(self.patch_sizes)}

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        kept = self.total_tokens / max(1, sum(gh * gw for gh, gw in self.grid_sizes))
        return (
            f"PatchLayout(images={self.batch_size}, patch_sizes={self.patch_sizes}, "
            f"image_sizes={sorted(set(self.image_sizes))}, tokens={self.total_tokens} ({kept:.1%} of base))"
        )

    # ------------------------------------------------------------------ moving and joining
    def to(self, device, non_blocking: bool = False) -> "PatchLayout":
        """The same layout with its tensors on ``device``."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PatchLayout(
            self.patch_sizes,
            self.image_sizes,
            move(self.y),
            move(self.x),
            move(self.size),
            move(self.cu_seqlens),
            move(self.cells),
            self.max_seqlen,
            self.offsets,
        )

    def pin_memory(self) -> "PatchLayout":
        """The same layout in page-locked host memory (``DataLoader(pin_memory=True)`` calls this), so that
        ``to(device, non_blocking=True)`` copies asynchronously. Needs an accelerator."""
        pin = lambda t: t.pin_memory()  # noqa: E731
        return PatchLayout(
            self.patch_sizes,
            self.image_sizes,
            pin(self.y),
            pin(self.x),
            pin(self.size),
            pin(self.cu_seqlens),
            pin(self.cells),
            self.max_seqlen,
            self.offsets,
        )

    def image(self, i: int) -> "PatchLayout":
        """Layout of image i alone."""
        if not -self.batch_size <= i < self.batch_size:
            raise IndexError(f"image index {i} out of range for a layout of {self.batch_size} images")
        i %= self.batch_size
        lo, hi = self.offsets[i], self.offsets[i + 1]
        start = sum(gh * gw for gh, gw in self.grid_sizes[:i])
        gh, gw = self.grid_sizes[i]
        return PatchLayout(
            self.patch_sizes,
            (self.image_sizes[i],),
            self.y[lo:hi],
            self.x[lo:hi],
            self.size[lo:hi],
            to_device([0, hi - lo], torch.int32, self.device),
            self.cells[start : start + gh * gw] - lo,
            hi - lo,
            (0, hi - lo),
        )

    @staticmethod
    def cat(layouts: Sequence["PatchLayout"]) -> "PatchLayout":
        """Join layouts (e.g. one per image from data-loader workers) into one batch layout."""
        if len(layouts) == 0:
            raise InputError("layouts is empty; nothing to join")
        sizes = {tuple(l.patch_sizes) for l in layouts}
        if len(sizes) != 1:
            raise InputError(f"cannot join layouts with different patch_sizes: {sorted(sizes)}")
        if len(layouts) == 1:
            return layouts[0]
        device = layouts[0].device
        offsets, cells = [0], []
        for l in layouts:
            start = offsets[-1]
            cells.append(l.cells.to(device) + start)
            offsets.extend(start + o for o in l.offsets[1:])
        return PatchLayout(
            layouts[0].patch_sizes,
            tuple(s for l in layouts for s in l.image_sizes),
            torch.cat([l.y.to(device) for l in layouts]),
            torch.cat([l.x.to(device) for l in layouts]),
            torch.cat([l.size.to(device) for l in layouts]),
            to_device(offsets, torch.int32, device),
            torch.cat(cells),
            max(l.max_seqlen for l in layouts),
            tuple(offsets),
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """A JSON-serialisable dict (plain ints and lists) that ``from_dict`` turns back into the layout."""
        return {
            "patch_sizes": list(self.patch_sizes),
            "image_sizes": [list(s) for s in self.image_sizes],
            "cu_seqlens": list(self.offsets),
            "boxes": torch.stack([self.y, self.x, self.size], 1).tolist(),
        }

    @staticmethod
    def from_dict(d: dict, device=None) -> "PatchLayout":
        """Rebuild a layout from ``to_dict()`` output (the cell index is recomputed from the boxes)."""
        boxes = torch.tensor(d["boxes"], dtype=torch.long, device=device).view(-1, 3)
        cu = torch.tensor(d["cu_seqlens"], dtype=torch.int32, device=device)
        image_sizes = tuple((int(h), int(w)) for h, w in d["image_sizes"])
        return from_boxes(tuple(d["patch_sizes"]), image_sizes, boxes[:, 0], boxes[:, 1], boxes[:, 2], cu)


def to_device(values: Sequence[float], dtype: torch.dtype, device) -> torch.Tensor:
    """A small tensor of host numbers on ``device`` without waiting for the device.

    ``torch.tensor(values, device="cuda")`` copies with ``non_blocking=False``, which synchronises the
    stream; a non-blocking copy from pageable memory is staged at once and needs no wait. On the CPU there is
    nothing to copy (and no ``to`` to dispatch).
    """
    if torch.compiler.is_compiling() and len(values):
        # in a traced graph, built from ops: a tensor constant inside a scan's body would not serialise
        # (torch.export.save of aptvit.export's per-image program)
        return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])
    t = torch.tensor(values, dtype=dtype)
    return t if t.device == torch.device(device) else t.to(device, non_blocking=True)


def check_patch_sizes(patch_sizes) -> Tuple[int, ...]:
    """Validate patch sizes: ints, ascending, each the base size times a power of two."""
    if isinstance(patch_sizes, int) and not isinstance(patch_sizes, bool):
        patch_sizes = (patch_sizes,)
    try:
        sizes = tuple(patch_sizes)
    except TypeError:
        raise UserTypeError(
            f"patch_sizes must be a sequence of ints such as (16, 32, 64), got {patch_sizes!r}"
        ) from None
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise InputError(f"patch_sizes must be positive ints such as (16, 32, 64), got {patch_sizes!r}")
    base = sizes[0]
    for a, b in zip(sizes, sizes[1:]):
        if b <= a:
            raise InputError(f"patch_sizes must be strictly ascending, got {sizes}")
    for s in sizes[1:]:
        k = s // base
        if s % base or k & (k - 1):
            raise InputError(f"patch_sizes must be the base size {base} times powers of two, got {s} in {sizes}")
    return sizes


def from_boxes(
    patch_sizes: Tuple[int, ...],
    image_sizes: Tuple[Tuple[int, int], ...],
    y: torch.Tensor,
    x: torch.Tensor,
    size: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> PatchLayout:
    """Build a layout from packed boxes, computing the cell index with one scatter.

    Args:
        y, x, size: (T,) long, already in packing order (image by image).
        cu_seqlens: (B+1,) image offsets into the boxes.

    Raises:
        ValueError: if a box is not one of ``patch_sizes`` on its own grid, or the boxes do not tile
            every image's base cells exactly once, or ``cu_seqlens`` does not fit the boxes.
    """
    patch_sizes = check_patch_sizes(patch_sizes)
    offsets = _check_boxes(patch_sizes, image_sizes, y, x, size, cu_seqlens)
    cover, flat, outside, total = _box_cells(patch_sizes[0], image_sizes, y, x, size, cu_seqlens)
    hits = torch.bincount(flat[~outside], minlength=total)
    if bool(outside.any()) or bool((hits != 1).any()):
        raise InputError("boxes do not tile the images: every base cell must be covered exactly once")
    cells = torch.empty(total, dtype=torch.long, device=y.device)
    cells[flat] = cover
    return PatchLayout(
        tuple(patch_sizes),
        tuple(image_sizes),
        y,
        x,
        size,
        cu_seqlens.to(torch.int32),
        cells,
        max((b - a for a, b in zip(offsets, offsets[1:])), default=0),
        offsets,
    )


def _check_boxes(patch_sizes, image_sizes, y, x, size, cu_seqlens) -> Tuple[int, ...]:
    """``from_boxes``'s input checks (shapes, offsets, image sizes, box sizes on their grids); the host offsets."""
    p, t = patch_sizes[0], y.shape[0]
    if not (x.shape == size.shape == (t,)):
        raise InputError(
            f"y, x, size must be (T,) tensors of one length, got {tuple(y.shape)}, {tuple(x.shape)}, {tuple(size.shape)}"
        )
    cu = cu_seqlens.long()
    offsets = tuple(int(v) for v in cu.tolist()) if cu.dim() == 1 else ()
    if (
        len(offsets) != len(image_sizes) + 1
        or offsets[0] != 0
        or offsets[-1] != t
        or any(b < a for a, b in zip(offsets, offsets[1:]))
    ):
        raise InputError(
            f"cu_seqlens must be ({len(image_sizes) + 1},) offsets from 0 to {t}, non-decreasing; got {cu.tolist()}"
        )
    for h, w in image_sizes:
        if h % p or w % p or h <= 0 or w <= 0:
            raise InputError(f"image size {h}x{w} is not a positive multiple of the base patch size {p}")
    allowed = torch.tensor(patch_sizes, device=y.device)
    if t and (bool((~torch.isin(size, allowed)).any()) or bool((y % size).any()) or bool((x % size).any())):
        raise InputError(
            f"every box must have a size in {patch_sizes} and sit on the grid of its size (y, x multiples of it)"
        )
    return offsets


def _box_cells(p: int, image_sizes, y, x, size, cu_seqlens):
    """Every token expanded into the k x k base cells it covers.

    Returns:
        cover: (C',) the token of each covered cell; flat: (C',) the cell's index in the packed cell list (image by
        image, row-major); outside: (C',) bool, the cell lies outside its image; total: the images' cell count C.
    """
    device = y.device
    image = seq_index(cu_seqlens.long())
    grid_h = torch.tensor([h // p for h, _ in image_sizes], dtype=torch.long, device=device)
    grid_w = torch.tensor([w // p for _, w in image_sizes], dtype=torch.long, device=device)
    grid_counts = torch.tensor([(h // p) * (w // p) for h, w in image_sizes], dtype=torch.long)
    cell_offsets = torch.cat([grid_counts.new_zeros(1), grid_counts.cumsum(0)]).to(device)
    k = size // p
    cover = torch.repeat_interleave(torch.arange(y.shape[0], device=device), k * k)
    within = torch.arange(cover.shape[0], device=device) - torch.repeat_interleave(
        torch.cumsum(k * k, 0) - k * k, k * k
    )
    kk = k[cover]
    row = y[cover] // p + within // kk
    col = x[cover] // p + within % kk
    img = image[cover]
    outside = (row >= grid_h[img]) | (col >= grid_w[img]) | (row < 0) | (col < 0)
    flat = cell_offsets[img] + row * grid_w[img] + col
    return cover, flat, outside, int(cell_offsets[-1])
