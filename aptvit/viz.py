"""Drawing a patch layout over its image (and, optionally, the score heat map beside it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from .core.io import InputError, atomic_write
from .core.layout import PatchLayout, check_patch_sizes

logger = logging.getLogger(__name__)

# One colour per scale factor (1x, 2x, 4x, 8x, ...): base patches stay light so that the merges stand out.
SIZE_COLOURS = ("#f2f2f2", "#2b8cbe", "#f03b20", "#31a354", "#756bb1", "#fd8d3c")
DPI = 110  # the pictures' default resolution (dots per inch: the text's size in pixels)
PANEL_WIDTH = 640  # default width in pixels of each panel (the photo, the heat map)


def describe_settings(scorer: str, thresholds=None, budget=None) -> str:
    """The layout settings in words, as the pictures, the demo and ``show`` state them: "entropy scorer, thresholds
    32=5.5, 64=4.0" or "entropy scorer, budget 0.5"."""
    if budget is not None:
        return f"{scorer} scorer, budget {budget:g}" + (" tokens" if isinstance(budget, int) else " of the base tokens")
    pairs = ", ".join(f"{s}={v:g}" for s, v in sorted((thresholds or {}).items()))
    return f"{scorer} scorer, thresholds {pairs}"


def legend_handles(patch_sizes: Sequence[int], counts) -> list:
    """The legend's swatches, one per patch size ("16px: 240"): each in its size's colour with a dark edge, as
    the light base colour alone would be white on the legend's white."""
    from matplotlib.patches import Patch

    return [
        Patch(
            facecolor=SIZE_COLOURS[i % len(SIZE_COLOURS)], edgecolor="0.25", linewidth=0.8, label=f"{s}px: {counts[s]}"
        )
        for i, s in enumerate(patch_sizes)
    ]


def check_picture_size(width: Optional[int], dpi: int) -> None:
    """A picture's ``width`` (pixels, None: the default) and ``dpi``, checked before any drawing."""
    for name, value, low, high in (("--width", width, 200, 20000), ("--dpi", dpi, 20, 1200)):
        if value is None and name == "--width":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InputError(f"{name} {value!r} must be a whole number from {low} to {high}")


def _geometry(h: int, w: int, panels: int, width: int, dpi: int) -> dict:
    """Where the figure's parts go, in inches: the photo (and the heat map beside it) at the photo's own aspect,
    filling the width; the title above and the legend below take fixed bands. A portrait photo is narrowed so
    that the figure stays at most 1.5 times as tall as wide."""
    fig_w = width / dpi
    margin, gap, top, bottom = 0.08, 0.15, 0.62, 0.62
    colour_bar = 0.62 if panels > 1 else 0.0  # the heat map's colour bar and its labels
    panel_w = (fig_w - 2 * margin - (panels - 1) * gap - colour_bar) / panels
    if panel_w <= 0.5:
        raise InputError(f"--width {width} is too narrow for {panels} panel(s) at --dpi {dpi}; give a larger --width")
    panel_h = panel_w * h / w
    tallest = 1.5 * fig_w - top - bottom
    if panel_h > tallest:
        panel_w, panel_h = tallest * w / h, tallest
    left = (fig_w - panels * panel_w - (panels - 1) * gap - colour_bar) / 2
    return dict(fig=(fig_w, top + panel_h + bottom), left=left, bottom=bottom, panel=(panel_w, panel_h), gap=gap)


def draw_layout(
    image: torch.Tensor,
    layout: PatchLayout,
    path,
    scores: Optional[torch.Tensor] = None,
    score_label: str = "score",
    title: str = "",
    padding: Sequence[int] = (0, 0),
    subtitle: str = "",
    width: Optional[int] = None,
    dpi: int = DPI,
) -> Path:
    """Save a PNG of ``image`` with the patches of ``layout`` (one image) drawn over it.

    The photo fills the figure's width at its own aspect (with the heat map beside it at the same aspect), the
    title and ``subtitle`` (the settings) above it, the legend with the tokens per size below it.

    Args:
        image: (3, H, W) uint8, the image the layout was computed on.
        layout: layout of that one image.
        path: output PNG path (written atomically).
        scores: optional (h, w) score grid to show as a heat map in a second panel.
        score_label: colour-bar label of the heat map.
        title: figure title.
        padding: (bottom, right) pixels of padding added to the image, shaded in the drawing.
        subtitle: a second title line (``show`` states the scorer and thresholds or budget there).
        width: the picture's width in pixels (default ``PANEL_WIDTH`` per panel).
        dpi: its resolution: the text keeps its size in points, so a higher dpi gives larger text in pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[-2:]
    panels = 2 if scores is not None else 1
    check_picture_size(width, dpi)
    width = PANEL_WIDTH * panels if width is None else width
    g = _geometry(h, w, panels, width, dpi)
    fig = plt.figure(figsize=g["fig"], dpi=dpi)
    ax = _panel_axes(fig, g, g["left"])
    ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="antialiased")
    counts = _draw_patches(ax, layout)
    _shade_padding(ax, h, w, padding)
    _draw_legend(fig, g, layout, counts)
    ax.set_axis_off()
    if scores is not None:
        _draw_heat_map(fig, g, scores, score_label, h, w)
    text = "\n".join(t for t in (title, subtitle) if t)
    if text:
        fig.text(0.5, 1 - 0.08 / g["fig"][1], text, ha="center", va="top", fontsize=9.5, linespacing=1.5)
    out = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return out


def _panel_axes(fig, g: dict, left_in: float):
    """Axes of one panel-sized picture whose left edge is ``left_in`` inches from the figure's (``_geometry``)."""
    fig_w, fig_h = g["fig"]
    panel_w, panel_h = g["panel"]
    return fig.add_axes((left_in / fig_w, g["bottom"] / fig_h, panel_w / fig_w, panel_h / fig_h))


def _draw_patches(ax, layout: PatchLayout) -> dict:
    """Draw each patch of ``layout`` in its size's colour (outlined; larger ones lightly filled, so that the merges
    stand out over the base grid); returns the number of patches of each size."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    p = layout.base_size
    counts = {s: 0 for s in layout.patch_sizes}
    by_size = {s: [] for s in layout.patch_sizes}
    for y, x, s in layout.boxes(0).tolist():
        counts[s] += 1
        by_size[s].append(Rectangle((x - 0.5, y - 0.5), s, s))
    for level, s in enumerate(layout.patch_sizes):
        colour = SIZE_COLOURS[level % len(SIZE_COLOURS)]
        if by_size[s]:
            fill = 0.0 if s == p else 0.18
            ax.add_collection(PatchCollection(by_size[s], facecolor=colour, alpha=fill, edgecolor="none"))
            ax.add_collection(
                PatchCollection(by_size[s], facecolor="none", edgecolor=colour, linewidth=0.6 if s == p else 1.3)
            )
    return counts


def _shade_padding(ax, h: int, w: int, padding: Sequence[int]) -> None:
    """Grey and hatch the (bottom, right) ``padding`` of an ``h`` x ``w`` picture: its black pixels are not part of
    the photo."""
    from matplotlib.patches import Rectangle

    pad_b, pad_r = padding
    if pad_b or pad_r:
        shade = dict(facecolor="0.8", edgecolor="0.5", alpha=0.9, hatch="///", linewidth=0)
        ax.add_patch(Rectangle((-0.5, h - pad_b - 0.5), w, pad_b, **shade))
        ax.add_patch(Rectangle((w - pad_r - 0.5, -0.5), pad_r, h, **shade))


def _draw_legend(fig, g: dict, layout: PatchLayout, counts: dict) -> None:
    """The legend under the photo: one swatch per size with its patch count, the tokens kept as its title."""
    fig_w, fig_h = g["fig"]
    handles = legend_handles(layout.patch_sizes, counts)
    total, base = layout.total_tokens, int(layout.num_base_tokens[0])
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=((g["left"] + g["panel"][0] / 2) / fig_w, (g["bottom"] - 0.04) / fig_h),
        fontsize=8,
        title=f"{total}/{base} tokens ({total / base:.0%})",
        title_fontsize=8,
        ncol=len(handles),
        frameon=False,
        handlelength=1.6,
        columnspacing=1.2,
    )


def _draw_heat_map(fig, g: dict, scores: torch.Tensor, score_label: str, h: int, w: int) -> None:
    """The second panel: the (h', w') ``scores`` stretched over the photo's ``h`` x ``w`` extent (the same aspect and
    position as the patches they score), with a colour bar labelled ``score_label``."""
    fig_w, fig_h = g["fig"]
    panel_w, panel_h = g["panel"]
    heat = _panel_axes(fig, g, g["left"] + panel_w + g["gap"])
    hm = heat.imshow(
        scores.cpu().float().numpy(), cmap="magma", interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5)
    )
    heat.set_axis_off()
    bar = fig.add_axes(
        ((g["left"] + 2 * panel_w + g["gap"] + 0.06) / fig_w, g["bottom"] / fig_h, 0.12 / fig_w, panel_h / fig_h)
    )
    fig.colorbar(hm, cax=bar).set_label(score_label, fontsize=8)
    bar.tick_params(labelsize=7)


def _picture_folder(path: Path, out_dir) -> Path:
    """Where ``show`` draws ``path``: ``out_dir``, or beside the image."""
    return Path(out_dir) if out_dir else path.parent


def _suffixed_stem(path: Path) -> str:
    """The name ``show`` gives an image whose plain stem another image in the same folder shares (a.png: a_png)."""
    return f"{path.stem}_{path.suffix.lstrip('.').lower()}"


def _output_stems(paths: Sequence[Path], out_dir) -> list:
    """Output names per image: the file's stem, or stem_suffix where two images would write the same file
    (a.jpg and a.png into one --out). Two images that still collide (the same name from two folders) are refused.
    """

    def key(path, stem):
        return (_picture_folder(path, out_dir).resolve(), stem)

    plain = [key(p, p.stem) for p in paths]
    stems = [p.stem if plain.count(k) == 1 else _suffixed_stem(p) for p, k in zip(paths, plain)]
    seen = {}
    for path, stem in zip(paths, stems):
        other = seen.setdefault(key(path, stem), path)
        if other != path:
            raise InputError(
                f"{other} and {path} would both be drawn to {key(path, stem)[0] / (stem + '_apt.png')}; "
                "give them different names or show them one --out at a time"
            )
    return stems


def _without_own_pictures(paths: Sequence[Path], out_dir) -> list:
    """``paths`` less the pictures an earlier ``show`` drew of the others (``a_apt.png`` beside ``a.jpg``): a
    second ``aptvit show *.png`` would otherwise draw the layout of a layout picture. Each one left out is named.
    """

    drawn = {}  # picture -> the input it is a picture of, under either name show gives it (_output_stems)
    for path in paths:
        for stem in (path.stem, _suffixed_stem(path)):
            drawn[os.path.abspath(_picture_folder(path, out_dir) / f"{stem}_apt.png")] = path
    kept = []
    for path in paths:
        source = drawn.get(os.path.abspath(path))  # abspath, not resolve(): a symlink loop is reported where read
        if source is not None and source != path:
            logger.info(f"{path.name}: skipped, show's own picture of {source.name}")
        else:
            kept.append(path)
    return kept


def _check_new(files: Sequence[Path]) -> None:
    """Refuse, before anything is written, outputs that would replace existing files (``show``'s default)."""
    taken = [f for f in files if f.exists() or f.is_symlink()]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise InputError(
            f"{str(taken[0])!r}{more} already exists; give --overwrite to replace it, or --out FOLDER to write "
            "elsewhere"
        )


SHOW_BASE_SIZE = 16  # ``aptvit show`` draws layouts without a model: those a /16 ViT's conversion would make


def show_patch_sizes(patch_sizes=None, thresholds=None) -> tuple:
    """The sizes ``show`` draws: ``patch_sizes``, else those a /16 ViT's conversion picks (``APTConfig``'s rule)."""
    from .nn.config import APTConfig

    if patch_sizes is not None:
        return check_patch_sizes(patch_sizes)
    return APTConfig(thresholds=thresholds).for_patch_size(SHOW_BASE_SIZE).patch_sizes


def layout_description(patch_sizes=None, thresholds=None, budget=None, scorer=None, scorer_args=None) -> str:
    """What ``show`` draws with these settings, in words: "patch sizes 16/32/64, entropy scorer, thresholds 32=5.5,
    64=4.0" (the thresholds actually used: the scorer's defaults when neither thresholds nor budget is given)."""
    from .core.quadtree import check_layout_settings
    from .nn.config import APTConfig

    scorer = APTConfig.scorer if scorer is None else scorer
    sizes = show_patch_sizes(patch_sizes, thresholds)
    used, _ = check_layout_settings(sizes, thresholds, budget, scorer, scorer_args)
    return f"patch sizes {'/'.join(map(str, sizes))}, {describe_settings(scorer, used, budget)}"


def show(
    paths: Sequence,
    size=None,
    patch_sizes: Optional[Sequence[int]] = None,
    thresholds=None,
    budget=None,
    scorer: Optional[str] = None,
    out_dir=None,
    write_json: bool = False,
    heatmap: bool = False,
    scorer_args=None,
    width: Optional[int] = None,
    dpi: int = DPI,
    overwrite: bool = False,
) -> list:
    """``aptvit show``: draw the layout of every image file, print tokens kept, optionally write JSON.

    Each image ``NAME.EXT`` gets ``NAME_apt.png`` (and ``NAME_apt.json``) in ``out_dir``, or beside the image when
    ``out_dir`` is None; an existing file of those names is refused unless ``overwrite``. Every image is read and
    laid out, and every output name checked, before the first picture is written: a bad file among many writes
    nothing. Each file is written atomically (a temporary name, then a rename).

    Args:
        scorer: a registered scorer's name (default: a conversion's, ``APTConfig.scorer``).
        scorer_args: the scorer's parameters (e.g. ``{"bins": 256}``); its registered defaults fill the rest.
        width, dpi: the pictures' width in pixels and resolution (``draw_layout``).
        overwrite: replace existing output files (otherwise an ``InputError`` names the first one).

    Returns:
        One dict per image: path, png, json, image size, padding, tokens, base tokens, patch sizes, counts, and the
        settings used (scorer, thresholds: the scorer's defaults when neither thresholds nor budget was given).
    """
    from .core.io import check_writable
    from .core.quadtree import check_layout_settings
    from .nn.config import APTConfig

    scorer = APTConfig.scorer if scorer is None else scorer
    sizes = show_patch_sizes(patch_sizes, thresholds)
    used, _ = check_layout_settings(sizes, thresholds, budget, scorer, scorer_args)  # the defaults filled in
    settings = layout_description(sizes, used, budget, scorer, scorer_args)
    check_picture_size(width, dpi)
    paths = _without_own_pictures([Path(x) for x in paths], out_dir)
    stems = _output_stems(paths, out_dir)
    folders = [_picture_folder(path, out_dir) for path in paths]
    if not overwrite:
        suffixes = ("_apt.png", "_apt.json") if write_json else ("_apt.png",)
        _check_new([folder / (stem + suffix) for folder, stem in zip(folders, stems) for suffix in suffixes])
    if out_dir is not None:
        check_writable(out_dir, folder=True)
    layout_args = dict(size=size, sizes=sizes, thresholds=thresholds, budget=budget, scorer=scorer, args=scorer_args)
    for path in paths:  # every input checked (read, resized, laid out) before anything is written
        _laid_out(path, **layout_args)
    results = []
    for path, stem, folder in zip(paths, stems, folders):
        img, padding, layout = _laid_out(path, **layout_args)
        result = _shown(path, folder / f"{stem}_apt.png", img, padding, layout, scorer, used, budget)
        grid = _score_grid(img, sizes, scorer, scorer_args) if heatmap and len(sizes) > 1 else None
        draw_layout(
            img,
            layout,
            result["png"],
            scores=grid,
            score_label=f"{scorer} score of {sizes[1] if grid is not None else sizes[0]}px patches",
            title=f"{path.name} at {img.shape[-2]}x{img.shape[-1]}: {result['tokens']}/{result['base_tokens']} tokens",
            subtitle=settings,
            padding=padding,
            width=width,
            dpi=dpi,
        )
        if write_json:
            result["json"] = _write_layout_json(folder / f"{stem}_apt.json", result, scorer_args, layout)
        logger.info(_shown_line(path.name, result, sizes[0]))
        results.append(result)
    return results


def _laid_out(path: Path, size, sizes, thresholds, budget, scorer, args):
    """(image (C, H, W) float in [0, 1] fitted to ``size`` and the base grid, its (bottom, right) padding, its
    layout) of one file."""
    from .core.quadtree import patch_layout
    from .images import fit_image, read_image

    original = read_image(path)
    img, padding = fit_image(original, size if size is not None else (min(original.shape[-2:]), None), sizes[0])
    layout = patch_layout(img[None], sizes, thresholds=thresholds, budget=budget, scorer=scorer, scorer_args=args)
    return img, padding, layout


def _score_grid(img: torch.Tensor, sizes, scorer: str, scorer_args) -> torch.Tensor:
    """The scorer's (h, w) grid of scores of the second-smallest patches of ``img``, for the heat map."""
    from .core.pixels import grayscale_255
    from .core.scoring import get_scorer

    spec = get_scorer(scorer)
    params = spec.resolve_params(scorer, scorer_args)
    return spec.fn(grayscale_255(img[None]), [sizes[1]], sizes[0], **params)[sizes[1]][0]


def _shown(path: Path, png: Path, img, padding, layout: PatchLayout, scorer, used, budget) -> dict:
    """What ``show`` returns for one image (without its JSON file's path)."""
    return {
        "image": str(path),
        "png": str(png),
        "height": img.shape[-2],
        "width": img.shape[-1],
        "padding_bottom": padding[0],
        "padding_right": padding[1],
        "tokens": layout.total_tokens,
        "base_tokens": int(layout.num_base_tokens[0]),
        "patch_sizes": list(layout.patch_sizes),
        "counts": {str(s): int(c[0]) for s, c in layout.size_counts().items()},
        "scorer": scorer,
        "thresholds": {str(k): v for k, v in used.items()} if used is not None else None,
        "budget": budget,
    }


def _write_layout_json(path: Path, result: dict, scorer_args, layout: PatchLayout) -> str:
    """``result`` with the scorer's parameters and the whole layout, written to ``path`` atomically."""
    import json

    payload = {**result, "scorer_args": scorer_args or {}, "layout": layout.to_dict()}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    return str(path)


def _shown_line(name: str, result: dict, p: int) -> str:
    """The line ``show`` prints for one image."""
    tokens, base = result["tokens"], result["base_tokens"]
    pad = result["padding_bottom"], result["padding_right"]
    note = f" (padded {pad[0]}px bottom, {pad[1]}px right to a multiple of {p})" if any(pad) else ""
    size = f"{result['height']}x{result['width']}"
    return f"{name}: {tokens}/{base} tokens ({tokens / base:.1%}) at {size}{note} -> {result['png']}"
