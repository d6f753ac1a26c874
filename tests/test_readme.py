"""The README's Python blocks run, in order, as one session, so every name the README shows exists.

Whatever Python a README block holds is run (a block added later is checked too), on the CPU, with:
- tiny models: ``timm.create_model`` gets ``pretrained=False`` (no model hub here) and a width of 32 (the depth,
  and so every block index the README names, stays the model's own);
- the inputs the README leaves to the reader, as 64x64 images: ``images`` (normalised), ``pixels`` (in [0, 1]) and
  ``uint8_crops`` (the README defines its own scorer, ``my_scores``, in full);
- a temporary working folder (the README saves files).

GPU-only statements (any statement that mentions CUDA) are not run, on any machine: they need their inputs on
the device, which the README leaves to the reader, and ``benchmarks/bench_gpu.py`` runs those paths on a GPU.
Every dotted name they use (``aptvit.nn.CUDAGraphRunner``) must still resolve; a statement that uses a name
only a skipped statement defines (``runner``) is skipped the same way; a name it redefines (``apt =
apt.eval().cuda()``) keeps its CPU value for the statements after it (``apt.prepare``, ``apt.forward_packed``).
"""

import ast
import re
from pathlib import Path

import pytest
import timm
import torch

import aptvit.core.scoring

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"]


def python_blocks(path: Path):
    """(first line number, source) of each ```python block of a Markdown file."""
    text = path.read_text()
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        yield text[: m.start()].count("\n") + 2, m.group(1)


def gpu_only(source: str) -> bool:
    return "cuda" in source.lower()


def assigned(node: ast.AST):
    """Names a statement binds."""
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            yield n.id


def used(node: ast.AST):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def dotted_names(node: ast.AST):
    """Every ``name.attr.attr`` chain of a statement (the longest, rooted at a plain name), as lists."""
    chains = []
    for n in ast.walk(node):
        parts = []
        while isinstance(n, ast.Attribute):
            parts.append(n.attr)
            n = n.value
        if isinstance(n, ast.Name) and parts:
            chains.append([n.id, *reversed(parts)])
    return chains


def check_names(node: ast.AST, namespace: dict, where: str) -> None:
    """A statement that is not run: every dotted name rooted at a defined name must resolve."""
    for root, *attrs in dotted_names(node):
        if root not in namespace:
            continue
        obj = namespace[root]
        for i, attr in enumerate(attrs):
            assert hasattr(obj, attr), f"{where}: {'.'.join([root, *attrs[: i + 1]])} does not exist"
            obj = getattr(obj, attr)


def tiny_create_model(real):
    def create_model(name, pretrained=False, **kwargs):
        return real(name, pretrained=False, **{"embed_dim": 32, "num_heads": 2, **kwargs})

    return create_model


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(timm, "create_model", tiny_create_model(timm.create_model))
    # README registers scorers: the registry is restored afterwards, for the other tests in this process
    monkeypatch.setattr(aptvit.core.scoring, "SCORERS", aptvit.core.scoring.SCORERS)
    saved = dict(aptvit.core.scoring.SCORERS)
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64)
    yield {
        "__name__": "readme",
        "pixels": pixels,
        "images": (pixels - 0.5) / 0.5,
        "uint8_crops": (pixels * 255).round().to(torch.uint8),
    }
    aptvit.core.scoring.SCORERS.clear()
    aptvit.core.scoring.SCORERS.update(saved)


def run_blocks(path: Path, namespace: dict) -> dict:
    """Run every Python block of ``path`` in ``namespace``; returns {"ran": n, "skipped": [(line, source)]}."""
    ran, skipped, tainted = 0, [], set()
    for first, source in python_blocks(path):
        for node in ast.parse(source).body:
            where = f"{path.name} line {first + node.lineno - 1}"
            text = ast.get_source_segment(source, node)
            if gpu_only(text) or used(node) & tainted:
                check_names(node, {k: v for k, v in namespace.items() if k not in tainted}, where)
                # a name it defines is unusable after it, unless an earlier statement defined it (``apt =
                # apt.cuda()``: the CPU model stands in for the GPU one)
                tainted |= {n for n in assigned(node) if n not in namespace}
                skipped.append((where, text))
                continue
            tainted -= set(assigned(node))
            try:
                exec(compile(ast.Module([node], []), where, "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{where}: {text!r} raised {type(e).__name__}: {e}") from e
            ran += 1
    return {"ran": ran, "skipped": skipped}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path, session):
    result = run_blocks(path, session)
    assert result["ran"] >= 10  # the quick start ran, not only skipped lines


def test_the_readme_scorer_serves_every_patch_family(session):
    """README's claim: a registered scorer's thresholds are keyed by scale factor, so one registration gives a /16
    ViT {32: ...} and a /14 ViT {28: ...}, as convert's thresholds are keyed (by patch size)."""
    run_blocks(ROOT / "README.md", session)
    assert session["my_scores"].__code__.co_filename.startswith("README.md")  # the README's own, not the test's
    spec = aptvit.core.scoring.SCORERS["detail"]
    for name, size in (("vit_base_patch16_224", 32), ("vit_small_patch14_dinov2", 28)):
        apt = aptvit.convert(timm.create_model(name, img_size=56), scorer="detail")
        assert apt.config.thresholds == {size: spec.thresholds[2]}


def test_a_missing_name_fails(tmp_path, session):
    """The checks themselves: a name that does not exist fails, in a run line and in a skipped GPU line."""
    doc = tmp_path / "doc.md"
    for line in ("aptvit.nn.NoSuchRunner(apt)", "aptvit.nn.NoSuchRunner(apt.cuda())", "apt.no_such_method(images)"):
        doc.write_text(
            f"```python\nimport aptvit, timm\napt = aptvit.convert(timm.create_model('vit_tiny_patch16_224'))\n{line}\n```\n"
        )
        with pytest.raises(AssertionError, match="NoSuchRunner|no_such_method"):
            run_blocks(doc, dict(session))
