"""One epoch of label-free distillation for ``real_fidelity.py``: APT and a lower resolution, the same recipe.

The issue's question: after one epoch of ``--distill`` on photos the evaluation never sees, does APT keep the
frozen source's features better than a uniformly lower resolution given the same epoch? Both students start
from the source weights and learn from the same random crops, with the library's recipe (``aptvit.train``:
AdamW over ``param_groups``, warm-up + cosine ``lr_at``, gradient clipping) and its loss
(``aptvit.core.distill.distill_loss``: 1 - cosine on the pre-logits plus 1 - cosine on the dense grid, as there
is no head):

- APT through the public training API, ``aptvit.train.finetune(TrainConfig(distill=True, ...))`` (what
  ``aptvit finetune --distill`` runs), on a folder of the crops; its new ``adaptive_embed.*`` layers at the recipe's lr
  multiplier (``new_layer_lr_scale``);
- lower resolution through a loop of the same pieces: the crops downsized to the student's side, its dense grid
  upsampled (bilinear) to the teacher's, as ``real_fidelity.lowres_method`` evaluates it.

Photos: every usable photo of the packages whose scene is not among the evaluated ones (the validation and test
photos ``real_fidelity.py`` reports), and scikit-image's and matplotlib's photos that the evaluation does not use.
Crops: a seeded random square of 30-100% of the photo's shorter side at a random place, flipped half the time,
resized (bicubic, antialiased) to the input size; ``steps * batch`` of them, so the epoch is one pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import aptvit
from aptvit.core.distill import Outputs, distill_loss
from aptvit.core.io import atomic_write
from aptvit.images import normalise
from aptvit.train import TrainConfig, finetune, lr_at, make_optimizer, set_lr

# photos the evaluation never uses (real_fidelity.SKIMAGE_PHOTOS are evaluated): textures, grey photos included
EXTRA_SKIMAGE = (
    "camera",
    "coins",
    "brick",
    "grass",
    "gravel",
    "moon",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One epoch of distillation: ``steps`` optimizer steps of ``batch`` crops at peak ``lr`` (the source's
    weights), cosine to ``lr / 10``; an APT student's new layers at ``new_layer_lr_scale`` times that
    (``TrainConfig.new_layer_lr_scale``). The defaults are the first, untuned try (2e-6, x10); ``real_fidelity.py``
    tries several recipes, and ``finetune --distill``'s own defaults are the recipe it chose (5e-6, x100)."""

    steps: int = 150
    batch: int = 8
    lr: float = 2e-6
    seed: int = 0
    new_layer_lr_scale: float = 10.0

    def key(self) -> str:
        """The epoch's name without the new layers' multiplier (a uniform student has none)."""
        return f"s{self.steps}-b{self.batch}-lr{self.lr:g}-seed{self.seed}"

    def crops_key(self) -> str:
        """What the crops depend on: every recipe of the same length and seed trains on the same crops."""
        return f"s{self.steps}-b{self.batch}-seed{self.seed}"

    def train_config(self, **fields) -> TrainConfig:
        """The library's settings for this recipe (no augmentation: the crops are the randomness; no drop path)."""
        return TrainConfig(
            epochs=1,
            augment="none",
            batch_size=self.batch,
            lr=self.lr,
            min_lr=self.lr / 10,
            drop_path=0.0,
            workers=0,
            seed=self.seed,
            eval=False,
            device="cpu",
            distill=True,
            log_every=10,
            new_layer_lr_scale=self.new_layer_lr_scale,
            **fields,
        )


def train_sources(all_sources: Sequence[str], evaluated: Sequence[str], scene_of: Callable[[str], str]) -> List[str]:
    """Photos of scenes with no evaluated photo, then the extra scikit-image and matplotlib photos."""
    held = {scene_of(s) for s in evaluated}
    out = [s for s in all_sources if scene_of(s) not in held and not s.startswith("skimage:")]
    out += [f"skimage:{n}" for n in EXTRA_SKIMAGE]
    import matplotlib.cbook

    out.append(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return out


def random_crops(photos: Sequence, n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) uint8: seeded random squares of the PIL ``photos`` (see the module docstring)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        im = photos[rng.integers(len(photos))]
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.3, 1.0))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def write_folder(crops: torch.Tensor, folder: Path) -> Path:
    """The crops as PNG files in ``folder`` (written beside it, then renamed: a folder is complete or absent)."""
    from PIL import Image

    if folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, c in enumerate(crops):
        Image.fromarray(c.permute(1, 2, 0).numpy()).save(tmp / f"{i:05d}.png")
    tmp.rename(folder)
    return folder


def distill_apt(
    source_state: dict,
    crops_dir: Path,
    out: Path,
    recipe: Recipe,
    size: int,
    timm_name: str,
    settings: aptvit.APTConfig,
    timm_args: dict,
) -> torch.nn.Module:
    """APT distilled for one epoch through ``aptvit.train.finetune``; the run in ``out`` is reused when finished."""
    final = out / "model.safetensors"
    if not (out / "done.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        weights = out.with_name(out.name + "-source.safetensors")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source_state.items()}, str(weights))
        cfg = recipe.train_config(
            model=timm_name,
            data=str(crops_dir),
            out=str(out),
            checkpoint=str(weights),
            size=size,
            apt=settings,
            model_args=dict(timm_args),
        )
        metrics = finetune(cfg)
        atomic_write(out / "done.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, default=float)))
        weights.unlink()
    return aptvit.load(final).eval()


def lowres_loss(student: torch.nn.Module, teacher, crops: torch.Tensor, side: int, temperature: float) -> torch.Tensor:
    """``distill_loss`` of a uniform ``student`` that sees the uint8 ``crops`` (B, 3, S, S) downsized to ``side``,
    its dense grid upsampled (bilinear) to the teacher's, against ``teacher`` (an ``aptvit.teacher.Teacher``) on
    the crops themselves."""
    from aptvit.teacher import timm_outputs

    mean, std = student.pretrained_cfg["mean"], student.pretrained_cfg["std"]
    x = normalise(crops, mean, std)
    if side != x.shape[-1]:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    got = timm_outputs(student, x)
    grid = crops.shape[-1] // teacher.model.patch_embed.patch_size[0]
    dense = F.interpolate(got.dense, size=(grid, grid), mode="bilinear", align_corners=False)
    return distill_loss(Outputs(None, got.pre_logits, dense), teacher(crops), temperature)


def distill_lowres(
    student: torch.nn.Module, teacher: torch.nn.Module, crops: torch.Tensor, side: int, recipe: Recipe, out: Path
) -> torch.nn.Module:
    """The uniform ``student`` (built at ``side``) distilled for one epoch on ``crops`` against ``teacher`` (at the
    crops' size), with the library's optimizer, schedule, clipping and loss; cached as ``out`` (a state dict)."""
    from aptvit.teacher import Teacher

    if out.is_file():
        student.load_state_dict(torch.load(out, weights_only=True))
        return student.eval()
    cfg = recipe.train_config(model="-", data="-", out="-")
    frozen = Teacher(teacher, "the source")
    optimizer = make_optimizer(student, cfg)
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(recipe.seed))
    torch.manual_seed(recipe.seed)
    student.train()
    for step in range(recipe.steps):
        batch = crops[order[step * recipe.batch : (step + 1) * recipe.batch]]
        set_lr(optimizer, lr_at(step, recipe.steps, cfg))
        loss = lowres_loss(student, frozen, batch, side, cfg.temperature)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"lower-resolution distillation diverged at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
        optimizer.step()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.save(student.state_dict(), tmp))
    return student.eval()


class Students:
    """The distilled students of one input size: each trained once (per budget) when a row first needs it, and
    cached in ``work`` with its crops.

    Args:
        recipe: the epoch.
        work: the cache folder (crops, runs, state dicts).
        source: the frozen source at ``size`` (the teacher; its state is every student's start).
        make_vit: the source's weights at another input side (a lower-resolution student's start).
        timm_name, timm_args: how ``aptvit.train`` builds the source's architecture (``model`` and ``model_args``).
        photos: a function giving the training photos (PIL images), called only when crops must be made.
        settings: the APT student's conversion settings for a budget.
        train_key: names the training photos (e.g. a digest of their list): crops and students are cached under it,
            so that another set of training photos never reuses them.
    """

    def __init__(
        self,
        recipe: Recipe,
        work: Path,
        source: torch.nn.Module,
        make_vit: Callable[[int], torch.nn.Module],
        timm_name: str,
        timm_args: dict,
        photos: Callable[[], list],
        settings: Callable[[float], aptvit.APTConfig],
        train_key: str = "",
    ) -> None:
        self.recipe, self.source, self.make_vit, self.photos, self.settings = recipe, source, make_vit, photos, settings
        self.timm_name, self.timm_args, self.train_key = timm_name, timm_args, train_key
        self.size = timm_args["img_size"]
        root = Path(work) / f"train-{train_key}" if train_key else Path(work)
        self.work = root / f"distill-{self.size}px-{recipe.key()}"
        self.crops_dir = root / f"crops-{self.size}px-{recipe.crops_key()}"  # shared by the recipes
        self._crops = None

    def crops(self) -> torch.Tensor:
        """(steps * batch, 3, size, size) uint8, made once and cached."""
        if self._crops is None:
            path = self.crops_dir / "crops.pt"
            if path.is_file():
                self._crops = torch.load(path, weights_only=True)
            else:
                self.crops_dir.mkdir(parents=True, exist_ok=True)
                n = self.recipe.steps * self.recipe.batch
                self._crops = random_crops(self.photos(), n, self.size, self.recipe.seed)
                atomic_write(path, lambda tmp: torch.save(self._crops, tmp))
        return self._crops

    # a row asks for its student inside the evaluation's inference mode: training needs autograd back
    @torch.inference_mode(False)
    @torch.enable_grad()
    def apt(self, budget: float) -> torch.nn.Module:
        folder = write_folder(self.crops(), self.crops_dir / "crops")
        settings = self.settings(budget)
        out = self.work / f"apt-b{budget:g}-new{self.recipe.new_layer_lr_scale:g}"
        return distill_apt(
            self.source.state_dict(), folder, out, self.recipe, self.size, self.timm_name, settings, self.timm_args
        )

    @torch.inference_mode(False)
    @torch.enable_grad()
    def lowres(self, budget: float, side: int) -> torch.nn.Module:
        out = self.work / f"lowres-{side}px.pt"
        return distill_lowres(self.make_vit(side), self.source, self.crops(), side, self.recipe, out)
