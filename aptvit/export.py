"""Export an APT model as one graph: pixels in, logits (or pre-logits, or the dense grid) out, layout inside.

The exported graph is the static path (``APTConfig.static``): exactly k tokens per image, the layout (scores,
budget threshold, quadtree selection, packing) and the plan built from tensor ops with no host read, so nothing
in it depends on Python at run time. Two formats:

* ``"onnx"``: ``torch.onnx.export(dynamo=True)`` of the forward in three parts (``export_graph``): the layout, plan
  and embedding of one image, run over the batch by an ONNX ``Scan``; the blocks on the whole batch (a dynamic batch
  axis: one matmul per layer for every image, the graph optimiser's fusions on the batch); the head of one image,
  run by a second ``Scan``. Images never mix. The conversion settings, the input size and the normalisation are in
  the file's ``metadata_props``.
* ``"torch"``: a ``torch.export`` ``ExportedProgram`` (``torch.export.save``) of the same three parts, the two
  per-image ones under ``torch._higher_order_ops.scan`` (``export_graph.ScannedStaged``); the metadata goes in the
  archive's extra file ``aptvit.json``.

Why the layout goes image by image: the static plan's host structures (``PatchLayout.image_sizes``, the size groups)
are Python tuples as long as the batch, so a trace specialises the batch size; per image they are constants. Past
the plan an image is a fixed block of L rows, and the blocks need no Python structure sized by the batch (the
attention backend's static form is ``traceable``: fixed-shape views and one SDPA), so they are traced once with a
dynamic batch.

Four aten ops of the layout have no ONNX translation in torch 2.14's exporter (or none that ONNX Runtime runs);
they get exact ones here: ``searchsorted`` (a comparison count, (..., Q, M) booleans: the layout's sorted lists are
a few hundred long), ``repeat_interleave`` with an output size (the same count over cumulative sums), ``nextafter``
(in float64; exact for every float32 whose neighbour is not subnormal) and the int32 histogram's ``index_put`` (ONNX
Runtime's ``ScatterND`` takes no int32: counted in int64).

Every export is checked before the file appears (it is written to a temporary name and renamed): the exported
graph, run in ONNX Runtime on the CPU (or as the loaded ExportedProgram), must equal the PyTorch static forward
within ``CHECK_TOLERANCE`` of the output's scale on real photos (scikit-image's).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .core.io import InputError, MissingDependency, UserTypeError, atomic_write, check_writable
from .core.static import static_tokens
from .nn.attention import BACKENDS
from .nn.config import APTConfig
from .nn.model import APTViT

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torch")
EXPORT_FAMILIES = ("vit", "eva")  # the adapters whose exported graph is checked (tests/test_export.py)
CHECK_TOLERANCE = 1e-4  # max |exported - PyTorch| / max |PyTorch| on the check photos
CHECK_PHOTOS = 3  # photos in the check batch (more than one: the batch axis is exercised)
INSTALL_HINT = "pip install 'aptvit[export]' (onnxruntime, onnxscript)"
FORMAT_VERSION = 1


class ExportCheckError(RuntimeError):
    """The exported graph does not reproduce the PyTorch static forward (a bug: nothing was written)."""


# ---------------------------------------------------------------------------------------------- the graph
class StaticForward(nn.Module):
    """The static ``apt(x)`` of a batch, with the outputs export asks for.

    forward(images (B, C, H, W) normalised) -> logits (B, classes) or pre-logits (B, D); with ``dense`` also the
    final features on the base grid (B, D, H/p, W/p).
    """

    def __init__(self, apt: APTViT, pre_logits: bool = False, dense: bool = False) -> None:
        super().__init__()
        self.apt, self.pre_logits, self.dense = apt, pre_logits, dense

    def forward(self, images: torch.Tensor):
        from .nn.dense import SMOOTH_DEFAULT, unmerge_packed

        packed = self.apt.prepare(images)  # static: layout and plan on the device, no host read
        features = self.apt.forward_features(images, packed=packed)
        out = self.apt.forward_head(features, pre_logits=self.pre_logits)
        if not self.dense:
            return out
        return out, unmerge_packed(features.tokens, packed, SMOOTH_DEFAULT)


# ---------------------------------------------------------------------------------------------- checks
def _image_size(apt: APTViT, image_size) -> Tuple[int, int]:
    if image_size is None:
        size = getattr(apt.patch_embed, "img_size", None) or apt.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
        image_size = tuple(size)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    h, w = (int(v) for v in image_size)
    p = apt.patch_size
    if h <= 0 or w <= 0 or h % p or w % p:
        raise InputError(f"image size {h}x{w} is not a positive multiple of the patch size {p}; pass --size N*{p}")
    return h, w


def check_exportable(
    model, image_size=None, budget=None, format: str = "onnx"
) -> Tuple[APTConfig, Tuple[int, int], int]:
    """Refuse, before any work, a model or setting the exporter cannot take, with one line saying what to pass.

    Returns:
        (the static config, (H, W), k tokens per image).
    """
    if not isinstance(model, APTViT):
        raise UserTypeError(f"export takes an APTViT (aptvit.convert(timm_model, budget=0.5)), got {type(model).__name__}")
    if format not in FORMATS:
        raise InputError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    if model.family.name not in EXPORT_FAMILIES:
        raise InputError(
            f"export takes the {' and '.join(EXPORT_FAMILIES)} families, not {model.family.name} "
            f"({type(model.timm_model).__name__}); convert a VisionTransformer or Eva model instead"
        )
    if budget is None and model.config.budget is None:
        raise InputError(
            "export needs a token budget (a fixed k tokens per image), not thresholds: pass budget=0.5 "
            "(--budget 0.5, a fraction of the base tokens, or a count)"
        )
    if _export_backend(model.attention) is None:
        name = _export_backend("auto")
        raise InputError(
            f"attention {model.attention!r} cannot be exported (it reads host offsets or is a compiled or device-only "
            f"kernel); pass attention={name!r} (--attention {name}) or 'auto'"
        )
    config = model.config.replace(
        static=True, **({"budget": budget, "thresholds": None} if budget is not None else {})
    )
    size = _image_size(model, image_size)
    k = static_tokens(config.budget, size, config.patch_sizes)
    if format == "onnx":
        _require("onnxruntime")
        _require("onnxscript")
    return config, size, k


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"ONNX export needs {module}: {INSTALL_HINT}") from None


def _export_backend(attention: str) -> Optional[str]:
    """The attention backend an exported graph runs for a model's ``attention``: the model's own if it is
    ``traceable`` (``nn.attention.Backend``), for "auto" the first registered traceable one that runs on the CPU in
    float32; None when it cannot be exported."""
    if attention != "auto":
        backend = BACKENDS.get(attention)
        return attention if backend is not None and backend.traceable else None
    cpu = torch.device("cpu")
    return next((n for n, b in BACKENDS.items() if b.traceable and b.available(cpu, torch.float32)), None)


def _static_copy(model: APTViT, config: APTConfig, size: Optional[Tuple[int, int]] = None) -> APTViT:
    """A copy of ``model`` on the CPU in eval mode, static, with the attention backend an export runs
    (``_export_backend``; the caller's model is left alone); with ``size``, its position table resampled to that
    input size once, here (``_positions_at``)."""
    apt = copy.deepcopy(model).cpu().eval()
    apt.config = config
    apt.attention = _export_backend(model.attention)
    for p in apt.parameters():
        p.requires_grad_(False)
    if size is not None:
        _positions_at(apt, size)
    return apt


def _positions_at(apt: APTViT, size: Tuple[int, int]) -> None:
    """Give ``apt`` (an export's own copy) the position table of ``size``, resampled by the family's own code, as
    timm's ``img_size=`` would: the graph then holds a constant table rather than a resampling of it per image (an
    exported graph has one input size). OpenVINO's bicubic resize differs from torch's and ONNX Runtime's (0.6% of the
    logits, tiny ViT 224 -> 128 px); the same table in every runtime does not."""
    grid = (size[0] // apt.patch_size, size[1] // apt.patch_size)
    pos = getattr(apt, "pos_embed", None)
    if pos is None or tuple(apt.patch_embed.grid_size) == grid:
        return
    with torch.no_grad():
        grid_pos, prefix_pos = apt.family.pos_embed_grid(apt, grid)  # (1, D, h, w), (1, P', D) or None
        table = grid_pos.flatten(2).transpose(1, 2)
        pos.data = torch.cat([prefix_pos, table], dim=1) if prefix_pos is not None else table.contiguous()
    apt.patch_embed.grid_size = grid  # the table's grid: the family resamples nothing at this size


def metadata(apt: APTViT, size: Tuple[int, int], k: int, pre_logits: bool, dense: bool) -> Dict[str, str]:
    """What a runtime needs to feed the graph and read its outputs (``metadata_props``; every value a string)."""
    from . import __version__

    mean, std = apt.pixel_mean_std()
    outputs = ["pre_logits" if pre_logits else "logits"] + (["dense"] * dense)
    return {
        "aptvit_format": str(FORMAT_VERSION),
        "aptvit_version": __version__,
        "architecture": str(apt.pretrained_cfg.get("architecture", type(apt.timm_model).__name__)),
        "input_size": json.dumps([apt.patch_embed.proj.in_channels, *size]),
        "input": "images: (batch, C, H, W) float32, RGB in [0, 1] normalised as (x - mean) / std",
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "outputs": json.dumps(outputs),
        "tokens_per_image": str(k),
        "num_prefix_tokens": str(apt.num_prefix_tokens),
        "apt_config": json.dumps(apt.config.to_dict(), sort_keys=True),
    }


def check_photos(apt: APTViT, size: Tuple[int, int]) -> torch.Tensor:
    """(CHECK_PHOTOS, C, H, W) real photos normalised as ``apt`` expects."""
    from .images import normalise
    from .photos import photo_batch

    photos = photo_batch(CHECK_PHOTOS, size)
    if apt.patch_embed.proj.in_channels != 3:
        photos = photos[:, : apt.patch_embed.proj.in_channels]
    return normalise(photos, *apt.pixel_mean_std())


def relative_error(got, want) -> float:
    """max |got - want| over the largest |want|: the error relative to the output's scale."""
    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _compare(outputs, reference, what: str) -> float:
    reference = reference if isinstance(reference, tuple) else (reference,)
    errors = [relative_error(o, r) for o, r in zip(outputs, reference)]
    worst = max(errors)
    if not worst <= CHECK_TOLERANCE:  # NaN fails too
        raise ExportCheckError(
            f"the exported graph differs from the PyTorch static forward by {worst:.2e} of the output's scale "
            f"({what}; allowed {CHECK_TOLERANCE:.0e}): nothing was written"
        )
    return worst


# ---------------------------------------------------------------------------------------------- ONNX
def _onnx_translations() -> dict:
    """Exact ONNX translations of the aten ops of the layout that torch's exporter has none for (onnxscript)."""
    import onnx
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_index_put

    INT64, INT32, FLOAT, DOUBLE = onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE

    def searchsorted(sorted_sequence, self, out_int32=False, right=False, side=None, sorter=None):
        # the index = how many sorted entries lie before the value (<= for right): a count over (..., Q, M)
        if sorter is not None:
            raise NotImplementedError("searchsorted with a sorter")
        seq = op.Unsqueeze(sorted_sequence, op.Constant(value_ints=[-2]))  # (..., 1, M)
        val = op.Unsqueeze(self, op.Constant(value_ints=[-1]))  # (..., Q, 1)
        before = op.LessOrEqual(seq, val) if (right or side == "right") else op.Less(seq, val)
        count = op.ReduceSum(op.Cast(before, to=INT64), op.Constant(value_ints=[-1]), keepdims=0)
        return op.Cast(count, to=INT32) if out_int32 else count

    def next_up(x):
        # the next float32 above finite x: x + |x| 2^-24 in float64 lies strictly between x and x + 1 ulp, beyond
        # the midpoint, so rounding to float32 lands on the next float; a power of two's midpoint is a tie (rounded
        # back to x), where x + |x| 2^-23 is the next float exactly. ONNX Runtime flushes subnormals to zero, so
        # zero and subnormal x (|x| < 2^-126) go to the nearest float that is not subnormal: 2^-126 above, 0 below
        # (every comparison with a float that is not subnormal, the layout's only use, comes out the same).
        d = op.Cast(x, to=DOUBLE)
        step = op.Abs(d)
        a = op.Cast(op.Add(d, op.Mul(step, op.CastLike(op.Constant(value_float=2.0**-24), d))), to=FLOAT)
        b = op.Cast(op.Add(d, op.Mul(step, op.CastLike(op.Constant(value_float=2.0**-23), d))), to=FLOAT)
        normal = op.Where(op.Greater(a, x), a, b)
        smallest = op.Constant(value_float=2.0**-126)
        tiny = op.Where(op.Less(x, op.Constant(value_float=0.0)), op.Constant(value_float=0.0), smallest)
        return op.Where(op.Less(op.Abs(x), smallest), tiny, normal)

    def repeat_interleave(repeats, output_size=None):
        # the index of every output row: how many cumulative counts are <= the row (output_size: static)
        if output_size is None:
            raise NotImplementedError("repeat_interleave without output_size")
        ends = op.Unsqueeze(op.CumSum(op.Cast(repeats, to=INT64), op.Constant(value_int=0)), op.Constant(value_ints=[0]))
        rows = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=output_size), op.Constant(value_int=1)),
                            op.Constant(value_ints=[-1]))  # fmt: skip
        return op.ReduceSum(op.Cast(op.LessOrEqual(ends, rows), to=INT64), op.Constant(value_ints=[-1]), keepdims=0)

    def nextafter(self, other):
        if self.dtype != ir.DataType.FLOAT:
            raise NotImplementedError("nextafter of a dtype other than float32")
        up, down = next_up(self), op.Neg(next_up(op.Neg(self)))
        return op.Where(op.Greater(other, self), up, op.Where(op.Less(other, self), down, other))

    def index_put(self, indices, values, accumulate=False):
        if self.dtype == ir.DataType.INT32 and len(indices) == 1:  # ScatterND takes no int32: count in int64
            (index,) = indices
            idx = op.Unsqueeze(op.Cast(index, to=INT64), op.Constant(value_ints=[-1]))
            updates = op.Expand(op.Cast(values, to=INT64), op.Shape(index))
            wide = op.ScatterND(op.Cast(self, to=INT64), idx, updates, reduction="add" if accumulate else "none")
            return op.Cast(wide, to=INT32)
        return aten_index_put(self, indices, values, accumulate)

    aten = torch.ops.aten
    return {
        aten.searchsorted.Tensor: searchsorted,
        aten.nextafter.default: nextafter,
        aten.index_put.default: index_put,
        aten.repeat_interleave.Tensor: repeat_interleave,
    }


def _onnx_staged(apt: APTViT, pre_logits: bool, dense: bool, example: torch.Tensor, outputs) -> "onnx.ModelProto":  # noqa: F821
    """The ONNX model of ``apt``'s static forward (``export_graph``): the embedding and the head traced on one image
    and run image by image, the blocks traced with a dynamic batch and run on the whole batch."""
    from .export_graph import staged, staged_onnx

    parts, blocks_in, head_in = staged(apt, pre_logits, dense, example)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    embed = _onnx_model(parts.embed, (example,), input_names=["images"])
    blocks = _onnx_model(
        parts.blocks, tuple(blocks_in), dynamic_shapes=({0: batch}, tuple({0: batch} for _ in blocks_in[1:]))
    )
    head = _onnx_model(parts.head, tuple(head_in))
    return staged_onnx(embed, blocks, head, parts.n_context, outputs)


def _onnx_model(module: nn.Module, args: tuple, dynamic_shapes=None, input_names=None) -> "onnx.ModelProto":  # noqa: F821
    """The ONNX ``ModelProto`` of ``module`` on ``args`` (torch's dynamo exporter with ``_onnx_translations``)."""
    import warnings

    # onnx_ir logs a warning per empty attribute list it types as INTS (the exporter's own output, a dozen lines
    # per graph that a user would read as errors): quiet for this call only, the level restored after
    ir_log = logging.getLogger("onnx_ir")
    level = ir_log.level
    ir_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, optimize=False, verbose=False, dynamic_shapes=dynamic_shapes,
                custom_translation_table=_onnx_translations(), input_names=input_names,
            )  # fmt: skip
    finally:
        ir_log.setLevel(level)
    return program.model_proto


def _run_onnx(path: str, images: torch.Tensor):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the constant folder's notes on CastLike are not news
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]


# ---------------------------------------------------------------------------------------------- entry point
def export(
    model: APTViT,
    path: Union[str, Path],
    image_size: Union[int, Tuple[int, int], None] = None,
    budget: Union[int, float, None] = None,
    format: str = "onnx",
    pre_logits: bool = False,
    dense: bool = False,
    check: bool = True,
) -> Path:
    """Write the static ``apt(x)`` of ``model`` as one graph: normalised pixels in, logits out, layout inside.

    Args:
        model: a converted model with a token budget (``convert(vit, budget=0.5)``); it is not changed (a static
            copy on the CPU is exported).
        path: the file to write (written to a temporary name, checked, then renamed).
        image_size: (H, W) or a side, multiples of the patch size (default: the model's own input size).
        budget: a token budget instead of the model's (a fraction of the base tokens, or a count).
        format: "onnx" (ONNX Runtime, TensorRT, OpenVINO) or "torch" (``torch.export.save``).
        pre_logits: output the pooled features (B, D) instead of the logits (a model without a head, e.g. a DINOv2
            or CLIP tower, always outputs them, named "pre_logits").
        dense: add the final features on the base grid (B, D, H/p, W/p) as a second output.
        check: run the written graph on real photos against the PyTorch static forward (ONNX Runtime on the CPU,
            or the loaded ExportedProgram) and refuse a difference over ``CHECK_TOLERANCE``.

    Returns:
        The path written.

    Raises:
        InputError / UserTypeError: a model or setting that cannot be exported (before any work).
        MissingDependency: onnxruntime / onnxscript missing for "onnx".
        ExportCheckError: the graph does not reproduce the PyTorch forward (nothing written).
    """
    config, size, k = check_exportable(model, image_size, budget, format)
    path = check_writable(path)
    pre_logits = pre_logits or not model.num_classes  # no head: what comes out is the pooled features
    start = time.perf_counter()
    apt = _static_copy(model, config, size)
    graph = StaticForward(apt, pre_logits=pre_logits, dense=dense).eval()
    meta = metadata(apt, size, k, pre_logits, dense)
    outputs = json.loads(meta["outputs"])
    channels = apt.patch_embed.proj.in_channels
    photos = check_photos(apt, size) if check else None
    with torch.no_grad():
        reference = graph(photos) if check else None
    example = torch.zeros(1, channels, *size)

    if format == "onnx":
        import onnx

        model_proto = _onnx_staged(apt, pre_logits, dense, example, outputs)
        model_proto.metadata_props.extend(onnx.StringStringEntryProto(key=k_, value=v) for k_, v in meta.items())

        def write(tmp: str) -> None:
            onnx.save(model_proto, tmp)
            if check:
                err = _compare(_run_onnx(tmp, photos), reference, "ONNX Runtime, CPU")
                logger.info(f"checked: ONNX Runtime equals the PyTorch static forward within {err:.1e} of its scale")

    else:
        from .export_graph import ScannedStaged, staged

        parts = staged(apt, pre_logits, dense, example)[0]
        with torch.no_grad():  # (a scan under autograd would trace its backward too, and fails to)
            program = torch.export.export(
                ScannedStaged(parts.embed, parts.blocks, parts.head, parts.n_context),
                (example.expand(2, -1, -1, -1).contiguous(),),
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1 << 16)}}, strict=False,
            )  # fmt: skip

        def write(tmp: str) -> None:
            # through file objects: torch warns of a file name that does not end in .pt2 (the temporary's)
            with open(tmp, "wb") as f:
                torch.export.save(program, f, extra_files={"aptvit.json": json.dumps(meta)})
            if check:
                with open(tmp, "rb") as f:
                    loaded = torch.export.load(f).module()
                with torch.no_grad():
                    got = loaded(photos)
                err = _compare(got if isinstance(got, tuple) else (got,), reference, "torch.export program")
                logger.info(f"checked: the ExportedProgram equals the PyTorch static forward within {err:.1e}")

    atomic_write(path, write)
    logger.info(
        f"exported {meta['architecture']} at {size[0]}x{size[1]}, {k} tokens per image ({format}, outputs "
        f"{', '.join(outputs)}) to {path} in {time.perf_counter() - start:.0f} s"
    )
    return path


def read_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The metadata an exported ONNX file carries (``metadata_props``), as strings."""
    import onnx

    from .core.io import reading

    with reading(path, "ONNX file"):
        model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def export_command(
    model: Optional[str],
    out: Union[str, Path],
    pretrained: bool = False,
    checkpoint: Optional[str] = None,
    layout: Optional[dict] = None,
    size: Optional[int] = None,
    attention: str = "auto",
    format: str = "onnx",
    pre_logits: bool = False,
    dense: bool = False,
    check: bool = True,
) -> Path:
    """``aptvit export``: build the model (timm weights or an aptvit checkpoint, the command line's settings on top),
    refuse what cannot be exported before loading any weights, then ``export``."""
    from .models import build_models, conversion_settings, is_aptvit_checkpoint

    layout = dict(layout or {})
    if layout.get("thresholds") is not None:
        raise InputError("export needs a token budget (a fixed k tokens per image), not --thresholds: pass --budget 0.5")
    if format not in FORMATS:
        raise InputError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if _export_backend(attention) is None:
        raise InputError(f"--attention {attention} cannot be exported: pass --attention {_export_backend('auto')} (or auto)")
    if format == "onnx":
        _require("onnxruntime")
        _require("onnxscript")
    aptvit_file = bool(checkpoint) and is_aptvit_checkpoint(checkpoint)
    settings = conversion_settings(checkpoint if aptvit_file else None, **layout)
    if settings.budget is None:
        raise InputError(
            "export needs a token budget (a fixed k tokens per image), not thresholds: pass --budget 0.5 "
            "(a fraction of the base tokens, or a count)"
        )
    check_writable(out)
    apt, _ = build_models(model, pretrained, checkpoint, layout=layout, attention=attention)
    return export(apt, out, image_size=size, format=format, pre_logits=pre_logits, dense=dense, check=check)
