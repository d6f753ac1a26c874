"""What every Hugging Face mapping shares: ``Spec`` (one per HF model family) and the renaming of its layers.

A ``Spec`` says, for the HF classes of one family, which config fields make the structure, the timm
``VisionTransformer`` arguments they give, how every HF tensor maps onto a timm one, and which of timm's outputs
are the HF outputs (``last_hidden_state`` before or after the final norm; ``pooler_output`` from the pooled features
or from the head). The mapping is checked when it is made: every HF tensor must be used (or be one the forward never
reads, ``ignored``), and timm's ``load_state_dict`` is strict.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ...core.io import MAX_SIDE, InputError

# HF ``hidden_act`` -> timm ``act_layer`` (the same function: HF's "gelu" is erf GELU as torch's, its
# "gelu_pytorch_tanh" torch's tanh approximation)
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


# the config fields that make a pre-norm ViT tower's structure, shared by CLIP, SigLIP and ViT
VIT_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


class Spec:
    """One Hugging Face model family: its classes, structure, weight names and outputs. Subclass per family."""

    name: str = ""
    classes: Tuple[str, ...] = ()  # the HF classes it converts (exact class names)
    module: str = ""  # their ``transformers.models.<module>`` package
    config_keys: Tuple[str, ...] = ()  # the config fields that make the structure (saved with the weights)
    pos_resample: Dict[str, Any] = {"interpolation": "bicubic", "antialias": False}
    # the family's usual image processor (its checkpoints' preprocessor_config.json, in HF's words): the
    # preprocessing a converted tower gets when no processor is given (preprocess.py)
    processor: Mapping[str, Any] = {}
    # whether every checkpoint of the family makes images of the processor's size; if not, the sizes above only set
    # the crop's ratio and the image size is the config's
    processor_size: bool = False
    last_normed: bool = True  # HF's ``last_hidden_state`` is after the final norm (CLIP's is before it)
    ignored: Tuple[str, ...] = ()  # HF tensors the forward never reads (a mask token for pre-training)

    # ---- the HF model
    def parts(self, hf: nn.Module) -> Tuple[nn.Module, Dict[str, Any], Dict[str, torch.Tensor]]:
        """(the vision tower with the config, options the class adds, extra tensors outside the tower)."""
        return hf, {}, {}

    def resample(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """How HF resamples the position table at another grid (``resample_abs_pos_embed`` arguments)."""
        return dict(self.pos_resample)

    # ---- the timm twin
    def vit_kwargs(self, cfg: Mapping[str, Any], options: Mapping[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def head(self, cfg: Mapping[str, Any], options: Mapping[str, Any]) -> Optional[nn.Module]:
        """A head that replaces timm's (a CLIP projection, a ViT pooler), or None to keep timm's (Identity)."""
        return None

    def state(self, hf: Dict[str, torch.Tensor], cfg: Mapping[str, Any], options: Mapping[str, Any]) -> Dict:
        """timm's state dict from the HF tensors, popping every tensor it uses from ``hf``."""
        raise NotImplementedError

    # ---- outputs
    def pooler(self, options: Mapping[str, Any]) -> Optional[str]:
        """Where HF's ``pooler_output`` is: "pre_logits" (the pooled features), "logits" (after the head), None."""
        return "pre_logits"

    def embeds(self, options: Mapping[str, Any]) -> Optional[str]:
        """Name of an HF output that is the head's output (``image_embeds`` of CLIP's projection), or None."""
        return None


# ---------------------------------------------------------------------------------------------- helpers
def common_kwargs(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``VisionTransformer`` arguments every family reads the same way, checked (a file's config included)."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "num_channels"):
        count(cfg, key)
    side = cfg.get("image_size")
    sides = list(side) if isinstance(side, (list, tuple)) else [side]
    if len(sides) not in (1, 2) or any(
        isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= MAX_SIDE for s in sides
    ):
        raise InputError(f"Hugging Face config image_size {side!r} is not one or two sides up to {MAX_SIDE} pixels")
    patch = cfg["patch_size"]
    if isinstance(patch, (list, tuple)):
        raise InputError(f"Hugging Face config patch_size {patch!r}: only square patches convert")
    act = cfg.get("hidden_act")
    if act not in ACTIVATIONS:
        raise InputError(
            f"Hugging Face config hidden_act {act!r} has no timm twin (supported: {', '.join(ACTIVATIONS)})"
        )
    eps = cfg.get("layer_norm_eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise InputError(f"Hugging Face config layer_norm_eps {eps!r} is not a small positive number")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise InputError("Hugging Face config hidden_size is not a multiple of num_attention_heads")
    return dict(
        img_size=tuple(sides * 2)[:2],
        patch_size=patch,
        in_chans=cfg["num_channels"],
        embed_dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        act_layer=ACTIVATIONS[act],
        norm_layer=partial(nn.LayerNorm, eps=float(eps)),
        num_classes=0,
        dynamic_img_size=True,
        drop_rate=0.0,
        drop_path_rate=0.0,
    )


def count(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 16:
        raise InputError(f"Hugging Face config {key} {value!r} is not a positive count")
    return value


def mlp_ratio(hidden: int, dim: int) -> float:
    from ..families.base import mlp_ratio_of

    return mlp_ratio_of(hidden, dim)


def take(hf: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Pop one HF tensor (a missing one names itself: a checkpoint of another version or class)."""
    if key not in hf:
        raise InputError(f"the Hugging Face model has no tensor {key!r}; is it the class and version it says?")
    return hf.pop(key)


def blocks(hf: Dict[str, torch.Tensor], depth: int, prefix: str, names: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """timm's ``blocks.{i}.*`` from HF layers ``{prefix}{i}.*``.

    Args:
        names: timm name -> HF name within a layer for "norm1", "q", "k", "v", "proj", "norm2", "fc1", "fc2" and,
            where the family has layer scale, "ls1" / "ls2" (HF tensor names, without weight / bias).
    """
    out: Dict[str, torch.Tensor] = {}
    for i in range(depth):
        src = f"{prefix}{i}."
        dst = f"blocks.{i}."
        for part in ("norm1", "proj", "norm2", "fc1", "fc2"):
            timm_name = {"proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}.get(part, part)
            for kind in ("weight", "bias"):
                out[f"{dst}{timm_name}.{kind}"] = take(hf, f"{src}{names[part]}.{kind}")
        for kind in ("weight", "bias"):
            keys = [f"{src}{names[p]}.{kind}" for p in ("q", "k", "v")]
            if kind == "bias" and not any(k in hf for k in keys):  # qkv_bias=False
                continue
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([take(hf, k) for k in keys])
        for ls in ("ls1", "ls2"):
            if ls in names:
                out[f"{dst}{ls}.gamma"] = take(hf, f"{src}{names[ls]}")
    return out


def rename(hf: Dict[str, torch.Tensor], pairs: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """{timm name: HF tensor} for every (HF layer -> timm layer) pair, weight and bias."""
    return {f"{dst}.{kind}": take(hf, f"{src}.{kind}") for src, dst in pairs.items() for kind in ("weight", "bias")}
