"""Progress of long loops when stderr is not a terminal (a log file, nohup, CI): whole timed lines on stderr, none
on stdout, nothing for a run shorter than the interval. (Under pytest stderr is captured, so not a terminal.)"""

import time

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


def test_lines_start_after_the_interval_and_the_last_one_is_written_once(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.2)

    def slow():
        for i in range(4):
            time.sleep(0.15)  # the loop outlasts the interval (0.6 s against 0.2 s), however loaded the machine
            yield i

    assert list(progress(slow(), desc="slow", total=4)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert lines and not any(" 0/4" in line for line in lines), lines  # nothing before the interval has passed
    assert [line for line in lines if "4/4" in line] == [lines[-1]], lines  # the end, once
    assert len(set(lines)) == len(lines) and "\x1b" not in "".join(lines)


def test_a_bar_inside_another_writes_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    for _ in progress(range(2), desc="outer"):
        for _ in progress(range(2), desc="inner"):  # tqdm stacks it one row down: cursor moves on a terminal
            pass
    err = capsys.readouterr().err
    assert "\x1b" not in err and all(line.startswith(("outer:", "inner:")) for line in err.splitlines()), err


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
