"""Calibrate the default thresholds of the Laplacian and upsampling-error scorers against entropy.

For each scale factor k, the threshold of scorer X is the quantile of X's scores (pooled over the
scikit-image photos at 224, 384 and 448) that lets the same fraction of k-size patches pass as
entropy's default threshold does. Prints the table to put in the ``register_scorer`` calls of ``aptvit/core/scoring.py``.

    python benchmarks/calibrate_thresholds.py [--smoke]

``--smoke``: two photos at 64, in seconds (what the test suite runs).
"""

import argparse

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F

from aptvit.core.pixels import grayscale_255
from aptvit.core.scoring import SCORERS

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "retina"]


def load(name, size):
    img = getattr(skimage.data, name)()
    img = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: two photos at 128")
    args = parser.parse_args(argv)
    photos, sizes = (PHOTOS[:2], (128,)) if args.smoke else (PHOTOS, (224, 384, 448))
    base = 16
    pooled = {name: {k: [] for k in (2, 4, 8)} for name in SCORERS}
    for photo in photos:
        for size in sizes:
            gray = grayscale_255(load(photo, size))
            for name, spec in SCORERS.items():
                scores = spec.fn(gray, [base * k for k in (2, 4, 8)], base)
                for k in (2, 4, 8):
                    pooled[name][k].append(scores[base * k].flatten())
    ent = SCORERS["entropy"].thresholds
    for k in (2, 4, 8):
        e = torch.cat(pooled["entropy"][k])
        frac = (e < ent[k]).float().mean().item()
        row = [f"k={k}: entropy < {ent[k]} passes {frac:.1%}"]
        for name in ("laplacian", "upsample"):
            q = torch.quantile(torch.cat(pooled[name][k]).double(), frac).item()
            row.append(f"{name} {q:.3g}")
        print("; ".join(row))


if __name__ == "__main__":
    main()
