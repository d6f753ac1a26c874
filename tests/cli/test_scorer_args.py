"""``--scorer-args``: a scorer's registered parameters from the command line (show, bench/eval through the model,
finetune with its resume check)."""

import json
import re

import numpy as np
from PIL import Image

from aptvit.nn.checkpoint import read_metadata

from .helpers import finetune_argv, make_folder, run


def _ramp(path):
    """A 64x64 image: a ramp of 32 gray levels on the left, flat on the right."""
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:, :32] = (np.arange(32, dtype=np.uint8) * 8)[None, :, None]
    Image.fromarray(img).save(path)
    return path


def test_show_takes_the_scorers_parameters(tmp_path, capsys):
    path = _ramp(tmp_path / "ramp.png")
    tokens = {}
    for extra in ([], ["--scorer-args", "bins=4"]):
        code, out, err = run(capsys, "show", path, "--thresholds", "32=3.5,64=3.0", "--json", "--overwrite", *extra)
        assert code == 0, err
        tokens[len(extra)] = json.loads((tmp_path / "ramp_apt.json").read_text())["tokens"]
    assert tokens[2] < tokens[0]  # 4 bins see the ramp as 4 levels: lower entropy, more merging


def test_bad_scorer_args_are_one_line(tmp_path, capsys):
    path = _ramp(tmp_path / "ramp.png")
    code, out, err = run(capsys, "show", path, "--scorer-args", "sigma=2")
    assert code == 2 and "scorer 'entropy' has no parameter(s) ['sigma']; its parameters: bins" in err, err
    code, out, err = run(capsys, "show", path, "--scorer-args", "bins")
    assert code == 2 and "is not NAME=VALUE" in err, err


def test_finetune_saves_them_and_resume_refuses_a_change(tmp_path, capsys):
    data = make_folder(tmp_path / "data", train=4, val=2)
    argv = finetune_argv(data, tmp_path / "run", "--scorer-args", "bins=256")
    code, out, err = run(capsys, *argv, "--max-steps", "1")
    assert code == 0, err
    assert json.loads(read_metadata(tmp_path / "run" / "model.safetensors")["aptvit"])["scorer_args"] == {"bins": 256}
    code, out, err = run(capsys, *argv, "--max-steps", "2", "--resume")
    assert code == 0, err
    code, out, err = run(capsys, *argv[:-1], "bins=128", "--resume")
    assert code == 2 and re.search(r"--scorer-args \{'bins': 128\} \(the run's: \{'bins': 256\}\)", err), err
