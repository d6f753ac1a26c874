"""From a Hugging Face vision tower to its timm twin (``to_timm``), and back from a saved file's metadata.

The weights are mapped, not wrapped: the result is timm's ``VisionTransformer`` (``twin.HFVisionTransformer``, which
only resamples positions as HF does), so ``aptvit.convert`` gives it every APT feature a timm ViT has. The mapping
is checked here (every HF tensor used, a strict load); that it computes what HF computes is checked by the tests
(and by ``outputs.check_against_hf`` for any model at hand).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ...core.io import InputError, MissingDependency, UserTypeError
from .base import Spec
from .clip import CLIPSpec
from .dinov2 import Dinov2Spec
from .siglip import SiglipSpec
from .twin import METADATA_KEY, HFVisionTransformer
from .vit import ViTSpec

SPECS: Dict[str, Spec] = {s.name: s for s in (CLIPSpec(), SiglipSpec(), Dinov2Spec(), ViTSpec())}
INSTALL = "pip install 'aptvit[hf]'"


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` model (by its class's module; nothing is imported)."""
    return isinstance(model, nn.Module) and type(model).__module__.startswith("transformers.")


def require_transformers():
    """``transformers``, or one line that says what to install."""
    try:
        import transformers
    except ImportError as e:
        raise MissingDependency(f"converting a Hugging Face model needs the transformers package: {INSTALL}") from e
    return transformers


def supported_classes() -> str:
    return ", ".join(c for s in SPECS.values() for c in s.classes)


def spec_of(model: nn.Module) -> Spec:
    """The spec of an HF model's exact class (a subclass may change the forward), or a TypeError naming it."""
    name, module = type(model).__name__, type(model).__module__
    for spec in SPECS.values():
        if name in spec.classes and module.startswith(f"transformers.models.{spec.module}"):
            return spec
    raise UserTypeError(f"cannot convert the Hugging Face {name}: aptvit converts {supported_classes()}")


def to_timm(
    hf: nn.Module, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
) -> HFVisionTransformer:
    """The timm twin of a Hugging Face vision tower: the same weights (copied), the same outputs.

    Args:
        hf: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel`` (its vision half),
            ``SiglipVisionModel``, ``SiglipModel`` (its vision half), ``Dinov2Model``, ``Dinov2WithRegistersModel``
            or ``ViTModel``.
        mean, std: the normalisation of the images (the model's image processor's ``image_mean`` / ``image_std``);
            default: the family's usual one (OpenAI CLIP's, 0.5 for SigLIP and ViT, ImageNet's for DINOv2). The
            layout is scored on the pixels recovered with it.

    Returns:
        ``HFVisionTransformer`` on the HF model's device and dtype, in its train / eval mode; its
        ``pretrained_cfg`` names the HF class ("hf:<class>") and the normalisation.
    """
    require_transformers()
    spec = spec_of(hf)
    vision, options, extra = spec.parts(hf)
    cfg = {k: getattr(vision.config, k) for k in spec.config_keys if hasattr(vision.config, k)}
    if isinstance(cfg.get("image_size"), tuple):
        cfg["image_size"] = list(cfg["image_size"])
    source = {"class": type(hf).__name__, "config": cfg, "options": options}
    stats = {"mean": tuple(mean or spec.mean), "std": tuple(std or spec.std)}
    twin = build_twin(source, **stats)
    state = {k: v.detach() for k, v in vision.state_dict().items()}
    state.update({k: v.detach() for k, v in extra.items()})
    mapped = spec.state(state, cfg, options)
    left = sorted(set(state) - set(spec.ignored))
    if left:  # a tensor the twin would not use: the forward would differ
        raise UserTypeError(
            f"cannot convert the Hugging Face {type(hf).__name__}: tensors without a timm twin: {left[:5]}"
        )
    ref = next(iter(hf.parameters()))
    twin.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, strict=True)
    return twin.to(device=ref.device, dtype=ref.dtype).train(hf.training)


def build_twin(source: Mapping[str, Any], mean=None, std=None) -> HFVisionTransformer:
    """An ``HFVisionTransformer`` (float32, random weights) with the structure ``source`` describes."""
    name = source.get("class") if isinstance(source, Mapping) else None
    specs = [s for s in SPECS.values() if name in s.classes]
    if not specs:
        raise InputError(f"Hugging Face class {name!r} is not one aptvit converts ({supported_classes()})")
    spec = specs[0]
    cfg, options = source.get("config"), source.get("options") or {}
    if not isinstance(cfg, dict) or not isinstance(options, dict):
        raise InputError("the Hugging Face source must hold a config and options as JSON objects")
    kwargs = spec.vit_kwargs(cfg, options)
    twin = HFVisionTransformer(pos_resample=spec.resample(options), hf_source=source, **kwargs)
    head = spec.head(cfg, options)
    if head is not None:
        twin.head = head
        twin.num_classes = [m for m in head.modules() if isinstance(m, nn.Linear)][0].out_features
    twin.pretrained_cfg = {
        "architecture": f"hf:{name}",
        "mean": tuple(mean or spec.mean),
        "std": tuple(std or spec.std),
        "input_size": (kwargs["in_chans"], *kwargs["img_size"]),
    }
    return twin.eval()


def twin_from_metadata(meta: Mapping[str, str], path) -> HFVisionTransformer:
    """The twin an aptvit file describes (``HFVisionTransformer.aptvit_metadata``); its weights come from the file."""
    try:
        source = json.loads(meta[METADATA_KEY])
    except (KeyError, ValueError) as e:
        raise InputError(f"checkpoint {str(path)!r}: its {METADATA_KEY!r} metadata is not valid JSON") from e
    if not isinstance(source, dict):
        raise InputError(f"checkpoint {str(path)!r}: its {METADATA_KEY!r} metadata is not a JSON object")
    try:
        return build_twin(source)
    except InputError as e:
        raise InputError(f"checkpoint {str(path)!r}: {e}") from None
