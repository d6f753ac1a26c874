"""finetune's layer-wise lr decay (--layer-decay): parameter groups by block index, for every model family."""

import json

import pytest
import torch

import aptvit
from aptvit.train import TrainConfig, param_groups
from aptvit.train.config import BEFORE_FIELD

from ..tiny import FAMILIES, tiny_vit
from .helpers import MODEL, finetune_argv, make_folder, run


def scales(apt, **settings) -> dict:
    """Each parameter's ``lr_scale`` by name (every parameter in exactly one group)."""
    names = {id(p): n for n, p in apt.named_parameters()}
    config = TrainConfig(model=MODEL, data="x", out="y", **settings)
    out = {}
    for group in param_groups(apt, config):
        for p in group["params"]:
            assert names[id(p)] not in out, names[id(p)]
            out[names[id(p)]] = group["lr_scale"]
    assert sorted(out) == sorted(names.values())
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_block_learns_at_decay_to_its_distance_from_the_head(family):
    apt = aptvit.convert(tiny_vit(family))
    n = len(apt.blocks)
    scale = scales(apt, layer_decay=0.5, new_layer_lr_scale=7.0)
    for name, s in scale.items():
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            assert s == 0.5 ** (n - i), name  # the last block 0.5, the first 0.5^n
    embedding = [name for name in scale if name.startswith("patch_embed.")]
    assert embedding and all(scale[name] == 0.5 ** (n + 1) for name in embedding)  # below the first block
    head = [name for name in scale if name.startswith("head")]  # a distilled model's two heads too
    assert head and all(scale[name] == 1.0 for name in head)
    new = [name for name in scale if name.startswith("adaptive_embed.")]
    assert new and all(scale[name] == 7.0 for name in new)  # the detail path keeps its own scale, undecayed


def test_no_decay_is_one_lr_for_all_but_the_new_layers():
    apt = aptvit.convert(tiny_vit("vit_cls"))
    scale = scales(apt, layer_decay=1.0, new_layer_lr_scale=7.0)
    assert {s for name, s in scale.items() if not name.startswith("adaptive_embed.")} == {1.0}


def test_cli_option_is_saved_and_sets_the_optimizer_groups(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    argv = finetune_argv(data, tmp_path / "run", "--max-steps", "1", "--warmup", "0", "--lr", "1e-3")
    code, _, err = run(capsys, *argv, "--layer-decay", "0.5")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["layer_decay"] == 0.5
    groups = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
    depth = 12  # vit_tiny: the head 1, block 11 0.5, ..., the embedding 0.5^13
    assert {g["lr_scale"] for g in groups if g["lr_scale"] != 10.0} == {0.5**k for k in range(depth + 2)}
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"], rel=1e-9)


def test_a_run_saved_before_the_setting_resumes_without_decay(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = finetune_argv(data, out, "--max-steps", "1", "--warmup", "0", "--layer-decay", "1")
    assert run(capsys, *argv)[0] == 0
    config = json.loads((out / "config.json").read_text())
    del config["layer_decay"]  # as an older aptvit wrote it
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "finetune", "--out", out, "--resume", "--max-steps", "2", "--no-eval")
    assert code == 0, err
    assert BEFORE_FIELD["layer_decay"] == 1.0
    assert json.loads((out / "config.json").read_text())["layer_decay"] == 1.0


def test_a_bad_decay_is_one_clear_message(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    code, _, err = run(capsys, *finetune_argv(data, tmp_path / "run", "--layer-decay", "0"))
    assert code == 2 and "--layer-decay) must be a finite number in (0, 1]" in err and "Traceback" not in err


def test_the_logged_lr_is_the_schedules_not_the_slowest_groups(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    argv = finetune_argv(data, tmp_path / "run", "--max-steps", "1", "--warmup", "0", "--lr", "1e-3")
    assert run(capsys, *argv, "--layer-decay", "0.5", "--log-every", "1")[0] == 0
    lines = [json.loads(t) for t in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if t.strip()]
    assert lines[-1]["lr"] == pytest.approx(1e-3, rel=1e-9)  # not the embedding's 1e-3 * 0.5^13
