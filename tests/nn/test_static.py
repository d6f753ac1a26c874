"""The fully static path (``APTConfig.static``): k slots per image, layout and plan on the device, no host read."""

import dataclasses

import pytest
import torch

import aptvit
from aptvit.nn.config import APTConfig

from ..dispatch import HostReads, OpCounter
from ..tiny import FAMILIES, rel_err, tiny_vit


def _batch(p, b, seed=0):
    """Normalised images where every image needs a different number of tokens (plain and busy regions)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, 8 * p, 8 * p, generator=g)
    img[:, :, : 4 * p, : 4 * p] = 0.5
    img[::2, :, 4 * p :, :] = 0.25
    img[1::4, :, :, 4 * p :] = 0.75
    return (img - 0.5) / 0.5


def _pair(family="vit_cls", budget=0.5, **kw):
    """The same weights as a dynamic and as a static model."""
    model = tiny_vit(family, **kw)
    return aptvit.convert(model, budget=budget), aptvit.convert(model, budget=budget, static=True)


@pytest.mark.parametrize("b", [1, 16])
def test_static_forward_reads_nothing_back_and_has_no_data_dependent_op(b):
    dynamic, static = _pair()
    x = _batch(16, b)
    with torch.no_grad():
        static(x)  # fills the caches (positions, pixel statistics), as in any serving loop
        with OpCounter() as ops, HostReads() as reads:
            static(x)
        with HostReads() as dynamic_reads:
            dynamic(x)
    assert ops.data_dependent == [] and ops.host_reads == 0, ops.data_dependent
    assert reads.reads == [], reads.reads
    assert dynamic_reads.reads, "the counter must see the dynamic path's one read of the token counts"


@pytest.mark.slow
def test_static_forward_compiles_whole_with_fullgraph():
    """Layout included: one graph, no break (aot_eager traces what inductor would get, without codegen)."""
    torch._dynamo.reset()
    _, static = _pair(depth=1)
    x = _batch(8, 2)  # 64 px: small and fast
    with torch.no_grad():
        compiled = torch.compile(static, fullgraph=True, backend="aot_eager")
        assert rel_err(compiled(x), static(x)) <= 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_forward_equals_the_dynamic_one_per_image(family):
    """Same budget, same layout per image: padding changes nothing (logits and pre-logits)."""
    dynamic, static = _pair(family)
    p = dynamic.patch_size
    x = _batch(p, 4)
    with torch.no_grad():
        layout = dynamic.make_layout(x)
        assert len(set(layout.token_counts)) > 1 and min(layout.token_counts) < static.static_tokens((8 * p, 8 * p))
        want = dynamic(x, layout=layout)
        assert rel_err(static(x), want) <= 1e-5
        assert rel_err(static(x, layout=layout), want) <= 1e-5  # a layout from elsewhere is padded to k slots
        packed = static.prepare(x)
        assert rel_err(static.forward_packed(x, packed, pre_logits=True), dynamic.forward_packed(
            x, dynamic.prepare(x, layout), pre_logits=True)) <= 1e-5  # fmt: skip


def test_static_with_area_bias_equals_the_dynamic_one():
    """The static plan biases real keys by their log area like ``plan_packed`` (padding: 0, and unseen)."""
    model = tiny_vit("vit_cls")
    dynamic = aptvit.convert(model, budget=0.5, area_bias=True)
    static = aptvit.convert(model, budget=0.5, area_bias=True, static=True)
    x = _batch(16, 3)
    with torch.no_grad():
        packed, layout = static.prepare(x), dynamic.make_layout(x)
        plain = dynamic.prepare(x, layout)
        assert torch.equal(packed.key_bias[packed.patch_pos][packed.layout.size > 0], plain.key_bias[plain.patch_pos])
        assert rel_err(static(x), dynamic(x, layout=layout)) <= 1e-5


def test_static_dense_features_equal_the_dynamic_ones():
    dynamic, static = _pair("vit_avg_no_cls")
    x = _batch(16, 3)
    with torch.no_grad():
        assert rel_err(static.forward_dense(x), dynamic.forward_dense(x)) <= 1e-5


def test_an_images_output_does_not_depend_on_its_batch():
    _, static = _pair("qknorm_layerscale")
    x = _batch(16, 6)
    with torch.no_grad():
        together = static(x)
        for i in range(6):
            assert rel_err(static(x[i : i + 1]), together[i : i + 1]) <= 1e-5
        others = torch.cat([x[:1], _batch(16, 3, seed=5)])
        assert rel_err(static(others)[0], together[0]) <= 1e-5


def test_every_image_gets_exactly_k_slots_and_padding_is_inert():
    _, static = _pair("qknorm_layerscale")  # prefix tokens, registers and avgmax pooling
    x = _batch(16, 4)
    k, P = static.static_tokens((128, 128)), static.num_prefix_tokens
    with torch.no_grad():
        packed = static.prepare(x)
        layout = packed.layout
        assert layout.token_counts == (k,) * 4 and packed.total == 4 * (P + k) and packed.max_seqlen == P + k
        pad = (layout.size == 0).view(4, k)
        assert pad.any() and not pad.all(1).any()
        assert not pad.view(-1)[layout.cells].any()  # no cell is covered by padding
        rows = packed.patch_pos[pad.view(-1)]
        assert (packed.pool_weight[rows] == 0).all() and (packed.pool_seq[rows] == packed.num_seqs).all()
        # whatever the padding rows hold, no real token sees them: point them at real tokens' bank rows
        want = static.forward_packed(x, packed)
        poked = packed.token_src.clone()
        poked[rows] = packed.token_src[packed.patch_pos[~pad.view(-1)]][: rows.numel()]
        got = static.forward_packed(x, dataclasses.replace(packed, token_src=poked))
        assert rel_err(got, want) <= 1e-6


def test_shapes_depend_only_on_batch_size_image_size_and_k():
    _, static = _pair()
    with torch.no_grad():
        x = _batch(16, 3)
        a, b = static.prepare(x), static.prepare(x.roll(1, 0))  # other images in every slot
    assert not torch.equal(a.layout.size, b.layout.size)
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, torch.Tensor):
            assert va.shape == vb.shape and va.dtype == vb.dtype, f.name
    assert (a.max_seqlen, a.num_seqs, a.offsets, a.static) == (b.max_seqlen, b.num_seqs, None, True)


def test_static_needs_a_budget_with_clear_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="static=True needs a token budget"):
        APTConfig(static=True)
    with pytest.raises(ValueError, match="static=True needs a token budget"):
        aptvit.convert(model, static=True)
    with pytest.raises(ValueError, match="static=True needs a token budget"):
        aptvit.convert(model, thresholds={32: 5.0}).configure(static=True)
    with pytest.raises(ValueError, match="static=True needs a token budget"):
        aptvit.convert(model, budget=0.5, static=True).configure(thresholds={32: 5.0})
    with pytest.raises(TypeError, match="static must be True or False"):
        APTConfig(budget=0.5, static="yes")
    static = aptvit.convert(model, budget=0.5, static=True)
    with pytest.raises(ValueError, match="same-size images"):
        static([torch.zeros(3, 64, 64), torch.zeros(3, 32, 64)])
    with pytest.raises(ValueError, match="attention 'loop' reads the sequence offsets on the host"):
        static.configure(attention="loop")(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="budget of 1 tokens is below"):
        aptvit.convert(model, budget=1, static=True)(torch.zeros(1, 3, 128, 128))


def test_static_is_saved_with_the_weights(tmp_path):
    _, static = _pair()
    aptvit.save(static, tmp_path / "m.safetensors")
    loaded = aptvit.load(tmp_path / "m.safetensors")
    assert loaded.config.static is True and loaded.config.budget == 0.5
    old = {k: v for k, v in static.config.to_dict().items() if k != "static"}  # a checkpoint from before
    assert APTConfig.from_dict(old).static is False
    assert "static" not in static.config.layout_kwargs()  # patch_layout's arguments only
    assert aptvit.convert(tiny_vit(), budget=0.5).configure(static=True).config.static
