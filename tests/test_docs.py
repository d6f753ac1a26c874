"""The documentation's references resolve: every file a Markdown page links or names, every section a link points
to, and the folders the benchmark scripts write their results into by default.

Result files live under ``docs/results/`` and superseded write-ups under ``docs/history/``; a file moved without
its references being updated fails here, as does a link to a BENCHMARKS.md section whose heading changed.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/**/*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
NAMED = re.compile(r"(?<![\w/.])docs/[\w./-]*\w\.(?:md|json|png)\b")  # docs/results/x.json named in prose or code


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # no headings inside code blocks
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(page: Path):
    """(target path, anchor or None) of every relative link of ``page``."""
    for m in LINK.finditer(page.read_text()):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        yield (page.parent / path if path else page), anchor or None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for path, anchor in links(page):
        assert path.exists(), f"{page.relative_to(ROOT)} links to {path}, which does not exist"
        if anchor is not None and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.relative_to(ROOT)} links to #{anchor}: no such heading in {path}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_result_files_exist(page):
    """A path like ``docs/results/real_fidelity.json`` in the text names a file of this repository."""
    for name in NAMED.findall(page.read_text()):
        assert (ROOT / name).is_file(), f"{page.relative_to(ROOT)} names {name}, which does not exist"


def test_benchmark_results_go_to_docs_results():
    """The scripts that write result files by default write them under docs/results/, which exists."""
    defaults = {}
    for script in sorted(ROOT.glob("benchmarks/*.py")):
        for prefix in re.findall(r'"--results",\s*default="([^"]+)"', script.read_text()):
            defaults[script.name] = prefix
    assert len(defaults) >= 3, defaults  # real_conversion, real_elpv, real_fidelity at least
    for script, prefix in defaults.items():
        assert Path(prefix).parent == Path("docs/results"), f"{script} writes its results to {prefix}"
        assert (ROOT / prefix).parent.is_dir()


def test_docs_holds_no_loose_result_files():
    """docs/ itself keeps the architecture page; results (the README picture too) and history have their folders."""
    loose = sorted(p.name for p in (ROOT / "docs").iterdir() if p.is_file())
    assert set(loose) <= {"architecture.md"}, loose


def test_the_checks_catch_a_stale_reference(tmp_path):
    """The checks themselves: a moved file, a missing heading and a loose name each fail."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.md").write_text("# Results\n\n## 1. Speed\n")
    page = tmp_path / "page.md"
    page.write_text("![a](docs/gone.png) [b](other.md#2-accuracy) [c](other.md#1-speed) [d](https://x.org/y)\n")
    found = list(links(page))
    assert [p.exists() for p, _ in found] == [False, True, True]
    assert [a in anchors(p) for p, a in found[1:]] == [False, True]
    assert NAMED.findall("see docs/results/real_elpv.json and `docs/history/x.md`, not mydocs/a.json") == [
        "docs/results/real_elpv.json",
        "docs/history/x.md",
    ]
