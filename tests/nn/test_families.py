"""The family adapters: SigLIP's attention pool and distilled DeiT against timm, isolation, no hidden state,
``packed=`` on every entry point, README's table rendered from the adapters."""

import math
import pickle
import re
from pathlib import Path

import pytest
import torch

import aptvit
from aptvit.nn.families import FAMILIES as ADAPTERS
from aptvit.nn.families import supported_table
from aptvit.nn.families.pool import attention_pool

from ..tiny import FAMILIES, FAMILY_OF, rel_err, tiny_vit

NEW = ["siglip_map", "deit_distilled"]


def never(model):
    p = model.patch_embed.patch_size[0]
    return aptvit.convert(model, thresholds={2 * p: -1.0, 4 * p: -1.0})


def mixed_batch(b=3, p=16, seed=2):
    """Normalised images with plain regions of different extents: merges, and different token counts."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, 6 * p, 8 * p, generator=g)
    img[0] = 0.5
    img[1, :, : 3 * p] = 0.2
    return (img - 0.5) / 0.5


@pytest.mark.parametrize("family", NEW)
def test_nothing_merged_equals_timm_features_dense_and_intermediates(family):
    model = tiny_vit(family)
    apt = never(model)
    p, n_prefix = model.patch_embed.patch_size[0], model.num_prefix_tokens
    torch.manual_seed(1)
    x = torch.randn(2, 3, 3 * p, 5 * p)
    with torch.no_grad():
        ref = model.forward_features(x)  # (B, P + 15, D)
        tokens, layout = apt.forward_features(x)
        assert rel_err(tokens.view(2, n_prefix + 15, -1), ref) <= 1e-5
        assert rel_err(apt(x), model(x)) <= 1e-5
        grid = apt.forward_dense(x)
        assert rel_err(grid, ref[:, n_prefix:].reshape(2, 3, 5, -1).permute(0, 3, 1, 2)) <= 1e-5
        final, inter = apt.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=bool(n_prefix))
        ref_final, ref_inter = model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=bool(n_prefix))
        assert rel_err(final, ref_final) <= 1e-5
        for a, b in zip(inter, ref_inter):
            for u, v in zip(a, b) if n_prefix else [(a, b)]:
                assert u.shape == v.shape and rel_err(u, v) <= 1e-5


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("backend", ["loop", "pad"])
def test_each_image_in_a_mixed_batch_equals_its_output_alone(family, backend):
    apt = aptvit.convert(tiny_vit(family), thresholds={32: 5.0, 64: 4.0}, attention=backend)
    x = mixed_batch()
    layout = apt.make_layout(x)
    assert len(set(layout.num_tokens.tolist())) == 3 and (layout.size > 16).any()
    with torch.no_grad():
        together = apt(x, layout=layout)
        for i in range(3):
            assert rel_err(together[i], apt(x[i : i + 1])[0]) <= 1e-5


def test_attention_pool_is_timms_on_each_images_own_tokens():
    """Direct: packed tokens of three images (and padding) give timm's pool of each image's tokens alone."""
    model = tiny_vit("siglip_map")
    apt = aptvit.convert(model, thresholds={32: 5.0, 64: 4.0})
    x = mixed_batch()
    with torch.no_grad():
        packed = apt.prepare(x, pad_to=64)
        assert packed.pad > 0
        tokens = torch.randn(packed.total, apt.embed_dim)
        pooled = attention_pool(model.attn_pool, tokens, packed)
        for i in range(3):
            own = tokens[packed.patch_pos[packed.layout.image_index == i]]
            assert rel_err(pooled[i], model.attn_pool(own[None])[0]) <= 1e-5


def test_area_key_bias_weighs_a_merged_token_as_its_cells():
    """A key with bias log(k^2) counts as k^2 copies of that key: the pool of a merged layout with log-area key
    biases equals timm's pool over the same tokens repeated once per covered cell."""
    model = tiny_vit("siglip_map")
    apt = aptvit.convert(model, thresholds={32: 5.0, 64: 4.0}, area_bias=False)
    x = mixed_batch()
    with torch.no_grad():
        packed = apt.prepare(x)
        layout = packed.layout
        tokens = torch.randn(packed.total, apt.embed_dim)
        area = torch.zeros(packed.total).index_copy_(0, packed.patch_pos, (layout.size / 16.0).square())
        bias = torch.where(area > 0, area.clamp_min(1).log(), torch.zeros(()))
        assert torch.allclose(packed.key_bias, bias)  # the plan's key bias is this log-area
        pooled = attention_pool(model.attn_pool, tokens, packed, key_bias=packed.key_bias)
        # the model's pool uses it exactly when its area_bias setting is on
        assert torch.equal(apt.family.pool(apt, tokens, packed), attention_pool(model.attn_pool, tokens, packed))
        apt.configure(area_bias=True)
        assert torch.equal(apt.family.pool(apt, tokens, packed), pooled)
        for i in range(2):  # the plain image and the half-plain one
            sel = layout.image_index == i
            repeats = (layout.size[sel] // 16).square()
            assert (repeats > 1).any()
            own = tokens[packed.patch_pos[sel]].repeat_interleave(repeats, dim=0)
            assert rel_err(pooled[i], model.attn_pool(own[None])[0]) <= 1e-5


def test_distilled_averages_in_eval_and_returns_the_pair_in_distilled_training():
    model = tiny_vit("deit_distilled")
    apt = never(model)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        cls_dist = model.forward_features(x)[:, :2]
        want = (model.head(cls_dist[:, 0]) + model.head_dist(cls_dist[:, 1])) / 2
        assert rel_err(apt(x), want) <= 1e-5 and rel_err(apt(x), model(x)) <= 1e-5
        assert rel_err(apt.forward_packed(x, apt.prepare(x), pre_logits=True), cls_dist.mean(1)) <= 1e-5
        apt.train()
        assert rel_err(apt(x), want) <= 1e-5, "training without distillation: still the average, as timm"
        apt.set_distilled_training(True)
        out, out_dist = apt(x)
        model.train()
        ref, ref_dist = model(x)
        assert rel_err(out, ref) <= 1e-5 and rel_err(out_dist, ref_dist) <= 1e-5
        assert rel_err(out, model.head(cls_dist[:, 0])) <= 1e-5
        apt.eval()
        assert rel_err(apt(x), want) <= 1e-5, "eval: the average even in distilled training"
    assert apt.get_classifier() == (apt.head, apt.head_dist)
    apt.reset_classifier(3)
    assert apt.head is model.head and apt.head_dist is model.head_dist and apt.head_dist.out_features == 3
    assert {"head.weight", "head_dist.weight"} <= set(apt.state_dict())
    with pytest.raises(ValueError, match="no distillation head"):
        never(tiny_vit("vit_cls")).set_distilled_training(True)


def test_no_attribute_is_written_during_a_forward():
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 5.0, 64: 4.0})
    x = mixed_batch(2)
    with torch.no_grad():
        apt(x)
        before = dict(vars(apt))
        features = apt.forward_features(x)
        apt.forward_head(features)
        apt.forward_dense(x)
        apt.encode_tokens(x, layer=-1)
        apt.forward_intermediates(x, indices=1)
        apt(x)
    assert vars(apt).keys() == before.keys()
    assert all(vars(apt)[k] is v for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(apt.forward_head(apt.forward_features(x)), apt.forward_head(features))
    with pytest.raises(ValueError, match="needs the plan"):
        apt.forward_head(features.tokens)
    again = pickle.loads(pickle.dumps(features))  # e.g. handed between processes: still carries its plan
    tokens, layout = again
    assert torch.equal(tokens, features.tokens) and again.packed.total == features.packed.total


def test_positions_follow_the_weights_device_and_dtype():
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 5.0, 64: 4.0})
    x = mixed_batch(2)
    with torch.no_grad():
        before = apt(x)
        # ``.to()`` / ``.double()`` / ``.cuda()`` keep the Parameter objects and their versions but give them new
        # storage (``param.data = ...``): the positions of the next forward are the new weights'
        apt.pos_embed.data = apt.pos_embed.data + 1.0
        assert not torch.equal(before, apt(x))
        apt.double()
        assert apt.embed(x.double(), apt.make_layout(x)).dtype == torch.float64
        assert apt.family.positions(apt, apt.prepare(x.double()).groups)[0].dtype == torch.float64


@pytest.mark.parametrize("family", ["vit_cls", "siglip_map", "deit_distilled"])
def test_every_entry_point_takes_a_finished_plan(family):
    apt = aptvit.convert(tiny_vit(family), thresholds={32: 5.0, 64: 4.0})
    x = mixed_batch(2)
    with torch.no_grad():
        layout = apt.make_layout(x, budget=0.3)  # not the model's own settings: the plan given is the one used
        packed = apt.planner(x, layout)  # as a data-loader worker makes it
        assert apt.encode_tokens(x)[0].shape[0] != packed.layout.total_tokens
        pairs = [
            (apt(x, packed=packed), apt(x, layout=layout)),
            (apt.forward_features(x, packed=packed).tokens, apt.forward_features(x, layout=layout).tokens),
            (apt.forward_dense(x, packed=packed), apt.forward_dense(x, layout=layout)),
            (apt.encode_tokens(x, packed=packed)[0], apt.encode_tokens(x, layout=layout)[0]),
            (apt.encode_tokens(x, packed=packed, layer=0)[0], apt.encode_tokens(x, layout=layout, layer=0)[0]),
            (apt.forward_intermediates(x, packed=packed)[0], apt.forward_intermediates(x, layout=layout)[0]),
            (apt.embed(x, packed=packed), apt.embed(x, layout)),
        ]
        for i, (a, b) in enumerate(pairs):
            assert torch.equal(a, b), i
        with pytest.raises(ValueError, match="not both"):
            apt(x, layout=apt.make_layout(x), packed=packed)


def test_attention_pools_timm_cannot_run_packed_are_refused():
    model = tiny_vit("siglip_map")
    model.attn_pool.pool = "max"
    with pytest.raises(TypeError, match="cannot convert VisionTransformer: attention pool type 'max'"):
        aptvit.convert(model)


def test_every_family_has_tiny_models_that_convert():
    for family in ADAPTERS.values():
        assert family.tiny, family.name
        for name in family.tiny:
            apt = aptvit.convert(tiny_vit(name))
            assert apt.family is family and name in FAMILIES


def test_readme_supported_table_is_rendered_from_the_adapters():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = supported_table()
    assert len(table.splitlines()) == 2 + len(ADAPTERS)
    found = re.search(r"<!-- families -->\n(.*?)\n<!-- /families -->", readme, re.S)
    assert found, "README has the generated table between <!-- families --> markers"
    assert found.group(1) == table, "README's table is stale: paste aptvit.nn.families.supported_table()"


def test_distilled_and_siglip_checkpoints_run_in_bench(tmp_path, capsys):
    from aptvit.cli import main

    for family in NEW:
        path = aptvit.save(aptvit.convert(tiny_vit(family), budget=0.5), tmp_path / f"{family}.safetensors")
        code = main(
            ["bench", "--checkpoint", str(path), "--size", "64", "--batch", "2", "--runs", "1", "--warmup", "0"]
            + ["--device", "cpu", "--out", str(tmp_path / f"{family}.json")]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        import json

        (row,) = json.loads((tmp_path / f"{family}.json").read_text())["rows"]
        assert 0 < row["tokens"] <= row["base_tokens"] and row["flop_ratio"] > 0 and not math.isnan(row["apt_ms"])


def test_a_new_family_plugs_in_with_per_token_tables_applied_to_q_and_k(monkeypatch):
    """The RoPE seam: a family's ``token_tables`` (built once per forward from the plan) reach every block, and
    ``packed_self_attention(rotate=...)`` applies them to q and k before the kernel, for every packed row."""
    import timm

    from aptvit.core.rope import layout_centres
    from aptvit.nn import families
    from aptvit.nn.attention import packed_self_attention
    from aptvit.nn.families import ViTFamily, drop_path_packed

    class RotaryViT(timm.models.vision_transformer.VisionTransformer):
        pass

    seen = []

    class RotaryFamily(ViTFamily):
        name = "test_rotary"
        tiny = {}

        def accepts(self, model):
            return type(model) is RotaryViT

        def token_tables(self, apt, packed):
            centres = torch.zeros(packed.total, 2).index_copy_(0, packed.patch_pos, layout_centres(packed.layout)[0])
            return centres.sum(1)  # (N,) a per-token angle: 0 for prefix and padding rows

        def block(self, apt, blk, x, ctx):
            def rotate(q, k):  # a 2-D rotation of the first two channels by the token's angle
                seen.append((q.shape, ctx.tables.shape))
                cos, sin = ctx.tables.cos()[:, None], ctx.tables.sin()[:, None]

                def rot(t):
                    a, b = t[..., 0], t[..., 1]
                    return torch.cat([torch.stack([a * cos - b * sin, a * sin + b * cos], -1), t[..., 2:]], -1)

                return rot(q), rot(k)

            a = packed_self_attention(blk.attn, blk.norm1(x), ctx.attention, rotate=rotate)
            x = x + drop_path_packed(blk.ls1(a), blk.drop_path1, ctx.packed.seq, ctx.packed.num_seqs, ctx.training)
            return x + blk.ls2(blk.mlp(blk.norm2(x)))

    monkeypatch.setitem(families.FAMILIES, "test_rotary", RotaryFamily())
    torch.manual_seed(0)
    model = RotaryViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    plain = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=4
    )
    plain.load_state_dict(model.state_dict())
    apt = aptvit.convert(model.eval(), thresholds={32: 5.0, 64: 4.0})
    ref = aptvit.convert(plain.eval(), thresholds={32: 5.0, 64: 4.0})
    assert apt.family.name == "test_rotary"
    x = mixed_batch(2)
    with torch.no_grad():
        packed = apt.prepare(x)
        out = apt.forward_packed(x, packed)
        assert len(seen) == 2 and seen[0] == ((packed.total, 2, 16), (packed.total,))
        # the rotation changed the attention: ~9e-4 of the logits here, float rounding ~1e-7 (the key bias of
        # area_bias now reaches both models through the backend's context, so the rotation is the only difference)
        assert rel_err(out, ref.forward_packed(x, packed)) > 1e-4, "the rotation changed the attention"
        for i in range(2):  # and stays per image
            assert rel_err(out[i], apt(x[i : i + 1])[0]) <= 1e-5


@pytest.mark.parametrize("family", NEW + ["eva02", "pe_map"])  # + EVA-02's GluMlp, PE's pool with its prefix
def test_flop_counts_include_the_attention_pool_and_both_heads(family):
    from torch.utils.flop_counter import FlopCounterMode

    from aptvit.nn.model import model_flops

    model = tiny_vit(family).requires_grad_(False)  # FlopCounterMode's module hooks trip on the latent parameter
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # explicit matmuls, which FlopCounterMode counts
    p = model.patch_embed.patch_size[0]
    apt = aptvit.convert(model, thresholds={2 * p: 5.0, 4 * p: 4.0})
    x = mixed_batch(2, p=p)
    flops = model_flops(apt, apt.make_layout(x))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert flops["uniform"].sum().item() == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert flops["apt"][0] < flops["uniform"][0]


# every family from the command line: SigLIP's attention pool, distilled DeiT, EVA-02 (GluMlp, RoPE + absolute
# table, /14), DINOv3 (registers, its RoPE), PE (RoPE and an attention pool that sees the prefix)
CLI = NEW + ["eva02", "dinov3", "pe_map"]


@pytest.mark.parametrize("family", CLI)
def test_finetune_and_eval_from_the_command_line(tmp_path, capsys, family):
    import json

    from ..cli.helpers import make_folder, run

    data = make_folder(tmp_path / "data")
    model = tiny_vit(family, num_classes=2)  # the data's two classes: the converted model evaluates as it is
    path = aptvit.save(aptvit.convert(model, budget=0.5), tmp_path / "start.safetensors")
    name, p = FAMILIES[family][0], model.patch_embed.patch_size[0]
    argv = [
        "finetune",
        "--model",
        name,
        "--checkpoint",
        path,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--size",
        str(2 * p),
    ]
    code, out, err = run(capsys, *argv, "--batch-size", "4", "--workers", "0", "--no-eval", "--max-steps", "2")
    assert code == 0, err
    tuned = aptvit.load(tmp_path / "run" / "model.safetensors")  # re-created from its metadata alone
    assert tuned.num_classes == 2 and tuned.family.name == ADAPTERS[FAMILY_OF[family]].name
    start, after = model.state_dict(), tuned.timm_model.state_dict()
    assert {k: v.shape for k, v in start.items()} == {k: v.shape for k, v in after.items()}, "the same structure"
    assert any(not torch.equal(start[k], after[k]) for k in start), "the steps trained it"
    for i, checkpoint in enumerate((path, tmp_path / "run" / "model.safetensors")):  # converted, and fine-tuned
        code, out, err = run(
            capsys,
            "eval",
            "--checkpoint",
            checkpoint,
            "--data",
            data,
            "--size",
            str(2 * p),
            "--workers",
            "0",
            "--json",
            tmp_path / f"e{i}.json",
        )
        assert code == 0, err
        assert 0.0 <= json.loads((tmp_path / f"e{i}.json").read_text())["top1"] <= 100.0  # percent
