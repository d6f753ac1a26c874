"""``DataLoader(pin_memory=True)`` pins a custom batch only through its ``pin_memory()`` method: without one, the
loader returns the batch unpinned and every "non-blocking" copy to the GPU blocks."""

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as loader_pin

import aptvit
from aptvit.core.layout import PatchLayout
from aptvit.core.packed import PackedBatch
from aptvit.data import Batch
from aptvit.images import normalise

from .tiny import tiny_vit


def _batch():
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 6.0, 64: 5.0})
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean, std = apt.pixel_mean_std()
    x = normalise(images, mean, std)
    with torch.no_grad():
        layout = apt.make_layout(x)
        packed = apt.prepare(x, layout)
    return Batch(images, torch.tensor([1, 0]), layout, ["bad.jpg"], packed)


def _tensors(obj):
    """Every tensor of a batch, its layout and its plan."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (Batch, PackedBatch, PatchLayout)):
        return [t for v in vars(obj).values() for t in _tensors(v)]
    return []


def test_the_loader_pins_every_tensor_of_a_batch(monkeypatch):
    """What the loader's pinning thread does, with ``Tensor.pin_memory`` recorded (pinning itself needs CUDA)."""
    pinned = set()

    def fake_pin(t, *args, **kwargs):
        out = t.clone()
        pinned.add(id(out))
        return out

    batch = _batch()
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = loader_pin(batch)
    assert type(out) is Batch and type(out.packed) is PackedBatch and type(out.layout) is PatchLayout
    tensors = _tensors(out)
    assert len(tensors) == len(_tensors(batch)) >= 15 and all(id(t) in pinned for t in tensors)
    assert out.bad == ["bad.jpg"] and out.packed.offsets == batch.packed.offsets
    assert all(torch.equal(a, b) for a, b in zip(tensors, _tensors(batch)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning page-locked memory needs CUDA")
def test_pinned_batch_is_in_page_locked_memory():
    out = _batch().pin_memory()
    assert all(t.is_pinned() for t in _tensors(out))
