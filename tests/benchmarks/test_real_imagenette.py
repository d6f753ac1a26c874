"""benchmarks/real_imagenette.py: its --quick run (tiny random ViT, synthetic class folders, the real CLI) and the
pieces the table rests on: the stated subsets, the source's partial forward, the paired statistics, Random's draws."""

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import real_imagenette as ri


def test_train_subsets_are_per_class_disjoint_seeded_and_sized():
    labels = [0] * 10 + [1] * 12 + [2] * 9
    a, b = ri.train_subsets(labels, 5, 3, seed=0), ri.train_subsets(labels, 5, 3, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not set(a["fit"]) & set(a["holdout"])
    for c in range(3):
        assert sum(labels[i] == c for i in a["fit"]) == 5 and sum(labels[i] == c for i in a["holdout"]) == 3
    assert not np.array_equal(a["fit"], ri.train_subsets(labels, 5, 3, seed=1)["fit"])
    with pytest.raises(ValueError, match="class 2 has 9 train photos"):
        ri.train_subsets(labels, 5, 5, seed=0)


def test_a_larger_val_subset_extends_a_smaller_one():
    small, big = ri.val_subset(100, 20, seed=0), ri.val_subset(100, 50, seed=0)
    assert np.array_equal(big[:20], small) and len(set(big)) == 50
    assert len(ri.val_subset(100, 500, seed=0)) == 100


def test_cache_keys_follow_what_each_stage_depends_on():
    a = ri.cache_keys(ri.parse_args([]))
    b = ri.cache_keys(ri.parse_args(["--val-images", "1982"]))
    assert a["source"] == b["source"] and a["epoch"] == b["epoch"] and a["rows"] != b["rows"]
    c = ri.cache_keys(ri.parse_args(["--epoch-per-class", "10"]))
    assert c["source"] == a["source"] and c["rows"] == a["rows"] and c["epoch"] != a["epoch"]
    d = ri.cache_keys(ri.parse_args(["--train", "/elsewhere/train"]))  # other photos: another source
    assert all(d[k] != a[k] for k in a)
    e = ri.cache_keys(ri.parse_args(["--source-lr", "1e-3"]))
    assert all(e[k] != a[k] for k in a)


def test_new_library_training_defaults_are_new_epoch_runs_and_rows():
    from aptvit.train import TrainConfig

    defaults = [TrainConfig("m", "d", "o"), TrainConfig("m", "d", "o", distill=True)]
    assert ri.recipe_tag() == ri.recipe_tag(defaults)
    other = [TrainConfig("m", "d", "o", layer_decay=0.5), defaults[1]]  # one default changed
    assert ri.recipe_tag(other) != ri.recipe_tag()
    run_only = [TrainConfig("x", "y", "z", workers=0, log_every=1, device="cpu", eval=False), defaults[1]]
    assert ri.recipe_tag(run_only) == ri.recipe_tag()  # where and how it runs is no part of the recipe
    keys = ri.cache_keys(ri.parse_args([]))
    assert keys["epoch"].endswith(ri.recipe_tag()) and ri.recipe_tag() in keys["epoch_rows"]
    assert ri.recipe_tag() not in keys["rows"]  # the zero-shot rows stay


def test_the_epoch_plan_has_one_uniform_baseline_and_no_lower_resolution_for_the_default_thresholds():
    assert ri.parse_budgets("default, 0.5") == [None, 0.5]
    plan = [(k, b) for k, b, _ in ri.epoch_plan(ri.parse_budgets("default,0.5,0.35"))]
    assert plan[0] == ("uniform", None) and [k for k, _ in plan].count("uniform") == 1
    assert ("labels", None) in plan and ("distill", None) in plan and ("lowres", None) not in plan
    assert {("labels", 0.5), ("distill", 0.5), ("lowres", 0.5), ("lowres", 0.35)} <= set(plan)
    assert {("random", 0.5), ("random", 0.35)} <= set(plan) and ("random", None) not in plan  # Random at a budget
    args, w = ri.parse_args([]), ri.Path("w")
    assert ri.epoch_dir("labels", None, args, w).name.endswith(f"_labels_default_c{ri.convert_tag()}")
    assert ri.epoch_dir("uniform", None, args, w) == ri.epoch_dir("uniform", 0.5, args, w)
    # another lr: its own runs, its own uniform baseline; the default lr's folders keep their names
    assert ri.parse_lrs("default,5e-6") == [None, 5e-6]
    two = ri.epoch_plan([0.5], [None, 5e-6])
    assert [k for k, _, _ in two].count("uniform") == 2 and ("labels", 0.5, 5e-6) in two
    assert ri.epoch_dir("labels", 0.5, args, w, 5e-6).name.endswith(f"_labels_0.5_c{ri.convert_tag()}_lr5e-06")
    assert ri.epoch_dir("labels", 0.5, args, w, None).name.endswith(f"_labels_0.5_c{ri.convert_tag()}")


def test_new_conversion_defaults_are_new_apt_runs_and_rows_and_the_one_size_runs_stay(monkeypatch):
    """A cached APT row computed under another default (the area bias was on by default until 2026-12-07) must not
    be reported as the current library's."""
    import functools

    args, w = ri.parse_args([]), ri.Path("w")
    before = ri.cache_keys(args), {k: ri.epoch_dir(k, 0.5, args, w) for k in ("labels", "distill", "lowres", "uniform")}
    changed = not ri.aptvit.APTConfig().area_bias
    monkeypatch.setattr(ri.aptvit, "APTConfig", functools.partial(ri.aptvit.APTConfig, area_bias=changed))
    keys, dirs = ri.cache_keys(args), {k: ri.epoch_dir(k, 0.5, args, w) for k in before[1]}
    assert keys["source"] == before[0]["source"] and keys["epoch"] == before[0]["epoch"]
    assert all(keys[k] != before[0][k] for k in ("rows", "epoch_rows", "speed"))
    assert dirs["labels"] != before[1]["labels"] and dirs["distill"] != before[1]["distill"]
    assert dirs["lowres"] == before[1]["lowres"] and dirs["uniform"] == before[1]["uniform"]  # nothing merges there


def test_new_default_thresholds_are_a_new_conversion_tag(monkeypatch):
    """The thresholds convert fills in come from the scorer's registration, not from APTConfig's fields."""
    import dataclasses

    from aptvit.core.scoring import SCORERS

    before = ri.convert_tag()
    entropy = SCORERS["entropy"]
    monkeypatch.setitem(SCORERS, "entropy", dataclasses.replace(entropy, thresholds={2: entropy.thresholds[2] + 1}))
    assert ri.convert_tag() != before


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ri.create(ri.QUICK_NAME, 3)


def test_trunk_then_top_is_the_model(tiny):
    """The source trains its top blocks on cached trunk tokens: the two halves must be the whole forward."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = tiny(x)
        for k in (0, 5, len(tiny.blocks)):
            split = ri.top(tiny, ri.trunk(tiny, x, k), k)
            assert float((split - whole).abs().max()) <= 1e-5 * float(whole.abs().max())
        pre = ri.top(tiny, ri.trunk(tiny, x, 5), 5, pre_logits=True)
        assert float((tiny.head(pre) - whole).abs().max()) <= 1e-5 * float(whole.abs().max())


def test_mcnemar_exact_p():
    assert ri.mcnemar_p(0, 0) == 1.0
    assert ri.mcnemar_p(0, 5) == pytest.approx(2 / 32)
    assert ri.mcnemar_p(5, 0) == ri.mcnemar_p(0, 5)
    assert ri.mcnemar_p(3, 3) == 1.0
    # a binomial test of 2 of 12 at 1/2, two-sided
    assert ri.mcnemar_p(2, 10) == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2**12)


def test_compare_pairs_each_row_with_the_source_on_the_same_photos():
    labels = [0, 1, 2, 0, 1]
    rows = {
        "src": {"predictions": "abcab"},  # all right
        "m": {"predictions": "abccc"},  # wrong on the last two
    }
    ri.compare(rows, labels, "src")
    assert "difference" not in rows["src"]
    m = rows["m"]
    assert m["difference"] == pytest.approx(-40.0)
    assert (m["only_method_right"], m["only_source_right"]) == (0, 2)
    assert m["paired_se"] == pytest.approx(100 * np.std([0, 0, 0, -1, -1], ddof=1) / np.sqrt(5))
    assert m["mcnemar_p"] == pytest.approx(0.5)


def test_epoch_pairs_set_each_apt_epoch_against_the_baseline_of_its_photos_and_lr():
    """The default thresholds against the uniform epoch, a budget against it and against the lower resolution's
    epoch at that budget, an lr against its own lr's baseline; zero-shot rows, baselines and label-free --distill
    rows (whose baseline is the source) get no pair."""
    labels = [0, 1, 2, 0, 1]
    rows = {
        "src": {"kind": "source", "budget": None, "predictions": "abcab"},
        "apt zs": {"kind": "APT zero-shot", "budget": 0.5, "predictions": "abcab"},
        "uni": {"kind": "uniform + 1 epoch", "budget": None, "predictions": "abcab"},
        "uni lr": {"kind": "uniform + 1 epoch (lr 5e-06)", "budget": None, "predictions": "aaaaa"},
        "low 0.5": {"kind": "lowres + 1 epoch", "budget": 0.5, "predictions": "abccc"},
        "low 0.35": {"kind": "lowres + 1 epoch", "budget": 0.35, "predictions": "abcab"},
        "apt def": {"kind": "APT + 1 epoch labels", "budget": None, "predictions": "abcac"},
        "apt def lr": {"kind": "APT + 1 epoch labels (lr 5e-06)", "budget": None, "predictions": "abcab"},
        "apt 0.5": {"kind": "APT + 1 epoch labels", "budget": 0.5, "predictions": "abcaa"},
        "apt 0.5 distill": {"kind": "APT + 1 epoch distill", "budget": 0.5, "predictions": "abcab"},
        "apt 0.75": {"kind": "APT + 1 epoch labels", "budget": 0.75, "predictions": "abcab"},  # trained last
        "rnd 0.5 d0": {"kind": "Random + 1 epoch", "budget": 0.5, "predictions": "aaaab"},
        "rnd 0.5 d1": {"kind": "Random + 1 epoch", "budget": 0.5, "predictions": "abcab"},
        "rnd 0.35 d0": {"kind": "Random + 1 epoch", "budget": 0.35, "predictions": "abcab"},
    }
    listed = ri.epoch_pairs(rows, labels)
    # listed by token count (the default thresholds first), not in the order the epochs were trained
    assert [e["method"] for e in listed] == ["apt def", "apt def lr", "apt 0.75"] + ["apt 0.5"] * 4
    pairs = {(e["method"], e["baseline"]): e for e in listed if e["method"] != "apt 0.75"}
    # a budget against the uniform epoch (what it costs), the lower resolution's epoch and each draw of Random's
    # epoch at that budget (what it gains)
    assert set(pairs) == {("apt def", "uni"), ("apt def lr", "uni lr"), ("apt 0.5", "uni"), ("apt 0.5", "low 0.5"),
                          ("apt 0.5", "rnd 0.5 d0"), ("apt 0.5", "rnd 0.5 d1")}  # fmt: skip
    assert pairs["apt 0.5", "rnd 0.5 d0"]["difference"] == pytest.approx(20.0)
    assert pairs["apt def", "uni"]["difference"] == pytest.approx(-20.0)
    assert pairs["apt def lr", "uni lr"]["difference"] == pytest.approx(60.0)
    assert pairs["apt 0.5", "uni"]["difference"] == pytest.approx(-20.0)
    low = pairs["apt 0.5", "low 0.5"]
    assert (low["only_method_right"], low["only_source_right"]) == (1, 0)
    src = dict(rows["src"], top1=100.0, tokens_kept=1.0, gflops=1.0)
    rnd = dict(rows["rnd 0.5 d0"], top1=60.0, tokens_kept=0.5, gflops=0.5, speed_as="apt 0.5")
    speed = {"batch 1": {"src": 1.0, "apt 0.5": 2.0}, "batch 32": {"src": 1.0, "apt 0.5": 2.0}}
    result = {"rows": {"src": src, "rnd 0.5 d0": rnd}, "speed": speed, "val_photos": 5, "size": 64}
    text = ri.table(dict(result, epoch_pairs=list(pairs.values())))
    assert "| apt 0.5 | low 0.5 | +20.00 ±" in text and "| apt 0.5 | uni | -20.00 ±" in text
    assert "| rnd 0.5 d0 | 60.00 | - | 50% | 0.50 | as APT | as APT | - |" in text  # not timed: said so


def test_random_draws_are_per_photo_and_per_draw_not_per_batch(tiny):
    """A photo's Random layout may not depend on the other photos of its batch; another draw is another layout."""
    import aptvit

    apt = aptvit.convert(tiny, budget=0.5)
    crops = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    seen = {}

    def grab(draw):
        m = ri.apt_method("r", "Random", apt, 0.5, draw)
        with torch.inference_mode():
            return m.predict(crops)[0], m.predict(crops[1:2])[0]

    for draw in (0, 1):
        together, alone = grab(draw)
        assert float((together[1] - alone[0]).abs().max()) <= 1e-5 * float(together.abs().max())
        seen[draw] = together
    assert float((seen[0] - seen[1]).abs().max()) > 1e-4 * float(seen[0].abs().max())


def test_link_folder_links_and_does_not_copy(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    files = []
    for i in range(3):
        f = src / f"{i}.png"
        f.write_bytes(b"x")
        files.append(f)
    root = ri.link_folder(tmp_path / "sub", files, [0, 1, 1], ["a", "b"])
    linked = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert linked == ["a/0.png", "b/1.png", "b/2.png"]
    assert all(p.is_symlink() and p.resolve() in files for p in root.rglob("*.png"))


def test_train_images_per_s_skips_the_first_window(tmp_path):
    lines = [{"kind": "train", "images_per_s": 1.0}] + [{"kind": "train", "images_per_s": v} for v in (4.0, 6.0, 5.0)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines + [{"kind": "eval"}]))
    assert ri.train_images_per_s(tmp_path) == 5.0


@pytest.mark.slow
def test_quick_run_writes_every_row_through_the_cli(tmp_path, monkeypatch):
    from aptvit.core import scoring

    monkeypatch.setattr(scoring, "SCORERS", dict(scoring.SCORERS))  # the report registers "random": this test only
    out = tmp_path / "res"
    assert ri.main(["--quick", "--work", str(tmp_path / "w"), "--results", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    kinds = {r["kind"] for r in rows.values()}
    assert kinds >= {"source", "APT zero-shot", "APT zero-shot + area bias", "lower resolution", "Random", "ToMe"}
    assert kinds >= {"APT + 1 epoch labels", "APT + 1 epoch distill", "lowres + 1 epoch", "uniform + 1 epoch"}
    assert kinds >= {"Random + 1 epoch"}  # trained by `aptvit finetune --scorer random` in its own process
    source = rows["source (64 px)"]
    assert source["tokens_kept"] == 1.0 and len(source["predictions"]) == result["val_photos"] == 18
    for name, r in rows.items():
        assert 0 <= r["top1"] <= 100 and 0 < r["tokens_kept"] <= 1
        if r["kind"] != "source":
            assert "mcnemar_p" in r and "difference" in r, name
    assert all(r["gflops"] < source["gflops"] for r in rows.values() if r["kind"] in ("APT zero-shot", "ToMe"))
    for r in rows.values():
        if r["kind"].endswith("+ 1 epoch") or r["kind"].startswith("APT + 1 epoch"):
            assert r["train_images_per_s"] > 0 and r["train_speedup"] > 0
    speed = result["speed"]
    assert set(speed["batch 1"]) == set(speed["batch 32"]) and source and "source (64 px)" in speed["batch 1"]
    assert (tmp_path / "res.png").stat().st_size > 0 and "| method |" in (tmp_path / "res.md").read_text()
    assert (tmp_path / "w" / "source.safetensors").is_file()


def test_quick_variants_compare_settings_on_train_photos_that_no_other_stage_uses(tmp_path):
    """--only variants: every row on the tune photos (after fit and holdout, never val), each APT row at a budget
    paired with the lower resolution of its token count."""
    out = tmp_path / "res"
    assert ri.main(["--quick", "--only", "variants", "--work", str(tmp_path / "w"), "--results", str(out)]) == 0
    args = ri.parse_args(["--quick", "--only", "variants", "--work", str(tmp_path / "w")])
    args.train, args.val = str(tmp_path / "w" / "data" / "train"), str(tmp_path / "w" / "data" / "val")  # as main
    rows = json.loads(ri.rows_path(args, tmp_path / "w", "variants").read_text())
    assert not ri.rows_path(args, tmp_path / "w").exists()  # no val row was scored
    assert all(len(r["predictions"]) == 3 * args.tune_per_class for r in rows.values())  # 3 synthetic classes
    names = list(rows)
    assert "APT default thresholds" in names and "APT default thresholds + area bias" in names
    for name, r in rows.items():
        if r["kind"] == "lower resolution":  # the APT row after it keeps its tokens, less than one 2p merge (3)
            apt = names[names.index(name) + 1]
            base = (args.size // 16) ** 2
            assert r["tokens_kept"] - 3 / base < rows[apt]["tokens_kept"] <= r["tokens_kept"] and "tokens" in apt
    text = (tmp_path / "res_variants.md").read_text()
    assert text.count("| APT ") == sum(r["kind"] == "APT" for r in rows.values())
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in text.splitlines() if "| APT" in line}
    at_budget = [c for n, c in cells.items() if " tokens" in n]
    assert at_budget and all(c[3] != "-" for c in at_budget)  # each paired with its lower resolution
    assert all((c[4].strip(" |") != "-") == n.endswith("+ area bias") for n, c in cells.items())  # and with no bias


def test_apt_at_a_smaller_side_counts_its_tokens_against_the_source_grid(tiny):
    """An "APT n tokens at N px" row: the photo is shrunk first, and its share is n over the source's grid, as the lower
    resolution's is (not over the smaller photo's own grid)."""
    args = ri.parse_args(["--quick"])
    args.size = 128  # an 8 x 8 grid of /16 patches: the middle size differs from the lower resolution's
    methods = {m.name: m for m in ri.variant_methods(tiny, args)}
    low = next(m for n, m in methods.items() if n.startswith("lower resolution 96 px"))
    mid = next(m for n, m in methods.items() if n.endswith(" at 112 px"))
    crops = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        _, share_low, _ = low.predict(crops)
        _, share_mid, _ = mid.predict(crops)
    assert float(share_low[0]) == pytest.approx(36 / 64)
    assert 33 / 64 < float(share_mid.max()) <= 36 / 64  # the budget, within one merge, of the 128-px grid


def test_tune_photos_extend_the_split_without_moving_fit_or_holdout():
    labels = [c for c in range(3) for _ in range(20)]
    a = ri.train_subsets(labels, 6, 4, seed=0)
    b = ri.train_subsets(labels, 6, 4, seed=0, tune=5)
    assert all(np.array_equal(a[k], b[k]) for k in ("fit", "holdout")) and len(b["tune"]) == 15
    assert not set(b["tune"]) & (set(b["fit"]) | set(b["holdout"]))
    with pytest.raises(ValueError, match="fit \\+ holdout \\+ tune"):
        ri.train_subsets(labels, 6, 4, seed=0, tune=11)


def test_epoch_photos_are_the_fit_photos_first_then_the_rest_of_train():
    """Up to the source's fit photos an epoch trains on a subset of them (the rows cached so far); beyond, on the
    holdout, tune and the rest of each class's photos, never moving the other subsets."""
    labels = [c for c in range(3) for _ in range(20)]
    base = ri.train_subsets(labels, 6, 4, seed=0, tune=5)
    few, many = (ri.train_subsets(labels, 6, 4, seed=0, tune=5, epoch=n) for n in (4, 18))
    assert all(np.array_equal(base[k], s[k]) for s in (few, many) for k in ("fit", "holdout", "tune"))
    fit_by_class = [[i for i in base["fit"] if labels[i] == c] for c in range(3)]
    assert list(few["epoch"]) == [i for c in range(3) for i in fit_by_class[c][:4]]
    for c in range(3):
        mine = [i for i in many["epoch"] if labels[i] == c]
        assert len(mine) == len(set(mine)) == 18 and set(fit_by_class[c]) < set(mine)
    assert set(many["holdout"]) | set(many["tune"]) < set(many["epoch"])
    with pytest.raises(ValueError, match="the epoch's 21"):
        ri.train_subsets(labels, 6, 4, seed=0, epoch=21)


def test_zero_shot_rows_name_the_area_bias_they_run(tiny, monkeypatch):
    """The zero-shot stage runs APT without the bias (the default) and, in rows named for it, with it."""
    made = []
    monkeypatch.setattr(ri, "apt_method", lambda name, kind, apt, *a, **k: made.append((name, apt.config.area_bias)))
    monkeypatch.setattr(ri, "tome_method", lambda *a, **k: None)
    ri.zero_shot_methods(tiny, ri.parse_args(["--quick", "--draws", "1"]))
    apt_rows = [(n, bias) for n, bias in made if n.startswith("APT")]
    assert len(apt_rows) == 2 * (1 + len(ri.BUDGETS))
    assert all(bias == n.endswith("+ area bias") for n, bias in apt_rows)


def test_the_random_scorer_lays_out_random_patches_at_the_budget(monkeypatch):
    """``register_random``: the scorer ``random`` that Random's epoch trains with (``finetune --scorer random``) keeps
    the budget's tokens, ignores the content (a plain photo is laid out like a busy one, where entropy merges it all)
    and gives a photo the same layout in any batch, as draw 0 of the zero-shot Random rows does."""
    import aptvit
    from aptvit.core import scoring

    monkeypatch.setattr(scoring, "SCORERS", dict(scoring.SCORERS))  # registered for this test only
    ri.register_random()
    busy = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = torch.full((1, 3, 128, 128), 128, dtype=torch.uint8)
    photos = torch.cat([busy, plain])
    layout = aptvit.patch_layout(photos, (16, 32), budget=0.5, scorer="random")
    assert layout.num_tokens.tolist() == [31, 31, 31]  # the most that 16/32 reach within 32 of 64 cells
    assert aptvit.patch_layout(plain, (16, 32), budget=0.5).num_tokens.tolist() == [16]  # entropy: all merged

    def merged(lay):  # per photo, which of its 64 cells a 2x patch covers
        return (lay.size[lay.cells] > 16).reshape(-1, 64)

    alone = aptvit.patch_layout(busy[1:], (16, 32), budget=0.5, scorer="random")
    assert torch.equal(merged(alone)[0], merged(layout)[1])  # the same layout in another batch
    assert not torch.equal(merged(layout)[0], merged(layout)[1])  # two photos, two draws
