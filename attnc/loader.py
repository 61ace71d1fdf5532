"""Loading programs: reading an `.attn` file and its imports, checking them, and the `Program`.

input:  a path or a source string (and the import search path: `search_path=`, $ATTNC_PATH).
output: a checked `Program`: its files' sources and scopes, its patterns' signatures
        (`PatternInfo`); `Program.pattern` binds one to a `BoundPattern` (attnc/program.py).
does not: bind or evaluate patterns (program.py, reference.py) or compute anything heavy at load;
        it reads only `.attn` files inside the allowed folders ([Note: import confinement]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from . import syntax as ast
from .elaborate import ModuleScope, bind_pattern, check_scope, find_pattern, module_scope
from .errors import AttnError, Collector, Span, error, source_lines
from .program import BoundPattern

# torch (and the analysis / reference modules built on it) are imported where they are
# used, so `attnc check` and `attnc list` load and bind patterns without importing torch

@dataclass(frozen=True)
class ParamInfo:
    name: str
    default: str | None  # source text of the default, None when required
    type: str | None  # "segments" / "blocks(64)" for run-time inputs


@dataclass(frozen=True)
class PatternInfo:
    name: str
    params: tuple[ParamInfo, ...]
    layout: str
    description: str
    file: str
    line: int
    #: the source text of `score EXPR` (None without a score term)
    score: str | None = None


def _read(path: Path, span: Span | None, display: str) -> str:
    where = span or Span(file=display, line=1, col=1, end_line=1, end_col=2)
    try:
        if path.exists() and not path.is_dir() and not path.is_file():
            # a FIFO, socket or device (/dev/zero) would block or never end
            raise AttnError(error(where, f"'{display}' is not a regular file"))
        with path.open("rb") as fh:  # read at most one byte past the limit, whatever the file's size
            raw = fh.read(ast.MAX_SOURCE_CHARS + 1)
    except IsADirectoryError:
        raise AttnError(error(where, f"'{display}' is a directory, not an .attn file")) from None
    except FileNotFoundError:
        raise AttnError(error(where, f"file not found: '{display}'")) from None
    except PermissionError:
        raise AttnError(error(where, f"cannot read '{display}': permission denied")) from None
    except OSError as exc:
        raise AttnError(error(where, f"cannot read '{display}': {exc.strerror or exc}")) from None
    if b"\x00" in raw[:8192]:
        raise AttnError(error(where, f"'{display}' is a binary file, not .attn text"))
    if len(raw) > ast.MAX_SOURCE_CHARS:
        raise AttnError(error(where, f"'{display}' is too large (more than {ast.MAX_SOURCE_CHARS} bytes)"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise AttnError(error(Span(file=display, line=line, col=col, end_line=line, end_col=col + 1),
                              f"'{display}' is not UTF-8 text (byte 0x{raw[exc.start]:02x})")) from None


class Program:
    """A loaded `.attn` file (with its imports), checked.

    >>> prog = attnc.loads("pattern win(w = 4) = sliding(w)")
    >>> prog.pattern("win", w=8).mask(16).shape
    torch.Size([1, 16, 16])
    """

    def __init__(self, root: str, scopes: dict[str, ModuleScope], sources: dict[str, str], order: list[str]):
        self.root = root
        self.scopes = scopes
        self.sources = sources
        self.files = order

    @property
    def scope(self) -> ModuleScope:
        return self.scopes[self.root]

    def names(self) -> list[str]:
        return list(self.scope.patterns)

    def patterns(self) -> list[PatternInfo]:
        out = []
        for pdef in self.scope.patterns.values():
            params = []
            for p in pdef.params:
                if p.type is not None:
                    t = p.type.name + (f"({', '.join(_text(self.sources, a.span) for a in p.type.args)})" if p.type.args else "")
                    params.append(ParamInfo(p.name, None, t))
                else:
                    params.append(ParamInfo(p.name, None if p.default is None else _text(self.sources, p.default.span), None))
            layout = "seq" if pdef.layout is None else _text(self.sources, pdef.layout.span)[2:].strip()
            score = None if pdef.score is None else " ".join(_text(self.sources, pdef.score.span).split())
            out.append(PatternInfo(pdef.name, tuple(params), layout, pdef.description, pdef.span.file, pdef.span.line,
                                   score))
        return out

    def pattern(self, name: str | None = None, /, **params) -> "BoundPattern":
        """Bind a pattern's parameters; `name` may be omitted when the file has one pattern."""
        pdef = find_pattern(self.scope, name, self.root, self.sources)
        return BoundPattern(self, bind_pattern(pdef, self.scope, params, self.sources), dict(params))


def _text(sources: dict[str, str], span: Span) -> str:
    src = sources.get(span.file, "")
    lines = source_lines(src)
    if span.line == 0 or span.line > len(lines):
        return ""
    if span.line == span.end_line:
        return lines[span.line - 1][span.col - 1: span.end_col - 1]
    parts = [lines[span.line - 1][span.col - 1:]] + lines[span.line: span.end_line - 1] + [lines[span.end_line - 1][: span.end_col - 1]]
    return " ".join(p.strip() for p in parts)


# ----------------------------------------------------------------------------- loading


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


#: extra import directories, separated like PATH (os.pathsep), after any `search_path=` / `-I DIR`
PATH_ENV = "ATTNC_PATH"


def search_dirs(search_path=None) -> list[Path]:
    """The explicit import directories: `search_path` entries, then $ATTNC_PATH's."""
    dirs = [Path(d) for d in (search_path or ())]
    dirs += [Path(d) for d in os.environ.get(PATH_ENV, "").split(os.pathsep) if d]
    out = []
    for d in dirs:
        try:
            out.append(d.resolve())
        except (OSError, RuntimeError):  # a symlink loop names no directory
            continue
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class _Loader:
    """Reads a file and its imports.

    [Note: import confinement] `import "x.attn"` names an `.attn` file relative to
    the importing file's folder, or else relative to one of the explicit search
    directories (`search_path=`, `attnc -I DIR`, $ATTNC_PATH), in that order. The
    file it resolves to (symlinks followed) must end in `.attn` and lie inside the
    folder tree of the file given to `load` (the working directory for `loads`) or of
    a search directory; anything else is refused before it is opened, so an import
    can neither read files outside those trees nor echo a line of a file that is
    not an `.attn` source in a diagnostic.
    """

    def __init__(self, root_dir: Path, search_path=None):
        self.sources: dict[str, str] = {}
        self.modules: dict[str, ast.Module] = {}
        self.scopes: dict[str, ModuleScope] = {}
        self.graph = nx.DiGraph()  # file -> imported file
        self.diags = Collector()
        self.base: dict[str, Path | None] = {}
        self.search = search_dirs(search_path)
        self.roots = [root_dir, *self.search]
        self.resolved: dict[tuple[str, ast.Import], str] = {}  # (file, import) -> display name of its target

    def load_text(self, source: str, file: str, base: Path | None) -> None:
        self.sources[file] = source
        self.base[file] = base
        self.graph.add_node(file)
        try:
            module = ast.parse(source, file)
        except AttnError as err:
            self.diags.extend(err)
            return
        self.modules[file] = module
        for item in module.items:
            if isinstance(item, ast.Import):
                self.load_import(file, item)

    def resolve(self, file: str, item: ast.Import) -> Path:
        """The real path an import names (see the note above); AttnError when refused."""
        if not Path(item.path).name.endswith(".attn") or Path(item.path).name == ".attn":
            raise AttnError(error(item.span, f"import \"{item.path}\": an import names an .attn file", 'import "common.attn"'))
        base = self.base[file] or Path.cwd()
        candidates = [base / item.path] + [d / item.path for d in self.search]
        refused = first = None
        for cand in candidates:
            try:
                real = cand.resolve()
            except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
                raise AttnError(error(item.span, f"import \"{item.path}\": cannot resolve '{cand}': "
                                      "a symbolic link loop or an unreadable folder")) from None
            first = first or real
            if not real.exists():
                continue
            if not real.name.endswith(".attn"):
                raise AttnError(error(item.span, f"import \"{item.path}\" resolves to '{real}', which is not an .attn file "
                                      "(imports follow symbolic links and read .attn files only)"))
            if not any(_inside(real, r) for r in self.roots):
                refused = refused or real
                continue
            return real
        if refused is not None:
            roots = ", ".join(f"'{r}'" for r in self.roots)
            raise AttnError(error(item.span, f"import \"{item.path}\" resolves to '{refused}', outside the folders "
                                  f"imports may read ({roots})",
                                  f"add its folder to the search path: attnc -I DIR, attnc.load(..., search_path=[DIR]) "
                                  f"or ${PATH_ENV}"))
        return first  # missing everywhere: _read reports the usual, relative meaning

    def load_import(self, file: str, item: ast.Import) -> None:
        try:
            target = self.resolve(file, item)
        except AttnError as err:
            self.diags.extend(err)
            return
        display = _display(target)
        self.resolved[(file, item)] = display
        self.graph.add_edge(file, display)
        try:
            cycle = nx.find_cycle(self.graph, source=file)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            chain = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
            self.diags.add(error(item.span, f"import cycle: {chain}"))
            self.graph.remove_edge(file, display)
            return
        if display in self.sources:
            return
        try:
            text = _read(target, item.span, display)
        except AttnError as err:
            self.diags.extend(err)
            return
        self.load_text(text, display, target.parent)

    def build_scopes(self) -> None:
        # dependencies first, so imported names are known
        for file in reversed(list(nx.topological_sort(self.graph))):
            module = self.modules.get(file)
            if module is None:
                continue
            self.scopes[file] = module_scope(
                module, self.diags, lambda item, file=file: self.scopes.get(self.resolved.get((file, item), "")))

    def check(self) -> None:
        """Elaborate every pattern of every file with its defaults."""
        for scope in self.scopes.values():
            check_scope(scope, self.diags)


def _finish(loader: _Loader, root: str) -> Program:
    loader.build_scopes()
    if root in loader.scopes:
        loader.check()
    loader.diags.raise_if_errors(loader.sources)
    order = list(loader.sources)
    return Program(root, loader.scopes, loader.sources, order)


def load(path: str | os.PathLike, search_path=None) -> Program:
    """Parse and check an `.attn` file and everything it imports.

    Imports resolve relative to the importing file, then to each directory of
    `search_path` (and of $ATTNC_PATH), and may only read `.attn` files inside the
    folder tree of `path` or of a search directory (docs/language.md, Imports).
    Raises `AttnError` with every diagnostic found (``FILE:LINE:COL: error: ...``).
    """
    p = Path(path)
    try:
        real = p.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        real = None
    display = _display(real) if real is not None and real.exists() else str(path)
    text = _read(p, None, display)
    folder = real.parent if real is not None else Path.cwd().resolve()
    loader = _Loader(folder, search_path)
    loader.load_text(text, display, folder)
    try:
        return _finish(loader, display)
    except AttnError as err:
        if display.endswith(".attn") or not any(d.span.file == display for d in err.diagnostics):
            raise
        # asked for by name, but not named like an .attn source: say so without echoing any of its text
        where = Span(file=display, line=1, col=1, end_line=1, end_col=2)
        raise AttnError(error(where, f"'{display}' is not an .attn source: its name does not end in .attn and it "
                              "does not parse as one (its contents are not shown)",
                              "rename it to NAME.attn if it is one")) from None


def loads(source: str, file: str = "<string>", search_path=None) -> Program:
    """Parse and check `.attn` source text; imports resolve from the working
    directory (and `search_path`), confined like `load`'s."""
    loader = _Loader(Path.cwd().resolve(), search_path)
    loader.load_text(source, file, None)
    return _finish(loader, file)
