"""A new user's first hour (issue 29): pictures that state what they draw, and messages that help.

Each ``test_item*`` takes one numbered item of the issue; ``MESSAGES`` is the table of one-line errors (argv, exit
code, a regular expression for the line on stderr).
"""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import aptvit
from aptvit.core.quadtree import default_thresholds
from aptvit.nn.config import APTConfig

from ..tiny import tiny_vit
from .helpers import one_line, run


def noise_png(path, h, w, seed=0):
    """A PNG of random colours: no pixel of it is the figure's white background."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 200, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------- item 1
def test_item1_the_demo_draws_what_its_header_states_on_unpadded_photo_copies(tmp_path, capsys):
    from aptvit.demo import DEMO_PHOTOS
    from aptvit.photos import load_photo

    code, out, err = run(capsys, "demo", "--out", tmp_path, "--layouts-only", "--photo-size", "64")
    assert code == 0, err
    header = re.search(r"patch sizes ([\d/]+), (\w+) scorer, thresholds ([\d=., ]+) ==", out)
    assert header, out
    sizes = [int(s) for s in header[1].split("/")]
    stated = dict(pair.split("=") for pair in header[3].split(", "))
    for name in DEMO_PHOTOS:
        shown = json.loads((tmp_path / f"{name}_apt.json").read_text())
        assert shown["patch_sizes"] == sizes and shown["layout"]["patch_sizes"] == sizes
        assert shown["scorer"] == header[2] == APTConfig.scorer
        assert {k: float(v) for k, v in shown["thresholds"].items()} == {k: float(v) for k, v in stated.items()}
        # the saved copy is the resized photo itself: no black padding strips
        h, w = load_photo(name).shape[-2:]
        with Image.open(tmp_path / f"{name}.png") as im:
            assert (im.height, im.width) == (64, round(w * 64 / h)) if h <= w else (round(h * 64 / w), 64), name


def test_item1_show_json_records_the_thresholds_used(tmp_path, capsys):
    path = noise_png(tmp_path / "a.png", 64, 96)
    code, out, err = run(capsys, "show", path, "--json")
    assert code == 0, err
    shown = json.loads((tmp_path / "a_apt.json").read_text())
    used = default_thresholds((16, 32), APTConfig.scorer)
    assert shown["thresholds"] == {str(k): v for k, v in used.items()} and shown["budget"] is None
    code, out, err = run(capsys, "show", path, "--json", "--thresholds", "32=5,64=3")
    assert code == 0, err
    assert json.loads((tmp_path / "a_apt.json").read_text())["thresholds"] == {"32": 5.0, "64": 3.0}


def photo_rows(png) -> int:
    """Rows of the picture that are mostly not the white background: the photo's height as drawn."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((pixels < 245).any(-1).mean(1) > 0.8).sum())


def test_item1_the_photo_fills_the_picture_at_its_aspect_and_width_and_dpi_are_options(tmp_path, capsys):
    h, w = 448, 608
    path = noise_png(tmp_path / "wide.png", h, w)
    code, out, err = run(capsys, "show", path)
    assert code == 0, err
    with Image.open(tmp_path / "wide_apt.png") as im:
        width, height = im.size
    assert width == 640  # the default, one panel
    # the photo takes the width (less thin margins) at its own aspect; the title and legend bands are small
    assert photo_rows(tmp_path / "wide_apt.png") >= 0.95 * width * h / w
    assert height <= 1.0 * width * h / w + 2 * 0.62 * 110 + 2
    code, out, err = run(capsys, "show", path, "--heatmap", "--width", "900", "--dpi", "150")
    assert code == 0, err
    with Image.open(tmp_path / "wide_apt.png") as im:
        assert im.size[0] == 900
    code, out, err = run(capsys, "show", path, "--width", "10")
    assert code == 2 and re.search(r"--width 10 must be", one_line(err)), err


def test_item1_the_base_size_swatch_is_not_white_on_white():
    from matplotlib.colors import to_rgb

    from aptvit.viz import legend_handles

    for handle in legend_handles((16, 32, 64), {16: 1, 32: 2, 64: 3}):
        assert sum(to_rgb(handle.get_edgecolor())) / 3 < 0.5, handle.get_label()


def test_item1_pictures_state_the_scorer_and_budget(tmp_path, capsys, monkeypatch):
    import aptvit.viz

    titles = []
    draw = aptvit.viz.draw_layout
    monkeypatch.setattr(aptvit.viz, "draw_layout", lambda *a, **k: titles.append(k["subtitle"]) or draw(*a, **k))
    path = noise_png(tmp_path / "a.png", 64, 64)
    assert run(capsys, "show", path, "--budget", "0.5", "--scorer", "laplacian")[0] == 0
    assert run(capsys, "show", path, "--thresholds", "32=5")[0] == 0
    assert titles == [
        "patch sizes 16/32, laplacian scorer, budget 0.5 of the base tokens",
        f"patch sizes 16/32, {APTConfig.scorer} scorer, thresholds 32=5",
    ]
