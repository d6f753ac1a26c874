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
from .preprocess import processor_cfg
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
    hf: nn.Module,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    image_processor: Any = None,
) -> HFVisionTransformer:
    """The timm twin of a Hugging Face vision tower: the same weights (copied), the same outputs.

    Args:
        hf: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel`` (its vision half),
            ``SiglipVisionModel``, ``SiglipModel`` (its vision half), ``Dinov2Model``, ``Dinov2WithRegistersModel``
            or ``ViTModel``.
        mean, std: override the processor's (or the family default's) ``image_mean`` / ``image_std``; the layout
            is scored on the pixels recovered with them.
        image_processor: the model's HF image processor (or a dict of its settings): how its images are resized,
            cropped and normalised, and their size (``preprocess.processor_cfg``). Default: the family's usual
            one (``Spec.processor``: CLIP's shorter side to the crop, SigLIP and ViT squashed to a square, bicubic
            but ViT's bilinear, at the config's image size; DINOv2's 256 -> 224 crop at 224 px).

    Returns:
        ``HFVisionTransformer`` on the HF model's device and dtype, in its train / eval mode; its
        ``pretrained_cfg`` names the HF class ("hf:<class>") and holds the preprocessing, which ``aptvit eval``,
        ``calibrate`` and ``finetune`` follow as they follow a timm model's.
    """
    require_transformers()
    spec = spec_of(hf)
    preprocess = processor_cfg(image_processor) if image_processor is not None else family_preprocess(spec)
    vision, options, extra = spec.parts(hf)
    cfg = {k: getattr(vision.config, k) for k in spec.config_keys if hasattr(vision.config, k)}
    if isinstance(cfg.get("image_size"), tuple):
        cfg["image_size"] = list(cfg["image_size"])
    source = {"class": type(hf).__name__, "config": cfg, "options": options}
    preprocess.update({k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None})
    twin = build_twin(source, preprocess)
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


def family_preprocess(spec: Spec) -> Dict[str, Any]:
    """The ``pretrained_cfg`` preprocessing of the family's usual image processor; its image size only where all the
    family's checkpoints share it (``Spec.processor_size``; else the checkpoint's config gives it)."""
    cfg = processor_cfg(spec.processor)
    if not spec.processor_size:
        del cfg["input_size"]
    return cfg


def build_twin(source: Mapping[str, Any], preprocess: Optional[Mapping[str, Any]] = None) -> HFVisionTransformer:
    """An ``HFVisionTransformer`` (float32, random weights) with the structure ``source`` describes; its
    ``pretrained_cfg`` holds ``preprocess`` (``processor_cfg``'s keys), the family's usual preprocessing by default."""
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
        "input_size": (kwargs["in_chans"], *kwargs["img_size"]),
        **(preprocess if preprocess is not None else family_preprocess(spec)),
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


def fit_head(twin: HFVisionTransformer, state: Mapping[str, torch.Tensor]) -> None:
    """Give ``twin`` the classifier a saved file holds where it is not the tower's own head: a fine-tuned conversion
    (``reset_classifier``, as ``aptvit finetune`` does for its classes) saves a plain linear ``head.weight`` /
    ``head.bias`` that the HF source does not describe."""
    own = {k: tuple(v.shape) for k, v in twin.state_dict().items() if k.startswith("head.")}
    saved = {k: tuple(v.shape) for k, v in state.items() if k.startswith("head.")}
    if saved != own and set(saved) == {"head.weight", "head.bias"} and len(saved["head.weight"]) == 2:
        twin.reset_classifier(saved["head.weight"][0])
