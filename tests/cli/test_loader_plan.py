"""The data loader plans each batch in its workers: the main process only moves the plan to the device."""

import functools

import torch

import aptvit
from aptvit.data import LayoutDataset, ShardedSampler, build_transform, image_folder, make_loader
from aptvit.images import normalise

from ..tiny import tiny_vit
from .test_finetune import make_folder


def test_workers_plan_the_batch_and_the_model_uses_that_plan(tmp_path):
    data = make_folder(tmp_path / "data", train=4, val=1, size=64)
    apt = aptvit.convert(tiny_vit("qknorm_layerscale"), thresholds={32: 6.0, 64: 5.0}).eval()
    mean, std = apt.pixel_mean_std()

    layout_fn = functools.partial(aptvit.patch_layout, **apt.config.layout_kwargs())
    dataset = LayoutDataset(image_folder(data / "train").samples, build_transform(64, False, mean, std), layout_fn)
    loader = make_loader(
        dataset, ShardedSampler(len(dataset), shuffle=False), 4, workers=2, drop_last=False, plan=apt.planner
    )
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch.packed is not None and batch.packed.layout is not None
        images = normalise(batch.images, mean, std)
        with torch.no_grad():
            assert torch.equal(apt(images, packed=batch.packed), apt(images, layout=batch.layout))
        assert batch.packed.offsets == tuple(apt.prepare(images, batch.layout).offsets)
