"""The real-weights fidelity rows through ``transformers.Dinov2Model`` equal those through the timm port: the cheap
version (a random 2-layer DINOv2 with a 518-px position grid, used at 112 px as the real one is at 224) of the
check ``examples/hf_dinov2_real.py --rows`` runs on the real weights."""

import pytest
import torch

pytest.importorskip("transformers")
import timm  # noqa: E402
from transformers import Dinov2Config, Dinov2Model  # noqa: E402

from aptvit.nn.hf import to_timm  # noqa: E402
from benchmarks import real_fidelity as rf  # noqa: E402
from benchmarks.real_weights import SaliencyDecoder, resample_positions  # noqa: E402


def test_fidelity_rows_same_through_hf_and_timm():
    size = 112
    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=518)).eval()
    # the timm port, made as benchmarks/real_weights.py makes it: the grid resampled once to the input size
    state = to_timm(hf).state_dict()
    state["pos_embed"] = resample_positions(state["pos_embed"], size // 14)
    port = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=size, embed_dim=64, depth=2, num_heads=2, num_classes=0
    )
    port.load_state_dict(state)
    port.pretrained_cfg = {**dict(port.pretrained_cfg), "mean": rf.MEAN, "std": rf.STD}
    torch.manual_seed(1)
    dec = SaliencyDecoder((64, 16, 8, 4)).eval()
    decoder = lambda d: dec(d, (size, size))  # noqa: E731
    timm_src, hf_src = rf.Source(size, port.eval(), decoder, None, {}), rf.Source(size, hf, decoder, None, {})
    px = rf.load_photos([f"skimage:{n}" for n in ("astronaut", "coffee", "chelsea", "rocket")], size)
    x = rf.normalise(px)
    with torch.inference_mode():
        out = hf(pixel_values=x)  # the HF path's reference: HF's own forward
        dense = out.last_hidden_state[:, 1:].transpose(1, 2).reshape(len(x), -1, size // 14, size // 14)
        hf_ref = {"pre": out.pooler_output, "dense": dense, "saliency": decoder(dense)}
        timm_ref = rf.reference(timm_src, x, 2)
        assert float((hf_ref["dense"] - timm_ref["dense"]).abs().max() / timm_ref["dense"].abs().max()) < 1e-5
        for budget in (0.5, 0.35):
            rows = [
                rf.evaluate(rf.apt_method(src, budget, "entropy", True, sizes=(14, 28)), x, px, ref, src, 2)[""]
                for src, ref in ((hf_src, hf_ref), (timm_src, timm_ref))
            ]
            assert rows[0]["tokens_kept"] == rows[1]["tokens_kept"] < budget + 0.01
            for key in ("dense_cos", "class_cos", "saliency_r", "gflops"):
                assert rows[0][key] == pytest.approx(rows[1][key], abs=1e-5), (budget, key)
