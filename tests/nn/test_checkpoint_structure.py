"""A checkpoint records the MLP width it really has: EVA-02's SwiGLU / GluMlp (fc1 holding both halves), SwiGLU with
its norm, and widths whose ratio ``hidden / dim`` rounds down; a file whose ``mlp_ratio`` does not give its tensors'
width is refused by name before anything is built."""

import json

import pytest
import torch

import aptvit
from aptvit.core.io import InputError
from aptvit.nn.checkpoint import read_metadata
from aptvit.nn.families.base import mlp_ratio_of

from ..cli.test_hostile import with_metadata
from ..tiny import rel_err, tiny_vit

CASES = {
    # EVA-02: SwiGLU packed in one GluMlp (fc1: 2 x 192 rows, fc2: 192 inputs), a ratio other than the name's 8/3
    "eva02_glu": ("eva02", dict(mlp_ratio=3.0), 192),
    # EVA-02 B/L: SwiGLU with its norm (fc1_g, fc1_x)
    "eva02_swiglu_norm": ("eva02_sep_no_abs", dict(mlp_ratio=3.0), 192),
    # 115 / 56 rounds down: int(56 * (115 / 56)) is 114
    "eva02_glu_rounding": ("eva02", dict(embed_dim=56, mlp_ratio=115.5 / 56), 115),
    "vit_rounding": ("vit_cls", dict(embed_dim=56, mlp_ratio=115.5 / 56), 115),
}


def saved(tmp_path, case):
    name, overrides, hidden = CASES[case]
    model = tiny_vit(name, **overrides)
    assert model.blocks[0].mlp.fc2.in_features == hidden
    apt = aptvit.convert(model, budget=0.5)
    return apt, aptvit.save(apt, tmp_path / f"{case}.safetensors")


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_mlp_width_survives_save_and_load_from_the_metadata_alone(tmp_path, case):
    apt, path = saved(tmp_path, case)
    again = aptvit.load(path)  # re-created from the architecture name and timm_args, no model=
    assert again.timm_model.blocks[0].mlp.fc2.in_features == CASES[case][2]
    assert type(again.timm_model.blocks[0].mlp) is type(apt.timm_model.blocks[0].mlp)
    p = apt.patch_size
    x = torch.randn(2, 3, 4 * p, 6 * p)
    with torch.no_grad():
        assert rel_err(again(x), apt(x)) == 0.0


@pytest.mark.parametrize("case", ["eva02_glu", "eva02_swiglu_norm", "vit_rounding"])
def test_a_file_whose_mlp_ratio_does_not_give_its_tensors_width_is_refused_by_name(tmp_path, case):
    _, path = saved(tmp_path, case)
    args = json.loads(read_metadata(path)["timm_args"])
    dim, hidden = args["embed_dim"], CASES[case][2]
    wrong = with_metadata(path, tmp_path / "wrong.safetensors", timm_args=json.dumps({**args, "mlp_ratio": 4 * 2 / 3}))
    want = rf"mlp_ratio 2\.666\d* gives {int(dim * 4 * 2 / 3)} hidden features at width {dim}; .*blocks\.0\.mlp has {hidden}"
    with pytest.raises(InputError, match=want):
        aptvit.load(wrong)


def test_attention_pool_mlp_ratio_is_checked_too(tmp_path):
    apt = aptvit.convert(tiny_vit("pe_map"), budget=0.5)
    path = aptvit.save(apt, tmp_path / "pe.safetensors")
    args = json.loads(read_metadata(path)["timm_args"])
    hidden = apt.timm_model.attn_pool.mlp.fc1.out_features
    assert int(args["embed_dim"] * args["attn_pool_mlp_ratio"]) == hidden
    wrong = with_metadata(path, tmp_path / "w.safetensors", timm_args=json.dumps({**args, "attn_pool_mlp_ratio": 1.0}))
    with pytest.raises(InputError, match=rf"attn_pool_mlp_ratio 1\.0 gives 64 hidden .* attn_pool\.mlp has {hidden}"):
        aptvit.load(wrong)


def test_mlp_ratio_of_gives_timms_width_back():
    for dim in (56, 64, 88, 192, 2045):
        for hidden in range(dim // 2, 5 * dim, 7):
            assert int(dim * mlp_ratio_of(hidden, dim)) == hidden
    assert int(56 * (115 / 56)) == 114 and mlp_ratio_of(115, 56) > 115 / 56  # the case the plain quotient misses
