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


def _finetune_parser():
    return cli.build_parser()._subparsers._group_actions[0].choices["finetune"]


def test_finetune_options_are_generated_from_the_declarations():
    """One option per cli=True TrainConfig field (and no other setting option), typed as the field."""
    from aptvit.train import FIELDS, option_name

    actions = {a.dest: a for a in _finetune_parser()._actions}
    layout = {"patch_sizes", "thresholds", "budget", "scorer", "scorer_args", "area_bias"}  # APTConfig's
    declared = {n for n, f in FIELDS.items() if f.metadata["cli"]}
    assert set(actions) - {"help", "resume", "debug"} - layout == declared
    for name in declared:
        assert actions[name].option_strings == [option_name(name)] and actions[name].default is None
    assert actions["lr"].type is float and actions["epochs"].type is int and actions["max_steps"].type is int
    # --model and --data: needed by a new run (cmd_finetune says so), not by --resume, which takes the run's
    assert actions["out"].required and not actions["model"].required and not actions["epochs"].required
    args = _finetune_parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--no-eval", "--deterministic"])
    assert (args.eval, args.deterministic, args.pretrained, args.epochs) == (False, True, None, None)


def test_resume_help_lists_what_the_declarations_let_change():
    from aptvit.train import RUN_CONTROL, option_name

    (resume,) = [a for a in _finetune_parser()._actions if a.dest == "resume"]
    listed = resume.help.split("only ")[1].removesuffix(" may change").split(", ")
    assert listed == [option_name(n) for n in RUN_CONTROL]
