"""The installed ``aptvit`` console script (what a user types), not only ``python -m aptvit``."""

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

import aptvit

from ..conftest import photo


def console_script() -> Path:
    """The ``aptvit`` executable that installing the project put beside the interpreter running the tests."""
    try:
        dist = importlib.metadata.distribution("aptvit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("aptvit is not installed in this environment (pip install -e .): no console script to run")
    entry = [e.value for e in dist.entry_points if e.group == "console_scripts" and e.name == "aptvit"]
    assert entry == ["aptvit.cli:main"], f"the 'aptvit' console script entry point is {entry}"
    name = "aptvit.exe" if os.name == "nt" else "aptvit"
    folders = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise AssertionError(f"aptvit is installed but its console script is in none of {[str(f) for f in folders]}")


def run(*argv, cwd=None):
    return subprocess.run(
        [str(console_script()), *map(str, argv)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_console_script_prints_the_version():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"aptvit {aptvit.__version__}"


def test_console_script_runs_show_and_reports_user_errors(tmp_path):
    img = tmp_path / "coffee.png"
    Image.fromarray(photo("coffee", (96, 128))[0].permute(1, 2, 0).numpy()).save(img)
    result = run("show", img, "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tokens" in result.stdout
    with Image.open(tmp_path / "out" / "coffee_apt.png") as im:
        im.verify()
    missing = run("show", tmp_path / "missing.png", cwd=tmp_path)
    assert missing.returncode == 2  # the exit code reaches the shell
    assert len(missing.stderr.strip().splitlines()) == 1 and "missing.png" in missing.stderr
