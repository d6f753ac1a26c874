"""What a GPU pays for, checked on the CPU: host syncs, data-dependent shapes, op counts, compilability,
the padded (CUDA-graph) plan, and how "auto" picks an attention backend on CUDA."""

import pytest
import torch

import aptvit
from aptvit.nn import attention
from aptvit.nn.attention import environment, loop
from aptvit.nn.attention import varlen as varlen_backend
from aptvit.nn.graphs import CUDAGraphRunner

from ..dispatch import OpCounter
from ..tiny import FAMILIES, rel_err, tiny_vit


def _batch(model, b, seed=0):
    """Normalised images with plain regions (so that every size is used) and busy ones."""
    p = model.patch_embed.patch_size[0]
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, 8 * p, 8 * p, generator=g)
    img[:, :, : 4 * p, : 4 * p] = 0.5  # a 4p x 4p plain block
    img[::2, :, 4 * p :, :] = 0.25  # every other image: its bottom half plain too
    return (img - 0.5) / 0.5


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("b", [1, 16])
def test_forward_packed_has_no_data_dependent_op(family, b):
    model = tiny_vit(family)
    apt = aptvit.convert(
        model, thresholds={2 * model.patch_embed.patch_size[0]: 6.0, 4 * model.patch_embed.patch_size[0]: 5.0}
    )
    x = _batch(model, b)
    with torch.no_grad():
        layout = apt.make_layout(x)
        assert (layout.size > layout.base_size).any() and len(set(layout.num_tokens.tolist())) > (b > 1)
        packed = apt.prepare(x, layout)
        with OpCounter() as inside:
            apt.forward_packed(x, packed)
        with OpCounter() as whole:
            apt(x, layout=layout)
    assert inside.data_dependent == [], inside.data_dependent
    assert len(whole.data_dependent) <= 1, whole.data_dependent


@pytest.mark.parametrize("family", ["vit_cls", "vit_avg_no_cls"])
def test_op_count_at_batch_one_is_close_to_timm(family):
    """apt(x, layout=...) dispatches at most 1.3x the aten ops of timm's forward on one image.

    Depth 12, as every timm ViT the issue lists: the plan and the embedding bank are a fixed cost per forward
    (~100 ops), the blocks cost the same per layer (28 ops against timm's 27). At depth 2 the ratio is ~2.1.
    """
    model = tiny_vit(family, depth=12)
    apt = aptvit.convert(model)
    x = _batch(model, 1)
    with torch.no_grad():
        layout = apt.make_layout(x)
        apt(x, layout=layout)  # the first call fills the position cache, as in any serving loop
        with OpCounter() as ours:
            apt(x, layout=layout)
        with OpCounter() as theirs:
            model(x)
    assert ours.total <= 1.3 * theirs.total, (ours.total, theirs.total)


def test_a_planned_batch_is_reused_without_host_work():
    apt = aptvit.convert(tiny_vit("qknorm_layerscale"), thresholds={32: 6.0, 64: 5.0})
    x = _batch(apt, 3)
    with torch.no_grad():
        packed = apt.prepare(x)
        assert packed.offsets == tuple(packed.cu_seqlens.tolist()) and packed.total == packed.seq.shape[0]
        assert torch.equal(apt.forward_packed(x, packed), apt(x, layout=packed.layout))
        moved = packed.to("cpu", non_blocking=True)
        assert torch.equal(apt.forward_packed(x, moved), apt.forward_packed(x, packed))


@pytest.mark.slow
def test_forward_packed_compiles_with_fullgraph_and_dynamic_shapes():
    """No graph break, dynamic shapes: the math is capturable. aot_eager traces exactly what inductor would get
    (dynamo + AOT autograd) without its C++ code generation, which takes minutes on 2 CPU cores."""
    torch._dynamo.reset()
    model = tiny_vit("vit_cls", depth=1)
    apt = aptvit.convert(model, thresholds={32: 6.0, 64: 5.0}, attention="pad")
    x = _batch(model, 2)
    with torch.no_grad():
        packed = apt.prepare(x)
        compiled = torch.compile(apt.forward_packed, fullgraph=True, dynamic=True, backend="aot_eager")
        assert rel_err(compiled(x, packed), apt.forward_packed(x, packed)) <= 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["vit_cls", "vit_avg_no_cls", "qknorm_layerscale"])
@pytest.mark.parametrize("backend", ["loop", "pad"])
def test_bucketed_padded_forward_equals_the_plain_one(family, backend):
    model = tiny_vit(family)
    apt = aptvit.convert(model, thresholds={32: 6.0, 64: 5.0}, attention=backend).eval()
    x = _batch(model, 3)
    runner = CUDAGraphRunner(apt, bucket=64)
    with torch.no_grad():
        layout = apt.make_layout(x)
        packed = runner.plan(x, layout)
        assert packed.pad > 0 and packed.total % 64 == 0 and packed.num_seqs == 4  # the padding is a sequence
        assert packed.max_seqlen == runner.max_seqlen(x) > max(packed.layout.num_tokens.tolist())
        assert rel_err(runner(x, layout), apt(x, layout=layout)) <= 1e-5


def test_flex_backend_agrees_with_the_loop():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 12, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, 2, 8) for _ in range(3))
    ref = attention.varlen_attention(q, k, v, cu, 18, "loop")
    with pytest.warns(UserWarning):  # eager flex materialises the scores on the CPU (fine for a check)
        out = attention.varlen_attention(q, k, v, cu, 18, "flex")
    assert rel_err(out, ref) <= 1e-5
    for i in range(3):  # and sequences never see each other
        lo, hi = int(cu[i]), int(cu[i + 1])
        alone = torch.nn.functional.scaled_dot_product_attention(*(t[lo:hi].transpose(0, 1) for t in (q, k, v)))
        assert rel_err(out[lo:hi], alone.transpose(0, 1)) <= 1e-5


@pytest.mark.parametrize(
    "flash, varlen, flex, dtype, dropout, want",
    [
        (True, True, True, torch.bfloat16, False, "flash"),
        (False, True, True, torch.bfloat16, False, "varlen"),
        (False, False, True, torch.bfloat16, False, "flex"),
        (True, True, True, torch.float32, False, "pad"),  # fp32 inference on CUDA: padding, not flex (issue 16.2)
        (False, False, False, torch.float32, False, "pad"),
        (True, True, True, torch.bfloat16, True, "flash"),  # attention dropout: flash has it
        (False, True, True, torch.bfloat16, True, "pad"),  # varlen and flex have no dropout
    ],
)
def test_auto_backend_order_on_cuda(monkeypatch, flash, varlen, flex, dtype, dropout, want):
    monkeypatch.setattr(environment, "has_sm80", lambda device: True)
    monkeypatch.setattr(environment, "has_flash_attn", lambda: flash)
    monkeypatch.setattr(environment, "has_torch_varlen", lambda: varlen)
    monkeypatch.setattr(environment, "has_flex", lambda: flex)
    assert attention.resolve_backend("auto", torch.device("cuda"), dtype, dropout) == want
    assert attention.resolve_backend("auto", torch.device("cpu"), dtype, dropout) == "loop"


@pytest.mark.parametrize("has_backward, want", [(True, "varlen"), (False, "flex")])
def test_auto_training_skips_a_varlen_without_backward(monkeypatch, has_backward, want):
    """The first torch versions with ``varlen_attn`` had no backward: training must not pick it."""
    monkeypatch.setattr(environment, "has_sm80", lambda device: True)
    monkeypatch.setattr(environment, "has_flash_attn", lambda: False)
    monkeypatch.setattr(environment, "has_torch_varlen", lambda: True)
    monkeypatch.setattr(environment, "has_flex", lambda: True)
    monkeypatch.setattr(environment, "varlen_has_backward", lambda: has_backward)
    cuda = torch.device("cuda")
    assert attention.resolve_backend("auto", cuda, torch.bfloat16, grad=False) == "varlen"
    assert attention.resolve_backend("auto", cuda, torch.bfloat16, grad=True) == want


def test_varlen_without_a_scale_argument_folds_the_scale_into_q(monkeypatch):
    """torch 2.9's ``varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)`` has a fixed scale head_dim ** -0.5."""
    import torch.nn.attention.varlen as varlen

    def fixed_scale_varlen(q, k, v, cu_q, cu_k, max_q, max_k):  # the 2.9 signature, computed with the loop
        return loop.loop_attention(q, k, v, cu_q, max_q, 0.0, None, None, None, None)

    monkeypatch.setattr(varlen, "varlen_attn", fixed_scale_varlen)
    monkeypatch.setattr(environment, "varlen_takes_scale", lambda: False)
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    out = varlen_backend.torch_varlen_attention(q, k, v, cu, 7, 0.0, 0.1, None, None, None)
    ref = attention.varlen_attention(q, k, v, cu, 7, "loop", scale=0.1)
    assert rel_err(out, ref) <= 1e-5


def test_forward_head_takes_timms_pre_logits_position():
    apt = aptvit.convert(tiny_vit("vit_avg_no_cls"), thresholds={32: 6.0})
    x = _batch(apt, 2)
    with torch.no_grad():
        features = apt.forward_features(x)  # carries its plan: the model keeps none (issue 18)
        tokens, layout = features
        pooled = apt.forward_head(features, True)  # timm's forward_head(x, pre_logits)
        assert pooled.shape == (2, apt.embed_dim)
        assert torch.equal(apt.head(pooled), apt.forward_head(features))
        assert rel_err(apt.forward_head(features), apt(x, layout=layout)) <= 1e-6
        assert torch.equal(apt.forward_head(tokens, packed=features.packed), apt.forward_head(features))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_the_plain_forward():
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 6.0, 64: 5.0}).eval().cuda()
    runner = CUDAGraphRunner(apt, bucket=64)
    with torch.no_grad():
        for seed in range(3):  # the first call captures, the others replay with new images and layouts
            x = _batch(apt, 2, seed).cuda()
            assert rel_err(runner(x), apt(x)) <= 1e-5


def test_packing_helpers_with_a_known_length_do_not_wait_for_the_device():
    """Off the planned path too (a direct ``varlen_attention`` call, ``pad_packed``), the token count is the
    tensor's length, so ``repeat_interleave`` needs no read-back of ``cu_seqlens``."""
    from aptvit.core.packing import insert_prefix, pad_packed, seq_index

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q = torch.randn(7, 2, 4)
    with OpCounter() as ops:
        seq = seq_index(cu, 7)
        pad_packed(q, cu, 4)
        insert_prefix(q.flatten(1), torch.zeros(2, 1, 8), cu)
        attention.varlen_attention(q, q, q, cu, 4, "pad")
    assert ops.data_dependent == []
    assert seq.tolist() == [0, 0, 0, 1, 1, 1, 1]
