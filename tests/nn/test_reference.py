"""A merged-patch forward against a reference built by hand from timm's own modules, one image and box at a time.

Per image and box (y, x, s) of the layout, the reference token is (APT_NOTES section 4, aptvit/nn/embed.py):

    patch_embed.proj(area-resized crop to p x p)                                    # (a) resize
  + detail_proj[s](detail_merge applied log2(s/p) times to the crop's base-size embeddings)  # (b) detail
  + mean of the base position embeddings the box covers                              # (c) position

then the prefix tokens (class / registers with their positions), timm's own ``blocks`` on that one sequence
(batch of one, plain timm ``Block`` forward), ``norm``, pooling weighted by area (each token counts for the
base cells it covers), ``fc_norm`` and ``head``. Only the APT model's public surface is used (``apt(...)``,
``forward_intermediates``, ``apt.adaptive_embed.*`` modules and the layout's y/x/size/cu_seqlens), so the test holds
through any rewrite of the packed internals.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import aptvit

from ..tiny import FAMILIES, FAMILY_OF, rel_err, tiny_vit

TOL = 1e-5


def make_model(family):
    """A tiny model whose native grid is 8 x 12 cells (no position resampling), with a random detail path."""
    p = 14 if "p14" in family else 16
    model = tiny_vit(family, img_size=(8 * p, 12 * p))
    # the reference runs plain timm blocks: no area-proportional attention (checked against brute force in
    # test_area_bias.py)
    apt = aptvit.convert(model, thresholds={2 * p: 5.0, 4 * p: 4.0}, area_bias=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero detail weights, as after fine-tuning (they start at zero)
        for param in apt.adaptive_embed.parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model, apt.eval(), p


def make_images(p):
    """Two noise images (base patches) with plain regions in different places: 4p and 2p merges, different counts."""
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, 8 * p, 12 * p, generator=g)
    img[0, :, : 4 * p, : 4 * p] = 0.3  # one 4p patch
    img[0, :, 4 * p : 6 * p, 8 * p : 10 * p] = 0.6  # one 2p patch (its 4p parent is not plain)
    img[1, :, 4 * p :, 4 * p :] = torch.linspace(0.2, 0.25, 8 * p)  # a smooth band: 4p patches
    img[1, :, : 2 * p, 10 * p :] = 0.9  # one 2p patch
    return (img - 0.5) / 0.5


def embed_crop(model, crop):
    """timm's PatchEmbed on one crop: (1, C, kp, kp) -> (D, k, k) base-size embeddings (proj, then its norm)."""
    t = model.patch_embed.proj(crop)
    return model.patch_embed.norm(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)[0]


def reference_token(model, apt, image, y, x, s, p, pos_grid):
    """One patch token: resize + detail + mean position. image (C, H, W); pos_grid (D, H/p, W/p) or None."""
    crop = image[None, :, y : y + s, x : x + s]
    token = embed_crop(model, F.interpolate(crop, size=(p, p), mode="area"))[:, 0, 0]
    if s > p:
        detail = embed_crop(model, crop)[None]  # (1, D, k, k)
        for _ in range(int(math.log2(s // p))):
            detail = apt.adaptive_embed.detail_merge(detail)  # the 2x2 stride-2 Conv2d, called as a module
        token = token + apt.adaptive_embed.detail_proj[str(s)](detail.flatten())
    if pos_grid is not None:
        token = token + pos_grid[:, y // p : (y + s) // p, x // p : (x + s) // p].mean((1, 2))
    return token


def reference_forward(model, apt, image, boxes, p):
    """One image through timm's own modules.

    Returns:
        dict with "blocks": [(1, P + N, D) after each block], "final": (1, P + N, D) normalised, "logits": (C,).
    """
    h, w = image.shape[-2:]
    assert (h // p, w // p) == tuple(model.patch_embed.grid_size), "native grid: positions are not resampled"
    n_prefix = model.num_prefix_tokens
    pos = model.pos_embed
    pos_prefix = None
    pos_grid = None
    if pos is not None:
        n_pos_prefix = 0 if model.no_embed_class else n_prefix
        pos_prefix = pos[:, :n_pos_prefix]
        pos_grid = pos[0, n_pos_prefix:].reshape(h // p, w // p, -1).permute(2, 0, 1)
    tokens = torch.stack([reference_token(model, apt, image, y, x, s, p, pos_grid) for y, x, s in boxes])[None]
    prefix = [t for t in (model.cls_token, getattr(model, "dist_token", None), model.reg_token) if t is not None]
    if prefix:
        prefix = torch.cat(prefix, dim=1)
        if pos_prefix is not None and pos_prefix.shape[1]:
            prefix = prefix + pos_prefix
        tokens = torch.cat([prefix, tokens], dim=1)
    seq = model.norm_pre(model.patch_drop(model.pos_drop(tokens)))
    after = []
    for blk in model.blocks:
        seq = blk(seq)  # timm's Block forward on a batch of one
        after.append(seq)
    final = model.norm(seq)
    patches = final[0, n_prefix:]
    area = torch.tensor([(s // p) ** 2 for _, _, s in boxes], dtype=patches.dtype)
    avg = (patches * area[:, None]).sum(0) / area.sum()  # each token counts for the cells it covers
    pool = model.global_pool
    assert not getattr(model, "pool_include_prefix", False)
    if hasattr(model, "head_dist"):  # distilled: both tokens, both heads, averaged (timm's eval mode)
        logits = (model.head(final[0, 0]) + model.head_dist(final[0, 1])) / 2
        return {"blocks": after, "final": final, "logits": logits}
    if pool == "map":  # timm's attention pool on this image's patch tokens alone
        pooled = model.attn_pool(final[:, n_prefix:])[0]
    else:
        pooled = {"token": final[0, 0], "avg": avg, "max": patches.amax(0), "avgmax": 0.5 * (avg + patches.amax(0))}
        pooled = pooled[pool]
    logits = model.head(model.head_drop(model.fc_norm(pooled)))
    return {"blocks": after, "final": final, "logits": logits}


def boxes_of(layout, i):
    lo, hi = int(layout.cu_seqlens[i]), int(layout.cu_seqlens[i + 1])
    return list(zip(layout.y[lo:hi].tolist(), layout.x[lo:hi].tolist(), layout.size[lo:hi].tolist()))


def unmerge(tokens, boxes, p, grid):
    """(N, D) tokens of one image onto its base grid (D, h, w), each repeated over the cells it covers."""
    out = torch.full((tokens.shape[1], *grid), math.nan)
    for t, (y, x, s) in zip(tokens, boxes):
        out[:, y // p : (y + s) // p, x // p : (x + s) // p] = t[:, None, None]
    assert not out.isnan().any(), "the boxes tile the image"
    return out


def setup(family):
    model, apt, p = make_model(family)
    x = make_images(p)
    layout = apt.make_layout(x)
    counts = layout.size_counts()
    assert counts[2 * p].sum() > 0 and counts[4 * p].sum() > 0, "both large sizes are used"
    assert len(set(layout.num_tokens.tolist())) == 2, "the images have different token counts"
    with torch.no_grad():
        refs = [reference_forward(model, apt, x[i], boxes_of(layout, i), p) for i in range(2)]
    return model, apt, p, x, layout, refs


# the Eva family's blocks take RoPE: its merged reference (timm's RoPE at each patch's centre) is in test_eva.py
@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if FAMILY_OF[f] != "eva"))
def test_merged_forward_equals_a_reference_from_timm_modules(family):
    model, apt, p, x, layout, refs = setup(family)
    with torch.no_grad():
        logits = apt(x, layout=layout)
    want = torch.stack([r["logits"] for r in refs])
    assert logits.shape == want.shape
    assert rel_err(logits, want) <= TOL


@pytest.mark.parametrize("family", ["vit_cls", "vit_avg_no_cls", "qknorm_layerscale"])
@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_equal_the_reference_unmerged(family, norm):
    model, apt, p, x, layout, refs = setup(family)
    n_prefix = model.num_prefix_tokens
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    with torch.no_grad():
        final, inter = apt.forward_intermediates(x, layout=layout, norm=norm, return_prefix_tokens=bool(n_prefix))
    assert len(inter) == len(model.blocks)
    for b, item in enumerate(inter):
        feats, prefix = item if n_prefix else (item, None)
        for i, ref in enumerate(refs):
            seq = model.norm(ref["blocks"][b]) if norm else ref["blocks"][b]
            want = unmerge(seq[0, n_prefix:], boxes_of(layout, i), p, grid)
            assert feats.shape[1:] == want.shape
            assert rel_err(feats[i], want) <= TOL, (b, i)
            if n_prefix:
                assert rel_err(prefix[i], seq[0, :n_prefix]) <= TOL, (b, i)
    for i, ref in enumerate(refs):
        patches = unmerge(ref["final"][0, n_prefix:], boxes_of(layout, i), p, grid).flatten(1).T
        want = torch.cat([ref["final"][0, :n_prefix], patches])
        assert rel_err(final[i], want) <= TOL, i
