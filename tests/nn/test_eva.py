"""The Eva family (EVA-02, DINOv3, RoPE-ViT mixed, Perception Encoder): exact against timm when nothing merges, and
a merged forward equal to timm's own Eva blocks run with timm's RoPE evaluated at every patch's fractional centre."""

import math

import pytest
import torch
from timm.layers import pos_embed_sincos as ps

import aptvit
from aptvit.nn.families.eva import EvaFamily, rope_tables

from ..dispatch import OpCounter
from ..tiny import rel_err, tiny_vit
from .test_reference import boxes_of, make_images, reference_token

EVA = sorted(EvaFamily.tiny)
TOL = 1e-5
# structure variants of the tiny models, not worth a family of their own in every generic test
VARIANTS = {
    # grouped-query attention (separate projections, one k / v head) with axial RoPE in AttentionRope
    "gqa_axial": ("rope_mixed", dict(rope_type="cat", qkv_fused=False, num_kv_heads=1)),
    # EVA-01 / CLIP style post-norm blocks
    "post_norm": ("eva02", dict(use_post_norm=True)),
    # q / k norms, the attention's inner norm, a layer scale on the attention branch only
    "inner_norms": ("eva02", dict(qk_norm=True, scale_attn_inner=True, init_values=0.5, attn_only_layer_scale=True)),
}
CASES = {**{name: (name, {}) for name in EVA}, **VARIANTS}


def tiny_eva(case, seed=0, **overrides):
    """A tiny Eva (a name of ``CASES``): ``tiny_vit``'s healthy layer scales (near 1) and mixed RoPE frequencies of
    timm's own scale."""
    family, extra = CASES[case]
    return tiny_vit(family, seed=seed, **{**extra, **overrides})


def never_merge(model):
    p = model.patch_embed.patch_size[0]
    return aptvit.convert(model, thresholds={2 * p: -1.0, 4 * p: -1.0})


@pytest.mark.parametrize("name", sorted(CASES))
def test_nothing_merged_equals_timm(name):
    model = tiny_eva(name)
    apt = never_merge(model)
    p = model.patch_embed.patch_size[0]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4 * p, 6 * p)
    n = model.num_prefix_tokens
    with torch.no_grad():
        assert rel_err(apt(x), model(x)) <= TOL
        tokens, layout = apt.forward_features(x)
        ref = model.forward_features(x)  # (B, P + HW, D)
        assert rel_err(tokens, ref.reshape(-1, ref.shape[-1])) <= TOL
        dense = apt.forward_dense(x)
        assert rel_err(dense, ref[:, n:].reshape(2, 4, 6, -1).permute(0, 3, 1, 2)) <= TOL
        final, inter = apt.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=bool(n))
        ref_final, ref_inter = model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=bool(n))
        assert rel_err(final, ref_final) <= TOL
        for a, b in zip(inter, ref_inter):
            a, b = (a, b) if n else ((a, None), (b, None))
            assert a[0].shape == b[0].shape and rel_err(a[0], b[0]) <= TOL
            assert not n or rel_err(a[1], b[1]) <= TOL
        # images of mixed sizes in one list: each equals timm on that image alone (its own grid and RoPE)
        images = [torch.randn(3, 4 * p, 4 * p), torch.randn(3, 2 * p, 6 * p)]
        out = apt(images)
        for i, img in enumerate(images):
            assert rel_err(out[i], model(img[None])[0]) <= TOL


# ---- merged patches: timm's Eva blocks on one image at a time, with timm's RoPE at each patch's centre
def timm_rope_at_centres(model, boxes, p, grid):
    """timm's own RoPE rows for patches (y, x, s) at their centres (y + s/2) / p - 1/2: a grid shifted by the
    centre's fraction (timm's ``grid_offset``), read at the centre's integer part; mixed: timm's function at the
    fractional coordinates. Returns what timm's blocks take as ``rope`` for this one image."""
    rope = model.rope
    h, w = grid
    centres = [((y + s / 2) / p - 0.5, (x + s / 2) / p - 0.5) for y, x, s in boxes]
    if isinstance(rope, ps.RotaryEmbeddingMixed):
        cy = torch.tensor([c[0] for c in centres])
        cx = torch.tensor([c[1] for c in centres])
        t_x, t_y = (cx, cy) if rope.grid_indexing == "xy" else (cy, cx)
        return ps.get_mixed_freqs(rope.freqs, t_x, t_y)  # (depth, H, n, 2 hd)
    rows = []
    for cy, cx in centres:
        frac = cy - math.floor(cy)
        assert frac == cx - math.floor(cx)
        if isinstance(rope, ps.RotaryEmbeddingDinoV3):
            shifted = ps.RotaryEmbeddingDinoV3(
                rope.dim,
                temperature=rope.temperature,
                normalize_coords=rope.normalize_coords,
                grid_offset=rope.grid_offset + frac,
                grid_indexing=rope.grid_indexing,
                rotate_half=rope.rotate_half,
            ).eval()
            table = shifted.get_embed((h, w))
        else:
            sin, cos = ps.build_rotary_pos_embed(
                [h, w],
                rope.bands,
                in_pixels=False,
                ref_feat_shape=rope.ref_feat_shape,
                grid_offset=rope.grid_offset + frac,
                grid_indexing=rope.grid_indexing,
                rotate_half=rope.rotate_half,
            )
            table = torch.cat([sin, cos], -1)
        rows.append(table[math.floor(cy) * w + math.floor(cx)])
    return torch.stack(rows)


def eva_reference(model, apt, image, boxes, p):
    """One image through timm's Eva modules: reference tokens (resize + detail + mean position), prefix tokens in
    front, ``norm_pre``, timm's blocks with the RoPE above, ``norm``, timm's pooling weighted by area."""
    h, w = image.shape[-2] // p, image.shape[-1] // p
    assert (h, w) == tuple(model.patch_embed.grid_size), "native grid: positions are not resampled"
    n = model.num_prefix_tokens
    pos_grid = pos_prefix = None
    if model.pos_embed is not None:
        k = 0 if model.no_embed_class else n
        pos_prefix, pos_grid = model.pos_embed[:, :k], model.pos_embed[0, k:].reshape(h, w, -1).permute(2, 0, 1)
    tokens = torch.stack([reference_token(model, apt, image, y, x, s, p, pos_grid) for y, x, s in boxes])[None]
    prefix = [t for t in (model.cls_token, model.reg_token) if t is not None]
    if prefix:
        prefix = torch.cat(prefix, dim=1)
        if pos_prefix is not None and pos_prefix.shape[1]:
            prefix = prefix + pos_prefix
        tokens = torch.cat([prefix, tokens], dim=1)
    seq = model.norm_pre(model.pos_drop(tokens))
    rope = timm_rope_at_centres(model, boxes, p, (h, w)) if model.rope is not None else None
    for i, blk in enumerate(model.blocks):
        seq = blk(seq, rope=rope[i] if model.rope_mixed else rope)
    final = model.norm(seq)
    patches = final[0, n:]
    area = torch.tensor([(s // p) ** 2 for _, _, s in boxes], dtype=patches.dtype)
    if model.attn_pool is not None:
        pooled = model.attn_pool(final)[0]  # timm's Eva: the pool sees every token, each once
    else:
        avg = (patches * area[:, None]).sum(0) / area.sum()
        pooled = {"token": final[0, 0], "avg": avg, "max": patches.amax(0)}[model.global_pool]
    return model.head(model.head_drop(model.fc_norm(pooled)))


def merged_setup(name):
    p = tiny_eva(name).patch_embed.patch_size[0]
    model = tiny_eva(name, img_size=(8 * p, 12 * p))
    apt = aptvit.convert(model, thresholds={2 * p: 5.0, 4 * p: 4.0}, area_bias=False).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a non-zero detail path, as after fine-tuning
        for param in apt.adaptive_embed.parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=g))
    x = make_images(p)
    layout = apt.make_layout(x)
    counts = layout.size_counts()
    assert counts[2 * p].sum() > 0 and counts[4 * p].sum() > 0, "both large sizes are used"
    return model, apt, p, x, layout


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_forward_equals_timm_blocks_with_rope_at_patch_centres(name):
    model, apt, p, x, layout = merged_setup(name)
    with torch.no_grad():
        logits = apt(x, layout=layout)
        want = torch.stack([eva_reference(model, apt, x[i], boxes_of(layout, i), p) for i in range(2)])
    assert rel_err(logits, want) <= TOL


@pytest.mark.parametrize("name", ["eva02", "dinov3", "rope_mixed"])
def test_rope_rows_of_merged_patches_are_timms_at_their_centres_and_prefix_rows_are_identity(name):
    model, apt, p, x, layout = merged_setup(name)
    packed = apt.prepare(x, layout)
    with torch.no_grad():
        tables = rope_tables(model.rope, packed)
    n, hd = model.num_prefix_tokens, model.blocks[0].attn.head_dim
    identity = torch.cat([torch.zeros(hd), torch.ones(hd)])
    for i in range(2):
        boxes = boxes_of(layout, i)
        lo = packed.offsets[i]
        rows = tables.table[..., lo + n : lo + n + len(boxes), :, :]
        want = timm_rope_at_centres(model, boxes, p, (8, 12))
        if tables.per_block:  # (depth, n, H, 2 hd) against timm's (depth, H, n, 2 hd)
            assert rel_err(rows, want.transpose(1, 2)) <= 1e-6
        else:
            assert rel_err(rows[:, 0], want) <= 1e-6
        prefix = tables.table[..., lo : lo + n, :, :]
        assert n and torch.equal(prefix, identity.expand_as(prefix)), "class / register tokens are not rotated"


@pytest.mark.parametrize("name", ["eva02", "rope_mixed"])
def test_each_image_in_a_mixed_batch_equals_its_output_alone(name):
    model = tiny_eva(name)
    p = model.patch_embed.patch_size[0]
    apt = aptvit.convert(model, thresholds={2 * p: 5.0, 4 * p: 4.0})
    torch.manual_seed(2)
    img = torch.rand(3, 3, 6 * p, 8 * p)
    img[0] = 0.5
    img[1, :, : 3 * p] = 0.2
    x = (img - 0.5) / 0.5
    layout = apt.make_layout(x)
    assert len(set(layout.num_tokens.tolist())) > 1
    with torch.no_grad():
        together = apt(x, layout=layout)
        for i in range(3):
            assert rel_err(together[i], apt(x[i : i + 1])[0]) <= TOL


@pytest.mark.parametrize("name", ["eva02", "dinov3", "rope_mixed", "pe_map"])
def test_forward_packed_reads_nothing_back(name):
    model = tiny_eva(name)
    p = model.patch_embed.patch_size[0]
    apt = aptvit.convert(model, thresholds={2 * p: 6.0, 4 * p: 5.0})
    img = torch.rand(2, 3, 8 * p, 8 * p)
    img[:, :, : 4 * p, : 4 * p] = 0.5
    x = (img - 0.5) / 0.5
    with torch.no_grad():
        packed = apt.prepare(x)
        assert (packed.layout.size > p).any()
        with OpCounter() as ops:
            apt.forward_packed(x, packed)
    assert ops.data_dependent == [] and ops.host_reads == 0, ops.data_dependent


def test_mixed_rope_frequencies_train_through_the_packed_forward():
    model = tiny_eva("rope_mixed")
    apt = aptvit.convert(model, thresholds={32: 5.0, 64: 4.0}).train()
    img = torch.rand(2, 3, 64, 96)
    img[:, :, :32] = 0.5
    apt((img - 0.5) / 0.5).square().sum().backward()
    assert model.rope.freqs.grad is not None and model.rope.freqs.grad.abs().sum() > 0
    assert "rope.freqs" in apt.no_weight_decay() and "rope.freqs" in dict(apt.named_parameters())


def test_models_it_cannot_run_are_refused_with_the_reason():
    import timm

    kw = dict(pretrained=False, depth=1, embed_dim=64, num_heads=2, num_classes=0)
    with pytest.raises(TypeError, match="patch dropout"):
        aptvit.convert(timm.create_model("eva02_tiny_patch14_224", patch_drop_rate=0.1, **kw))
    with pytest.raises(TypeError, match="coordinate augmentation"):
        aptvit.convert(timm.create_model("vit_small_patch16_dinov3", rope_shift_coords=0.5, **kw))


@pytest.mark.slow
def test_forward_packed_compiles_with_fullgraph_and_dynamic_shapes():
    """The RoPE tables and the per-block lookup of mixed frequencies trace without a graph break (depth 1: both
    depths 1 and 2 compiled here, the second in ~5 minutes on 2 busy cores)."""
    torch._dynamo.reset()
    model = tiny_eva("rope_mixed", depth=1)
    p = model.patch_embed.patch_size[0]
    apt = aptvit.convert(model, thresholds={2 * p: 6.0, 4 * p: 5.0}, attention="pad")
    img = torch.rand(2, 3, 8 * p, 8 * p)
    img[:, :, : 4 * p, : 4 * p] = 0.5
    x = (img - 0.5) / 0.5
    with torch.no_grad():
        packed = apt.prepare(x)
        compiled = torch.compile(apt.forward_packed, fullgraph=True, dynamic=True, backend="aot_eager")
        assert rel_err(compiled(x, packed), apt.forward_packed(x, packed)) <= TOL
    torch._dynamo.reset()


@pytest.mark.parametrize("area_bias", [False, True])
def test_every_eva_attention_gets_the_area_bias_when_it_is_on(monkeypatch, area_bias):
    from aptvit.nn import attention

    seen = []
    loop = attention.BACKENDS["loop"]

    def recording(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias=None):
        seen.append(key_bias)  # every block's attention call, through the public backend registry
        return loop.run(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, offsets, pad_index, seq, key_bias)

    monkeypatch.setitem(attention.BACKENDS, "recording", attention.BACKENDS["loop"])  # restored after the test
    attention.register_backend("recording", recording, available=lambda *a: True, overwrite=True)
    model = tiny_eva("dinov3")
    apt = aptvit.convert(model, thresholds={32: 5.0, 64: 4.0}, area_bias=area_bias, attention="recording")
    img = torch.rand(2, 3, 64, 96)
    img[:, :, :32] = 0.5
    x = (img - 0.5) / 0.5
    packed = apt.prepare(x)
    with torch.no_grad():
        apt(x, packed=packed)
    assert len(seen) == len(model.blocks)
    for bias in seen:
        assert (bias is packed.key_bias) if area_bias else bias is None


def test_eva_checkpoints_run_in_the_cli_bench_from_their_metadata(tmp_path, capsys):
    """A saved Eva (EVA-02: GluMlp; DINOv3: registers and RoPE; PE: attention pool) re-creates from its metadata in
    the CLI."""
    import json

    from aptvit.cli import main

    for name, extra in (("eva02", dict(mlp_ratio=3.0)), ("dinov3", {}), ("pe_map", {})):  # EVA-02's own MLP width
        model = tiny_eva(name, **extra)
        path = aptvit.save(aptvit.convert(model, budget=0.5), tmp_path / f"{name}.safetensors")
        size = str(4 * model.patch_embed.patch_size[0])
        code = main(
            ["bench", "--checkpoint", str(path), "--size", size, "--batch", "2", "--runs", "1", "--warmup", "0"]
            + ["--device", "cpu", "--out", str(tmp_path / f"{name}.json")]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        (row,) = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert 0 < row["tokens"] <= row["base_tokens"] and row["flop_ratio"] > 0 and not math.isnan(row["apt_ms"])


@pytest.mark.parametrize("name", ["eva02", "pe_map"])
def test_reset_classifier_gives_a_new_label_set_equal_to_timms(name):
    model = tiny_eva(name)
    apt = never_merge(model)
    apt.reset_classifier(5)
    p = model.patch_embed.patch_size[0]
    x = torch.randn(2, 3, 4 * p, 4 * p)
    with torch.no_grad():
        out = apt(x)
        assert out.shape == (2, 5) and rel_err(out, model(x)) <= TOL


@pytest.mark.parametrize("name", ["dinov3", "rope_mixed", "inner_norms"])
def test_tiny_layer_scales_are_near_one_so_an_error_inside_a_block_shows(name):
    """A layer scale of 0.05 (timm's init for random weights) would shrink each block's branch, and an error in its
    attention (RoPE at a wrong centre, swapped halves), twentyfold: the exactness tests would barely see it."""
    model = tiny_eva(name)
    gammas = [p for n, p in model.named_parameters() if n.split(".")[-1] in ("gamma_1", "gamma_2")]
    assert gammas and all(0.7 < float(g.abs().mean()) < 1.3 for g in gammas)
    if name == "rope_mixed":  # learned frequencies of timm's scale (init_random_2d_freqs at theta 10)
        assert float(model.rope.freqs.abs().max()) > 0.5
