"""The trainable heads: segmentation decoder and MLLM projector (the pyramid is tested in test_dense.py)."""

import pytest
import torch

import aptvit
from aptvit.core.layout import from_boxes
from aptvit.nn.heads import BoxAwareProjector, SegmentationDecoder

from ..tiny import rel_err


def test_segmentation_decoder_logits_come_out_at_the_image_size():
    torch.manual_seed(0)
    grid = torch.randn(2, 32, 4, 6)
    assert SegmentationDecoder(32, 5, width=8)(grid).shape == (2, 5, 64, 96)  # (h * 16, w * 16)
    assert SegmentationDecoder(32, 5, width=8, patch_size=14)(grid).shape == (2, 5, 56, 84)
    assert SegmentationDecoder(32, 5, width=8)(grid, size=(50, 70)).shape == (2, 5, 50, 70)


def test_segmentation_decoder_fuses_every_level_at_the_finest_whatever_their_order():
    torch.manual_seed(0)
    grid = torch.randn(2, 16, 4, 4)
    fine_first = SegmentationDecoder(16, 3, width=8, scales=(4, 2, 1))
    coarse_first = SegmentationDecoder(16, 3, width=8, scales=(1, 2, 4))
    # the same weights, the levels listed in the other order
    state = {}
    for key, value in fine_first.state_dict().items():
        if key.startswith("pyramid.levels."):
            i, rest = key[len("pyramid.levels.") :].split(".", 1)
            key = f"pyramid.levels.{2 - int(i)}.{rest}"
        state[key] = value
    coarse_first.load_state_dict(state)
    out = fine_first(grid)
    assert rel_err(coarse_first(grid), out) <= 1e-5
    out.abs().sum().backward()
    for i, level in enumerate(fine_first.pyramid.levels):  # every level contributes to the logits
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in level.parameters()), f"level {i}"


def two_image_layout():
    """A 64x64 image of 16 base patches and a 32x64 image with one 32-px patch (at y=0, x=32) and four 16-px ones."""
    first = [(y, x, 16) for y in range(0, 64, 16) for x in range(0, 64, 16)]
    second = [(0, 0, 16), (0, 16, 16), (0, 32, 32), (16, 0, 16), (16, 16, 16)]
    y, x, size = (torch.tensor(v) for v in zip(*(first + second)))
    return from_boxes((16, 32), ((64, 64), (32, 64)), y, x, size, torch.tensor([0, 16, 21]))


def test_projector_gives_one_sequence_per_image():
    layout = two_image_layout()
    projector = BoxAwareProjector(8, llm_dim=12)
    out = projector(torch.randn(layout.total_tokens, 8), layout)
    assert [tuple(o.shape) for o in out] == [(16, 12), (5, 12)]


def test_projector_codes_each_token_box_normalised_by_its_own_image():
    layout = two_image_layout()
    torch.manual_seed(0)
    projector = BoxAwareProjector(8, llm_dim=12)
    tokens = torch.randn(layout.total_tokens, 8)
    # (centre y / H, centre x / W, side / H), by hand; the second image is 32 high and 64 wide
    boxes = [((y + 8) / 64, (x + 8) / 64, 16 / 64) for y in range(0, 64, 16) for x in range(0, 64, 16)]
    boxes += [(8 / 32, 8 / 64, 0.5), (8 / 32, 24 / 64, 0.5), (16 / 32, 48 / 64, 1.0)]
    boxes += [(24 / 32, 8 / 64, 0.5), (24 / 32, 24 / 64, 0.5)]
    with torch.no_grad():
        expected = projector.proj(tokens + projector.box(torch.tensor(boxes)))
        out = torch.cat(projector(tokens, layout))
    assert rel_err(out, expected) <= 1e-6


@pytest.mark.parametrize("name", ["SimpleFeaturePyramid", "SegmentationDecoder", "BoxAwareProjector"])
def test_heads_are_exported(name):
    from aptvit.nn import heads

    assert getattr(aptvit, name) is getattr(heads, name)
