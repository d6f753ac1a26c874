"""Dense features: unmerge to the grid, timm-compatible intermediates, pyramid, MLLM tokens."""

import pytest
import torch

import aptvit
from aptvit.nn.dense import simple_pyramid, unmerge
from aptvit.nn.heads import SimpleFeaturePyramid

from ..tiny import rel_err, tiny_vit


def never(model):
    p = model.patch_embed.patch_size[0]
    return aptvit.convert(model, thresholds={2 * p: -1.0, 4 * p: -1.0})


@pytest.mark.parametrize("family", ["vit_cls", "reg_dinov2_p14", "vit_avg_no_cls"])
def test_forward_dense_equals_timm_when_nothing_merges(family):
    model = tiny_vit(family)
    apt = never(model)
    p = model.patch_embed.patch_size[0]
    x = torch.randn(2, 3, 3 * p, 5 * p)  # non-square
    with torch.no_grad():
        grid = apt.forward_dense(x)
        ref = model.forward_features(x)[:, model.num_prefix_tokens :].reshape(2, 3, 5, -1).permute(0, 3, 1, 2)
    assert grid.shape == (2, model.embed_dim, 3, 5) and grid.dtype == torch.float32
    assert rel_err(grid, ref) <= 1e-5


@pytest.mark.parametrize("fmt", ["NCHW", "NLC"])
@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_equals_timm_when_nothing_merges(fmt, norm):
    model = tiny_vit("qknorm_layerscale")  # class + register tokens
    apt = never(model)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        final, inter = apt.forward_intermediates(
            x, indices=[0, -1], norm=norm, output_fmt=fmt, return_prefix_tokens=True
        )
        ref_final, ref_inter = model.forward_intermediates(
            x, indices=[0, -1], norm=norm, output_fmt=fmt, return_prefix_tokens=True
        )
        only = apt.forward_intermediates(x, indices=1, output_fmt=fmt, intermediates_only=True, stop_early=True)
        ref_only = model.forward_intermediates(x, indices=1, output_fmt=fmt, intermediates_only=True, stop_early=True)
    assert rel_err(final, ref_final) <= 1e-5
    for (a, a_prefix), (b, b_prefix) in zip(inter, ref_inter):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5 and rel_err(a_prefix, b_prefix) <= 1e-5
    assert len(only) == 1 and rel_err(only[0], ref_only[0]) <= 1e-5
    with torch.no_grad():
        d = apt.forward_intermediates(x, indices=[0], output_fmt=fmt, return_prefix_tokens=True, output_dict=True)
        ref_d = model.forward_intermediates(x, indices=[0], output_fmt=fmt, return_prefix_tokens=True, output_dict=True)
    assert set(d) == set(ref_d)
    for key in d:
        got, want = d[key], ref_d[key]
        if isinstance(got, list):
            assert len(got) == len(want), key
        for a, b in zip(got, want) if isinstance(got, list) else [(got, want)]:
            assert rel_err(a, b) <= 1e-5, key


def test_a_large_token_feature_covers_all_its_cells():
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds={32: 5.5, 64: 4.0})
    x = torch.zeros(1, 3, 128, 192)  # constant image: 64-px tokens everywhere
    with torch.no_grad():
        tokens, layout = apt.encode_tokens(x)
        grid = apt.forward_dense(x, layout=layout)
    assert (layout.size == 64).all()
    for t, (y, xx, s) in enumerate(layout.boxes(0).tolist()):
        cells = grid[0, :, y // 16 : (y + s) // 16, xx // 16 : (xx + s) // 16]
        assert torch.allclose(cells, tokens[t][:, None, None].expand_as(cells))


def test_dense_loss_reaches_encoder_and_detail_path():
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 6.0, 64: 5.0}).train()
    img = torch.rand(2, 3, 64, 96)
    img[:, :, :, :64] = 0.5
    grid = apt.forward_dense((img - 0.5) / 0.5)
    pyramid = SimpleFeaturePyramid(64, 32)(grid)
    sum(level.square().mean() for level in pyramid).backward()
    assert apt.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert apt.patch_embed.proj.weight.grad.abs().sum() > 0
    assert sum(layer.weight.grad.abs().sum() for layer in apt.adaptive_embed.detail_proj.values()) > 0


def test_smooth_unmerge_blends_only_large_tokens():
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 5.5, 64: 4.0})
    img = torch.rand(1, 3, 128, 128)
    img[:, :, :64, :64] = 0.5
    with torch.no_grad():
        tokens, layout = apt.encode_tokens((img - 0.5) / 0.5)
    repeat, smooth = unmerge(tokens, layout, smooth=False), unmerge(tokens, layout, smooth=True)
    base = (layout.size[layout.cell_index] == 16)[:, None].expand_as(repeat)
    assert torch.equal(repeat[base], smooth[base]) and not torch.equal(repeat, smooth)


def test_encode_tokens_has_fewer_tokens_and_their_boxes():
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, budget=0.5)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        tokens, layout = apt.encode_tokens(x)
        penultimate, _ = apt.encode_tokens(x, layout=layout, layer=-2)
        inter = apt.forward_intermediates(x, indices=[-2], layout=layout, intermediates_only=True, output_fmt="NLC")
    assert tokens.shape == (layout.total_tokens, 64) and (layout.num_tokens <= 8).all()
    assert layout.y.shape == layout.x.shape == layout.size.shape == (layout.total_tokens,)
    # the packed penultimate tokens, unmerged, are forward_intermediates' grid
    assert rel_err(unmerge(penultimate, layout).flatten(2).transpose(1, 2), inter[0]) <= 1e-6


def test_simple_pyramid_shapes_and_errors():
    grid = torch.randn(2, 8, 6, 10)
    levels = simple_pyramid(grid, scales=(4, 2, 1, 0.5))
    assert [tuple(l.shape) for l in levels] == [(2, 8, 24, 40), (2, 8, 12, 20), (2, 8, 6, 10), (2, 8, 3, 5)]
    assert [tuple(l.shape) for l in SimpleFeaturePyramid(8, 4, (2, 1, 0.5))(grid)] == [
        (2, 4, 12, 20),
        (2, 4, 6, 10),
        (2, 4, 3, 5),
    ]
    for bad in [(3,), (0,), (), 2, (1, -2), (0.125,)]:
        with pytest.raises(ValueError, match="scale"):
            simple_pyramid(torch.randn(1, 8, 4, 4), scales=bad)


@pytest.mark.parametrize("indices", [5, 0, [2], [-3], ["a"]])
def test_bad_indices_are_clear_errors(indices):
    apt = never(tiny_vit("vit_cls"))
    with pytest.raises(ValueError, match="indices"):
        apt.forward_intermediates(torch.randn(1, 3, 32, 32), indices=indices)
    with pytest.raises(ValueError, match="output_fmt"):
        apt.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")
