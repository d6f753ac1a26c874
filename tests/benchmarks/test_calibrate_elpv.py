"""benchmarks/calibrate_elpv.py --quick: the source saved for calibrate, the CLI run on the val folder, the test line."""

import json

import pytest

from benchmarks import calibrate_elpv as ce
from benchmarks import real_elpv


@pytest.mark.slow
@pytest.mark.parametrize("max_drop, chosen", [("100", True), ("0.5", False)])
def test_quick_run_calibrates_on_val_and_reports_the_test_split_once(tmp_path, max_drop, chosen):
    work, out = tmp_path / "w", tmp_path / "res"
    assert ce.main(["--quick", "--work", str(work), "--results", str(out), "--max-drop", max_drop]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    report, run = result["calibration"], result["calibrate"]
    assert run["command"].startswith("aptvit calibrate --checkpoint ") and "--max-drop" in run["command"]
    assert (report["chosen"] is not None) == chosen and run["exit_status"] == (0 if chosen else 2)
    if not chosen:  # calibrate's own message, verbatim
        assert any("no setting keeps top-1 within 0.5 points" in line for line in run["last_lines"])
    assert report["labelled"] and report["images"] == 16  # --quick's val split, labels read from the class folders
    test = result["test"]
    assert [e["role"].split()[0] for e in test][:2] == ["source", "chosen" if chosen else "closest"]
    assert all(len(e["right"]) == 16 for e in test) and "difference" not in test[0]
    for e in test[1:]:
        assert e["difference"] == pytest.approx(e["top1"] - test[0]["top1"])
    assert "## The test split, once (16 cells)" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # the test line reads images as calibrate does: on the val folder it gives calibrate's own val top-1
    folder = next(work.glob("calibrate_folders_*"))
    source = ce.aptvit.load(next(work.glob("calibrate_source_*.safetensors")))
    for row in report["rows"]:  # every row, rebuilt from calibration.json as the test line rebuilds the closest
        model, uniform = ce.row_model(source, row), row["kind"] != "apt"
        pred, label, tokens = ce.test_predictions(model, uniform, folder / "val", row["size"], real_elpv.CLASSES, 8)
        assert 100 * (pred == label).mean() == pytest.approx(row["top1"]), row["name"]
        assert tokens == pytest.approx(row["tokens"]), row["name"]
    if chosen:
        pick = next(r for r in report["rows"] if r["name"] == report["chosen"])
        model = ce.aptvit.load(next(work.glob("calibrate_out_*")) / "model.safetensors")
        pred, label, tokens = ce.test_predictions(
            model, pick["kind"] != "apt", folder / "val", pick["size"], real_elpv.CLASSES, 8
        )
        assert 100 * (pred == label).mean() == pytest.approx(pick["top1"]) and tokens == pytest.approx(pick["tokens"])


def test_options_split_between_this_script_and_real_elpv():
    args = ce.parse_args(["--max-drop", "1", "--size", "112", "--calibrate", "--runs 5", "--results", "r"])
    assert (args.max_drop, args.size, args.calibrate, args.results) == (1.0, 112, "--runs 5", "r")
    assert args.train == 384 and args.val == 256 and args.test == 256  # real_elpv's splits: its source is reused
    quick = ce.parse_args(["--quick", "--calibrate", "--runs 2"])
    assert quick.calibrate == f"{ce.QUICK_CALIBRATE} --runs 2" and quick.size == 56


def test_a_rows_model_runs_the_area_bias_calibrate_measured():
    """The test line rebuilds a row of calibration.json: with that row's area bias, or (a row written before calibrate
    swept it) with the checkpoint's own, which calibrate then ran."""
    from tests.tiny import tiny_vit

    source = ce.aptvit.convert(tiny_vit("vit_cls"), area_bias=True)
    row = {"kind": "apt", "patch_sizes": [16, 32], "scorer": "entropy", "budget": 0.5, "thresholds": None}
    assert ce.row_model(source, row).config.area_bias is True
    for bias in (False, True):
        assert ce.row_model(source, {**row, "area_bias": bias}).config.area_bias is bias


def test_reuse_takes_only_a_run_of_the_same_command(tmp_path):
    """``--reuse`` had read whatever grid the last run swept: a run with other calibrate options is made again."""
    args = ce.parse_args(["--calibrate", "--area-bias off"])
    cmd = ce.calibrate_command(args, tmp_path / "c.safetensors", tmp_path / "val", tmp_path)
    assert ce.reusable(tmp_path, cmd) is None  # nothing recorded yet
    (tmp_path / "run.json").write_text(json.dumps({"command": ce.shown(cmd), "exit_status": 2}))
    assert ce.reusable(tmp_path, cmd)["exit_status"] == 2
    args.calibrate = ""  # the default grid: both biases
    other = ce.calibrate_command(args, tmp_path / "c.safetensors", tmp_path / "val", tmp_path)
    assert ce.reusable(tmp_path, other) is None
