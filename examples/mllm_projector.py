"""Plugging an APT encoder into a LLaVA-style projector: fewer visual tokens, each with its box.

    python examples/mllm_projector.py [--smoke]

LLaVA-1.5 takes the penultimate layer of its CLIP ViT (patch tokens, no class token), projects every
token into the language model's embedding space and splices them into the prompt. With APT:

    tokens, layout = apt.encode_tokens(images, layer=-2)   # (T, D) packed, T < B * (H/p) * (W/p)
    per_image = tokens.split(layout.num_tokens.tolist())   # image i's tokens, raster order

A large token stands for several base cells, so the projector gets its position too: here a small
learned code of the token's normalised centre and size is added before the projection. No language
model is needed to run this; the "LLM" below is only an embedding width. ``--smoke``: 112-px photos, 2 blocks.
"""

import argparse

import timm
import torch

import aptvit
from aptvit.nn.heads import BoxAwareProjector


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: 112-px photos, 2 blocks (the test suite's)")
    args = parser.parse_args(argv)
    size, depth = (112, 2) if args.smoke else (336, 4)
    torch.manual_seed(0)
    # LLaVA-1.5 uses CLIP ViT-L/14 at 336; a small CLIP-style ViT keeps this example fast.
    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=depth, dynamic_img_size=True).eval()
    apt = aptvit.convert(vit, budget=0.5)  # at most half the visual tokens per image
    projector = BoxAwareProjector(vit.embed_dim, llm_dim=1024)

    from aptvit.photos import load_photo

    pixels = torch.stack([load_photo(n, size) for n in ("astronaut", "coffee")]).float() / 255
    mean, std = apt.pixel_mean_std()
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens, layout = apt.encode_tokens(images, layer=-2)
        visual = projector(tokens, layout)
    base = (size // 16) ** 2
    for i, v in enumerate(visual):
        print(f"image {i}: {v.shape[0]} visual tokens instead of {base} -> LLM embeddings {tuple(v.shape)}")


if __name__ == "__main__":
    main()
