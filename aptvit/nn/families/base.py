"""The family interface: everything ``APTViT`` needs to know about one kind of timm model, in one place.

``APTViT`` (``nn.model``), the plan (``core.packed``), the attention backends (``nn.attention``) and the CLI know
no family: they ask the model's ``Family`` (found once, at conversion, by ``families.family_of``). A family
answers, for its own timm class only:

* **which models it takes** (``accepts`` / ``check``: one clear reason when it cannot convert one);
* **its prefix tokens** (``prefix_tokens``: the (P, D) rows in front of every image, e.g. class, distillation and
  register tokens) and whether they are pooled (``pool_prefix``);
* **positions of a patch of any size**:
    - an absolute table: ``positions`` returns the position bank of the image sizes (every patch size over the
      whole grid, a merged patch taking the mean of its cells' entries; ``nn.embed.position_bank``) and the
      prefix rows with their own positions; the model caches both between forwards (``position_params`` name the
      tensors they are made of);
    - rotary positions (RoPE): ``token_tables`` returns, once per forward, whatever per-token tables the family's
      attention needs, e.g. (N, head_dim) sin / cos of every packed row. They are built from the plan only
      (``core.rope.layout_centres(packed.layout)``: each patch's centre in base-grid units, fractional for merged
      patches; prefix and padding rows get the family's own treatment, e.g. no rotation), with shape-static ops: no
      host sync, no data-dependent shape, so ``forward_packed`` stays capturable. Learned frequencies keep their gradients because
      the tables are made inside the forward; the coordinates come from the host plan.
    - both (EVA-02, PE): ``positions`` for the table and ``token_tables`` for the rotation;
* **how one block runs on packed tokens** (``block(apt, blk, x, ctx)``): the block's own layers on the (N, D)
  tensor, its attention through ``nn.attention.packed_self_attention`` (timm ``Attention``) or the family's own
  projection code followed by ``varlen_attention``. A RoPE family rotates q and k there, after their norms and
  before the kernel, with ``ctx.tables`` (``packed_self_attention(..., rotate=fn)`` takes a ``fn(q, k) -> (q, k)``
  on (N, H, hd) tensors), so every backend sees rotated q / k and nothing else changes;
* **how it pools and classifies** (``forward_head(apt, x, packed, pre_logits)``): class token, area-weighted
  mean / max (``families.pool.pool_tokens``), an attention pool (``families.pool.attention_pool``), two heads;
* **what a checkpoint records** (``timm_args``: the ``timm.create_model`` arguments that re-create the structure,
  allowed keys ``TIMM_ARGS``; ``max_position_prefix``: how many prefix entries a position table may hold);
* **its tiny test models** (``tiny``: {name: (timm model name, create_model arguments)}, depth 2, small widths)
  and its row of README's supported-models table (``readme_row``).

A new family is one module with a ``Family`` subclass, registered in ``families/__init__.py``, plus its tests.
Families hold no state: one instance serves every model of its kind (methods take the ``APTViT`` as ``apt``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ...core.packed import PackedBatch
from ..attention import AttentionContext, skip_noop


@dataclass(frozen=True)
class BlockContext:
    """What every block of one forward shares: made once per forward by ``APTViT.block_context``.

    Attributes:
        packed: the batch's plan.
        attention: the attention backend's context of this forward (``Backend.context``): pass it to
            ``packed_self_attention`` or ``attention.backend.attend``; it holds the key bias (``key_bias``).
        tables: the family's per-token tables of this forward (``Family.token_tables``; None when it has none).
        training: the model's mode (stochastic depth, dropouts).
    """

    packed: PackedBatch
    attention: AttentionContext
    tables: Any
    training: bool

    @property
    def key_bias(self) -> Optional[torch.Tensor]:
        """(N,) log-area key bias of every packed row when the model's ``area_bias`` is on, else None."""
        return self.attention.key_bias


def check_patch_embed(model: nn.Module) -> Optional[str]:
    """Why ``model``'s patch embedding cannot be converted (None when it can): timm's conv ``PatchEmbed`` with
    square, non-overlapping patches, which every adapter's embedding bank assumes."""
    from timm.layers import PatchEmbed

    if type(model.patch_embed) is not PatchEmbed or not isinstance(model.patch_embed.proj, nn.Conv2d):
        return f"patch embedding {type(model.patch_embed).__name__} is not timm's conv PatchEmbed"
    ph, pw = model.patch_embed.patch_size
    if ph != pw or tuple(model.patch_embed.proj.stride) != (ph, pw):
        return f"patches must be square and non-overlapping, got patch_size {(ph, pw)}"
    return None


def mlp_ratio_of(hidden: int, dim: int) -> float:
    """The ``mlp_ratio`` for which timm builds ``hidden`` features from width ``dim`` (``int(dim * mlp_ratio)``).

    ``hidden / dim`` is not always it: the quotient may round down, and then ``int(dim * ratio)`` is ``hidden - 1``
    (e.g. 115 / 56); the next float up is (one step is always enough for widths of practical size).
    """
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


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


@functools.lru_cache(maxsize=None)
def _timm_mlp() -> type:
    from timm.layers import Mlp  # timm is imported lazily here, once

    return Mlp


def mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)``; for timm's plain ``Mlp`` its own layers in its own order, without calling dropouts that do nothing
    (eval mode or p = 0: each would still dispatch an op, host time at batch 1; ``attention.skip_noop``)."""
    if type(mlp) is not _timm_mlp():
        return mlp(x)
    x = skip_noop(mlp.drop1, mlp.act(mlp.fc1(x)))
    return skip_noop(mlp.drop2, mlp.fc2(skip_noop(mlp.norm, x)))


class Family:
    """One kind of timm model (see the module docstring for the contract). Subclass it; override what differs."""

    name: str = ""
    timm_classes: Tuple[str, ...] = ()  # class names, for messages and README
    timm_modules: Tuple[str, ...] = ()  # modules whose entry points build this family (``models.check_vit_name``)
    TIMM_ARGS: Tuple[str, ...] = ()  # create_model arguments a checkpoint of this family may carry
    tiny: Dict[str, Tuple[str, dict]] = {}
    readme: Dict[str, str] = {}  # README table: "models", "prefix", "positions", "pooling"

    # ---- which models
    def accepts(self, model: nn.Module) -> bool:
        """Whether ``model`` is of this family's class (exactly: subclasses change the forward)."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> Optional[str]:
        """Why ``model`` (accepted by class) cannot be converted, or None when it can."""
        return None

    # ---- prefix tokens and positions
    def num_prefix(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def pool_prefix(self, apt) -> bool:
        """Whether the prefix tokens take part in pooling (they then get pooling weight in the plan)."""
        return False

    def position_params(self, apt) -> Sequence[torch.Tensor]:
        """The tensors ``positions`` is made of (the cache key watches their versions)."""
        return ()

    def positions(self, apt, groups) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(position bank (rows + 1, D) with a final zero row, or None; prefix rows (P, D) with positions, or None)."""
        return None, None

    def token_tables(self, apt, packed: PackedBatch) -> Any:
        """Per-token tables of one forward (RoPE sin / cos, ...), from the plan with shape-static ops; None: none."""
        return None

    # ---- blocks and head
    def block(self, apt, blk: nn.Module, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        raise NotImplementedError

    def attention_module(self, blk: nn.Module) -> Optional[nn.Module]:
        """The block's attention (its dropout rate picks the backend)."""
        return getattr(blk, "attn", None)

    def forward_head(self, apt, x: torch.Tensor, packed: PackedBatch, pre_logits: bool = False):
        raise NotImplementedError

    def classifiers(self, apt) -> Tuple[nn.Module, ...]:
        """The classifier layers (timm's ``get_classifier``; FLOP counts)."""
        return (apt.head,)

    def head_flops(self, apt, tokens: torch.Tensor) -> torch.Tensor:
        """FLOPs of pooling and classifying images of ``tokens`` (B,) patch tokens (the classifiers' matmuls)."""
        linear = sum(2.0 * m.in_features * m.out_features for m in self.classifiers(apt) if isinstance(m, nn.Linear))
        return torch.full_like(tokens, linear, dtype=torch.float64)

    def no_weight_decay(self) -> set:
        return set()

    # ---- checkpoints
    def timm_args(self, model: nn.Module) -> Dict:
        """``timm.create_model`` arguments that re-create ``model``'s structure (keys in ``TIMM_ARGS``)."""
        return {}

    def max_position_prefix(self, args: Dict) -> int:
        """The most prefix entries a checkpoint's position table may hold, given its ``timm_args``."""
        return 0

    # ---- README
    def readme_row(self) -> Tuple[str, ...]:
        r = self.readme
        return (
            r.get("models", ""),
            ", ".join(self.timm_classes),
            r.get("prefix", ""),
            r.get("positions", ""),
            r.get("pooling", ""),
        )
