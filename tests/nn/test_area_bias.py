"""Area-proportional attention (``APTConfig.area_bias``): every key's logit gets + log(base cells it covers).

Checked against brute force (explicit additive bias; a key repeated once per cell it covers), on every backend
that runs here (loop, pad, eager flex) and, for the kernels without a bias argument (flash, varlen), through a CPU
emulation of the extra-head-dimension construction (``key_bias_columns``)."""

import json
import math
import sys
import types

import pytest
import torch

import aptvit
from aptvit.core.packed import plan_packed
from aptvit.nn import attention
from aptvit.nn.attention import environment, flash
from aptvit.nn.attention import varlen as varlen_backend
from aptvit.nn.checkpoint import read_metadata
from aptvit.nn.config import APTConfig

from ..dispatch import OpCounter
from ..tiny import FAMILIES, rel_err, tiny_vit

CU = torch.tensor([0, 5, 12, 30], dtype=torch.int32)


@pytest.fixture(autouse=True)
def _leave_torchs_warn_once_state(monkeypatch):
    """torch warns once per process about eager flex; these tests must not use up a warning others check for."""
    import torch.nn.attention.flex_attention as flex

    if hasattr(flex, "_WARNINGS_SHOWN"):
        monkeypatch.setattr(flex, "_WARNINGS_SHOWN", set(flex._WARNINGS_SHOWN))


def reference(q, k, v, cu, scale, bias):
    """softmax(scale * q k^T + bias[key]) v per sequence, written out (float64)."""
    q, k, v, bias = q.double(), k.double(), v.double(), bias.double()
    out = torch.empty_like(v)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = scale * torch.einsum("qhd,khd->hqk", q[lo:hi], k[lo:hi]) + bias[lo:hi]  # bias broadcasts over keys
        out[lo:hi] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[lo:hi])
    return out


def _qkv_bias(n=30, heads=2, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, heads, hd, generator=g) for _ in range(3))
    areas = torch.tensor([1, 4, 16])[torch.randint(0, 3, (n,), generator=g)]
    return q, k, v, areas.float().log()


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager flex on the CPU materialises scores
@pytest.mark.parametrize("backend", ["loop", "pad", "flex"])
def test_every_backend_adds_the_bias_to_the_keys(backend):
    q, k, v, bias = _qkv_bias()
    scale = 0.3
    out = attention.varlen_attention(q, k, v, CU, 18, backend, scale=scale, key_bias=bias)
    assert rel_err(out, reference(q, k, v, CU, scale, bias).float()) <= 1e-5
    plain = attention.varlen_attention(q, k, v, CU, 18, backend, scale=scale)
    assert rel_err(plain, out) > 1e-2  # the bias matters at this scale
    # a bias that is the same for every key of a sequence changes nothing (softmax shift): it is per key
    shifted = attention.varlen_attention(q, k, v, CU, 18, backend, scale=scale, key_bias=bias + 3.0)
    assert rel_err(shifted, out) <= 1e-5


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("backend", ["loop", "pad", "flex"])
def test_a_key_of_area_a_weighs_as_much_as_a_copies_of_it(backend):
    """ToMe's property: log(area) on a key is the same as that key repeated once per base cell it covers."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(6, 2, 8, generator=g) for _ in range(3))
    areas = [1, 4, 1, 16, 1, 4]
    cu = torch.tensor([0, 6], dtype=torch.int32)
    out = attention.varlen_attention(q, k, v, cu, 6, backend, key_bias=torch.tensor(areas, dtype=torch.float32).log())
    rep = torch.repeat_interleave(torch.arange(6), torch.tensor(areas))
    for i in range(6):  # query i against the repeated keys
        ki, vi = k[rep].transpose(0, 1)[None], v[rep].transpose(0, 1)[None]
        want = torch.nn.functional.scaled_dot_product_attention(q[i : i + 1].transpose(0, 1)[None], ki, vi)
        assert rel_err(out[i], want[0, :, 0]) <= 1e-5


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("backend", ["loop", "pad", "flex"])
def test_sequences_stay_isolated_with_a_bias(backend):
    q, k, v, bias = _qkv_bias()
    out = attention.varlen_attention(q, k, v, CU, 18, backend, key_bias=bias)
    q2, k2, v2, bias2 = q.clone(), k.clone(), v.clone(), bias.clone()
    k2[12:], v2[12:], bias2[12:] = 7.0, -3.0, 5.0  # change only the last sequence
    out2 = attention.varlen_attention(q2, k2, v2, CU, 18, backend, key_bias=bias2)
    assert torch.equal(out[:12], out2[:12])


def test_a_bias_of_the_wrong_shape_is_refused():
    q, k, v, bias = _qkv_bias()
    with pytest.raises(ValueError, match="one value per token"):
        attention.varlen_attention(q, k, v, CU, 18, "loop", key_bias=bias[:-1])


# ---------------------------------------------------------------------- the extra-head-dimension trick
def _emulated_logits(qp, kp, scale):
    """What a flash kernel computes: half-precision products, exact in float32, accumulated in float32."""
    return scale * torch.einsum("qhd,khd->hqk", qp.float(), kp.float())


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-6), (torch.bfloat16, 2**-16), (torch.float16, 2**-20)],  # relative to the bias's scale
)
@pytest.mark.parametrize("hd", [8, 30, 64, 80])
def test_bias_columns_are_exact_in_every_dtype(dtype, tol, hd):
    n, heads, scale = 40, 3, hd**-0.5
    q, k, v, bias = _qkv_bias(n, heads, hd)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    qp, kp, vp = attention.key_bias_columns(q, k, v, bias, scale)
    width = attention.bias_head_dim(hd)
    assert qp.shape == kp.shape == vp.shape == (n, heads, width) and width % 8 == 0 and width >= hd + 2
    assert qp.dtype == kp.dtype == vp.dtype == dtype
    assert torch.equal(qp[..., :hd], q) and torch.equal(kp[..., :hd], k) and torch.equal(vp[..., :hd], v)
    assert not vp[..., hd:].any()
    # the logits: the same rounded q and k, and the bias added explicitly in float32
    want = scale * torch.einsum("qhd,khd->hqk", q.float(), k.float()) + bias
    got = _emulated_logits(qp, kp, scale)
    qk = (scale * torch.einsum("qhd,khd->hqk", q.float(), k.float())).abs().max()
    err = float((got - want).abs().max())
    # the float32 accumulation of q.k rounds at 2**-24 of the logits; the split bias must add no more than tol
    assert err <= tol * float(bias.abs().max()) + 2**-22 * float(qk), err


def test_one_bias_column_would_lose_bf16_precision():
    """Why two columns: a bias rounded to bf16 alone is off by up to 2**-8 of itself (7e-3 of a logit at log 16)."""
    q, k, v, bias = _qkv_bias(40, 2, 64)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    qp, kp, _ = attention.key_bias_columns(q, k, v, bias, 0.125)
    kp1 = kp.clone()
    kp1[..., 65] = 0  # drop the low part
    want = 0.125 * torch.einsum("qhd,khd->hqk", q.float(), k.float()) + bias
    one = float((_emulated_logits(qp, kp1, 0.125) - want).abs().max())
    two = float((_emulated_logits(qp, kp, 0.125) - want).abs().max())
    assert one > 1e-3 > 100 * two


def _fake_kernel(q, k, v, cu, max_seqlen, scale):
    """A varlen kernel emulated on the CPU, with the flash kernels' demands on the head size."""
    assert q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    assert q.dtype == k.dtype == v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(v, dtype=torch.float32)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        probs = _emulated_logits(q[lo:hi], k[lo:hi], scale).softmax(-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, v[lo:hi].float())
    return out.to(v.dtype)


def _fake_flash(monkeypatch):
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None):
        return _fake_kernel(q, k, v, cu_q, max_q, softmax_scale)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))


def _fake_varlen(monkeypatch, takes_scale):
    import torch.nn.attention.varlen as varlen

    if takes_scale:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
            return _fake_kernel(q, k, v, cu_q, max_q, scale)
    else:  # torch 2.9: the scale is the given head size ** -0.5

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):
            return _fake_kernel(q, k, v, cu_q, max_q, None)

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    monkeypatch.setattr(environment, "varlen_takes_scale", lambda: takes_scale)


@pytest.mark.parametrize("kernel", ["flash", "varlen", "varlen_fixed_scale"])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_and_varlen_add_the_bias_through_extra_head_dims(monkeypatch, kernel, scale, dtype):
    if kernel == "flash":
        _fake_flash(monkeypatch)
        run = flash.flash_attention
    else:
        _fake_varlen(monkeypatch, takes_scale=kernel == "varlen")
        run = varlen_backend.torch_varlen_attention
    q, k, v, bias = _qkv_bias(30, 2, 16)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = run(q, k, v, CU, 18, 0.0, scale, None, None, None, bias)
    assert out.shape == v.shape and out.dtype == dtype
    want = reference(q, k, v, CU, 16**-0.5 if scale is None else scale, bias)
    # the output is rounded to half precision once; the logits are exact to ~2**-16 (see above)
    assert rel_err(out.double(), want) <= (4e-3 if dtype == torch.bfloat16 else 5e-4)
    plain = run(q, k, v, CU, 18, 0.0, scale, None, None, None, None)
    assert rel_err(out.double(), plain.double()) > 5e-2


def test_a_head_size_without_room_for_the_columns_gets_a_clear_error(monkeypatch):
    _fake_flash(monkeypatch)
    q, k, v, bias = _qkv_bias(30, 1, 256)
    q, k, v = (t.half() for t in (q, k, v))
    with pytest.raises(ValueError, match="use attention 'flex' or 'pad'"):
        flash.flash_attention(q, k, v, CU, 18, 0.0, None, None, None, None, bias)


# ---------------------------------------------------------------------- the plan
def test_the_plan_biases_patches_by_log_area_and_nothing_else():
    apt = aptvit.convert(tiny_vit("reg_dinov2_p14"), thresholds={28: 6.0, 56: 5.0})  # 5 prefix tokens
    x = _merging_batch(apt, 3)
    layout = apt.make_layout(x)
    assert set(layout.size.tolist()) == {14, 28, 56}
    packed = plan_packed(layout, ((tuple(range(3)), tuple(x.shape[-2:])),), apt.num_prefix_tokens, pad_to=64)
    assert packed.pad > 0 and packed.key_bias.dtype == torch.float32 and packed.key_bias.shape == (packed.total,)
    area = (layout.size // 14) ** 2
    assert torch.allclose(packed.key_bias[packed.patch_pos], area.float().log(), rtol=0, atol=1e-7)
    others = torch.ones(packed.total, dtype=torch.bool)
    others[packed.patch_pos] = False
    assert others.sum() == 3 * 5 + packed.pad and not packed.key_bias[others].any()  # prefix and padding: log 1
    assert torch.equal(packed.to("cpu").key_bias, packed.key_bias)


# ---------------------------------------------------------------------- the model
def _merging_batch(model, b, seed=0):
    p = model.patch_embed.patch_size[0]
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, 8 * p, 8 * p, generator=g)
    img[:, :, : 4 * p, : 4 * p] = 0.5  # merges into a 4p patch
    img[:, :, 4 * p : 6 * p, 4 * p : 6 * p] = 0.3  # a 2p patch
    return (img - 0.5) / 0.5


def _thresholds(model):
    p = model.patch_embed.patch_size[0]
    return {2 * p: 6.0, 4 * p: 5.0}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", ["loop", "pad"])
def test_with_nothing_merged_the_area_bias_model_is_exactly_timm(family, backend):
    model = tiny_vit(family)
    apt = aptvit.convert(model, thresholds={2 * model.patch_embed.patch_size[0]: -1.0}, area_bias=True)
    apt.configure(attention=backend)
    x = _merging_batch(model, 2)
    with torch.no_grad():
        assert not (apt.make_layout(x).size > apt.patch_size).any()
        assert rel_err(apt(x), model(x)) <= 1e-5
        assert (
            rel_err(
                apt.forward_dense(x), model.forward_features(x)[:, model.num_prefix_tokens :].mT.reshape(2, -1, 8, 8)
            )
            <= 1e-5
        )


def _calls(monkeypatch):
    from aptvit.nn.families import vit as model_module  # the ViT family's blocks call it

    seen = []
    original = model_module.packed_self_attention

    def recording(attn, x, ctx, rotate=None):
        seen.append((ctx.packed, ctx.key_bias))
        return original(attn, x, ctx, rotate)

    monkeypatch.setattr(model_module, "packed_self_attention", recording)
    return seen


ENTRY_POINTS = {
    "forward": lambda apt, x: apt(x),
    "forward_features": lambda apt, x: apt.forward_features(x)[0],
    "forward_dense": lambda apt, x: apt.forward_dense(x),
    "forward_intermediates": lambda apt, x: apt.forward_intermediates(x)[1][0],
    "encode_tokens": lambda apt, x: apt.encode_tokens(x)[0],
    "encode_tokens_layer": lambda apt, x: apt.encode_tokens(x, layer=-1)[0],
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_block_of_every_entry_point_attends_with_the_area(monkeypatch, entry):
    model = tiny_vit("vit_cls", depth=3)
    apt = aptvit.convert(model, thresholds=_thresholds(model), area_bias=False)
    x = _merging_batch(model, 2)
    run = ENTRY_POINTS[entry]
    with torch.no_grad():
        off = run(apt, x)
        seen = _calls(monkeypatch)
        on = run(apt.configure(area_bias=True), x)
    assert len(seen) == 3 and all(bias is packed.key_bias for packed, bias in seen)
    assert rel_err(on, off) > 1e-3  # merged keys: the bias changes the features
    monkeypatch.undo()
    seen = _calls(monkeypatch)
    with torch.no_grad():
        run(apt.configure(area_bias=False), x)
    assert len(seen) == 3 and all(bias is None for _, bias in seen)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_the_backends_agree_on_a_merged_model(monkeypatch):
    flex = attention.BACKENDS["flex"]  # CUDA only in models; its values are checkable eagerly on the CPU
    monkeypatch.setitem(attention.BACKENDS, "flex", attention.Backend(flex.run, lambda *a: True))
    model = tiny_vit("qknorm_layerscale")
    apt = aptvit.convert(model, thresholds=_thresholds(model), area_bias=True)
    x = _merging_batch(model, 3)
    with torch.no_grad():
        packed = apt.prepare(x)
        assert (packed.key_bias > 0).any()
        outs = {b: apt.configure(attention=b).forward_packed(x, packed) for b in ("loop", "pad", "flex")}
    assert rel_err(outs["pad"], outs["loop"]) <= 1e-5 and rel_err(outs["flex"], outs["loop"]) <= 1e-5


def test_the_area_bias_model_equals_one_with_every_merged_key_repeated(monkeypatch):
    """The whole model, by brute force: a backend that repeats each merged key and value once per cell it
    covers, without any bias, computes what area_bias=True computes."""

    def repeating(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias):
        assert key_bias is None
        outs = []
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            rep = torch.repeat_interleave(torch.arange(lo, hi), areas[lo:hi])
            qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[lo:hi], k[rep], v[rep]))
            outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, scale=scale)[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setitem(attention.BACKENDS, "repeat", attention.Backend(repeating, lambda *a: True))
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds=_thresholds(model), area_bias=True)
    x = _merging_batch(model, 2)
    with torch.no_grad():
        packed = apt.prepare(x)
        areas = torch.ones(packed.total, dtype=torch.long)
        areas[packed.patch_pos] = (packed.layout.size // apt.patch_size) ** 2
        assert areas.max() == 16
        biased = apt.forward_packed(x, packed)
        apt.configure(attention="repeat", area_bias=False)
        assert rel_err(apt.forward_packed(x, packed), biased) <= 1e-5


def test_forward_packed_with_area_bias_has_no_data_dependent_op():
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds=_thresholds(model), area_bias=True)
    x = _merging_batch(model, 4)
    for backend in ("loop", "pad"):
        apt.configure(attention=backend)
        with torch.no_grad():
            packed = apt.prepare(x)
            with OpCounter() as inside:
                apt.forward_packed(x, packed)
        assert inside.data_dependent == [] and inside.host_reads == 0, inside.data_dependent


def test_gradients_flow_with_the_area_bias_and_checkpointing_keeps_it():
    model = tiny_vit("vit_cls").train()
    apt = aptvit.convert(model, thresholds=_thresholds(model), area_bias=True, attention="pad")
    x = _merging_batch(model, 2)
    grads = {}
    for ckpt, on in ((False, True), (True, True), (False, False)):
        apt.zero_grad()
        apt.set_grad_checkpointing(ckpt)
        apt.configure(area_bias=on)
        out = apt(x)
        out.square().mean().backward()
        grads[ckpt, on] = (out.detach(), apt.blocks[0].attn.qkv.weight.grad.clone())
    assert all(p.grad is not None for n, p in apt.named_parameters() if n.startswith("blocks."))
    assert rel_err(grads[True, True][0], grads[False, True][0]) <= 1e-6  # the checkpointed forward has the bias
    assert rel_err(grads[True, True][1], grads[False, True][1]) <= 1e-5
    assert rel_err(grads[False, False][1], grads[False, True][1]) > 1e-3


# ---------------------------------------------------------------------- settings
def test_the_default_is_off_as_chosen_on_labelled_train_photos():
    """Top-1 on Imagenette train photos chose it (the numbers are in APTConfig's comment); a conversion without the
    setting attends to merged keys as to any other."""
    assert APTConfig().area_bias is False
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 6.0, 64: 5.0})
    assert apt.config.area_bias is False
    x = _merging_batch(apt, 2)
    with torch.no_grad():
        assert rel_err(apt(x), apt.configure(area_bias=True)(x)) > 1e-3  # it changes what a merged model computes


def test_the_setting_is_a_validated_config_field_and_not_a_layout_argument():
    assert APTConfig(area_bias=False).area_bias is False
    assert APTConfig(area_bias=True).replace(thresholds={32: 5.0}).area_bias is True
    with pytest.raises(TypeError, match="area_bias must be True or False"):
        APTConfig(area_bias=1)
    config = APTConfig(patch_sizes=(16, 32), area_bias=True)
    assert "area_bias" not in config.layout_kwargs() and config.to_kwargs()["area_bias"] is True
    assert APTConfig.from_dict(config.to_dict()) == config
    old = config.to_dict()
    del old["area_bias"]  # settings written before the field existed
    assert APTConfig.from_dict(old).area_bias is False


def test_save_and_load_keep_the_setting_and_old_files_load_without_it(tmp_path):
    from safetensors.torch import load_file, save_file

    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 6.0, 64: 5.0}, area_bias=True).eval()
    path = tmp_path / "model.safetensors"
    aptvit.save(apt, path)
    back = aptvit.load(path).eval()
    assert back.config.area_bias is True and back.config == apt.config
    x = _merging_batch(apt, 2)
    with torch.no_grad():
        assert rel_err(back(x), apt(x)) <= 1e-6
        meta = read_metadata(path)
        settings = json.loads(meta["aptvit"])
        del settings["area_bias"]
        meta["aptvit"] = json.dumps(settings)
        save_file(load_file(path), tmp_path / "old.safetensors", metadata=meta)
        old = aptvit.load(tmp_path / "old.safetensors").eval()
        assert old.config.area_bias is False
        assert rel_err(old(x), apt.configure(area_bias=False)(x)) <= 1e-6


def test_log_area_values():
    """The bias is the natural log (softmax's base), of the area in cells, not of the side."""
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 6.0, 64: 5.0})
    packed = apt.prepare(_merging_batch(apt, 1))
    values = set(round(v, 5) for v in packed.key_bias.tolist())
    assert values == {0.0, round(math.log(4), 5), round(math.log(16), 5)}


@pytest.mark.parametrize("backend", ["loop", "pad"])
def test_the_bucketed_padded_plan_gives_the_same_biased_result(backend):
    from aptvit.nn.graphs import CUDAGraphRunner

    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds=_thresholds(model), area_bias=True, attention=backend).eval()
    x = _merging_batch(model, 3)
    runner = CUDAGraphRunner(apt, bucket=64)
    with torch.no_grad():
        assert runner.plan(x).pad > 0
        assert rel_err(runner(x), apt(x)) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_captured_graph_follows_the_setting():
    from aptvit.nn.graphs import CUDAGraphRunner

    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds=_thresholds(model)).eval().cuda()
    runner = CUDAGraphRunner(apt, bucket=64)
    x = _merging_batch(model, 2).cuda()
    with torch.no_grad():
        for on in (False, True, False):
            apt.configure(area_bias=on)
            assert rel_err(runner(x), apt(x)) <= 1e-4


@pytest.mark.slow
def test_forward_packed_with_area_bias_compiles_with_fullgraph_and_dynamic_shapes():
    torch._dynamo.reset()
    model = tiny_vit("vit_cls", depth=1)
    apt = aptvit.convert(model, thresholds=_thresholds(model), attention="pad", area_bias=True)
    x = _merging_batch(model, 2)
    with torch.no_grad():
        packed = apt.prepare(x)
        compiled = torch.compile(apt.forward_packed, fullgraph=True, dynamic=True, backend="aot_eager")
        assert rel_err(compiled(x, packed), apt.forward_packed(x, packed)) <= 1e-5
    torch._dynamo.reset()


def test_the_flop_count_still_matches_what_runs():
    """The bias is one add per logit (not counted, as softmax is not); the matmuls are those of area_bias=False,
    which tests/nn/test_model.py checks against torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from aptvit.nn.model import model_flops

    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds=_thresholds(model))
    x = _merging_batch(model, 2)
    layout = apt.make_layout(x)
    counted = {}
    for on in (False, True):
        apt.configure(area_bias=on)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            apt(x, layout=layout)
        counted[on] = (counter.get_total_flops(), model_flops(apt, layout)["apt"].tolist())
    assert counted[True] == counted[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "varlen", "flex", "pad", "loop"])
@pytest.mark.parametrize("hd", [64, 80])
def test_the_cuda_kernels_add_the_bias(backend, hd):
    """The real kernels (where installed) against the float64 reference, in bf16 and, where they run, fp32."""
    for dtype in (torch.bfloat16, torch.float32):
        if backend not in attention.available_backends(torch.device("cuda"), dtype):
            continue
        q, k, v, bias = _qkv_bias(300, 4, hd)
        cu = torch.tensor([0, 5, 140, 300], dtype=torch.int32)
        q, k, v, bias, cu = (t.cuda() for t in (q, k, v, bias, cu))
        q, k, v = (t.to(dtype) for t in (q, k, v))
        out = attention.varlen_attention(q, k, v, cu, 160, backend, scale=0.3, key_bias=bias)
        want = reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), 0.3, bias.cpu())
        assert rel_err(out.cpu().double(), want) <= (1e-2 if dtype == torch.bfloat16 else 1e-4), (backend, dtype)
