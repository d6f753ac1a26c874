import math

import pytest
import torch

from aptvit.core.pixels import check_images, grayscale_255, pad_to_multiple


@pytest.mark.parametrize(
    "images, kind, message",
    [
        (torch.zeros(3, 8, 8), ValueError, "4 dimensions"),
        (torch.zeros(1, 2, 8, 8), ValueError, "1 or 3 channels"),
        (torch.zeros(0, 3, 8, 8), ValueError, "empty batch"),
        (torch.full((1, 3, 8, 8), math.nan), ValueError, "NaN"),
        (torch.full((1, 3, 8, 8), 1.5), ValueError, "must be in \\[0, 1\\]"),
        (torch.full((1, 3, 8, 8), -0.1), ValueError, "must be in \\[0, 1\\]"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int32), TypeError, "uint8"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_get_one_clear_error(images, kind, message):
    with pytest.raises(kind, match=message):
        check_images(images)


def test_grayscale_weights_and_single_channel():
    rgb = torch.tensor([[[[255]], [[0]], [[0]]]], dtype=torch.uint8)
    assert grayscale_255(rgb).item() == pytest.approx(0.2989 * 255, rel=1e-6)
    one = torch.tensor([[[[17]]]], dtype=torch.uint8)
    assert grayscale_255(one).item() == 17.0


@pytest.mark.parametrize("channel, weight", [(0, 0.2989), (1, 0.5870), (2, 0.1140)])  # the APT reference's BT.601 luma
def test_grayscale_weight_of_every_channel(channel, weight):
    pure = torch.zeros(1, 3, 1, 1, dtype=torch.uint8)
    pure[0, channel] = 200
    assert grayscale_255(pure).item() == pytest.approx(weight * 200, rel=1e-6)
    assert grayscale_255(pure.float() / 255).item() == pytest.approx(weight * 200, rel=1e-6)


def test_grayscale_of_a_mixed_colour_uses_all_three_weights():
    rgb = torch.tensor([10, 100, 250], dtype=torch.uint8).view(1, 3, 1, 1)
    assert grayscale_255(rgb).item() == pytest.approx(0.2989 * 10 + 0.5870 * 100 + 0.1140 * 250, rel=1e-6)
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert grayscale_255(white).item() == pytest.approx(255 * (0.2989 + 0.5870 + 0.1140), rel=1e-6)


def test_grayscale_uint8_equals_float_over_255():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 16, 24), generator=g, dtype=torch.uint8)
    assert torch.equal(grayscale_255(u8), grayscale_255(u8.float() / 255))
    assert torch.equal(grayscale_255(u8), grayscale_255(u8.double() / 255))


def test_pad_to_multiple_pads_bottom_right_only():
    x = torch.ones(1, 3, 30, 17, dtype=torch.uint8)
    y = pad_to_multiple(x, 16)
    assert y.shape == (1, 3, 32, 32) and y.dtype == torch.uint8
    assert torch.equal(y[..., :30, :17], x) and y[..., 30:, :].sum() == 0 and y[..., :, 17:].sum() == 0
    assert pad_to_multiple(y, 16) is y
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(x, 0)


@pytest.mark.parametrize("dtype, syncs", [(torch.uint8, 0), (torch.float32, 1), (torch.float16, 1)])
def test_check_images_costs_at_most_one_sync(monkeypatch, dtype, syncs):
    from .test_layout_sync import run_counted

    images = torch.zeros(16, 3, 32, 32, dtype=dtype)
    _, ops, reads = run_counted(monkeypatch, lambda: check_images(images))
    assert reads + len(ops.data_dependent) == syncs, (reads, ops.data_dependent)
    bad = images.clone()
    if dtype != torch.uint8:
        bad[7, 2, 31, 31] = math.nan
        with pytest.raises(ValueError, match="NaN or inf"):
            check_images(bad)
        bad[7, 2, 31, 31] = -math.inf
        with pytest.raises(ValueError, match="NaN or inf"):
            check_images(bad)


def test_one_validator_gives_the_same_error_to_the_model_the_layout_and_the_plan():
    """``size_groups`` is the one check of a batch's structure: ``patch_layout``, ``core.packed.groups_of`` and the
    model refuse a malformed batch with the same message."""
    import aptvit
    from aptvit.core.packed import groups_of
    from aptvit.core.pixels import size_groups

    from ..tiny import tiny_vit

    apt = aptvit.convert(tiny_vit("vit_cls"))
    bad = [torch.rand(3, 32, 32), torch.rand(32, 32)]  # the second lacks its channel dimension
    for batch in (torch.rand(3, 32, 32), [], bad):
        with pytest.raises((ValueError, TypeError)) as want:
            size_groups(batch)
        for call in (lambda b: aptvit.patch_layout(b, patch_sizes=(16, 32)), groups_of, apt):
            with pytest.raises(type(want.value)) as got:
                call(batch)
            assert str(got.value) == str(want.value)
    assert size_groups([torch.rand(3, 32, 32), torch.rand(3, 64, 32), torch.rand(3, 32, 32)]) == [[0, 2], [1]]
