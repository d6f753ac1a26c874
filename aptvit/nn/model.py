"""``APTViT``: a timm ViT run on packed, variable-length sequences of mixed-size patches.

The wrapper registers the timm model's own modules and parameters under their own names (so the
state dict keys stay timm's) and adds only ``adaptive_embed.*`` (the detail path of large patches, beside timm's
``patch_embed``). A forward has two halves:

* the plan (host side): ``apt.planner`` (``nn.planner.Planner``) checks shapes and dtypes, makes the layout if none
  is given, and plans a ``PackedBatch`` of every index whose shape depends on the data;
* ``forward_packed`` (device math, static control flow): timm's ``forward_features`` / ``forward_head``
  re-created on packed tokens, with no host sync, no data-dependent shape and no Python loop over images:

    bank of embeddings -> gather tokens + positions + prefix -> pos_drop -> norm_pre -> blocks -> norm -> pool -> head

``forward(images)`` is ``forward_packed(images, self.planner(images))``. Every linear layer runs on the packed (N, D)
tensor; attention goes through the backend object of ``self.attention`` (``nn.attention``).
With a layout of base-size patches only, the result equals timm's to float rounding.

What differs between model families (prefix tokens, positions, the block, the pooling and head, what a checkpoint
records) is asked of the model's family adapter (``self.family``, see ``nn.families``); this module knows none.
The model keeps no per-call state and no caches: every entry point takes ``layout=`` or a finished plan ``packed=``, and
``forward_features`` returns the plan with the tokens for ``forward_head``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.io import InputError, UserTypeError
from ..core.layout import PatchLayout
from ..core.packed import PackedBatch
from .attention import BACKENDS, Backend, as_dtype, check_backend, resolve_backend, skip_noop
from .config import APTConfig
from .dense import DenseMixin
from .embed import AdaptivePatchEmbed
from .families import BlockContext, drop_path_packed, family_of
from .planner import Images, Planner

__all__ = ["APTViT", "Features", "drop_path_packed", "model_flops"]


class Features(tuple):
    """What ``forward_features`` returns: the pair (tokens, layout) of aptvit 0.1, carrying the plan as well.

    ``tokens, layout = apt.forward_features(x)`` unpacks as before; ``apt.forward_head(features)`` pools with
    ``features.packed``, the plan the tokens were computed with (the model keeps no state between calls).

    Attributes:
        tokens: (N, D) packed final normalised tokens, per image [prefix tokens, patch tokens].
        layout: the batch's ``PatchLayout``.
        packed: the batch's ``PackedBatch``.
    """

    def __new__(cls, tokens: torch.Tensor, packed: PackedBatch) -> "Features":
        self = super().__new__(cls, (tokens, packed.layout))
        self.packed = packed
        return self

    def __reduce__(self):  # a tuple subclass pickles through __new__'s arguments: give it the plan
        return (Features, (self[0], self.packed))

    @property
    def tokens(self) -> torch.Tensor:
        return self[0]

    @property
    def layout(self) -> PatchLayout:
        return self[1]


class APTViT(DenseMixin, nn.Module):
    """A timm ViT that runs on adaptive patch layouts. Build it with ``aptvit.convert``.

    Args:
        vit: a timm model of a supported family (``aptvit.nn.families``); its modules and parameters are shared,
            not copied.
        config: conversion settings (saved with the weights); patch sizes None become the ViT's (p, 2p).
        attention: the attention backend, a runtime choice (not saved): "auto" or a name in
            ``nn.attention.BACKENDS``; change it with ``configure(attention=...)``.
    """

    def __init__(self, vit: nn.Module, config: APTConfig, attention: str = "auto") -> None:
        super().__init__()
        family = family_of(vit)  # raises a TypeError naming the class and why when it cannot convert
        if not isinstance(config, APTConfig):
            raise UserTypeError(f"config must be an APTConfig, got {type(config).__name__}")
        config = config.for_patch_size(vit.patch_embed.patch_size[0])
        sizes = config.patch_sizes
        if sizes[0] != vit.patch_embed.patch_size[0]:
            raise InputError(
                f"patch_sizes must start with the model's patch size {vit.patch_embed.patch_size[0]}, got {sizes}"
            )
        self.config = config
        self.attention = check_backend(attention)  # a runtime choice: not part of the saved settings
        self.family = family  # a stateless adapter shared by every model of its kind (not a module)
        object.__setattr__(self, "timm_model", vit)  # a handle for users; not a registered submodule
        for name, module in vit.named_children():
            self.add_module(name, module)
        for name, param in vit.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.num_prefix_tokens = family.num_prefix(vit)
        self.no_embed_class = vit.no_embed_class
        self.global_pool = vit.global_pool
        self.pool_include_prefix = getattr(vit, "pool_include_prefix", False)
        self.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
        self.grad_checkpointing = False
        self.embed_dim = vit.embed_dim
        self.num_classes = vit.num_classes
        ref = vit.patch_embed.proj.weight
        # beside timm's ``patch_embed``, whose projection and norm it reuses: the new parameters of the embedding
        self.adaptive_embed = AdaptivePatchEmbed(vit.embed_dim, sizes, device=ref.device, dtype=ref.dtype)
        self.training = vit.training  # a model converted in eval mode stays in eval mode
        self.adaptive_embed.train(vit.training)

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
            raise InputError(f"patch_sizes are fixed at conversion ({self.patch_sizes}); convert again to change them")
        config = self.config.replace(**changes) if changes else self.config
        self.attention = check_backend(attention) if attention is not None else self.attention
        self.config = config
        return self

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's ``reset_classifier`` on the wrapped model, re-registered here (a new label set)."""
        self.timm_model.reset_classifier(num_classes, global_pool)
        children = dict(self.timm_model.named_children())
        # what timm no longer has, e.g. an attention pool removed
        gone = [n for n in self._modules if n != "adaptive_embed" and n not in children]
        for name in gone:
            del self._modules[name]
        for name, module in children.items():  # the new heads (and a new attention pool), re-registered
            setattr(self, name, module)
        self.num_classes, self.global_pool = num_classes, self.timm_model.global_pool
        family_of(self.timm_model)

    def get_classifier(self):
        """timm's ``get_classifier``: the head (distilled models: the pair of heads)."""
        return self.timm_model.get_classifier()

    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's switch of distilled models: in training, return (class logits, distillation logits)."""
        if not hasattr(self.timm_model, "set_distilled_training"):
            raise InputError(f"{type(self.timm_model).__name__} has no distillation head")
        self.timm_model.set_distilled_training(enable)

    def group_matcher(self, coarse: bool = False) -> Dict:
        """timm's parameter groups (layer-wise LR decay, ``timm.optim``): the new ``adaptive_embed.*`` layers join the
        stem, since they are part of the embedding."""
        groups = dict(self.timm_model.group_matcher(coarse))
        groups["stem"] = groups["stem"] + r"|^adaptive_embed\."
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
            raise InputError(
                f"the patch size is fixed at conversion ({self.patch_size}); convert the model again to change it"
            )
        self.timm_model.set_input_size(img_size=img_size)
        if getattr(self.timm_model, "pos_embed", None) is not None:
            self.pos_embed = self.timm_model.pos_embed

    def no_weight_decay(self) -> set:
        """Parameters timm exempts from weight decay (used by timm's optimizer factory)."""
        return self.family.no_weight_decay()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def pixel_mean_std(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """The normalisation the ViT expects (its ``pretrained_cfg``; ImageNet's when absent)."""
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return tuple(self.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(
            self.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)
        )

    # ------------------------------------------------------------------ planning
    @property
    def planner(self) -> Planner:
        """The ``Planner`` of this model's current settings: ``planner(images, layout=None) -> PackedBatch``.

        A small frozen object made on each access from ``config`` and the model's prefix, pooling and normalisation
        facts (so it always follows ``configure``); it pickles, so data-loader workers plan with a copy of it.
        """
        mean, std = self.pixel_mean_std()
        return Planner(
            self.config,
            self.num_prefix_tokens,
            self.family.pool_prefix(self),
            self.patch_embed.proj.in_channels,
            tuple(mean),
            tuple(std),
        )

    def layout_settings(self) -> dict:
        """The ``patch_layout`` arguments of this model's settings (patch sizes, thresholds or budget, scorer and
        its parameters): ``aptvit.patch_layout(pixels, **apt.layout_settings())`` lays pixels out as the model does."""
        return self.config.layout_kwargs()

    def make_layout(self, images: Images, **overrides) -> PatchLayout:
        """The layout of normalised images (or uint8 pixels): ``planner.layout``.

        ``overrides`` replace this model's settings for one call (thresholds=, budget=, scorer=, scorer_args=).
        """
        return self.planner.layout(images, **overrides)

    def static_tokens(self, image_size: Tuple[int, int]) -> int:
        """k, the tokens per image of the static path (``config.static``) for (H, W) images, padding included."""
        return self.planner.static_tokens(image_size)

    def prepare(
        self, images: Images, layout: Optional[PatchLayout] = None, pad_to: int = 0, max_seqlen: Optional[int] = None
    ) -> PackedBatch:
        """The plan of a batch: ``planner(images, layout, pad_to=, max_seqlen=)`` (see ``Planner.__call__``)."""
        return self.planner(images, layout, pad_to=pad_to, max_seqlen=max_seqlen)

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: Images, layout: Optional[PatchLayout] = None, packed: Optional[PackedBatch] = None
    ) -> torch.Tensor:
        """Logits (B, num_classes) for normalised images (B, C, H, W) or a list of (C, H, W).

        Args:
            layout: a precomputed layout (planned here), or
            packed: a precomputed plan (e.g. from the data-loader workers): nothing is planned here.
        """
        return self.forward_packed(images, self._plan(images, layout, packed))

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
        self, images: Images, layout: Optional[PatchLayout] = None, packed: Optional[PackedBatch] = None
    ) -> Features:
        """Packed final tokens (N, D), per image [prefix tokens, patch tokens], with their layout and plan.

        Returns:
            ``Features``: unpacks as ``tokens, layout``; ``forward_head(features)`` pools it (``features.packed``).
        """
        packed = self._plan(images, layout, packed)
        x, _ = self._run_packed(images, packed)
        return Features(self.norm(x), packed)

    def embed(self, images: Images, layout: Optional[PatchLayout] = None, packed: Optional[PackedBatch] = None):
        """Packed input tokens (N, D): patch embeddings plus positions, prefix tokens in front."""
        return self.embed_packed(images, self._plan(images, layout, packed))

    def _plan(self, images: Images, layout: Optional[PatchLayout], packed: Optional[PackedBatch]) -> PackedBatch:
        """The given plan, or one made here (from ``layout`` when given)."""
        if packed is not None:
            if not isinstance(packed, PackedBatch):
                raise UserTypeError(f"packed must be a PackedBatch (from apt.prepare), got {type(packed).__name__}")
            if layout is not None and layout is not packed.layout:
                raise InputError("pass layout= or packed= (which holds its layout), not both")
            return packed
        return self.prepare(images, layout)

    def _run(
        self,
        images: Images,
        layout: Optional[PatchLayout],
        take: Sequence[int] = (),
        stop: Optional[int] = None,
        packed: Optional[PackedBatch] = None,
    ):
        """Plan (unless ``packed``), embed and run the blocks (up to block ``stop``): (x before the final norm,
        {i: x after block i}, plan)."""
        packed = self._plan(images, layout, packed)
        x, kept = self._run_packed(images, packed, take, stop)
        return x, kept, packed

    def _run_packed(self, images: Images, packed: PackedBatch, take: Sequence[int] = (), stop: Optional[int] = None):
        """timm's ``forward_features`` on the plan, before the final norm: (x (N, D), {i: x after block i in take}).

        embed (bank of every size, gathered, plus positions and prefix rows) -> pos_drop -> norm_pre ->
        the forward's shared context (attention backend's, family's tables) -> blocks (up to block ``stop``).
        """
        x = self.embed_packed(images, packed)
        x = skip_noop(self.norm_pre, skip_noop(self.pos_drop, x))
        ctx = self.block_context(x, packed)
        kept: Dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            if stop is not None and i > stop:
                break
            x = self._block(blk, x, ctx)
            if i in take:
                kept[i] = x
        return x, kept

    def block_context(self, x: torch.Tensor, packed: PackedBatch) -> BlockContext:
        """What every block of this forward shares, made once: the attention backend's context for the plan (with
        the area bias when ``config.area_bias``) and the family's per-token tables (e.g. RoPE)."""
        key_bias = packed.key_bias if self.config.area_bias else None  # area-proportional attention, every block
        attention = self.attention_backend(x, packed).context(packed, key_bias, self._compute_dtype(x))
        return BlockContext(packed, attention, self.family.token_tables(self, packed), self.training)

    def attention_backend(self, x: torch.Tensor, packed: Optional[PackedBatch] = None) -> Backend:
        """The backend object ``self.attention`` resolves to for tokens ``x`` of plan ``packed`` (device, dtype,
        dropout, whether a backward follows, whether the plan has host offsets)."""
        attn = self.family.attention_module(self.blocks[0]) if len(self.blocks) else None
        dropout = bool(attn is not None and self.training and attn.attn_drop.p > 0)
        # a backward will follow (only kernels that have one): the tokens need gradients, or the blocks do even when
        # the embedding is frozen; host-side checks of flags only
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.blocks.parameters()))
        host_offsets = packed is None or packed.offsets is not None  # a static plan's offsets live on the device
        name = resolve_backend(self.attention, x.device, self._compute_dtype(x), dropout, grad, host_offsets)
        return BACKENDS[name]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, packed: Optional[PackedBatch] = None) -> Any:
        """Pool like timm (an average weighs each token by the base cells it covers), fc_norm, head.

        Args:
            x: what ``forward_features`` returns (it carries its plan), or (N, D) packed final tokens with
            packed: the plan they were computed with.
            pre_logits: return the pooled features (B, D) before the classifier (timm's keyword, timm's position).

        Returns:
            (B, num_classes) logits (a distilled model in distilled training: the pair of logits, as timm).
        """
        if isinstance(x, Features):
            x, packed = x.tokens, (packed if packed is not None else x.packed)
        if not isinstance(packed, PackedBatch):
            raise InputError(
                "forward_head needs the plan of its tokens: pass what forward_features returned "
                "(forward_head(apt.forward_features(x))), or forward_head(tokens, packed=plan)"
            )
        return self.family.forward_head(self, x, packed, pre_logits)

    # ------------------------------------------------------------------ pieces
    def embed_packed(self, images: Images, packed: PackedBatch) -> torch.Tensor:
        """Packed input tokens (N, D): patch embeddings plus positions, prefix tokens, padding.

        Two gathers from banks planned by ``core.packed``: token embeddings of every size (``adaptive_embed.bank``)
        plus the prefix rows, and position embeddings of every size plus a zero row.
        """
        first = images if isinstance(images, torch.Tensor) else images[0]
        if not first.is_floating_point():
            raise UserTypeError(f"images must be floating point and normalised as the model expects, got {first.dtype}")
        banks = []
        for idx, _ in packed.groups:
            batch = images if isinstance(images, torch.Tensor) else torch.stack([images[i] for i in idx])
            banks.append(self.adaptive_embed.bank(batch, self.patch_embed.proj, self.patch_embed.norm))
        pos, prefix = self.family.positions(self, packed.groups)  # position bank (+ zero row), prefix rows
        if prefix is not None:
            banks.append(as_dtype(prefix, banks[0].dtype))
        tokens = torch.cat(banks) if len(banks) > 1 else banks[0]
        tokens = tokens.index_select(0, packed.token_src)
        return tokens + pos.index_select(0, packed.pos_src) if pos is not None else tokens

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The dtype the blocks' matmuls (and so q, k, v) run in: under autocast its dtype, even for float32 x."""
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def _block(self, blk: nn.Module, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._block_forward, blk, x, ctx, use_reentrant=False)
        return self._block_forward(blk, x, ctx)

    def _block_forward(self, blk: nn.Module, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """One block on packed tokens, as the family runs it."""
        return self.family.block(self, blk, x, ctx)


def model_flops(model: APTViT, layout: PatchLayout) -> Dict[str, torch.Tensor]:
    """FLOPs per image of the uniform ViT and of the APT model on ``layout``, counting what runs.

    The APT count includes the whole embedding bank (every size over its whole grid, see ``nn.embed``) and its
    detail path.

    Returns:
        {"uniform": (B,), "apt": (B,)} float64.
    """
    from ..core.flops import bank_flops, block_flops, patch_embed_flops

    p, prefix, dim = model.patch_size, model.num_prefix_tokens, model.embed_dim
    in_chans = model.patch_embed.proj.in_channels
    head = lambda n: model.family.head_flops(model, n)  # noqa: E731  (an attention pool reads every token)
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
    bank = torch.tensor([bank_flops(g, model.patch_sizes, in_chans, dim) for g in layout.grid_sizes], dtype=torch.float64)
    tokens = layout.num_tokens.cpu().double()
    return {"uniform": embed + blocks(cells) + head(cells), "apt": embed + bank + blocks(tokens) + head(tokens)}
