"""benchmarks/bench_host.py's smoke mode runs (seconds) and reports every path it times."""

from benchmarks.bench_host import main


def test_bench_host_smoke(capsys):
    (row,) = main(["--smoke"])
    assert set(row["ms"]) == {"timm", "apt(x)", "forward_packed", "static apt(x)"}
    assert all(v > 0 for v in row["ms"].values()) and row["static_k"] == 8  # budget 0.5 of 16 base tokens
    assert "| 64 |" in capsys.readouterr().out


def test_bench_host_thread_clock(capsys):
    """``--clock thread`` times this thread's CPU seconds (and says so in the header)."""
    (row,) = main(["--smoke", "--clock", "thread"])
    assert all(v > 0 for v in row["ms"].values())
    assert "thread clock" in capsys.readouterr().out
