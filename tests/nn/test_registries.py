"""One source for each setting: scorer and attention registries, ``APTConfig`` through ``convert``, runtime-only
attention, and checkpoints of aptvit 0.1 (``bins`` at the top level, the attention backend saved)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import aptvit
from aptvit.core import scoring
from aptvit.nn import attention
from aptvit.nn.checkpoint import read_metadata

from ..tiny import rel_err, tiny_vit


def _stripes(n: int = 2, size: int = 64) -> torch.Tensor:
    """Images whose left half is flat and right half is vertical stripes (uint8)."""
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[..., size // 2 :: 2] = 255
    return x


@pytest.fixture
def column_scorer():
    """A registered custom scorer with a parameter: the score of a patch is ``weight`` x its column index."""
    calls = []

    def scores(gray, sizes, base_size, weight=1.0):
        calls.append(weight)
        b, h, w = gray.shape
        return {s: weight * torch.arange(w // s, dtype=torch.float32).expand(b, h // s, w // s) for s in sizes}

    scoring.register_scorer("columns", scores, {2: 0.5, 4: 0.5}, params={"weight": 1.0})
    yield calls
    scoring.SCORERS.pop("columns", None)


def test_custom_scorer_reaches_a_converted_model_and_its_checkpoint(column_scorer, tmp_path):
    apt = aptvit.convert(tiny_vit("vit_cls"), scorer="columns", scorer_args={"weight": 2.0})
    assert apt.config.thresholds == {32: 0.5}  # the registered default, keyed by size
    layout = apt.make_layout(torch.zeros(1, 3, 64, 64))
    assert column_scorer == [2.0]  # the model's parameter reached the scorer
    # the 32 grid's two columns score 0 and 2: the left one merges (2 tokens), the right one stays 16 px (8)
    assert layout.total_tokens == 10
    path = tmp_path / "m.safetensors"
    aptvit.save(apt, path)
    saved = json.loads(read_metadata(path)["aptvit"])
    assert saved["scorer"] == "columns" and saved["scorer_args"] == {"weight": 2.0}
    back = aptvit.load(path)
    assert back.config == apt.config
    scoring.SCORERS.pop("columns")
    with pytest.raises(ValueError, match="unknown scorer 'columns'.*register_scorer"):
        aptvit.load(path)  # saved by name: the scorer must be registered before loading


def test_scorer_parameters_are_checked_by_the_registry():
    with pytest.raises(ValueError, match="no parameter"):
        aptvit.APTConfig(scorer="laplacian", scorer_args={"bins": 64})
    with pytest.raises(ValueError, match="bins must be an int"):
        aptvit.APTConfig(scorer_args={"bins": 1})
    assert aptvit.APTConfig().scorer_args == {"bins": 512}  # the registered default, saved explicitly
    with pytest.raises(ValueError, match="already registered"):
        scoring.register_scorer("entropy", scoring.entropy_scores, {2: 5.5})


def test_entropy_bins_reach_the_scorer():
    x = _stripes()
    x[..., : x.shape[-1] // 2] = torch.arange(32, dtype=torch.uint8).repeat(64, 1) * 8  # a ramp of 32 levels
    few = aptvit.patch_layout(x, (16, 32, 64), thresholds={32: 3.5, 64: 3.0}, scorer_args={"bins": 4})
    many = aptvit.patch_layout(x, (16, 32, 64), thresholds={32: 3.5, 64: 3.0})
    assert few.total_tokens < many.total_tokens  # 4 bins see the ramp as 4 levels: lower entropy, more merging


def test_scorer_choice_on_the_command_line_comes_from_the_registry(column_scorer):
    from aptvit.cli import build_parser

    args = build_parser().parse_args(["show", "x.png", "--scorer", "columns"])
    assert args.scorer == "columns"


def test_convert_takes_a_config_and_its_fields_as_overrides():
    config = aptvit.APTConfig(scorer="laplacian", budget=0.5)
    assert config.patch_sizes is None  # the ViT's (p, 2p), filled in at conversion
    apt = aptvit.convert(tiny_vit("reg_dinov2_p14"), config)
    assert apt.config.patch_sizes == (14, 28) and apt.config.scorer == "laplacian" and apt.config.budget == 0.5
    apt = aptvit.convert(tiny_vit("vit_cls"), config, thresholds={32: 0.1})  # a field overrides: budget cleared
    assert apt.config.thresholds == {32: 0.1} and apt.config.budget is None
    with pytest.raises(TypeError, match="unknown setting"):
        aptvit.convert(tiny_vit("vit_cls"), bins=256)
    with pytest.raises(ValueError, match="not a non-base patch size"):
        aptvit.convert(tiny_vit("vit_cls"), aptvit.APTConfig(thresholds={48: 1.0}))


def test_attention_is_a_runtime_choice_not_saved(tmp_path):
    apt = aptvit.convert(tiny_vit("vit_cls"), attention="pad")
    assert apt.attention == "pad" and not hasattr(apt.config, "attention")
    path = tmp_path / "m.safetensors"
    aptvit.save(apt, path)
    assert "attention" not in json.loads(read_metadata(path)["aptvit"])
    assert aptvit.load(path).attention == "auto"
    config = apt.config
    apt.configure(attention="loop")
    assert apt.attention == "loop" and apt.config is config  # the saved settings did not change


def test_checkpoints_of_aptvit_0_1_still_load(tmp_path):
    """0.1 saved ``bins`` at the top level and the attention backend (e.g. "flash", which this CPU cannot run)."""
    torch.manual_seed(0)
    apt = aptvit.convert(tiny_vit("vit_cls"), scorer_args={"bins": 256}).eval()
    path = tmp_path / "new.safetensors"
    aptvit.save(apt, path)
    meta = read_metadata(path)
    old = json.loads(meta["aptvit"])
    old.pop("scorer_args")
    old.update(bins=256, attention="flash")
    meta.update(aptvit=json.dumps(old), format_version="1")
    save_file(load_file(path), tmp_path / "old.safetensors", metadata=meta)
    back = aptvit.load(tmp_path / "old.safetensors").eval()
    assert back.config == apt.config and back.attention == "auto"
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(back(x), apt(x)) < 1e-6


def test_a_registered_backend_is_selectable_and_auto_follows_availability(monkeypatch):
    calls = []

    def counting(*args):
        calls.append(1)
        return attention.BACKENDS["loop"].run(*args)

    monkeypatch.setitem(
        attention.BACKENDS, "mine", attention.Backend(counting, lambda device, dtype, dropout, grad: True)
    )
    assert "mine" in attention.backend_choices()
    model = tiny_vit("vit_cls")
    apt = aptvit.convert(model, thresholds={32: 5.0, 64: 4.0}, attention="mine").eval()
    x = torch.randn(2, 3, 64, 64)
    out = apt(x)
    assert len(calls) == len(model.blocks)
    assert rel_err(out, apt.configure(attention="loop")(x)) < 1e-6
    monkeypatch.setitem(
        attention.BACKENDS, "mine", attention.Backend(counting, lambda device, dtype, dropout, grad: False)
    )
    with pytest.raises(ValueError, match="cannot run on cpu"):
        apt.configure(attention="mine")(x)
    with pytest.raises(ValueError, match="unknown attention backend"):
        apt.configure(attention="nope")


def test_scorer_parameters_must_survive_the_checkpoint(column_scorer):
    with pytest.raises(ValueError, match="JSON values"):
        aptvit.APTConfig(scorer="columns", scorer_args={"weight": (1.0, 2.0)})  # a tuple comes back as a list


def test_a_newer_checkpoint_format_is_refused_by_name_and_load_takes_the_backend(tmp_path):
    apt = aptvit.convert(tiny_vit("vit_cls"))
    path = tmp_path / "m.safetensors"
    aptvit.save(apt, path)
    assert aptvit.load(path, attention="pad").attention == "pad"
    meta = read_metadata(path)
    meta["format_version"] = "99"
    save_file(load_file(path), tmp_path / "new.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="format version '99', newer than this aptvit reads.*upgrade"):
        aptvit.load(tmp_path / "new.safetensors")


def test_convert_with_patch_sizes_as_second_argument_still_works():
    with pytest.warns(DeprecationWarning, match="patch_sizes"):
        apt = aptvit.convert(tiny_vit("vit_cls"), (16, 32))
    assert apt.patch_sizes == (16, 32)


def test_backward_support_is_asked_for_when_only_the_blocks_train(monkeypatch):
    """A frozen embedding with trained blocks still needs a backward through attention."""
    monkeypatch.setitem(
        attention.BACKENDS,
        "forward_only",
        attention.Backend(attention.BACKENDS["loop"].run, lambda device, dtype, dropout, grad: not grad),
    )
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 5.0, 64: 4.0}, attention="forward_only").eval()
    for name, p in apt.named_parameters():
        p.requires_grad_(name.startswith("blocks."))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        apt(x)  # no backward: the forward-only kernel is fine
    with pytest.raises(ValueError, match="with gradients"):
        apt(x)
