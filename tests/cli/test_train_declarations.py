"""Each setting is declared once (``TrainConfig`` field metadata): ``validate`` checks exactly the declared bounds,
and ``RUN_CONTROL`` (what ``--resume`` may change) is read from the same declarations."""

import dataclasses
import re

import pytest

from aptvit.core.io import InputError
from aptvit.train import FIELDS, RUN_CONTROL, Bounds, TrainConfig, option_name, validate


def _outside(bounds: Bounds):
    """A value just outside ``bounds`` (below its low end, else above its high end), and a non-number."""
    if bounds.low is not None:
        yield bounds.low if bounds.low_open else bounds.low - 1
    if bounds.high is not None:
        yield bounds.high if bounds.high_open else bounds.high + 1
    yield float("nan")
    yield True  # a bool is not a number here
    if bounds.integer:
        yield 1.5


BOUNDED = [name for name, f in FIELDS.items() if f.metadata["bounds"] is not None]


def test_every_field_is_declared():
    for f in dataclasses.fields(TrainConfig):
        assert {"help", "bounds", "resume_may_change", "cli"} <= set(f.metadata), f.name


@pytest.mark.parametrize("name", BOUNDED)
def test_validate_refuses_values_outside_the_declared_bounds_by_option(name):
    bounds = FIELDS[name].metadata["bounds"]
    validate(TrainConfig("m", "d", "o"))  # the defaults are inside their bounds
    for value in _outside(bounds):
        with pytest.raises(InputError, match=re.escape(f"{name} ({option_name(name)}) must be {bounds.describe()}")):
            validate(dataclasses.replace(TrainConfig("m", "d", "o"), **{name: value}))


def test_declared_bounds_values():
    assert Bounds(0, 1, high_open=True).describe() == "a finite number in [0, 1)"
    assert Bounds(1, integer=True).describe() == "an int >= 1"
    assert not Bounds(0, low_open=True).holds(0.0) and Bounds(0, low_open=True).holds(1e-9)
    validate(TrainConfig("m", "d", "o", max_steps=None, warmup=0.0, drop_path=0.0, save_every=0, workers=0))


def test_run_control_is_what_the_declarations_say():
    assert RUN_CONTROL == tuple(n for n, f in FIELDS.items() if f.metadata["resume_may_change"])
    assert {"epochs", "max_steps", "workers", "eval", "device", "attention"} <= set(RUN_CONTROL)
    assert not {"lr", "size", "model", "data", "batch_size", "dtype"} & set(RUN_CONTROL)
