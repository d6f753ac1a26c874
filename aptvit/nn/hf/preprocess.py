"""From a Hugging Face image processor to timm's ``pretrained_cfg``: how the tower's images are resized, cropped
and normalised.

A converted tower is a timm model, and aptvit's pipelines (``aptvit eval``, ``calibrate``, ``finetune``'s val
split, the pixels a layout is scored on) read its preprocessing from ``pretrained_cfg`` as timm's
``resolve_data_config`` does. HF keeps the same facts in its image processor, in other words:

    HF processor                                      timm pretrained_cfg
    size {"shortest_edge": S}, crop_size C            crop_mode "center", crop_pct C / S, input_size C
    size {"height": H, "width": H}, no crop           crop_mode "squash", crop_pct 1.0, input_size H
    size {"height": H, "width": H}, crop_size C       crop_mode "squash", crop_pct C / H, input_size C
    resample (PIL's number: 2 bilinear, 3 bicubic)    interpolation ("bilinear", "bicubic")
    image_mean / image_std (do_normalize)             mean / std
    a center crop's odd margin, split floored         crop_offset "floor" (aptvit's key; torchvision rounds)

``processor_cfg`` makes that translation for the processors of the towers aptvit converts (``KNOWN``); what has no
timm equivalent (no resize, a non-square output, a rescale other than 1/255, another class's own resize rule, a
channel flip) is refused with one line rather than evaluated on the wrong pixels. It reads a processor's settings
(``to_dict()``; a ``preprocessor_config.json`` dict through its class in ``transformers``) and changes nothing.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping

from ...core.io import InputError, UserTypeError

# PIL's resampling numbers (``PIL.Image.Resampling``), which HF processors store as ``resample``
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# the processors whose resize / crop / normalise steps this translation covers (with their ``Pil`` / ``Fast`` twins)
KNOWN = ("CLIPImageProcessor", "SiglipImageProcessor", "BitImageProcessor", "ViTImageProcessor", "DeiTImageProcessor")
# settings of other processors that change the pixels in ways timm's evaluation transform has no word for
UNSUPPORTED = ("crop_pct", "do_flip_channel_order", "rescale_offset", "do_pad", "include_top")


def processor_cfg(processor: Any) -> Dict[str, Any]:
    """timm ``pretrained_cfg`` keys from an HF image processor's settings.

    Args:
        processor: an HF image processor of a vision tower aptvit converts (``CLIPImageProcessor``,
            ``SiglipImageProcessor``, ``BitImageProcessor`` for DINOv2, ``ViTImageProcessor``, ``DeiTImageProcessor``),
            or a dict of its settings: a ``preprocessor_config.json`` (read through its ``image_processor_type``
            with ``transformers``, so its legacy forms and the class's defaults count) or every setting spelled out
            (``size``, ``resample``, ``image_mean`` / ``image_std``; ``do_center_crop`` / ``crop_size`` for a crop).

    Returns:
        ``mean``, ``std``, ``interpolation``, ``crop_mode``, ``crop_pct``, ``input_size`` (3, C, C) for a
        processor that makes C x C images, and ``crop_offset`` "floor" (HF places a center crop's odd margin so).
    """
    settings = _settings(processor)
    name = settings.get("image_processor_type") or (
        "settings" if isinstance(processor, Mapping) else type(processor).__name__
    )

    def refuse(what: str) -> InputError:
        return InputError(f"image processor {name}: {what}")

    kind = _base_class(settings.get("image_processor_type") or "")
    if kind and kind not in KNOWN:
        raise refuse(f"aptvit reads images as {', '.join(KNOWN)} do, not as {kind}, which resizes by its own rule")
    for key in UNSUPPORTED:
        if settings.get(key):
            raise refuse(f"{key}={settings[key]!r} has no equivalent in timm's evaluation transform")
    if settings.get("do_resize") is False:
        raise refuse("it does not resize (do_resize=False), so its images have no fixed size")
    factor = 1.0 if settings.get("do_rescale") is False else float(settings.get("rescale_factor", 1 / 255))
    if not math.isclose(factor, 1 / 255):
        raise refuse(f"pixels are scaled by {factor:g} (do_rescale, rescale_factor), not 1/255 as aptvit scales them")
    missing = [k for k in ("size", "resample") if settings.get(k) is None]
    if missing:
        raise refuse(f"no {' or '.join(missing)} given: pass the processor, or its preprocessor_config.json")

    size = dict(settings["size"]) if isinstance(settings["size"], Mapping) else {"size": settings["size"]}
    if "shortest_edge" in size and len(size) == 1:
        mode, resized = "center", int(size["shortest_edge"])
    elif set(size) == {"height", "width"} and size["height"] == size["width"]:
        mode, resized = "squash", int(size["height"])
    else:
        raise refuse(f"size {settings['size']} is neither a shortest edge nor a square")
    out = resized
    if settings.get("do_center_crop"):
        crop = settings.get("crop_size")
        if not isinstance(crop, Mapping) or set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
            raise refuse(f"crop_size {crop} is not a square")
        out = int(crop["height"])
    elif mode == "center":
        raise refuse(f"size {size} without a center crop makes images of every aspect ratio")

    resample = getattr(settings["resample"], "value", settings["resample"])  # PIL's enum, torchvision's mode
    interpolation = resample.lower() if isinstance(resample, str) else PIL_RESAMPLE.get(resample)
    if interpolation not in PIL_RESAMPLE.values():
        raise refuse(f"resample {settings['resample']!r} is not one of PIL's ({', '.join(PIL_RESAMPLE.values())})")

    if settings.get("do_normalize", True):
        mean, std = settings.get("image_mean"), settings.get("image_std")
        if mean is None or std is None:
            raise refuse("it normalises (do_normalize) without image_mean / image_std")
    else:  # pixels in [0, 1]
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = _per_channel(mean), _per_channel(std)
    return dict(
        mean=mean,
        std=std,
        interpolation=interpolation,
        crop_mode=mode,
        crop_pct=_crop_pct(out, resized),
        input_size=(len(mean), out, out),
        crop_offset="floor",
    )


def _settings(processor: Any) -> Mapping[str, Any]:
    """A processor's settings as its class reads them: ``to_dict()``; a dict naming its class rebuilt by that class
    (an int ``size`` is a shortest edge for CLIP and a square for ViT; omitted keys are the class's defaults)."""
    if callable(getattr(processor, "to_dict", None)):
        return processor.to_dict()
    if not isinstance(processor, Mapping):
        raise UserTypeError(
            f"image_processor must be a Hugging Face image processor or a dict of its settings, "
            f"got {type(processor).__name__}"
        )
    kind = processor.get("image_processor_type") or processor.get("feature_extractor_type")
    if not kind:
        return processor
    try:
        import transformers
    except ImportError:
        return processor  # refused below when the dict's own settings are not enough
    cls = getattr(transformers, _base_class(kind), None)
    if cls is None or not callable(getattr(cls, "from_dict", None)):
        raise InputError(f"image processor {kind}: not a transformers image processor class")
    return {**cls.from_dict(dict(processor)).to_dict(), "image_processor_type": cls.__name__}


def _base_class(name) -> str:
    """An image processor class's name without its backend suffix (``CLIPImageProcessorFast`` / ``...Pil``)."""
    return str(name).removesuffix("Fast").removesuffix("Pil")


def _crop_pct(out: int, resized: int) -> float:
    """``out / resized``, a hair smaller where needed for timm's ``floor(out / crop_pct)`` to give ``resized`` back
    (224 / 400 is a float that gives 399)."""
    pct = out / resized
    while math.floor(out / pct) < resized:
        pct = math.nextafter(pct, 0.0)
    return pct


def _per_channel(value) -> tuple:
    """A processor's mean or std as a 3-tuple (HF accepts one number for every channel)."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
