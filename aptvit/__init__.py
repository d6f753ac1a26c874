"""aptvit: Adaptive Patch Transformers for timm Vision Transformers.

Large patches where an image is plain, small ones where it is busy, chosen by a cheap content
score; the same transformer and weights; fewer tokens.
"""

import logging

from .calibrate import calibrate
from .core import PatchLayout, pad_to_multiple, patch_layout
from .export import export  # the function; the module stays importable as sys.modules["aptvit.export"]
from .nn import APTConfig, APTViT
from .nn.checkpoint import load, save
from .nn.convert import convert
from .nn.dense import simple_pyramid
from .nn.heads import BoxAwareProjector, SegmentationDecoder, SimpleFeaturePyramid

# a library logs, the application decides what to show: nothing unless it configures logging (the CLI prints INFO)
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.2.0"
__all__ = [
    "PatchLayout",
    "pad_to_multiple",
    "patch_layout",
    "APTConfig",
    "APTViT",
    "convert",
    "save",
    "load",
    "export",
    "simple_pyramid",
    "SimpleFeaturePyramid",
    "SegmentationDecoder",
    "BoxAwareProjector",
    "calibrate",
    "__version__",
]
