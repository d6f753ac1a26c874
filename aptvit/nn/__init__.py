"""nn.Module layers: adaptive patch embedding, varlen attention, the converted model."""

from .attention import BACKENDS, available_backends, register_backend, varlen_attention
from .embed import AdaptivePatchEmbed
from .graphs import CUDAGraphRunner
from .model import APTConfig, APTViT

__all__ = [
    "BACKENDS",
    "available_backends",
    "register_backend",
    "varlen_attention",
    "AdaptivePatchEmbed",
    "CUDAGraphRunner",
    "APTConfig",
    "APTViT",
]
