"""Hugging Face vision towers (``aptvit.nn.hf``): exact against the HF forward when nothing merges, the timm path's
outputs when merging, HF's outputs in packed form, LLaVA's feature selection, saving and loading.

The HF models are random-initialised at the real widths, heads, patch and image sizes of the checkpoints named,
with 2 layers (1 for the large CLIP-L/336 and SigLIP so400m) to keep the suite fast.
"""

import json
from functools import partial

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

import aptvit
from aptvit.core.io import InputError, UserTypeError
from aptvit.nn.heads import BoxAwareProjector

transformers = pytest.importorskip("transformers")
from aptvit.nn.hf import (  # noqa: E402
    HFVisionTransformer,
    check_against_hf,
    hf_outputs,
    llava_features,
    to_timm,
)

from ..tiny import rel_err  # noqa: E402

T = transformers
TOL = 1e-5


def clip_l336(layers=1):  # LLaVA-1.5's tower, openai/clip-vit-large-patch14-336
    return T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, patch_size=14,
                              image_size=336, projection_dim=768, num_hidden_layers=layers)  # fmt: skip


def clip_b16():  # openai/clip-vit-base-patch16
    return T.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=16,
                              image_size=224, projection_dim=512, num_hidden_layers=2)  # fmt: skip


def siglip_b16():  # google/siglip-base-patch16-224 (SigLIP 2's fixed-size checkpoints: the same class)
    return T.SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=16,
                                image_size=224, num_hidden_layers=2)  # fmt: skip


def siglip_so400m():  # google/siglip-so400m-patch14-384: MLP width 4304 = 3.736... x 1152
    return T.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14,
                                image_size=384, num_hidden_layers=1)  # fmt: skip


def dinov2_s14():  # facebook/dinov2-small: positions for 518 px, used at 224 (resampled, no antialiasing)
    return T.Dinov2Config(hidden_size=384, num_attention_heads=6, patch_size=14, image_size=518, num_hidden_layers=2)


def dinov2_reg_b14():  # facebook/dinov2-with-registers-base (4 registers; resampled with antialiasing)
    return T.Dinov2WithRegistersConfig(hidden_size=768, num_attention_heads=12, patch_size=14, image_size=518,
                                       num_register_tokens=4, num_hidden_layers=2)  # fmt: skip


def vit_b16():  # google/vit-base-patch16-224-in21k (LayerNorm eps 1e-12, a tanh pooler)
    return T.ViTConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=16, image_size=224,
                       num_hidden_layers=2)  # fmt: skip


def clip_model():  # the whole CLIP: its vision half and projection
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    return T.CLIPModel(T.CLIPConfig(vision_config=clip_b16().to_dict(), text_config=text, projection_dim=512))


# (name, HF model factory, image side(s) to check, batch)
MODELS = {
    "clip_l336": (lambda: T.CLIPVisionModel(clip_l336()), (336,), 1),
    "clip_b16_projection": (lambda: T.CLIPVisionModelWithProjection(clip_b16()), (224, 160), 1),
    "clip_model": (clip_model, (224,), 1),
    "siglip_b16": (lambda: T.SiglipVisionModel(siglip_b16()), (224, 128), 2),
    # 384 px is no multiple of 14: HF's conv leaves out the last 6 pixels, the APT model is given them cropped
    "siglip_so400m": (lambda: T.SiglipVisionModel(siglip_so400m()), (384,), 1),
    "dinov2_s14": (lambda: T.Dinov2Model(dinov2_s14()), (224,), 2),
    "dinov2_reg_b14": (lambda: T.Dinov2WithRegistersModel(dinov2_reg_b14()), (224,), 1),
    "vit_b16": (lambda: T.ViTModel(vit_b16()), (224, 128), 1),
}


def hf_model(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def images(side, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, side, side, generator=g)


def never(apt):
    """A layout of base patches only, with every size of the model (no score is below -1)."""
    sizes = apt.patch_sizes
    return lambda x: aptvit.patch_layout(
        x.new_zeros(x.shape), patch_sizes=sizes, thresholds={s: -1.0 for s in sizes[1:]}
    )


def hf_forward(hf, x):
    """HF's outputs (``interpolate_pos_encoding`` where the class has the flag), image_embeds for a whole CLIP."""
    name = type(hf).__name__
    kw = {"output_hidden_states": True}
    if not name.startswith("Dinov2"):
        kw["interpolate_pos_encoding"] = True
    with torch.no_grad():
        if name == "CLIPModel":
            out = hf.vision_model(pixel_values=x, **kw)
            out["image_embeds"] = hf.visual_projection(out.pooler_output)
            return out
        return hf(pixel_values=x, **kw)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", sorted(MODELS))
def test_nothing_merged_equals_the_hf_forward(name):
    """Every output HF returns, at the native size and (where listed) another one: within 1e-5 of its scale."""
    hf = hf_model(name)
    apt = aptvit.convert(hf).eval()
    assert isinstance(apt.timm_model, HFVisionTransformer)
    _, sides, b = MODELS[name]
    p = apt.patch_size
    for side in sides:
        x = images(side, b=b)
        ref = hf_forward(hf, x)
        x = x[..., : side // p * p, : side // p * p]
        with torch.no_grad():
            ours = hf_outputs(apt, x, layout=never(apt)(x), output_hidden_states=True)
            logits = apt(x, layout=never(apt)(x))
        assert rel_err(ours.last_hidden_state.unpacked(), ref.last_hidden_state) < TOL, side
        assert len(ours.hidden_states) == len(ref.hidden_states) == len(apt.blocks) + 1
        for i, (mine, hfs) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
            assert rel_err(mine.unpacked(), hfs) < TOL, (side, i)
        if ref.get("image_embeds") is not None:  # CLIP with projection: apt(x) is image_embeds
            assert rel_err(ours.image_embeds, ref["image_embeds"]) < TOL
            assert rel_err(logits, ref["image_embeds"]) < TOL
        else:  # apt(x) is the pooler output
            assert ours.image_embeds is None
            assert rel_err(logits, ref.pooler_output) < TOL
        if ref.get("pooler_output") is not None:
            assert rel_err(ours.pooler_output, ref.pooler_output) < TOL
        # the packed form: P prefix rows per image, one row per patch, the layout's boxes
        assert ours.last_hidden_state.prefix.shape == (b, apt.num_prefix_tokens, apt.embed_dim)
        assert ours.last_hidden_state.tokens.shape == (int(ours.layout.num_tokens.sum()), apt.embed_dim)


def test_dense_and_llava_layer_equal_hf_hidden_states():
    """``forward_dense`` is DINOv2's normed patch grid, ``encode_tokens(layer=-2)`` CLIP's hidden_states[-2]."""
    hf = hf_model("dinov2_s14")
    apt = aptvit.convert(hf)
    x = images(224)
    ref = hf_forward(hf, x).last_hidden_state[:, 1:].transpose(1, 2).reshape(2, -1, 16, 16)
    with torch.no_grad():
        assert rel_err(apt.forward_dense(x, layout=never(apt)(x)), ref) < TOL
    hf = hf_model("clip_b16_projection")
    apt = aptvit.convert(hf)
    ref = hf_forward(hf, x).hidden_states[-2][:, 1:]
    with torch.no_grad():
        tokens, _ = apt.encode_tokens(x, layout=never(apt)(x), layer=-2)
    assert rel_err(tokens.view(2, 196, -1), ref) < TOL


def test_check_against_hf_reports_a_wrong_weight():
    """``check_against_hf``: tiny errors for the converted model, a large one when a mapped weight differs."""
    hf = hf_model("vit_b16")
    apt = aptvit.convert(hf)
    x = images(224, b=1)
    errs = check_against_hf(hf, apt, x)
    assert set(errs) == {"last_hidden_state", "pooler_output", "hidden_states"} and max(errs.values()) < TOL
    with torch.no_grad():  # a mapping that put a weight in the wrong place: here, the MLP's output flipped
        apt.blocks[1].mlp.fc2.weight.neg_()
    assert check_against_hf(hf, apt, x)["last_hidden_state"] > 1e-2


# ---------------------------------------------------------------------------------------------- merging
# the registered timm architecture each HF class maps onto, with the HF config's depth, head, activation (timm's
# SigLIP ports use erf GELU, HF's SigLIP the tanh approximation) and LayerNorm eps (HF's ViT: 1e-12)
TIMM_TWINS = {
    "clip_b16_projection": ("vit_base_patch16_clip_quickgelu_224", dict(depth=2, num_classes=512)),
    "siglip_b16": ("vit_base_patch16_siglip_224", dict(depth=2, num_classes=0, act_layer="gelu_tanh")),
    "dinov2_s14": ("vit_small_patch14_dinov2", dict(depth=2, num_classes=0, img_size=224)),
    "dinov2_reg_b14": ("vit_base_patch14_reg4_dinov2", dict(depth=2, num_classes=0, img_size=224)),
    "vit_b16": ("vit_base_patch16_224", dict(depth=2, num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-12))),
}


def _photos(side):
    from aptvit.photos import load_photo

    return torch.stack([load_photo(n, side) for n in ("astronaut", "coffee", "camera")]).float() / 255


@pytest.mark.parametrize("name", sorted(TIMM_TWINS))
def test_merged_equals_the_timm_path_and_images_stay_apart(name):
    """With merging (real photos, half the tokens), the HF conversion computes what timm's own architecture computes
    with the same weights, and each image's outputs are those it has alone (no image attends to another)."""
    import timm

    hf = hf_model(name)
    twin = to_timm(hf)
    arch, kw = TIMM_TWINS[name]
    vit = timm.create_model(
        arch, pretrained=False, dynamic_img_size=True, **{"img_size": twin.patch_embed.img_size, **kw}
    )
    own = {k: v for k, v in twin.state_dict().items() if not k.startswith("head.")}
    if name.startswith("dinov2"):  # timm's DINOv2 at 224 px: the 518-px table resampled once, as HF does it
        own["pos_embed"] = resample_abs_pos_embed(
            own["pos_embed"], (16, 16), num_prefix_tokens=int(not twin.no_embed_class), **twin.pos_resample
        )
    missing, unexpected = vit.load_state_dict(own, strict=False)
    assert not unexpected and set(missing) <= {"head.weight", "head.bias"}
    if name == "clip_b16_projection":  # timm's projection head has a bias, CLIP's none
        vit.head.weight.data.copy_(twin.head.weight)
        vit.head.bias.data.zero_()
    vit.pretrained_cfg = dict(twin.pretrained_cfg)
    side = twin.patch_embed.img_size[0] if name != "dinov2_s14" and name != "dinov2_reg_b14" else 224
    px = _photos(side)[:2]
    mean, std = twin.pretrained_cfg["mean"], twin.pretrained_cfg["std"]
    x = (px - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    ours = aptvit.convert(hf, budget=0.5).eval()
    theirs = aptvit.convert(vit.eval(), budget=0.5).eval()
    layout = ours.make_layout(x)
    assert int(layout.num_tokens.sum()) < 0.6 * 2 * (side // twin.patch_embed.patch_size[0]) ** 2  # merged
    with torch.no_grad():
        t_ours, _ = ours.forward_features(x, layout=layout)
        t_theirs, _ = theirs.forward_features(x, layout=layout)
        assert rel_err(t_ours, t_theirs) < TOL
        if name != "vit_b16":  # ViT's pooler (linear + tanh) has no timm twin; compared through hf_outputs below
            assert rel_err(ours(x, layout=layout), theirs(x, layout=layout)) < TOL
        out = hf_outputs(ours, x, layout=layout, output_hidden_states=True)
        for i in range(2):
            alone = hf_outputs(ours, x[i : i + 1], layout=layout.image(i), output_hidden_states=True)
            assert rel_err(out.last_hidden_state.per_image()[i], alone.last_hidden_state.per_image()[0]) < TOL
            assert rel_err(out.hidden_states[1].per_image()[i], alone.hidden_states[1].per_image()[0]) < TOL
            if out.pooler_output is not None:
                assert rel_err(out.pooler_output[i], alone.pooler_output[0]) < TOL


def test_modes_run_on_a_converted_hf_model():
    """Static budget mode (exactly k tokens), area bias, the pad backend, and images of another size."""
    hf = hf_model("siglip_b16")
    apt = aptvit.convert(hf, budget=0.5, static=True, area_bias=True, attention="pad").eval()
    x = images(224, b=2)
    with torch.no_grad():
        out = hf_outputs(apt, x)
        assert out.layout.num_tokens.tolist() == [98, 98]
        assert torch.isfinite(out.pooler_output).all()
        apt.configure(static=False, attention="loop")
        assert apt(images(256, b=1)).shape == (1, 768)


# ---------------------------------------------------------------------------------------------- LLaVA
def test_llava_feature_selection_matches_hf_hidden_states():
    """``vision_feature_layer`` -2 / a list, ``default`` (class token dropped) / ``full``: LLaVA's selection from
    HF's hidden states when nothing merges; with merging, one row per token and the projector's sequences."""
    hf = hf_model("clip_b16_projection")  # 2 layers: hidden_states[-2] is the first layer's output
    apt = aptvit.convert(hf, budget=0.5)
    x = (_photos(224)[:2] - 0.45) / 0.27
    ref = hf_forward(hf, x).hidden_states
    layout = never(apt)(x)
    with torch.no_grad():
        v = llava_features(apt, x, -2, "default", layout=layout)
        assert v.num_prefix == 0 and rel_err(v.tokens.view(2, 196, -1), ref[-2][:, 1:]) < TOL
        v = llava_features(apt, x, -2, "full", layout=layout)
        assert v.num_prefix == 1 and rel_err(v.tokens.view(2, 197, -1), ref[-2]) < TOL
        v = llava_features(apt, x, [-2, 0], "full", layout=layout)
        assert rel_err(v.tokens.view(2, 197, -1), torch.cat([ref[-2], ref[0]], -1)) < TOL
        merged = llava_features(apt, x, -2, "full")
        counts = merged.layout.num_tokens.tolist()
        assert max(counts) <= 98
        projector = BoxAwareProjector(768, llm_dim=64)
        seqs = projector(merged.tokens, merged.layout, num_prefix=merged.num_prefix)
        assert [len(s) for s in seqs] == [n + 1 for n in counts]
        # each image's class token is its first row (the projector's box for it: the whole image)
        assert (
            rel_err(
                merged.per_image()[1][0], hf_outputs(apt, x, output_hidden_states=True).hidden_states[-2].prefix[1, 0]
            )
            < TOL
        )
        default = llava_features(apt, x, -2, "default")
        assert rel_err(default.tokens, torch.cat([t[1:] for t in merged.per_image()])) < TOL


def test_llava_selection_errors():
    hf = hf_model("siglip_b16")
    apt = aptvit.convert(hf)
    x = images(224, b=1)
    with pytest.raises(InputError, match="has none"):
        llava_features(apt, x, -1, "default")
    with pytest.raises(InputError, match="hidden states"):
        llava_features(apt, x, 3, "full")  # 2 layers: 3 hidden states, indices -3..2
    with pytest.raises(InputError, match="'default' or 'full'"):
        llava_features(apt, x, -1, "cls")


# ---------------------------------------------------------------------------------------------- files
def test_saved_hf_model_loads_from_the_file_alone(tmp_path):
    torch.manual_seed(0)
    cfg = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, patch_size=16,
                             image_size=64, projection_dim=32, num_hidden_layers=2)  # fmt: skip
    hf = T.CLIPVisionModelWithProjection(cfg).eval()
    apt = aptvit.convert(hf, thresholds={32: 5.0}, area_bias=True)
    with torch.no_grad():
        apt.adaptive_embed.detail_proj["32"].weight.normal_()  # a trained detail path travels with the file
    path = aptvit.save(apt, tmp_path / "clip.safetensors")
    meta = aptvit.nn.checkpoint.read_metadata(path)
    source = json.loads(meta["hf_source"])
    assert source["class"] == "CLIPVisionModelWithProjection" and source["config"]["hidden_size"] == 64
    loaded = aptvit.load(path)
    assert isinstance(loaded.timm_model, HFVisionTransformer)
    assert loaded.timm_model.pos_resample == apt.timm_model.pos_resample
    x = images(96, b=2)  # another size: positions resampled as CLIP does
    with torch.no_grad():
        assert rel_err(loaded(x), apt(x)) == 0
        a, b = hf_outputs(loaded, x, output_hidden_states=True), hf_outputs(apt, x, output_hidden_states=True)
        assert rel_err(a.last_hidden_state.tokens, b.last_hidden_state.tokens) == 0


SMALL = {  # one of each head an HF tower brings: a projection, a pooler, an attention pool, none
    "clip_projection": lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=16, image_size=32, projection_dim=16,
        num_hidden_layers=1)),
    "vit_pooler": lambda: T.ViTModel(T.ViTConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=32, patch_size=16, num_hidden_layers=1)),
    "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=16, image_size=32, num_hidden_layers=1)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(
        hidden_size=32, num_attention_heads=2, patch_size=16, image_size=32, num_hidden_layers=1)),
}  # fmt: skip


@pytest.mark.parametrize("name", SMALL)
def test_a_tower_given_a_classifier_saves_and_loads_it(tmp_path, name):
    """``aptvit finetune`` gives a converted tower a new classifier (``reset_classifier``): the file holds a head the
    HF source does not describe, and ``load`` rebuilds it (it had refused the file: unexpected head weights)."""
    torch.manual_seed(0)
    apt = aptvit.convert(SMALL[name]().eval())
    apt.reset_classifier(5)
    with torch.no_grad():
        apt.head.weight.normal_()
    loaded = aptvit.load(aptvit.save(apt, tmp_path / f"{name}.safetensors"))
    assert loaded.num_classes == 5
    x = images(32, b=2)
    with torch.no_grad():
        assert rel_err(loaded(x), apt(x)) == 0


def test_bad_hf_source_in_a_file_is_one_error(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = T.ViTConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=32, num_hidden_layers=1)
    path = aptvit.save(aptvit.convert(T.ViTModel(cfg)), tmp_path / "vit.safetensors")
    meta = aptvit.nn.checkpoint.read_metadata(path)
    for bad, match in (("{", "not valid JSON"), ('{"class": "BertModel", "config": {}}', "BertModel"),
                       ('{"class": "ViTModel", "config": {"hidden_size": 1e9}}', "hidden_size")):  # fmt: skip
        save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={**meta, "hf_source": bad})
        with pytest.raises(InputError, match=match):
            aptvit.load(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------- refusals
def test_unsupported_hf_models_are_refused_by_name():
    torch.manual_seed(0)
    text = T.CLIPTextModel(
        T.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(UserTypeError, match="CLIPTextModel.*CLIPVisionModel"):
        aptvit.convert(text)
    swiglu = T.Dinov2Model(
        T.Dinov2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, use_swiglu_ffn=True)
    )
    with pytest.raises(InputError, match="use_swiglu_ffn"):
        aptvit.convert(swiglu)
    odd = T.ViTModel(T.ViTConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1,
                                 hidden_act="silu"))  # fmt: skip
    with pytest.raises(InputError, match="hidden_act 'silu'"):
        aptvit.convert(odd)


def test_a_tensor_the_twin_would_not_use_is_refused():
    """The mapping is checked: an HF tensor with no timm counterpart stops the conversion (it would be ignored)."""
    torch.manual_seed(0)
    hf = T.ViTModel(T.ViTConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1))
    hf.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(UserTypeError, match="extra_scale"):
        to_timm(hf)
