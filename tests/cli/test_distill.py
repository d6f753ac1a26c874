"""``finetune --distill`` (a conversion without labels) and ``eval --teacher`` (agreement with a uniform teacher)."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import aptvit
from aptvit.core.distill import Outputs, distill_loss
from aptvit.data import LayoutDataset, build_transform, image_files
from aptvit.evaluate import eval_command
from aptvit.images import normalise
from aptvit.models import ModelSource
from aptvit.teacher import Teacher, apt_outputs, timm_outputs
from aptvit.train import finetune

from ..tiny import tiny_vit
from .helpers import one_line, run, train_config

NEVER = {32: -1.0, 64: -1.0}  # every score is >= 0: nothing merges, the APT model computes what timm computes


def eval_source(checkpoint, device="cpu", **kwargs):
    """``eval_command`` of an aptvit checkpoint on ``device``."""
    return eval_command(ModelSource(checkpoint=checkpoint, device=device), **kwargs)


def photos(folder, n=8, size=48, seed=0):
    """``n`` unlabelled images in one folder (no class folders): smooth halves and a striped corner."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(40, 200, 3), dtype=np.uint8)
        img[size // 2 :] = rng.integers(0, 255, 3)
        img[: size // 3, : size // 3][::2] = 255
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


def _step_grads(nc: int, perturb: float):
    """The distillation loss of a never-merging APT model against a teacher (its own source, perturbed by
    ``perturb``), and the gradient norm over the student's parameters."""
    vit = tiny_vit("vit_cls", num_classes=nc)
    teacher_model = copy.deepcopy(vit)
    with torch.no_grad():
        for p in teacher_model.parameters():
            p.add_(perturb * torch.randn_like(p))
    teacher = Teacher(teacher_model, "test")
    apt = aptvit.convert(vit, thresholds=NEVER)
    crops = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = normalise(crops, *apt.pixel_mean_std())
    loss = distill_loss(apt_outputs(apt, images, apt.prepare(images, None)), teacher(crops), 2.0)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in apt.parameters() if p.grad is not None]).norm()
    return float(loss.detach()), float(grad)


@pytest.mark.parametrize("nc", [10, 0], ids=["head: KL", "no head: cosines"])
def test_distill_loss_is_zero_with_zero_gradient_when_the_student_is_its_teacher(nc):
    loss, grad = _step_grads(nc, 0.0)
    far_loss, far_grad = _step_grads(nc, 0.05)
    assert far_loss > 0 and far_grad > 0
    assert loss <= 1e-5 * far_loss and grad <= 1e-4 * far_grad, (loss, far_loss, grad, far_grad)


def test_distill_loss_terms():
    """With a head: the T^2-scaled KL of the softened logits; without: 1 - cosine of pre-logits plus of dense."""
    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    pre, dense = torch.randn(3, 4, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = 3.0
    p_t = F.softmax(t_logits / t, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s_logits / t, -1))).sum(-1).mean() * t * t
    got = distill_loss(Outputs(s_logits, pre, dense), Outputs(t_logits, pre, dense), t)
    assert torch.allclose(got, kl, rtol=1e-5)
    other_pre, other_dense = torch.randn(3, 4, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    want = (1 - F.cosine_similarity(pre, other_pre, dim=1).mean()) + (
        1 - F.cosine_similarity(dense, other_dense, dim=1).mean()
    )
    got = distill_loss(Outputs(None, pre, dense), Outputs(None, other_pre, other_dense), t)
    assert torch.allclose(got, want, rtol=1e-5)


def _source(tmp_path, nc, name="source.safetensors", **settings):
    path = tmp_path / name
    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=nc), **settings), path)
    return path


@pytest.mark.parametrize("nc", [2, 0], ids=["head", "no head"])
def test_a_few_distill_steps_on_unlabelled_images_bring_the_student_closer_to_its_teacher(tmp_path, nc):
    data = photos(tmp_path / "photos", n=8)  # one folder, no classes, no train/ or val/
    source = _source(tmp_path, nc, thresholds={32: 6.0, 64: 6.0})  # merges: the zero-shot student differs
    common = dict(data=str(data), batch_size=4, workers=0, device="cpu")
    before = eval_source(checkpoint=source, size=64, teacher="uniform", **common)
    assert before["tokens_kept"] < 0.9  # there is something to learn
    cfg = train_config(
        data,
        tmp_path / "run",
        checkpoint=str(source),
        thresholds=None,
        size=64,
        distill=True,
        epochs=6,
        lr=1e-3,  # a tiny random model learns fast; the new layers at x10 (--distill's x100 is for 5e-6)
        new_layer_lr_scale=10.0,
        augment="none",
        warmup=0.0,
        eval=False,
    )
    finetune(cfg)
    after = eval_source(checkpoint=tmp_path / "run" / "model.safetensors", size=64, teacher=str(source), **common)
    assert after["tokens_kept"] == pytest.approx(before["tokens_kept"])  # the same layouts: only the weights moved
    if nc:  # with a head the loss is the logits' KL: that is what comes closer
        assert after["kl"] < 0.8 * before["kl"], (before["kl"], after["kl"])
    else:
        for key in ("cosine_pre_logits", "cosine_dense"):
            assert 1 - after[key] < 0.8 * (1 - before[key]), (key, before[key], after[key])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["distill"], saved["teacher"], saved["temperature"], saved["classes"]) == (True, None, 2.0, [])
    metadata = aptvit.nn.checkpoint.read_metadata(tmp_path / "run" / "model.safetensors")
    assert "classes" not in metadata  # the source's head: no class names learnt


def test_eval_teacher_numbers(tmp_path, capsys):
    """The teacher itself: agreement 100%, cosines 1; a perturbed student: the cosines computed by hand."""
    data = photos(tmp_path / "photos", n=6)
    source = _source(tmp_path, 10, thresholds=NEVER)
    common = dict(data=str(data), batch_size=4, workers=0, device="cpu", size=64)
    same = eval_source(checkpoint=source, teacher=str(source), **common)
    assert same["agreement"] == 100.0 and same["images"] == 6 and same["kl"] == pytest.approx(0, abs=1e-6)
    assert same["cosine_pre_logits"] == pytest.approx(1.0, abs=1e-5)
    assert same["cosine_dense"] == pytest.approx(1.0, abs=1e-5)
    assert eval_source(checkpoint=source, teacher="uniform", **common)["cosine_dense"] == pytest.approx(1, abs=1e-5)

    student = aptvit.load(source)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p, generator=None))
    perturbed = tmp_path / "perturbed.safetensors"
    aptvit.save(student, perturbed)
    got = eval_source(checkpoint=perturbed, teacher=str(source), json_path=str(tmp_path / "m.json"), **common)
    # by hand: the eval crops, both timm models uniformly (nothing merges, so the student is its timm model)
    teacher_vit, student_vit = aptvit.load(source).timm_model.eval(), aptvit.load(perturbed).timm_model.eval()
    mean, std = student.pixel_mean_std()
    crop_pct = student.pretrained_cfg.get("crop_pct")  # the eval crop aptvit eval uses
    dataset = LayoutDataset(image_files(data), build_transform(64, False, mean, std, crop_pct), None)
    crops = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        s, t = (timm_outputs(m, normalise(crops, mean, std)) for m in (student_vit, teacher_vit))
    want_pre = float(F.cosine_similarity(s.pre_logits, t.pre_logits, dim=1).mean())
    want_dense = float(F.cosine_similarity(s.dense, t.dense, dim=1).flatten(1).mean(1).mean())
    want_agree = 100 * float((s.logits.argmax(-1) == t.logits.argmax(-1)).float().mean())
    assert got["cosine_pre_logits"] == pytest.approx(want_pre, abs=1e-5) and want_pre < 0.999
    assert got["cosine_dense"] == pytest.approx(want_dense, abs=1e-5) and want_dense < 0.999
    assert got["agreement"] == pytest.approx(want_agree)
    assert json.loads((tmp_path / "m.json").read_text())["cosine_dense"] == pytest.approx(want_dense, abs=1e-5)
    code, out, err = run(
        capsys, "eval", "--checkpoint", perturbed, "--data", data, "--teacher", source, "--size", "64", "--workers", "0"
    )
    assert code == 0 and f"dense {want_dense:.4f}" in out, (out, err)


def test_eval_teacher_with_labels_reports_both(tmp_path):
    from .helpers import make_folder

    data = make_folder(tmp_path / "data", train=1, val=2)
    source = _source(tmp_path, 2, thresholds=NEVER)
    got = eval_source(checkpoint=source, data=str(data), teacher="uniform", size=32, workers=0, device="cpu")
    assert {"top1", "top5", "agreement", "cosine_dense"} <= set(got) and got["agreement"] == 100.0


def test_resume_compares_the_distill_settings(tmp_path, capsys):
    data = photos(tmp_path / "photos", n=4)
    source = _source(tmp_path, 0, thresholds={32: 6.0, 64: 6.0})
    argv = [
        "finetune",
        "--model",
        "vit_tiny_patch16_224",
        "--checkpoint",
        source,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--distill",
        "--max-steps",
        "1",
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "no val split" in out and "distilled from a uniform teacher" in out
    code, out, err = run(capsys, *argv, "--temperature", "4", "--resume")
    assert code == 2 and "--temperature 4.0 (the run's: 2.0) cannot change" in one_line(err), err
    code, out, err = run(capsys, *[a for a in argv if a != "--distill"], "--resume")
    assert code == 0, err  # --distill not given: the run's own


def test_bad_combinations_are_one_line_errors(tmp_path, capsys):
    data = photos(tmp_path / "photos", n=4)
    source = _source(tmp_path, 0)
    wide = _source(tmp_path, 0, name="wide.safetensors")  # replaced below by another width
    aptvit.save(aptvit.convert(tiny_vit("vit_cls", num_classes=0, embed_dim=32)), wide)
    headed = _source(tmp_path, 10, name="headed.safetensors")
    sized = tmp_path / "sized.safetensors"
    aptvit.save(aptvit.load(source), sized, extra_metadata={"input_size": "64"})

    def finetune_argv(out, *extra):
        return [
            "finetune",
            "--model",
            "vit_tiny_patch16_224",
            "--checkpoint",
            source,
            "--data",
            data,
            "--out",
            tmp_path / out,
            "--size",
            "32",
            "--batch-size",
            "4",
            "--workers",
            "0",
            *extra,
        ]

    cases = [
        (finetune_argv("a", "--teacher", source), "--teacher names the model to distil from: give it with --distill"),
        (finetune_argv("b", "--distill", "--teacher", sized), "was trained at 64 px but the student runs at 32 px"),
        (finetune_argv("c", "--distill", "--teacher", wide), "32 features on a 16-px grid and the student 64"),
        (finetune_argv("d", "--distill", "--teacher", headed), "10 output classes and the student no"),
        (finetune_argv("e", "--distill", "--teacher", "no_such_model"), "neither a file nor a timm model name"),
        (finetune_argv("f", "--distill", "--temperature", "0"), "temperature (--temperature) must be a finite"),
        (finetune_argv("g"), "has no train/ folder"),  # without --distill the folder needs classes
        (["eval", "--checkpoint", source, "--data", data, "--teacher", wide], "32 features on a 16-px grid"),
        (
            ["eval", "--model", "vit_tiny_patch16_224", "--uniform", "--data", data, "--teacher", "uniform"],
            "drop --uniform",
        ),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in one_line(err), (argv, err)
    for out in "abcdef":
        assert not (tmp_path / out / "config.json").exists()  # refused before anything is written


def test_a_resumed_distill_run_continues_exactly(tmp_path):
    """The teacher of a resumed run is rebuilt from the source (here random weights: the run's seed), not taken
    from the student's trained weights: one step + resume = two steps, bit for bit on the CPU."""
    data = photos(tmp_path / "photos", n=8)
    kw = dict(distill=True, eval=False, augment="none", lr=1e-3)
    finetune(train_config(data, tmp_path / "straight", max_steps=2, **kw))
    finetune(train_config(data, tmp_path / "resumed", max_steps=1, **kw))
    finetune(train_config(data, tmp_path / "resumed", max_steps=2, **kw), resume=True)
    a = aptvit.nn.checkpoint.read_state_dict(tmp_path / "straight" / "model.safetensors")
    b = aptvit.nn.checkpoint.read_state_dict(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["vit_cls", "deit_distilled"])
def test_a_uniform_teachers_logits_are_timms_own(family):
    """The teacher's (and calibrate's source's) logits are what timm's forward gives: both heads of a distilled DeiT."""
    from aptvit.teacher import timm_outputs

    from ..tiny import tiny_vit

    model = tiny_vit(family).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = timm_outputs(model, x).logits, model(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
