"""``aptvit.export_graph``: the static forward in three parts (embedding per image, blocks on the batch, head per
image), composed in PyTorch, equals the static forward for every exportable family."""

import pytest
import torch

import aptvit
from aptvit import export_graph
from aptvit.core.packed import PackedBatch

from .tiny import FAMILIES, FAMILY_OF, rel_err, tiny_vit

ex = __import__("importlib").import_module("aptvit.export")
EXPORTABLE = sorted(n for n in FAMILIES if FAMILY_OF[n] in ex.EXPORT_FAMILIES)


@pytest.mark.parametrize("family", EXPORTABLE)
def test_the_three_parts_equal_the_static_forward(family):
    """Covers every context the families build (area-bias mask, RoPE tables, per-block mixed RoPE tables, prefix and
    register tokens, attention pools) and the dense output."""
    apt = aptvit.convert(tiny_vit(family), budget=0.5)
    side = 8 * apt.patch_size
    static = ex._static_copy(apt, apt.config.replace(static=True))
    photos = ex.check_photos(static, (side, side))
    parts, blocks_in, head_in = export_graph.staged(static, False, True, torch.zeros(1, 3, side, side))
    with torch.no_grad():
        want = ex.StaticForward(static, False, True)(photos)
        got = parts(photos)
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5
    assert blocks_in[0].shape[:2] == (2, static.num_prefix_tokens + static.static_tokens((side, side)))


def test_tensors_round_trip_through_a_plan():
    apt = aptvit.convert(tiny_vit("vit_cls"), budget=0.5, static=True)
    with torch.no_grad():
        packed = apt.prepare(torch.zeros(2, 3, 64, 64))
    tensors = export_graph.tensors_of(packed)
    assert len(tensors) > 10 and any(t is packed.layout.size for t in tensors)  # the layout's tensors too
    new = export_graph.with_tensors(packed, [t + 1 if t.is_floating_point() else t for t in tensors])
    assert isinstance(new, PackedBatch) and new.layout.image_sizes == packed.layout.image_sizes
    assert torch.equal(new.key_bias, packed.key_bias + 1) and new.layout.size is packed.layout.size
    with pytest.raises(RuntimeError, match="more tensors"):
        export_graph.with_tensors(packed, [*tensors, tensors[0]])


def test_batch_axes_finds_the_axis_that_grows_and_refuses_none():
    one = [torch.zeros(5, 3), torch.zeros(1, 1, 5), torch.zeros(4, 5, 2), torch.zeros(7)]
    two = [torch.zeros(10, 3), torch.zeros(2, 1, 5), torch.zeros(4, 10, 2), torch.zeros(7)]
    assert export_graph.batch_axes(one, two) == [0, 0, 1, None]
    with pytest.raises(RuntimeError, match="no batch axis"):
        export_graph.batch_axes([torch.zeros(2, 2)], [torch.zeros(4, 4)])
