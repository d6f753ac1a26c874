"""A converted Hugging Face tower is read as its image processor reads images: ``pretrained_cfg`` holds the
processor's resize, crop and normalisation (``aptvit.nn.hf.preprocess``), so ``aptvit eval``, ``calibrate`` and
``finetune``'s val split (which crop by ``eval_crop(pretrained_cfg)``, tests/cli/test_eval_crop.py) give the
tower the pixels HF would. Before, every tower was cropped as timm's default (0.875, bicubic): a CLIP lost the
edges of its shorter side, a ViT was resized bicubically instead of bilinearly and never squashed."""

import pytest
import skimage.data
import torch
from PIL import Image

import aptvit
from aptvit.core.io import InputError, UserTypeError
from aptvit.data import build_transform, eval_crop

from ..tiny import tiny_hf_config, tiny_vit

transformers = pytest.importorskip("transformers")
from aptvit.nn.hf import build_twin, to_timm  # noqa: E402
from aptvit.nn.hf.preprocess import processor_cfg  # noqa: E402

T = transformers
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


# (HF model, the processor its checkpoints ship: openai/clip-vit-large-patch14-336, google/siglip-base-patch16-224,
# facebook/dinov2-small, google/vit-base-patch16-224)
CASES = {
    "clip": (
        lambda: T.CLIPVisionModel(tiny_hf_config(T.CLIPVisionConfig)),
        lambda: T.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    ),
    "siglip": (lambda: T.SiglipVisionModel(tiny_hf_config(T.SiglipVisionConfig)), lambda: T.SiglipImageProcessor()),
    "dinov2": (
        lambda: T.Dinov2Model(
            T.Dinov2Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, patch_size=14, image_size=518)
        ),
        lambda: T.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, **IMAGENET),
    ),
    "vit": (lambda: T.ViTModel(tiny_hf_config(T.ViTConfig)), lambda: T.ViTImageProcessor()),
}


def photo(width: int = 451) -> Image.Image:
    """A real photo that is not square (300 x ``width``, at most 451), so a center crop and a squash differ."""
    return Image.fromarray(skimage.data.chelsea()[:, :width])


def aptvit_pixels(cfg: dict, img: Image.Image) -> torch.Tensor:
    """What aptvit's evaluation gives a model with ``pretrained_cfg`` ``cfg``: (3, S, S) normalised pixels."""
    size = cfg["input_size"][-1]
    x = build_transform(size, False, cfg["mean"], cfg["std"], **eval_crop(cfg))(img).float() / 255
    return (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]


def rel_diff(ours: torch.Tensor, hf: torch.Tensor) -> float:
    """Mean absolute difference relative to the pixels' spread."""
    return ((ours - hf).abs().mean() / hf.std()).item()


# 421 px wide, CLIP's 336 and DINOv2's 256 -> 224 leave an odd margin (135, 135 px) where torchvision's rounding
# and HF's floor put the crop one pixel apart; at 451 both margins are even
@pytest.mark.parametrize("width", [451, 421])
@pytest.mark.parametrize("family", CASES)
def test_converted_tower_reads_a_photo_as_its_image_processor(family, width):
    make_model, make_processor = CASES[family]
    processor = make_processor()
    apt = aptvit.convert(make_model(), image_processor=processor)
    cfg = apt.pretrained_cfg
    img = photo(width)
    hf = processor(images=img, return_tensors="pt")["pixel_values"][0]
    assert tuple(cfg["input_size"]) == tuple(hf.shape)  # eval's default size is the processor's
    assert apt.pixel_mean_std() == (tuple(processor.image_mean), tuple(processor.image_std))
    # the same pixels up to resampling rounding (a wrong crop, squash or interpolation is 0.03-0.8)
    assert rel_diff(aptvit_pixels(cfg, img), hf) < 0.005


@pytest.mark.parametrize("family", CASES)
def test_a_tower_converted_without_a_processor_gets_its_familys_usual_one(family):
    make_model, make_processor = CASES[family]
    hf_model = make_model()
    twin, expected = to_timm(hf_model), processor_cfg(make_processor())
    for key in ("mean", "std", "interpolation", "crop_mode", "crop_pct"):
        assert twin.pretrained_cfg[key] == pytest.approx(expected[key]), key
    # the image size: DINOv2's checkpoints all crop 224 px (their configs say 518); the others' config's
    size = 224 if family == "dinov2" else hf_model.config.image_size
    assert twin.pretrained_cfg["input_size"][-1] == size


def test_mean_and_std_given_override_the_processors():
    twin = to_timm(CASES["vit"][0](), mean=(0.1, 0.2, 0.3), image_processor=T.ViTImageProcessor())
    assert twin.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    assert twin.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    assert twin.pretrained_cfg["interpolation"] == "bilinear"


def test_the_processors_preprocessing_is_saved_and_loaded(tmp_path):
    processor = T.BitImageProcessor(size={"shortest_edge": 160}, crop_size={"height": 140, "width": 140},
                                    resample=2, **IMAGENET)  # fmt: skip
    apt = aptvit.convert(CASES["dinov2"][0](), image_processor=processor)
    path = tmp_path / "dinov2.safetensors"
    aptvit.save(apt, path)
    loaded = aptvit.load(path)
    for key, value in processor_cfg(processor).items():
        assert loaded.pretrained_cfg[key] == pytest.approx(value), key
    assert loaded.pretrained_cfg["crop_pct"] == pytest.approx(140 / 160)


def test_an_unknown_crop_offset_is_one_error():
    with pytest.raises(InputError, match="crop_offset must be one of .'round', 'floor'., got 'up'"):
        build_transform(224, False, (0.5,) * 3, (0.5,) * 3, crop_offset="up")


def test_a_file_saved_without_crop_settings_loads_with_the_familys():
    """Files saved before the processor was read hold only mean / std: the rest comes from ``build_twin``."""
    source = {"class": "ViTModel", "config": tiny_hf_config(T.ViTConfig).to_dict(), "options": {"pooler": True}}
    twin = build_twin(source)
    assert (twin.pretrained_cfg["interpolation"], twin.pretrained_cfg["crop_mode"]) == ("bilinear", "squash")


def test_a_processor_dict_works_like_the_processor():
    processor = T.CLIPImageProcessor()
    assert processor_cfg(processor.to_dict()) == processor_cfg(processor)


LEGACY = {  # preprocessor_config.json as the checkpoints ship it: an int size, read by the class's own rule
    "openai/clip-vit-base-patch16": (
        {"image_processor_type": "CLIPImageProcessor", "size": 224, "crop_size": 224, "do_center_crop": True},
        ("center", 1.0, "bicubic"),
    ),
    "google/vit-base-patch16-224": (
        {"image_processor_type": "ViTImageProcessor", "size": 224, "resample": 2, "image_mean": [0.5] * 3},
        ("squash", 1.0, "bilinear"),
    ),
}


@pytest.mark.parametrize("name", LEGACY)
def test_a_checkpoints_preprocessor_config_is_read_by_its_class(name):
    settings, (mode, pct, interpolation) = LEGACY[name]
    cfg = processor_cfg(settings)
    assert (cfg["crop_mode"], cfg["crop_pct"], cfg["interpolation"]) == (mode, pct, interpolation)
    assert cfg["input_size"] == (3, 224, 224)


def test_resample_as_torchvision_names_it():
    from torchvision.transforms import InterpolationMode

    settings = dict(
        size={"height": 224, "width": 224}, resample=InterpolationMode.BILINEAR, image_mean=0.5, image_std=0.5
    )
    assert processor_cfg(settings)["interpolation"] == "bilinear"


def test_crop_pct_gives_timm_the_processors_resize_back():
    """timm resizes to floor(size / crop_pct): 224 / 400 as a float would give 399."""
    crop = dict(do_center_crop=True, crop_size={"height": 224, "width": 224})
    cfg = processor_cfg(dict(size={"shortest_edge": 400}, resample=3, image_mean=0.5, image_std=0.5, **crop))
    transform = build_transform(224, False, cfg["mean"], cfg["std"], **eval_crop(cfg))
    resize = transform.transforms[0]
    assert resize.size == 400


BAD = {
    "no resize": (dict(do_resize=False), "do_resize=False"),
    "not square": (dict(size={"height": 224, "width": 256}), "neither a shortest edge nor a square"),
    "longest edge": (dict(size={"longest_edge": 224}), "neither a shortest edge nor a square"),
    "no crop after a shortest edge": (dict(size={"shortest_edge": 224}), "every aspect ratio"),
    "crop not square": (
        dict(size={"shortest_edge": 256}, do_center_crop=True, crop_size={"height": 224, "width": 200}),
        "not a square",
    ),
    "resample": (dict(size={"height": 224, "width": 224}, resample=9), "resample 9"),
    "resample None": (dict(size={"height": 224, "width": 224}, resample=None), "no resample given"),
    "rescale": (dict(size={"height": 224, "width": 224}, rescale_factor=1.0), "scaled by 1 "),
    "no rescale": (dict(size={"height": 224, "width": 224}, do_rescale=False), "scaled by 1 "),
    "no size": ({}, "no size given"),
    "another processor's rule": (dict(size={"shortest_edge": 224}, crop_pct=0.9), "crop_pct=0.9 has no equivalent"),
    "channel flip": (dict(size={"height": 224, "width": 224}, do_flip_channel_order=True), "do_flip_channel_order"),
    "another processor": (
        dict(image_processor_type="LevitImageProcessor", size={"shortest_edge": 224}),
        "not as LevitImageProcessor",
    ),
}


@pytest.mark.parametrize("settings, message", BAD.values(), ids=BAD.keys())
def test_a_processor_timm_cannot_follow_is_one_error(settings, message):
    with pytest.raises(InputError, match=message):
        aptvit.convert(
            CASES["vit"][0](), image_processor={"image_mean": 0.5, "image_std": 0.5, "resample": 3, **settings}
        )


def test_image_processor_needs_a_hugging_face_model_and_a_processor():
    with pytest.raises(UserTypeError, match="image_processor is for Hugging Face models"):
        aptvit.convert(tiny_vit("vit_cls"), image_processor=T.ViTImageProcessor())
    with pytest.raises(UserTypeError, match="a Hugging Face image processor or a dict"):
        aptvit.convert(CASES["vit"][0](), image_processor="google/vit-base-patch16-224")
