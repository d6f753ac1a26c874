"""benchmarks/real_fidelity.py: its --quick run, and the shortcuts it takes being exact (tiny random ViT)."""

import json
import types

import pytest
import torch

import aptvit
from benchmarks import real_fidelity as rf


@pytest.fixture(scope="module")
def tiny():
    src = rf.tiny_source(112)
    x = rf.normalise(rf.load_photos(["skimage:astronaut", "skimage:coffee"], 112))
    return src, x


def test_quick_run_writes_every_output(tmp_path):
    out = tmp_path / "res"
    argv = ["--quick", "--sizes", "56", "--budgets", "0.5", "--work", str(tmp_path / "w"), "--results", str(out)]
    assert rf.main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and (tmp_path / "res_table.md").is_file()
    rows = {(r["split"], r["name"]): r for r in data["rows"]}
    assert {"APT entropy", "APT upsample + area bias", "Random (2 draws)", "ToMe (r=8)"} <= {n for _, n in rows}
    random = rows[("test", "Random + area bias sizes=14/28 (2 draws)")]  # --quick: 2 of --random-draws' 5
    assert random["draws"] == 2 and random["dense_cos_min"] <= random["dense_cos"] <= random["dense_cos_max"]
    assert random["images_per_s"] > 0  # timed under its row's name
    assert " ± " in (tmp_path / "res_table.md").read_text()
    for (split, name), r in rows.items():
        assert 0 < r["tokens_kept"] <= 1, name
        assert -1 <= r["class_cos"] <= 1 + 1e-6, name
    assert rows[("test", "uniform (source)")]["images_per_s"] > 0
    assert rows[("test", "APT entropy + area bias sizes=14/28")]["images_per_s"] > 0  # timed: the chosen settings
    # a rerun reads every row from the cache: nothing is evaluated again
    calls = []
    saved = rf.evaluate
    rf.evaluate = lambda *a, **k: calls.append(1) or saved(*a, **k)
    try:
        assert rf.main(argv) == 0
    finally:
        rf.evaluate = saved
    assert not calls


def test_apt_outputs_are_forward_dense_and_the_pre_logits(tiny):
    src, x = tiny
    apt = aptvit.convert(src.vit, budget=0.35)
    layout = apt.make_layout(x)
    with torch.no_grad():
        pre, dense = rf.apt_outputs(apt, x, layout)
        assert torch.allclose(dense, apt.forward_dense(x, layout), atol=1e-5)
        assert torch.allclose(pre, apt.forward_packed(x, apt.prepare(x, layout), pre_logits=True), atol=1e-5)
        # the smooth unmerging taken from the same run equals forward_dense(smooth=True)
        assert torch.allclose(rf.smooth_of(dense, layout), apt.forward_dense(x, layout, smooth=True), atol=1e-5)


def test_uniform_reference_is_timm(tiny):
    src, x = tiny
    with torch.no_grad():
        pre, dense = rf.final_tokens(src.vit, x)
        feats = src.vit.forward_features(x)
    assert torch.equal(pre, feats[:, 0])
    assert torch.equal(dense.flatten(2).transpose(1, 2), feats[:, 1:])


def test_random_layouts_have_the_budget_and_ignore_content(tiny):
    src, x = tiny
    m = rf.apt_method(src, 0.35, "random", False, sizes=(14, 28))
    with torch.no_grad():
        _, _, tokens, _ = m.run(x, None)
        assert torch.allclose(tokens, torch.full_like(tokens, 0.34375))  # 22 of 64, as the entropy layouts
        # with a 4x merge the count is within one merge of the budget, depending on the draw (19 or 22 here)
        _, _, tokens, _ = rf.apt_method(src, 0.35, "random", False).run(x, None)
    assert ((tokens * 64 <= 22.4) & (tokens * 64 >= 22.4 - 15)).all()
    g = torch.zeros(1, 112, 112)
    a = rf.random_scores(g, (28, 56), 14)
    b = rf.random_scores(g + 0, (28, 56), 14)
    assert all(torch.equal(a[s], b[s]) for s in a)  # the same images get the same layout (cached rows agree)


def test_random_draws_are_seeded_by_photo_and_draw_not_by_pixels():
    a0, a1 = rf.draw_seed("campus/P1.png", 0), rf.draw_seed("campus/P1.png", 1)
    assert a0 != a1 and a0 == rf.draw_seed("campus/P1.png", 0)  # another draw; the same (photo, draw) again
    assert rf.draw_seed("campus/P2.png", 0) != a0 and rf.draw_seed("campus/P1.png", 0, seed=1) != a0
    g = torch.rand(2, 112, 112) * 255
    d0 = rf.random_scores(g, (28, 56), 14, seeds=[a0, rf.draw_seed("x", 0)])
    d1 = rf.random_scores(g, (28, 56), 14, seeds=[a1, rf.draw_seed("x", 1)])
    assert not torch.equal(d0[28][0], d1[28][0]) and not torch.equal(d0[28][1], d1[28][1])  # two draws differ
    again = rf.random_scores(g[:1].round(), (28, 56), 14, seeds=[a0])  # other pixels (last bits), another batch
    assert all(torch.equal(again[s][0], d0[s][0]) for s in d0)  # the same photo and draw: the same scores
    assert torch.equal(d0[56], torch.nn.functional.max_pool2d(d0[28][:, None], 2)[:, 0])  # coarser: max of four
    with pytest.raises(ValueError):
        rf.random_scores(g, (28, 56), 14, seeds=[a0])
    assert rf.photo_id("/a/site-packages/mvtbdata/images/campus/P1.png") == "campus/P1.png"


def test_a_random_row_is_the_mean_over_its_draws_with_their_spread(tiny):
    src, x = tiny
    m = rf.with_draws(rf.apt_method(src, 0.35, "random", True, sizes=(14, 28)), 3)
    assert m.name == "Random + area bias sizes=14/28 (3 draws)" and m.draws == 3
    ref = rf.reference(src, x, 2)
    row = rf.evaluate(m, x, x, ref, src, 1, photos=["a", "b"])[""]
    dense = row["per_draw"]["dense_cos"]
    assert len(dense) == 3 and len(set(dense)) == 3  # independent draws
    assert row["dense_cos"] == pytest.approx(sum(dense) / 3) and row["dense_cos_max"] == max(dense)
    assert row["dense_cos_std"] == pytest.approx(float(torch.tensor(dense).std()))  # ddof 1
    # the batch size does not change a photo's draw: the same row in one batch of two
    assert rf.evaluate(m, x, x, ref, src, 2, photos=["a", "b"])[""]["per_draw"]["dense_cos"] == pytest.approx(dense)
    assert rf.with_draws(rf.apt_method(src, 0.35, "entropy", True), 3).draws == 0  # others stay one run


def test_only_random_runs_the_random_rows_and_the_chosen_settings(tmp_path):
    out = tmp_path / "res"
    argv = ["--quick", "--sizes", "56", "--budgets", "0.5", "--only", "random", "--random-draws", "2"]
    assert rf.main(argv + ["--work", str(tmp_path / "w"), "--results", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    names = {r["name"] for r in rows}
    assert rf.CHOSEN in names and "Random + area bias sizes=14/28 (2 draws)" in names
    assert all(n in (rf.CHOSEN, "uniform (source)") or n.startswith("Random") for n in names), names
    assert all(r.get("images_per_s") is None for r in rows)  # nothing timed
    cache = json.loads(next((tmp_path / "w-quick").glob("rows-*.json")).read_text())
    assert "56|speed" not in cache  # a later full run still times


def test_only_distill_runs_the_students_and_their_zero_shot_starts(tmp_path):
    out = tmp_path / "res"
    argv = ["--quick", "--sizes", "56", "--budgets", "0.35", "--distill-budgets", "0.35", "--only", "distill"]
    argv += ["--distill-recipes", "1e-4x10,1e-4x100", "--work", str(tmp_path / "w"), "--results", str(out)]
    assert rf.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    val = {r["name"] for r in rows if r["split"] == "val"}
    test = {r["name"] for r in rows if r["split"] == "test"}
    distilled = {n for n in val if " + distill" in n}
    assert len(distilled) == 3  # two APT recipes and one lower-resolution lr, chosen at 35%
    assert len({n for n in test if " + distill" in n}) == 2  # each student's chosen recipe
    zero_shot = {rf.CHOSEN, "lower resolution (28 px)", "uniform (source)"}
    assert val - distilled == zero_shot and test == zero_shot | (test & {n for n in test if " + distill" in n})
    assert all(r.get("images_per_s") is None for r in rows)  # nothing timed
    cache = json.loads(next((tmp_path / "w-quick").glob("rows-*.json")).read_text())
    assert "56|speed" not in cache


def test_matched_token_counts():
    assert rf.lowres_side(448, 0.5) == 23 * 14 and rf.lowres_side(224, 0.35) == 9 * 14
    r, mean = rf.tome_r(1024, 0.5, 12)
    assert abs(mean - 512) < 25
    assert rf.tome_r(256, 1.0, 12)[0] == 0


def test_splits_keep_scenes_whole():
    sources = [f"/x/mvtbdata/images/campus/P10704{i:02d}.png" for i in range(10)]
    sources += [f"/x/mvtbdata/images/flowers{i}.png" for i in range(1, 6)]
    sources += [f"/x/interior_photos/images/pexels-{i}.jpg" for i in range(8)] + ["skimage:coffee"]
    sp = rf.split_photos(0, sources)
    assert not set(sp["val"]) & set(sp["test"])
    for scene in ("campus", "flowers"):
        where = {k for k, v in sp.items() for s in v if scene in s}
        assert len(where) == 1, scene  # one scene never straddles the splits
        assert sum(scene in s for v in sp.values() for s in v) == rf.PER_SCENE
    assert sum("pexels" in s for v in sp.values() for s in v) == 8  # every interior photo is its own scene


def test_each_student_keeps_its_own_best_recipe_of_the_validation_rows(tiny):
    from benchmarks import fidelity_distill as fd

    src, _ = tiny
    unbuilt = types.SimpleNamespace(train_key="photos")  # students are built only when a row runs: none here
    grid = {fd.Recipe(lr=lr, new_layer_lr_scale=k): unbuilt for lr in (2e-6, 5e-6) for k in (10.0, 100.0)}
    tried = rf.distill_methods(src, 0.5, grid)
    apt = [m for m in tried if m.curve.startswith("APT")]
    low = [m for m in tried if m.curve.startswith("lower resolution")]
    assert len(apt) == 4 and len(low) == 2  # a uniform student has no new layers: one per lr
    assert len({m.name for m in tried}) == 6
    best_apt, best_low = fd.Recipe(lr=5e-6, new_layer_lr_scale=100.0), fd.Recipe(lr=2e-6)
    # the mean of dense and class decides: the APT winner is second on dense, first on the mean
    scores = {}
    for m in tried:
        top = m.recipe == best_apt if m in apt else m.recipe.key() == best_low.key()
        scores[m.name] = {"": {"dense_cos": 0.90 if top else 0.91, "class_cos": 0.99 if top else 0.95}}
    chosen = rf.choose_recipes(grid, tried, scores)
    assert chosen == {"apt": best_apt, "lowres": best_low}
    again = rf.distill_methods(src, 0.5, grid, chosen)
    assert [m.recipe for m in again] == [best_apt, best_low]
    # no validation rows (e.g. --cached-only): the first recipe
    first = next(iter(grid))
    assert rf.choose_recipes(grid, tried, {}) == {"apt": first, "lowres": first}


def test_the_larger_sizes_get_a_validation_of_the_patch_sizes(tmp_path):
    out = tmp_path / "res"
    argv = ["--quick", "--sizes", "56,112", "--budgets", "0.5", "--distill-steps", "0"]
    assert rf.main(argv + ["--work", str(tmp_path / "w"), "--results", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    val112 = {r["name"] for r in rows if r["size"] == 112 and r["split"] == "val"}
    two, three = "APT entropy + area bias sizes=14/28", "APT entropy + area bias"
    assert {two, three, "APT upsample + area bias sizes=14/28", "APT upsample + area bias"} <= val112
    assert all(r["photos"] == 1 for r in rows if r["size"] == 112 and r["split"] == "val")  # --large-val's count
    val56 = {r["name"] for r in rows if r["size"] == 56 and r["split"] == "val"}
    assert "APT laplacian" in val56 and "APT laplacian" not in val112  # the full comparison at the first size only


def test_the_mean_content_variant_gives_a_merged_token_the_mean_of_its_base_embeddings(tiny):
    from aptvit.nn.embed import AdaptivePatchEmbed

    src, x = tiny
    apt = aptvit.convert(src.vit, patch_sizes=(14, 28))
    pe = apt.patch_embed
    library = AdaptivePatchEmbed.bank
    with torch.no_grad():
        plain = apt.adaptive_embed.bank(x, pe.proj, pe.norm)
        with rf.content_variant("mean"):
            mean = apt.adaptive_embed.bank(x, pe.proj, pe.norm)
        n, g = len(x) * 8 * 8, x.shape[-1] // 14  # base rows come first (8 x 8 cells of 14 px)
        grid = plain[:n].view(len(x), g, g, -1)
        want = (grid[:, ::2, ::2] + grid[:, ::2, 1::2] + grid[:, 1::2, ::2] + grid[:, 1::2, 1::2]) / 4
    assert AdaptivePatchEmbed.bank is library  # restored
    assert torch.equal(mean[:n], plain[:n]) and mean.shape == plain.shape
    assert torch.allclose(mean[n:], want.reshape(-1, want.shape[-1]), atol=1e-6 * want.abs().max().item())
    assert not torch.allclose(plain[n:], mean[n:])  # the library's merged rows are another embedding


def test_apt_at_a_lower_resolution_keeps_the_full_grids_budget(tiny):
    src, x = tiny  # 112 px: 8 x 8 cells; 35% = 22.4 tokens
    m = rf.apt_lowres_method(src, 0.35, 0.6)
    assert "84 px" in m.name  # 6 x 6 cells, of which APT keeps ~62%
    with torch.no_grad():
        pre, dense, tokens, _ = m.run(x, None)
    assert dense[""].shape == (len(x), 32, 8, 8) and pre.shape == (len(x), 32)
    # one merge removes 3 tokens: the count is within a merge of 35% of the full grid (64 cells), not of 6 x 6's
    assert ((tokens * 64 - 0.35 * 64).abs() <= 3).all() and (tokens * 64 < 36 * 0.7).all()


def test_a_malformed_recipe_list_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        rf.parse_args(["--distill-recipes", "2e-6x10,5e-6"])
    assert "--distill-recipes: LRxK pairs" in capsys.readouterr().err
    assert rf.parse_args(["--distill-recipes", "2e-6x10,5e-6x100"]).distill_recipes == [(2e-6, 10.0), (5e-6, 100.0)]


def test_a_split_of_no_photos_is_skipped(tmp_path):
    out = tmp_path / "res"
    argv = ["--quick", "--sizes", "56", "--budgets", "0.5", "--distill-steps", "0", "--val", "0"]
    assert rf.main(argv + ["--work", str(tmp_path / "w"), "--results", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows and {r["split"] for r in rows} == {"test"}


def test_the_larger_sizes_distil_with_the_recipes_chosen_at_the_first(tmp_path):
    out = tmp_path / "res"
    argv = ["--quick", "--sizes", "56,112", "--budgets", "0.5", "--distill-recipes", "1e-4x10,1e-4x100"]
    argv += ["--large-distill-budgets", "0.5", "--work", str(tmp_path / "w"), "--results", str(out)]
    assert rf.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    tried = {r["name"] for r in rows if r["size"] == 56 and r["split"] == "val" and "distill" in r["name"]}
    assert len(tried) == 3  # two APT recipes, one lower-resolution lr
    for split in ("val", "test"):
        large = [r["name"] for r in rows if r["size"] == 112 and r["split"] == split and "distill" in r["name"]]
        assert len(large) == 2  # the chosen APT recipe and the chosen lower-resolution lr
        first = {r["name"] for r in rows if r["size"] == 56 and r["split"] == "test" and "distill" in r["name"]}
        strip = lambda n: n.split(" (")[0] + n[n.index(" + distill") :]  # noqa: E731  (the side differs by size)
        assert {strip(n) for n in large} == {strip(n) for n in first}  # the same recipes as the first size's test rows
    assert [*(tmp_path / "w-quick").glob("train-*/distill-112px-s2-b2-lr0.0001-seed0")]  # trained at 112 px


def test_students_of_other_training_photos_are_never_reused(tiny, tmp_path):
    """The training photos are those of scenes no evaluated photo shares, so ``--val`` / ``--test`` move them:
    crops, students and their rows are cached under the training photos' key, never reused across runs that
    differ in it (a run with ``--test 0`` once trained on the test scenes, and its students could be taken for
    another run's)."""
    src, _ = tiny
    args = rf.parse_args(["--quick", "--distill-recipes", "1e-4x10"])
    sources = [f"/photos/mvtbdata/images/{scene}/{i}.jpg" for scene in ("a", "b", "c") for i in range(2)]
    grids = [rf.make_students(src, args, sources, evaluated, tmp_path) for evaluated in (sources[:2], sources[:4])]
    (a,), (b,) = (g.values() for g in grids)
    assert a.train_key != b.train_key and a.crops_dir != b.crops_dir and a.work != b.work
    keys = [{rf.row_key(56, "val", 2, 0.35, m) for m in rf.distill_methods(src, 0.35, g)} for g in grids]
    assert len(keys[0]) == 2 and not keys[0] & keys[1]  # the APT and the lower-resolution student, apart
    same = rf.make_students(src, args, sources, sources[:2], tmp_path)
    assert next(iter(same.values())).crops_dir == a.crops_dir  # the same photos: the same cache
