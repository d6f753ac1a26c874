"""aptvit: Adaptive Patch Transformers for timm Vision Transformers."""
from .core import PatchLayout, pad_to_multiple, patch_layout

__version__ = "0.1.0"
__all__ = ["PatchLayout", "pad_to_multiple", "patch_layout", "__version__"]
