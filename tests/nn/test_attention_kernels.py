"""Kernel plumbing of the CUDA backends, checked on the CPU: flex's one block mask per forward, "auto" for fp32
inference, the varlen route (flash, never cuDNN, at inference), compute capability and flash-attn import checks."""

import sys
import warnings

import pytest
import torch

import aptvit
from aptvit.core.packing import seq_index
from aptvit.nn import attention
from aptvit.nn.attention import environment, flex, loop
from aptvit.nn.attention import varlen as varlen_backend

from ..tiny import rel_err, tiny_vit

CASES = [[0, 5, 12, 30], [0, 130, 260, 300, 301, 700], [0, 256, 512], [0, 100, 100, 400], [0, 129]]


def _tiles(num, idx, nb):
    dense = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        dense[i, idx[0, 0, i, : num[0, 0, i]].long()] = True
    return dense


@pytest.mark.parametrize("cu", CASES)
def test_flex_block_mask_matches_the_brute_force_tiles(cu):
    """Skipped, full and partial 128 x 128 tiles, against the N x N same-sequence mask: a tile wrongly marked
    full would let sequences see each other in the compiled kernel (which does not evaluate the mask there)."""
    cu = torch.tensor(cu, dtype=torch.int32)
    n, b = int(cu[-1]), attention.FLEX_BLOCK
    seq = seq_index(cu, n)
    mask = attention.flex_block_mask(seq)
    nb = -(-n // b)
    same = torch.zeros(nb * b, nb * b, dtype=torch.bool)
    same[:n, :n] = seq[:, None] == seq[None, :]
    inside = torch.zeros(nb * b, dtype=torch.bool)
    inside[:n] = True
    tiles = same.view(nb, b, nb, b)
    any_ = tiles.any(3).any(1)
    all_ = tiles.all(3).all(1) & inside.view(nb, b).all(1)[:, None] & inside.view(nb, b).all(1)[None, :]
    full = _tiles(mask.full_kv_num_blocks, mask.full_kv_indices, nb)
    partial = _tiles(mask.kv_num_blocks, mask.kv_indices, nb)
    assert torch.equal(full, all_) and torch.equal(partial, any_ & ~all_)


def test_flex_builds_one_block_mask_per_forward(monkeypatch):
    """Not one per layer: the mask is built in the model from the plan (``backend_context``) and shared."""
    from torch.nn.attention import flex_attention as fa

    builds = []
    real_build, real_create = attention.flex_block_mask, fa.create_block_mask
    monkeypatch.setattr(flex, "flex_block_mask", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **k: builds.append(1) or real_create(*a, **k))
    # torch warns once per process about eager flex; this test's warning must not use up another test's
    monkeypatch.setattr(fa, "_WARNINGS_SHOWN", set(getattr(fa, "_WARNINGS_SHOWN", set())))
    monkeypatch.setitem(  # flex on the CPU (eager), as the value tests run it
        attention.BACKENDS, "flex", attention.FlexBackend(available=lambda *args: True)
    )
    apt = aptvit.convert(tiny_vit("vit_cls", depth=3), thresholds={32: 6.0, 64: 5.0}, attention="flex").eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex materialises the scores on the CPU
        packed = apt.prepare(x)
        y = apt.forward_packed(x, packed)
    assert len(builds) == 1 and len(apt.blocks) == 3
    assert rel_err(y, apt.configure(attention="pad").forward_packed(x, packed)) <= 1e-5


def _cuda_everything(monkeypatch):
    monkeypatch.setattr(environment, "has_flash_attn", lambda: True)
    monkeypatch.setattr(environment, "has_torch_varlen", lambda: True)
    monkeypatch.setattr(environment, "has_flex", lambda: True)
    monkeypatch.setattr(environment, "has_sm80", lambda device: True)


def test_auto_prefers_pad_for_fp32_inference_and_flex_for_fp32_training(monkeypatch):
    _cuda_everything(monkeypatch)
    cuda = torch.device("cuda")
    assert attention.resolve_backend("auto", cuda, torch.float32) == "pad"
    assert attention.resolve_backend("auto", cuda, torch.float32, grad=True) == "flex"
    assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "flash"


def test_flash_kernels_need_sm80(monkeypatch):
    """flash-attn 2 and torch's flash kernel run on Ampere and later; on a T4 or V100 "auto" must skip them."""
    calls = []
    monkeypatch.setattr(environment, "has_flash_attn", lambda: True)
    monkeypatch.setattr(environment, "has_torch_varlen", lambda: True)
    monkeypatch.setattr(environment, "has_flex", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: calls.append(i) or (7, 5))
    environment.capability.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "flex"
        assert "varlen" not in attention.available_backends(cuda, torch.bfloat16)
        assert "flash" not in attention.available_backends(cuda, torch.bfloat16)
        assert len(calls) == 1  # read once per device, then cached
        environment.capability.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
        assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "flash"
    finally:
        environment.capability.cache_clear()


@pytest.mark.parametrize(
    "body, want",
    [
        ("raise ImportError('undefined symbol: _ZN3c1017SymbolicShapeMeta')", False),  # built for another torch
        ("raise OSError('libcudart.so.11.0: cannot open shared object file')", False),
        ("def flash_attn_varlen_func(*args, **kwargs):\n    pass", True),
    ],
)
def test_flash_attn_counts_only_when_it_imports(tmp_path, monkeypatch, body, want):
    import importlib.util

    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    assert importlib.util.find_spec("flash_attn") is not None  # what the old check looked at
    assert environment.find_flash_attn() is want
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)


def test_varlen_inference_calls_the_flash_kernel_not_varlen_attn(monkeypatch):
    """At inference the flash kernel is called directly (``varlen_attn`` would pick cuDNN on sm90 beyond 128
    tokens), and the kernel that ran is recorded for the benchmarks."""
    import torch.nn.attention.varlen as varlen

    seen = []

    def flash_forward(q, k, v, cu, max_seqlen, scale):
        seen.append("flash")
        return loop.loop_attention(q, k, v, cu, max_seqlen, 0.0, scale, None, None, None)

    def no_varlen(*args, **kwargs):
        raise AssertionError("varlen_attn called at inference")

    monkeypatch.setattr(varlen, "varlen_attn", no_varlen)
    monkeypatch.setattr(varlen_backend, "_aten_flash", flash_forward)
    monkeypatch.setattr(varlen_backend, "_direct_flash", lambda q: True)  # as for CUDA tensors with the aten op
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    backend = varlen_backend.VarlenBackend()
    out = backend.run(q, k, v, cu, 7, 0.0, 0.1, None, None, None)
    ref = attention.varlen_attention(q, k, v, cu, 7, "loop", scale=0.1)
    assert seen == ["flash"] and rel_err(out, ref) <= 1e-5
    assert backend.last_kernel == "aten._flash_attention_forward"
    q.requires_grad_(True)  # with gradients: varlen_attn (its backward)
    with pytest.raises(AssertionError, match="varlen_attn called"):
        varlen_backend.torch_varlen_attention(q, k, v, cu, 7, 0.0, 0.1, None, None, None)


def test_each_backend_object_records_the_kernel_it_last_ran(monkeypatch):
    """``Backend.last_kernel`` is the backend's own state (no module-level record): what the model's forward ran
    through it, batch 1 through timm's own SDPA call, a backend made from a kernel function by its name; and
    ``clear_last_kernel`` forgets it."""
    pad, loop_ = attention.PadBackend(), attention.LoopBackend()
    monkeypatch.setitem(attention.BACKENDS, "pad", pad)
    monkeypatch.setitem(attention.BACKENDS, "loop", loop_)
    assert pad.last_kernel is None and not hasattr(attention, "KERNELS")
    apt = aptvit.convert(tiny_vit("vit_cls"), thresholds={32: 5.0, 64: 4.0}, attention="pad").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        apt(x)
        assert pad.last_kernel == "scaled_dot_product_attention (padded, masked)" and loop_.last_kernel is None
        apt(x[:1])  # one sequence: timm's own call, recorded on the backend that made the choice
        assert pad.last_kernel == "scaled_dot_product_attention (one sequence)"
        pad.clear_last_kernel()
        assert pad.last_kernel is None
        apt.configure(attention="loop")(x)
        assert loop_.last_kernel == "scaled_dot_product_attention (per sequence)" and pad.last_kernel is None
        apt.configure(attention="pad", thresholds=None, budget=0.5, static=True)(x)  # a static plan: fixed rows
        assert pad.last_kernel == "scaled_dot_product_attention (fixed rows per image)"

    def my_kernel(*args):
        return loop.loop_attention(*args)

    mine = attention.Backend(my_kernel, lambda *a: True)
    monkeypatch.setitem(attention.BACKENDS, "mine", mine)
    with torch.no_grad():
        apt.configure(attention="mine")(x)
    assert mine.last_kernel.endswith("my_kernel")
