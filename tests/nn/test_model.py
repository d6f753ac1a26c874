"""convert(): wrapping, gradients, training features, errors, checkpoints, FLOP counts."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import aptvit
from aptvit.core.flops import bank_flops
from aptvit.core.packing import seq_index
from aptvit.nn.model import drop_path_packed, model_flops

from ..tiny import grads_rel_err, rel_err, tiny_vit


def test_wraps_without_copying_and_keeps_timm_keys():
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model)
    assert apt.blocks is model.blocks and apt.pos_embed is model.pos_embed and apt.timm_model is model
    keys = set(apt.state_dict())
    timm_keys = set(model.state_dict())
    assert timm_keys <= keys and all(k.startswith("adaptive_embed.") for k in keys - timm_keys)
    assert {k for k in keys - timm_keys} == {
        "adaptive_embed.detail_merge.weight",
        "adaptive_embed.detail_merge.bias",
        "adaptive_embed.detail_proj.32.weight",
        "adaptive_embed.detail_proj.32.bias",
    }
    assert apt.config.patch_sizes == (16, 32) and apt.config.thresholds == {32: 5.5}


def test_default_patch_sizes_are_p_2p_or_the_sizes_the_thresholds_name():
    model = tiny_vit("vit_cls")
    assert aptvit.convert(model).config.patch_sizes == (16, 32)
    assert aptvit.convert(model, budget=0.5).config.patch_sizes == (16, 32)
    assert aptvit.convert(model, thresholds={32: 5.5, 64: 4.0}).config.patch_sizes == (16, 32, 64)
    assert aptvit.convert(model, thresholds={64: 4.0}).config.patch_sizes == (16, 64)
    assert aptvit.convert(model, patch_sizes=(16, 32, 64)).config.thresholds == {32: 5.5, 64: 4.0}
    with pytest.raises(ValueError, match="thresholds key 16 is not a non-base patch size"):
        aptvit.convert(model, thresholds={16: 4.0})
    p14 = tiny_vit("reg_dinov2_p14")
    assert aptvit.convert(p14).config.patch_sizes == (14, 28)
    with pytest.raises(ValueError, match="thresholds key 32 is not a non-base patch size"):
        aptvit.convert(p14, thresholds={32: 5.5})  # sizes of a /16 ViT on a /14 one


def test_scores_come_from_unnormalised_pixels():
    model = tiny_vit("clip_prenorm")  # CLIP mean/std, not ImageNet's
    apt = aptvit.convert(model)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    img = torch.rand(2, 3, 64, 128)
    img[:, :, :, :64] = 0.25
    got = apt.make_layout((img - mean) / std)
    want = aptvit.patch_layout(img, (16, 32), thresholds={32: 5.5})
    assert torch.equal(got.cells, want.cells) and torch.equal(got.size, want.size)


def test_gradients_reach_every_parameter_even_without_large_patches():
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds={32: -1.0, 64: -1.0}).train()
    apt(torch.randn(2, 3, 64, 64)).sum().backward()
    for name, p in apt.named_parameters():
        assert p.grad is not None, name
    assert all(p.grad.abs().sum() == 0 for p in apt.adaptive_embed.parameters()), "no large patch: zero gradient, but one"


def test_detail_path_learns_after_one_step():
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds={32: 7.0, 64: 6.0}).train()
    img = torch.rand(2, 3, 64, 64) * 0.1
    loss = apt((img - 0.5) / 0.5).logsumexp(-1).sum()
    loss.backward()
    assert (
        apt.adaptive_embed.detail_proj["32"].weight.grad.abs().sum() > 0 or apt.adaptive_embed.detail_proj["64"].weight.grad.abs().sum() > 0
    )


def test_ddp_without_find_unused_parameters_survives_batches_without_large_patches(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 5.0, 64: 4.0}).train()
        ddp = DDP(apt, find_unused_parameters=False)
        plain = torch.rand(1, 3, 64, 64) * 0 + 0.5
        noise = torch.rand(1, 3, 64, 64)
        for img in (noise, noise, plain, noise):  # the first batches choose no large patch
            ddp((img - 0.5) / 0.5).sum().backward()
    finally:
        dist.destroy_process_group()


def test_configure_validates_and_config_is_frozen():
    import dataclasses

    apt = aptvit.convert(tiny_vit("vit_cls"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        apt.config.budget = 0.5
    apt.configure(budget=0.5)
    assert apt.config.budget == 0.5 and apt.config.thresholds is None
    apt.configure(thresholds={32: 5.0})
    assert apt.config.budget is None and apt.config.thresholds == {32: 5.0}
    apt.configure(scorer="laplacian")  # thresholds in entropy bits would be meaningless: the scorer's defaults
    assert apt.config.thresholds == {32: 0.069}
    for bad, kind in [
        (dict(budget=2.0), ValueError),
        (dict(thresholds={48: 1.0}), ValueError),
        (dict(scorer="x"), ValueError),
        (dict(attention="cuda"), ValueError),
        (dict(patch_sizes=(16, 32, 64)), ValueError),  # the detail layers are per size: not after conversion
        (dict(scorer_args={"bins": True}), ValueError),
        (dict(bins=512), TypeError),  # not a setting of its own: scorer_args={"bins": ...}
    ]:
        with pytest.raises(kind):
            apt.configure(**bad)


def test_single_patch_size_has_no_unused_parameters():
    apt = aptvit.convert(tiny_vit("vit_cls"), patch_sizes=(16,)).train()
    apt(torch.randn(2, 3, 32, 48)).sum().backward()
    assert all(p.grad is not None for p in apt.parameters())


def test_drop_path_of_one_drops_everything_without_nan():
    seq = torch.tensor([0, 0, 1])
    out = drop_path_packed(torch.ones(3, 2), timm.layers.DropPath(1.0), seq, 2, training=True)
    assert torch.equal(out, torch.zeros(3, 2))


def test_drop_path_drops_whole_images():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 9, 20])
    seq = seq_index(cu)
    y = torch.ones(20, 4)
    module = timm.layers.DropPath(0.5)
    out = drop_path_packed(y, module, seq, 3, training=True)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert out[lo:hi].unique().numel() == 1 and out[lo, 0].item() in (0.0, 2.0)
    assert torch.equal(drop_path_packed(y, module, seq, 3, training=False), y)


def test_training_features_run_and_checkpointing_matches():
    model = tiny_vit("qknorm_layerscale", drop_path_rate=0.0, attn_drop_rate=0.0)
    apt = aptvit.convert(model, thresholds={32: 6.0}).train()
    x = torch.randn(2, 3, 64, 96)
    a = apt(x)
    a.sum().backward()
    grads = {n: p.grad.clone() for n, p in apt.named_parameters()}
    apt.zero_grad()
    apt.set_grad_checkpointing(True)
    b = apt(x)
    b.sum().backward()
    assert rel_err(b, a) <= 1e-6
    errors = grads_rel_err({n: p.grad for n, p in apt.named_parameters()}, grads)
    assert max(errors.values()) <= 1e-5, max(errors, key=errors.get)
    stochastic = aptvit.convert(tiny_vit("vit_cls", drop_path_rate=0.5, attn_drop_rate=0.5)).train()
    out = stochastic(x)
    assert torch.isfinite(out).all()
    stochastic.eval()
    with torch.no_grad():
        assert torch.equal(stochastic(x), stochastic(x))


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.randn(3, 64, 64), "4 dimensions"),
        (torch.randn(1, 1, 64, 64), "channels"),
        (torch.randn(1, 3, 60, 64), "pad_to_multiple"),
        ("image.png", "tensor"),
    ],
)
def test_bad_images_get_clear_errors(images, message):
    apt = aptvit.convert(tiny_vit("vit_cls"))
    with pytest.raises((ValueError, TypeError), match=message):
        apt(images)


def test_mismatched_layouts_and_backends_get_clear_errors():
    apt = aptvit.convert(tiny_vit("vit_cls"))
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="layout is for 1 images"):
        apt(x, layout=aptvit.patch_layout(torch.rand(1, 3, 64, 64)))
    with pytest.raises(ValueError, match="layout image 0 is 64x96"):
        apt(x, layout=aptvit.patch_layout(torch.rand(2, 3, 64, 96)))
    with pytest.raises(ValueError, match="patch_sizes"):
        apt(x, layout=aptvit.patch_layout(torch.rand(2, 3, 64, 64), (16, 32, 64, 128), thresholds={128: 1.0}))
    with pytest.raises(TypeError, match="PatchLayout"):
        apt(x, layout={"boxes": []})
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        aptvit.convert(tiny_vit("vit_cls"), attention="cuda")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        aptvit.convert(tiny_vit("vit_cls"), attention="flash")(x)


class _SubclassedViT(timm.models.vision_transformer.VisionTransformer):
    """A subclass may change the forward: no family claims it."""


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: _SubclassedViT(depth=1, embed_dim=64, num_heads=2), "_SubclassedViT"),  # a forward of its own
        (lambda: timm.create_model("resnet18", pretrained=False), "ResNet"),
        (
            lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, patch_drop_rate=0.1),
            "VisionTransformer",
        ),
    ],
)
def test_unsupported_models_raise_type_error_naming_the_class(build, name):
    with pytest.raises(TypeError, match=f"cannot convert {name}.*Supported"):
        aptvit.convert(build())


def test_timm_checkpoint_loads_into_the_wrapped_model(tmp_path):
    source = tiny_vit("vit_cls", seed=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "timm.pth")
    apt = aptvit.load(tmp_path / "timm.pth", model=tiny_vit("vit_cls", seed=4), thresholds={32: -1.0, 64: -1.0})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(apt(x), source(x)) <= 1e-5
    wrong = tiny_vit("vit_cls", num_classes=7)
    with pytest.raises(ValueError, match="wrong shape: head.bias, head.weight"):
        aptvit.load(tmp_path / "timm.pth", model=wrong)
    with pytest.raises(ValueError, match="not an aptvit checkpoint"):
        aptvit.load(tmp_path / "timm.pth")


def test_flop_counts_match_torch_flop_counter():
    model = tiny_vit("vit_cls")
    for blk in model.blocks:
        blk.attn.fused_attn = False  # explicit matmuls, which FlopCounterMode counts
    apt = aptvit.convert(model, thresholds={32: 6.0, 64: 5.0})
    img = torch.rand(2, 3, 64, 128)
    img[0, :, :, :64] = 0.5
    x = (img - 0.5) / 0.5
    layout = apt.make_layout(x)
    flops = model_flops(apt, layout)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert flops["uniform"].sum().item() == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert flops["apt"][0] < flops["uniform"][0]  # plain half merged
    # noise: nothing merged, only the embedding bank extra (every larger size over its whole grid, with its detail
    # path, which runs even while it is a fresh conversion's zeros)
    assert flops["apt"][1] - flops["uniform"][1] == bank_flops((4, 8), (16, 32, 64), 3, 64) > 0
    n = (layout.num_tokens + apt.num_prefix_tokens).double()
    attention = len(model.blocks) * 4 * (n**2).sum().item() * 64
    # the APT count matches what actually runs, fresh and once the detail path is trained; FlopCounterMode does not
    # count SDPA on the CPU, so add it
    for trained in (False, True):
        if trained:
            with torch.no_grad():
                apt.adaptive_embed.detail_proj["32"].bias.add_(0.1)
            flops = model_flops(apt, layout)
            assert flops["apt"][1] - flops["uniform"][1] == bank_flops((4, 8), (16, 32, 64), 3, 64)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            apt(x, layout=layout)
        assert flops["apt"].sum().item() == pytest.approx(counter.get_total_flops() + attention, rel=1e-9)


def test_timm_model_interface_layer_decay_classifier_and_input_size():
    from timm.optim import param_groups_layer_decay

    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds={32: -1.0, 64: -1.0})
    assert apt.get_classifier() is model.head
    groups = param_groups_layer_decay(apt, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale_of) == len(list(apt.parameters()))  # every parameter has a group
    stem = min(scale_of.values())
    assert all(scale_of[id(p)] == stem for p in apt.adaptive_embed.parameters())  # the new layers decay like the embedding
    assert scale_of[id(apt.blocks[-1].mlp.fc1.weight)] > stem
    apt.set_input_size(img_size=(96, 128))
    assert apt.pos_embed is model.pos_embed and apt.pos_embed.shape[1] == 1 + 6 * 8
    assert dict(apt.named_parameters())["pos_embed"] is model.pos_embed  # one tensor for optimizer and state dict
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert rel_err(apt(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match="fixed at conversion"):
        apt.set_input_size(patch_size=8)
