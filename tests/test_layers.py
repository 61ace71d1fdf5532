"""Imports run one way (issue 15): the package's modules form layers, and a module
imports only from its own layer or the layers below it, never in a cycle.

Every module of the package is parsed with `ast`; every import counts, at module level
or inside a function (`import x.y`, `from x import y`, relative imports resolved), except
imports under `if TYPE_CHECKING:`, which are for annotations only and never run.
`importlib.import_module` and `__import__` are refused outside `attnc/__init__.py`, whose
lazy re-exports (PEP 562) are the one place a name is imported by string: it is the API
top, so it may import anything.

    python tests/test_layers.py     # prints the layer of every module and its imports
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: package name -> its folder (pyproject.toml, [tool.setuptools.package-dir])
PACKAGES = {"attnc": "attnc", "attnc.codegen": "codegen", "attnc.runtime": "runtime", "attnc.grammar": "grammar"}

#: [Note: layers] Lowest first. A module may import from its own layer and the ones below.
#: Within a layer imports may go either way, but never round in a cycle (checked below).
LAYERS = (
    # base utilities, usable by every layer: errors and diagnostics, resource limits, caches,
    # progress bars, the version, the grammar's data package
    ("base", ("attnc.errors", "attnc.limits", "attnc.lru", "attnc.progress", "attnc.version", "attnc.grammar")),
    # the language: parsing, the IR, the primitives' definitions, elaboration and its checks, and
    # the validation of what a call adds to a pattern (tile shapes, packed-sequence offsets, the
    # run-time inputs and score tables checked against the pattern's IR)
    ("frontend", ("attnc.syntax", "attnc.parse_errors", "attnc.ir", "attnc.ir_expr", "attnc.ir_text", "attnc.semantics", "attnc.predicates", "attnc.constraints",
                  "attnc.elab_values", "attnc.elab_primitives", "attnc.elab_params", "attnc.elab_scores",
                  "attnc.elab_names", "attnc.elab_exprs", "attnc.elaborate", "attnc.tiles", "attnc.inputs",
                  "attnc.call_inputs")),
    # what a pattern means and costs: the reference masks, interval sets and the tile classes
    # from them, tile plans, products on grids, tile boxes, the plan drivers and per-tile counts,
    # formulas, dynamic routing, KV retention, pictures, the simulator and the
    # context-parallel sharding model
    ("analysis", ("attnc.reference", "attnc.reference_where", "attnc.tilestats", "attnc.interval_sets", "attnc.intervals", "attnc.stencils", "attnc.periodic", "attnc.interval_tiles", "attnc.routed_plans", "attnc.plans",
                  "attnc.products", "attnc.tileboxes", "attnc.analysis", "attnc.pair_counts", "attnc.piecewise", "attnc.symbolic", "attnc.show",
                  "attnc.dynamic", "attnc.retention", "attnc.simulate", "attnc.sharding")),
    # kernels from patterns: the expression IR, the lowered mask and its torch program, pointwise
    # lowering, the Triton printer, loop bounds (monotone expressions, ranges, their derivation, the
    # replay against the plan), score terms (torch; Triton), Triton source (the module's template, its
    # loops, the generator), the kernel cache, and the pipeline that names every pass
    # and runs the kernel passes (it calls analysis and codegen)
    ("codegen", ("attnc.codegen", "attnc.codegen.sizes", "attnc.codegen.expr", "attnc.codegen.torch_program",
                 "attnc.codegen.lowered", "attnc.codegen.pointwise", "attnc.codegen.triton_text",
                 "attnc.codegen.monotone", "attnc.codegen.ranges", "attnc.codegen.range_derivation", "attnc.codegen.bounds",
                 "attnc.codegen.score", "attnc.codegen.score_triton", "attnc.codegen.kernel_templates",
                 "attnc.codegen.loop_text", "attnc.codegen.kernels", "attnc.codegen.ndtiles",
                 "attnc.codegen.decode_kernel", "attnc.codegen.generic", "attnc.codegen.cache",
                 "attnc.codegen.pipeline")),
    # the attention ops and their backends (they run what codegen generates)
    ("runtime", ("attnc.runtime", "attnc.runtime.registry", "attnc.runtime.validate", "attnc.runtime.backend",
                 "attnc.runtime.dense", "attnc.runtime.tile_choice", "attnc.runtime.key_ranges", "attnc.runtime.schedules",
                 "attnc.runtime.torch_backend", "attnc.runtime.triton_backend",
                 "attnc.runtime.flex", "attnc.runtime.ops", "attnc.runtime.decode", "attnc.runtime.distributed")),
    # what users call: loading programs, bound patterns, the nn layers and the Hugging Face adapter,
    # context parallelism, the ahead-of-time compiler (it drives the runtime's launches), the CLI,
    # the package itself
    ("api", ("attnc", "attnc.__main__", "attnc.loader", "attnc.program", "attnc.nn", "attnc.hf", "attnc.distributed",
             "attnc.aot", "attnc.aot_worker", "attnc.cli_args", "attnc.cli_compile", "attnc.cli")),
)

LAYER = {mod: i for i, (_, mods) in enumerate(LAYERS) for mod in mods}
LAYER_NAME = [name for name, _ in LAYERS]


@dataclass(frozen=True)
class Import:
    src: str  # the importing module
    dst: str  # the imported module of this package
    file: str  # the importing file, relative to the repository root
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:` (annotations only)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, guarded: bool = False):
    """(node, under TYPE_CHECKING) for every node below `node`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.body:
                yield sub, True
                yield from _walk(sub, True)
            for sub in child.orelse:
                yield sub, guarded
                yield from _walk(sub, guarded)
            continue
        yield child, guarded
        yield from _walk(child, guarded)


def imports(mods: dict[str, Path] | None = None) -> tuple[list[Import], list[str]]:
    """Every import between the package's modules, and every dynamic import (file:line: call)."""
    mods = modules() if mods is None else mods
    edges, dynamic = [], []
    for src, path in mods.items():
        rel = str(path.relative_to(ROOT))
        package = src if path.stem == "__init__" else src.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node, guarded in _walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    # `import a.b.c` binds a.b.c: the deepest module of this package it names
                    parts = alias.name.split(".")
                    named = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
                    targets += [next((m for m in named if m in mods), None)]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.append(sub if sub in mods else module if module in mods else None)
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if name in ("import_module", "__import__") and src != "attnc":
                    dynamic.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            for dst in targets:
                if dst is not None and dst != src:
                    edges.append(Import(src, dst, rel, node.lineno, guarded))
    return edges, dynamic


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def one_cycle(comp: list[str], edges: list[Import]) -> list[Import]:
    """A shortest import cycle through the first module of a component, as its imports."""
    inside = set(comp)
    by_src: dict[str, list[Import]] = {}
    for e in edges:
        if e.src in inside and e.dst in inside:
            by_src.setdefault(e.src, []).append(e)
    start = comp[0]
    paths = {start: []}
    frontier = [start]
    while frontier:  # breadth first, back to `start`
        nxt = []
        for v in frontier:
            for e in sorted(by_src.get(v, []), key=lambda e: (e.dst, e.line)):
                if e.dst == start:
                    return paths[v] + [e]
                if e.dst not in paths:
                    paths[e.dst] = paths[v] + [e]
                    nxt.append(e.dst)
        frontier = nxt
    return []


def upward(edges: list[Import]) -> list[Import]:
    """Imports from a lower layer to a higher one (modules without a layer: see the first test)."""
    return [e for e in edges if e.src in LAYER and e.dst in LAYER and LAYER[e.dst] > LAYER[e.src]]


def _runtime_edges() -> list[Import]:
    return [e for e in imports()[0] if not e.type_checking]


# ----------------------------------------------------------------------------- the tests


def test_every_module_has_a_layer():
    mods = set(modules())
    missing = sorted(mods - set(LAYER))
    stale = sorted(set(LAYER) - mods)
    assert not missing, f"modules without a layer (add them to LAYERS in {Path(__file__).name}): {missing}"
    assert not stale, f"LAYERS names modules that do not exist: {stale}"
    assert len(LAYER) == sum(len(m) for _, m in LAYERS), "a module is named in two layers"


def test_packages_match_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    for pkg, folder in PACKAGES.items():
        assert f'"{pkg}" = "{folder}"' in text, f"pyproject.toml maps {pkg} elsewhere than {folder}/"


def test_no_import_cycles():
    edges = _runtime_edges()
    found = cycles(edges)
    lines = []
    for comp in found:
        cyc = one_cycle(comp, edges)
        chain = " -> ".join([e.src for e in cyc] + [cyc[0].src]) if cyc else "?"
        lines.append(f"{len(comp)} modules in a cycle: {', '.join(comp)}\n  e.g. {chain}\n" +
                     "".join(f"    {e.where()}: {e.src} imports {e.dst}\n" for e in cyc))
    assert not found, "import cycles between modules:\n" + "".join(lines)


def test_imports_run_down_the_layers():
    bad = upward(_runtime_edges())
    lines = [f"{e.where()}: {e.src} ({LAYER_NAME[LAYER[e.src]]}) imports {e.dst} ({LAYER_NAME[LAYER[e.dst]]})"
             for e in bad]
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(lines)


def test_no_dynamic_imports():
    _, dynamic = imports()
    assert not dynamic, "imports by string outside attnc/__init__.py (the layer test cannot see them):\n" + \
        "\n".join(dynamic)


def test_codegen_and_runtime_never_import_program():
    bad = [e for e in _runtime_edges() if e.dst == "attnc.program" and e.src.startswith(("attnc.codegen", "attnc.runtime"))]
    assert not bad, "codegen / runtime import attnc.program (pass in what they need instead):\n" + \
        "\n".join(f"{e.where()}: {e.src} imports {e.dst}" for e in bad)


def test_type_checking_imports_only_annotate():
    """An import under `if TYPE_CHECKING:` never runs; the module must also use `from __future__
    import annotations` (or quote the names), or the annotation itself would fail at import."""
    for e in imports()[0]:
        if e.type_checking:
            text = (ROOT / e.file).read_text()
            assert "from __future__ import annotations" in text, f"{e.where()}: TYPE_CHECKING import without lazy annotations"


def test_the_checks_see_violations(tmp_path, monkeypatch):
    """The parser finds function-local, relative and dotted imports, a cycle and an upward import."""
    pkg = tmp_path / "attnc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from .program import x\n")
    (pkg / "program.py").write_text("import attnc.errors\nfrom . import errors\n")
    (pkg / "ir.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attnc.program import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mods = {m: p for m, p in modules().items() if m.startswith("attnc")}
    edges, _ = imports(mods)
    got = {(e.src, e.dst, e.line, e.type_checking) for e in edges}
    assert got == {("attnc.errors", "attnc.program", 2, False), ("attnc.program", "attnc.errors", 1, False),
                   ("attnc.program", "attnc.errors", 2, False), ("attnc.ir", "attnc.program", 3, True)}
    assert cycles([e for e in edges if not e.type_checking]) == [["attnc.errors", "attnc.program"]]
    assert [(e.src, e.dst) for e in upward([e for e in edges if not e.type_checking])] == [("attnc.errors", "attnc.program")]


if __name__ == "__main__":
    edges = _runtime_edges()
    for i, (name, mods) in enumerate(LAYERS):
        print(f"{i} {name}")
        for m in mods:
            deps = sorted({e.dst for e in edges if e.src == m})
            print(f"    {m}: {', '.join(deps) or '-'}")
    for comp in cycles(edges):
        print(f"cycle ({len(comp)} modules): {', '.join(comp)}")
    for e in upward(edges):
        print(f"upward: {e.where()}: {e.src} -> {e.dst}")


def test_every_package_declares_its_public_names():
    """`__all__` of attnc, attnc.codegen and attnc.runtime names things that exist (for the two
    internal packages: their modules or re-exported names) and nothing private."""
    import importlib
    import importlib.util

    for package in ("attnc", "attnc.codegen", "attnc.runtime"):
        mod = importlib.import_module(package)
        names = getattr(mod, "__all__", None)
        assert names, f"{package} has no __all__"
        for name in names:
            assert not name.startswith("_") or name == "__version__", f"{package}.__all__ lists a private name {name}"
            assert hasattr(mod, name) or importlib.util.find_spec(f"{package}.{name}") is not None, \
                f"{package}.__all__ lists {name}, which is neither defined nor a module"
