"""finetune lines a kept head up with the class folders (issue 19: elpv's labelled epoch trained on swapped labels)."""

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from aptvit.core.io import InputError
from aptvit.distributed import Dist
from aptvit.train.model import build_model

from .helpers import MODEL, train_config

FOLDERS = ["plain", "stripes"]  # ImageFolder's order: sorted


def _checkpoint(tmp_path, classes=None, num_classes=2):
    """A timm checkpoint whose head rows are told apart (row i holds i + 1 everywhere)."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=num_classes)
    with torch.no_grad():
        for i in range(num_classes):
            model.head.weight[i] = i + 1.0
            model.head.bias[i] = -(i + 1.0)
    path = tmp_path / "source.safetensors"
    meta = {"classes": classes if isinstance(classes, str) else json.dumps(classes)} if classes is not None else None
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path, model.head.weight.detach().clone(), model.head.bias.detach().clone()


def _build(tmp_path, path, **kw):
    cfg = train_config(tmp_path / "data", tmp_path / "run", checkpoint=str(path), classes=list(FOLDERS), **kw)
    return build_model(cfg, continues=False, dist=Dist()).get_classifier()


def test_a_head_trained_on_another_class_order_is_reordered_to_the_folders(tmp_path, info_log):
    path, weight, bias = _checkpoint(tmp_path, classes=["stripes", "plain"])  # e.g. ("functional", "defective")
    head = _build(tmp_path, path)
    # folder 0 ("plain") is the checkpoint's row 1, folder 1 ("stripes") its row 0
    assert torch.equal(head.weight, weight[[1, 0]]) and torch.equal(head.bias, bias[[1, 0]])
    assert "head rows reordered" in info_log.text


def test_a_head_in_the_folders_order_and_a_distill_run_keep_the_head(tmp_path):
    path, weight, bias = _checkpoint(tmp_path, classes=list(FOLDERS))
    head = _build(tmp_path, path)
    assert torch.equal(head.weight, weight) and torch.equal(head.bias, bias)
    path, weight, bias = _checkpoint(tmp_path, classes=["stripes", "plain"])
    head = _build(tmp_path, path, distill=True)  # no labels meet the head: it stays the teacher's
    assert torch.equal(head.weight, weight) and torch.equal(head.bias, bias)


def test_a_head_trained_on_other_classes_is_new(tmp_path, info_log):
    path, weight, _ = _checkpoint(tmp_path, classes=["cat", "dog"])
    head = _build(tmp_path, path)
    assert (
        head.out_features == 2 and not torch.equal(head.weight, weight) and not torch.equal(head.weight, weight[[1, 0]])
    )
    assert "head trained on other classes (cat, dog): new head" in info_log.text


def test_a_head_that_names_no_classes_is_kept_with_a_warning(tmp_path, caplog):
    path, weight, _ = _checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="aptvit"):
        head = _build(tmp_path, path)
    assert torch.equal(head.weight, weight)
    assert "does not name its classes" in caplog.text and "plain, stripes" in caplog.text


def test_a_head_of_another_size_is_new_without_a_warning(tmp_path, caplog):
    path, _, _ = _checkpoint(tmp_path, num_classes=3)
    with caplog.at_level(logging.WARNING, logger="aptvit"):
        head = _build(tmp_path, path)
    assert head.out_features == 2 and "does not name its classes" not in caplog.text


@pytest.mark.parametrize("bad", ["not json", json.dumps("plain"), json.dumps(["plain", "plain"]), json.dumps([1, 2])])
def test_malformed_classes_metadata_is_one_clear_error(tmp_path, bad):
    path, _, _ = _checkpoint(tmp_path, classes=bad)
    with pytest.raises(InputError, match="its 'classes' metadata is malformed"):
        _build(tmp_path, path)
