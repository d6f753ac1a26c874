"""The one ``Planner``: every entry point plans with it, it pickles, it follows the settings, it keeps no state; the
attention backends as objects that own their per-forward context; threads sharing nothing but the library."""

import copy
import pickle
import threading

import pytest
import torch

import aptvit
from aptvit.core.io import UserTypeError
from aptvit.nn.attention import BACKENDS, AttentionContext, PadBackend, register_backend
from aptvit.nn.planner import Planner

from ..tiny import rel_err, tiny_vit


def _images(b=2, seed=0, size=(64, 96)):
    """Normalised images with plain halves (something merges) and noisy halves."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, *size, generator=g)
    img[:, :, : size[0] // 2] = 0.4
    return (img - 0.5) / 0.5


def _same_plan(a, b):
    for name in ("token_src", "pos_src", "seq", "cu_seqlens", "pool_weight", "key_bias"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.offsets == b.offsets and a.max_seqlen == b.max_seqlen


@pytest.mark.parametrize("settings", [{}, {"budget": 0.5}, {"budget": 0.5, "static": True}])
def test_forward_is_forward_packed_of_the_planners_plan(settings):
    apt = aptvit.convert(tiny_vit("reg_dinov2_p14"), **settings).eval()
    x = _images(size=(56, 84))
    with torch.no_grad():
        planner = apt.planner
        assert isinstance(planner, Planner) and planner.num_prefix == apt.num_prefix_tokens
        packed = planner(x)
        _same_plan(packed, apt.prepare(x))
        assert torch.equal(apt(x), apt.forward_packed(x, packed))
        copy = pickle.loads(pickle.dumps(planner))  # what a data-loader worker gets
        _same_plan(copy(x), packed)


def test_the_planner_follows_configure_and_lays_out_pixels_as_the_model_does():
    apt = aptvit.convert(tiny_vit(), patch_sizes=(16, 32)).eval()
    pixels = (_images() * 0.5 + 0.5).mul(255).round().to(torch.uint8)
    before = apt.planner.layout(pixels)
    apt.configure(budget=8)
    want = aptvit.patch_layout(pixels, patch_sizes=(16, 32), budget=8).token_counts
    assert apt.planner.config.budget == 8 and apt.make_layout(pixels).token_counts == want
    assert before.token_counts != want and max(want) <= 8
    # uint8 pixels are pixels, planned as a worker plans its crops; the forward itself refuses them
    packed = apt.planner(pixels)
    assert packed.layout.token_counts == want
    with pytest.raises(UserTypeError, match="floating point"):
        apt(pixels)


def test_layout_settings_are_the_models_own_whatever_they_hold():
    """``patch_layout(pixels, **apt.layout_settings())`` is the model's layout, budget or thresholds, any scorer (the
    README's snippet once passed only the thresholds: a budget model got the default thresholds)."""
    pixels = (_images(3) * 0.5 + 0.5).mul(255).round().to(torch.uint8)
    for settings in ({"budget": 0.4}, {"thresholds": {32: 3.0}}, {"scorer": "laplacian", "budget": 7}):
        apt = aptvit.convert(tiny_vit(), patch_sizes=(16, 32), **settings)
        layout = aptvit.patch_layout(pixels, **apt.layout_settings())
        assert layout.token_counts == apt.make_layout(pixels).token_counts, settings
    want = aptvit.patch_layout(pixels, patch_sizes=(16, 32), scorer="laplacian", budget=7).token_counts
    assert aptvit.patch_layout(pixels, **apt.layout_settings()).token_counts == want


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_convert_keeps_the_models_mode(mode):
    model = getattr(tiny_vit(), mode)()
    apt = aptvit.convert(model)
    assert apt.training == (mode == "train") and apt.adaptive_embed.training == apt.training


def test_a_backend_owns_its_per_forward_context():
    """A new backend is one object: its context is made once per forward from the plan and reaches every block's
    attention; nothing else names it."""
    made, seen = [], []

    class Counting(PadBackend):
        def context(self, packed, key_bias, dtype):
            ctx = super().context(packed, key_bias, dtype)
            made.append(ctx)
            return ctx

        def attend(self, q, k, v, ctx, dropout_p, scale):
            seen.append(ctx)
            return super().attend(q, k, v, ctx, dropout_p, scale)

    register_backend("counting_pad", Counting())
    try:
        apt = aptvit.convert(tiny_vit("vit_cls", depth=3), patch_sizes=(16, 32), attention="counting_pad").eval()
        x = _images(3)
        with torch.no_grad():
            out = apt(x)
            ref = apt.configure(attention="pad")(x)
        assert len(made) == 1 and isinstance(made[0], AttentionContext) and made[0].state is not None
        assert len(seen) == 3 and all(ctx is made[0] for ctx in seen)
        assert rel_err(out, ref) <= 1e-6
    finally:
        BACKENDS.pop("counting_pad")


def _run(model, settings, x, repeats, out, key):
    apt = aptvit.convert(copy.deepcopy(model), **settings).eval()
    with torch.no_grad():
        results = [apt(x) for _ in range(repeats)]
    out[key] = results


def test_two_threads_converting_and_running_different_models_agree_with_one_thread():
    jobs = {
        "a": (tiny_vit("vit_cls").eval(), {"patch_sizes": (16, 32, 64), "thresholds": {32: 5.0, 64: 4.0}}, _images(2, 1, (64, 128))),
        "b": (tiny_vit("eva02").eval(), {"budget": 0.5, "static": True}, _images(3, 2, (84, 56))),
    }
    alone = {}
    for key, job in jobs.items():
        _run(*job, 1, alone, key)
    together = {}
    threads = [threading.Thread(target=_run, args=(*job, 6, together, key)) for key, job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in jobs:
        assert len(together[key]) == 6
        for y in together[key]:
            assert rel_err(y, alone[key][0]) <= 1e-6, key
