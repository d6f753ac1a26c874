"""What aptvit says goes through ``logging``: the CLI prints it (once), the library alone prints nothing."""

import logging
import subprocess
import sys

import torch

from aptvit.cli import main
from aptvit.models import build_models

from .test_cli import write_images

RANDOM = "weights: random (no --pretrained or --checkpoint)"


def bench(tmp_path):
    return main(
        [
            "bench",
            "--model",
            "vit_tiny_patch16_224",
            "--size",
            "32",
            "--batch",
            "1",
            "--images",
            str(tmp_path / "imgs"),
            "--runs",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
        ]
    )


def test_the_cli_prints_each_message_once_however_often_main_runs(tmp_path, capsys):
    write_images(tmp_path / "imgs", size=(32, 32))
    for _ in range(2):
        assert bench(tmp_path) == 0
        out = capsys.readouterr().out
        assert sum(line.startswith(RANDOM) for line in out.splitlines()) == 1, out
        assert "| vit_tiny_patch16_224 | 32x32 | 1 |" in out  # the table, printed bare as before


def test_the_library_alone_prints_nothing_but_logs(tmp_path, capsys, caplog):
    write_images(tmp_path / "imgs", size=(32, 32))
    assert bench(tmp_path) == 0  # the CLI's printing ends with main
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aptvit"):
        build_models("vit_tiny_patch16_224")
    assert capsys.readouterr().out == ""
    assert [r.name for r in caplog.records if r.getMessage().startswith(RANDOM)] == ["aptvit.models"]


def test_a_fresh_process_using_the_library_prints_nothing():
    code = "from aptvit.models import build_models; build_models('vit_tiny_patch16_224')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "" and "weights" not in result.stderr


def test_ranks_other_than_0_log_nothing(monkeypatch, caplog):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    with caplog.at_level(logging.INFO, logger="aptvit"):
        build_models("vit_tiny_patch16_224")
    assert [r for r in caplog.records if r.name.startswith("aptvit")] == []
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    with caplog.at_level(logging.INFO, logger="aptvit"):
        build_models("vit_tiny_patch16_224")
    assert any(r.getMessage().startswith(RANDOM) for r in caplog.records)
