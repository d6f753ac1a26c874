"""``TrainConfig`` holds an ``APTConfig`` (one source of the conversion settings), reads the config.json of aptvit
0.1 (four top-level layout fields), and the command line's layout options go on top of an aptvit checkpoint's own."""

import json
import re

import aptvit
from aptvit.models import conversion_settings
from aptvit.nn.checkpoint import read_metadata
from aptvit.nn.config import APTConfig
from aptvit.train import TrainConfig

from ..tiny import tiny_vit
from .helpers import finetune_argv, make_folder, one_line, run


def test_config_json_round_trip_and_the_0_1_layout_fields():
    cfg = TrainConfig("m", "d", "o", apt=APTConfig(budget=0.5, scorer="laplacian"))
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["apt"]["budget"] == 0.5
    old = json.loads(TrainConfig("m", "d", "o").to_json())
    del old["apt"]
    old.update(patch_sizes=[16, 32, 64], thresholds={"32": 6.0}, budget=None, scorer=None)
    assert TrainConfig.from_json(json.dumps(old)).apt == APTConfig((16, 32, 64), thresholds={32: 6.0})
    old.update(patch_sizes=None, thresholds=None)  # nothing given then: the model's defaults
    assert TrainConfig.from_json(json.dumps(old)).apt is None


def test_given_settings_go_on_top_of_an_aptvit_checkpoints_own(tmp_path):
    path = tmp_path / "m.safetensors"
    aptvit.save(aptvit.convert(tiny_vit("vit_cls"), scorer="laplacian", budget=0.7), path)
    settings = conversion_settings(path, budget=0.5)
    assert (settings.scorer, settings.budget, settings.patch_sizes) == ("laplacian", 0.5, (16, 32))
    assert conversion_settings(None, budget=0.5) == APTConfig(budget=0.5)  # a timm model: APTConfig's defaults
    changed = conversion_settings(path, scorer="entropy")  # a new scorer: its own parameters, the budget stays
    assert (changed.scorer_args, changed.budget) == ({"bins": 512}, 0.7)


def test_finetune_from_an_aptvit_checkpoint_keeps_its_scorer_and_resume_compares_given_options(tmp_path, capsys):
    data = make_folder(tmp_path / "data", train=4, val=2)
    source = tmp_path / "source.safetensors"
    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=2), scorer="laplacian", budget=0.7), source)
    argv = finetune_argv(data, tmp_path / "run", "--checkpoint", source, "--budget", "0.5", thresholds=None)
    code, out, err = run(capsys, *argv, "--max-steps", "1")
    assert code == 0, err
    saved = json.loads(read_metadata(tmp_path / "run" / "model.safetensors")["aptvit"])
    assert (saved["scorer"], saved["budget"]) == ("laplacian", 0.5)
    source.unlink()  # a resumed run has its own weights and settings: the original source is not read again
    code, out, err = run(capsys, *argv, "--max-steps", "2", "--resume")  # the same options: accepted
    assert code == 0, err
    code, out, err = run(capsys, *argv, "--scorer", "entropy", "--resume")
    assert code == 2 and re.search(r"--scorer 'entropy' \(the run's: 'laplacian'\) cannot change", one_line(err))


def test_config_json_records_the_settings_the_run_resolved(tmp_path, capsys):
    data = make_folder(tmp_path / "data", train=4, val=2)
    code, out, err = run(capsys, *finetune_argv(data, tmp_path / "run", "--max-steps", "1"))
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["apt"]
    assert saved["patch_sizes"] == [16, 32] and saved["thresholds"] == {"32": 6.0}
    assert saved["scorer_args"] == {"bins": 512}


def test_an_attention_backend_that_cannot_train_here_fails_before_any_file(tmp_path, capsys):
    data = make_folder(tmp_path / "data", train=4, val=2)
    code, out, err = run(capsys, *finetune_argv(data, tmp_path / "run", "--attention", "flash"))
    assert code == 2 and "attention backend 'flash' cannot run on cpu" in err, err
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_library_run_replaces_an_aptvit_checkpoints_settings_as_a_whole(tmp_path):
    """``TrainConfig(apt=...)`` replaces the source's settings: a budget in the source does not survive."""
    from aptvit.train import finetune

    from .helpers import train_config

    data = make_folder(tmp_path / "data", train=4, val=2)
    source = tmp_path / "source.safetensors"
    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=2), budget=0.7), source)
    cfg = train_config(data, tmp_path / "run", checkpoint=str(source), max_steps=1, eval=False)
    cfg.apt = APTConfig()  # APTConfig's defaults, given: the entropy scorer's thresholds, no budget
    finetune(cfg)
    saved = json.loads(read_metadata(tmp_path / "run" / "model.safetensors")["aptvit"])
    assert (saved["budget"], saved["thresholds"]) == (None, {"32": 5.5})


def test_the_learning_rates_default_by_the_kind_of_run_and_a_given_one_wins():
    from aptvit.train.config import KIND_DEFAULTS

    labelled, distill = TrainConfig("m", "d", "o"), TrainConfig("m", "d", "o", distill=True)
    assert (labelled.lr, labelled.new_layer_lr_scale) == (5e-5, 1.0)
    assert (distill.lr, distill.new_layer_lr_scale) == (5e-6, 100.0) == tuple(KIND_DEFAULTS[True].values())
    assert labelled.layer_decay == distill.layer_decay == 0.75  # both kinds: the early blocks learn slowest
    given = TrainConfig("m", "d", "o", distill=True, lr=1e-4, new_layer_lr_scale=3.0)
    assert (given.lr, given.new_layer_lr_scale) == (1e-4, 3.0)
    saved = json.loads(distill.to_json())  # config.json holds the values the run used
    assert (saved["lr"], saved["new_layer_lr_scale"], saved["layer_decay"]) == (5e-6, 100.0, 0.75)
    assert TrainConfig.from_json(distill.to_json()) == distill


def test_finetune_help_names_both_kinds_defaults(capsys):
    import pytest

    from aptvit.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "default 5e-05; with --distill 5e-06" in text and "default 1; with --distill 100" in text
