"""benchmarks/pictures.py: the README's picture comes from the documented command, and that command redraws it."""

import json
from pathlib import Path

from aptvit.cli import main
from aptvit.demo import DEMO_PATCH_SIZES, DEMO_SIZE, save_photos
from benchmarks import pictures

ROOT = Path(__file__).resolve().parents[2]
SAME = ("tokens", "base_tokens", "height", "width", "patch_sizes", "counts", "scorer", "thresholds", "budget", "layout")


def test_smoke_writes_the_demo_and_the_readme_picture(tmp_path, capsys):
    hero = tmp_path / "docs" / "layout.png"
    assert pictures.main(["--smoke", "--demo", str(tmp_path / "demo"), "--hero", str(hero)]) == 0
    assert hero.read_bytes() == (tmp_path / "demo" / "camera_apt.png").read_bytes()
    record = json.loads(hero.with_suffix(".json").read_text())
    assert record == pictures.hero_record(json.loads((tmp_path / "demo" / "camera_apt.json").read_text()), hero)
    assert record["height"] == 64 and len(list((tmp_path / "demo").glob("*_apt.png"))) == 5


def test_the_committed_readme_picture_is_what_its_command_draws(tmp_path, capsys):
    """docs/results/layout.json holds the numbers of docs/results/layout.png: the command in its caption gives them again (after a
    change of the default scorer or thresholds, `make pictures` redraws both)."""
    (photo,) = save_photos(tmp_path, DEMO_SIZE, [pictures.HERO_PHOTO])
    sizes = ",".join(map(str, DEMO_PATCH_SIZES))
    argv = ["show", photo, "--size", str(DEMO_SIZE), "--patch-sizes", sizes, "--heatmap", "--json"]
    assert main([str(a) for a in argv]) == 0
    drawn = json.loads((tmp_path / "camera_apt.json").read_text())
    committed = json.loads((ROOT / "docs" / "results" / "layout.json").read_text())
    assert {k: drawn[k] for k in SAME} == {k: committed[k] for k in SAME}
