"""The APT parameters live under ``adaptive_embed.*``; files and state dicts that hold them under the older ``apt.*``
still load, with their detail path (``aptvit.nn.checkpoint.checkpoint_filter_fn``)."""

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import aptvit
from aptvit.nn.checkpoint import FORMAT_VERSION, checkpoint_filter_fn, read_metadata

from ..tiny import rel_err, tiny_vit


def trained(seed=0):
    """A converted tiny ViT whose detail path is not zero (as after fine-tuning), so that dropping it shows."""
    torch.manual_seed(seed)
    apt = aptvit.convert(tiny_vit("vit_cls", seed=seed), budget=0.5).eval()
    with torch.no_grad():
        for param in apt.adaptive_embed.parameters():
            param.normal_(0, 0.05)
    return apt


def old_keys(state):
    """A state dict as aptvit wrote it before the rename: the APT parameters under ``apt.*``."""
    return {("apt." + k[len("adaptive_embed.") :] if k.startswith("adaptive_embed.") else k): v for k, v in state.items()}


def test_a_saved_file_holds_the_apt_parameters_under_adaptive_embed(tmp_path):
    apt = trained()
    path = aptvit.save(apt, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert {"adaptive_embed.detail_proj.32.weight", "adaptive_embed.detail_merge.weight"} <= keys
    assert not any(k.startswith("apt.") for k in keys)
    assert read_metadata(path)["format_version"] == FORMAT_VERSION


def test_a_file_with_the_old_apt_keys_loads_with_its_detail_path(tmp_path):
    apt = trained()
    new = aptvit.save(apt, tmp_path / "new.safetensors")
    meta = {**read_metadata(new), "format_version": "2"}  # the last version that wrote apt.*
    old = tmp_path / "old.safetensors"
    save_file(old_keys(load_file(str(new))), str(old), metadata=meta)
    with safe_open(str(old), framework="pt") as f:
        assert "apt.detail_proj.32.weight" in set(f.keys())  # the file really is old-style

    back = aptvit.load(old).eval()
    want = apt.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(2, 3, 64, 96)
    layout = apt.make_layout(x)
    assert (layout.size > apt.patch_size).any()  # large patches: the detail path takes part
    with torch.no_grad():
        assert rel_err(back(x, layout=layout), apt(x, layout=layout)) == 0.0


def test_an_old_state_dict_loads_through_checkpoint_filter_fn(tmp_path):
    apt = trained(seed=0)
    torch.save(old_keys(apt.state_dict()), tmp_path / "old.pt")
    fresh = trained(seed=1)
    fresh.load_state_dict(checkpoint_filter_fn(torch.load(tmp_path / "old.pt", weights_only=True)), strict=True)
    want, got = apt.state_dict(), fresh.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoint_filter_fn_leaves_todays_keys_and_timms_alone():
    state = {"adaptive_embed.detail_merge.bias": torch.zeros(1), "blocks.0.attn.qkv.weight": torch.ones(1)}
    out = checkpoint_filter_fn(state)
    assert list(out) == list(state) and all(out[k] is state[k] for k in state)
