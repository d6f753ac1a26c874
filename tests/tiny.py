"""Tiny timm ViTs (depth 2, width 64) built with timm's own classes: the tiny models of every family adapter."""

import timm
import torch

from aptvit.nn.families import FAMILIES as ADAPTERS

TINY = dict(pretrained=False, depth=2, embed_dim=64, num_heads=2, num_classes=10, dynamic_img_size=True)

# every family adapter's tiny models, by name (``Family.tiny``): {name: (timm model name, create_model arguments)}
FAMILIES = {name: spec for family in ADAPTERS.values() for name, spec in family.tiny.items()}
FAMILY_OF = {name: family.name for family in ADAPTERS.values() for name in family.tiny}


def tiny_vit(family: str = "vit_cls", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of ``family`` with random weights of a healthy scale (layer scales near 1)."""
    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**TINY, **extra, **overrides})
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("gamma"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param.dim() == 1 and "norm" in pname and pname.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
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
