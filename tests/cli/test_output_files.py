"""Files and folders a user names: one rule for the command line and the Python API.

Missing folders on the way to an output are created and reported; ``show`` never replaces an existing file
without ``--overwrite``; the demo replaces only its own earlier files; the demo's benchmark times the patch sizes
its pictures show and says how to read its numbers.
"""

import numpy as np
import pytest
from PIL import Image

import aptvit
from aptvit.core.io import InputError, atomic_write

from ..tiny import tiny_vit
from .helpers import one_line, run


def photo(path, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((64, 64, 3), 120, dtype=np.uint8)
    img[:32, :32] = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)  # busy corner, plain rest: some merges
    Image.fromarray(img).save(path)
    return path


# ---------------------------------------------------------------------------------------------- missing folders
def test_save_creates_missing_folders_and_reports_them(tmp_path, info_log):
    model = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 6.0})
    path = aptvit.save(model, tmp_path / "new" / "deeper" / "m.safetensors")
    assert path.is_file()
    created = [r.getMessage() for r in info_log.records if "created folder" in r.getMessage()]
    assert created == [f"created folder {str(tmp_path / 'new')!r} for {str(path)!r}"]
    assert aptvit.load(path, model=tiny_vit("vit_cls")).config.thresholds == {32: 6.0}


def test_an_existing_folder_is_not_reported(tmp_path, info_log):
    atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    assert (tmp_path / "a.txt").read_text() == "x"
    assert not [r for r in info_log.records if "created folder" in r.getMessage()]


def test_a_file_in_the_way_of_a_folder_is_one_line(tmp_path, capsys):
    image = photo(tmp_path / "a.png")
    (tmp_path / "blocker").write_text("a file, not a folder")
    code, out, err = run(capsys, "show", image, "--out", tmp_path / "blocker" / "sub")
    assert code == 2 and "blocker" in one_line(err)


def test_the_command_line_creates_and_reports_a_missing_out_folder(tmp_path, capsys):
    image = photo(tmp_path / "a.png")
    out_dir = tmp_path / "layouts" / "today"
    code, out, err = run(capsys, "show", image, "--out", out_dir, "--json")
    assert code == 0, err
    assert (out_dir / "a_apt.png").is_file() and (out_dir / "a_apt.json").is_file()
    lines = out.splitlines()
    assert sum("created folder" in line for line in lines) == 1  # once, before the first file in it
    assert f"created folder {str(tmp_path / 'layouts')!r}" in lines[0]


# ---------------------------------------------------------------------------------------------- show never replaces
def test_show_refuses_to_replace_an_existing_picture_unless_told(tmp_path, capsys):
    image = photo(tmp_path / "a.png")
    mine = tmp_path / "a_apt.png"
    mine.write_bytes(b"the user's own picture")
    code, out, err = run(capsys, "show", image)
    assert code == 2
    line = one_line(err)
    assert str(mine) in line and "--overwrite" in line and "--out" in line
    assert mine.read_bytes() == b"the user's own picture"
    code, out, err = run(capsys, "show", image, "--overwrite")
    assert code == 0, err
    with Image.open(mine) as im:
        im.verify()


def test_show_checks_every_output_name_before_writing_any(tmp_path, capsys):
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.png", seed=1)
    (tmp_path / "b_apt.json").write_text("{}")  # only the JSON of the second image is in the way
    code, out, err = run(capsys, "show", a, b, "--json")
    assert code == 2 and "b_apt.json" in one_line(err)
    assert not (tmp_path / "a_apt.png").exists() and not (tmp_path / "b_apt.png").exists()
    code, out, err = run(capsys, "show", a, b)  # no --json: the JSON file is not an output, nothing is in the way
    assert code == 0, err
    assert (tmp_path / "b_apt.json").read_text() == "{}"


def test_show_run_again_on_a_glob_skips_its_own_pictures(tmp_path, capsys):
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.jpg", seed=1)
    code, out, err = run(capsys, "show", a, b)
    assert code == 0, err
    again = sorted(tmp_path.glob("*.png")) + [b]  # what `aptvit show *.png *.jpg` now matches: a_apt.png, b_apt.png
    code, out, err = run(capsys, "show", *again, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_apt.png", "b.jpg", "b_apt.png"]
    assert "a_apt.png: skipped, show's own picture of a.png" in out and "b_apt.png: skipped" in out
    alone = tmp_path / "a_apt.png"  # given without its image it is an image like any other
    code, out, err = run(capsys, "show", alone)
    assert code == 0 and (tmp_path / "a_apt_apt.png").is_file(), err


def test_show_skips_its_pictures_also_under_their_suffixed_names(tmp_path, capsys):
    a_png, a_jpg = photo(tmp_path / "a.png"), photo(tmp_path / "a.jpg", seed=1)
    code, out, err = run(capsys, "show", a_png, a_jpg, "--out", tmp_path / "out")  # one --out: a_png_apt, a_jpg_apt
    assert code == 0, err
    pictures = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in pictures] == ["a_jpg_apt.png", "a_png_apt.png"]
    # `show a.* out/*.png --out out --overwrite`: the two earlier pictures are skipped, the photos drawn again
    code, out, err = run(capsys, "show", a_png, a_jpg, *pictures, "--out", tmp_path / "out", "--overwrite")
    assert code == 0, err
    assert "a_png_apt.png: skipped, show's own picture of a.png" in out and "a_jpg_apt.png: skipped" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_jpg_apt.png", "a_png_apt.png"]


def test_show_from_python_refuses_the_same_way(tmp_path):
    from aptvit.viz import show

    image = photo(tmp_path / "a.png")
    (result,) = show([image], out_dir=tmp_path / "out")
    with pytest.raises(InputError, match="already exists; give --overwrite"):
        show([image], out_dir=tmp_path / "out")
    (again,) = show([image], out_dir=tmp_path / "out", overwrite=True)
    assert again["png"] == result["png"]


# ---------------------------------------------------------------------------------------------- the demo's folder
def test_the_demo_reruns_into_its_own_folder(tmp_path, capsys):
    argv = ("demo", "--out", tmp_path / "demo", "--layouts-only", "--photo-size", "64")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    first = sorted(p.name for p in (tmp_path / "demo").iterdir())
    code, out, err = run(capsys, *argv)
    assert code == 0, err  # its own earlier files are replaced
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == first


def test_the_demo_refuses_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "camera.png").write_bytes(b"the user's photo")
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = run(capsys, "demo", "--out", tmp_path, "--layouts-only", "--photo-size", "64")
    assert code == 2 and "notes.txt" in one_line(err) and "new or empty folder" in err
    assert (tmp_path / "camera.png").read_bytes() == b"the user's photo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["camera.png", "notes.txt"]


# ---------------------------------------------------------------------------------------------- the demo's benchmark
def test_the_demo_benchmarks_the_patch_sizes_its_pictures_show(tmp_path, info_log, monkeypatch):
    import aptvit.bench
    from aptvit.demo import DEMO_PATCH_SIZES, demo

    calls = []
    monkeypatch.setattr(aptvit.bench, "bench_command", lambda source, *a, **kw: calls.append((source, kw)))
    demo(tmp_path / "d", size=64, photo_size=64)
    ((source, kw),) = calls
    assert tuple(source.layout["patch_sizes"]) == DEMO_PATCH_SIZES == (16, 32, 64)
    assert "patch sizes 16/32/64 (as in the pictures)" in info_log.text
    assert "--patch-sizes 16,32,64 --runs" in kw["steadier"]


def test_how_to_read_says_what_a_speedup_is_and_how_to_steady_it():
    from aptvit.bench import how_to_read

    line = how_to_read(3, "aptvit bench --runs 20")
    assert "\n" not in line
    assert "timm ms / APT ms" in line and "3 run(s) alternating" in line and "noisy" in line
    assert line.endswith("aptvit bench --runs 20 on an idle machine")
