"""ToMe (benchmarks/tome.py) on its own: token counts, exactness at r = 0, proportional attention."""

import pytest
import timm
import torch
import torch.nn.functional as F

from benchmarks.tome import (
    ToMeViT,
    bipartite_soft_matching,
    merge_weighted,
    proportional_attention,
    token_schedule,
    tome_flops,
)


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kw}).eval()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("r", [1, 5, 16])
def test_each_block_removes_r_tokens(r):
    vit = tiny_vit()
    model = ToMeViT(vit, r)
    seen = []
    hooks = [blk.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1])) for blk in vit.blocks]
    with torch.no_grad():
        x, size = model.forward_features(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    n = 64 + 1
    assert seen == [n - r, n - 2 * r, n - 3 * r]  # the MLP of block i sees N - i r tokens
    assert x.shape[1] == n - 3 * r
    # every input patch is counted once: the sizes add up to the patch count (+ the class token)
    assert torch.allclose(size.sum(dim=(1, 2)), torch.full((2,), float(n)))
    assert torch.all(size[:, 0] == 1)  # the class token never merges


def test_r_zero_equals_timm():
    vit = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = vit(x)
        out = ToMeViT(vit, 0)(x)
    assert rel_err(out, ref) <= 1e-5


def test_proportional_attention_with_unit_sizes_is_plain_attention():
    vit = tiny_vit()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        ref = attn(x)
        out, keys = proportional_attention(attn, x, torch.ones(2, 17, 1))
        bigger, _ = proportional_attention(attn, x, torch.cat([torch.full((2, 1, 1), 4.0), torch.ones(2, 16, 1)], 1))
    assert rel_err(out, ref) <= 1e-5
    assert keys.shape == (2, 17, 16)
    assert rel_err(bigger, ref) > 1e-3  # a token of size 4 does change the result


def test_proportional_attention_counts_a_merged_token_as_its_copies():
    # a token of size 2 attends like two identical tokens of size 1
    vit = tiny_vit()
    attn = vit.blocks[0].attn
    x = torch.randn(1, 5, 32)
    doubled = torch.cat([x, x[:, -1:]], dim=1)
    with torch.no_grad():
        ref = attn(doubled)[:, :5]
        out, _ = proportional_attention(attn, x, torch.tensor([1.0, 1, 1, 1, 2]).view(1, 5, 1))
    assert rel_err(out, ref) <= 1e-5


def test_matching_merges_the_most_similar_pair_size_weighted():
    # tokens 0 (protected), 1..5: token 2 (in A) is a copy of token 5 (in B) up to scale: they merge first
    metric = torch.tensor([[[1.0, 0], [0, 1], [3, 3.1], [-1, 0.2], [0.3, -1], [1, 1]]])
    x = torch.arange(6.0).view(1, 6, 1)
    size = torch.tensor([1.0, 1, 3, 1, 1, 1]).view(1, 6, 1)
    merged, new_size = merge_weighted(bipartite_soft_matching(metric, 1), x, size)
    # A = [0, 2, 4], B = [1, 3, 5]: token 2 merges into 5; A keeps [0, 4], then B [1, 3, 5']
    assert merged.flatten().tolist() == pytest.approx([0, 4, 1, 3, (2 * 3 + 5 * 1) / 4])
    assert new_size.flatten().tolist() == [1, 1, 1, 1, 4]


def test_class_token_never_merges_and_r_is_capped():
    metric = torch.ones(1, 7, 4)  # all equally similar
    merge = bipartite_soft_matching(metric, 100)
    out = merge(torch.arange(7.0).view(1, 7, 1))
    assert out.shape[1] == 7 - 3  # A = [0, 2, 4, 6] of which 3 may merge
    assert out[0, 0, 0] == 0.0
    assert token_schedule(65, 40, 3) == [(65, 32), (33, 16), (17, 8)]


def test_training_gradients_flow_and_flops_fall_with_r():
    vit = tiny_vit(drop_path_rate=0.1)
    model = ToMeViT(vit, 8).train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0
    flops = [tome_flops(vit, r, 64) for r in (0, 4, 8, 16)]
    assert flops == sorted(flops, reverse=True) and flops[-1] < 0.7 * flops[0]


def test_r_zero_flops_equal_aptvit_uniform_count():
    import aptvit
    from aptvit.nn.model import model_flops

    vit = tiny_vit()
    apt = aptvit.convert(vit, patch_sizes=(4, 8), thresholds={8: -1.0})
    layout = apt.make_layout(torch.zeros(1, 3, 32, 32))
    assert tome_flops(vit, 0, 64) == pytest.approx(float(model_flops(apt, layout)["uniform"][0]), rel=1e-9)
