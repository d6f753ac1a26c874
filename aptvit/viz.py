"""Drawing a patch layout over its image (and, optionally, the score heat map beside it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from .core.io import InputError, atomic_write
from .core.layout import PatchLayout, check_patch_sizes

logger = logging.getLogger(__name__)

# One colour per scale factor (1x, 2x, 4x, 8x, ...): base patches stay light so that the merges stand out.
SIZE_COLOURS = ("#f2f2f2", "#2b8cbe", "#f03b20", "#31a354", "#756bb1", "#fd8d3c")


def draw_layout(
    image: torch.Tensor,
    layout: PatchLayout,
    path,
    scores: Optional[torch.Tensor] = None,
    score_label: str = "score",
    title: str = "",
    padding: Sequence[int] = (0, 0),
) -> Path:
    """Save a PNG of ``image`` with the patches of ``layout`` (one image) drawn over it.

    Args:
        image: (3, H, W) uint8, the image the layout was computed on.
        layout: layout of that one image.
        path: output PNG path (written atomically).
        scores: optional (h, w) score grid to show as a heat map in a second panel.
        score_label: colour-bar label of the heat map.
        title: figure title.
        padding: (bottom, right) pixels of padding added to the image, shaded in the drawing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Patch, Rectangle

    h, w = image.shape[-2:]
    panels = 2 if scores is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels * max(0.6, w / h), 5.6), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(image.permute(1, 2, 0).cpu().numpy())
    boxes = layout.boxes(0).tolist()
    p = layout.base_size
    counts = {s: 0 for s in layout.patch_sizes}
    by_size = {s: [] for s in layout.patch_sizes}
    for y, x, s in boxes:
        counts[s] += 1
        by_size[s].append(Rectangle((x - 0.5, y - 0.5), s, s))
    handles = []
    for level, s in enumerate(layout.patch_sizes):
        colour = SIZE_COLOURS[level % len(SIZE_COLOURS)]
        if by_size[s]:
            fill = 0.0 if s == p else 0.18
            ax.add_collection(PatchCollection(by_size[s], facecolor=colour, alpha=fill, edgecolor="none"))
            ax.add_collection(
                PatchCollection(by_size[s], facecolor="none", edgecolor=colour, linewidth=0.6 if s == p else 1.3)
            )
        handles.append(Patch(facecolor=colour, edgecolor=colour, label=f"{s}px: {counts[s]}"))
    pad_b, pad_r = padding
    if pad_b or pad_r:
        ax.add_patch(Rectangle((-0.5, h - pad_b - 0.5), w, pad_b, facecolor="k", alpha=0.35, hatch="//"))
        ax.add_patch(Rectangle((w - pad_r - 0.5, -0.5), pad_r, h, facecolor="k", alpha=0.35, hatch="//"))
    total, base = layout.total_tokens, int(layout.num_base_tokens[0])
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0) if panels == 1 else (0.0, -0.02),
        fontsize=8,
        title=f"{total}/{base} tokens ({total / base:.0%})",
        title_fontsize=8,
        ncol=1 if panels == 1 else len(handles),
    )
    ax.set_axis_off()
    if scores is not None:
        hm = axes[0, 1].imshow(scores.cpu().float().numpy(), cmap="magma", interpolation="nearest")
        axes[0, 1].set_title(score_label, fontsize=9)
        axes[0, 1].set_axis_off()
        fig.colorbar(hm, ax=axes[0, 1], fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def _output_stems(paths: Sequence[Path], out_dir) -> list:
    """Output names per image: the file's stem, or stem_suffix where two images would write the same file
    (a.jpg and a.png into one --out). Two images that still collide (the same name from two folders) are refused.
    """

    def key(path, stem):
        return ((Path(out_dir) if out_dir else path.parent).resolve(), stem)

    plain = [key(p, p.stem) for p in paths]
    stems = [
        p.stem if plain.count(k) == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p, k in zip(paths, plain)
    ]
    seen = {}
    for path, stem in zip(paths, stems):
        other = seen.setdefault(key(path, stem), path)
        if other != path:
            raise InputError(
                f"{other} and {path} would both be drawn to {key(path, stem)[0] / (stem + '_apt.png')}; "
                "give them different names or show them one --out at a time"
            )
    return stems


SHOW_BASE_SIZE = 16  # ``aptvit show`` draws layouts without a model: those a /16 ViT's conversion would make


def show_patch_sizes(patch_sizes=None, thresholds=None) -> tuple:
    """The sizes ``show`` draws: ``patch_sizes``, else those a /16 ViT's conversion picks (``APTConfig``'s rule)."""
    from .nn.config import APTConfig

    if patch_sizes is not None:
        return check_patch_sizes(patch_sizes)
    return APTConfig(thresholds=thresholds).for_patch_size(SHOW_BASE_SIZE).patch_sizes


def show(
    paths: Sequence,
    size=None,
    patch_sizes: Optional[Sequence[int]] = None,
    thresholds=None,
    budget=None,
    scorer: str = "entropy",
    out_dir=None,
    write_json: bool = False,
    heatmap: bool = False,
    scorer_args=None,
) -> list:
    """``aptvit show``: draw the layout of every image file, print tokens kept, optionally write JSON.

    ``scorer_args``: the scorer's parameters (e.g. ``{"bins": 256}``); its registered defaults fill the rest.

    Returns:
        One dict per image: path, png, json, image size, padding, tokens, base tokens.
    """
    import json

    from .core.pixels import grayscale_255
    from .core.quadtree import patch_layout
    from .core.scoring import get_scorer
    from .images import fit_image, read_image

    sizes = show_patch_sizes(patch_sizes, thresholds)
    p = sizes[0]
    results = []
    stems = _output_stems([Path(x) for x in paths], out_dir)
    for path, stem in zip(map(Path, paths), stems):
        original = read_image(path)
        if size is not None:
            img, padding = fit_image(original, size, p)
        else:
            img, padding = fit_image(original, (min(original.shape[-2:]), None), p)
        layout = patch_layout(
            img[None], sizes, thresholds=thresholds, budget=budget, scorer=scorer, scorer_args=scorer_args
        )
        folder = Path(out_dir) if out_dir else path.parent
        png = folder / f"{stem}_apt.png"
        grid = None
        if heatmap and len(sizes) > 1:
            spec = get_scorer(scorer)
            params = spec.resolve_params(scorer, scorer_args)
            grid = spec.fn(grayscale_255(img[None]), [sizes[1]], p, **params)[sizes[1]][0]
        draw_layout(
            img,
            layout,
            png,
            scores=grid,
            score_label=f"{scorer} score of {sizes[1] if grid is not None else p}px patches",
            title=path.name,
            padding=padding,
        )
        tokens, base = layout.total_tokens, int(layout.num_base_tokens[0])
        note = f" (padded {padding[0]}px bottom, {padding[1]}px right to a multiple of {p})" if any(padding) else ""
        result = {
            "image": str(path),
            "png": str(png),
            "height": img.shape[-2],
            "width": img.shape[-1],
            "padding_bottom": padding[0],
            "padding_right": padding[1],
            "tokens": tokens,
            "base_tokens": base,
            "patch_sizes": list(sizes),
            "counts": {str(s): int(c[0]) for s, c in layout.size_counts().items()},
        }
        if write_json:
            jpath = folder / f"{stem}_apt.json"
            payload = {
                **result,
                "thresholds": {str(k): v for k, v in (thresholds or {}).items()} or None,
                "budget": budget,
                "scorer": scorer,
                "layout": layout.to_dict(),
            }
            atomic_write(jpath, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
            result["json"] = str(jpath)
        logger.info(
            f"{path.name}: {tokens}/{base} tokens ({tokens / base:.1%}) at {img.shape[-2]}x{img.shape[-1]}{note} -> {png}"
        )
        results.append(result)
    return results
