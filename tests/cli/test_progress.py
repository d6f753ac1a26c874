"""Progress of long loops when stderr is not a terminal (a log file, nohup, CI): whole timed lines on stderr, none
on stdout, nothing for a run shorter than the interval. (Under pytest stderr is captured, so not a terminal.)"""

import aptvit
from aptvit import progress as progress_module
from aptvit.progress import progress

from ..tiny import tiny_vit
from .helpers import make_folder, run


def test_off_a_terminal_progress_is_whole_lines_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)  # a line at every step
    assert list(progress(range(3), desc="work")) == [0, 1, 2]
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    lines = err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("work:") for line in lines), err
    assert "3/3" in lines[-1] and "100%" in lines[-1]  # the line it ends on says it finished


def test_a_run_shorter_than_the_interval_prints_nothing_and_disabled_never_prints(monkeypatch, capsys):
    for item in progress(range(3), desc="quick"):  # LOG_EVERY_S, a minute: far longer than this loop
        pass
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    with progress(total=2, desc="off", enabled=False) as bar:
        bar.update(2)
    assert capsys.readouterr() == ("", "")


def test_eval_in_a_log_file_says_how_far_it_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    data = make_folder(tmp_path / "data", train=0, val=2, size=32)
    checkpoint = aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=2)), tmp_path / "m.safetensors")
    code, out, err = run(capsys, "eval", "--checkpoint", checkpoint, "--data", data, "--size", "32", "--workers", "0")
    assert code == 0, err
    assert "top-1" in out and "eval:" not in out  # results alone on stdout
    assert "\r" not in err and any(line.startswith("eval:") and "100%" in line for line in err.splitlines()), err
