"""Checkpoint I/O: ``save`` and ``load`` an APT model, and read timm checkpoints.

The file format. An aptvit checkpoint is one safetensors file:
    tensors: the timm model's state dict under timm's own keys (``blocks.0.attn.qkv.weight``, ...) plus the
        APT parameters under ``adaptive_embed.*`` (the detail path), so timm's tools read the timm part as is.
        Older aptvit files hold them under ``apt.*``; ``checkpoint_filter_fn`` renames them on load.
    metadata (strings; JSON where noted):
        ``format``: "aptvit"; ``format_version``: ``FORMAT_VERSION``;
        ``aptvit``: the conversion settings (``APTConfig.to_dict``, JSON);
        ``architecture``: the timm model name (re-created with ``timm.create_model(..., pretrained=False)``
            when ``load`` gets no model);
        ``timm_args``: the ``timm.create_model`` arguments that re-create the structure (JSON; only the keys in
            ``TIMM_ARGS``, checked against the file's own tensors before anything is allocated);
        ``pretrained_cfg``: the preprocessing the weights expect (``PRETRAINED_CFG_KEYS``, JSON);
        plus any ``extra_metadata`` (e.g. ``classes`` and ``input_size`` of a fine-tuning run).
A timm checkpoint (safetensors, or a torch file read with ``weights_only=True``) has no such metadata; ``load``
then needs the timm ``model=`` to load it into, and converts it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from ..core.io import MAX_SIDE, InputError, UserTypeError, atomic_write, reading
from .config import APTConfig
from .convert import convert
from .families import FAMILIES, family_of, timm_args_allowed
from .model import APTViT

# 2: the settings hold ``scorer_args`` (1 had entropy's ``bins``) and no attention backend (a runtime choice now);
# 3: the detail path under ``adaptive_embed.*`` (1 and 2: ``apt.*``), so that an aptvit reading only ``apt.*`` refuses
# the file by its version rather than by its keys. Files of versions 1 and 2 still load (``APTConfig.from_dict``,
# ``checkpoint_filter_fn``), a newer version is refused by name
FORMAT_VERSION = "3"
# what a loaded model needs to preprocess like the saved one (normalisation, eval crop, size)
PRETRAINED_CFG_KEYS = (
    "architecture", "tag", "mean", "std", "crop_pct", "crop_mode", "input_size", "interpolation", "crop_offset"
)  # fmt: skip
# The only ``timm.create_model`` arguments a checkpoint may carry: the structure that each family's ``timm_args``
# records and the regularisation rates (``Family.TIMM_ARGS``). Nothing that names a file (checkpoint_path,
# pretrained_cfg_overlay) or a class.
TIMM_ARGS = timm_args_allowed()
# state-dict key prefixes of older aptvit files and their names today: {old: new} (``APTViT.adaptive_embed`` was ``apt``)
RENAMED_PREFIXES = {"apt.": "adaptive_embed."}
EMBED_PREFIX = "adaptive_embed."


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An aptvit state dict under today's keys: keys of older files renamed (``RENAMED_PREFIXES``), others as given.

    The counterpart of timm's ``checkpoint_filter_fn`` for the APT parameters: ``load`` runs every aptvit file
    through it, and a state dict saved with ``torch.save(apt.state_dict())`` by an older aptvit loads with
    ``apt.load_state_dict(checkpoint_filter_fn(old))``.
    """
    out = {}
    for key, value in state_dict.items():
        old = next((p for p in RENAMED_PREFIXES if key.startswith(p)), None)
        out[RENAMED_PREFIXES[old] + key[len(old) :] if old else key] = value
    return out


def _timm_args(vit: nn.Module) -> Dict:
    """``timm.create_model`` arguments that re-create this model's structure, read off the instance by its family."""
    return family_of(vit).timm_args(vit)


def save(
    model: APTViT,
    path: Union[str, os.PathLike],
    extra_metadata: Optional[Mapping[str, str]] = None,
    model_args: Optional[Mapping] = None,
) -> Path:
    """Save an APT model as safetensors with its conversion settings as metadata (atomically).

    Args:
        extra_metadata: more string metadata (e.g. the class names of a fine-tuning run).
        model_args: extra ``timm.create_model`` arguments the model was built with, stored with the
            structure read off the model, so that ``load`` can re-create it without ``model=``.

    Missing folders above ``path`` are created, as by every file aptvit writes, and reported on the "aptvit"
    logger (``core.io.make_folder``).
    """
    path = Path(path)
    atomic_write(path, saver(model, extra_metadata, model_args))
    return path


def saver(model: APTViT, extra_metadata: Optional[Mapping[str, str]] = None, model_args: Optional[Mapping] = None):
    """A ``write(tmp_path)`` that stores ``model`` as ``save`` does, to be written together with other files."""
    from safetensors.torch import save_file

    if not isinstance(model, APTViT):
        raise UserTypeError(f"model must be an APTViT (from aptvit.convert), got {type(model).__name__}")
    unknown = sorted(set(model_args or {}) - set(TIMM_ARGS))
    if unknown:
        raise InputError(f"model_args {unknown} cannot be saved (a checkpoint may carry only {', '.join(TIMM_ARGS)})")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": "aptvit",
        "format_version": FORMAT_VERSION,
        "aptvit": json.dumps(model.config.to_dict()),
        "architecture": str(model.pretrained_cfg.get("architecture", "")),
        "timm_args": json.dumps({**dict(model_args or {}), **_timm_args(model.timm_model)}),
        "pretrained_cfg": json.dumps({k: v for k, v in model.pretrained_cfg.items() if k in PRETRAINED_CFG_KEYS}),
    }
    extra = getattr(model.timm_model, "aptvit_metadata", None)  # e.g. a Hugging Face twin's class and config
    metadata.update(extra() if callable(extra) else {})
    metadata.update(extra_metadata or {})
    return lambda tmp: save_file(state, tmp, metadata=metadata)


# The first bytes of files that people give as a checkpoint by mistake
_NOT_WEIGHTS = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image", b"%PDF": "a PDF"}


def check_checkpoint_file(path: Union[str, os.PathLike]) -> None:
    """Refuse, with one line naming ``path``, a checkpoint that is missing, a folder, unreadable, or by its first
    bytes not weights at all: neither safetensors (a little-endian header length, then "{") nor a torch.save file
    (a zip archive, or a pickle for the legacy format)."""
    with reading(path, "checkpoint"):
        with open(path, "rb") as f:
            head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80" or head[8:9] == b"{":
        return
    kind = next((name for magic, name in _NOT_WEIGHTS.items() if head.startswith(magic)), None)
    raise InputError(
        f"checkpoint {str(path)!r} is {kind or 'not a weights file'}: give a .safetensors file or weights saved "
        "with torch.save (.pth, .pt, .bin)"
    )


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The metadata of a safetensors file ({} for other files)."""
    from safetensors import safe_open

    if not str(path).endswith(".safetensors"):
        return {}
    check_checkpoint_file(path)
    with reading(path, "checkpoint", "is it a complete .safetensors file?"):
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})


def _tensor_shapes(path) -> Dict[str, tuple]:
    """Names and shapes of a safetensors file's tensors, from its header (no tensor is read)."""
    from safetensors import safe_open

    with reading(path, "checkpoint"):
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _metadata_json(meta: Mapping[str, str], key: str, path, default=None):
    """A JSON metadata entry of an aptvit checkpoint, or an error naming the file and the entry."""
    if key not in meta:
        if default is not None:
            return default
        raise InputError(
            f"checkpoint {str(path)!r} says format=aptvit but has no {key!r} metadata (a damaged or edited file?)"
        )
    with reading(path, "checkpoint", f"its {key!r} metadata is not valid JSON"):
        return json.loads(meta[key])


def read_config(path: Union[str, os.PathLike], meta: Optional[Mapping[str, str]] = None) -> Optional[APTConfig]:
    """The conversion settings an aptvit checkpoint carries (None for a timm checkpoint); a newer format, missing or
    invalid settings are an error naming the file.

    Args:
        meta: the file's metadata when the caller has read it already (``read_metadata``).
    """
    meta = read_metadata(path) if meta is None else meta
    if meta.get("format") != "aptvit":
        return None
    version = meta.get("format_version", "1")
    if not version.isdigit() or int(version) > int(FORMAT_VERSION):
        raise InputError(
            f"checkpoint {str(path)!r} has format version {version!r}, newer than this aptvit reads "
            f"({FORMAT_VERSION}); upgrade aptvit"
        )
    settings = _metadata_json(meta, "aptvit", path)
    with reading(path, "checkpoint", "its 'aptvit' settings are not valid"):
        return APTConfig.from_dict(settings)


def _mlp_hidden(args: Mapping, shapes: Mapping[str, tuple]) -> Optional[int]:
    """The hidden width that timm's ``mlp_ratio`` sets (``int(embed_dim * mlp_ratio)``), as the file's first block has
    it, or None when the file has no such MLP.

    That is fc2's input width for ``Mlp``, ``SwiGLU`` (fc1_g / fc1_x) and Eva's ``GluMlp`` (whose fc1 holds both
    halves: twice it). A ``VisionTransformer`` block hands a GLU MLP the doubled width instead (its fc1's); an Eva
    checkpoint says which it is by ``swiglu_mlp``.
    """
    fc1, fc2 = shapes.get("blocks.0.mlp.fc1.weight"), shapes.get("blocks.0.mlp.fc2.weight")
    if not fc2 or len(fc2) != 2:
        return None
    if fc1 and fc1[0] == 2 * fc2[1] and "swiglu_mlp" not in args:
        return fc1[0]
    return fc2[1]


def check_timm_args(args, path) -> Dict:
    """The ``timm_args`` of a checkpoint, allow-listed and checked against its own tensors before anything is allocated.

    Only ``TIMM_ARGS`` may reach ``timm.create_model``; ``img_size`` is at most ``MAX_SIDE`` per side; the width,
    depth, patch size, channels and classes must be those of the tensors in the file, and ``mlp_ratio`` (and an
    attention pool's) must give the hidden width its MLP has.
    """
    where = f"checkpoint {str(path)!r}: timm_args"
    if not isinstance(args, dict):
        raise InputError(f"{where} is not a JSON object")
    unknown = sorted(set(args) - set(TIMM_ARGS))
    if unknown:
        raise InputError(
            f"{where} holds {', '.join(unknown)}, which a checkpoint may not set (allowed: {', '.join(TIMM_ARGS)})"
        )
    img = args.get("img_size")
    sides = (
        [img] if isinstance(img, int) else list(img) if isinstance(img, (list, tuple)) else [] if img is None else [img]
    )
    if len(sides) > 2 or any(isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIDE for v in sides):
        raise InputError(f"{where} img_size {img!r} is not one or two sides from 1 to the limit of {MAX_SIDE} pixels")
    for key in ("reg_tokens", "num_classes", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"{where} {key} {value!r} is not a count")
    for key in ("mlp_ratio", "attn_pool_mlp_ratio"):
        mlp = args.get(key)
        if mlp is not None and (isinstance(mlp, bool) or not isinstance(mlp, (int, float)) or not 0 < mlp <= 64):
            raise InputError(f"{where} {key} {mlp!r} is not a number in (0, 64]")
    shapes = _tensor_shapes(path)
    proj = shapes.get("patch_embed.proj.weight")
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    head = shapes.get("head.weight")
    found = {
        "embed_dim": proj[0] if proj else None,
        "in_chans": proj[1] if proj else None,
        "patch_size": proj[-1] if proj else None,
        "depth": depth,
        "num_classes": head[0] if head else 0 if "head.weight" not in shapes and proj else None,
    }
    for key, value in found.items():
        if value is not None and args.get(key) is not None and args[key] != value:
            raise InputError(f"{where} {key} {args[key]!r} does not match the file's tensors ({value})")
    dim = found["embed_dim"] or args.get("embed_dim")
    for key, hidden, tensor in (
        ("mlp_ratio", _mlp_hidden(args, shapes), "blocks.0.mlp"),
        ("attn_pool_mlp_ratio", (shapes.get("attn_pool.mlp.fc1.weight") or (None,))[0], "attn_pool.mlp"),
    ):
        ratio = args.get(key)
        if ratio is not None and dim and hidden is not None and int(dim * ratio) != hidden:
            raise InputError(
                f"{where} {key} {ratio!r} gives {int(dim * ratio)} hidden features at width {dim}; the file's {tensor} "
                f"has {hidden} (a damaged or edited file?)"
            )
    pos, p = shapes.get("pos_embed"), found["patch_size"] or args.get("patch_size")
    if pos and len(pos) == 3 and sides and p:
        h, w = (sides * 2)[:2]
        grid, prefix = (h // p) * (w // p), pos[1] - (h // p) * (w // p)
        # the file does not say its family before the model exists: the most prefix entries any family allows
        if not 0 <= prefix <= max(f.max_position_prefix(args) for f in FAMILIES.values()):
            raise InputError(
                f"{where} img_size {img!r} gives a {grid}-cell grid; the file's position embedding has {pos[1]} entries"
            )
    return args


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint: safetensors, or a torch file loaded with ``weights_only=True``.

    Accepts plain state dicts and the usual wrappers ({"state_dict": ...}, {"model": ...}, "module." prefixes).
    """
    path = Path(path)
    check_checkpoint_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with reading(path, "checkpoint", "is it a complete .safetensors file?"):
            return load_file(str(path))
    # unpickling errors name the offending global; weights_only refuses anything but tensors and containers
    with reading(path, "checkpoint", "expected weights saved with torch.save or safetensors"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_ema", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_timm_weights(vit: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load timm weights strictly (position embeddings resampled as timm does), or say which keys differ."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(dict(state_dict), vit)
    except Exception:  # a checkpoint of another shape breaks timm's resampling; the key check below says why
        state = dict(state_dict)
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:

        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [
            f"{name}: {show(keys)}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise InputError("checkpoint does not match the model; " + "; ".join(parts))
    vit.load_state_dict(state, strict=True)


def load(
    path: Union[str, os.PathLike],
    model: Optional[nn.Module] = None,
    timm_kwargs: Optional[Mapping] = None,
    attention: str = "auto",
    **convert_kwargs,
) -> APTViT:
    """Load an APT model saved by ``save``, or convert a timm model after loading a timm checkpoint.

    Args:
        path: an aptvit ``.safetensors`` file, or a timm checkpoint (safetensors / torch file).
        model: the timm ViT to load into. Optional for aptvit files whose architecture is a
            registered timm name (re-created with ``timm.create_model(..., pretrained=False)``).
        timm_kwargs: extra ``timm.create_model`` arguments when re-creating it (e.g. drop_path_rate).
        attention: the attention backend to run with (a runtime choice, never saved).
        convert_kwargs: settings for ``convert`` when ``path`` is a plain timm checkpoint (aptvit
            files carry their own; change them with ``.configure(...)``).

    Returns:
        APTViT with the checkpoint's weights (timm part and ``adaptive_embed.*``; older files' ``apt.*`` too).
    """
    meta = read_metadata(path)
    config = read_config(path, meta)
    state = read_state_dict(path)
    if config is not None:
        state = checkpoint_filter_fn(state)
    if config is None:
        if model is None:
            raise InputError(
                f"{str(path)!r} is not an aptvit checkpoint; pass model=timm.create_model(...) to load timm weights into"
            )
        load_timm_weights(model, state)
        return convert(model, attention=attention, **convert_kwargs)
    if convert_kwargs:
        raise UserTypeError(
            f"{str(path)!r} carries its own conversion settings; change them afterwards with .configure(...)"
        )
    if model is None and "hf_source" in meta:  # converted from Hugging Face: its timm twin, from the file alone
        from .hf import fit_head, twin_from_metadata

        model = twin_from_metadata(meta, path)
        fit_head(model, state)  # a fine-tuned tower's classifier
    if model is None:
        import timm

        arch = meta.get("architecture", "")
        if not arch:
            raise InputError(
                f"{str(path)!r} does not name a timm architecture; pass model= (the timm model it was converted from)"
            )
        if not timm.is_model(arch):
            raise InputError(f"checkpoint {str(path)!r} names architecture {arch!r}, which this timm does not know")
        args = check_timm_args(_metadata_json(meta, "timm_args", path, default={}), path)
        args["img_size"] = tuple(args.get("img_size", ())) or None
        args["dynamic_img_size"] = True  # any input size, like the APT model itself (weights unchanged)
        args.update(timm_kwargs or {})
        model = timm.create_model(arch, pretrained=False, **{k: v for k, v in args.items() if v is not None})
    saved_cfg = _metadata_json(meta, "pretrained_cfg", path, default={})
    if not isinstance(saved_cfg, dict):
        raise InputError(f"checkpoint {str(path)!r}: pretrained_cfg metadata is not a JSON object")
    saved_cfg = {k: v for k, v in saved_cfg.items() if k in PRETRAINED_CFG_KEYS}
    if saved_cfg:  # the weights were trained with this normalisation: keep it, on both models
        model.pretrained_cfg = {**dict(getattr(model, "pretrained_cfg", None) or {}), **saved_cfg}
    apt = APTViT(model, config, attention=attention)
    timm_keys = {k: v for k, v in state.items() if not k.startswith(EMBED_PREFIX)}
    load_timm_weights(model, timm_keys)
    embed_state = {k[len(EMBED_PREFIX) :]: v for k, v in state.items() if k.startswith(EMBED_PREFIX)}
    missing, unexpected = apt.adaptive_embed.load_state_dict(embed_state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"checkpoint's {EMBED_PREFIX}* weights do not match the model (missing {missing}, unexpected {unexpected})"
        )
    return apt
