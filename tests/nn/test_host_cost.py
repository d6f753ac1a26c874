"""The batch-1 host-cost work: fast paths that must give the results of the paths they replace."""

import pytest
import torch
import torch.nn.functional as F

import aptvit
from aptvit.core import quadtree, scoring
from aptvit.nn.attention import BACKENDS, one_sequence
from aptvit.nn.embed import area_halve

from ..dispatch import OpCounter
from ..tiny import rel_err, tiny_vit


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (2, 3, 56, 40), (1, 16, 7, 9), (1, 1, 3, 2)])
def test_area_halve_gives_avg_pool2d_bits_on_the_cpu(shape):
    torch.manual_seed(0)
    t = torch.randn(shape) * 3
    assert torch.equal(area_halve(t), F.avg_pool2d(t, 2))


def _images(b: int, size=(96, 128), seed: int = 0) -> torch.Tensor:
    """Flat regions with noisy ones, so that every size merges somewhere."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(b, 3, size[0] // 32, size[1] // 32, generator=g), size=size, mode="nearest")
    noise = torch.rand(b, 3, *size, generator=g) * (torch.rand(b, 1, *size, generator=g) > 0.6)
    return (coarse + 0.3 * noise).clamp(0, 1)


def _same_layout(a, b) -> None:
    for name in ("y", "x", "size", "cu_seqlens", "cells"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.offsets == b.offsets and a.image_sizes == b.image_sizes


@pytest.mark.parametrize("scorer", ["entropy", "laplacian"])
def test_layouts_follow_batch_grid_and_thresholds(scorer):
    """The layout's index tables (``quadtree.grid_tables``, the entropy keys) are constants of the shapes: a batch, a
    grid or thresholds met after another give what each image alone gives."""
    sizes = (16, 32, 64)
    images = _images(3)
    other = _images(2, size=(128, 96), seed=1)
    from aptvit.core.pixels import grayscale_255

    scores = scoring.get_scorer(scorer).fn(grayscale_255(images), (32, 64), 16)
    thr = {s: float(v.quantile(0.3)) for s, v in scores.items()}  # some patches of every size merge
    looser = {s: float(v.quantile(0.7)) for s, v in scores.items()}
    calls = [(images, thr), (images[:1], thr), (other, thr), (images[1:], looser), (images, thr), (other, looser)]
    kept = [aptvit.patch_layout(x, sizes, thresholds=t, scorer=scorer) for x, t in calls]
    for (x, t), layout in zip(calls, kept):
        _same_layout(layout, aptvit.patch_layout(x, sizes, thresholds=t, scorer=scorer))
        singles = [aptvit.patch_layout(x[i : i + 1], sizes, thresholds=t, scorer=scorer) for i in range(len(x))]
        _same_layout(layout, aptvit.PatchLayout.cat(singles))
    assert kept[3].total_tokens < aptvit.patch_layout(images[1:], sizes, thresholds=thr, scorer=scorer).total_tokens


@pytest.mark.parametrize("area_bias", [True, False])
@pytest.mark.parametrize("attention", ["loop", "pad"])
def test_one_sequence_attention_equals_the_packed_kernels(monkeypatch, area_bias, attention):
    """Batch 1 runs timm's own attention shapes (``one_sequence``); the general packed kernels give the same."""
    apt = aptvit.convert(tiny_vit(), patch_sizes=(16, 32), area_bias=area_bias, attention=attention)
    x = _images(1, size=(64, 96)) * 2 - 1
    with torch.no_grad():
        packed = apt.prepare(x)
        assert one_sequence(BACKENDS[attention].context(packed, None, x.dtype))
        assert packed.layout.total_tokens < 24  # something merged
        fast = apt.forward_packed(x, packed)
        monkeypatch.setattr("aptvit.nn.attention.packed.one_sequence", lambda ctx: False)
        general = apt.forward_packed(x, packed)
    assert rel_err(fast, general) <= 1e-6


def test_a_block_at_batch_1_dispatches_no_more_ops_than_timms():
    """The host cost of a block at batch 1 is its op count: no per-block transposes, dtype casts or no-op dropouts
    beyond what timm's own block dispatches."""
    vit = tiny_vit()
    apt = aptvit.convert(vit, patch_sizes=(16, 32))
    x = _images(1, size=(64, 96)) * 2 - 1
    with torch.inference_mode():
        packed = apt.prepare(x)
        with OpCounter() as ours:
            apt.forward_packed(x, packed)
        with OpCounter() as theirs:
            vit(x)
        tokens = apt.embed_packed(x, packed)
        with OpCounter() as timm_block:
            vit.blocks[0](tokens[None])
        ctx = apt.block_context(tokens, packed)
        with OpCounter() as our_block:
            apt.family.block(apt, apt.blocks[0], tokens, ctx)
    assert ours.ops["aten.transpose"] <= theirs.ops["aten.transpose"], ours.ops
    # the only casts are the position grid's resampling, which timm's forward runs too
    assert ours.ops["aten.dropout"] < theirs.ops["aten.dropout"] and ours.ops["aten.to"] <= theirs.ops["aten.to"]
    assert our_block.total < timm_block.total, (our_block.ops, timm_block.ops)


def test_entropy_of_flat_patches_after_smaller_ones():
    """The kept c log c table of each patch size holds every count up to the patch's pixels (a flat 64-px patch puts
    all 4096 in one bin), whichever size was scored first."""
    flat = torch.full((1, 128, 128), 77.0)
    for sizes in [(32,), (32, 64), (64,)]:
        scores = scoring.entropy_scores(flat, sizes, 16)
        assert all(torch.equal(v, torch.zeros_like(v)) for v in scores.values())


def _reference_gray(images: torch.Tensor) -> torch.Tensor:
    """``grayscale_255`` as it was before the channel-by-channel version: the bits it must keep."""
    x = images.float()
    if images.dtype != torch.uint8:
        x = x * 255.0
    if x.shape[1] == 1:
        return x[:, 0]
    gray = x[:, 0] * 0.2989
    gray += x[:, 1] * 0.5870
    gray += x[:, 2] * 0.1140
    return gray


def _edge_images() -> torch.Tensor:
    """(4, 3, 64, 64) in [0, 1]: noise, uint8 / 255 levels, flat gray exactly on entropy bin edges (k * 255 / 512)
    and next to them, and the extremes 0 and 1."""
    g = torch.Generator().manual_seed(3)
    noise = torch.rand(3, 64, 64, generator=g)
    levels = torch.randint(0, 256, (3, 64, 64), generator=g).float() / 255
    edge = torch.arange(64 * 64, dtype=torch.float32).remainder(512).view(64, 64) * 255 / 512 / 255
    edges = torch.stack([edge, torch.nextafter(edge, torch.ones(())), torch.nextafter(edge, torch.zeros(()))])
    extremes = (torch.rand(3, 64, 64, generator=g) > 0.5).float()
    return torch.stack([noise, levels, edges.clamp(0, 1), extremes])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.uint8])
@pytest.mark.parametrize("channels", [3, 1])
def test_grayscale_255_keeps_the_bits_of_the_full_size_version(dtype, channels):
    images = _edge_images()[:, :channels]
    images = (images * 255).round().to(dtype) if dtype == torch.uint8 else images.to(dtype)
    for batch in (images, images[:1], images[1:3]):
        assert torch.equal(aptvit.core.grayscale_255(batch), _reference_gray(batch))


@pytest.mark.parametrize(
    "settings",
    [{}, {"thresholds": {32: 5.0}}, {"budget": 0.5}, {"scorer": "laplacian"}, {"scorer": "upsample", "budget": 40}],
)
def test_make_layout_gives_the_layout_of_the_reference_pixels(settings):
    """The model's un-normalising (in place, channel-by-channel gray) gives the layout of the plain formulas
    ``(x * std + mean).clamp(0, 1)`` and the full-size gray, on images with pixels at bin edges and extremes."""
    apt = aptvit.convert(tiny_vit(), patch_sizes=(16, 32), **settings)
    apt.pretrained_cfg.update(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # ImageNet's: x * std rounds
    pixels = torch.cat([_edge_images(), _images(2, size=(64, 64))])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in apt.pixel_mean_std())
    x = (pixels - mean) / std
    reference = (x * std + mean).clamp(0, 1)
    raw = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # any value, not only round trips
    for t in (x, raw):
        for dtype in (torch.float32, torch.float64, torch.float16):  # the in-place steps keep the formula's bits
            assert torch.equal(apt.planner.pixels(t.to(dtype)), (t.to(dtype).float() * std + mean).clamp(0, 1))
    assert torch.equal(apt.planner.pixels(x[0]), reference[0])
    assert torch.equal(aptvit.core.grayscale_255(reference), _reference_gray(reference))
    for batch, want in ((x, reference), (x[:1], reference[:1]), (list(x[2:4]), list(reference[2:4]))):
        _same_layout(apt.make_layout(batch), aptvit.patch_layout(want, **apt.config.layout_kwargs()))


def test_identity_modules_are_not_called_unless_hooked(monkeypatch):
    """timm's blocks hold six ``nn.Identity`` (q/k norms, output norms, layer scales switched off), the model a few
    more (norm_pre, fc_norm): the packed forward skips the Python call of each (``attention.skip_noop``), except for
    one with a hook, whose hook still runs."""
    apt = aptvit.convert(tiny_vit(), patch_sizes=(16, 32)).eval()
    x = _images(2, size=(64, 96)) * 2 - 1
    calls = []
    monkeypatch.setattr(torch.nn.Identity, "forward", lambda self, t: calls.append(self) or t)
    with torch.inference_mode():
        for images in (x[:1], x):  # one sequence, and the general packed kernels
            calls.clear()
            apt(images)
            assert all(c is apt.patch_embed.norm for c in calls), calls  # the embedding bank's norm: called
        seen = []
        apt.blocks[0].attn.q_norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        apt.blocks[1].ls2.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
        apt(x[:1])
    assert len(seen) == 2 and sum(c is not apt.patch_embed.norm for c in calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("channels", [3, 1])
def test_normalised_gray_gives_the_bits_of_the_gray_of_the_pixels(dtype, channels):
    """``pixels.normalised_gray_255`` (the layout of normalised input, channel by channel) equals ``grayscale_255``
    of ``(x * std + mean).clamp(0, 1)``; its bounds are the grayscale's, NaN exactly when a pixel is NaN."""
    from aptvit.core.pixels import normalised_gray_255

    mean, std = torch.tensor([0.485, 0.456, 0.406][:channels]), torch.tensor([0.229, 0.224, 0.225][:channels])
    x = torch.cat(
        [
            (_edge_images()[:, :channels] - mean.view(-1, 1, 1)) / std.view(-1, 1, 1),
            torch.randn(2, channels, 64, 64) * 3,
        ]
    )
    x = x.to(dtype)
    pixels = (x.float() * std.view(-1, 1, 1) + mean.view(-1, 1, 1)).clamp(0, 1)
    for batch, want in ((x, pixels), (x[:1], pixels[:1])):
        gray, bounds = normalised_gray_255(batch, mean.tolist(), std.tolist())
        assert torch.equal(gray, _reference_gray(want))
        assert bounds.tolist() == [gray.min().item(), gray.max().item()]
    x[1, -1, 5, 7] = float("nan")
    x[2, 0, 0, 0], x[3, 0, 0, 0] = float("inf"), -float("inf")  # clamped, as the plain formula does
    gray, bounds = normalised_gray_255(x, mean.tolist(), std.tolist())
    assert torch.isnan(bounds).all() and torch.isnan(gray).sum() == 1
    with pytest.raises(aptvit.core.io.InputError, match="one value per channel"):
        normalised_gray_255(x, mean.tolist() + [0.5], std.tolist())


def test_make_layout_reports_nan_input_and_clamps_inf():
    apt = aptvit.convert(tiny_vit(), patch_sizes=(16, 32))
    x = _images(2, size=(64, 64)) * 2 - 1
    x[0, 0, 0, 0] = float("inf")
    assert apt.make_layout(x).total_tokens > 0
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(aptvit.core.io.InputError, match="NaN"):
        apt.make_layout(x)


def test_layout_settings_are_checked_on_every_call(monkeypatch):
    """``patch_layout`` checks its settings on every call: a value of another type is checked as such (True is no
    threshold, 1 token is not a fraction 1.0), a scorer registered again under its name is the one used."""
    from aptvit.core.io import InputError, UserTypeError

    x = _images(1, size=(64, 64))
    sizes = (16, 32)
    checks = []
    real = quadtree.check_layout_settings
    monkeypatch.setattr(quadtree, "check_layout_settings", lambda *a: checks.append(a) or real(*a))
    first = aptvit.patch_layout(x, sizes)
    _same_layout(first, aptvit.patch_layout(x, sizes))
    assert len(checks) == 2  # no settings kept between calls
    assert aptvit.patch_layout(x, sizes, thresholds={32: 1}).total_tokens == 16  # nothing merges at 1 bit
    with pytest.raises(InputError):
        aptvit.patch_layout(x, sizes, thresholds={32: True})
    assert aptvit.patch_layout(x, sizes, budget=1.0).total_tokens == 16  # a fraction: every base token allowed
    assert aptvit.patch_layout(x, sizes, budget=4).total_tokens == 4  # a count
    with pytest.raises(UserTypeError):
        aptvit.patch_layout(x, sizes, budget=True)
    with pytest.raises(InputError):
        aptvit.patch_layout(x, sizes, scorer_args={"bins": 1})
    spec = scoring.SCORERS["entropy"]
    calls = []

    def counted(gray, sizes, base, **params):
        calls.append(params)
        return spec.fn(gray, sizes, base, **params)

    monkeypatch.setitem(
        scoring.SCORERS, "entropy", scoring.ScorerSpec(counted, spec.thresholds, spec.params, spec.check)
    )
    _same_layout(first, aptvit.patch_layout(x, sizes))
    assert calls == [{"bins": 512}]


def test_aten_ops_per_stage_at_batch_1_do_not_grow():
    """The load-independent guard of the batch-1 host cost (benchmarks/bench_host.py's per-stage counts, BENCHMARKS
    section 10): each stage of ``apt(x)`` dispatches at most the ops it does today. The layout's count rose from 76
    when its pixel passes went channel by channel (more, smaller ops: less time), then fell to 67 (no NaN check of a
    built-in scorer's scores, no casts before the host read, Python floats for the normalisation); the plan's fell
    from 42 to 29 (one image: no reordering). The caches went (none saved 2% of a real forward,
    benchmarks/bench_caches.py): the layout builds its index tables and checks its settings on every call (67 -> 147
    ops on this 64-px image) and the embedding computes its position rows and runs the detail path (26 -> 81)."""
    from benchmarks.bench_host import stage_ops, thin_vit

    vit = thin_vit(depth=2)
    apt = aptvit.convert(vit, patch_sizes=(16, 32)).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in apt.pixel_mean_std())
    x = (_images(1, size=(64, 64)) - mean) / std
    ops = stage_ops(vit, apt, x)
    most = {"layout": 147, "plan": 29, "embed": 81, "block": 16, "head": 4}
    assert all(ops[k] <= n for k, n in most.items()), ops
    assert ops["block"] < ops["timm block"], ops


def test_the_detail_path_always_runs_and_adds_exactly_zero_while_fresh():
    """No weight-identity cache decides whether the detail path runs: a fresh conversion's zero output layers add
    exactly 0 to the resized embedding, and any change of the weights (an in-place edit, in or out of inference mode,
    an optimizer step) reaches the next bank."""
    apt = aptvit.convert(tiny_vit(), patch_sizes=(16, 32, 64)).eval()
    emb, x = apt.adaptive_embed, _images(2, size=(64, 96)) * 2 - 1
    pe = apt.patch_embed
    bank = lambda: emb.bank(x.to(emb.detail_proj["32"].weight.dtype), pe.proj, pe.norm)  # noqa: E731

    with torch.no_grad():
        assert torch.equal(bank(), emb.resized(x, pe.proj, pe.norm))
    with torch.inference_mode():
        emb.detail_proj["64"].weight[0, 0] = 1.0  # an in-place edit inside inference mode
        assert not torch.equal(bank(), emb.resized(x, pe.proj, pe.norm))
    emb.reset_detail()
    opt = torch.optim.SGD(emb.detail_proj.parameters(), lr=1.0)
    bank().pow(2).sum().backward()
    opt.step()  # the zeros get a gradient through the merge path: no longer zero
    with torch.no_grad():
        assert not torch.equal(bank(), emb.resized(x, pe.proj, pe.norm))
