"""benchmarks/fidelity_distill.py: the crops, the held-out photos, the two students' epochs (tiny random ViT)."""

import json

import numpy as np
import torch
from PIL import Image

import aptvit
from aptvit.teacher import timm_outputs
from benchmarks import fidelity_distill as fd
from benchmarks import real_fidelity as rf

torch.set_num_threads(1)


def _photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)) for _ in range(3)]


def test_random_crops_are_seeded_and_differ():
    a, b = fd.random_crops(_photos(), 6, 28, seed=1), fd.random_crops(_photos(), 6, 28, seed=1)
    c = fd.random_crops(_photos(), 6, 28, seed=2)
    assert a.shape == (6, 3, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({t.numpy().tobytes() for t in a}) == 6  # six different crops


def test_training_photos_share_no_scene_with_the_evaluated_ones():
    sources = ["/p/mvtbdata/images/flowers1.png", "/p/mvtbdata/images/flowers2.png", "/p/mvtbdata/images/lena.png"]
    sources += ["skimage:astronaut"]
    got = fd.train_sources(sources, ["/p/mvtbdata/images/flowers1.png", "skimage:astronaut"], rf.scene_key)
    assert "/p/mvtbdata/images/flowers2.png" not in got  # another frame of an evaluated scene
    assert "/p/mvtbdata/images/lena.png" in got and "skimage:astronaut" not in got
    assert {f"skimage:{n}" for n in fd.EXTRA_SKIMAGE} <= set(got) and not set(fd.EXTRA_SKIMAGE) & set(rf.SKIMAGE_PHOTOS)


def _closeness(student, teacher, crops, side):
    from aptvit.images import normalise

    with torch.no_grad():
        x = normalise(crops, student.pretrained_cfg["mean"], student.pretrained_cfg["std"])
        t = timm_outputs(teacher, x)
        s = timm_outputs(
            student, torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        )
    return float(torch.nn.functional.cosine_similarity(s.pre_logits, t.pre_logits).mean())


def test_a_lower_resolution_student_moves_towards_its_teacher_and_is_cached(tmp_path):
    src = rf.tiny_source(56)
    crops = fd.random_crops(_photos(), 8, 56, seed=0)
    recipe = fd.Recipe(steps=4, batch=2, lr=1e-3)
    before = _closeness(src.make_vit(28), src.vit, crops, 28)
    student = fd.distill_lowres(src.make_vit(28), src.vit, crops, 28, recipe, tmp_path / "s.pt")
    after = _closeness(student, src.vit, crops, 28)
    assert after > before + 0.01 * (1 - before)
    again = fd.distill_lowres(src.make_vit(28), src.vit, crops, 28, recipe, tmp_path / "s.pt")  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))


def test_the_lower_resolution_loss_is_zero_at_the_teachers_side_only():
    """A wrong normalisation, grid or upsampling on the student's side would make it nonzero at the same side."""
    from aptvit.teacher import Teacher

    src = rf.tiny_source(56)
    crops = fd.random_crops(_photos(), 4, 56, seed=0)
    teacher = Teacher(src.vit, "the source")
    with torch.no_grad():
        same = float(fd.lowres_loss(src.make_vit(56), teacher, crops, 56, 2.0))
        lower = float(fd.lowres_loss(src.make_vit(28), teacher, crops, 28, 2.0))
    assert abs(same) < 1e-5 and lower > 1e-2


def test_the_apt_student_trains_through_the_library_and_reloads(tmp_path):
    src = rf.tiny_source(56)
    students = fd.Students(
        fd.Recipe(steps=2, batch=2, lr=1e-4, new_layer_lr_scale=30.0),
        tmp_path,
        src.vit,
        src.make_vit,
        "vit_small_patch14_dinov2",
        src.timm_args,
        _photos,
        lambda b: aptvit.APTConfig(patch_sizes=(14, 28), budget=b),
    )
    with torch.inference_mode():  # as real_fidelity.evaluate asks for it
        apt = students.apt(0.5)
    run = tmp_path / "distill-56px-s2-b2-lr0.0001-seed0" / "apt-b0.5-new30"
    config = json.loads((run / "config.json").read_text())
    assert config["distill"] and config["apt"]["budget"] == 0.5 and config["apt"]["patch_sizes"] == [14, 28]
    assert config["new_layer_lr_scale"] == 30.0  # the recipe's multiplier reaches the library's run
    assert (tmp_path / "crops-56px-s2-b2-seed0" / "crops.pt").is_file()  # shared by every lr of this length
    assert apt.config.budget == 0.5 and not apt.training
    moved = [k for k, v in apt.timm_model.state_dict().items() if not torch.equal(v, src.vit.state_dict()[k])]
    assert moved  # it trained
    calls = []
    saved = fd.finetune
    fd.finetune = lambda *a, **k: calls.append(1) or saved(*a, **k)
    try:
        students.apt(0.5)  # the finished run is reused
    finally:
        fd.finetune = saved
    assert not calls
