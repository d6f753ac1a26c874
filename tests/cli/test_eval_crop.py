"""The evaluation crop of ``aptvit eval``, ``aptvit calibrate`` and ``finetune``'s val split is the model's own, as
timm makes it (``resolve_data_config`` + ``create_transform``): its interpolation (bicubic for timm's ViTs, not
``create_transform``'s bilinear default), ``crop_pct`` and ``crop_mode``. A bilinear resize had cost calibrate's
lower-resolution candidate 0.5 point of top-1 on Imagenette, enough to flip its comparison with APT."""

import sys

import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform, resolve_data_config

from aptvit.data import build_transform, eval_crop

from ..tiny import tiny_vit
from .helpers import run

CAL = sys.modules["aptvit.calibrate"]  # ``aptvit.calibrate`` is the function; the module is its home


def photo(h: int = 53, w: int = 71, seed: int = 0) -> Image.Image:
    """A smooth photo-like image with an edge, of a size no crop below takes without resizing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / 5 + c) * np.cos(y / 7) for c in range(3)], -1)
    img[: h // 2, : w // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def timm_crop(vit, size: int, img: Image.Image) -> np.ndarray:
    """timm's own evaluation crop of ``vit`` at ``size``, as uint8 (C, H, W)."""
    cfg = resolve_data_config({"input_size": (3, size, size)}, model=vit)
    return np.asarray(create_transform(**cfg, use_prefetcher=True)(img))


CFGS = {
    "timm ViT (no interpolation given)": {},
    "bilinear, crop 0.875": {"interpolation": "bilinear", "crop_pct": 0.875},
    "bicubic, squash": {"interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "squash"},
}


@pytest.mark.parametrize("cfg", CFGS.values(), ids=CFGS.keys())
def test_eval_crop_is_timms(cfg):
    vit = tiny_vit("vit_cls")
    vit.pretrained_cfg = {**vit.pretrained_cfg, **cfg}
    mean, std = vit.pretrained_cfg.get("mean", (0.5,) * 3), vit.pretrained_cfg.get("std", (0.5,) * 3)
    img = photo()
    for size in (32, 48):
        ours = np.asarray(build_transform(size, False, mean, std, **eval_crop(vit.pretrained_cfg))(img))
        assert ours.shape == (3, size, size)
        np.testing.assert_array_equal(ours, timm_crop(vit, size, img))


def record_transforms(monkeypatch, module):
    """Every transform ``module.build_transform`` returns, in a list."""
    made = []

    def spy(*args, **kwargs):
        made.append(build_transform(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(module, "build_transform", spy)
    return made


def check_crops(made, vit, img):
    assert made, "no transform was built"
    for t in made:
        ours = np.asarray(t(img))
        np.testing.assert_array_equal(ours, timm_crop(vit, ours.shape[-1], img))


@pytest.fixture
def folder(tmp_path):
    """tmp/val/<a|b>/*.png: four off-size photos in two classes."""
    for i in range(4):
        d = tmp_path / "val" / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        photo(seed=i).save(d / f"{i}.png")
    return tmp_path / "val"


def test_calibrate_reads_every_size_with_the_models_crop(monkeypatch, folder):
    """The source and each lower resolution calibrate measures are timm's crops of the model at that size."""
    import aptvit.data

    made = record_transforms(monkeypatch, aptvit.data)  # calibrate imports it from aptvit.data when it runs
    apt = aptvit.convert(tiny_vit("vit_cls", num_classes=2))
    CAL.calibrate(
        apt, folder, size=48, sizes=[48, 32], budgets=[0.5], timing_images=2, runs=1, warmup=0, workers=0,
        device="cpu", progress=False,
    )  # fmt: skip
    assert sorted(t.transforms[-2].size[0] for t in made) == [32, 48]  # one loader per size (CenterCrop)
    check_crops(made, apt.timm_model, photo(seed=9))


def test_eval_reads_with_the_models_crop(monkeypatch, capsys, folder, tmp_path):
    import aptvit.evaluate

    made = record_transforms(monkeypatch, aptvit.evaluate)
    ckpt = tmp_path / "m.safetensors"
    vit = tiny_vit("vit_cls", num_classes=2)
    vit.pretrained_cfg = {**vit.pretrained_cfg, "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "squash"}
    aptvit.save(aptvit.convert(vit), ckpt)
    code, _, err = run(capsys, "eval", "--checkpoint", ckpt, "--data", folder, "--size", "32", "--workers", "0")
    assert code == 0, err
    check_crops(made, aptvit.load(ckpt).timm_model, photo(seed=9))


def test_finetune_validates_with_the_models_crop(monkeypatch, tmp_path):
    """The val split ``finetune`` reports is cropped as ``aptvit eval`` crops the saved checkpoint."""
    import aptvit.train.data
    from aptvit.distributed import Dist
    from aptvit.train.data import find_images, load_data

    from .helpers import make_folder, train_config

    made = record_transforms(monkeypatch, aptvit.train.data)
    vit = tiny_vit("vit_cls", num_classes=2)
    vit.pretrained_cfg = {**vit.pretrained_cfg, "crop_pct": 0.875, "crop_mode": "squash"}
    cfg = train_config(make_folder(tmp_path / "data", train=4, val=1), tmp_path / "out", augment="none")
    load_data(cfg, find_images(cfg), aptvit.convert(vit), None, Dist())
    assert len(made) == 2  # the train split's transform, then the val split's
    check_crops(made[1:], vit, photo(seed=9))
