"""One source for each setting: the command line's defaults are read from the dataclasses and functions."""

import dataclasses

from aptvit import cli
from aptvit.bench import bench_command
from aptvit.evaluate import eval_command
from aptvit.train import TrainConfig


def _field(name):
    (f,) = [f for f in dataclasses.fields(TrainConfig) if f.name == name]
    return f


def test_finetune_help_shows_the_train_config_defaults(monkeypatch, capsys):
    monkeypatch.setattr(_field("lr"), "default", 0.00123)
    monkeypatch.setattr(_field("epochs"), "default", 7)
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices["finetune"]
    text = sub.format_help()
    assert "(default 0.00123)" in text and "default 7" in text


def test_eval_and_bench_defaults_are_their_functions_defaults():
    args = cli.build_parser().parse_args(["eval", "--data", "x"])
    assert (args.batch_size, args.workers) == (
        cli.default_of(eval_command, "batch_size"),
        cli.default_of(eval_command, "workers"),
    )
    args = cli.build_parser().parse_args(["bench"])
    assert (args.runs, args.warmup) == (cli.default_of(bench_command, "runs"), cli.default_of(bench_command, "warmup"))
    assert args.attention == "auto" and args.scorer is None


def test_default_of_reads_factories_and_signatures():
    assert cli.default_of(TrainConfig, "model_args") == {}
    assert cli.default_of(eval_command, "size") is None
