"""``transformers`` is optional: aptvit imports and works without it, converting an HF model says what to install,
and a model converted from HF loads from its file alone without it. These tests hide ``transformers``."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import aptvit
from aptvit.core.io import MissingDependency
from aptvit.nn.hf import HFVisionTransformer, build_twin

from ..tiny import rel_err

ROOT = Path(__file__).resolve().parents[2]


def test_aptvit_does_not_import_transformers():
    code = (
        "import sys, timm, torch, aptvit\n"
        "apt = aptvit.convert(timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1))\n"
        "apt(torch.randn(1, 3, 64, 64))\n"
        "import aptvit.nn.hf\n"
        "assert 'transformers' not in sys.modules, 'aptvit imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, timeout=300)


def test_an_hf_model_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    fake = type("CLIPVisionModel", (nn.Module,), {"__module__": "transformers.models.clip.modeling_clip"})()
    with pytest.raises(MissingDependency) as info:
        aptvit.convert(fake)
    message = str(info.value)
    assert "\n" not in message and "pip install 'aptvit[hf]'" in message and "transformers" in message


def test_a_saved_hf_conversion_loads_without_transformers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    source = {
        "class": "Dinov2WithRegistersModel",
        "config": dict(
            hidden_size=64,
            mlp_ratio=4.0,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_channels=3,
            image_size=56,
            patch_size=14,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            qkv_bias=True,
            num_register_tokens=2,
        ),  # fmt: skip
        "options": {"registers": True},
    }
    torch.manual_seed(0)
    twin = build_twin(source)
    assert twin.pos_resample == {"interpolation": "bicubic", "antialias": True}
    apt = aptvit.convert(twin, budget=0.5)
    path = aptvit.save(apt, tmp_path / "dinov2reg.safetensors")
    loaded = aptvit.load(path)
    assert isinstance(loaded.timm_model, HFVisionTransformer) and loaded.num_prefix_tokens == 3
    assert loaded.pixel_mean_std() == apt.pixel_mean_std()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        assert rel_err(loaded(x), apt(x)) == 0
