"""``aptvit eval`` prints top-5 only when the model has more than 5 classes: with at most 5 it is 100% whatever the
model does. The JSON keeps the figure either way."""

import json

import pytest

import aptvit

from ..tiny import tiny_vit
from .helpers import make_folder, run


@pytest.mark.parametrize("classes, shown", [(2, False), (5, False), (6, True)])
def test_eval_prints_top5_only_beyond_five_classes(tmp_path, capsys, classes, shown):
    names = tuple(f"c{i}" for i in range(classes))
    data = make_folder(tmp_path / "data", classes=names, train=0, val=1, size=32)
    checkpoint = aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=classes)), tmp_path / "m.safetensors")
    argv = ["eval", "--checkpoint", checkpoint, "--data", data, "--size", "32", "--workers", "0"]
    code, out, err = run(capsys, *argv, "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "top-1" in out and ("top-5" in out) == shown, out
    assert json.loads((tmp_path / "e.json").read_text())["top5"] >= 0
