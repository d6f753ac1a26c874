"""Content scores: how much detail a candidate patch holds, one grid of scores per patch size.

A scorer is any callable ``scorer(gray, sizes, base_size) -> {size: scores}`` where

* ``gray`` is (B, H, W) float32 grayscale on the 0..255 scale (see ``pixels.grayscale_255``),
* ``sizes`` are the patch sizes to score (multiples of ``base_size`` by powers of two),
* ``scores[size]`` is (B, H // size, W // size): one score per patch of the grid of that size
  anchored at the top-left corner. Low score = plain region = safe to merge.

Built-in scorers (all per-pixel quantities, so that one threshold can be compared across sizes,
which the token-budget mode relies on):

* ``entropy_scores``: Shannon entropy in bits of the patch's intensity histogram (the APT default).
* ``laplacian_scores``: mean |8-neighbour Laplacian| of grayscale in [0, 1].
* ``upsampling_error_scores``: MSE (grayscale in [0, 1]) between a patch and the patch area-averaged
  down to the base size and bilinearly upsampled back.

Every scale comes from one pass over the pixels: the base grid is computed from the pixels and each
coarser grid by combining 2x2 children (histograms add, means average).

``SCORERS`` is the registry: each name carries its function, its default thresholds and its parameters
(entropy's ``bins``). ``register_scorer`` adds yours, which a converted model then saves by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .io import InputError, UserTypeError

Scorer = Callable[[torch.Tensor, Sequence[int], int], Dict[int, torch.Tensor]]

# Bound on the dense (images x cells x bins) histogram built at once; larger batches are chunked.
_MAX_HIST_ENTRIES = 1 << 24


def bin_index(gray: torch.Tensor, bins: int) -> torch.Tensor:
    """Histogram bin of every pixel, ``bins`` equal-width bins over [0, 255] (255 in the last bin).

    Matches ``numpy.histogram(gray, bins, range=(0, 255))``: the bin is floor(v * bins / 255). For
    power-of-two ``bins`` (the default 512) ``v * bins`` is exact, so the only rounding is in the
    division, which can round a value just below an edge k * 255 / bins up to k; comparing against
    the exact edge undoes that.

    Args:
        gray: (...) float32 in [0, 255].
        bins: number of bins, >= 2.

    Returns:
        (...) int32 in [0, bins - 1].
    """
    scaled = gray * bins
    idx = torch.div(scaled, 255.0).floor_()
    idx -= (idx * 255.0).gt_(scaled)  # an in-place comparison keeps the float dtype: 1.0 where it rounded up
    return idx.clamp_(0, bins - 1).to(torch.int32)


_KEPT_MAX = 16  # entries of each table cache; the oldest goes first
_ENTROPY_TABLES: Dict[tuple, tuple] = {}
_XLOGX: Dict[tuple, tuple] = {}
_ONES: Dict[tuple, torch.Tensor] = {}


def _kept(cache: Dict[tuple, Any], key: tuple, build: Callable[[], Any]) -> Any:
    """``build()`` once per ``key``, kept in ``cache``: constants of the shapes (a dozen ops per call otherwise).
    Built outside inference mode (ordinary tensors: usable in and out of it); inside compiled code built as ops and
    never kept (no host cache inside a graph)."""
    if torch.compiler.is_compiling():
        return build()
    value = cache.get(key)
    if value is None:
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        if len(cache) >= _KEPT_MAX:
            cache.pop(next(iter(cache)))
        cache[key] = value
    return value


def _entropy_tables(bins: int, hc: int, wc: int, first: int, b: int, dtype: torch.dtype, device) -> tuple:
    """(cell keys (hc * first, wc * first) ``dtype``: cell * bins under every pixel, image offsets (b, 1, 1))."""

    def build():
        dd = {"dtype": dtype, "device": device}
        cell = torch.arange(hc, **dd).repeat_interleave(first)[:, None] * wc
        cell = (cell + torch.arange(wc, **dd).repeat_interleave(first)[None, :]) * bins
        return cell, (torch.arange(b, **dd) * (hc * wc * bins)).view(b, 1, 1)

    return _kept(_ENTROPY_TABLES, (bins, hc, wc, first, b, dtype, str(device)), build)


def _xlogx_table(n: int, device) -> tuple:
    """((n + 1,) float32 ``xlogy(c, c)`` of every count c = 0 .. n, and the 0-d float32 log2(n) and n * ln 2 of
    ``entropy_scores``' last step)."""

    def build():
        c = torch.arange(n + 1, dtype=torch.float32, device=device)
        # two 0-d fills, not a host tensor copied over: no tensor constant in a traced graph (torch.export.save)
        consts = [torch.full((), v, dtype=torch.float32, device=device) for v in (math.log2(n), n * math.log(2.0))]
        return (torch.special.xlogy(c, c), *consts)

    return _kept(_XLOGX, (n, str(device)), build)


def _ones(n: int, device) -> torch.Tensor:
    """(n,) int32 ones (a stride-0 view of one): the histogram's increments."""
    return _kept(_ONES, (n, str(device)), lambda: torch.ones((), dtype=torch.int32, device=device).expand(n))


def _coarsen(grid: torch.Tensor, reduce: str) -> torch.Tensor:
    """Combine 2x2 children into one parent; a trailing odd row/column has no parent and is dropped.

    Args:
        grid: (B, h, w, ...) values per cell.
        reduce: "sum" (histograms) or "mean" (per-pixel means of equal-sized children).

    Returns:
        (B, h // 2, w // 2, ...).
    """
    b, h, w = grid.shape[:3]
    rest = grid.shape[3:]
    if reduce == "sum" and not grid.is_floating_point():  # integer counts: any order is exact, and four strided
        g = grid[:, : h // 2 * 2, : w // 2 * 2]  # adds take a fraction of a strided two-dimension reduction
        return g[:, ::2, ::2] + g[:, ::2, 1::2] + g[:, 1::2, ::2] + g[:, 1::2, 1::2]
    g = grid[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, *rest)
    return g.sum((2, 4)) if reduce == "sum" else g.mean((2, 4))


def _per_scale(
    base_grid: torch.Tensor, sizes: Sequence[int], base_size: int, reduce: str, finish
) -> Dict[int, torch.Tensor]:
    """Walk up the quadtree from the base grid, keeping the levels that were asked for."""
    out: Dict[int, torch.Tensor] = {}
    grid, size = base_grid, base_size
    top = max(sizes)
    while True:
        if size in sizes:
            out[size] = finish(grid, size)
        if size >= top:
            return out
        grid, size = _coarsen(grid, reduce), size * 2


def entropy_scores(
    gray: torch.Tensor, sizes: Sequence[int], base_size: int, bins: int = 512
) -> Dict[int, torch.Tensor]:
    """Shannon entropy (bits) of each patch's intensity histogram, for every requested size.

    The histograms of the smallest requested size come from one scatter-add over the pixels;
    every coarser histogram is the sum of its four children. Memory is images x cells x bins
    counts (never pixels x bins); large batches are processed in chunks of images.

    Args:
        gray: (B, H, W) float32 in [0, 255].
        sizes: patch sizes to score, each ``base_size * 2**k``.
        base_size: the base patch size p; H and W need not be multiples of p (remainders are ignored).
        bins: number of equal-width bins over [0, 255].

    Returns:
        {size: (B, H // size, W // size) float32 entropy in bits}.
    """
    b, h, w = gray.shape
    first = min(sizes)
    hc, wc = h // first, w // first
    cells = hc * wc
    chunk = max(1, _MAX_HIST_ENTRIES // max(1, cells * bins))
    if b > chunk:
        parts = [entropy_scores(gray[i : i + chunk], sizes, base_size, bins) for i in range(0, b, chunk)]
        return {s: torch.cat([p[s] for p in parts]) for s in sizes}

    # key = ((image * cells) + cell) * bins + bin (int32 when it fits), the cell and image terms from tables kept per
    # shape
    dtype = torch.int32 if b * cells * bins < 2**31 else torch.int64
    dev = gray.device
    g = gray if gray.shape[1:] == (hc * first, wc * first) else gray[:, : hc * first, : wc * first]
    key = bin_index(g, bins)
    key = key if dtype == torch.int32 else key.to(dtype)
    cell, images = _entropy_tables(bins, hc, wc, first, b, dtype, dev)  # as ops inside compiled code (``_kept``)
    key += cell
    if b > 1:  # one image: its offset is 0 (a pass over every pixel saved)
        key += images
    # index_add into zeros of a known size: bincount's output size depends on the largest key, which a
    # GPU would have to read back first; as fast as bincount on the CPU.
    ones = _ones(key.numel(), dev)
    hist = torch.zeros(b * cells * bins, dtype=torch.int32, device=dev).index_add_(0, key.view(-1), ones)
    hist = hist.view(b, hc, wc, bins)

    def finish(counts: torch.Tensor, size: int) -> torch.Tensor:
        xlogx, log2_n, n_ln2 = _xlogx_table(size * size, dev)
        # c log c of every count 0..n, looked up: the same values as xlogy on each count, in a fraction of the time
        xlogx = xlogx.index_select(0, counts.reshape(-1)).view(counts.shape)
        # H = log2(n) - sum(c log2 c) / n, with 0 log 0 = 0; addcdiv is the division and the subtraction in one op,
        # with the same bits (-1 times the quotient is exact)
        return torch.addcdiv(log2_n, xlogx.sum(-1), n_ln2, value=-1)

    return _per_scale(hist, sizes, first, "sum", finish)


def laplacian_scores(gray: torch.Tensor, sizes: Sequence[int], base_size: int) -> Dict[int, torch.Tensor]:
    """Mean |8-neighbour Laplacian| of grayscale in [0, 1] (reflect padding), for every requested size.

    Args:
        gray: (B, H, W) float32 in [0, 255].
        sizes, base_size: as in ``entropy_scores``.

    Returns:
        {size: (B, H // size, W // size) float32}.
    """
    # Elementwise fp32 sums, not a 3x3 conv: a conv follows the caller's autocast (bf16 on the CPU and CUDA) and,
    # on CUDA, cuDNN's TF32 default (10-bit mantissas), so the layout would depend on where and under what context
    # it is computed. The 8-neighbour Laplacian is the 3x3 box sum minus 9 times the centre (separable sums).
    with torch.autocast(gray.device.type, enabled=False):
        x = (gray.float() / 255.0)[:, None]
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect" if min(h, w) > 1 else "replicate")
        rows = padded[..., :w] + padded[..., 1 : w + 1] + padded[..., 2:]  # (B, 1, H + 2, W)
        box = rows[..., :h, :] + rows[..., 1 : h + 1, :] + rows[..., 2:, :]
        lap = (box - 9.0 * x).abs()
        base = F.avg_pool2d(lap, base_size)[:, 0]  # (B, hc, wc)
    return _per_scale(base, sizes, base_size, "mean", lambda grid, size: grid)


def upsampling_error_scores(gray: torch.Tensor, sizes: Sequence[int], base_size: int) -> Dict[int, torch.Tensor]:
    """MSE between each patch and its down-then-up-sampled copy, grayscale in [0, 1].

    The downsampling is the one the patch embedding uses (exact area averaging to base_size x
    base_size); the upsampling is bilinear within the patch. Patches of the base size score 0.

    Args:
        gray: (B, H, W) float32 in [0, 255].
        sizes, base_size: as in ``entropy_scores``.

    Returns:
        {size: (B, H // size, W // size) float32}.
    """
    x = gray / 255.0
    b, h, w = x.shape
    out = {}
    for size in sizes:
        gh, gw = h // size, w // size
        if size == base_size or gh == 0 or gw == 0:
            out[size] = x.new_zeros(b, gh, gw)
            continue
        patches = x[:, : gh * size, : gw * size].reshape(b, gh, size, gw, size).permute(0, 1, 3, 2, 4)
        patches = patches.reshape(-1, 1, size, size)
        small = F.avg_pool2d(patches, size // base_size)
        back = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
        out[size] = (back - patches).pow(2).mean((1, 2, 3)).view(b, gh, gw)
    return out


# ---------------------------------------------------------------------------------------------- registry
MAX_BINS = 65536


@dataclass(frozen=True)
class ScorerSpec:
    """A registered scorer: the function, its default thresholds, and its keyword parameters.

    Attributes:
        fn: ``fn(gray, sizes, base_size, **params) -> {size: scores}``.
        thresholds: default threshold by scale factor (patch size / base size, 2, 4, 8, ...); a larger
            factor without an entry uses the smallest default.
        params: the keyword parameters of ``fn`` a model may set, with their defaults (saved with the model).
        check: ``check(params) -> None``, raising ValueError for a bad value (optional).
        finite: the scores of a finite grayscale are always finite (the built-in scorers), so ``patch_layout`` does
            not look for NaN scores (two ops per call fewer); False (checked) for anything registered without it.
    """

    fn: Scorer
    thresholds: Mapping[int, float]
    params: Mapping[str, Any] = field(default_factory=dict)
    check: Optional[Callable[[Mapping[str, Any]], None]] = None
    finite: bool = False

    def resolve_params(self, name: str, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """The defaults updated with ``given``; an unknown parameter or a bad value is a ValueError."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise InputError(f"scorer {name!r} has no parameter(s) {unknown}; its parameters: {known}")
        out = {**self.params, **given}
        try:  # saved with the model as JSON: they must come back equal
            same = json.loads(json.dumps(out)) == out
        except (TypeError, ValueError):
            same = False
        if not same:
            raise InputError(
                f"scorer {name!r} parameters {out!r} must be JSON values (numbers, strings, lists, dicts): "
                "they are saved with the model"
            )
        if self.check is not None:
            self.check(out)
        return out


SCORERS: Dict[str, ScorerSpec] = {}


def register_scorer(
    name: str,
    fn: Scorer,
    thresholds: Mapping[int, float],
    params: Optional[Mapping[str, Any]] = None,
    check: Optional[Callable[[Mapping[str, Any]], None]] = None,
    overwrite: bool = False,
    finite: bool = False,
) -> ScorerSpec:
    """Make ``fn`` a scorer that models can use, save and load by ``name``.

    A converted model stores the scorer's name and parameters, not the function: register the scorer
    (at import time of your module) before loading a model saved with it. Data-loader workers started with
    "spawn" (not "fork") see only what their imports register: register it in a module they import.

    Args:
        name: the name models and the command line use.
        fn: ``fn(gray (B, H, W) in [0, 255], sizes, base_size, **params) -> {size: (B, H // size, W // size)}``;
            low scores mean plain patches that may merge.
        thresholds: default thresholds by scale factor, e.g. ``{2: 5.5, 4: 4.0}``.
        params: keyword parameters of ``fn`` with their defaults.
        check: validates a full set of parameters (raise ValueError).
        overwrite: replace a scorer of the same name.
        finite: promise that ``fn`` never returns NaN for a finite grayscale: the layout then skips its NaN check.
    """
    if not isinstance(name, str) or not name:
        raise UserTypeError(f"a scorer name must be a non-empty string, got {name!r}")
    if name in SCORERS and not overwrite:
        raise InputError(f"scorer {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(fn):
        raise UserTypeError(f"scorer {name!r}: fn must be callable, got {fn!r}")
    factors = {int(k): float(v) for k, v in dict(thresholds).items()}
    if not factors or any(k < 2 or k & (k - 1) for k in factors):
        raise InputError(f"scorer {name!r}: thresholds must be keyed by scale factors 2, 4, 8, ..., got {thresholds!r}")
    spec = ScorerSpec(fn, factors, dict(params or {}), check, bool(finite))
    spec.resolve_params(name, None)  # the defaults themselves must pass the check
    SCORERS[name] = spec
    return spec


def get_scorer(name: str) -> ScorerSpec:
    """The registered scorer ``name``, or a ValueError that lists the registered ones."""
    if not isinstance(name, str) or name not in SCORERS:
        raise InputError(
            f"unknown scorer {name!r}; choose one of {sorted(SCORERS)} (or register yours with "
            "aptvit.core.scoring.register_scorer)"
        )
    return SCORERS[name]


def _check_bins(params: Mapping[str, Any]) -> None:
    bins = params["bins"]
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
        raise InputError(f"bins must be an int from 2 to {MAX_BINS}, got {bins!r}")


# Defaults by scale factor. Entropy: the APT paper's 5.5 bits for 2x; the others were calibrated to keep about as
# many tokens as entropy on the scikit-image photos (benchmarks/calibrate_thresholds.py).
register_scorer(
    "entropy", entropy_scores, {2: 5.5, 4: 4.0, 8: 3.5}, params={"bins": 512}, check=_check_bins, finite=True
)
register_scorer("laplacian", laplacian_scores, {2: 0.069, 4: 0.012, 8: 0.007}, finite=True)
register_scorer("upsample", upsampling_error_scores, {2: 2.4e-4, 4: 1.9e-5, 8: 2.9e-6}, finite=True)
