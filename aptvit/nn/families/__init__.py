"""The model families ``aptvit.convert`` accepts: one adapter module each (see ``base.Family`` for the contract).

``FAMILIES`` is the registry, in the order a model is matched (by exact class); ``register_family`` adds one.
``family_of(model)`` finds a model's family or raises a ``TypeError`` that names the class, the reason and what is
supported. ``supported_table()`` renders README's supported-models table from the adapters.
"""

from __future__ import annotations

from typing import Dict, Tuple

from torch import nn

from ...core.io import InputError, UserTypeError
from .base import BlockContext, Family, drop_path_packed
from .distilled import DistilledFamily
from .eva import EvaFamily
from .vit import ViTFamily

FAMILIES: Dict[str, Family] = {}


def register_family(family: Family, overwrite: bool = False) -> Family:
    """Make ``family`` convertible (matched by its ``accepts``); its name must be new unless ``overwrite``."""
    if not isinstance(family, Family) or not family.name:
        raise UserTypeError(f"a family must be a named aptvit.nn.families.Family instance, got {family!r}")
    if family.name in FAMILIES and not overwrite:
        raise InputError(f"family {family.name!r} is already registered; pass overwrite=True to replace it")
    FAMILIES[family.name] = family
    return family


register_family(ViTFamily())
register_family(DistilledFamily())
register_family(EvaFamily())


def supported() -> str:
    """One line of what converts, for error messages."""
    return "; ".join(f"{', '.join(f.timm_classes)} ({f.readme.get('models', '')})" for f in FAMILIES.values())


def family_of(model: nn.Module) -> Family:
    """The family of ``model``, checked: a ``TypeError`` naming the class and why when it cannot be converted."""
    name = type(model).__name__
    for family in FAMILIES.values():
        if family.accepts(model):
            why = family.check(model)
            if why:
                raise UserTypeError(f"cannot convert {name}: {why}. Supported: {supported()}")
            return family
    raise UserTypeError(f"cannot convert {name}: not a class aptvit has an adapter for. Supported: {supported()}")


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` naming the class and what is supported unless ``model`` can be converted."""
    family_of(model)


def timm_modules() -> Tuple[str, ...]:
    """The timm modules whose entry points build a model of some family (a check before anything is created)."""
    return tuple(dict.fromkeys(m for f in FAMILIES.values() for m in f.timm_modules))


def timm_args_allowed() -> Tuple[str, ...]:
    """Every ``timm.create_model`` argument a checkpoint of some family may carry."""
    return tuple(dict.fromkeys(a for f in FAMILIES.values() for a in f.TIMM_ARGS))


def supported_table() -> str:
    """README's supported-models table (Markdown), one row per family, from the adapters."""
    head = ("timm models", "class", "prefix tokens", "positions", "pooling")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(f.readme_row()) + " |" for f in FAMILIES.values()]
    return "\n".join(lines)


__all__ = [
    "BlockContext",
    "Family",
    "FAMILIES",
    "ViTFamily",
    "DistilledFamily",
    "EvaFamily",
    "check_supported",
    "drop_path_packed",
    "family_of",
    "register_family",
    "supported",
    "supported_table",
    "timm_args_allowed",
    "timm_modules",
]
