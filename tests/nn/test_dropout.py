"""Attention dropout of a converted model is applied in training, and only there (behaviour through apt(...))."""

import pytest
import torch

import aptvit

from ..tiny import rel_err, tiny_vit


def converted(attn_drop_rate, backend):
    model = tiny_vit("vit_cls", attn_drop_rate=attn_drop_rate, drop_path_rate=0.0)
    return aptvit.convert(model, thresholds={32: 5.0, 64: 4.0}, attention=backend)


def inputs(apt):
    g = torch.Generator().manual_seed(4)
    img = torch.rand(2, 3, 64, 96, generator=g)
    img[0, :, :64, :64] = 0.4  # one merged patch, different token counts
    x = (img - 0.5) / 0.5
    layout = apt.make_layout(x)
    assert len(set(layout.num_tokens.tolist())) == 2
    return x, layout


def two_forwards(apt, x, layout):
    with torch.no_grad():
        torch.manual_seed(0)
        a = apt(x, layout=layout)
        torch.manual_seed(1)
        b = apt(x, layout=layout)
    return a, b


@pytest.mark.parametrize("backend", ["loop", "pad"])
def test_attention_dropout_changes_training_forwards_and_not_eval_ones(backend):
    apt = converted(0.3, backend)
    x, layout = inputs(apt)
    a, b = two_forwards(apt.train(), x, layout)
    assert rel_err(a, b) > 1e-3, "two training forwards must draw different dropout masks"
    c, d = two_forwards(apt.eval(), x, layout)
    assert torch.equal(c, d)
    assert rel_err(a, c) > 1e-3, "a training forward is not the eval forward"


@pytest.mark.parametrize("backend", ["loop", "pad"])
def test_without_attention_dropout_training_forwards_are_equal(backend):
    apt = converted(0.0, backend)
    x, layout = inputs(apt)
    a, b = two_forwards(apt.train(), x, layout)
    c, _ = two_forwards(apt.eval(), x, layout)
    assert torch.equal(a, b)
    assert rel_err(a, c) <= 1e-6
