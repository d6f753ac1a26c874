"""The five fidelity promises of convert(): exact when nothing merges, resize-only at init,
images independent in a batch, backends agree, save/load round trip."""

import pytest
import torch
import torch.nn.functional as F

import aptvit
from aptvit.core.packing import split_prefix
from aptvit.nn.attention import available_backends

from ..tiny import FAMILIES, grads_rel_err, rel_err, tiny_vit

NEVER = -1.0  # every score is >= 0, so nothing merges


def never_merge(model):
    p = model.patch_embed.patch_size[0]
    return aptvit.convert(model, thresholds={2 * p: NEVER, 4 * p: NEVER})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nothing_merged_equals_timm(family):
    model = tiny_vit(family)
    apt = never_merge(model)
    p = model.patch_embed.patch_size[0]
    torch.manual_seed(1)
    x = torch.randn(3, 3, 4 * p, 6 * p)
    with torch.no_grad():
        assert rel_err(apt(x), model(x)) <= 1e-5
        # a list of images of mixed sizes: each equals timm on that image alone
        images = [torch.randn(3, 4 * p, 4 * p), torch.randn(3, 2 * p, 6 * p), torch.randn(3, 4 * p, 4 * p)]
        out = apt(images)
        for i, img in enumerate(images):
            assert rel_err(out[i], model(img[None])[0]) <= 1e-5


def test_large_tokens_are_exactly_resize_only_at_init():
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds={32: 6.0, 64: 5.0})
    img = torch.rand(2, 3, 128, 192)
    img[:, :, :64, :64] = 0.3  # plain corner: at least one 64-px token
    x = (img - 0.5) / 0.5
    layout = apt.make_layout(x)
    assert (layout.size > 16).any()
    with torch.no_grad():
        tokens = apt.embed(x, layout)
        apt.adaptive_embed.detail_merge.weight.normal_()  # whatever the merge computes, the zero output layers hide it
        assert torch.equal(apt.embed(x, layout), tokens)
        # and "resize only" is what it says: area-average the patch to 16x16, project, add mean position
        patches, _ = split_prefix(tokens, layout.cu_seqlens, apt.num_prefix_tokens)
        pos = model.pos_embed[0, 1:].reshape(14, 14, -1).permute(2, 0, 1)[None]
        pos = F.interpolate(pos, size=(8, 12), mode="bicubic", antialias=True, align_corners=False)
        for t in (layout.size > 16).nonzero().squeeze(1).tolist():
            b, y, xx, s = int(layout.image_index[t]), int(layout.y[t]), int(layout.x[t]), int(layout.size[t])
            crop = F.interpolate(x[b : b + 1, :, y : y + s, xx : xx + s], size=(16, 16), mode="area")
            want = model.patch_embed.proj(crop).flatten() + pos[
                0, :, y // 16 : (y + s) // 16, xx // 16 : (xx + s) // 16
            ].mean((1, 2))
            assert torch.allclose(patches[t], want, atol=1e-5)


@pytest.mark.parametrize("backend", ["loop", "pad"])
def test_each_image_in_a_mixed_batch_equals_its_output_alone(backend):
    assert backend in available_backends("cpu", torch.float32)
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds={32: 5.0, 64: 4.0}, attention=backend)
    torch.manual_seed(2)
    img = torch.rand(4, 3, 96, 128)
    img[0] = 0.5  # all plain: few tokens
    img[1, :, :48] = 0.2  # half plain
    x = (img - 0.5) / 0.5
    layout = apt.make_layout(x)
    assert len(set(layout.num_tokens.tolist())) > 1, "the batch must mix sequence lengths"
    with torch.no_grad():
        together = apt(x, layout=layout)
        for i in range(4):
            assert rel_err(together[i], apt(x[i : i + 1])[0]) <= 1e-5


@pytest.mark.parametrize("family", ["vit_cls", "qknorm_layerscale"])
def test_backends_agree_with_loop_forward_and_backward(family):
    model = tiny_vit(family)
    apt = aptvit.convert(model, thresholds={32: 5.0, 64: 4.0})
    torch.manual_seed(3)
    img = torch.rand(3, 3, 64, 96)
    img[0, :, :32] = 0.7
    x = (img - 0.5) / 0.5
    layout = apt.make_layout(x)
    results = {}
    for backend in available_backends("cpu", torch.float32):
        apt.configure(attention=backend)
        apt.zero_grad()
        out = apt(x, layout=layout)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in apt.named_parameters()})
    ref_out, ref_grads = results.pop("loop")
    assert results, "at least one other backend runs on the CPU"
    for backend, (out, grads) in results.items():
        assert rel_err(out, ref_out) <= 1e-5, backend
        errors = grads_rel_err(grads, ref_grads)
        assert max(errors.values()) <= 1e-5, (backend, max(errors, key=errors.get))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_load_round_trip(tmp_path, family):
    model = tiny_vit(family)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "crop_pct": 0.95, "crop_offset": "floor"}
    apt = aptvit.convert(model, budget=0.5)
    with torch.no_grad():
        for layer in apt.adaptive_embed.detail_proj.values():  # non-zero detail path, as after fine-tuning
            layer.weight.normal_(0, 0.05)
    p = model.patch_embed.patch_size[0]
    x = torch.randn(2, 3, 4 * p, 6 * p)
    path = aptvit.save(apt, tmp_path / "m.safetensors")
    assert not list(tmp_path.glob("*.tmp")), "written through a temporary name"
    again = aptvit.load(path)  # architecture re-created from the metadata alone
    assert again.config == apt.config
    assert again.pixel_mean_std() == apt.pixel_mean_std() and again.pretrained_cfg["crop_pct"] == 0.95
    assert again.pretrained_cfg["crop_offset"] == "floor"  # the eval crop's placement (aptvit.data.eval_crop)
    with torch.no_grad():
        assert torch.equal(again(x), apt(x))
    other = aptvit.load(path, model=tiny_vit(family, seed=5))
    with torch.no_grad():
        assert torch.equal(other(x), apt(x))
