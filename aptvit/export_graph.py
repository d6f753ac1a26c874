"""The ONNX graph of a static APT model: the layout image by image, the transformer on the whole batch.

The static plan's host structures (``PatchLayout.image_sizes``, the size groups) are Python tuples as long as the
batch, so a trace of the static forward specialises the batch size. Only the layout needs them, though: once an
image is planned, its L = P + k rows are its own block of the packed tensor (``core.static.plan_static``), and every
block of the transformer either works row by row or attends inside that block (a backend whose static-plan form
is ``traceable``, e.g. ``pad``'s ``FixedRows``). So the graph has three parts, each traced from the model's own code:

* ``Embed`` (one image; an ONNX ``Scan`` over the batch): layout, plan, embedding, the blocks' shared context (the
  attention mask, RoPE tables) and the plan's tensors;
* ``Blocks`` (the whole batch, a dynamic batch axis): every block on the (B * L, D) packed rows, then the final norm:
  one matmul per layer for the batch, as in timm's own export;
* ``Head`` (one image; a second ``Scan``): pooling and head (and the dense grid) with that image's plan.

What crosses from one part to the next is the list of tensors of the context and the plan (``tensors_of``), in a
fixed order, put back into the objects the model's code expects (``with_tensors``). Each context tensor is stacked
along the axis on which a batch's tensor concatenates its images' (found by planning one and two images:
``batch_axes``), so ``Blocks`` sees the context of the whole batch.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .core.packed import PackedBatch
from .nn.attention import skip_noop

SEP = "/"  # the part's prefix on every name of its graph: "embed/...", "blocks/...", "head/..."; names made here
# have a ":" after it, which the exporter's names never have


# ---------------------------------------------------------------------------------------------- tensors of objects
def _walk(obj: Any, leaf: Tuple[type, ...], swap=None):
    """The tensors of ``obj`` in a fixed order (``swap`` None), or ``obj`` rebuilt with ``swap``'s tensors in that
    order: through dataclasses, named tuples, tuples, lists and dicts; instances of ``leaf`` are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return [obj] if swap is None else next(swap)
    if isinstance(obj, leaf) or obj is None or isinstance(obj, (bool, int, float, str, nn.Module)):
        return [] if swap is None else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj)]
        if swap is None:
            return [t for f in fields for t in _walk(getattr(obj, f), leaf)]
        new = copy.copy(obj)  # no __post_init__ again: the host facts are unchanged
        for f in fields:
            object.__setattr__(new, f, _walk(getattr(obj, f), leaf, swap))
        return new
    if isinstance(obj, (tuple, list)):
        if swap is None:
            return [t for v in obj for t in _walk(v, leaf)]
        items = [_walk(v, leaf, swap) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        if swap is None:
            return [t for v in obj.values() for t in _walk(v, leaf)]
        return {k: _walk(v, leaf, swap) for k, v in obj.items()}
    return [] if swap is None else obj  # anything else (a backend object, a dtype) is a host fact


def tensors_of(obj: Any, leaf: Tuple[type, ...] = ()) -> List[torch.Tensor]:
    """Every tensor held by ``obj`` (a plan, a block context), in a fixed order; ``leaf`` types are not entered."""
    return _walk(obj, leaf)


def with_tensors(obj: Any, tensors: Sequence[torch.Tensor], leaf: Tuple[type, ...] = ()) -> Any:
    """A copy of ``obj`` holding ``tensors`` where ``tensors_of(obj, leaf)`` found its own."""
    it = iter(tensors)
    new = _walk(obj, leaf, it)
    if next(it, None) is not None:
        raise RuntimeError("more tensors than the object holds")  # a bug in the caller, not bad user input
    return new


def batch_axes(one: Sequence[torch.Tensor], two: Sequence[torch.Tensor]) -> List[Optional[int]]:
    """For each tensor of a one-image plan, the axis along which the two-image plan's tensor concatenates its images'
    (the axis that doubles; None: the tensor does not depend on the batch)."""
    axes = []
    for a, b in zip(one, two):
        if a.shape == b.shape:
            axes.append(None)
            continue
        grow = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if n == 2 * m and m > 0]
        same = a.dim() == b.dim() and all(m == n for i, (m, n) in enumerate(zip(a.shape, b.shape)) if i not in grow)
        if len(grow) != 1 or not same:
            raise RuntimeError(
                f"a context tensor of shape {tuple(a.shape)} (two images: {tuple(b.shape)}) has no batch axis"
            )
        axes.append(grow[0])
    return axes


# ---------------------------------------------------------------------------------------------- the three parts
class Embed(nn.Module):
    """One image (1, C, H, W) -> (its packed input tokens (L, D), the blocks' context tensors, the plan's tensors)."""

    def __init__(self, apt) -> None:
        super().__init__()
        self.apt = apt

    def embed(self, images: torch.Tensor, packed: PackedBatch):
        """(packed input tokens, the blocks' shared context) of planned images, as ``APTViT._run_packed``."""
        apt = self.apt
        x = skip_noop(apt.norm_pre, skip_noop(apt.pos_drop, apt.embed_packed(images, packed)))
        return x, apt.block_context(x, packed)

    def parts(self, images: torch.Tensor):
        packed = self.apt.prepare(images)
        return (*self.embed(images, packed), packed)

    def forward(self, image: torch.Tensor):
        # the plan in this frame: a node's stack trace names its line (profilers tell the layout's nodes by it)
        packed = self.apt.prepare(image)  # static: layout and plan on the device, no host read
        x, ctx = self.embed(image, packed)
        return (x, *tensors_of(ctx, (PackedBatch,)), *tensors_of(packed))


class Blocks(nn.Module):
    """The blocks and the final norm on a batch: (x (B, L, D), each context tensor stacked over the images (B, ...))
    -> final tokens (B, L, D).

    Args:
        apt: the static model.
        context: a one-image ``BlockContext`` (its plan is kept as the host facts the blocks may read).
        axes: ``batch_axes`` of the context's tensors.
    """

    def __init__(self, apt, context, axes: Sequence[Optional[int]]) -> None:
        super().__init__()
        self.apt, self.context, self.axes = apt, context, list(axes)

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        rows, dim = x.shape[1], x.shape[2]
        tensors = [t[0] if a is None else t.movedim(0, a).flatten(a, a + 1) for t, a in zip(context, self.axes)]
        ctx = with_tensors(self.context, tensors, (PackedBatch,))
        x = x.flatten(0, 1)
        for blk in self.apt.blocks:
            x = self.apt._block(blk, x, ctx)
        return self.apt.norm(x).view(-1, rows, dim)


class Head(nn.Module):
    """One image's final tokens (L, D) and its plan's tensors -> logits (1, classes) or pre-logits (1, D) [, the
    dense grid (1, D, H/p, W/p)]."""

    def __init__(self, apt, packed: PackedBatch, pre_logits: bool, dense: bool) -> None:
        super().__init__()
        self.apt, self.packed, self.pre_logits, self.dense = apt, packed, pre_logits, dense

    def forward(self, x: torch.Tensor, *plan: torch.Tensor):
        from .nn.dense import SMOOTH_DEFAULT, unmerge_packed

        packed = with_tensors(self.packed, plan)
        out = self.apt.forward_head(x, pre_logits=self.pre_logits, packed=packed)
        return (out, unmerge_packed(x, packed, SMOOTH_DEFAULT)) if self.dense else out


class Staged(nn.Module):
    """The three parts as the exported graph runs them (``Embed`` and ``Head`` image by image), in PyTorch."""

    def __init__(self, embed: Embed, blocks: Blocks, head: Head, n_context: int) -> None:
        super().__init__()
        self.embed, self.blocks, self.head, self.n_context = embed, blocks, head, n_context

    def forward(self, images: torch.Tensor):
        per_image = [self.embed(images[i : i + 1]) for i in range(images.shape[0])]
        stacked = [torch.stack(ts) for ts in zip(*per_image)]
        x = self.blocks(*stacked[: 1 + self.n_context])
        outs = [self.head(x[i], *(t[i] for t in stacked[1 + self.n_context :])) for i in range(images.shape[0])]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(o) for o in zip(*outs))
        return torch.cat(outs)


class ScannedStaged(Staged):
    """``Staged`` with its two per-image loops as torch's ``scan``, so that ``torch.export`` keeps the batch axis
    dynamic (a Python loop over the images would unroll into the trace's batch size): the ``torch.export`` form
    of the ONNX graph's ``Scan`` -> blocks -> ``Scan``."""

    def forward(self, images: torch.Tensor):
        from torch._higher_order_ops.scan import scan

        def embed_step(carry, image):  # a scan's outputs may not alias its inputs or each other: fresh copies
            return carry.clone(), [t.clone() for t in self.embed(image.unsqueeze(0))]

        _, stacked = scan(embed_step, images.new_zeros(()), images)
        x = self.blocks(*stacked[: 1 + self.n_context])

        def head_step(carry, one):
            out = self.head(*one)
            return carry.clone(), tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)

        _, out = scan(head_step, images.new_zeros(()), [x, *stacked[1 + self.n_context :]])
        return out


def staged(apt, pre_logits: bool, dense: bool, example: torch.Tensor) -> Tuple[Staged, list, list]:
    """The three parts of ``apt``'s static forward for images shaped like ``example`` (1, C, H, W).

    Returns:
        (the ``Staged`` module, the example inputs of ``Blocks`` for two images, the example inputs of ``Head``).
    """
    embed = Embed(apt).eval()
    with torch.no_grad():
        two = example.expand(2, -1, -1, -1).contiguous()
        _, ctx1, packed1 = embed.parts(example)
        _, ctx2, _ = embed.parts(two)
        one_ctx = tensors_of(ctx1, (PackedBatch,))
        axes = batch_axes(one_ctx, tensors_of(ctx2, (PackedBatch,)))
        blocks = Blocks(apt, ctx1, axes).eval()
        head = Head(apt, packed1, pre_logits, dense).eval()
        out = [embed(two[i : i + 1]) for i in range(2)]
        stacked = [torch.stack(ts) for ts in zip(*out)]
        blocks_in = stacked[: 1 + len(one_ctx)]
        x = blocks(*blocks_in)
        head_in = [x[0], *(t[0] for t in stacked[1 + len(one_ctx) :])]
    return Staged(embed, blocks, head, len(one_ctx)).eval(), blocks_in, head_in


# ---------------------------------------------------------------------------------------------- the ONNX graph
def _prefixed(graph, prefix: str):
    """A copy of ``graph`` with ``prefix`` in front of every value and node name (subgraphs included), so that the
    three parts' names never meet."""
    import onnx

    graph = copy.deepcopy(graph)

    def rename(g: "onnx.GraphProto") -> None:
        for v in (*g.input, *g.output, *g.value_info, *g.initializer):
            v.name = prefix + v.name
        for s in g.sparse_initializer:
            s.values.name = prefix + s.values.name
        for node in g.node:
            node.input[:] = [prefix + n if n else n for n in node.input]
            node.output[:] = [prefix + n if n else n for n in node.output]
            node.name = prefix + node.name
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    rename(a.g)
                for sub in a.graphs:
                    rename(sub)

    rename(graph)
    return graph


def _plain_expands(graph) -> None:
    """``Expand(x, [])`` (the exporter's ``torch.full((), v)``: an empty shape constant) becomes ``Identity(x)``, in
    place, subgraphs included: the same tensor (an empty shape broadcasts to x's own), and OpenVINO's ONNX reader
    takes an empty shape constant for a scalar and refuses the Expand."""
    import onnx
    from onnx import numpy_helper

    empty = set()
    for node in graph.node:
        if node.op_type == "Constant" and any(
            a.name == "value" and numpy_helper.to_array(a.t).size == 0 for a in node.attribute
        ):
            empty.update(node.output)
        elif node.op_type == "Cast" and node.input[0] in empty:
            empty.update(node.output)
    empty.update(i.name for i in graph.initializer if numpy_helper.to_array(i).size == 0)
    for node in graph.node:
        if node.op_type == "Expand" and node.input[1] in empty:
            node.op_type = "Identity"
            del node.input[1:]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _plain_expands(a.g)


def all_nodes(graph):
    """Every node of an ONNX ``graph`` and of its subgraphs (the ``Scan`` bodies: the per-image parts), in order."""
    import onnx

    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


def _shape(value) -> List[int]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def staged_onnx(embed: "onnx.ModelProto", blocks: "onnx.ModelProto", head: "onnx.ModelProto", n_context: int,  # noqa: F821
                outputs: Sequence[str]) -> "onnx.ModelProto":  # noqa: F821  # fmt: skip
    """One model from the three parts' ONNX graphs: ``Scan`` (embed, image by image) -> blocks (the batch) ->
    ``Scan`` (head, image by image). Input "images" (N, C, H, W); one output per name in ``outputs``, N in front."""
    import onnx
    from onnx import helper

    T = onnx.TensorProto
    e, b, h = (
        _prefixed(embed.graph, "embed" + SEP),
        _prefixed(blocks.graph, "blocks" + SEP),
        _prefixed(head.graph, "head" + SEP),
    )
    axis0 = lambda name: helper.make_tensor(name, T.INT64, [1], [0])  # noqa: E731
    # ---- embed, one image per step: (C, H, W) -> (1, C, H, W) -> its tensors, stacked by the Scan
    (inp,) = e.input
    item = helper.make_tensor_value_info("embed" + SEP + ":image", T.FLOAT, _shape(inp)[1:])
    # each output through an Identity of its own name: the same tensor may be in the context and in the plan
    outs = [helper.make_tensor_value_info(f"embed{SEP}:out{i}", o.type.tensor_type.elem_type, _shape(o))
            for i, o in enumerate(e.output)]  # fmt: skip
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", [item.name, "embed" + SEP + ":axis0"], [inp.name]), *e.node,
         *(helper.make_node("Identity", [o.name], [v.name]) for o, v in zip(e.output, outs))],
        "aptvit_embed", [item], outs, initializer=[axis0("embed" + SEP + ":axis0"), *e.initializer],
        value_info=list(e.value_info),
    )  # fmt: skip
    per_image = [f"stacked{SEP}:{i}" for i in range(len(outs))]
    scan_embed = helper.make_node("Scan", ["images"], per_image, body=body, num_scan_inputs=1, name="aptvit_embed")
    # ---- the blocks on the batch: their inputs are the stacked tokens and context
    if len(b.input) != 1 + n_context:
        raise RuntimeError(f"the blocks' graph takes {len(b.input)} inputs, expected {1 + n_context}")
    feed = {i.name: s for i, s in zip(b.input, per_image)}
    block_nodes = []
    for node in b.node:
        node = copy.copy(node)
        node.input[:] = [feed.get(n, n) for n in node.input]
        block_nodes.append(node)
    (tokens,) = b.output
    # ---- the head, one image per step: its final tokens and its plan's tensors
    plan = per_image[1 + n_context :]
    if len(h.input) != 1 + len(plan):
        raise RuntimeError(f"the head's graph takes {len(h.input)} inputs, expected {1 + len(plan)}")
    squeezed, body_out, outer_out = [], [], []
    for out, name in zip(h.output, outputs):
        shape = _shape(out)
        squeezed.append(helper.make_node("Squeeze", [out.name, "head" + SEP + ":axis0"], ["head" + SEP + ":" + name]))
        body_out.append(
            helper.make_tensor_value_info("head" + SEP + ":" + name, out.type.tensor_type.elem_type, shape[1:])
        )
        outer_out.append(helper.make_tensor_value_info(name, out.type.tensor_type.elem_type, ["batch", *shape[1:]]))
    body = helper.make_graph(
        [*h.node, *squeezed], "aptvit_head", list(h.input), body_out,
        initializer=[axis0("head" + SEP + ":axis0"), *h.initializer], value_info=list(h.value_info),
    )  # fmt: skip
    scan_head = helper.make_node("Scan", [tokens.name, *plan], list(outputs), body=body, num_scan_inputs=1 + len(plan),
                                 name="aptvit_head")  # fmt: skip
    images = helper.make_tensor_value_info("images", T.FLOAT, ["batch", *_shape(inp)[1:]])
    graph = helper.make_graph(
        [scan_embed, *block_nodes, scan_head], "aptvit", [images], outer_out,
        initializer=list(b.initializer), value_info=list(b.value_info),
    )  # fmt: skip
    opsets = {}
    for m in (embed, blocks, head):
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    functions = {}
    for m in (embed, blocks, head):
        for f in m.functions:
            functions.setdefault((f.domain, f.name, getattr(f, "overload", "")), f)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], producer_name="aptvit",
        functions=list(functions.values()),
    )  # fmt: skip
    model.ir_version = max(m.ir_version for m in (embed, blocks, head))
    _plain_expands(model.graph)
    return model
