"""A Hugging Face CLIP tower (as LLaVA loads it) converted to APT, feeding a LLaVA-style projector.

    pip install 'aptvit[hf]'
    python examples/hf_llava_projector.py [--smoke]

LLaVA-1.5 runs ``transformers.CLIPVisionModel`` (CLIP ViT-L/14 at 336 px), takes ``hidden_states[-2]``
(``vision_feature_layer=-2``) without the class token (``vision_feature_select_strategy="default"``) and projects
every one of the 576 patch tokens into the language model. Converted to APT:

    apt = aptvit.convert(hf_clip, budget=0.5, image_processor=processor)  # HF weights on timm's ViT, checked
    images = processor(images=photos, return_tensors="pt")["pixel_values"]  # the tower's own pixels
    v = llava_features(apt, images, vision_feature_layer=-2)   # packed tokens + their (y, x, size) boxes
    per_image = BoxAwareProjector(1024, 4096)(v.tokens, v.layout, num_prefix=v.num_prefix)

There is no hub here, so the tower has random weights (``CLIPVisionModel.from_pretrained(...)`` is the same code
path). With nothing merged the APT model computes HF's own outputs; this checks that first. ``--smoke``: 2 layers
of CLIP-B/16 width at 224 px.
"""

import argparse

import torch

import aptvit
from aptvit.nn.heads import BoxAwareProjector
from aptvit.nn.hf import check_against_hf, llava_features


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: CLIP-B/16 width, 2 layers, 224 px")
    args = parser.parse_args(argv)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    if args.smoke:
        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=16,
                               image_size=224, num_hidden_layers=2)  # fmt: skip
    else:  # openai/clip-vit-large-patch14-336, LLaVA-1.5's tower (random weights, 24 layers)
        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, patch_size=14,
                               image_size=336, num_hidden_layers=24, projection_dim=768)  # fmt: skip
    hf = CLIPVisionModel(cfg).eval()
    size = cfg.image_size
    # the checkpoint's processor (CLIPImageProcessor.from_pretrained(...) with a hub): shorter side to 336, center crop
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # at most half the visual tokens per image; aptvit's eval / calibrate / finetune read images as the processor does
    apt = aptvit.convert(hf, budget=0.5, image_processor=processor)
    c = apt.pretrained_cfg
    print(f"preprocessing from the processor: {c['interpolation']}, {c['crop_mode']} crop {c['crop_pct']:g}, "
          f"{c['input_size'][-1]} px")  # fmt: skip

    from aptvit.photos import load_photo

    photos = [load_photo(n).permute(1, 2, 0).numpy() for n in ("astronaut", "coffee")]  # (H, W, 3) uint8
    images = processor(images=photos, return_tensors="pt")["pixel_values"]  # normalised as the tower expects

    errors = check_against_hf(hf, apt, images)  # nothing merged: HF's forward, every output
    print("nothing merged, max error relative to HF: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))

    projector = BoxAwareProjector(cfg.hidden_size, llm_dim=1024)  # LLaVA's MLP + a code of each token's box
    with torch.inference_mode():
        v = llava_features(apt, images, vision_feature_layer=-2, vision_feature_select_strategy="default")
        visual = projector(v.tokens, v.layout, num_prefix=v.num_prefix)
    base = (size // cfg.patch_size) ** 2
    for i, seq in enumerate(visual):
        sizes = v.layout.size[v.layout.image_index == i]
        mix = ", ".join(f"{int((sizes == s).sum())} of {s} px" for s in apt.patch_sizes)
        print(f"image {i}: {seq.shape[0]} visual tokens instead of {base} ({mix}) -> LLM embeddings {tuple(seq.shape)}")


if __name__ == "__main__":
    main()
