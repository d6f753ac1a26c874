"""finetune's lr multiplier for the new zero-initialised adaptive_embed.* layers (--new-layer-lr-scale)."""

import json

import torch
from safetensors.torch import load_file

from aptvit.train import TrainConfig, finetune, param_groups

from .helpers import MODEL, finetune_argv, make_folder, run, train_config


def test_cli_option_gives_the_apt_layers_a_scaled_lr(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    argv = finetune_argv(data, tmp_path / "run", "--max-steps", "2", "--lr", "1e-3", "--warmup", "0")
    code, _, err = run(capsys, *argv, "--new-layer-lr-scale", "8", "--layer-decay", "1")  # one lr for the rest
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["new_layer_lr_scale"] == 8.0
    groups = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
    lrs = {g["lr_scale"]: g["lr"] for g in groups}
    assert set(lrs) == {1.0, 8.0}
    assert abs(lrs[8.0] / lrs[1.0] - 8.0) < 1e-9
    # the scaled groups hold exactly the detail path: merge conv weight + bias, the 32-px linear's weight + bias
    assert sum(len(g["params"]) for g in groups if g["lr_scale"] == 8.0) == 4


def test_scaled_new_layers_move_that_much_further(tmp_path):
    data = make_folder(tmp_path / "data")
    moved = {}
    for scale in (1.0, 10.0):
        out = tmp_path / f"run{scale}"
        finetune(
            train_config(data, out, max_steps=3, warmup=0.0, eval=False, new_layer_lr_scale=scale, augment="none"),
        )
        weights = load_file(out / "model.safetensors")
        moved[scale] = float(weights["adaptive_embed.detail_proj.32.weight"].abs().max())  # started at zero
    # AdamW moves a weight by about lr per step, whatever its gradient's scale
    assert 5 < moved[10.0] / moved[1.0] < 20


def test_param_groups_split_decay_and_new_layers():
    import timm

    import aptvit

    vit = timm.create_model(
        MODEL, pretrained=False, img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=2
    )
    apt = aptvit.convert(vit, patch_sizes=(8, 16))
    config = TrainConfig(model=MODEL, data="x", out="y", new_layer_lr_scale=3.0, weight_decay=0.05, layer_decay=1.0)
    names = {id(p): n for n, p in apt.named_parameters()}
    for group in param_groups(apt, config):
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr_scale"] == (3.0 if name.startswith("adaptive_embed.") else 1.0), name
            no_decay = p.ndim <= 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert sum(len(g["params"]) for g in param_groups(apt, config)) == len(list(apt.parameters()))


def test_a_bad_scale_is_one_clear_message(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    code, _, err = run(
        capsys,
        "finetune",
        "--model",
        MODEL,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--size",
        "32",
        "--new-layer-lr-scale",
        "0",
    )
    assert code == 2 and "--new-layer-lr-scale) must be a finite number > 0" in err and "Traceback" not in err
