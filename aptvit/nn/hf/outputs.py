"""What a user of the Hugging Face class expects, from an APT model converted from it, in packed form.

HF returns (B, P + h*w, D) tensors: P prefix tokens (class, registers), then every patch of the grid. An APT model
has fewer, larger patches, so its hidden states are packed: ``PackedHidden`` holds the prefix tokens (B, P, D) and
the patch tokens (T, D) image by image in raster order, with the ``PatchLayout`` that says where each one is
(``layout.y``, ``layout.x``, ``layout.size``: its box in pixels; ``layout.cu_seqlens``: where each image starts).
``unpacked()`` puts it back into HF's shape (each merged token over the cells it covers): equal to HF's own
output when nothing merges.

``hf_outputs`` gives ``last_hidden_state``, ``pooler_output``, ``hidden_states`` and (CLIP with projection)
``image_embeds``; ``llava_features`` makes LLaVA's feature selection (``vision_feature_layer``,
``vision_feature_select_strategy``) on them, for a projector such as ``aptvit.nn.heads.BoxAwareProjector``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...core.io import InputError, UserTypeError
from ...core.layout import PatchLayout
from ...core.packed import PackedBatch
from ..dense import SMOOTH_DEFAULT, unmerge
from ..heads import prefix_first_order
from .convert import SPECS
from .twin import HFVisionTransformer


@dataclass(eq=False)
class PackedHidden:
    """One hidden state of a batch, packed: HF's (B, P + h*w, D) without the copies a merged patch would need.

    Attributes:
        prefix: (B, P, D) prefix tokens in HF's order (class token, then registers); (B, 0, D) for SigLIP.
        tokens: (T, D) patch tokens, image by image, each image in raster order of its patches' top-left corners.
        layout: where each of the T tokens is (its box in pixels) and which image it belongs to.
    """

    prefix: torch.Tensor
    tokens: torch.Tensor
    layout: PatchLayout

    def per_image(self) -> List[torch.Tensor]:
        """Image i's (P + N_i, D): its prefix tokens, then its patch tokens (HF's order, fewer patches)."""
        return [torch.cat([p, t]) for p, t in zip(self.prefix, self.tokens.split(list(self.layout.token_counts)))]

    def unpacked(self, smooth: bool = SMOOTH_DEFAULT) -> torch.Tensor:
        """(B, P + h*w, D), HF's shape (same-size images): every merged token over the base cells it covers."""
        grid = unmerge(self.tokens, self.layout, smooth)  # (B, D, h, w)
        return torch.cat([self.prefix, grid.flatten(2).transpose(1, 2)], dim=1)


@dataclass(eq=False)
class HFOutputs:
    """The HF class's outputs, packed (see ``PackedHidden``).

    Attributes:
        last_hidden_state: as HF defines it for the class (CLIP: before the final norm; the others: after it).
        pooler_output: (B, D') as HF's (None where the HF model has none).
        hidden_states: with ``output_hidden_states=True``, HF's L + 1 states: the embeddings (after CLIP's
            ``pre_layrnorm``), then every layer's output (before the final norm), else None.
        image_embeds: (B, projection_dim) for CLIP with projection, else None.
        layout, packed: the batch's layout and plan.
    """

    last_hidden_state: PackedHidden
    pooler_output: Optional[torch.Tensor]
    hidden_states: Optional[Tuple[PackedHidden, ...]]
    image_embeds: Optional[torch.Tensor]
    layout: PatchLayout
    packed: PackedBatch


def _source(apt: nn.Module):
    twin = getattr(apt, "timm_model", None)
    if not isinstance(twin, HFVisionTransformer):
        raise UserTypeError(
            f"this needs an APT model converted from a Hugging Face model (aptvit.convert(hf_model)), got one of "
            f"{type(twin).__name__}"
        )
    source = twin.hf_source
    spec = next(s for s in SPECS.values() if source["class"] in s.classes)
    return spec, source.get("options") or {}


def _packed(x: torch.Tensor, packed: PackedBatch) -> PackedHidden:
    return PackedHidden(x[packed.prefix_pos], x.index_select(0, packed.patch_pos), packed.layout)


def _embeddings(apt: nn.Module, images, packed: PackedBatch) -> torch.Tensor:
    """HF's ``hidden_states[0]``: the embeddings as the first block reads them (packed)."""
    return apt.norm_pre(apt.pos_drop(apt.embed_packed(images, packed)))


def hf_outputs(
    apt: nn.Module,
    images,
    layout: Optional[PatchLayout] = None,
    packed: Optional[PackedBatch] = None,
    output_hidden_states: bool = False,
) -> HFOutputs:
    """The outputs the HF model would return for ``images``, packed; one forward.

    Args:
        apt: an APT model converted from a Hugging Face model.
        images: normalised (B, C, H, W) (as the HF model takes ``pixel_values``) or a list of (C, H, W).
        layout / packed: a layout or a finished plan (else planned here, with the model's settings).
        output_hidden_states: also every layer's output (HF's ``output_hidden_states=True``).
    """
    spec, options = _source(apt)
    depth = len(apt.blocks)
    take = list(range(depth)) if output_hidden_states else []
    x, kept, packed = apt._run(images, layout, take, packed=packed)
    normed = apt.norm(x)
    pooled = apt.forward_head(normed, pre_logits=True, packed=packed)
    pooler, embeds = spec.pooler(options), spec.embeds(options)
    logits = apt.head(pooled) if "logits" in (pooler, embeds) or embeds else None  # ViT's pooler, CLIP's projection
    hidden = None
    if output_hidden_states:
        hidden = (_packed(_embeddings(apt, images, packed), packed), *(_packed(kept[i], packed) for i in take))
    return HFOutputs(
        last_hidden_state=_packed(normed if spec.last_normed else x, packed),
        pooler_output={"pre_logits": pooled, "logits": logits}.get(pooler),
        hidden_states=hidden,
        image_embeds=logits if embeds else None,
        layout=packed.layout,
        packed=packed,
    )


@dataclass(eq=False)
class VisualTokens:
    """Packed visual tokens for a multimodal LLM, image by image: ``num_prefix`` prefix tokens (LLaVA's "full"
    strategy keeps the class token), then the patch tokens in raster order; ``layout`` holds the patches' boxes.

    ``BoxAwareProjector()(v.tokens, v.layout, num_prefix=v.num_prefix)`` projects them (prefix tokens get the box of
    the whole image).
    """

    tokens: torch.Tensor  # (B * num_prefix + T, D * len(layers))
    layout: PatchLayout
    num_prefix: int

    def per_image(self) -> List[torch.Tensor]:
        counts = [n + self.num_prefix for n in self.layout.token_counts]
        return list(self.tokens.split(counts))


def llava_features(
    apt: nn.Module,
    images,
    vision_feature_layer: Union[int, Sequence[int]] = -2,
    vision_feature_select_strategy: str = "default",
    layout: Optional[PatchLayout] = None,
    packed: Optional[PackedBatch] = None,
) -> VisualTokens:
    """LLaVA's ``get_image_features`` selection on the packed hidden states (before its projector).

    Args:
        vision_feature_layer: an index into HF's ``hidden_states`` (L + 1 of them: 0 is the embeddings, -1 the last
            layer; LLaVA-1.5 takes -2), or a list of them, concatenated along the features as LLaVA does.
        vision_feature_select_strategy: "default" drops the class token (LLaVA's ``[:, 1:]``), "full" keeps it.
            Register tokens (DINOv2 with registers) are kept in both, as LLaVA's slice keeps them.
    """
    spec, _ = _source(apt)
    if vision_feature_select_strategy not in ("default", "full"):
        raise InputError(
            f"vision_feature_select_strategy must be 'default' or 'full', got {vision_feature_select_strategy!r}"
        )
    single = isinstance(vision_feature_layer, int) and not isinstance(vision_feature_layer, bool)
    layers = [vision_feature_layer] if single else list(vision_feature_layer)
    depth = len(apt.blocks)
    if not layers or any(
        isinstance(h, bool) or not isinstance(h, int) or not -(depth + 1) <= h <= depth for h in layers
    ):
        raise InputError(
            f"vision_feature_layer {vision_feature_layer!r}: indices into {depth + 1} hidden states expected"
        )
    states = [h % (depth + 1) for h in layers]  # HF's index: 0 = embeddings, i = after block i - 1
    blocks = sorted({h - 1 for h in states if h > 0})
    x, kept, packed = apt._run(images, layout, blocks, max(blocks) if blocks else 0, packed=packed)
    if 0 in states:  # the embeddings: HF's state 0, "block -1"
        kept[-1] = _embeddings(apt, images, packed)
    feats = torch.cat([kept[h - 1] for h in states], dim=-1)
    has_cls = bool(getattr(apt.timm_model, "cls_token", None) is not None)
    drop = 0
    if vision_feature_select_strategy == "default":
        if not has_cls:
            raise InputError(
                f"vision_feature_select_strategy='default' drops the class token, but {spec.name} has none (LLaVA's "
                "slice would drop a patch); use 'full'"
            )
        drop = 1
    prefix_rows = packed.prefix_pos[:, drop:]
    order = prefix_first_order(packed.layout, prefix_rows.shape[1])
    rows = torch.cat([prefix_rows.reshape(-1), packed.patch_pos])[order]
    return VisualTokens(feats.index_select(0, rows), packed.layout, int(prefix_rows.shape[1]))


@torch.no_grad()
def check_against_hf(hf: nn.Module, apt: nn.Module, images: torch.Tensor) -> Dict[str, float]:
    """Max error of every output relative to its scale, the APT model with nothing merged against HF's forward.

    Args:
        hf: the Hugging Face model ``apt`` was converted from.
        images: normalised (B, C, H, W).

    Returns:
        {"last_hidden_state", "pooler_output", "image_embeds", "hidden_states": max over them} (those HF has).
    """
    from ...core.quadtree import patch_layout

    spec, _ = _source(apt)
    sizes = apt.patch_sizes  # every size of the model, none merged (no score is below -1)
    uniform = patch_layout(images.new_zeros(images.shape), patch_sizes=sizes, thresholds={s: -1.0 for s in sizes[1:]})
    ours = hf_outputs(apt, images, layout=uniform, output_hidden_states=True)
    kwargs = {"output_hidden_states": True}
    if type(hf).__name__ not in ("Dinov2Model", "Dinov2WithRegistersModel"):
        kwargs["interpolate_pos_encoding"] = True  # any size, as HF's flag allows (a no-op at the native size)
    if type(hf).__name__ in ("CLIPModel", "SiglipModel"):
        theirs = hf.vision_model(pixel_values=images, **kwargs)
        if type(hf).__name__ == "CLIPModel":
            theirs["image_embeds"] = hf.visual_projection(theirs.pooler_output)
    else:
        theirs = hf(pixel_values=images, **kwargs)

    def err(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out = {"last_hidden_state": err(ours.last_hidden_state.unpacked(), theirs.last_hidden_state)}
    if getattr(theirs, "pooler_output", None) is not None:
        out["pooler_output"] = err(ours.pooler_output, theirs.pooler_output)
    if getattr(theirs, "image_embeds", None) is not None:
        out["image_embeds"] = err(ours.image_embeds, theirs.image_embeds)
    out["hidden_states"] = max(err(a.unpacked(), b) for a, b in zip(ours.hidden_states, theirs.hidden_states))
    if len(ours.hidden_states) != len(theirs.hidden_states):
        raise AssertionError(f"{len(ours.hidden_states)} hidden states, HF has {len(theirs.hidden_states)}")
    return out
