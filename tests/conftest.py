"""Shared test helpers: real photos from scikit-image, small images, hypothesis profile."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

settings.register_profile("aptvit", deadline=None, max_examples=int(os.environ.get("APTVIT_EXAMPLES", "25")))
settings.load_profile("aptvit")
torch.set_num_threads(1)  # pytest -n 2 runs two workers on two cores


def photo(name: str, size=(224, 224)) -> torch.Tensor:
    """A scikit-image photo as (1, 3, H, W) uint8, area-resized to ``size``."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    x = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="area")
    return x.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture
def photos():
    return photo
