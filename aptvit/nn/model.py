"""``APTViT``: a timm VisionTransformer run on packed, variable-length sequences of mixed-size patches.

The wrapper registers the timm model's own modules and parameters under their own names (so the
state dict keys stay timm's) and adds only ``apt.*`` (the detail path). Its forward re-creates
timm's ``forward_features`` / ``forward_head`` on packed tokens:

    layout -> embed (+ pos) -> prefix tokens -> pos_drop -> norm_pre -> blocks -> norm -> pool -> fc_norm -> head

Every linear layer runs on the packed (T, D) tensor; attention goes through ``varlen_attention``.
With a layout of base-size patches only, the result equals timm's to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.layout import PatchLayout
from ..core.packing import add_prefix_to_cu_seqlens, insert_prefix, place_rows, segment_max, segment_weighted_mean, seq_index, split_prefix
from ..core.pixels import group_by_size
from ..core.quadtree import patch_layout
from .attention import packed_self_attention, resolve_backend
from .config import APTConfig
from .dense import DenseMixin
from .embed import AdaptivePatchEmbed
from .support import check_supported

Images = Union[torch.Tensor, Sequence[torch.Tensor]]
Groups = List[Tuple[List[int], torch.Tensor]]


def drop_path_packed(y: torch.Tensor, module: nn.Module, seq: torch.Tensor, num_seqs: int, training: bool) -> torch.Tensor:
    """timm's per-sample stochastic depth, per image of a packed batch (timm's DropPath would drop per token)."""
    prob = float(getattr(module, "drop_prob", 0.0) or 0.0)
    if not training or prob == 0.0:
        return y
    keep = y.new_empty(num_seqs).bernoulli_(1.0 - prob)
    if getattr(module, "scale_by_keep", True) and prob < 1.0:
        keep = keep / (1.0 - prob)
    return y * keep[seq][:, None]


@dataclass
class _Packing:
    """Per-forward facts about the packed sequence with prefix tokens."""

    cu_seqlens: torch.Tensor  # (B+1,) offsets incl. prefix tokens
    offsets: List[int]  # the same, as Python ints (one device sync per forward, not per layer)
    max_seqlen: int
    seq: torch.Tensor  # (T + B P,) image of every token
    backend: str = "loop"


class APTViT(DenseMixin, nn.Module):
    """A timm VisionTransformer that runs on adaptive patch layouts. Build it with ``aptvit.convert``.

    Args:
        vit: a supported timm ``VisionTransformer`` (see ``aptvit.nn.support``); its modules and
            parameters are shared, not copied.
        config: conversion settings.
    """

    def __init__(self, vit: nn.Module, config: APTConfig) -> None:
        super().__init__()
        check_supported(vit)
        if not isinstance(config, APTConfig):
            raise TypeError(f"config must be an APTConfig, got {type(config).__name__}")
        sizes = config.patch_sizes
        if sizes[0] != vit.patch_embed.patch_size[0]:
            raise ValueError(f"patch_sizes must start with the model's patch size {vit.patch_embed.patch_size[0]}, got {sizes}")
        self.config = config
        object.__setattr__(self, "timm_model", vit)  # a handle for users; not a registered submodule
        for name, module in vit.named_children():
            self.add_module(name, module)
        for name, param in vit.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.no_embed_class = vit.no_embed_class
        self.global_pool = vit.global_pool
        self.pool_include_prefix = getattr(vit, "pool_include_prefix", False)
        self.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
        self.grad_checkpointing = False
        self.embed_dim = vit.embed_dim
        self.num_classes = vit.num_classes
        ref = vit.patch_embed.proj.weight
        self.apt = AdaptivePatchEmbed(vit.embed_dim, sizes, device=ref.device, dtype=ref.dtype)

    # ------------------------------------------------------------------ settings
    @property
    def patch_size(self) -> int:
        return self.config.patch_sizes[0]

    @property
    def patch_sizes(self) -> Tuple[int, ...]:
        return tuple(self.config.patch_sizes)

    def configure(self, **changes) -> "APTViT":
        """Change layout / attention settings (thresholds=, budget=, scorer=, bins=, attention=), validated.

        The patch sizes are fixed at conversion (they own the detail-path weights).
        """
        if "patch_sizes" in changes and tuple(changes["patch_sizes"]) != self.patch_sizes:
            raise ValueError(f"patch_sizes are fixed at conversion ({self.patch_sizes}); convert again to change them")
        self.config = self.config.replace(**changes)
        return self

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's ``reset_classifier`` on the wrapped model, re-registered here (a new label set)."""
        self.timm_model.reset_classifier(num_classes, global_pool)
        self.head, self.num_classes = self.timm_model.head, num_classes
        self.global_pool = self.timm_model.global_pool
        check_supported(self.timm_model)

    def no_weight_decay(self) -> set:
        """Parameters timm exempts from weight decay (used by timm's optimizer factory)."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def pixel_mean_std(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """The normalisation the ViT expects (its ``pretrained_cfg``; ImageNet's when absent)."""
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return tuple(self.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(self.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD))

    # ------------------------------------------------------------------ layout
    def make_layout(self, images: Images, **overrides) -> PatchLayout:
        """The layout for normalised images: undo the normalisation, then score the pixels.

        ``overrides`` replace this model's settings for one call (thresholds=, budget=, scorer=, bins=).
        """
        c = self.config.replace(**overrides) if overrides else self.config
        mean, std = self.pixel_mean_std()

        def pixels(t: torch.Tensor) -> torch.Tensor:
            shape = (-1, 1, 1) if t.dim() == 3 else (1, -1, 1, 1)
            m = torch.tensor(mean, device=t.device, dtype=torch.float32).view(shape)
            s = torch.tensor(std, device=t.device, dtype=torch.float32).view(shape)
            return (t.float() * s + m).clamp_(0.0, 1.0)  # NaN stays NaN and is reported by patch_layout

        with torch.no_grad():
            px = pixels(images) if isinstance(images, torch.Tensor) else [pixels(t) for t in images]
            return patch_layout(px, **c.layout_kwargs())

    # ------------------------------------------------------------------ forward
    def forward(self, images: Images, layout: Optional[PatchLayout] = None) -> torch.Tensor:
        """Logits (B, num_classes) for normalised images (B, C, H, W) or a list of (C, H, W)."""
        x, layout = self.forward_features(images, layout)
        return self.forward_head(x, layout)

    def embed(self, images: Images, layout: PatchLayout) -> torch.Tensor:
        """Packed input tokens (T + B * P, D): patch embeddings plus positions, prefix tokens in front."""
        groups = self._groups(images)
        _check_layout(layout, groups, self.patch_sizes)
        return self._embed(groups, layout)

    def forward_features(self, images: Images, layout: Optional[PatchLayout] = None) -> Tuple[torch.Tensor, PatchLayout]:
        """Packed final tokens (T + B * P, D), per image [prefix tokens, patch tokens], and the layout."""
        x, _, layout = self._run(images, layout)
        return self.norm(x), layout

    def _run(self, images: Images, layout: Optional[PatchLayout], take: Sequence[int] = (), stop: Optional[int] = None):
        """Embed and run the blocks (up to block ``stop``); returns (x before the final norm, {i: x after block i}, layout)."""
        groups = self._groups(images)  # clear errors before any work
        layout = self.make_layout(images) if layout is None else layout
        _check_layout(layout, groups, self.patch_sizes)
        x = self._embed(groups, layout)
        packing = self._packing(layout, x)
        x = self.norm_pre(self.pos_drop(x))
        kept: Dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            if stop is not None and i > stop:
                break
            x = self._block(blk, x, packing)
            if i in take:
                kept[i] = x
        return x, kept, layout

    def forward_head(self, x: torch.Tensor, layout: PatchLayout, pre_logits: bool = False) -> torch.Tensor:
        """Pool like timm (average weighted by the base cells each token covers), fc_norm, head."""
        b, p = layout.batch_size, self.num_prefix_tokens
        pool = self.global_pool
        if pool == "token":
            x = x.index_select(0, add_prefix_to_cu_seqlens(layout.cu_seqlens, p)[:-1].long())
        elif pool in ("avg", "max", "avgmax"):
            patches, prefix = split_prefix(x, layout.cu_seqlens, p)
            seq, weights = layout.image_index, layout.areas
            if self.pool_include_prefix and p:
                patches = torch.cat([patches, prefix.reshape(b * p, -1)])
                seq = torch.cat([seq, torch.arange(b, device=seq.device).repeat_interleave(p)])
                weights = torch.cat([weights, weights.new_ones(b * p)])
            avg = segment_weighted_mean(patches, weights, seq, b) if pool != "max" else None
            mx = segment_max(patches, seq, b) if pool != "avg" else None
            x = avg if pool == "avg" else mx if pool == "max" else 0.5 * (mx + avg)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    # ------------------------------------------------------------------ pieces
    def _groups(self, images: Images) -> Groups:
        """Validate normalised model input and split it into same-size batches."""
        groups = group_by_size(images)
        p, in_chans = self.patch_size, self.patch_embed.proj.in_channels
        for _, batch in groups:
            b, c, h, w = batch.shape
            if b == 0:
                raise ValueError("images is an empty batch")
            if c != in_chans:
                raise ValueError(f"images have {c} channels but the model takes {in_chans}: shape {tuple(batch.shape)}")
            if not batch.is_floating_point():
                raise TypeError(f"images must be floating point and normalised as the model expects, got {batch.dtype}")
            if h % p or w % p:
                raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}; "
                                 f"pad with aptvit.pad_to_multiple(images, {p}) or resize")
        return groups

    def _pos_embed_grid(self, grid: Tuple[int, int]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Position embeddings for a (H/p, W/p) grid, resampled as timm does: (1, D, h, w) and prefix (1, P', D)."""
        pos = getattr(self, "pos_embed", None)
        if pos is None:
            return None, None
        from timm.layers import resample_abs_pos_embed

        n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        old = tuple(self.patch_embed.grid_size)
        if tuple(grid) != old:
            pos = resample_abs_pos_embed(pos, new_size=grid, old_size=old, num_prefix_tokens=n_prefix)
        grid_pos = pos[:, n_prefix:].reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
        return grid_pos, (pos[:, :n_prefix] if n_prefix else None)

    def _embed(self, groups, layout: PatchLayout) -> torch.Tensor:
        """Packed tokens with position embeddings and prefix tokens: (T + B * P, D)."""
        image = layout.image_index
        embedded, token_ids = [], []
        prefix_pos = None
        for idx, batch in groups:
            grid = (batch.shape[-2] // self.patch_size, batch.shape[-1] // self.patch_size)
            pos_grid, prefix_pos = self._pos_embed_grid(grid)
            if len(groups) == 1:
                ids, local = torch.arange(layout.total_tokens, device=image.device), image
            else:
                to_local = torch.full((layout.batch_size,), -1, dtype=torch.long, device=image.device)
                to_local[torch.tensor(idx, device=image.device)] = torch.arange(len(idx), device=image.device)
                ids = (to_local[image] >= 0).nonzero().squeeze(1)
                local = to_local[image[ids]]
            embedded.append(self.apt(batch, local, layout.y[ids], layout.x[ids], layout.size[ids],
                                     self.patch_embed.proj, self.patch_embed.norm, pos_grid))
            token_ids.append(ids)
        tokens = embedded[0] if len(groups) == 1 else place_rows(torch.cat(embedded), torch.cat(token_ids), layout.total_tokens)
        prefix = [t for t in (getattr(self, "cls_token", None), getattr(self, "reg_token", None)) if t is not None]
        if not prefix:
            return tokens
        prefix = torch.cat(prefix, dim=1)  # (1, P, D)
        if prefix_pos is not None:
            prefix = prefix + prefix_pos
        return insert_prefix(tokens, prefix.expand(layout.batch_size, -1, -1), layout.cu_seqlens)

    def _packing(self, layout: PatchLayout, x: torch.Tensor) -> _Packing:
        p = self.num_prefix_tokens
        cu = add_prefix_to_cu_seqlens(layout.cu_seqlens, p)
        attn = self.blocks[0].attn if len(self.blocks) else None
        dropout = bool(attn is not None and self.training and attn.attn_drop.p > 0)
        # under autocast the matmuls run in the autocast dtype even though x may be float32
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        backend = resolve_backend(self.config.attention, x.device, dtype, dropout)
        return _Packing(cu, cu.tolist(), layout.max_seqlen + p, seq_index(cu), backend)

    def _block(self, blk: nn.Module, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._block_forward, blk, x, packing, use_reentrant=False)
        return self._block_forward(blk, x, packing)

    def _block_forward(self, blk: nn.Module, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
        b = len(packing.offsets) - 1
        a = packed_self_attention(blk.attn, blk.norm1(x), packing.cu_seqlens, packing.max_seqlen, packing.backend, packing.offsets)
        x = x + drop_path_packed(blk.ls1(a), blk.drop_path1, packing.seq, b, self.training)
        return x + drop_path_packed(blk.ls2(blk.mlp(blk.norm2(x))), blk.drop_path2, packing.seq, b, self.training)


def _check_layout(layout: PatchLayout, groups, patch_sizes: Tuple[int, ...]) -> None:
    if not isinstance(layout, PatchLayout):
        raise TypeError(f"layout must be a PatchLayout, got {type(layout).__name__}")
    n = sum(len(idx) for idx, _ in groups)
    if layout.batch_size != n:
        raise ValueError(f"layout is for {layout.batch_size} images but images holds {n}")
    for idx, batch in groups:
        for i in idx:
            if tuple(layout.image_sizes[i]) != tuple(batch.shape[-2:]):
                raise ValueError(
                    f"layout image {i} is {layout.image_sizes[i][0]}x{layout.image_sizes[i][1]} "
                    f"but the image is {batch.shape[-2]}x{batch.shape[-1]}"
                )
    if layout.patch_sizes[0] != patch_sizes[0] or not set(layout.patch_sizes) <= set(patch_sizes):
        raise ValueError(f"layout patch_sizes {layout.patch_sizes} do not fit this model's patch_sizes {patch_sizes}")
    if layout.device != groups[0][1].device:
        raise ValueError(f"layout is on {layout.device} but images are on {groups[0][1].device}; use layout.to(device)")


def model_flops(model: APTViT, layout: PatchLayout) -> Dict[str, torch.Tensor]:
    """FLOPs per image of the uniform ViT and of the APT model on ``layout``.

    Returns:
        {"uniform": (B,), "apt": (B,)} float64.
    """
    from ..core.flops import block_flops, detail_flops, patch_embed_flops

    p, prefix, dim = model.patch_size, model.num_prefix_tokens, model.embed_dim
    in_chans = model.patch_embed.proj.in_channels
    head = 2.0 * dim * model.num_classes
    cells = layout.num_base_tokens.cpu().double()
    embed = patch_embed_flops(cells, in_chans, p, dim)
    blocks = lambda n: sum(  # noqa: E731
        block_flops(n + prefix, sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, nn.Linear)),
                    blk.attn.num_heads * blk.attn.head_dim)
        for blk in model.blocks
    )
    apt = embed + blocks(layout.num_tokens.cpu().double()) + head
    for s, count in layout.size_counts().items():
        if s == p:
            continue
        count = count.cpu()
        # the resize path projects each large patch once (area-averaged to p x p), plus its detail path
        apt = apt + patch_embed_flops(count, in_chans, p, dim) + detail_flops({s // p: count}, dim)
    return {"uniform": embed + blocks(cells) + head, "apt": apt}
