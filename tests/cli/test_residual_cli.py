"""``--scorer residual`` from the command line: an oblique gradient merges, which entropy keeps at the base size."""

import json

import numpy as np
from PIL import Image

from .helpers import run


def test_show_with_the_residual_scorer_merges_a_gradient(tmp_path, capsys):
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.repeat(((xx + yy) * 2).astype(np.uint8)[..., None], 3, axis=2)  # 0..252 along the diagonal
    path = tmp_path / "ramp.png"
    Image.fromarray(img).save(path)
    tokens = {}
    for scorer in ("entropy", "residual"):
        code, out, err = run(
            capsys,
            "show",
            path,
            "--scorer",
            scorer,
            "--json",
            "--overwrite",
            "--scorer-args",
            *(["bins=512"] if scorer == "entropy" else ["radius=2"]),
        )
        assert code == 0, err
        tokens[scorer] = json.loads((tmp_path / "ramp_apt.json").read_text())["tokens"]
    assert tokens == {"entropy": 16, "residual": 4}
    code, out, err = run(capsys, "show", path, "--scorer", "residual", "--scorer-args", "radius=0")
    assert code == 2 and "radius must be an int from 1 to 15, got 0" in err, err
