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

``processor_cfg`` makes that translation; what has no timm equivalent (no resize, a non-square output, a rescale
other than 1/255) is refused with one line rather than evaluated on the wrong pixels. Pure: it reads a processor's
settings (``to_dict()``, or the dict of its ``preprocessor_config.json``) and imports nothing of ``transformers``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping

from ...core.io import InputError, UserTypeError

# PIL's resampling numbers (``PIL.Image.Resampling``), which HF processors store as ``resample``
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def processor_cfg(processor: Any) -> Dict[str, Any]:
    """timm ``pretrained_cfg`` keys from an HF image processor's settings.

    Args:
        processor: an HF image processor (``CLIPImageProcessor``, ``SiglipImageProcessor``, ``BitImageProcessor``
            for DINOv2, ``ViTImageProcessor``, ...; anything with ``to_dict()``) or a dict of the same settings.

    Returns:
        ``mean``, ``std``, ``interpolation``, ``crop_mode``, ``crop_pct`` and ``input_size`` (3, C, C) for a
        processor that makes C x C images.
    """
    settings = processor.to_dict() if callable(getattr(processor, "to_dict", None)) else processor
    if not isinstance(settings, Mapping):
        raise UserTypeError(
            f"image_processor must be a Hugging Face image processor or a dict of its settings, "
            f"got {type(processor).__name__}"
        )
    name = settings.get("image_processor_type") or ("settings" if processor is settings else type(processor).__name__)

    def refuse(what: str) -> InputError:
        return InputError(f"image processor {name}: {what}; aptvit's pipelines resize and crop as timm does")

    if settings.get("do_resize") is False:
        raise refuse("it does not resize (do_resize=False), so its images have no fixed size")
    if settings.get("do_rescale", True) and not math.isclose(float(settings.get("rescale_factor", 1 / 255)), 1 / 255):
        raise refuse(f"rescale_factor {settings['rescale_factor']} is not 1/255")

    size = dict(settings.get("size") or {})
    if "shortest_edge" in size and len(size) == 1:
        mode, resized = "center", int(size["shortest_edge"])
    elif set(size) == {"height", "width"} and size["height"] == size["width"]:
        mode, resized = "squash", int(size["height"])
    else:
        raise refuse(f"size {size} is neither a shortest edge nor a square")
    out = resized
    if settings.get("do_center_crop"):
        crop = dict(settings.get("crop_size") or {})
        if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
            raise refuse(f"crop_size {crop} is not a square")
        out = int(crop["height"])
    elif mode == "center":
        raise refuse(f"size {size} without a center crop makes images of every aspect ratio")

    resample = settings.get("resample", 3)
    interpolation = resample.lower() if isinstance(resample, str) else PIL_RESAMPLE.get(int(resample))
    if interpolation not in PIL_RESAMPLE.values():
        raise refuse(f"resample {resample!r} is not one of PIL's ({', '.join(PIL_RESAMPLE.values())})")

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
    )


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
