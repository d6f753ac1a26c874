"""CUDAGraphRunner's buffers, buckets and copies, run on the CPU: ``capture=False`` is the replay path without the
graph (static buffers, the same copies), so a new layout in an old bucket is checked here, not first on a GPU."""

import contextlib

import pytest
import torch

import aptvit
from aptvit.core.packed import bucket
from aptvit.nn import graphs
from aptvit.nn.graphs import CUDAGraphRunner, bucket_granule

from ..dispatch import OpCounter
from ..tiny import rel_err, tiny_vit

# seeds of ``_varied`` whose layouts differ in patch count but share a relative bucket (checked in the test)
SAME_BUCKET = {1: (2, 6), 8: (2, 7)}


def _varied(model, b, seed):
    """Normalised images with random plain 2p x 2p blocks: the patch count changes with the seed."""
    p = model.patch_size
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, 8 * p, 8 * p, generator=g)
    plain = torch.rand(b, 4, 4, generator=g) < 0.5
    mask = plain.repeat_interleave(2 * p, 1).repeat_interleave(2 * p, 2)[:, None]
    img = torch.where(mask, torch.full_like(img, 0.5), img)
    return (img - 0.5) / 0.5


def _apt(attention="pad", family="vit_cls"):
    return aptvit.convert(tiny_vit(family), thresholds={32: 6.0, 64: 5.0}, attention=attention).eval()


@pytest.mark.parametrize("attention", ["pad", "loop"])
@pytest.mark.parametrize("b", [1, 8])
def test_replay_with_two_layouts_in_one_bucket_equals_the_plain_forward(b, attention):
    """The second batch has another patch count T in the same padded bucket: its plan is copied into the static
    buffers of the first (``patch_pos``, of length T, is not), and the result is the plain forward's.
    ("loop" reads the host offsets: without a capture the runner hands it this batch's.)"""
    apt = _apt(attention)
    runner = CUDAGraphRunner(apt, capture=False)
    xs = [_varied(apt, b, seed) for seed in SAME_BUCKET[b]]
    with torch.no_grad():
        plans = [runner.plan(x) for x in xs]
        assert plans[0].layout.total_tokens != plans[1].layout.total_tokens  # two layouts ...
        assert plans[0].total == plans[1].total and plans[0].pad > 0  # ... in one bucket
        for x in xs:
            assert rel_err(runner(x), apt(x)) <= 1e-5
    assert runner.captures == 1 and len(runner.graphs) == 1  # the second call reused the first one's buffers


def test_a_static_plan_keeps_no_per_patch_field():
    """A captured plan that held ``patch_pos`` (length T) would read the first batch's positions forever."""
    apt = _apt()
    runner = CUDAGraphRunner(apt, capture=False)
    x = _varied(apt, 2, 0)
    with torch.no_grad():
        runner(x)
    (entry,) = runner.graphs.values()
    assert entry.packed.patch_pos is None and entry.packed.seq.shape[0] == entry.packed.total


def test_relative_buckets_follow_the_token_count():
    """Padding stays under ~5% of the count (or the 8-token minimum) and buckets grow with it, so batch 64 (~37k
    tokens) does not meet a new bucket every 64 tokens."""
    for n in list(range(1, 3000, 7)) + list(range(3000, 60000, 997)):
        g = bucket_granule(n)
        padded = bucket(n, g)
        assert g & (g - 1) == 0 and g >= 8 and padded >= n
        assert padded - n < max(0.05 * n, 8), (n, g, padded)
    assert bucket_granule(37_000) >= 1024 and bucket_granule(200) == 8
    assert len({bucket(n, bucket_granule(n)) for n in range(36_000, 38_000)}) <= 3  # a few graphs, not 32
    apt = _apt()
    x = _varied(apt, 8, 0)
    with torch.no_grad():
        n = apt.make_layout(x).total_tokens + 8 * apt.num_prefix_tokens
        assert CUDAGraphRunner(apt).plan(x).total == bucket(n, bucket_granule(n))
        assert CUDAGraphRunner(apt, bucket=64).plan(x).total % 64 == 0  # a fixed multiple still works


def test_least_recently_used_graph_is_dropped():
    apt = _apt()
    runner = CUDAGraphRunner(apt, capture=False, max_graphs=2)
    xs = [_varied(apt, b, 0) for b in (1, 2, 3)]
    with torch.no_grad():
        runner(xs[0]), runner(xs[1]), runner(xs[0]), runner(xs[2])  # xs[1] is the least recently used
    assert [k[0][0] for k in runner.graphs] == [1, 3] and runner.captures == 3


def test_half_precision_casts_the_weights_once_not_per_call():
    """bf16 through a bf16 copy of the model: a replay dispatches no weight casts (autocast would cast every fp32
    weight at every call, its cache being off in a capture); the caller's model stays fp32."""
    apt = _apt()
    runner = CUDAGraphRunner(apt, dtype=torch.bfloat16, capture=False)
    x = _varied(apt, 2, 0)
    with torch.no_grad():
        runner(x)
        with OpCounter() as ops:
            y = runner(x)
        ref = apt(x)
    assert all(p.dtype == torch.bfloat16 for p in runner.compute.parameters() if p.is_floating_point())
    assert all(p.dtype == torch.float32 for p in apt.parameters())
    weights = sum(1 for p in apt.parameters())
    assert ops.ops["aten._to_copy"] <= 3 < weights, ops.ops["aten._to_copy"]  # the images' cast, not the weights'
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), ref) <= 5e-2


def test_capture_refuses_a_backend_that_reads_host_offsets():
    runner = CUDAGraphRunner(_apt("loop"), capture=False)
    with pytest.raises(ValueError, match="reads the sequence offsets on the host"):
        runner.backend(torch.device("cuda"))
    assert CUDAGraphRunner(_apt("pad")).backend(torch.device("cuda")) == "pad"


def test_capture_is_thread_local_and_replays(monkeypatch):
    """The capture code path, with torch.cuda's stream and graph objects replaced by recorders (no GPU here)."""
    seen = {}

    class FakeGraph:
        replays = 0

        def replay(self):
            FakeGraph.replays += 1

    @contextlib.contextmanager
    def fake_graph(graph, **kwargs):
        seen.update(kwargs)
        yield

    class FakeStream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    apt = _apt()
    runner = CUDAGraphRunner(apt, capture=True)
    x = _varied(apt, 1, 2)
    with torch.no_grad():
        first = runner(x)
        second = runner(x)
    assert seen == {"pool": "pool", "capture_error_mode": "thread_local"}
    assert FakeGraph.replays == 2 and torch.equal(first, second) and rel_err(first, apt(x)) <= 1e-5


def test_static_mode_needs_a_static_model():
    with pytest.raises(ValueError, match="static=True"):
        CUDAGraphRunner(_apt(), mode="static")
    with pytest.raises(ValueError, match="mode must be"):
        CUDAGraphRunner(_apt(), mode="whole")


def _static_apt():
    apt = _apt()
    if "static" not in {f.name for f in apt.config.__dataclass_fields__.values()}:
        pytest.skip("APTConfig has no static field yet (the static path lands from branch 'static')")
    return apt.configure(budget=0.5, static=True)


@pytest.mark.parametrize("b", [1, 8])
def test_static_mode_is_the_default_for_a_static_model_and_reuses_one_entry_per_shape(b):
    apt = _static_apt()
    runner = CUDAGraphRunner(apt, capture=False)
    assert runner.mode == "static"
    with torch.no_grad():
        for seed in (0, 1):
            x = _varied(apt, b, seed)
            assert rel_err(runner(x), apt(x)) <= 1e-5
    assert runner.captures == 1


def test_runner_is_exported_as_the_readme_uses_it():
    assert aptvit.nn.CUDAGraphRunner is graphs.CUDAGraphRunner
