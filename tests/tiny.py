"""Tiny timm ViTs (depth 2, width 64) built with timm's own classes: the tiny models of every family adapter."""

import re

import timm
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingMixed, init_random_2d_freqs

from aptvit.nn.families import FAMILIES as ADAPTERS

TINY = dict(pretrained=False, depth=2, embed_dim=64, num_heads=2, num_classes=10, dynamic_img_size=True)

# every family adapter's tiny models, by name (``Family.tiny``): {name: (timm model name, create_model arguments)}
FAMILIES = {name: spec for family in ADAPTERS.values() for name, spec in family.tiny.items()}
FAMILY_OF = {name: family.name for family in ADAPTERS.values() for name in family.tiny}
QK = re.compile(r"^blocks\.\d+\.attn\.(qkv|q_proj|k_proj)\.weight$")  # the weights that make q and k


def tiny_vit(family: str = "vit_cls", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of ``family`` with random weights of a healthy scale (layer scales near 1, RoPE frequencies of
    timm's scale)."""
    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**TINY, **extra, **overrides})
    with torch.no_grad():
        for pname, param in model.named_parameters():
            # layer scales near 1 (timm's ``ls*.gamma``, Eva's ``gamma_1`` / ``gamma_2``), as in trained models:
            # a gamma of 0.05 would shrink every block's branch, and an error inside it, twentyfold
            if pname.split(".")[-1] in ("gamma", "gamma_1", "gamma_2"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param.dim() == 1 and "norm" in pname and pname.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif FAMILY_OF[family] == "eva" and QK.search(pname):
                # peaked attention, as trained: at 0.05 the logits are ~0.2, the softmax nearly uniform, and an
                # error in the rotation of q / k (RoPE) barely moves the output
                param.copy_(0.15 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
        rope = getattr(model, "rope", None)
        if isinstance(rope, RotaryEmbeddingMixed):  # learned RoPE frequencies of timm's own scale, not 0.05
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 12)
                rope.freqs.copy_(init_random_2d_freqs(rope.dim // rope.num_heads, rope.depth, rope.num_heads, 10.0))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def grads_rel_err(grads: dict, ref: dict) -> dict:
    """{name: max |g - ref| / the largest |ref| over every parameter}: relative to the gradients' overall scale.

    A gradient that is zero in theory (e.g. of a bias added to every key before a softmax) holds rounding
    noise whose size depends on the CPU's kernels; comparing it to its own scale compares noise with noise.
    """
    scale = max(float(g.detach().abs().max()) for g in ref.values() if g.numel())
    return {n: float((grads[n].detach() - ref[n].detach()).abs().max()) / max(scale, 1e-30) for n in ref}


def tiny_hf_config(cls, **overrides):
    """A one-block, width-32 config of a ``transformers`` vision class ``cls`` (``CLIPVisionConfig``, ...):
    16-px patches of 64-px images unless ``overrides`` say otherwise."""
    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, patch_size=16)
    return cls(**{**sizes, "image_size": 64, **overrides})
