"""``pad`` on a static plan: every image's rows are one fixed block, attended with one SDPA and a key mask."""

import pytest
import torch

import aptvit
from aptvit.nn.attention import BACKENDS, varlen_attention
from aptvit.nn.attention.pad import FixedRows

from ..tiny import rel_err, tiny_vit
from .test_static import _batch


@pytest.mark.parametrize("area_bias", [True, False])
def test_a_static_plan_attends_over_fixed_rows_with_the_padding_keys_masked(area_bias):
    static = aptvit.convert(tiny_vit("qknorm_layerscale"), budget=0.5, static=True, area_bias=area_bias)
    x = _batch(16, 4)
    with torch.no_grad():
        packed = static.prepare(x)
    b, length = 4, packed.max_seqlen
    seq = packed.seq.view(b, length)
    real = (seq == seq[:, :1]).view(-1)  # prefix and real tokens: each image's first sequence
    assert not real.all(), "the batch must hold padding slots"
    key_bias = packed.key_bias if area_bias else None
    ctx = BACKENDS["pad"].context(packed, key_bias, torch.float32)
    assert isinstance(ctx.state, FixedRows) and ctx.state.rows == length
    assert tuple(ctx.state.mask.shape) == (b, 1, 1, length)  # one mask row per image, no padded-row index
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, packed.total, 2, 8, generator=g).unbind(0)
    got = BACKENDS["pad"].attend(q, k, v, ctx, 0.0, None)
    # the padded kernel on the plan's own sequences (real tokens; padding slots on their own)
    want = varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, "pad", seq=packed.seq, key_bias=key_bias)
    assert rel_err(got[real], want[real]) <= 1e-6
    assert torch.isfinite(got).all()  # padding-slot rows: finite, read by nothing
