"""``APTConfig``: the conversion settings of an APT model, validated once, saved with the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

from ..core.layout import check_patch_sizes
from ..core.quadtree import check_budget, check_layout_settings
from ..core.scoring import SCORERS
from .attention import check_backend


@dataclass(frozen=True)
class APTConfig:
    """Conversion settings. Construction validates everything and fills the default thresholds.

    Attributes:
        patch_sizes: ascending sizes, the first is the ViT's patch size.
        thresholds: {size: threshold} in scorer units; the scorer's defaults when neither this nor
            ``budget`` is given.
        budget: tokens per image (fraction of base tokens in (0, 1], or an int), instead of thresholds.
        scorer: "entropy", "laplacian" or "upsample".
        bins: histogram bins of the entropy scorer.
        attention: attention backend ("auto", "loop", "pad", "flash", "varlen").
    """

    patch_sizes: Tuple[int, ...]
    thresholds: Optional[Dict[int, float]] = None
    budget: Optional[Union[int, float]] = None
    scorer: str = "entropy"
    bins: int = 512
    attention: str = "auto"

    def __post_init__(self) -> None:
        sizes = check_patch_sizes(self.patch_sizes)
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:  # saved by name: no callables
            raise ValueError(f"unknown scorer {self.scorer!r}; choose one of {sorted(SCORERS)}")
        thresholds = check_layout_settings(sizes, self.thresholds, self.budget, self.scorer, self.bins)
        check_backend(self.attention)
        object.__setattr__(self, "patch_sizes", sizes)
        object.__setattr__(self, "thresholds", thresholds)
        if self.budget is not None:  # a Python number (numpy scalars are accepted), as saved
            object.__setattr__(self, "budget", check_budget(self.budget))

    def replace(self, **changes) -> "APTConfig":
        """A validated copy with ``changes``; setting thresholds clears the budget and vice versa.

        A new scorer without new thresholds gets its own default thresholds (scores of different
        scorers have different units); a budget needs no change.
        """
        if changes.get("scorer", self.scorer) != self.scorer and "thresholds" not in changes and self.budget is None:
            changes["thresholds"] = None
        if changes.get("thresholds") is not None:
            changes.setdefault("budget", None)
        if changes.get("budget") is not None:
            changes.setdefault("thresholds", None)
        return dataclasses.replace(self, **changes)

    def layout_kwargs(self) -> dict:
        """The ``patch_layout`` arguments these settings stand for."""
        return {
            "patch_sizes": self.patch_sizes,
            "thresholds": self.thresholds,
            "budget": self.budget,
            "scorer": self.scorer,
            "bins": self.bins,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_sizes"] = list(self.patch_sizes)
        if self.thresholds is not None:
            d["thresholds"] = {str(k): v for k, v in self.thresholds.items()}
        return d

    @staticmethod
    def from_dict(d: Mapping) -> "APTConfig":
        d = dict(d)
        if d.get("thresholds") is not None:
            d["thresholds"] = {int(k): float(v) for k, v in d["thresholds"].items()}
        return APTConfig(**d)
