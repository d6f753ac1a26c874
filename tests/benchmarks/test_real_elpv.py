"""benchmarks/real_elpv.py --quick: the whole labelled experiment on a tiny random ViT and synthetic cells."""

import json

import numpy as np
import pytest

from benchmarks import real_elpv


def test_split_is_fixed_disjoint_and_sized():
    a = real_elpv.split(100, {"train": 50, "val": 20, "test": 30}, seed=0)
    b = real_elpv.split(100, {"train": 50, "val": 20, "test": 30}, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(set(np.concatenate(list(a.values())))) == 100
    assert [len(v) for v in a.values()] == [50, 20, 30]
    with pytest.raises(ValueError, match="more than the 100 cells"):
        real_elpv.split(100, {"train": 90, "test": 20}, seed=0)


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


def test_trained_logits_are_read_in_the_heads_class_order(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"x": real_elpv.torch.zeros(1)}, str(path), metadata={"classes": '["defective", "functional"]'})
    assert real_elpv.class_columns(path) == [1, 0]  # CLASSES = (functional, defective)
    save_file({"x": real_elpv.torch.zeros(1)}, str(path), metadata={"classes": '["cat", "dog"]'})
    with pytest.raises(ValueError, match="trained on the classes"):
        real_elpv.class_columns(path)
