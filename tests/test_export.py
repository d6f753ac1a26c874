"""``aptvit.export`` / ``aptvit export``: the static ``apt(x)`` as one graph (ONNX, torch.export), layout inside."""

import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import aptvit
from aptvit import export_graph
from aptvit.core.io import InputError, MissingDependency, UserTypeError

from .cli.helpers import one_line, run
from .tiny import rel_err, tiny_vit

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
ex = importlib.import_module("aptvit.export")  # the module (``aptvit.export`` is the function)


def _model(family="vit_cls", **kw):
    return aptvit.convert(tiny_vit(family), budget=0.5, **kw)


def _photos(apt, size, n=3):
    return ex.check_photos(apt, (size, size))[:n]


def _static_reference(apt, images, pre_logits=False, dense=False):
    static = ex._static_copy(apt, apt.config.replace(static=True))
    with torch.no_grad():
        return ex.StaticForward(static, pre_logits, dense)(images)


def _ort(path, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory):
    """A tiny ViT exported once with the dense output: (model, path, side)."""
    apt = _model()
    path = tmp_path_factory.mktemp("export") / "vit.onnx"
    ex.export(apt, path, image_size=128, dense=True)
    return apt, path, 128


@pytest.mark.slow
def test_onnx_graph_equals_the_static_forward_at_any_batch_with_its_metadata(vit_onnx):
    apt, path, side = vit_onnx
    photos = _photos(apt, side)
    flat = photos[:1].clone()
    flat[..., : 3 * side // 4, :] = flat[..., :1, :1]  # three quarters of one colour: the threshold is just above 0
    photos = torch.cat([flat, photos])
    want_logits, want_dense = _static_reference(apt, photos, dense=True)
    for b in (1, 4):  # the batch axis is dynamic
        logits, dense = _ort(path, photos[:b])
        assert rel_err(logits, want_logits[:b]) <= 1e-4 and rel_err(dense, want_dense[:b]) <= 1e-4
    # a real layout merged something: the graph's layout is not all base patches
    static = ex._static_copy(apt, apt.config.replace(static=True))
    with torch.no_grad():
        assert (static.prepare(photos).layout.size > 16).any()
    meta = ex.read_metadata(path)
    assert json.loads(meta["input_size"]) == [3, side, side] and meta["outputs"] == '["logits", "dense"]'
    assert int(meta["tokens_per_image"]) == static.static_tokens((side, side))
    assert json.loads(meta["apt_config"])["budget"] == 0.5 and json.loads(meta["apt_config"])["static"] is True
    assert json.loads(meta["mean"]) == list(apt.pixel_mean_std()[0])


@pytest.mark.slow
def test_each_image_of_a_batch_gets_what_it_gets_alone(vit_onnx):
    """The blocks run on the whole batch: each image's rows attend with its own context (mask, key bias), never
    another image's, whatever its place in the batch."""
    apt, path, side = vit_onnx
    photos = _photos(apt, side)
    static = ex._static_copy(apt, apt.config.replace(static=True))
    with torch.no_grad():
        sizes = static.prepare(photos).layout.size.view(3, -1)
    assert len({tuple(s.tolist()) for s in sizes}) == 3  # three different layouts
    logits, dense = _ort(path, photos)
    for i in range(3):
        alone_logits, alone_dense = _ort(path, photos[i : i + 1])
        assert rel_err(logits[i : i + 1], alone_logits) <= 1e-5 and rel_err(dense[i : i + 1], alone_dense) <= 1e-5


@pytest.mark.slow
def test_no_scan_encloses_the_blocks(vit_onnx):
    """Only the layout / embedding and the head go image by image: the blocks' weights are used by nodes of the top
    graph (one matmul per layer for the batch), none inside a Scan's per-image graph."""
    import onnx

    apt, path, _ = vit_onnx
    model = onnx.load(str(path))
    graph = model.graph
    weights = {n for n, _ in apt.blocks.named_parameters(prefix="blocks")}

    def used(g):
        names = {i.name.split("/", 1)[-1] for i in g.initializer}
        return {w for w in weights if w in names or f"apt.{w}" in names}

    assert used(graph) == weights
    bodies = [a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert bodies and all(not used(b) for b in bodies)
    assert not [n for n in graph.node if n.op_type in ("Loop", "Scan") and n.output[0].startswith("blocks")]


@pytest.mark.slow
def test_a_model_exported_at_another_size_holds_its_position_table_and_runs_the_same_in_openvino(vit_onnx, tmp_path):
    """Exported at a size other than the model's own, the graph holds the position table resampled once at export
    (no ``Resize`` in it): OpenVINO, whose bicubic resize differs from torch's, then gives ONNX Runtime's outputs."""
    import onnx

    apt, path, side = vit_onnx
    assert tuple(apt.patch_embed.grid_size) != (side // apt.patch_size,) * 2  # another size than the model's own
    assert "Resize" not in {n.op_type for n in export_graph.all_nodes(onnx.load(str(path)).graph)}
    pytest.importorskip("openvino")
    import openvino as ov

    photos = _photos(apt, side)
    # fp32: on CPUs with bf16 units (AVX-512 BF16, AMX) OpenVINO computes in bf16 unless told otherwise
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(compiled.create_infer_request().infer({0: photos.numpy()})[compiled.outputs[0]])
    assert rel_err(got, _ort(path, photos)[0]) <= 1e-5


@pytest.mark.slow
def test_no_expand_to_an_empty_shape_is_left(vit_onnx):
    """``torch.full((), v)`` exports as Expand(v, []): rewritten as Identity (same tensor), which OpenVINO reads."""
    import onnx
    from onnx import numpy_helper

    all_nodes = list(export_graph.all_nodes(onnx.load(str(vit_onnx[1])).graph))
    made = {o: n for n in all_nodes for o in n.output}

    def empty(name):
        n = made.get(name)
        while n is not None and n.op_type == "Cast":
            n = made.get(n.input[0])
        return n is not None and n.op_type == "Constant" and numpy_helper.to_array(n.attribute[0].t).size == 0

    assert [n for n in all_nodes if n.op_type == "Identity" and "full" in n.name]  # the exporter made some
    assert not [n.name for n in all_nodes if n.op_type == "Expand" and empty(n.input[1])]


@pytest.mark.slow
@pytest.mark.parametrize("format", ex.FORMATS)
@pytest.mark.parametrize("family", ["eva02", "siglip_map"])  # RoPE; attention pool
def test_graph_of_eva_and_siglip_equals_the_static_forward(family, format, tmp_path):
    apt = _model(family)
    side = 8 * apt.patch_size
    path = ex.export(apt, tmp_path / "m", image_size=side, pre_logits=family == "siglip_map", format=format)
    photos = _photos(apt, side)
    if format == "onnx":
        (got,) = _ort(path, photos)
    else:
        with torch.no_grad():
            got = torch.export.load(path).module()(photos)
    assert rel_err(got, _static_reference(apt, photos, pre_logits=family == "siglip_map")) <= 1e-4


@pytest.mark.slow
def test_the_exported_file_runs_with_only_onnxruntime_and_numpy(vit_onnx, tmp_path):
    apt, path, side = vit_onnx
    photos = _photos(apt, side, 2)
    np.save(tmp_path / "x.npy", photos.numpy())
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import onnxruntime as ort
        session = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        x = np.load({str(tmp_path / "x.npy")!r})
        assert list(x.shape[1:]) == json.loads(meta["input_size"])
        logits, dense = session.run(None, {{"images": x}})
        np.save({str(tmp_path / "y.npy")!r}, logits)
        assert not any(m == "torch" or m.startswith(("torch.", "aptvit")) for m in sys.modules), "torch imported"
        print("ok", logits.shape, dense.shape)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok (2, 10) (2, 64, 8, 8)")
    assert rel_err(torch.from_numpy(np.load(tmp_path / "y.npy")), _static_reference(apt, photos)) <= 1e-4


@pytest.mark.slow
def test_torch_export_program_has_a_dynamic_batch_and_its_metadata(tmp_path, caplog):
    """The program runs the blocks on the whole batch, as the ONNX graph does: their linears are in its top-level
    graph, the layout and the head in two ``scan``s over the images. Writing it logs no warning from torch (its
    temporary name does not end in .pt2)."""
    apt = _model("vit_avg_no_cls")
    with caplog.at_level(logging.WARNING):
        path = ex.export(apt, tmp_path / "m.pt2", image_size=64, format="torch")
    assert not [r for r in caplog.records if r.name.startswith("torch")], caplog.text
    extra = {"aptvit.json": ""}
    program = torch.export.load(path, extra_files=extra)
    calls = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count("scan") == 2 and calls.count("aten.linear.default") == 4 * len(apt.blocks), calls
    assert json.loads(extra["aptvit.json"])["tokens_per_image"] == str(apt.configure(static=True).static_tokens((64, 64)))
    photos = _photos(apt, 64)
    want = _static_reference(apt, photos)
    with torch.no_grad():
        for b in (1, 3):
            assert rel_err(program.module()(photos[:b]), want[:b]) <= 1e-5


def test_the_model_passed_in_is_left_as_it_was():
    apt = _model(attention="auto")
    copy = ex._static_copy(apt, apt.config.replace(static=True))
    assert copy is not apt and apt.config.static is False and apt.attention == "auto" and copy.attention == "pad"
    assert copy.pos_embed is not apt.pos_embed and torch.equal(copy.pos_embed, apt.pos_embed)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture
def no_work(monkeypatch):
    """Any step of an export beyond the checks fails the test."""

    def fail(*a, **k):
        raise AssertionError("export started work before refusing")

    monkeypatch.setattr(ex, "_static_copy", fail)
    monkeypatch.setattr(ex, "_onnx_model", fail)
    monkeypatch.setattr(torch.onnx, "export", fail)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: aptvit.convert(tiny_vit(), thresholds={32: 5.0}), "pass budget=0.5"),
        (lambda: _model().configure(attention="loop"), "pass attention='pad'"),
        (lambda: aptvit.convert(tiny_vit("deit_distilled"), budget=0.5), "not distilled"),
        (lambda: tiny_vit(), "aptvit.convert"),
    ],
)
def test_a_model_the_exporter_cannot_take_is_refused_before_any_work(make, match, no_work, tmp_path):
    with pytest.raises((InputError, UserTypeError), match=match) as info:
        ex.export(make(), tmp_path / "m.onnx", image_size=64)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_are_refused_before_any_work(no_work, tmp_path):
    apt = _model()
    with pytest.raises(InputError, match="multiple of the patch size 16"):
        ex.export(apt, tmp_path / "m.onnx", image_size=70)
    with pytest.raises(InputError, match="format 'tflite'"):
        ex.export(apt, tmp_path / "m.onnx", image_size=64, format="tflite")
    with pytest.raises(InputError, match="below the"):
        ex.export(apt, tmp_path / "m.onnx", image_size=64, budget=1)
    assert list(tmp_path.iterdir()) == []


def test_without_onnxruntime_export_says_what_to_install(monkeypatch, no_work, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(MissingDependency, match=r"pip install 'aptvit\[export\]'"):
        ex.export(_model(), tmp_path / "m.onnx", image_size=64)


def test_a_failed_check_writes_nothing_and_keeps_the_old_file(monkeypatch, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    monkeypatch.setattr(ex, "_run_onnx", lambda p, x: [torch.full((x.shape[0], 10), 1e3)])
    with pytest.raises(ex.ExportCheckError, match="nothing was written"):
        ex.export(_model(), path, image_size=64)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ---------------------------------------------------------------------------------------------- translations
def _onnx_of(fn, *inputs, tmp_path):
    class M(torch.nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    with torch.no_grad():
        program = torch.onnx.export(M(), inputs, dynamo=True, custom_translation_table=ex._onnx_translations())
    program.save(str(tmp_path / "op.onnx"))
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "op.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def test_nextafter_translation_is_bit_exact_away_from_subnormals(tmp_path):
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    edge = [0.0, -0.0, 1.0, -1.0, 2.0, 0.5, -2.0, 3.0, 1.9999999, 5.5, -7.25, tiny, -tiny, tiny / 3, 1e-45, -1e-45]
    edge += [2.0**-126 * 1.5, 1e30, -1e30, big, 1024.0, 9.0]
    x = torch.cat([torch.tensor(edge), torch.randn(500) * 10.0 ** torch.randint(-40, 38, (500,)).float()]).float()
    probes = torch.tensor([-tiny, 0.0, tiny, 2 * tiny])  # floats that are not subnormal, around zero
    for target in (float("inf"), float("-inf")):
        other = torch.full_like(x, target)
        (got,) = _onnx_of(torch.nextafter, x, other, tmp_path=tmp_path)
        want = torch.nextafter(x, other)
        normal = want.abs() >= tiny
        assert torch.equal(got[normal].view(torch.int32), want[normal].view(torch.int32)), x[normal & (got != want)]
        # zero or subnormal (ONNX Runtime flushes those): every float that is not subnormal lies on the same side
        side = (lambda a, b: a < b) if target > 0 else (lambda a, b: a > b)  # "score < nextafter(c, inf)"
        assert torch.equal(side(probes[:, None], got[~normal]), side(probes[:, None], want[~normal]))
    (got,) = _onnx_of(torch.nextafter, x, x.clone(), tmp_path=tmp_path)
    assert torch.equal(got, x)


def test_repeat_interleave_translation_equals_torch(tmp_path):
    counts = torch.tensor([2, 0, 3, 1])
    (got,) = _onnx_of(lambda c: torch.repeat_interleave(c, output_size=6), counts, tmp_path=tmp_path)
    assert got.tolist() == torch.repeat_interleave(counts).tolist()


def test_searchsorted_translation_equals_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 20, (3, 40), generator=g).sort(1).values.float()  # ties
    val = torch.randint(-1, 22, (3, 17), generator=g).float()
    for right in (True, False):
        (got,) = _onnx_of(lambda s, v: torch.searchsorted(s, v, right=right), seq, val, tmp_path=tmp_path)
        assert torch.equal(got, torch.searchsorted(seq, val, right=right))


def test_int32_histogram_translation_counts_duplicates(tmp_path):
    idx = torch.tensor([0, 3, 3, 3, 7, 0], dtype=torch.long)

    def hist(i):
        return torch.zeros(8, dtype=torch.int32).index_add_(0, i, torch.ones((), dtype=torch.int32).expand(i.shape[0]))

    (got,) = _onnx_of(hist, idx, tmp_path=tmp_path)
    assert got.tolist() == [2, 0, 0, 3, 0, 0, 0, 1]


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_refusals_are_one_line(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", "--model", "vit_tiny_patch16_224", "--thresholds", "32=5", "--out", out)
    assert code == 2 and "pass --budget 0.5" in one_line(err)
    code, _, err = run(capsys, "export", "--model", "vit_tiny_patch16_224", "--budget", "0.5", "--attention", "loop",
                       "--out", out)  # fmt: skip
    assert code == 2 and "pass --attention pad" in one_line(err)
    code, _, err = run(capsys, "export", "--model", "vit_tiny_patch16_224", "--out", out)  # no budget given
    assert code == 2 and "pass --budget 0.5" in one_line(err)
    assert not out.exists()


@pytest.mark.slow
def test_cli_exports_an_aptvit_checkpoint(capsys, tmp_path):
    apt = _model("vit_avg_no_cls")
    aptvit.save(apt, tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", "--checkpoint", tmp_path / "m.safetensors", "--size", "64", "--out", out)
    assert code == 0, err
    assert "checked: ONNX Runtime equals the PyTorch static forward" in stdout and f"to {out}" in stdout
    photos = _photos(apt, 64)
    assert rel_err(_ort(out, photos)[0], _static_reference(apt, photos)) <= 1e-4


@pytest.mark.slow
def test_a_hugging_face_tower_exports_like_a_timm_model(tmp_path):
    """An HF CLIP vision tower converted by aptvit exports, and ONNX Runtime gives its static forward."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16
    )
    apt = aptvit.convert(transformers.CLIPVisionModel(config).eval(), budget=0.5)
    path = ex.export(apt, tmp_path / "clip.onnx", image_size=64)
    photos = _photos(apt, 64)
    (got,) = _ort(path, photos)
    assert rel_err(got, _static_reference(apt, photos)) <= 1e-4
    assert ex.read_metadata(path)["architecture"] == "hf:CLIPVisionModel"


@pytest.mark.slow
def test_export_prints_no_exporter_noise_and_restores_the_log_level(tmp_path, caplog):
    """onnx_ir's per-attribute warnings are the exporter's own; a user would read a dozen of them as errors."""
    import logging

    before = logging.getLogger("onnx_ir").level
    with caplog.at_level(logging.WARNING):
        ex.export(_model(), tmp_path / "m.onnx", image_size=64, check=False)
    assert not [r for r in caplog.records if r.name.startswith("onnx_ir")], [r.getMessage() for r in caplog.records]
    assert logging.getLogger("onnx_ir").level == before


@pytest.mark.slow
def test_a_hugging_face_tower_exports_at_another_size(tmp_path):
    """A ``transformers`` DINOv2 tower (converted through its timm twin) exports at a size other than its own: the
    position table resampled as Hugging Face resamples it, once, at export."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = T.Dinov2Config(hidden_size=64, num_attention_heads=4, patch_size=14, image_size=518, num_hidden_layers=2)
    apt = aptvit.convert(T.Dinov2Model(config).eval(), budget=0.5)
    path = ex.export(apt, tmp_path / "m.onnx", image_size=224, pre_logits=True)
    photos = _photos(apt, 224, 2)
    (got,) = _ort(path, photos)
    assert rel_err(got, _static_reference(apt, photos, pre_logits=True)) <= 1e-4


def test_a_headless_model_exports_its_features_named_as_such(tmp_path):
    """A model without a head (num_classes 0) outputs the pooled features: the graph and its metadata call them
    "pre_logits", not "logits"."""
    import onnx

    apt = aptvit.convert(tiny_vit("vit_cls", num_classes=0), budget=0.5)
    path = ex.export(apt, tmp_path / "m.onnx", image_size=64)
    graph = onnx.load(str(path))
    assert [o.name for o in graph.graph.output] == ["pre_logits"]
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["outputs"]) == ["pre_logits"]
