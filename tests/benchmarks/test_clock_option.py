"""``--clock wall|thread`` is declared once (``aptvit.bench``) and every benchmark that offers it checks the
one-thread rule the same way: the thread clock counts this thread's CPU time only."""

import importlib
import re
import time
from pathlib import Path

import pytest
import torch

from aptvit.bench import CLOCKS, clock_named
from aptvit.core.io import InputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def threads():
    """Whatever a test sets, torch's thread count is given back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_clock_named_checks_the_one_thread_rule(threads):
    assert CLOCKS == {"wall": time.perf_counter, "thread": time.thread_time}
    with pytest.raises(InputError, match="--clock 'cpu' must be one of wall, thread"):
        clock_named("cpu")
    torch.set_num_threads(2)
    assert clock_named("wall") is time.perf_counter
    with pytest.raises(InputError, match="torch runs on 2 threads: give --workers 1"):
        clock_named("thread", threads_option="--workers")
    assert clock_named("thread", threads_option=None) is time.thread_time  # the caller times on one thread itself
    torch.set_num_threads(1)
    assert clock_named("thread") is time.thread_time


@pytest.mark.parametrize("script", ["bench_caches", "bench_model", "bench_hf"])
def test_every_benchmark_refuses_the_thread_clock_on_several_threads(script, threads, capsys):
    main = importlib.import_module(f"benchmarks.{script}").main
    with pytest.raises(SystemExit) as stop:  # before any model is built or timed
        main(["--smoke", "--clock", "thread", "--threads", "2"])
    assert stop.value.code == 2
    assert "--clock thread counts this thread's CPU time only" in capsys.readouterr().err


def test_the_option_is_declared_in_one_place():
    """No script or command spells out --clock or the clocks itself: they come from ``aptvit.bench``."""
    files = [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("aptvit/**/*.py")]
    own = re.compile(r"[\"']--clock[\"'],\s*choices|time\.thread_time if|[\"']thread[\"']: time\.thread_time")
    found = [f.relative_to(ROOT).as_posix() for f in files if own.search(f.read_text())]
    assert found == ["aptvit/bench.py"], found
