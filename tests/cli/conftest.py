"""Fixtures of the CLI and finetune tests."""

import logging

import pytest


@pytest.fixture
def info_log(caplog):
    """``caplog`` holding the package's INFO messages (what the CLI prints; a library user sees them only through
    their own logging configuration)."""
    caplog.set_level(logging.INFO, logger="aptvit")
    return caplog
