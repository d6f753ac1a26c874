"""benchmarks/real_elpv.py --quick: the whole labelled experiment on a tiny random ViT and synthetic cells."""

import json

import numpy as np
import pytest
import torch

from benchmarks import real_elpv


def test_split_is_fixed_disjoint_and_sized():
    a = real_elpv.split(100, {"train": 50, "val": 20, "test": 30}, seed=0)
    b = real_elpv.split(100, {"train": 50, "val": 20, "test": 30}, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(set(np.concatenate(list(a.values())))) == 100
    assert [len(v) for v in a.values()] == [50, 20, 30]
    with pytest.raises(ValueError, match="more than the 100 cells"):
        real_elpv.split(100, {"train": 90, "test": 20}, seed=0)


def test_a_larger_test_split_keeps_train_and_val_and_extends_test():
    """--test 1984 (every unused cell) must not move a train or val cell, and its first 256 are today's 256."""
    small = real_elpv.split(2624, {"train": 384, "val": 256, "test": 256}, seed=0)
    big = real_elpv.split(2624, {"train": 384, "val": 256, "test": 1984}, seed=0)
    assert np.array_equal(small["train"], big["train"]) and np.array_equal(small["val"], big["val"])
    assert np.array_equal(big["test"][:256], small["test"])
    assert len(set(np.concatenate(list(big.values())))) == 2624


def test_cache_keys_of_what_train_and_val_decide_ignore_the_test_split():
    a, b = (real_elpv.cache_keys(real_elpv.parse_args(["--test", t])) for t in ("256", "1984"))
    assert all(a[k] == b[k] for k in ("source", "val", "epoch"))
    assert a["test"] != b["test"] and a["test_features"] != b["test_features"]
    c = real_elpv.cache_keys(real_elpv.parse_args(["--lr", "1e-6", "--epoch-images", "64"]))
    assert c["source"] == a["source"] and c["val"] == a["val"] and c["epoch"] != a["epoch"] and c["test"] != a["test"]
    d = real_elpv.cache_keys(real_elpv.parse_args(["--val", "128"]))
    assert all(d[k] != a[k] for k in a)  # the head's weight decay and every choice are made on val


def test_paired_stats_per_subset():
    labels = np.array([1, 0, 1, 0, 1, 1])
    rows = [
        {"name": "source", "predictions": [1, 0, 1, 0, 0, 0]},  # right on the first 4
        {"name": "m", "predictions": [1, 0, 0, 0, 1, 0]},  # wrong on cell 2, right on cell 4
    ]
    stats = real_elpv.paired_stats(rows, labels, original=4)
    assert list(stats) == ["first 4 (published)", "new 2", "all 6"]
    first, new, every = (stats[k][1] for k in stats)
    assert stats["first 4 (published)"][0] == {"name": "source", "cells": 4, "accuracy": 100.0}
    assert first["accuracy"] == 75.0 and first["difference"] == -25.0
    assert (first["only_method_right"], first["only_source_right"]) == (0, 1)
    assert new["difference"] == 50.0 and (new["only_method_right"], new["only_source_right"]) == (1, 0)
    assert every["difference"] == 0.0 and (every["only_method_right"], every["only_source_right"]) == (1, 1)
    assert every["paired_se"] == pytest.approx(100 * np.std([0, 0, -1, 0, 1, 0], ddof=1) / np.sqrt(6))
    assert list(real_elpv.paired_stats(rows, labels, original=6)) == ["all 6"]
    assert "| m |" in real_elpv.paired_table(stats)


@pytest.mark.slow
def test_quick_mode_writes_every_row(tmp_path):
    out = tmp_path / "res"
    assert real_elpv.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(out), "--runs", "1"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "source (uniform)" and len(names) == 7
    assert any("labels" in n for n in names) and any("--distill" in n for n in names)
    assert any(n.startswith("Random") for n in names) and any(n.startswith("lower resolution") for n in names)
    assert any(n.startswith("ToMe (r=") for n in names)
    chosen = result["chosen"]  # every APT setting is chosen on val and passed explicitly
    assert set(chosen) == {"patch_sizes", "scorer", "area_bias", "budget"}
    assert all(v["setting"].keys() == chosen.keys() for v in result["val"].values())
    assert result["majority_accuracy"] >= 50 and "load_average" in result
    for r in result["rows"]:
        assert 0 <= r["accuracy"] <= 100 and 0 < r["tokens_kept"] <= 1 and r["images_per_s"] > 0
    source = result["rows"][0]
    assert source["tokens_kept"] == 1.0
    assert all(r["gflops"] < source["gflops"] for r in result["rows"][1:])  # every method is cheaper
    assert (tmp_path / "res.png").stat().st_size > 0 and "| method |" in (tmp_path / "res_table.md").read_text()
    assert len(source["predictions"]) == result["subsets"]["test"]
    assert [e["name"] for e in result["paired"]["all 16"]] == names


def test_trained_logits_are_read_in_the_heads_class_order(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"x": real_elpv.torch.zeros(1)}, str(path), metadata={"classes": '["defective", "functional"]'})
    assert real_elpv.class_columns(path) == [1, 0]  # CLASSES = (functional, defective)
    save_file({"x": real_elpv.torch.zeros(1)}, str(path), metadata={"classes": '["cat", "dog"]'})
    with pytest.raises(ValueError, match="trained on the classes"):
        real_elpv.class_columns(path)


def test_layout_map_says_where_the_base_size_is_kept():
    """``layout_map`` (``--until layout-map``): the share of base-size tokens in the image's outer ring, against
    cells whose only detail is on the border or only inside."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, 3, 112, 112), generator=gen, dtype=torch.uint8)
    border, inside = torch.full_like(noise, 128), torch.full_like(noise, 128)
    border[..., :28, :], inside[..., 28:84, 28:84] = noise[..., :28, :], noise[..., 28:84, 28:84]
    s = {"patch_sizes": [14, 28], "scorer": "entropy", "budget": 0.5}
    on_border, on_inside = real_elpv.layout_map(border, s), real_elpv.layout_map(inside, s)
    assert on_border["ring_share"] == 1.0 and on_inside["ring_share"] == 0.0
    assert on_border["ring_area"] == pytest.approx(1 - 4**2 / 8**2) and on_border["base_per_image"] > 0
    assert on_inside["freq"][3][3] == 1.0 and on_inside["freq"][0][0] == 0.0
