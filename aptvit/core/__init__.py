"""Pure tensor functions: pixels, scores, layouts, packing. No nn.Module, no timm."""

from .layout import PatchLayout, check_patch_sizes, from_boxes
from .pixels import check_images, grayscale_255, pad_to_multiple
from .quadtree import default_thresholds, patch_layout
from .scoring import (
    SCORERS,
    ScorerSpec,
    entropy_scores,
    get_scorer,
    laplacian_scores,
    register_scorer,
    upsampling_error_scores,
)

__all__ = [
    "PatchLayout",
    "from_boxes",
    "check_images",
    "grayscale_255",
    "pad_to_multiple",
    "check_patch_sizes",
    "default_thresholds",
    "patch_layout",
    "SCORERS",
    "ScorerSpec",
    "register_scorer",
    "get_scorer",
    "entropy_scores",
    "laplacian_scores",
    "upsampling_error_scores",
]
