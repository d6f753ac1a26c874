"""The version is written once (aptvit.__version__); the package metadata reads it from there."""

from pathlib import Path

import aptvit

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_reads_the_version_from_the_package():
    from setuptools.config.pyprojecttoml import read_configuration

    project = read_configuration(ROOT / "pyproject.toml")["project"]
    assert project["dynamic"] == ["version"] and project["version"] == aptvit.__version__ == "0.2.0"
    assert "## 0.2.0" in (ROOT / "CHANGELOG.md").read_text()  # each release says what a user will notice
