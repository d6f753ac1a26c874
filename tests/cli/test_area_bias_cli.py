"""``--area-bias`` / ``--no-area-bias``: given to the commands that run a model, saved in config.json and in the
weights, compared on ``--resume``, on top of a checkpoint's own setting."""

import json
import re

import pytest

import aptvit
from aptvit.cli import build_parser, layout_settings
from aptvit.models import build_models
from aptvit.nn.checkpoint import read_metadata

from ..tiny import tiny_vit
from .helpers import finetune_argv, make_folder, one_line, run


@pytest.mark.parametrize("command", ["bench", "eval", "finetune"])
def test_the_commands_that_run_a_model_take_the_option(command):
    required = {"bench": [], "eval": ["--data", "d"], "finetune": ["--model", "m", "--data", "d", "--out", "o"]}
    parse = lambda *extra: build_parser().parse_args([command, *required[command], *extra])  # noqa: E731
    assert layout_settings(parse("--area-bias"))["area_bias"] is True
    assert layout_settings(parse("--no-area-bias"))["area_bias"] is False
    assert "area_bias" not in layout_settings(parse())  # not given: the checkpoint's, or APTConfig's default


def test_show_draws_layouts_and_has_no_such_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["show", "x.png", "--area-bias"])
    assert "unrecognized arguments: --area-bias" in capsys.readouterr().err


def test_the_option_overrides_an_aptvit_checkpoints_own_setting(tmp_path):
    path = tmp_path / "m.safetensors"
    aptvit.save(aptvit.convert(tiny_vit("vit_cls"), area_bias=True), path)
    assert build_models(None, checkpoint=path)[0].config.area_bias is True
    assert build_models(None, checkpoint=path, layout={"area_bias": False})[0].config.area_bias is False
    assert build_models("vit_tiny_patch16_224", layout={"area_bias": True})[0].config.area_bias is True


def test_finetune_saves_the_setting_and_resume_refuses_a_change(tmp_path, capsys):
    data = make_folder(tmp_path / "data", train=4, val=2)
    argv = finetune_argv(data, tmp_path / "run", "--area-bias")
    code, out, err = run(capsys, *argv, "--max-steps", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["apt"]["area_bias"] is True
    assert json.loads(read_metadata(tmp_path / "run" / "model.safetensors")["aptvit"])["area_bias"] is True
    assert aptvit.load(tmp_path / "run" / "model.safetensors").config.area_bias is True
    code, out, err = run(capsys, *argv[:-1], "--no-area-bias", "--resume")
    assert code == 2 and re.search(r"--area-bias False \(the run's: True\) cannot change", one_line(err)), err
