"""core.rope: every RoPE flavour's table equals timm's ``get_embed()`` on base-size patches, and a merged patch
is rotated at its fractional centre, evaluated with timm's own grid code."""

import math

import pytest
import torch
from timm.layers import pos_embed_sincos as ps

from aptvit.core.rope import (
    RopeGrid,
    axial_angles,
    dinov3_angles,
    grid_coords,
    mixed_angles,
    mrope_angles,
    patch_centres,
    sincos_table,
)

from ..tiny import rel_err


def base_centres(gh: int, gw: int, p: int = 16):
    """Centres and grids of every base cell of a gh x gw grid, raster order (timm's token order)."""
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    y, x = r.flatten() * p, c.flatten() * p
    centres = patch_centres(y, x, torch.full_like(y, p), p)
    return centres, torch.tensor([[gh, gw]] * (gh * gw), dtype=torch.float32)


def axial_table(centres, grids, grid, bands, rotate_half):
    return sincos_table(axial_angles(grid_coords(centres, grids, grid), bands), rotate_half)


def test_centre_of_a_merged_patch_is_fractional():
    # a 2x2-cell patch over cells (0..1, 0..1) sits at (0.5, 0.5); a 4x4 one from cell (4, 8) at (5.5, 9.5)
    c = patch_centres(torch.tensor([0, 64, 16]), torch.tensor([0, 128, 32]), torch.tensor([32, 64, 16]), 16)
    assert c.tolist() == [[0.5, 0.5], [5.5, 9.5], [1.0, 2.0]]


CAT_CASES = {
    "eva02 (ref grid)": dict(ref=(16, 16), offset=0.0, indexing="ij", rotate_half=False, temperature=10000.0),
    "pe (offset 1, xy, ref)": dict(ref=(24, 24), offset=1.0, indexing="xy", rotate_half=False, temperature=10000.0),
    "rope-vit axial (xy)": dict(ref=None, offset=0.0, indexing="xy", rotate_half=False, temperature=100.0),
    "half layout": dict(ref=None, offset=0.0, indexing="ij", rotate_half=True, temperature=10000.0),
}


@pytest.mark.parametrize("case", sorted(CAT_CASES))
@pytest.mark.parametrize("shape", [(3, 5), (4, 4)])
def test_axial_table_equals_timm(case, shape):
    k = CAT_CASES[case]
    rope = ps.RotaryEmbeddingCat(
        32,
        in_pixels=False,
        temperature=k["temperature"],
        feat_shape=list(shape),
        ref_feat_shape=k["ref"],
        grid_offset=k["offset"],
        grid_indexing=k["indexing"],
        rotate_half=k["rotate_half"],
    )
    grid = RopeGrid("index", k["offset"], k["ref"], k["indexing"])
    centres, grids = base_centres(*shape)
    ours = axial_table(centres, grids, grid, rope.bands, k["rotate_half"])
    theirs = rope.get_embed()
    assert ours.shape == theirs.shape and rel_err(ours, theirs) <= 1e-6


@pytest.mark.parametrize("normalize", ["separate", "min", "max"])
@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_dinov3_table_equals_timm(normalize, indexing):
    rope = ps.RotaryEmbeddingDinoV3(32, temperature=100.0, normalize_coords=normalize, grid_indexing=indexing).eval()
    centres, grids = base_centres(3, 6)
    grid = RopeGrid("centered", 0.0, None, indexing, normalize)
    ours = sincos_table(dinov3_angles(grid_coords(centres, grids, grid), rope.periods), rope.rotate_half)
    theirs = rope.get_embed((3, 6))
    assert ours.shape == theirs.shape and rel_err(ours, theirs) <= 1e-6


@pytest.mark.parametrize("indexing", ["xy", "ij"])
def test_mixed_table_equals_timm(indexing):
    torch.manual_seed(0)
    rope = ps.RotaryEmbeddingMixed(64, depth=3, num_heads=2, temperature=10.0, grid_indexing=indexing)
    centres, grids = base_centres(3, 5)
    grid = RopeGrid("index", 0.0, None, indexing)
    ours = sincos_table(mixed_angles(grid_coords(centres, grids, grid), rope.freqs), False)
    theirs = rope.get_embed((3, 5))
    assert ours.shape == theirs.shape == (3, 2, 15, 64) and rel_err(ours, theirs) <= 1e-6


def test_mixed_table_carries_the_gradient_of_the_learned_frequencies():
    rope = ps.RotaryEmbeddingMixed(64, depth=2, num_heads=2)
    centres, grids = base_centres(2, 2)
    ours = sincos_table(mixed_angles(grid_coords(centres, grids, RopeGrid(indexing="xy")), rope.freqs), False)
    ours.sum().backward()
    assert rope.freqs.grad is not None and rope.freqs.grad.abs().sum() > 0


def test_mrope_table_equals_timm():
    rope = ps.RotaryEmbeddingMRope(32, mrope_section=(4, 6, 6))
    centres, grids = base_centres(3, 4)
    coords = grid_coords(centres, grids, RopeGrid())
    ours = sincos_table(mrope_angles(coords, rope.inv_freq, rope.axis), True)
    theirs = rope.get_embed([3, 4])
    assert ours.shape == theirs.shape and rel_err(ours, theirs) <= 1e-6


# ---- a merged patch: the row timm would give a cell at the patch's fractional centre. timm's grids take a
# constant offset, so a centre r + f (f the fraction) is timm's row r of the grid shifted by offset + f.
MERGED = [(0, 0, 32), (32, 64, 64), (16, 48, 32)]  # (y, x, size) at base 16 on a 6 x 8 grid


def expected_centre(y, x, size, p=16):
    """The patch's centre in cell units, from pixels: its pixel centre, where cell i's centre (i + 0.5) p is i."""
    return (y + size / 2) / p - 0.5, (x + size / 2) / p - 0.5


@pytest.mark.parametrize("y,x,size", MERGED)
def test_merged_patch_axial_rotation_is_timms_at_its_centre(y, x, size):
    p, shape, ref, offset = 16, (6, 8), (16, 16), 1.0
    centre = patch_centres(torch.tensor([y]), torch.tensor([x]), torch.tensor([size]), p)
    cy, cx = expected_centre(y, x, size, p)
    row, col, frac = int(cy), int(cx), cy - int(cy)
    assert frac == cx - col and frac > 0  # square patches: the same fraction on both axes
    grid = RopeGrid("index", offset, ref, "xy")
    bands = ps.freq_bands(8, temperature=10000.0, step=1)
    ours = axial_table(centre, torch.tensor([list(shape)], dtype=torch.float32), grid, bands, False)
    sin, cos = ps.build_rotary_pos_embed(
        list(shape), bands, in_pixels=False, ref_feat_shape=list(ref), grid_offset=offset + frac, grid_indexing="xy"
    )
    theirs = torch.cat([sin, cos], -1)[row * shape[1] + col]
    assert rel_err(ours[0], theirs) <= 1e-6
    # and not the rotation of its top-left cell (the reference code's choice), nor of any base cell
    corner = torch.cat(
        ps.build_rotary_pos_embed(
            list(shape), bands, in_pixels=False, ref_feat_shape=list(ref), grid_offset=offset, grid_indexing="xy"
        ),
        -1,
    )
    assert (corner - ours).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("y,x,size", MERGED)
def test_merged_patch_dinov3_rotation_is_timms_at_its_centre(y, x, size):
    p, shape = 16, (6, 8)
    rope = ps.RotaryEmbeddingDinoV3(32, temperature=100.0).eval()
    centre = patch_centres(torch.tensor([y]), torch.tensor([x]), torch.tensor([size]), p)
    cy, cx = expected_centre(y, x, size, p)
    row, col, frac = int(cy), int(cx), cy - int(cy)
    grid = RopeGrid("centered")
    ours = sincos_table(
        dinov3_angles(grid_coords(centre, torch.tensor([list(shape)], dtype=torch.float32), grid), rope.periods), True
    )
    shifted = ps.RotaryEmbeddingDinoV3(32, temperature=100.0, grid_offset=frac).eval()
    theirs = shifted.get_embed(shape)[row * shape[1] + col]
    assert rel_err(ours[0], theirs) <= 1e-6


@pytest.mark.parametrize("y,x,size", MERGED)
def test_merged_patch_mixed_rotation_is_timms_at_its_centre(y, x, size):
    torch.manual_seed(0)
    rope = ps.RotaryEmbeddingMixed(64, depth=2, num_heads=2, grid_indexing="xy")
    centre = patch_centres(torch.tensor([y]), torch.tensor([x]), torch.tensor([size]), 16)
    ours = sincos_table(
        mixed_angles(grid_coords(centre, torch.tensor([[6.0, 8.0]]), RopeGrid(indexing="xy")), rope.freqs), False
    )
    # timm's own mixed-frequency function at the fractional (x, y) of the centre
    cy, cx = expected_centre(y, x, size)
    theirs = ps.get_mixed_freqs(rope.freqs, torch.tensor([cx]), torch.tensor([cy]))
    assert rel_err(ours, theirs) <= 1e-6


def test_grid_settings_are_checked():
    with pytest.raises(ValueError, match="kind"):
        RopeGrid("pixel")
    with pytest.raises(ValueError, match="ref"):
        RopeGrid("centered", ref=(16, 16))
    with pytest.raises(ValueError, match="indexing"):
        RopeGrid(indexing="yx")
    assert math.isclose(
        float(grid_coords(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 2.0]]), RopeGrid("centered"))[0, 0]), -0.5
    )
