"""``APTConfig``: the conversion settings of an APT model, validated once, saved with the weights.

These are the settings that change what the model computes (which patches merge, how merged tokens are attended,
whether the token count is fixed). How it computes them (the attention backend, the device, the precision) is a
runtime choice of ``APTViT`` and is not saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..core.io import InputError, UserTypeError
from ..core.layout import check_patch_sizes
from ..core.quadtree import check_budget, check_layout_settings
from ..core.scoring import get_scorer

LAYOUT_FIELDS = ("patch_sizes", "thresholds", "budget", "scorer", "scorer_args")  # patch_layout's own arguments


def _is_merged_size(size, p: int) -> bool:
    """Whether ``size`` is an int p * 2^k, k >= 1 (a larger patch of a ViT of patch size p)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= p or size % p:
        return False
    k = size // p
    return k & (k - 1) == 0


@dataclass(frozen=True)
class APTConfig:
    """Conversion settings. Construction validates everything and fills the defaults.

    Attributes:
        patch_sizes: ascending sizes, the first is the ViT's patch size; None: filled in when the model is
            converted (``for_patch_size``): p and the sizes ``thresholds`` is keyed by, else the ViT's (p, 2p).
            Saved with the weights, so a file keeps its sizes.
        thresholds: {size: threshold} in scorer units; the scorer's defaults when neither this nor
            ``budget`` is given.
        budget: tokens per image (fraction of base tokens in (0, 1], or an int), instead of thresholds.
        scorer: a registered scorer ("entropy", "laplacian", "upsample", or yours: ``core.scoring.register_scorer``).
        scorer_args: the scorer's parameters (entropy: ``{"bins": 512}``); its registered defaults fill the rest.
        static: exactly k tokens per image (k from ``budget``; an image that needs fewer gets padding tokens that
            nothing attends to or pools), layout and plan built on the device with no host read, so the whole
            forward is one CUDA graph or one ``torch.compile(fullgraph=True)`` graph (``core.static``). Needs a
            ``budget`` and a (B, C, H, W) batch of same-size images. Absent in older checkpoints: False.
        area_bias: area-proportional attention: every key's attention logit gets + log(base cells it covers), so a
            merged token is attended as much as the patches it replaces together (ToMe's proportional attention).
            Nothing changes where nothing merges. Off by default (measured top-1, see the field's
            comment); settings saved without it (before aptvit 0.2) load as False, as they were computed.
    """

    patch_sizes: Optional[Tuple[int, ...]] = None
    thresholds: Optional[Dict[int, float]] = None
    budget: Optional[Union[int, float]] = None
    scorer: str = "entropy"
    scorer_args: Mapping[str, Any] = field(default_factory=dict)
    # False: on 600 labelled ImageNet train photos (Imagenette, never val; a fine-tuned DINOv2 ViT-S/14 at 224 px;
    # `benchmarks/real_imagenette.py --only variants`) the bias cost top-1 at every token count: -0.8 points at the
    # default thresholds, -0.2 / -1.2 / -4.0 at 77% / 47% / 31% of the tokens (half the bias: half the loss). At a
    # budget most of the image is merged, and the bias moves attention from the few detailed tokens, where the object
    # is, to the plain merged ones. It did raise feature cosines to the uniform model on unlabelled photos
    # (BENCHMARKS.md section 4): pass area_bias=True where those matter more than top-1. Which is better depends on
    # the data and the model: on elpv solar cells (a linear head on DINOv2's class token) the bias is worth +9 points
    # of val top-1 at a third of the tokens (BENCHMARKS.md section 2), so `aptvit calibrate` tries both.
    area_bias: bool = False
    static: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.area_bias, bool):
            raise UserTypeError(f"area_bias must be True or False, got {self.area_bias!r}")
        if not isinstance(self.static, bool):
            raise UserTypeError(f"static must be True or False, got {self.static!r}")
        if self.static and self.budget is None:
            raise InputError(
                "static=True needs a token budget (exactly k tokens per image): pass budget= as well, "
                "e.g. budget=0.5 (a fraction of the base tokens) or budget=100 (a count); for thresholds, static=False"
            )
        spec = get_scorer(self.scorer)  # saved by name: a registered scorer, no callables
        if self.patch_sizes is None:  # thresholds keyed by size are checked once the sizes are known
            params = spec.resolve_params(self.scorer, self.scorer_args)
            if self.thresholds is not None and self.budget is not None:
                raise InputError("pass either thresholds= or budget=, not both")
            if self.thresholds is not None and not isinstance(self.thresholds, Mapping):
                raise UserTypeError(
                    f"thresholds must be a dict keyed by patch size such as {{32: 5.5}}, got {self.thresholds!r}"
                )
        else:
            sizes = check_patch_sizes(self.patch_sizes)
            thresholds, params = check_layout_settings(
                sizes, self.thresholds, self.budget, self.scorer, self.scorer_args
            )
            object.__setattr__(self, "patch_sizes", sizes)
            object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "scorer_args", params)
        if self.budget is not None:  # a Python number (numpy scalars are accepted), as saved
            object.__setattr__(self, "budget", check_budget(self.budget))

    def for_patch_size(self, p: int) -> "APTConfig":
        """These settings for a ViT of patch size ``p``: when no sizes were given, p and the sizes that the
        thresholds are keyed by, else (p, 2p).

        Why two sizes: a 4p patch is a quarter of a 224-px image's side, too coarse for what it replaces at the
        image sizes ViTs run at; at the same token count, a layout of p and 2p patches keeps the converted model
        closer to the uniform one on real photos (as the paper's ImageNet runs, which use two sizes). Pass
        ``patch_sizes=(p, 2 * p, 4 * p)`` for three (large images, dense tasks at 1024 px+).
        """
        if self.patch_sizes is not None:
            return self
        # thresholds keyed by size name the merged sizes: {32: 5.5, 64: 4.0} on a /16 ViT means 16, 32, 64 (a key
        # that is no size of p, p times a power of two, is left out here and refused by the validation by name)
        keys = [k for k in (self.thresholds or {}) if _is_merged_size(k, p)]
        return dataclasses.replace(self, patch_sizes=(p, *sorted(keys)) if keys else (p, 2 * p))

    def replace(self, **changes) -> "APTConfig":
        """A validated copy with ``changes``; setting thresholds clears the budget and vice versa.

        A new scorer without new thresholds gets its own default thresholds (scores of different
        scorers have different units) and its own default parameters; a budget needs no change. More patch sizes
        for settings of one size (whose thresholds are empty: nothing merged) get the scorer's default thresholds.
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserTypeError(
                f"unknown setting(s) {unknown}; APTConfig has {[f.name for f in dataclasses.fields(self)]}"
            )
        new_scorer = changes.get("scorer", self.scorer) != self.scorer
        if new_scorer and "thresholds" not in changes and self.budget is None:
            changes["thresholds"] = None
        more_sizes = len(changes.get("patch_sizes") or ()) > 1 and self.patch_sizes and len(self.patch_sizes) == 1
        if more_sizes and "thresholds" not in changes and self.budget is None and not self.thresholds:
            changes["thresholds"] = None  # a one-size config's {} would keep the new sizes from ever merging
        if new_scorer:
            changes.setdefault("scorer_args", {})
        if changes.get("thresholds") is not None:
            changes.setdefault("budget", None)
        if changes.get("budget") is not None:
            changes.setdefault("thresholds", None)
        return dataclasses.replace(self, **changes)

    def layout_kwargs(self) -> dict:
        """The ``patch_layout`` arguments these settings stand for (the fields named as its arguments)."""
        if self.patch_sizes is None:
            raise InputError("these settings have no patch_sizes yet; use config.for_patch_size(p)")
        return {k: v for k, v in self.to_kwargs().items() if k in LAYOUT_FIELDS}

    def to_kwargs(self) -> dict:
        """The fields as keyword arguments of ``convert`` / ``APTViT.configure`` (patch sizes only when set)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["patch_sizes"] is None:
            del out["patch_sizes"]
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_sizes"] = list(self.patch_sizes) if self.patch_sizes is not None else None
        d["scorer_args"] = dict(self.scorer_args)
        if self.thresholds is not None:
            d["thresholds"] = {str(k): v for k, v in self.thresholds.items()}
        return d

    @staticmethod
    def from_dict(d: Mapping) -> "APTConfig":
        """Settings saved by ``to_dict``, or by aptvit 0.1 (``bins`` at the top, the attention backend saved too)."""
        d = dict(d)
        d.pop("attention", None)  # 0.1 saved the backend; it is a runtime choice now
        d.setdefault("area_bias", False)  # saved before the setting existed: computed without it, not the new default
        if "bins" in d:
            bins = d.pop("bins")
            if d.get("scorer", "entropy") == "entropy":
                d["scorer_args"] = {"bins": bins, **dict(d.get("scorer_args") or {})}
        if d.get("thresholds") is not None:
            d["thresholds"] = {int(k): float(v) for k, v in d["thresholds"].items()}
        if d.get("patch_sizes") is not None:
            d["patch_sizes"] = tuple(d["patch_sizes"])
        return APTConfig(**d)
