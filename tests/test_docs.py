"""The docs' code is real: every ```attn block in docs/ loads, every ```python block of the
tutorial and the migration notes runs (in order, one namespace per page, from the repository
root), and the language reference shows every construct in an example. (```py blocks are
shown, not run: they need other libraries.)"""

import re

import pytest

import attnc
from conftest import ROOT

DOCS = ROOT / "docs"


def blocks(path, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```$", path.read_text(), flags=re.S | re.M)


def attn_blocks():
    return [(p.name, i, src) for p in sorted(DOCS.glob("*.md")) for i, src in enumerate(blocks(p, "attn"))]


@pytest.mark.parametrize("page,i,src", attn_blocks(), ids=[f"{p}#{i}" for p, i, _ in attn_blocks()])
def test_attn_blocks_load_and_evaluate(page, i, src, monkeypatch):
    """Each block loads (imports resolve from the repository root) and each of its patterns
    without run-time inputs evaluates at a small size (required parameters bound to 2)."""
    monkeypatch.chdir(ROOT)
    prog = attnc.loads(src, file=f"{page}#{i}")
    assert prog.names(), f"{page} block {i} defines no pattern"
    for info in prog.patterns():
        required = {p.name: 2 for p in info.params if p.default is None and not p.type}
        pat = prog.pattern(info.name, **required)
        if pat.ir.inputs or "topk(" in pat.text():
            continue
        grid = (16 if len(pat.layout.axes) < 3 else 8,) * len(pat.layout.axes) if pat.layout.axes else None
        _, N, _, _ = pat.resolve_sizes(1 if grid else 100, None, 8, grid)
        assert pat.mask(N, grid=grid, heads=8).shape == (8, N, N)


@pytest.mark.parametrize("page", ["tutorial.md", "migration.md"])
def test_python_blocks_run(page, monkeypatch):
    code = blocks(DOCS / page, "python")
    assert code, f"{page} has no python blocks"
    monkeypatch.chdir(ROOT)
    ns = {"__name__": f"docs_{page}"}
    for i, src in enumerate(code):
        exec(compile(src, f"{page}#python{i}", "exec"), ns)


CONSTRUCTS = [
    # primitives
    r"\bfull\b", r"\bnone\b", r"\bcausal\b", r"\bband\(", r"\bsliding\(", r"\bneighborhood\(", r"\bblock\(",
    r"\bstrided\(", r"\bsink\(", r"\bglobal\(", r"\brows\(", r"\bcols\(", r"\bprefix\(", r"\brandom\(", r"\bwhere\b",
    r"\bsame\(", r"\brouted\(", r"\btopk\(",
    # combinators and structure
    r"\|", r"&", r" - ", r"~", r"@ \w", r"\bdilate\(", r"\bblockwise\(", r"\bheads \{",
    # expressions and declarations
    r"\blet \w+ = .* in\b", r"^let \w+ =", r"\bimport\b", r"\.\. .* step\b", r"\{\d+, \d+", r"\bmin\(", r"\bmax\(", r"\babs\(",
    r"\bsize\(\w\)", r"\*\*", r"//", r"%", r"\bq\.\w", r"\band\b", r"\bor\b", r"\bnot\b", r"\bin\b",
    r"on grid\(\w+\)", r"on grid\(\w+, \w+\)", r"on grid\(\w+, \w+, \w+\)", r"on seq\(\w+\) \+ grid", r": segments",
    r": blocks\(", r"= true", r"= \(\d+, \d+", r"\bM\b", r"\bN\b", r"\bH\b",
]


def test_language_reference_shows_every_construct():
    text = "\n".join(blocks(DOCS / "language.md", "attn"))
    missing = [c for c in CONSTRUCTS if not re.search(c, text, flags=re.M)]
    assert not missing, f"docs/language.md has no ```attn example using: {missing}"
