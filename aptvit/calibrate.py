"""``aptvit calibrate``: find an APT model's operating point on the user's own images.

APT's thresholds (or its token budget), its scorer and its patch sizes are free parameters, and the cheapest
alternative to all of them is to lower the input resolution. ``calibrate`` sweeps a grid of settings on a folder
of the user's images and measures, for every point, its fidelity to the source model and its speed:

- the **source**: the model's timm weights run uniformly at the input size S (the reference of every figure);
- **lower resolution**: the same uniform model at each smaller size of the grid (``sizes``): a plain lower
  resolution is one point of the search, so a recommended APT setting is never one that simply lowering the
  resolution beats;
- **APT**: every (size, patch sizes, scorer, budget or thresholds) of the grid, at S and at the smaller sizes
  (APT on a lower resolution, the mix that wins at aggressive reductions).

Fidelity is top-1 accuracy when the folder has class sub-folders that match the model's head (``aptvit eval``'s
layout), otherwise (and always, beside it) agreement with the source: the share of images whose top-1 class is
the source's, the cosine of the pooled features the head reads ("class cosine") and of the dense patch features
on the source's grid (a smaller grid is upsampled bilinearly; a merged token covers all its cells). Speed is
measured per setting against the source, alternating the two on the same images after a warm-up, medians
(``bench.alternating_medians``); APT's time includes computing its layout from the pixels. Each row also counts
its FLOPs per image (``model_flops``), and a measured speed-up far above the FLOP ratio (``noisy_timings``) is
warned about: on one device, fewer FLOPs do not buy more than proportionally more speed, so such a timing is noise.

With a target (``max_drop`` points of top-1, ``min_agreement`` or ``min_cosine``) the cheapest setting that keeps
it (the most measured images/s; fewer tokens break a tie) is chosen and written as a copy of the checkpoint with
these settings (``aptvit.save``; ``input_size`` in its metadata when the size changed), together with the curve:
a table (Markdown), JSON and a plot, written together atomically. When no setting keeps the target, the message
names the closest setting and the nearest target that some setting keeps.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .bench import CLOCKS, clock_named
from .core.distill import Outputs, cosine
from .core.io import InputError, UserTypeError, atomic_write_many, check_side, check_writable
from .core.quadtree import _budget_tokens, all_merged_tokens, check_budget
from .nn.config import APTConfig
from .nn.convert import convert
from .nn.dense import unmerge_packed
from .nn.model import APTViT, model_flops
from .runtime import autocast, resolve_device, resolve_dtype
from .teacher import timm_outputs

logger = logging.getLogger(__name__)

DEFAULT_BUDGETS = (0.75, 0.5, 0.35)
DEFAULT_SHARES = (0.75, 0.5, 0.35)  # the lower resolutions: about these shares of the source's patch tokens
DEFAULT_THRESHOLDS = "default"  # the scorer's registered thresholds
NOISE_FACTOR = 1.5  # a measured speed-up above this times the FLOP ratio is a disturbed timing (noisy_timings)
FILES = {"json": "calibration.json", "table": "calibration.md", "plot": "calibration.png", "model": "model.safetensors"}
# what ``save`` writes itself: every other metadata entry of an aptvit checkpoint is carried into the copy
OWN_METADATA = ("format", "format_version", "aptvit", "architecture", "timm_args", "pretrained_cfg")


# ---------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Setting:
    """One point of the search.

    Attributes:
        kind: "source" (uniform at the input size), "lower resolution" (uniform at ``size``) or "apt".
        size: the input side in pixels.
        patch_sizes, scorer, scorer_args, budget, thresholds, area_bias: the APT settings (``APTConfig`` fields; None
            for the uniform kinds); thresholds are explicit ({size: value}) even when they are the scorer's defaults.
    """

    kind: str
    size: int
    patch_sizes: Optional[Tuple[int, ...]] = None
    scorer: Optional[str] = None
    scorer_args: Optional[Mapping] = None
    budget: Optional[Union[int, float]] = None
    thresholds: Optional[Mapping[int, float]] = None
    area_bias: Optional[bool] = None

    def name(self, source_size: int, default_sizes: Tuple[int, ...] = ()) -> str:
        if self.kind == "source":
            return f"source ({self.size} px)"
        if self.kind == "lower resolution":
            return f"lower resolution {self.size} px"
        how = (
            f"budget {self.budget:g}"
            if self.budget is not None
            else "thresholds " + ",".join(f"{k}={v:g}" for k, v in sorted(self.thresholds.items()))
        )
        sizes = "" if self.patch_sizes == tuple(default_sizes) else f" sizes {'/'.join(map(str, self.patch_sizes))}"
        at = "" if self.size == source_size else f" at {self.size} px"
        return f"APT {self.scorer} {how}{sizes}{at}{' + area bias' if self.area_bias else ''}"

    def apt_fields(self) -> dict:
        """The ``APTConfig`` fields of an APT setting (patch sizes apart: they choose the model)."""
        return dict(
            scorer=self.scorer,
            scorer_args=dict(self.scorer_args or {}),
            budget=self.budget,
            thresholds=dict(self.thresholds) if self.thresholds is not None else None,
            area_bias=bool(self.area_bias),  # always given: the models are shared and reconfigured setting by setting
        )


# ``calibrate(area_bias=)`` / ``--area-bias``: the ``APTConfig.area_bias`` values each APT setting is tried with
AREA_BIAS_SWEEPS = {"both": (False, True), "on": (True,), "off": (False,)}


def area_bias_values(area_bias: Union[str, bool]) -> Tuple[bool, ...]:
    """``calibrate``'s ``area_bias`` (a key of ``AREA_BIAS_SWEEPS``, or True / False) as the values to sweep."""
    key = ("on" if area_bias else "off") if isinstance(area_bias, bool) else str(area_bias).lower()
    if key not in AREA_BIAS_SWEEPS:
        *others, last = AREA_BIAS_SWEEPS
        raise InputError(f"--area-bias must be {', '.join(others)} or {last}, got {area_bias!r}")
    return AREA_BIAS_SWEEPS[key]


def default_sizes(size: int, patch: int, shares: Sequence[float] = DEFAULT_SHARES) -> List[int]:
    """The source size and the multiples of ``patch`` whose grids hold about each of ``shares`` of its patch tokens
    (224 px at patch 14: 224, 196, 154, 126), descending, at least two patches a side."""
    cells = size // patch
    out = [size] + [max(2, round(cells * math.sqrt(s))) * patch for s in shares]
    return sorted(set(out), reverse=True)


def build_grid(
    size: int,
    patch: int,
    sizes: Sequence[int],
    patch_sets: Sequence[Tuple[int, ...]],
    scorers: Sequence[str],
    budgets: Sequence[Union[int, float]],
    thresholds: Sequence[Union[str, Mapping[int, float]]],
    scorer_args: Optional[Mapping] = None,
    scorer_of_model: Optional[str] = None,
    area_biases: Sequence[bool] = (False,),
) -> Tuple[List[Setting], List[str]]:
    """The settings to sweep, and a note for each one left out (a budget below what its patch sizes allow at a
    size: no layout can meet it).

    Args:
        size: the source's input size S; ``sizes``: the candidates' sizes (S and smaller ones).
        patch_sets: the APT patch sizes to try, each starting at ``patch``.
        thresholds: "default" (each scorer's registered thresholds) or {size: value} dicts; a dict applies to the
            patch sizes whose larger sizes it names exactly.
        scorer_args: the model's own scorer parameters, kept for its own scorer (``scorer_of_model``).
        area_biases: each APT setting without and/or with area-proportional attention (``APTConfig.area_bias``).

    Raises:
        InputError: a size that is not a multiple of the patch size or is above S, a patch set that does not start
            at the model's patch size, thresholds that fit no patch set, settings ``APTConfig`` refuses.
    """
    settings = [Setting("source", size)]
    notes: List[str] = []
    for s in sizes:
        check_side(s, "--sizes")
        if s % patch:
            lower, upper = max(patch, s // patch * patch), (s // patch + 1) * patch
            raise InputError(
                f"--sizes {s} is not a multiple of the model's patch size {patch}; e.g. {lower} or {upper}"
            )
        if s > size:
            raise InputError(
                f"--sizes {s} is above the source's input size {size}: calibrate looks for settings cheaper than "
                "the source (give a larger --size to start from)"
            )
    sizes = sorted(set(sizes), reverse=True)
    settings += [Setting("lower resolution", s) for s in sizes if s < size]
    for ps in patch_sets:
        if ps[0] != patch:
            raise InputError(f"--patch-sizes {','.join(map(str, ps))} must start with the model's patch size {patch}")
    for item in thresholds:
        if item != DEFAULT_THRESHOLDS and not any(sorted(item) == sorted(ps[1:]) for ps in patch_sets):
            text = ",".join(f"{k}={v:g}" for k, v in sorted(item.items()))
            raise InputError(
                f"--thresholds {text} names sizes {'/'.join(map(str, sorted(item)))}, but no --patch-sizes set has "
                f"exactly those larger sizes (sets: {' '.join('/'.join(map(str, p)) for p in patch_sets)})"
            )
    for s in sizes:
        for ps in patch_sets:
            if len(ps) == 1:
                continue  # nothing merges: the same as the uniform model at this size
            for scorer in scorers:
                args = dict(scorer_args or {}) if scorer == scorer_of_model else {}
                modes = [dict(budget=check_budget(b)) for b in budgets]
                modes += [
                    dict(thresholds=None if t == DEFAULT_THRESHOLDS else dict(t))
                    for t in thresholds
                    if t == DEFAULT_THRESHOLDS or sorted(t) == sorted(ps[1:])
                ]
                for mode in modes:
                    try:
                        config = APTConfig(patch_sizes=ps, scorer=scorer, scorer_args=args, **mode)
                    except InputError as e:
                        raise InputError(f"settings {mode} with patch sizes {ps} and scorer {scorer}: {e}") from None
                    setting = Setting(
                        "apt", s, ps, scorer, dict(config.scorer_args), config.budget, config.thresholds,
                        area_bias=bool(area_biases[0]),
                    )  # fmt: skip
                    if config.budget is not None:
                        cells = (s // patch) ** 2
                        allowed, least = _budget_tokens(config.budget, cells), all_merged_tokens((s, s), ps)
                        if allowed < least:
                            notes.append(
                                f"left out {setting.name(size, patch_sets[0])}: {allowed} tokens, below the {least} "
                                f"that patch sizes {'/'.join(map(str, ps))} allow at {s} px"
                            )
                            continue
                    for twin in (replace(setting, area_bias=bool(bias)) for bias in area_biases):
                        if twin not in settings:
                            settings.append(twin)
    return settings, notes


# ---------------------------------------------------------------------------------------------- targets
# Standard errors of the top-1 drop that --max-drop asks for by default. With the drop alone, the cheapest of many
# settings measured on a few hundred images is the luckiest estimate: on 256 elpv val cells --max-drop 0.5 chose a
# setting at -0.39 +- 2.11 points that lost 5.9 points on the test cells (docs/results/calibrate_elpv.md).
DEFAULT_CONFIDENCE = 1.0


@dataclass(frozen=True)
class Target:
    """The fidelity a setting must keep: at most ``max_drop`` points of top-1 below the source, or at least
    ``min_agreement`` (a fraction) of the source's top-1 classes, or at least ``min_cosine`` class cosine.

    ``confidence`` (with ``max_drop``): the top-1 drop plus this many of its standard errors must be within
    ``max_drop``, so that a setting is chosen on evidence, not on a lucky estimate (1: about 84% one-sided).
    None: ``DEFAULT_CONFIDENCE``; 0: the drop alone.
    """

    max_drop: Optional[float] = None
    min_agreement: Optional[float] = None
    min_cosine: Optional[float] = None
    confidence: Optional[float] = None

    def __post_init__(self) -> None:
        if self.max_drop is not None and self.confidence is None:
            object.__setattr__(self, "confidence", DEFAULT_CONFIDENCE)
        if self.confidence is not None:
            c = self.confidence
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
                raise InputError(f"--confidence {c!r} must be a number of standard errors >= 0 (e.g. 1 or 2)")
            if self.max_drop is None:
                raise InputError("--confidence goes with --max-drop (standard errors of the top-1 drop)")
        given = [(k, v) for k, v in asdict(self).items() if v is not None and k != "confidence"]
        if len(given) > 1:
            raise InputError(f"give one target, not {' and '.join('--' + k.replace('_', '-') for k, _ in given)}")
        for name, value, low, high, low_open in (
            ("--max-drop", self.max_drop, 0.0, 100.0, False),
            ("--min-agreement", self.min_agreement, 0.0, 1.0, True),
            ("--min-cosine", self.min_cosine, -1.0, 1.0, True),
        ):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} {value!r} must be a number")
            if value > high or value < low or (low_open and value == low):
                where = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
                unit = " (points of top-1)" if name == "--max-drop" else " (a fraction: 0.99, not 99)"
                raise InputError(f"{name} {value:g} must be in {where}{unit}")

    @property
    def given(self) -> bool:
        return any(v is not None for k, v in asdict(self).items() if k != "confidence")

    def describe(self, source: "Row") -> str:
        if self.max_drop is not None:
            n = self.confidence
            sure = f" (the drop plus {n:g} standard error{'s' * (n != 1)})" if n else ""
            return (
                f"top-1 within {self.max_drop:g} point{'s' * (self.max_drop != 1)} of the source's "
                f"{source.top1:.2f}%{sure}"
            )
        if self.min_agreement is not None:
            return f"top-1 agreement with the source of at least {100 * self.min_agreement:g}%"
        return f"class cosine to the source of at least {self.min_cosine:g}"

    def value(self, row: "Row") -> Optional[float]:
        """The figure the target is about: top-1 drop (points; plus ``confidence`` standard errors), agreement
        (fraction) or class cosine."""
        if self.max_drop is not None:
            if row.top1_drop is None or not self.confidence:
                return row.top1_drop
            return row.top1_drop + self.confidence * (row.top1_se or 0.0)
        if self.min_agreement is not None:
            return None if row.agreement is None else row.agreement / 100
        return row.cosine_pre_logits

    def nearest(self, rows: Sequence["Row"]) -> Optional[str]:
        """The target nearest to this one that some row of ``rows`` keeps, as its option ("--max-drop 1.25"), the
        figure rounded so that the row keeps it; None when no row has the figure."""
        values = [v for v in (self.value(r) for r in rows) if v is not None]
        if not values:
            return None
        if self.max_drop is not None:  # points of top-1, up to the next hundredth
            sure = f" --confidence {self.confidence:g}" if self.confidence != DEFAULT_CONFIDENCE else ""
            return f"--max-drop {math.ceil(round(min(values) * 100, 6)) / 100:g}{sure}"
        best = math.floor(round(max(values) * 10_000, 6)) / 10_000  # down to the next ten-thousandth
        return f"--min-agreement {best:g}" if self.min_agreement is not None else f"--min-cosine {best:g}"

    def met(self, row: "Row") -> bool:
        v = self.value(row)
        if v is None:
            return False
        if self.max_drop is not None:
            return v <= self.max_drop + 1e-9
        return v >= (self.min_agreement if self.min_agreement is not None else self.min_cosine) - 1e-9


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One setting's measurements (``top1*`` and ``agreement`` only where there are labels / a head)."""

    name: str
    kind: str
    size: int
    patch_sizes: Optional[List[int]]
    scorer: Optional[str]
    budget: Optional[float]
    thresholds: Optional[Dict[str, float]]
    tokens: float  # patch tokens per image, mean
    token_share: float  # tokens / the source's patch tokens
    gflops: Optional[float] = None  # per image, mean (``model_flops``: what runs, the layout's embedding bank included)
    top1: Optional[float] = None  # percent
    top1_drop: Optional[float] = None  # the source's top-1 minus this row's, points
    top1_se: Optional[float] = None  # standard error of that paired difference, points
    agreement: Optional[float] = None  # percent of images whose top-1 class is the source's
    cosine_pre_logits: float = 1.0
    cosine_dense: float = 1.0
    images_per_s: float = 0.0
    speedup: float = 1.0  # this row's images/s over the source's, measured alternately
    meets: Optional[bool] = None  # the target (None without one)
    area_bias: Optional[bool] = None  # APT rows: area-proportional attention on (None for the uniform kinds)
    versus: Optional[str] = None  # APT rows with labels: the lower-resolution row nearest in tokens
    top1_gain: Optional[float] = None  # this row's top-1 minus that row's, points (paired, the same images)
    top1_gain_se: Optional[float] = None  # standard error of that paired difference, points
    setting: Optional[Setting] = field(default=None, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("setting")
        return d


def _without_worse_twins(rows: Sequence[Row], target: Target) -> List[Row]:
    """``rows`` less each APT row whose twin, the same setting with the area bias flipped, is in ``rows`` with a better
    figure: the twins run the same tokens and FLOPs, so a speed difference between them is timing noise and
    fidelity decides."""
    better = min if target.max_drop is not None else max

    def beaten(r: Row) -> bool:
        if r.kind != "apt" or r.setting is None:
            return False
        flipped = replace(r.setting, area_bias=not r.setting.area_bias)
        twin = next((t for t in rows if t.setting == flipped), None)  # a scan: settings hold dicts, not hashable
        return twin is not None and target.value(twin) != target.value(r) and better(r, twin, key=target.value) is twin

    return [r for r in rows if not beaten(r)]


def choose(rows: Sequence[Row], target: Target) -> Tuple[Optional[Row], str]:
    """The cheapest row that keeps ``target`` (most measured images/s; fewer tokens break a tie), never the source
    itself, and a sentence that says what was chosen and why (or why nothing was)."""
    source = next(r for r in rows if r.kind == "source")
    what = target.describe(source)
    ok = _without_worse_twins([r for r in rows if r.kind != "source" and target.met(r)], target)
    if not ok:
        others = [r for r in rows if r.kind != "source" and target.value(r) is not None]
        if not others:
            return None, f"no setting besides the source to keep {what}"
        closest = (min if target.max_drop is not None else max)(others, key=target.value)
        return None, (
            f"no setting keeps {what}; the closest is {closest.name} ({_figure(closest, target)}, "
            f"{closest.speedup:.2f}x the source's images/s); the nearest target a setting keeps is "
            f"{target.nearest(others)}"
        )
    best = max(ok, key=lambda r: (r.speedup, -r.tokens))
    reason = (
        f"{best.name}: {f'the fastest of the {len(ok)} settings' if len(ok) > 1 else 'the only setting'} that keep"
        f"{'s' * (len(ok) == 1)} {what} "
        f"({_figure(best, target)}), at {best.speedup:.2f}x the source's images/s with "
        f"{best.token_share:.0%} of its tokens"
    )
    lowres = [r for r in ok if r.kind == "lower resolution"]
    if best.kind == "lower resolution":
        reason += "; a plain lower resolution: the written model merges nothing"
    elif lowres:
        fast = max(lowres, key=lambda r: r.speedup)
        reason += f"; the fastest plain lower resolution that keeps it, {fast.size} px, runs at {fast.speedup:.2f}x"
    else:
        reason += "; no plain lower resolution keeps it"
    if target.max_drop is not None and (best.top1_se or 0.0) > target.max_drop:
        # the cheapest of many settings that pass a noisy test: its own figure flatters it
        reason += (
            f"; but its top-1 difference has a standard error of {best.top1_se:.2f} points, more than the "
            f"{target.max_drop:g} asked: on these images the choice is within noise (more labelled images, a "
            "larger --limit, make it firmer)"
        )
    return best, reason


def noisy_timings(rows: Sequence[Row], factor: float = NOISE_FACTOR) -> List[Row]:
    """The rows whose measured speed-up is above ``factor`` times their FLOP ratio (the source's FLOPs over theirs).

    Cutting FLOPs buys at most about proportionally more speed on one device (APT's layout and gathers only add to
    its time), so such a speed-up says that the timing was disturbed (another process, a cold cache, too few
    runs), not that the setting is that fast.
    """
    source = rows[0]
    if not source.gflops:
        return []
    return [r for r in rows[1:] if r.gflops and r.speedup > factor * source.gflops / r.gflops]


def noisy_warning(noisy: Sequence[Row], source: Row, clock: str) -> str:
    """One line that names the settings of ``noisy_timings`` and says how to measure them better."""
    some = ", ".join(
        f"{r.name} ({r.speedup:.2f}x measured, {source.gflops / r.gflops:.2f}x fewer FLOPs)" for r in noisy[:3]
    )
    more = f" and {len(noisy) - 3} more" if len(noisy) > 3 else ""
    hint = " (or --clock thread, on a shared machine)" if clock == "wall" else ""
    return (
        f"the timings look noisy: {len(noisy)} setting{'s' * (len(noisy) != 1)} measured more than {NOISE_FACTOR:g}x "
        f"faster than their FLOPs allow: {some}{more}; speeds (and a choice) rest on them: raise --runs and "
        f"--timing-images{hint}"
    )


def _figure(row: Row, target: Target) -> str:
    if target.max_drop is not None:
        return f"top-1 {row.top1:.2f}%, {0.0 - row.top1_drop:+.2f} +- {row.top1_se:.2f} points"
    if target.min_agreement is not None:
        return f"agreement {row.agreement:.2f}%"
    return f"class cosine {row.cosine_pre_logits:.4f}"


# ---------------------------------------------------------------------------------------------- result
@dataclass
class Calibration:
    """What ``calibrate`` found.

    Attributes:
        rows: every setting's ``Row``, the source first.
        chosen: the row the target picked (None without a target).
        reason: what was chosen and why.
        model: the chosen setting as an ``APTViT`` (sharing the source's weights), and
        input_size: the size it runs at (None without a choice).
        files: the files written.
    """

    rows: List[Row]
    labelled: bool
    images: int
    target: Target
    chosen: Optional[Row] = None
    reason: str = ""
    model: Optional[APTViT] = None
    input_size: Optional[int] = None
    files: Dict[str, Path] = field(default_factory=dict)
    facts: Dict = field(default_factory=dict)

    @property
    def source(self) -> Row:
        return self.rows[0]

    def to_json(self) -> dict:
        return {
            **self.facts,
            "images": self.images,
            "labelled": self.labelled,
            "target": {k: v for k, v in asdict(self.target).items() if v is not None},
            "chosen": self.chosen.name if self.chosen else None,
            "reason": self.reason,
            "rows": [r.to_json() for r in self.rows],
        }


def format_table(rows: Sequence[Row], chosen: Optional[Row] = None) -> str:
    """A Markdown table of the rows (fidelity columns only where they exist)."""
    labelled = rows[0].top1 is not None
    head = rows[0].agreement is not None
    cols = ["setting", "size", "tokens/img", "tokens", "GFLOPs"]
    cols += ["top-1 %", "vs source (points)"] if labelled else []
    cols += ["agreement %"] if head else []
    cols += ["class cos", "dense cos", "img/s", "speed", "target"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        gflops = "" if r.gflops is None else f"{r.gflops:.3g}"
        cells = [r.name, str(r.size), f"{r.tokens:.1f}", f"{r.token_share:.0%}", gflops]
        if labelled:
            cells += [f"{r.top1:.2f}", "" if r.kind == "source" else f"{0.0 - r.top1_drop:+.2f} +- {r.top1_se:.2f}"]
        if head:
            cells += [f"{r.agreement:.2f}"]
        mark = "chosen" if chosen is not None and r is chosen else {True: "meets", False: "", None: ""}[r.meets]
        cells += [f"{r.cosine_pre_logits:.4f}", f"{r.cosine_dense:.4f}", f"{r.images_per_s:.1f}", f"{r.speedup:.2f}x"]
        cells += [mark]
        lines.append("| " + " | ".join(cells) + " |")
    paired = [r for r in rows if r.versus is not None]
    if paired:
        lines += [
            "",
            "Each APT setting against the lower resolution nearest in tokens (top-1, paired on the same images):",
        ]
        lines += [f"- {r.name}: {r.top1_gain:+.2f} +- {r.top1_gain_se:.2f} points against {r.versus}" for r in paired]
    return "\n".join(lines)


def pair_with_lower_resolutions(rows: Sequence[Row], correct: Sequence[Optional[torch.Tensor]]) -> None:
    """Set each APT row's paired top-1 difference to the lower-resolution row nearest in tokens (``versus``,
    ``top1_gain``, ``top1_gain_se``; ``correct[i]``: row i's per-image 0/1, None without labels). Whether APT beats
    simply lowering the resolution at the same cost is the question the curve raises; read off two rows' differences
    to the source it has no standard error."""
    lows = [j for j, r in enumerate(rows) if r.kind == "lower resolution" and correct[j] is not None]
    for i, r in enumerate(rows):
        if r.kind != "apt" or correct[i] is None or not lows:
            continue
        j = min(lows, key=lambda k: abs(rows[k].tokens - r.tokens))
        r.versus = rows[j].name
        r.top1_gain, r.top1_gain_se = paired_points(correct[i], correct[j])


def paired_points(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """The mean of ``a - b`` (two settings' per-image 0/1 on the same images) in points, and its standard error."""
    diff = a - b
    se = float(diff.std(unbiased=True) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return 100 * float(diff.mean()), 100 * se


def plot(result: Calibration, path) -> None:
    """Fidelity against measured speed (left) and against tokens (right), one curve per kind of setting; the
    target as a line, the chosen point ringed. Written to ``path`` (a temporary name: the caller renames it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, source = result.rows, result.source
    if source.top1 is not None:
        metric, label = (lambda r: r.top1), "top-1 (%)"
    elif source.agreement is not None:
        metric, label = (lambda r: r.agreement), "top-1 agreement with the source (%)"
    else:
        metric, label = (lambda r: r.cosine_pre_logits), "class cosine to the source"
    groups: Dict[str, List[Row]] = {}
    for r in rows[1:]:
        if r.kind == "lower resolution":
            key = "lower resolution"
        else:
            at = "" if r.size == source.size else f" at {r.size} px"
            key = f"APT {r.scorer} {'/'.join(map(str, r.patch_sizes))}{at}"
        groups.setdefault(key, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, x, xlabel in (
        (axes[0], lambda r: r.speedup, "images/s relative to the source (measured)"),
        (axes[1], lambda r: r.token_share, "patch tokens relative to the source"),
    ):
        for key, members in groups.items():
            members = sorted(members, key=x)
            style = "k-s" if key == "lower resolution" else "-o"
            ax.plot([x(r) for r in members], [metric(r) for r in members], style, label=key, markersize=4)
        ax.plot([x(source)], [metric(source)], "r*", markersize=12, label="source")
        if result.chosen is not None:
            ax.plot(
                [x(result.chosen)], [metric(result.chosen)], "o", mfc="none", mec="r", markersize=14, label="chosen"
            )
        t = result.target
        if t.max_drop is not None:
            ax.axhline(source.top1 - t.max_drop, color="grey", ls="--", lw=0.8, label="target")
        elif t.min_agreement is not None and source.agreement is not None and metric(source) == source.agreement:
            ax.axhline(100 * t.min_agreement, color="grey", ls="--", lw=0.8, label="target")
        elif t.min_cosine is not None and source.top1 is None and source.agreement is None:
            ax.axhline(t.min_cosine, color="grey", ls="--", lw=0.8, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"aptvit calibrate: {result.images} images at {source.size} px", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- running models
def _apt_outputs(apt: APTViT, images: torch.Tensor, crops: torch.Tensor) -> Tuple[Outputs, torch.Tensor, torch.Tensor]:
    """An ``APTViT``'s ``Outputs`` (dense features on its base grid), its patch tokens per image (B,) and its
    FLOPs per image (B,).

    The layout is made from the uint8 ``crops`` as ``aptvit eval`` and ``finetune`` make it (in their loaders), so
    that evaluating the written checkpoint reproduces this row.
    """
    from .core.quadtree import patch_layout

    layout = patch_layout(crops, **apt.config.layout_kwargs())
    feats = apt.forward_features(images, layout=layout)
    pre = apt.forward_head(feats, pre_logits=True)
    logits = apt.forward_head(feats) if apt.num_classes else None
    flops = model_flops(apt, layout)["apt"]
    return Outputs(logits, pre, unmerge_packed(feats.tokens, feats.packed)), feats.layout.num_tokens, flops


def _uniform_flops(apt: APTViT, size: int) -> float:
    """FLOPs per image of the uniform model at ``size`` x ``size``."""
    from .core.quadtree import patch_layout

    layout = patch_layout(torch.zeros(1, 3, size, size, dtype=torch.uint8), (apt.patch_size,))
    return float(model_flops(apt, layout)["uniform"][0])


def patch_models(apt: APTViT, patch_sets: Sequence[Tuple[int, ...]]) -> Dict[Tuple[int, ...], APTViT]:
    """An ``APTViT`` per patch set, all on ``apt``'s timm model (shared, not copied); ``apt`` itself is left as it is.

    Each keeps ``apt``'s detail-path weights where its sizes have the same ones (a fine-tuned checkpoint's), and
    zero (the resize-only start of a fresh conversion) for sizes ``apt`` lacks.
    """
    out = {}
    own = apt.adaptive_embed.state_dict()
    for ps in patch_sets:
        config = apt.config.replace(patch_sizes=tuple(ps), thresholds=None, budget=None, static=False)
        model = convert(apt.timm_model, config, attention=apt.attention)
        mine = model.adaptive_embed.state_dict()
        same = {k: v for k, v in own.items() if k in mine and mine[k].shape == v.shape}
        model.adaptive_embed.load_state_dict(same, strict=False)
        out[tuple(ps)] = model.eval()
    return out


# ---------------------------------------------------------------------------------------------- data
def find_samples(data, limit: Optional[int], classes: Optional[List[str]], num_classes: int):
    """The images of folder ``data`` and whether their labels can be used: (samples, labelled, class names, note).

    Labels are used when ``data`` has class sub-folders whose count is the model's number of classes (and whose
    names are the checkpoint's classes, when it names them: in the head's order, which the labels and the class
    names returned follow, while the folders are sorted); otherwise every image under ``data`` is read
    without labels and ``note`` says why. ``limit`` keeps that many images, a seeded draw (not the first
    classes of a sorted list).
    """
    from .data import image_files, image_folder, seeded_subset, to_head_rows

    folder = Path(data)
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder; give a folder of images (class folders for top-1)")
    note, items = "", None
    if any(p.is_dir() for p in folder.iterdir()):
        found = image_folder(folder)
        if not num_classes:
            note = "the model has no classifier head: agreement with the source's features only"
        elif len(found.classes) != num_classes:
            note = f"{len(found.classes)} class folders for the model's {num_classes} classes: no top-1, agreement only"
        elif classes is not None and sorted(classes) != sorted(found.classes):
            note = "the class folders are not the checkpoint's classes: no top-1, agreement only"
        else:
            items = found
    samples = items.samples if items is not None else image_files(folder)
    names = items.classes if items is not None else None
    if classes is not None and names is not None and list(classes) != list(names):
        # the checkpoint's classes in another order than the sorted folders: each label becomes its head row
        samples, names = to_head_rows(samples, names, classes), list(classes)
    return seeded_subset(samples, limit), items is not None, names, note


# ---------------------------------------------------------------------------------------------- the sweep
def calibrate(
    model: Union[APTViT, nn.Module, str],
    data,
    *,
    size: Optional[int] = None,
    sizes: Optional[Sequence[int]] = None,
    budgets: Sequence[Union[int, float]] = DEFAULT_BUDGETS,
    thresholds: Sequence[Union[str, Mapping[int, float]]] = (DEFAULT_THRESHOLDS,),
    scorers: Optional[Sequence[str]] = None,
    patch_sizes: Optional[Sequence[Sequence[int]]] = None,
    area_bias: Union[str, bool] = "both",
    max_drop: Optional[float] = None,
    min_agreement: Optional[float] = None,
    min_cosine: Optional[float] = None,
    confidence: Optional[float] = None,
    limit: Optional[int] = 1000,
    batch_size: int = 32,
    workers: int = 2,
    timing_images: int = 64,
    runs: int = 3,
    warmup: int = 1,
    out=None,
    device: str = "auto",
    dtype: str = "auto",
    skip_bad_images: bool = False,
    clock: str = "wall",
    classes: Optional[List[str]] = None,
    extra_metadata: Optional[Mapping[str, str]] = None,
    progress: bool = True,
) -> Calibration:
    """Sweep APT's settings and lower resolutions on the images of ``data`` and report fidelity against speed.

    Args:
        model: an ``APTViT`` (its weights, settings and patch sizes are the starting point; it is not changed), a
            timm ViT (converted with the default settings), or the path of an aptvit checkpoint.
        data: a folder of images; class sub-folders (``aptvit eval``'s layout) give top-1 when they match the head.
        size: the source's input size S (default: the checkpoint's ``input_size``, else the model's pretrained size).
        sizes: the sizes to try, S and smaller multiples of the patch size (default: S and about 75%, 50%, 35% of
            its tokens); each is a plain lower resolution and a size for APT.
        budgets: token budgets to try (fractions of a size's patch tokens, or counts).
        thresholds: "default" (the scorer's registered thresholds) and/or {size: value} dicts.
        scorers: registered scorer names (default: the model's).
        patch_sizes: the patch-size sets to try (default: the model's; p, 2p for a model of one size, where nothing
            would merge).
        area_bias: "both" (each APT setting without and with area-proportional attention: which is better depends on
            the data and the model, by 9 points of top-1 at a third of the tokens on elpv, BENCHMARKS.md section 2),
            True or False (that one only).
        max_drop, min_agreement, min_cosine: the target (at most one): at most this many points of top-1 below the
            source (needs labels), at least this fraction of images with the source's top-1 class, at least this
            class cosine. The cheapest setting that keeps it is chosen.
        confidence: with ``max_drop``, the top-1 drop plus this many standard errors must keep it (default
            ``DEFAULT_CONFIDENCE``; 0: the drop alone).
        limit: at most this many images (a seeded draw; None or 0: all).
        timing_images, runs, warmup: the images, timed runs and warm-up runs of each speed measurement. The timed
            images are a seeded draw from the whole folder (``timing_positions``), not its first ones: where the
            token count follows the content (thresholds), a folder's first class may keep far more tokens than the
            average (96% against 83% on Imagenette's first class) and its speed would not be the setting's.
        clock: "wall" (elapsed time), or "thread": this thread's CPU time, torch on one thread while timing (on a
            shared machine other processes do not inflate it; ``bench.alternating_medians``).
        out: a folder for calibration.{json,md,png} and, when a target is met, model.safetensors (None: none).
        classes: the class names the model's head was trained on (a checkpoint's), checked against the folders.
        extra_metadata: metadata carried into the written checkpoint (a checkpoint's own, e.g. its classes).

    Returns:
        ``Calibration``.

    Raises:
        InputError: no images, unreadable images (unless ``skip_bad_images``), bad sizes or settings, a target that
            needs labels or a head the data or model lacks, and a target no setting keeps (after writing the curve).
    """
    from .data import LayoutDataset, ShardedSampler, build_transform, eval_crop, make_loader
    from .progress import progress as progress_bar

    target = Target(max_drop, min_agreement, min_cosine, confidence)
    clock_named(clock, threads_option=None)  # a known clock; calibrate times on one thread itself ("thread")
    for name, value, low in (
        ("--batch-size", batch_size, 1),
        ("--workers", workers, 0),
        ("--timing-images", timing_images, 1),
        ("--runs", runs, 1),
        ("--warmup", warmup, 0),
        ("--limit", limit or 0, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} {value!r} must be an integer >= {low}")
    if out is not None:
        check_writable(out, folder=True)  # now, not after the sweep
    apt = _as_apt(model)
    vit = apt.timm_model
    p = apt.patch_size
    size = check_side(size or _pretrained_size(apt), "--size")
    if size % p:
        raise InputError(f"--size {size} is not a multiple of the model's patch size {p}")
    patch_sets = [tuple(ps) for ps in (patch_sizes or [apt.patch_sizes])]
    if not patch_sizes and len(apt.patch_sizes) == 1:  # a uniform model (e.g. a uniform fine-tune's checkpoint)
        patch_sets = [APTConfig().for_patch_size(p).patch_sizes]  # where nothing would merge: the library's default
        logger.info(
            f"the model has one patch size ({p}): trying APT with the default patch sizes "
            f"{'/'.join(map(str, patch_sets[0]))} (--patch-sizes to choose)"
        )
    from .core.layout import check_patch_sizes

    patch_sets = [check_patch_sizes(ps) for ps in patch_sets]
    scorers = list(scorers or [apt.config.scorer])
    settings, notes = build_grid(
        size,
        p,
        list(sizes) if sizes else default_sizes(size, p),
        patch_sets,
        scorers,
        budgets,
        thresholds,
        apt.config.scorer_args,
        apt.config.scorer,
        area_bias_values(area_bias),
    )
    if len(settings) == 1:
        if all(len(ps) == 1 for ps in patch_sets):
            raise InputError(
                f"nothing to sweep: with --patch-sizes {p} alone nothing merges; give larger sizes too "
                f"(e.g. --patch-sizes {p},{2 * p}) or --sizes below the input size"
            )
        raise InputError("nothing to sweep: give --sizes below the input size, or --budgets / --thresholds")
    for note in notes:
        logger.info(note)
    samples, labelled, folder_classes, note = find_samples(data, limit, classes, apt.num_classes)
    if target.max_drop is not None and not labelled:  # the note once, in the error
        instead = "--min-agreement (or --min-cosine)" if apt.num_classes else "--min-cosine (the model has no head)"
        raise InputError(
            f"--max-drop compares top-1, which needs labels: {note or 'the folder has no class folders'}; "
            f"use {instead} instead"
        )
    if note:
        logger.info(f"{data}: {note}")
    if target.min_agreement is not None and not apt.num_classes:
        raise InputError(
            "--min-agreement compares top-1 classes, and the model has no classifier head; use --min-cosine"
        )

    dev = resolve_device(device)
    compute = resolve_dtype(dtype, dev)
    vit.to(dev).eval()
    models = patch_models(apt, patch_sets)
    mean, std = apt.pixel_mean_std()
    run_sizes = sorted({s.size for s in settings}, reverse=True)
    loaders = [
        make_loader(
            LayoutDataset(samples, build_transform(s, False, mean, std, **eval_crop(apt.pretrained_cfg)), None),
            ShardedSampler(len(samples), shuffle=False, equal_shares=False),
            batch_size,
            workers,
            drop_last=False,
        )
        for s in run_sizes
    ]
    logger.info(
        f"calibrate: {len(settings) - 1} settings against the source at {size} px on {len(samples)} images"
        f"{' (labelled)' if labelled else ''}"
    )
    sums = [_Sums() for _ in settings]
    uniform_flops = {s: _uniform_flops(models[patch_sets[0]], s) for s in run_sizes}
    timing: Dict[int, List[torch.Tensor]] = {s: [] for s in run_sizes}
    timed_at = timing_positions(len(samples), timing_images)
    seen = bad = 0
    grid = size // p
    bar = progress_bar(total=len(loaders[0]), desc="calibrate", enabled=progress)
    with torch.inference_mode():
        for batches in zip(*loaders):
            bar.update(1)
            bad += batches[0].count_bad(skip_bad_images)
            n = batches[0].images.shape[0]
            if n == 0:
                continue
            crops = {s: b.images.to(dev) for s, b in zip(run_sizes, batches)}
            x = {s: _normalise(c, mean, std) for s, c in crops.items()}
            labels = batches[0].labels.to(dev) if labelled else None
            pick = timed_at[(timed_at >= seen) & (timed_at < seen + n)] - seen
            if len(pick):
                for s in run_sizes:
                    timing[s].append(x[s][pick.to(dev)].cpu())
            seen += n
            with autocast(dev, compute):
                ref = timm_outputs(vit, x[size])
            for i, s in enumerate(settings):
                with autocast(dev, compute):
                    if s.kind == "apt":
                        out_s, tokens, flops = _apt_outputs(
                            models[s.patch_sizes].configure(**s.apt_fields()), x[s.size], crops[s.size]
                        )
                    else:
                        out_s = ref if s.kind == "source" else timm_outputs(vit, x[s.size])
                        tokens = torch.full((n,), (s.size // p) ** 2, device=dev)
                        flops = torch.full((n,), uniform_flops[s.size], dtype=torch.float64)
                sums[i].add(_on_grid(out_s, grid), ref, labels, tokens, flops)
    bar.close()
    if seen == 0:
        raise InputError(f"no image of {str(data)!r} could be read")
    if bad:
        logger.info(f"{bad} unreadable image{'s' * (bad != 1)} skipped")

    speeds = _measure(settings, models, vit, timing, size, batch_size, runs, warmup, dev, compute, progress, clock)
    rows = [sums[i].row(s, sums[0], grid * grid, speeds[i], size, patch_sets[0]) for i, s in enumerate(settings)]
    pair_with_lower_resolutions(rows, [t.correct_all() for t in sums])
    for r in rows:
        r.meets = target.met(r) if target.given else None
    result = Calibration(rows, labelled, seen, target)
    result.facts = dict(
        source_size=size,
        patch_size=p,
        device=dev.type,
        dtype=str(compute).replace("torch.", ""),
        batch_size=batch_size,
        timing_images=sum(len(t) for t in timing[size]),
        clock=clock,
        runs=runs,
        warmup=warmup,
        architecture=apt.pretrained_cfg.get("architecture", ""),
        bad_images=bad,
    )
    noisy = noisy_timings(rows)
    result.facts["noisy_timings"] = [r.name for r in noisy]
    if noisy:
        logger.warning(noisy_warning(noisy, rows[0], clock))
    if target.given:
        result.chosen, result.reason = choose(rows, target)
        if result.chosen in noisy:
            ratio = rows[0].gflops / result.chosen.gflops
            result.reason += f"; its timing looks noisy ({ratio:.2f}x fewer FLOPs than the source's)"
    logger.info(format_table(rows, result.chosen))
    if result.chosen is not None:
        chosen = result.chosen.setting
        result.input_size = chosen.size
        ps = chosen.patch_sizes or (p,)
        if chosen.kind == "apt":
            result.model = patch_models(apt, [ps])[ps].configure(**chosen.apt_fields())
        else:  # a plain lower resolution: one patch size, nothing merges (exactly the uniform model)
            result.model = patch_models(apt, [(p,)])[(p,)]
        if chosen.size != size:
            result.model.pretrained_cfg["input_size"] = (3, chosen.size, chosen.size)
    if out is not None:
        result.files = _write(result, Path(out), extra_metadata, folder_classes)
    if target.given and result.chosen is None:
        where = f"; the curve is in {result.files['json']}" if out is not None else ""
        raise InputError(f"{result.reason}{where}")
    if not target.given:
        logger.info("no target given (--max-drop, --min-agreement or --min-cosine): the curve only, no model written")
    if result.chosen is not None:
        logger.info(f"chose {result.reason}")
        if "model" in result.files:
            logger.info(f"wrote {result.files['model']} (input size {result.input_size} px)")
    return result


class _Sums:
    """Per-image figures of one setting, gathered over batches."""

    def __init__(self) -> None:
        self.correct: List[torch.Tensor] = []
        self.same: List[torch.Tensor] = []
        self.cos_pre: List[torch.Tensor] = []
        self.cos_dense: List[torch.Tensor] = []
        self.tokens: List[torch.Tensor] = []
        self.flops: List[torch.Tensor] = []

    def add(
        self, out: Outputs, ref: Outputs, labels: Optional[torch.Tensor], tokens: torch.Tensor, flops: torch.Tensor
    ) -> None:
        if out.logits is not None:
            top = out.logits.float().argmax(-1)
            self.same.append((top == ref.logits.float().argmax(-1)).cpu())
            if labels is not None:
                self.correct.append((top == labels).cpu())
        self.cos_pre.append(cosine(out.pre_logits, ref.pre_logits).cpu())
        self.cos_dense.append(cosine(out.dense, ref.dense).flatten(1).mean(1).cpu())
        self.tokens.append(tokens.double().cpu())
        self.flops.append(flops.double().cpu())

    def correct_all(self) -> Optional[torch.Tensor]:
        """Per image, 1.0 where the top-1 class is the label (None without labels)."""
        return torch.cat(self.correct).double() if self.correct else None

    def row(self, s: Setting, source: "_Sums", base: int, speed, size: int, default_sizes) -> Row:
        tokens = float(torch.cat(self.tokens).mean())
        row = Row(
            name=s.name(size, default_sizes),
            kind=s.kind,
            size=s.size,
            patch_sizes=list(s.patch_sizes) if s.patch_sizes else None,
            scorer=s.scorer,
            budget=s.budget,
            thresholds={str(k): v for k, v in s.thresholds.items()} if s.thresholds is not None else None,
            area_bias=s.area_bias,
            tokens=tokens,
            token_share=tokens / base,
            gflops=float(torch.cat(self.flops).mean()) / 1e9,
            cosine_pre_logits=float(torch.cat(self.cos_pre).double().mean()),
            cosine_dense=float(torch.cat(self.cos_dense).double().mean()),
            images_per_s=speed[0],
            speedup=speed[1],
            setting=s,
        )
        if self.same:
            row.agreement = 100 * float(torch.cat(self.same).double().mean())
        if self.correct:
            mine = self.correct_all()
            row.top1 = 100 * float(mine.mean())
            row.top1_drop, row.top1_se = paired_points(source.correct_all(), mine)
        return row


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    from .images import normalise

    return normalise(images, mean, std)


def _on_grid(out: Outputs, grid: int) -> Outputs:
    """``out`` with its dense features upsampled (bilinear) to the source's ``grid`` x ``grid`` when smaller."""
    if out.dense.shape[-1] == grid and out.dense.shape[-2] == grid:
        return out
    dense = F.interpolate(out.dense.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    return out._replace(dense=dense)


def timing_positions(total: int, count: int, seed: int = 0) -> torch.Tensor:
    """(min(count, total),) sorted positions, a seeded draw from ``range(total)``: the images each setting is timed
    on, spread over the whole folder (which is read in class order). Positions count the readable images, so with
    ``skip_bad_images`` a draw near the end may find none (fewer images timed; ``timing_images`` says how many)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[: min(count, total)].sort().values


def _measure(settings, models, vit, timing, size, batch_size, runs, warmup, dev, compute, progress, clock) -> List:
    """[(images/s, images/s over the source's)}: each setting timed alternately with the source on the
    same images (warm-up runs first, medians), the source's own images/s the median over all its runs."""
    from .bench import alternating_medians
    from .progress import progress as progress_bar

    images = {s: torch.cat(t).to(dev) for s, t in timing.items()}
    n = images[size].shape[0]
    chunks = [slice(i, i + batch_size) for i in range(0, n, batch_size)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else None

    def timed(fn):
        def run(c):
            with autocast(dev, compute):
                return fn(c)

        return run

    source_fn = timed(lambda c: vit(images[size][c]))
    out, source_seconds = [None], []
    threads = torch.get_num_threads()
    if clock == "thread":  # CPU time of this thread counts all the work only when torch runs on it alone
        torch.set_num_threads(1)
    try:
        for s in progress_bar(settings[1:], desc="timing", enabled=progress):
            if s.kind == "apt":
                model = models[s.patch_sizes].configure(**s.apt_fields())
                fn = timed(lambda c, m=model, x=images[s.size]: m(x[c]))
            else:
                fn = timed(lambda c, x=images[s.size]: vit(x[c]))
            fns = {"source": source_fn, "setting": fn}
            seconds = alternating_medians(fns, chunks, runs, warmup, sync=sync, clock=CLOCKS[clock])
            source_seconds.append(seconds["source"])
            out.append((n / seconds["setting"], seconds["source"] / seconds["setting"]))
    finally:
        torch.set_num_threads(threads)
    out[0] = (n / statistics.median(source_seconds), 1.0)
    return out


def _as_apt(model) -> APTViT:
    if isinstance(model, APTViT):
        return model
    if isinstance(model, (str, Path)):
        from .models import build_models

        return build_models(None, checkpoint=str(model))[0]
    if isinstance(model, nn.Module):
        return convert(model)
    raise UserTypeError(f"model must be an APTViT, a timm ViT or a checkpoint path, got {type(model).__name__}")


def _pretrained_size(apt: APTViT) -> int:
    size = (apt.pretrained_cfg or {}).get("input_size") or (3, 224, 224)
    return int(size[-1])


def _write(result: Calibration, out: Path, extra_metadata, classes) -> Dict[str, Path]:
    """calibration.json, .md and .png, and the chosen model when there is one: every file under a temporary name
    first, then renamed together."""
    from .nn.checkpoint import saver

    files = {k: out / FILES[k] for k in ("json", "table", "plot")}
    text = json.dumps(result.to_json(), indent=2)
    table = format_table(result.rows, result.chosen)
    writes = [
        (files["json"], lambda tmp: Path(tmp).write_text(text)),
        (files["table"], lambda tmp: Path(tmp).write_text(table + "\n")),
        (files["plot"], lambda tmp: plot(result, tmp)),
    ]
    if result.model is not None:
        meta = {k: v for k, v in (extra_metadata or {}).items() if k not in OWN_METADATA}
        if classes is not None:
            meta.setdefault("classes", json.dumps(list(classes)))
        meta["input_size"] = str(result.input_size)
        meta["calibration"] = json.dumps(
            {
                "reason": result.reason,
                "target": {k: v for k, v in asdict(result.target).items() if v is not None},
                "chosen": result.chosen.to_json(),
                "source": result.source.to_json(),
                "images": result.images,
            }
        )
        files["model"] = out / FILES["model"]
        writes.append((files["model"], saver(result.model, extra_metadata=meta)))
    atomic_write_many(writes)
    return files


def calibrate_command(source, data, size=None, **kwargs) -> Calibration:
    """``aptvit calibrate``: build the model of ``source`` (``models.ModelSource``), read what its checkpoint
    says (classes, input size, other metadata), and ``calibrate``."""
    from .core.io import reading
    from .nn.checkpoint import read_metadata

    meta = read_metadata(source.checkpoint) if source.checkpoint else {}
    with reading(source.checkpoint, "checkpoint", "its 'classes' or 'input_size' metadata is malformed"):
        classes = json.loads(meta["classes"]) if "classes" in meta else None
        saved_size = int(meta.get("input_size", 0))
    apt, _ = source.build()
    started = time.time()
    result = calibrate(
        apt,
        data,
        size=size or saved_size or None,
        device=source.device,
        dtype=source.dtype,
        classes=classes,
        extra_metadata=meta,
        **kwargs,
    )
    logger.info(f"calibrate: {time.time() - started:.0f} s")
    return result
