"""``aptvit eval --limit N`` evaluates a seeded draw of N images from the whole split, the same draw as
``aptvit calibrate --limit N`` makes (``aptvit.data.seeded_subset``), so a big val folder can be sampled quickly."""

import json

import pytest
import torch

import aptvit
from aptvit.data import seeded_subset

from ..tiny import tiny_vit
from .helpers import make_folder, one_line, run


def test_seeded_subset_is_a_seeded_draw_in_order():
    items = list(range(20))
    drawn = seeded_subset(items, 5)
    assert len(drawn) == 5 and drawn == sorted(drawn) and drawn == seeded_subset(items, 5)
    assert drawn != items[:5]  # from the whole list, not its start
    assert seeded_subset(items, 0) == seeded_subset(items, None) == seeded_subset(items, 50) == items


@pytest.fixture
def world(tmp_path):
    data = make_folder(tmp_path / "data", train=0, val=6, size=32)
    checkpoint = aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=2)), tmp_path / "m.safetensors")
    return data / "val", checkpoint


def test_eval_limit_evaluates_that_many_images(world, tmp_path, capsys, monkeypatch):
    import aptvit.evaluate as ev

    folder, checkpoint = world
    read = []
    real = ev.LayoutDataset
    monkeypatch.setattr(ev, "LayoutDataset", lambda samples, *a, **k: read.append(samples) or real(samples, *a, **k))
    argv = ["eval", "--checkpoint", checkpoint, "--data", folder, "--size", "32", "--workers", "0"]
    code, out, err = run(capsys, *argv, "--limit", "5", "--json", tmp_path / "e.json")
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 5
    everything = aptvit.data.image_folder(folder).samples
    assert read[0] == seeded_subset(everything, 5)  # calibrate's draw (find_samples) of the same folder
    code, out, err = run(capsys, *argv, "--json", tmp_path / "all.json")
    assert code == 0 and json.loads((tmp_path / "all.json").read_text())["images"] == len(everything) == 12


def test_a_negative_limit_is_one_line(world, capsys):
    folder, checkpoint = world
    code, out, err = run(capsys, "eval", "--checkpoint", checkpoint, "--data", folder, "--limit", "-1")
    assert code == 2 and "--limit -1 must be an integer >= 0" in one_line(err)


def test_a_budget_on_a_checkpoint_of_one_patch_size_names_the_size_to_add(tmp_path, capsys):
    """A uniform fine-tune's checkpoint (one patch size) merges nothing, so no budget below its grid is reachable:
    eval says so in one line and names the patch sizes to give, rather than "add larger patch_sizes" alone."""
    data = make_folder(tmp_path / "data", train=0, val=2, size=32)
    uniform = aptvit.save(
        aptvit.convert(tiny_vit("vit_cls", num_classes=2), patch_sizes=(16,)), tmp_path / "u.safetensors"
    )
    argv = ["eval", "--checkpoint", uniform, "--data", data / "val", "--size", "32", "--budget", "0.5"]
    code, out, err = run(capsys, *argv)
    assert code == 2 and "with the one patch size 16 nothing merges: add a larger one (patch sizes 16,32)" in one_line(
        err
    )
    code, out, err = run(capsys, *argv, "--patch-sizes", "16,32")  # what the message says to do works
    assert code == 0, err


def test_a_checkpoint_of_one_patch_size_is_converted_again_with_its_weights(tmp_path):
    """Given other patch sizes, a one-size checkpoint is converted again from its own timm model (nothing of it is
    lost: it has no detail-path weights), for eval, bench, export and finetune alike (``build_models``)."""
    from aptvit.models import build_models, conversion_settings

    vit = tiny_vit("vit_cls", num_classes=2)
    uniform = aptvit.save(aptvit.convert(vit, patch_sizes=(16,)), tmp_path / "u.safetensors")
    apt, timm_model = build_models(None, checkpoint=uniform, layout={"patch_sizes": (16, 32), "budget": 0.5})
    assert apt.patch_sizes == (16, 32) and apt.config.budget == 0.5 and timm_model is apt.timm_model
    kept = vit.state_dict()
    assert all(torch.equal(t, kept[name]) for name, t in timm_model.state_dict().items())
    # no budget: the scorer's default thresholds, not the one-size checkpoint's empty ones (nothing would merge)
    plain = torch.full((1, 3, 64, 64), 0.5)
    for config in (None, conversion_settings(uniform, patch_sizes=(16, 32))):  # eval / bench, and finetune's path
        apt, _ = build_models(None, checkpoint=uniform, layout={"patch_sizes": (16, 32)}, config=config)
        assert apt.config.thresholds == aptvit.APTConfig().for_patch_size(16).thresholds
        assert int(apt.make_layout(plain).num_tokens[0]) == 4  # a plain 64 px image: four 32 px patches
    with pytest.raises(aptvit.core.io.InputError, match="fixed at conversion"):  # a multi-size one keeps its sizes
        two = aptvit.save(aptvit.convert(vit, patch_sizes=(16, 32)), tmp_path / "two.safetensors")
        build_models(None, checkpoint=two, layout={"patch_sizes": (16, 32, 64)})
