"""``APTViT``: a timm VisionTransformer run on packed, variable-length sequences of mixed-size patches.

The wrapper registers the timm model's own modules and parameters under their own names (so the
state dict keys stay timm's) and adds only ``apt.*`` (the detail path). A forward has two halves:

* ``prepare`` (host-side planning): input checks on shapes and dtypes, the layout if none is given, and a
  ``PackedBatch`` of every index whose shape depends on the data (``core.packed.plan_packed``);
* ``forward_packed`` (device math, static control flow): timm's ``forward_features`` / ``forward_head``
  re-created on packed tokens, with no host sync, no data-dependent shape and no Python loop over images:

    bank of embeddings -> gather tokens + positions + prefix -> pos_drop -> norm_pre -> blocks -> norm -> pool -> head

Every linear layer runs on the packed (N, D) tensor; attention goes through ``varlen_attention``.
With a layout of base-size patches only, the result equals timm's to float rounding.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.layout import PatchLayout, to_device
from ..core.packed import PackedBatch, groups_of, pad_rows, plan_packed
from ..core.quadtree import patch_layout
from .attention import check_backend, packed_self_attention, resolve_backend
from .config import APTConfig
from .dense import DenseMixin
from .embed import AdaptivePatchEmbed, position_bank
from .support import check_supported

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


def drop_path_packed(
    y: torch.Tensor, module: nn.Module, seq: torch.Tensor, num_seqs: int, training: bool
) -> torch.Tensor:
    """timm's per-sample stochastic depth, per image of a packed batch (timm's DropPath would drop per token)."""
    prob = float(getattr(module, "drop_prob", 0.0) or 0.0)
    if not training or prob == 0.0:
        return y
    keep = y.new_empty(num_seqs).bernoulli_(1.0 - prob)
    if getattr(module, "scale_by_keep", True) and prob < 1.0:
        keep = keep / (1.0 - prob)
    return y * keep[seq][:, None]


class APTViT(DenseMixin, nn.Module):
    """A timm VisionTransformer that runs on adaptive patch layouts. Build it with ``aptvit.convert``.

    Args:
        vit: a supported timm ``VisionTransformer`` (see ``aptvit.nn.support``); its modules and
            parameters are shared, not copied.
        config: conversion settings (saved with the weights); patch sizes None become p and the thresholds' sizes, or (p, 2p).
        attention: the attention backend, a runtime choice (not saved): "auto" or a name in
            ``nn.attention.BACKENDS``; change it with ``configure(attention=...)``.
    """

    def __init__(self, vit: nn.Module, config: APTConfig, attention: str = "auto") -> None:
        super().__init__()
        check_supported(vit)
        if not isinstance(config, APTConfig):
            raise TypeError(f"config must be an APTConfig, got {type(config).__name__}")
        config = config.for_patch_size(vit.patch_embed.patch_size[0])
        sizes = config.patch_sizes
        if sizes[0] != vit.patch_embed.patch_size[0]:
            raise ValueError(
                f"patch_sizes must start with the model's patch size {vit.patch_embed.patch_size[0]}, got {sizes}"
            )
        self.config = config
        self.attention = check_backend(attention)  # a runtime choice: not part of the saved settings
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

    def configure(self, attention: Optional[str] = None, **changes) -> "APTViT":
        """Change the settings (``APTConfig`` fields: thresholds=, budget=, scorer=, scorer_args=, area_bias=) and/or
        the attention backend (``attention=``, see ``nn.attention.BACKENDS``), validated.

        The patch sizes are fixed at conversion (they own the detail-path weights).
        """
        if "patch_sizes" in changes and tuple(changes["patch_sizes"] or ()) != self.patch_sizes:
            raise ValueError(f"patch_sizes are fixed at conversion ({self.patch_sizes}); convert again to change them")
        config = self.config.replace(**changes) if changes else self.config
        self.attention = check_backend(attention) if attention is not None else self.attention
        self.config = config
        return self

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's ``reset_classifier`` on the wrapped model, re-registered here (a new label set)."""
        self.timm_model.reset_classifier(num_classes, global_pool)
        self.head, self.num_classes = self.timm_model.head, num_classes
        self.global_pool = self.timm_model.global_pool
        check_supported(self.timm_model)

    def get_classifier(self) -> nn.Module:
        """timm's ``get_classifier``: the head."""
        return self.head

    def group_matcher(self, coarse: bool = False) -> Dict:
        """timm's parameter groups (layer-wise LR decay, ``timm.optim``): the new ``apt.*`` layers join the stem,
        since they are part of the embedding."""
        groups = dict(self.timm_model.group_matcher(coarse))
        groups["stem"] = groups["stem"] + r"|^apt\."
        return groups

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's ``set_input_size`` on the wrapped model, keeping this model's ``pos_embed`` the same parameter.

        timm replaces ``pos_embed`` with a resampled parameter; it is re-registered here so that both models, the
        optimizer and the state dict see one tensor. The patch sizes are fixed at conversion.
        """
        if (
            patch_size is not None
            and tuple(patch_size if isinstance(patch_size, (tuple, list)) else (patch_size,) * 2)
            != (self.patch_size,) * 2
        ):
            raise ValueError(
                f"the patch size is fixed at conversion ({self.patch_size}); convert the model again to change it"
            )
        self.timm_model.set_input_size(img_size=img_size)
        if getattr(self.timm_model, "pos_embed", None) is not None:
            self.pos_embed = self.timm_model.pos_embed
        self.__dict__.pop("_position_cache", None)

    def no_weight_decay(self) -> set:
        """Parameters timm exempts from weight decay (used by timm's optimizer factory)."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def pixel_mean_std(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """The normalisation the ViT expects (its ``pretrained_cfg``; ImageNet's when absent)."""
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return tuple(self.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(
            self.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)
        )

    # ------------------------------------------------------------------ layout
    def make_layout(self, images: Images, **overrides) -> PatchLayout:
        """The layout for normalised images: undo the normalisation, then score the pixels.

        ``overrides`` replace this model's settings for one call (thresholds=, budget=, scorer=, scorer_args=).
        """
        c = self.config.replace(**overrides) if overrides else self.config
        mean, std = self.pixel_mean_std()

        def pixels(t: torch.Tensor) -> torch.Tensor:
            shape = (-1, 1, 1) if t.dim() == 3 else (1, -1, 1, 1)
            m = to_device(mean, torch.float32, t.device).view(shape)  # no stream sync (issue #9)
            s = to_device(std, torch.float32, t.device).view(shape)
            return (t.float() * s + m).clamp_(0.0, 1.0)  # NaN stays NaN and is reported by patch_layout

        with torch.no_grad():
            px = pixels(images) if isinstance(images, torch.Tensor) else [pixels(t) for t in images]
            return patch_layout(px, **c.layout_kwargs())

    # ------------------------------------------------------------------ planning (host side)
    def prepare(
        self, images: Images, layout: Optional[PatchLayout] = None, pad_to: int = 0, max_seqlen: Optional[int] = None
    ) -> PackedBatch:
        """Check the input, compute the layout if none is given, and plan the packed batch.

        Only shapes, dtypes and host integers are read; with a layout given nothing waits for the device.
        A layout on the CPU for images on CUDA is planned on the CPU and moved asynchronously.

        Args:
            images: (B, C, H, W) normalised as the model expects, or a list of (C, H, W) of any multiple-of-p sizes.
            layout: from ``patch_layout`` / ``make_layout`` (e.g. computed in data-loader workers).
            pad_to: pad the packed token count to a multiple of this (CUDA-graph buckets).
            max_seqlen: a static upper bound on the sequence length (CUDA-graph buckets).

        Returns:
            PackedBatch on the images' device.
        """
        groups = self._check_images(images)
        layout = self.make_layout(images) if layout is None else layout
        device = _device_of(images)
        _check_layout(layout, groups, self.patch_sizes, device)
        packed = plan_packed(layout, groups, self.num_prefix_tokens, self._pool_prefix, pad_to, max_seqlen)
        return packed if packed.device == device else packed.to(device, non_blocking=True)

    def planner(self):
        """A picklable ``plan(images, layout) -> PackedBatch`` with this model's settings, for data-loader workers.

        The workers then hand the model a finished plan (``apt(images, packed=...)``): the main process only
        moves it to the device (``packed.to(device, non_blocking=True)``).
        """
        import functools

        from ..core.packed import plan_for_images

        return functools.partial(plan_for_images, num_prefix=self.num_prefix_tokens, pool_prefix=self._pool_prefix)

    @property
    def _pool_prefix(self) -> bool:
        """Prefix tokens take part in average/max pooling (timm's ``pool_include_prefix``)."""
        return bool(self.pool_include_prefix and self.global_pool in ("avg", "max", "avgmax"))

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: Images, layout: Optional[PatchLayout] = None, packed: Optional[PackedBatch] = None
    ) -> torch.Tensor:
        """Logits (B, num_classes) for normalised images (B, C, H, W) or a list of (C, H, W).

        Args:
            layout: a precomputed layout (planned here), or
            packed: a precomputed plan (e.g. from the data-loader workers): nothing is planned here.
        """
        if packed is not None:
            return self.forward_packed(images, packed)
        return self.forward_packed(images, self.prepare(images, layout))

    def forward_packed(self, images: Images, packed: PackedBatch, pre_logits: bool = False) -> torch.Tensor:
        """Logits (B, num_classes) from a planned batch: static control flow, no host sync.

        Args:
            images: the images ``packed`` was planned for.
            packed: from ``prepare``.
            pre_logits: return the pooled features (B, D) before the classifier.
        """
        x, _ = self._run_packed(images, packed)
        return self.forward_head(self.norm(x), pre_logits=pre_logits, packed=packed)

    def forward_features(
        self, images: Images, layout: Optional[PatchLayout] = None
    ) -> Tuple[torch.Tensor, PatchLayout]:
        """Packed final tokens (T + B * P, D), per image [prefix tokens, patch tokens], and the layout.

        ``forward_head(x)`` then pools them (this call's plan is kept for it).
        """
        packed = self.prepare(images, layout)
        x, _ = self._run_packed(images, packed)
        self._last_packed = packed
        return self.norm(x), packed.layout

    def embed(self, images: Images, layout: PatchLayout) -> torch.Tensor:
        """Packed input tokens (T + B * P, D): patch embeddings plus positions, prefix tokens in front."""
        return self.embed_packed(images, self.prepare(images, layout))

    def _run(self, images: Images, layout: Optional[PatchLayout], take: Sequence[int] = (), stop: Optional[int] = None):
        """Plan, embed and run the blocks (up to block ``stop``): (x before the final norm, {i: x after block i}, plan)."""
        packed = self.prepare(images, layout)
        x, kept = self._run_packed(images, packed, take, stop)
        return x, kept, packed

    def _run_packed(self, images: Images, packed: PackedBatch, take: Sequence[int] = (), stop: Optional[int] = None):
        x = self.norm_pre(self.pos_drop(self.embed_packed(images, packed)))
        backend = self._backend(x)
        pad_index = pad_rows(packed.seq, packed.cu_seqlens, packed.max_seqlen) if backend == "pad" else None
        key_bias = packed.key_bias if self.config.area_bias else None  # area-proportional attention, every block
        kept: Dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            if stop is not None and i > stop:
                break
            x = self._block(blk, x, packed, backend, pad_index, key_bias)
            if i in take:
                kept[i] = x
        return x, kept

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False, packed: Optional[PackedBatch] = None
    ) -> torch.Tensor:
        """Pool like timm (average weighted by the base cells each token covers), fc_norm, head.

        Args:
            x: (N, D) packed final tokens, as ``forward_features`` returns them.
            pre_logits: return the pooled features (B, D) before the classifier (timm's keyword, timm's position).
            packed: the plan ``x`` was computed with; default: the last ``forward_features`` call's.
        """
        if isinstance(pre_logits, (PatchLayout, PackedBatch)):  # the 0.1 signature forward_head(x, layout)
            pre_logits, packed = False, (packed if isinstance(packed, PackedBatch) else None)
        packed = packed if packed is not None else getattr(self, "_last_packed", None)
        if packed is None:
            raise ValueError("forward_head needs the plan of its tokens: pass packed=, or call forward_features first")
        b, pool = packed.batch_size, self.global_pool
        if pool == "token":
            x = x.index_select(0, packed.prefix_pos[:, 0])
        elif pool in ("avg", "max", "avgmax"):
            rows = packed.num_seqs + 1  # one dump row for the tokens that are not pooled
            avg = mx = None
            if pool != "max":
                weighted = x * packed.pool_weight.to(x.dtype)[:, None]
                avg = x.new_zeros(rows, x.shape[1]).index_add_(0, packed.pool_seq, weighted)[:b]
            if pool != "avg":
                index = packed.pool_seq[:, None].expand_as(x)
                mx = x.new_full((rows, x.shape[1]), float("-inf")).scatter_reduce_(0, index, x, "amax")[:b]
            x = avg if pool == "avg" else mx if pool == "max" else 0.5 * (mx + avg)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    # ------------------------------------------------------------------ pieces
    def _check_images(self, images: Images):
        """Validate normalised model input (shapes and dtypes only: no device access) and return its size groups."""
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                hint = "; add a batch dimension with images.unsqueeze(0)" if images.dim() == 3 else ""
                raise ValueError(f"images must have 4 dimensions (B, C, H, W), got shape {tuple(images.shape)}{hint}")
            batch = [images]
        elif isinstance(images, (list, tuple)) and len(images) and all(isinstance(t, torch.Tensor) for t in images):
            bad = [i for i, t in enumerate(images) if t.dim() != 3]
            if bad:
                raise ValueError(
                    f"images[{bad[0]}] must be a (C, H, W) tensor, got shape {tuple(images[bad[0]].shape)}"
                )
            if len({(t.device, t.dtype) for t in images}) != 1:
                raise ValueError("images in a list must share one device and dtype")
            batch = [t[None] for t in images]
        else:
            raise TypeError(
                f"images must be a (B, C, H, W) tensor or a non-empty list of (C, H, W) tensors, got {type(images).__name__}"
            )
        p, in_chans = self.patch_size, self.patch_embed.proj.in_channels
        for t in batch:
            _, c, h, w = t.shape
            if t.shape[0] == 0:
                raise ValueError("images is an empty batch")
            if c != in_chans:
                raise ValueError(f"images have {c} channels but the model takes {in_chans}: shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"images must be floating point and normalised as the model expects, got {t.dtype}")
            if h % p or w % p or h == 0 or w == 0:
                raise ValueError(
                    f"image size {h}x{w} is not a multiple of the patch size {p}; "
                    f"pad with aptvit.pad_to_multiple(images, {p}) or resize"
                )
        return groups_of(images)

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
        grid_pos = pos[:, n_prefix:].reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
        return grid_pos, (pos[:, :n_prefix] if n_prefix else None)

    def embed_packed(self, images: Images, packed: PackedBatch) -> torch.Tensor:
        """Packed input tokens (N, D): patch embeddings plus positions, prefix tokens, padding.

        Two gathers from banks planned by ``core.packed``: token embeddings of every size (``apt.bank``) plus
        the prefix rows, and position embeddings of every size plus a zero row.
        """
        banks = []
        for idx, _ in packed.groups:
            batch = images if isinstance(images, torch.Tensor) else torch.stack([images[i] for i in idx])
            banks.append(self.apt.bank(batch, self.patch_embed.proj, self.patch_embed.norm))
        pos, prefix = self._position_rows(packed.groups)
        if prefix is not None:
            banks.append(prefix.to(banks[0].dtype))
        tokens = torch.cat(banks) if len(banks) > 1 else banks[0]
        tokens = tokens.index_select(0, packed.token_src)
        return tokens + pos.index_select(0, packed.pos_src) if pos is not None else tokens

    def _position_rows(self, groups) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The position bank of ``groups`` (with its final zero row) and the prefix rows (P, D) with their positions.

        Both depend on the weights and the image sizes only: outside autograd they are cached (keyed by the
        parameters' versions, so an optimizer step or a load refreshes them), saving ~20 ops per forward.
        """
        params = [
            t
            for t in (
                getattr(self, "pos_embed", None),
                getattr(self, "cls_token", None),
                getattr(self, "reg_token", None),
            )
            if t is not None
        ]
        cacheable = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in params)
        )
        if cacheable:
            key = (
                tuple(hw for _, hw in groups),
                torch.is_inference_mode_enabled(),
                *((id(t), 0 if t.is_inference() else t._version) for t in params),
            )
            cache = self.__dict__.setdefault("_position_cache", {})
            if key in cache:
                return cache[key]
        pos_banks, prefix_pos = [], None
        for _, (h, w) in groups:
            pos_grid, prefix_pos = self._pos_embed_grid((h // self.patch_size, w // self.patch_size))
            if pos_grid is not None:
                pos_banks.append(position_bank(pos_grid, self.patch_sizes))
        pos = torch.cat(pos_banks + [pos_banks[0].new_zeros(1, pos_banks[0].shape[1])]) if pos_banks else None
        prefix = [t for t in (getattr(self, "cls_token", None), getattr(self, "reg_token", None)) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, dim=1)[0]  # (P, D)
            prefix = prefix + prefix_pos[0] if prefix_pos is not None else prefix
        result = (pos, prefix if len(prefix) else None)
        if cacheable:
            cache.clear()  # one entry: the sizes of the current workload
            cache[key] = result
        return result

    def _backend(self, x: torch.Tensor) -> str:
        attn = self.blocks[0].attn if len(self.blocks) else None
        dropout = bool(attn is not None and self.training and attn.attn_drop.p > 0)
        # under autocast the matmuls run in the autocast dtype even though x may be float32
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # a backward will follow (only kernels that have one): the tokens need gradients, or the blocks do even when
        # the embedding is frozen; host-side checks of flags only
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.blocks.parameters()))
        return resolve_backend(self.attention, x.device, dtype, dropout, grad)

    def _block(
        self, blk: nn.Module, x: torch.Tensor, packed: PackedBatch, backend: str, pad_index, key_bias=None
    ) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._block_forward, blk, x, packed, backend, pad_index, key_bias, use_reentrant=False)
        return self._block_forward(blk, x, packed, backend, pad_index, key_bias)

    def _block_forward(
        self, blk: nn.Module, x: torch.Tensor, packed: PackedBatch, backend: str, pad_index, key_bias=None
    ) -> torch.Tensor:
        a = packed_self_attention(blk.attn, blk.norm1(x), packed, backend, pad_index, key_bias)
        x = x + drop_path_packed(blk.ls1(a), blk.drop_path1, packed.seq, packed.num_seqs, self.training)
        return x + drop_path_packed(
            blk.ls2(blk.mlp(blk.norm2(x))), blk.drop_path2, packed.seq, packed.num_seqs, self.training
        )


def _device_of(images: Images) -> torch.device:
    return images.device if isinstance(images, torch.Tensor) else images[0].device


def _check_layout(layout: PatchLayout, groups, patch_sizes: Tuple[int, ...], device: torch.device) -> None:
    """The layout fits the images (host facts only)."""
    if not isinstance(layout, PatchLayout):
        raise TypeError(f"layout must be a PatchLayout, got {type(layout).__name__}")
    n = sum(len(idx) for idx, _ in groups)
    if layout.batch_size != n:
        raise ValueError(f"layout is for {layout.batch_size} images but images holds {n}")
    for idx, hw in groups:
        for i in idx:
            if tuple(layout.image_sizes[i]) != tuple(hw):
                raise ValueError(
                    f"layout image {i} is {layout.image_sizes[i][0]}x{layout.image_sizes[i][1]} but the image is {hw[0]}x{hw[1]}"
                )
    if layout.patch_sizes[0] != patch_sizes[0] or not set(layout.patch_sizes) <= set(patch_sizes):
        raise ValueError(f"layout patch_sizes {layout.patch_sizes} do not fit this model's patch_sizes {patch_sizes}")
    if layout.device != device and layout.device.type != "cpu":
        raise ValueError(
            f"layout is on {layout.device} but images are on {device}; use layout.to(device) or a CPU layout"
        )


def model_flops(model: APTViT, layout: PatchLayout) -> Dict[str, torch.Tensor]:
    """FLOPs per image of the uniform ViT and of the APT model on ``layout``, counting what runs.

    The APT count includes the whole embedding bank (every size over its whole grid, see ``nn.embed``).

    Returns:
        {"uniform": (B,), "apt": (B,)} float64.
    """
    from ..core.flops import bank_flops, block_flops, patch_embed_flops

    p, prefix, dim = model.patch_size, model.num_prefix_tokens, model.embed_dim
    in_chans = model.patch_embed.proj.in_channels
    head = 2.0 * dim * model.num_classes
    cells = torch.tensor([h * w for h, w in layout.grid_sizes], dtype=torch.float64)
    embed = patch_embed_flops(cells, in_chans, p, dim)
    blocks = lambda n: sum(  # noqa: E731
        block_flops(
            n + prefix,
            sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, nn.Linear)),
            blk.attn.num_heads * blk.attn.head_dim,
        )
        for blk in model.blocks
    )
    bank = torch.tensor(
        [bank_flops(g, model.patch_sizes, in_chans, dim) for g in layout.grid_sizes], dtype=torch.float64
    )
    apt = embed + bank + blocks(layout.num_tokens.cpu().double()) + head
    return {"uniform": embed + blocks(cells) + head, "apt": apt}
