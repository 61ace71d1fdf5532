"""Programs: loading files (imports, checks) and binding patterns.

input:  a path or a source string.
output: a `Program` whose patterns bind to `BoundPattern`s.
does not: compute anything heavy at load; masks are evaluated on demand.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from . import ir, ir_text, syntax as ast
from .elaborate import ModuleScope, bind_pattern, check_scope, find_pattern, module_scope
from .errors import AttnError, Collector, Span, error, source_lines
from .inputs import CuSeqlens
from .limits import require
from .runtime.registry import register

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


# ----------------------------------------------------------------------------- bound patterns


class BoundPattern:
    """A pattern with its parameters bound; callable as an attention op.

    Sizes (M, N, heads, grid) and run-time inputs are given per call.
    """

    def __init__(self, program: Program, pattern: ir.PatternIR, params: dict):
        self.program = program
        self.ir = pattern
        self.params = params
        # [Note: traced first calls] Everything `pat(q, k, v)` reads before the op is
        # computed here, eagerly: under torch.compile(fullgraph=True) the first call may
        # be traced, and dynamo cannot trace IR walks (networkx) or a registry write.
        self._topk = ir.has_topk(pattern)
        self.op_key = register(self, pattern.name)  # how the op names it (runtime/registry.py)

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def layout(self) -> ir.Layout:
        return self.ir.layout

    def __repr__(self) -> str:
        return f"<BoundPattern {ir_text.pattern_text(self.ir)}>"

    def text(self) -> str:
        """Canonical IR text (parameters symbolic, with their bindings)."""
        return ir_text.pattern_text(self.ir)

    # -- sizes
    def resolve_sizes(self, M: int, N: int | None, heads: int | None, grid) -> tuple[int, int, int, tuple | None]:
        """Validate call sizes; returns (M, N, H, grid)."""
        layout = self.ir.layout
        for name, v in (("M", M), ("N", N), ("heads", heads)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        H = heads if heads is not None else 1
        if layout.axes:
            if grid is None:
                raise ValueError(
                    f"pattern '{self.name}' is on {layout}: expected grid=(sizes of {', '.join(layout.axes)}), got grid=None; "
                    f"try grid={tuple(8 for _ in layout.axes)}")
            if isinstance(grid, int):
                grid = (grid,)
            grid = tuple(grid)
            if len(grid) != len(layout.axes) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid):
                raise ValueError(f"grid: expected {len(layout.axes)} positive sizes for axes ({', '.join(layout.axes)}), got {grid!r}")
            T = 0
            if layout.text is not None:
                # N is T + the grid's size, so T may use H, size(a) and parameters but not M or N
                env = {**self.ir.binding_map(), ir.H: H, **{ir.axis_size(a): g for a, g in zip(layout.axes, grid)}}
                T = _int(layout.text, env)
                if T is None or T < 0:
                    why = "must not depend on M or N (N is T plus the grid's size)" if T is None else f"must be >= 0, got {T}"
                    raise AttnError(error(layout.span, f"the text length T of seq(T) {why}"), self.program.sources)
            total = T + math.prod(grid)
            if N is None:
                N = total
            if M is None:  # on a grid the sizes follow from it
                M = N
            if N != total:
                extra = f"{T} text tokens + " if layout.text is not None else ""
                raise ValueError(f"N: expected {extra}{' * '.join(map(str, grid))} = {total} tokens for grid={grid}, got N={N}; "
                                 f"try N={total} or a grid whose product matches")
            if M > N:
                raise ValueError(f"M: on a grid the queries are the last M of the N grid tokens: expected M <= {N}, got M={M}")
        else:
            if grid is not None:
                raise ValueError(f"pattern '{self.name}' is on seq: expected grid=None, got grid={grid!r}; "
                                 f"try declaring it `on grid(...)`")
            if M is None:
                raise ValueError(f"pattern '{self.name}' is on seq: expected the query length M, got None; try M=1024")
            if N is None:
                N = M
        return M, N, H, grid

    # -- reference mask
    def mask(self, M: int, N: int | None = None, *, heads: int | None = None, grid=None, **inputs) -> torch.Tensor:
        """Dense boolean reference mask.

        Returns bool ``[H, M, N]`` (``[B, H, M, N]`` when run-time inputs are
        batched), True where query ``q`` may attend key ``k``. ``N`` defaults
        to ``M`` (or to the grid's token count); ``heads`` to 1. Meant for
        checking and small sizes: memory is O(H * M * N), estimated first; past
        the memory limit ($ATTNC_MAX_BYTES, default half of physical memory) a
        `limits.MemoryLimitError` (a ValueError) says so before allocating.

        >>> attnc.loads("pattern p = sliding(2)").pattern().mask(4)[0].int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
        """
        import torch

        from .reference import mask_bytes

        M, N, H, grid = self.resolve_sizes(M, N, heads, grid)
        batches, batched = self.input_batches(M, N, H, inputs)
        need = mask_bytes(M, N, H, len(self.layout.axes)) + (len(batches) * H * M * N if batched else 0)
        sizes = f"{M}, {N}, heads={H}" + (f", grid={grid}" if grid is not None else "")
        require(need, f"pat.mask({sizes}) of '{self.name}'" + (f" for {len(batches)} batch elements" if batched else ""),
                "pat.plan(...) (full / partial / empty tiles, no dense mask), pat.check_rows(...) for empty rows, "
                "or smaller M, N or heads")
        outs = [self._evaluate(M, N, H, grid, b) for b in batches]
        return torch.stack(outs) if batched else outs[0]

    def mask_rows(self, M: int, N: int, H: int, grid, lo: int, hi: int, inputs: dict | None = None) -> torch.Tensor:
        """Rows lo..hi of the mask (sizes already validated): bool [H, hi - lo, N]."""
        return self._evaluate(M, N, H, grid, inputs or {}, rows=(lo, hi))

    def mask_window(self, M: int, N: int, H: int, grid, rows: tuple[int, int], keys: tuple[int, int]) -> torch.Tensor:
        """The mask of query rows `rows` and key columns `keys` (half-open, sizes already
        validated): bool [H, rows, keys], evaluated only there."""
        import torch

        return self._evaluate(M, N, H, grid, {}, rows=rows, keys=torch.arange(*keys))

    def _evaluate(self, M: int, N: int, H: int, grid, inputs: dict, rows=None, keys=None) -> torch.Tensor:
        """reference.evaluate of this pattern, its diagnostics pointing into this program's sources."""
        from .reference import evaluate

        try:
            return evaluate(self.ir, M, N, H, grid, inputs, rows=rows, keys=keys)
        except AttnError as err:
            raise err.with_sources(self.program.sources) from None

    def check_input_names(self, inputs: dict, tables: bool = False) -> dict:
        """Raise ValueError unless `inputs` names exactly the declared run-time
        inputs (and, with `tables`, the score term's table inputs); returns
        {name: InputSpec} of the mask's inputs in declaration order."""
        specs = {s.name: s for s in self.ir.inputs}
        table_specs = {t.name: t for t in self.ir.tables}
        for name in inputs:
            if name in table_specs and not tables:
                raise ValueError(f"'{name}' is a table input, read only by the score term: the mask does not take it; "
                                 f"try passing only {', '.join(specs) or 'no inputs'} here, and {name}= to the op")
            if name not in specs and name not in table_specs:
                declared = ", ".join([*specs, *table_specs]) or "none"
                raise ValueError(f"unexpected input '{name}': pattern '{self.name}' declares run-time inputs: {declared}")
        for name, spec in specs.items():
            if name not in inputs:
                raise ValueError(f"missing run-time input '{name}' ({spec.kind}): expected {name}=tensor; "
                                 f"try pat(q, k, v, {name}=...) or pat.mask(M, N, {name}=...)")
        if tables:
            for name, t in table_specs.items():
                if name not in inputs:
                    raise ValueError(f"missing table input '{name}' of the score term: expected {name}=tensor of shape "
                                     f"({', '.join(str(d) for d in t.dims)}); try pat(q, k, v, {name}=torch.zeros(...))")
        return specs

    def table_shapes(self, M: int, N: int, H: int, grid) -> dict[str, tuple[int, ...]]:
        """The shape of every table input of the score term at these sizes ({} without one)."""
        if not self.ir.tables:
            return {}
        env = {**self.ir.binding_map(), ir.M: M, ir.N: N, ir.H: H}
        if grid is not None:
            env.update({ir.axis_size(a): s for a, s in zip(self.ir.layout.axes, grid)})
        out = {}
        for t in self.ir.tables:
            dims = tuple(_int(d, env) for d in t.dims)
            if any(d is None or d < 1 for d in dims):
                raise AttnError(error(t.span, f"table '{t.name}' has shape {dims} at M = {M}, N = {N}, H = {H}: "
                                              "every dimension must be a positive integer"), self.program.sources)
            out[t.name] = dims
        return out

    def input_batches(self, M: int, N: int, H: int, inputs: dict, batch: int | None = None) -> tuple[list[dict], bool]:
        """Validate run-time inputs; returns (one dict per batch element, whether
        any input carried a batch dimension).

        [Note: input batches] The broadcasting rule, the same for every backend:
        an input's batch dimension (absent = 1) is 1 -- one input shared by the
        whole batch -- or the batch `batch` of q when the op is called; anything
        else is a ValueError (expected / got / try). Without `batch` (`mask`,
        `to_flex`) the inputs' batches must agree the same way among
        themselves. The list returned has one entry when every input has batch
        1, else one per batch element. The op checks this once, in
        `runtime/ops.make_call`, before any backend runs."""
        import torch

        specs = self.check_input_names(inputs)
        if not specs:
            return [{}], False
        per_batch: list[dict] = []
        B = batch
        first = None  # the input that set B when no batch is given
        batched = False
        normalized = {}
        for name, spec in specs.items():
            t = inputs[name]
            if isinstance(t, CuSeqlens):
                if spec.kind != "segments":
                    raise ValueError(f"{name}: cu_seqlens offsets describe segments, but '{name}' is {spec.kind}({spec.block})")
                t = t.segment_ids(N, name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a torch integer tensor, got {type(t).__name__}; try torch.as_tensor({name})")
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
                raise ValueError(f"{name}: expected an integer tensor, got dtype {t.dtype}; try {name}.long()")
            t = t.to("cpu", torch.int64)
            batched |= t.dim() == (2 if spec.kind == "segments" else 4)
            if spec.kind == "segments":
                if t.dim() == 1:
                    t = t[None]
                if t.dim() != 2 or t.shape[-1] != N:
                    raise ValueError(f"{name}: expected segment ids of shape [B, N] = [B, {N}], got {tuple(inputs[name].shape)}; "
                                     f"try one id per key position, or attnc.cu_seqlens(offsets)")
            else:
                b = _int(spec.block, {**self.ir.binding_map(), ir.M: M, ir.N: N, ir.H: H})
                if b is None or b < 1:
                    raise AttnError(error(spec.span, f"the block size of '{name}' must be a positive integer here, got {b}"),
                                    self.program.sources)
                nqb, nkb = -(-M // b), -(-N // b)
                if t.dim() == 3:
                    t = t[None]
                if t.dim() != 4 or t.shape[2] != nqb or t.shape[1] not in (1, H):
                    raise ValueError(f"{name}: expected block indices of shape [B, H, ceil(M/{b}), kmax] = [B, {H}, {nqb}, kmax], "
                                     f"got {tuple(inputs[name].shape)}; try H or 1 heads and one row per query block")
                if t.numel() and (int(t.min()) < -1 or int(t.max()) >= nkb):
                    raise ValueError(f"{name}: expected key-block indices in [0, {nkb}) or -1 for padding, "
                                     f"got values in [{int(t.min())}, {int(t.max())}]; try {name}.masked_fill(({name} < 0) | "
                                     f"({name} >= {nkb}), -1) to drop the others")
            got = t.shape[0]
            if B is None or (batch is None and B == 1):
                if got > 1 or B is None:
                    B, first = got, name
            elif got not in (1, B):
                whose = "q's batch" if batch is not None else f"the batch of '{first}'"
                raise ValueError(f"{name}: expected batch size 1 (shared by the whole batch) or {B} ({whose}), got {got} "
                                 f"(shape {tuple(inputs[name].shape)}); try one entry per batch element, {B} in all, "
                                 f"or a single one for every element")
            normalized[name] = t
        rows = 1 if all(t.shape[0] == 1 for t in normalized.values()) else B
        for bi in range(rows):
            per_batch.append({n: (t[bi] if t.shape[0] > 1 else t[0]) for n, t in normalized.items()})
        return per_batch, batched

    # -- analysis
    def plan(self, M: int, N: int | None = None, *, heads: int | None = None, grid=None, block=(128, 128), **inputs):
        """Tile plan: per query tile its full and partial key tiles (and the
        transposed view), built from the pattern's structure (see analysis.py).

        >>> plan = attnc.loads("pattern p = sliding(64)").pattern().plan(1000, block=(64, 64))
        >>> plan.counts()["tiles_partial"], plan.method
        (31, 'closed-form')
        """
        from .codegen.pipeline import Shape, plan

        M, N, H, grid = self.resolve_sizes(M, N, heads, grid)
        shape = Shape.of(self.ir, M, N, H, grid).with_tiles(self.ir, block)
        one = None
        if inputs or self.ir.inputs:
            batches, _ = self.input_batches(M, N, H, inputs)
            if len(batches) != 1:
                raise ValueError(f"plan: expected the run-time inputs of one batch element, got {len(batches)}; "
                                 f"try plan(..., {next(iter(inputs))}=x[0])")
            one = batches[0]
        shape = shape.with_inputs({n: tuple(t.shape) for n, t in (one or {}).items()})
        return plan(self.ir, shape, self.program.sources, one, padded=False)

    def check_rows(self, M: int, N: int | None = None, *, heads: int | None = None, grid=None):
        """Static row checks (`analysis.RowReport`): how many query rows attend no
        key, one witness (head, row), and whether the pattern is fully dense.
        Proved from the closed-form interval counts (no mask is built) when the
        pattern has one, else by an exact scan in row chunks.

        >>> attnc.loads("pattern p = sliding(4) - causal").pattern().check_rows(1 << 20).witness
        (0, 0)
        """
        M, N, H, grid = self.resolve_sizes(M, N, heads, grid)
        if self.ir.inputs:
            raise ValueError(f"pattern '{self.name}' depends on run-time inputs ({', '.join(i.name for i in self.ir.inputs)}): "
                             f"expected a static pattern; try pat.mask(..., {self.ir.inputs[0].name}=...) and inspect its rows")
        from .analysis import row_report

        try:
            return row_report(self.ir, M, N, H, grid)
        except AttnError as err:
            raise err.with_sources(self.program.sources) from None

    def formula(self):
        """Exact allowed pairs, density and forward FLOPs of this 1-D pattern as
        sympy formulas of N and the parameters (self-attention, M = N), with the
        conditions under which they hold (`symbolic.Formula`). Derived once per
        bound pattern and cached. Raises `piecewise.NoFormula` (a ValueError)
        saying why when the pattern has none (grids, block, strided, where, ...).

        >>> str(attnc.loads("pattern p(w = 8) = sliding(w)").pattern().formula().density)
        'w/N - w*(w - 1)/(2*N**2)'
        """
        from .symbolic import formula

        return formula(self.ir)

    def simulate(self, M: int, N: int | None = None, *, heads: int | None = None, head_dim: int = 128, grid=None,
                 tile=(128, 128), gpu: str = "h100", batch: int = 1, routed_density: float | None = None, **inputs):
        """Density, tile counts and the roofline speedup estimate (`SimReport`).

        Dynamic patterns: pass their run-time inputs (one batch element), or
        ``routed_density=0.1`` to draw every missing block table (and every
        ``topk``'s choice, k = ceil(0.1 * key blocks)) at that density; without
        it ``topk(k)`` is simulated with its own k among its eligible blocks.
        """
        from .simulate import simulate_plan

        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim: expected a positive integer, got {head_dim!r}")
        if self.ir.inputs or routed_density is not None or self.has_topk():
            from .dynamic import synthetic_inputs
            M, N, H, grid = self.resolve_sizes(M, N, heads, grid)
            pat, inputs = synthetic_inputs(self, M, N, H, grid, routed_density, inputs)
            plan = pat.plan(M, N, heads=H, grid=grid, block=tile, **inputs)
            return simulate_plan(plan, name=self.name, head_dim=head_dim, gpu=gpu, batch=batch)
        plan = self.plan(M, N, heads=heads, grid=grid, block=tile)
        rep = simulate_plan(plan, name=self.name, head_dim=head_dim, gpu=gpu, batch=batch)
        from .piecewise import NoFormula
        try:
            f = self.formula() if plan.M == plan.N else None
        except NoFormula:
            f = None
        if f is not None and f.valid_at(plan.N):
            import dataclasses
            rep = dataclasses.replace(rep, density_formula=str(f.density), formula_exact_when=f.condition_text())
        return rep

    def sweep(self, over: str, values, *, N: int | None = None, heads: int | None = None, head_dim: int = 128,
              grid=None, tile=(128, 128), gpu: str = "h100"):
        """`simulate` at every value of one variable (`simulate.Sweep`, with
        `to_table()`, `to_json()` and `plot(path)`): ``over="N"`` varies the
        length (M = N, 1-D patterns), any other name rebinds that parameter
        at length ``N``.

        >>> sw = attnc.loads("pattern p(w = 64) = sliding(w)").pattern().sweep("N", [1024, 4096])
        >>> [round(r.flop_bound, 1) for r in sw.reports]
        [16.5, 64.5]
        """
        from .progress import each
        from .simulate import Sweep

        values = tuple(values)
        if not values:
            raise ValueError("sweep: expected at least one value, got none; try values=[1024, 2048]")
        reports = []
        if over == "N":
            if self.layout.axes:
                raise ValueError(f"sweep over N: pattern '{self.name}' is on {self.layout}; expected a 1-D pattern; "
                                 f"try sweeping a parameter at a fixed grid")
            for v in each(values, f"simulating {over} = ...", unit="point"):
                reports.append(self.simulate(v, v, heads=heads, head_dim=head_dim, tile=tile, gpu=gpu))
        else:
            info = next((i for i in self.program.patterns() if i.name == self.name), None)
            known = [p.name for p in info.params] if info else []
            if over not in known:
                raise ValueError(f"sweep: expected N or a parameter of '{self.name}' ({', '.join(known) or 'none'}), got {over!r}")
            if N is None and grid is None:
                raise ValueError(f"sweep over {over}: expected a length N=... (or grid=...) to simulate at, got none")
            for v in each(values, f"simulating {over} = ...", unit="point"):
                pat = self.program.pattern(self.name, **{**self.params, over: v})
                n = N if grid is None else pat.resolve_sizes(1, N, heads, grid)[1]
                reports.append(pat.simulate(n, n, heads=heads, head_dim=head_dim, grid=grid, tile=tile, gpu=gpu))
        return Sweep(over=over, values=values, reports=tuple(reports))

    # -- dynamic routing
    def route(self, q: torch.Tensor, k: torch.Tensor, *, grid=None, **inputs) -> tuple["BoundPattern", dict]:
        """Resolve `topk` for these tensors: returns the pattern with every
        `topk` replaced by `routed(topk_selN)` and the inputs extended with the
        chosen block tables (int32 ``[B, H, ceil(M/b), k]``, -1 padding). A
        pattern without `topk` returns itself and the inputs unchanged.

        The lowered pattern's `mask(M, N, **inputs)` is then the reference
        for the op; the selection rule is documented in attnc/dynamic.py and
        docs/language.md.
        """
        import torch

        from . import dynamic

        if not self.has_topk():
            return self, inputs
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
            raise ValueError("route: expected q [B, Hq, M, D] and k [B, Hkv, N, D] tensors")
        B, H, M, _ = q.shape
        N = k.shape[2]
        M, N, H, grid = self.resolve_sizes(M, N, H, grid)
        batches, _ = self.input_batches(M, N, H, inputs, batch=B)
        lowered = self.topk_lowering()
        tables = dynamic.route(lowered, q, k, M, N, H, grid, batches, lambda e: self.value_at(e, M, N, H, grid))
        return self.routed_pattern, {**inputs, **tables}

    def value_at(self, expr, M: int, N: int, H: int, grid) -> int | None:
        """An integer expression of this pattern (parameters, M, N, H, size(a)) at these sizes."""
        env = {**self.ir.binding_map(), ir.M: M, ir.N: N, ir.H: H}
        if grid is not None:
            env.update({ir.axis_size(a): s for a, s in zip(self.ir.layout.axes, grid)})
        return _int(expr, env)

    def has_topk(self) -> bool:
        return self._topk

    def topk_lowering(self):
        """The topk-lowered IR and its BoundPattern, built once per pattern."""
        from . import dynamic
        if getattr(self, "_lowered_cache", None) is None:
            self._lowered_cache = dynamic.lower_topk(self.ir)
            self.routed_pattern = BoundPattern(self.program, self._lowered_cache.pattern, self.params)
        return self._lowered_cache

    # -- FlexAttention
    def to_flex(self, M: int, N: int | None = None, *, heads: int | None = None, grid=None, block=(128, 128),
                device="cpu", **inputs):
        """``(mask_mod, block_mask)`` for ``torch.nn.attention.flex_attention``.

        The ``BlockMask`` (``BLOCK_SIZE=block``) is built from this pattern's
        tile plan, not by evaluating ``mask_mod`` on every position; ``mask_mod``
        is exact everywhere (a lookup into the plan and the partial tiles' bits).
        Run-time inputs are passed as keywords, as for the op.

        >>> mask_mod, bm = pat.to_flex(4096, heads=8)
        >>> out = torch.compile(flex_attention)(q, k, v, block_mask=bm)
        """
        from .runtime.flex import to_flex
        return to_flex(self, M, N, heads=heads, grid=grid, block=block, device=device, **inputs)

    # -- decoding
    def kv_retention(self, L: int, *, heads: int | None = None):
        """bool ``[heads, L]``: the cached keys (positions ``0 .. L-1``) that some query at a
        position ``>= L`` may still attend; the others can be evicted for good. Derived from
        the pattern in closed form and conservative (attnc/retention.py): ``sliding(w) |
        (sink(s) & causal)`` keeps the first ``s`` and the last ``w - 1``; a ``heads {}``
        mixture decides per head (DuoAttention's retrieval heads keep everything).

        >>> keep = pat.kv_retention(32768, heads=8)
        """
        from .retention import retention
        H = 1 if heads is None else heads
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"heads: expected a positive integer, got {heads!r}")
        return retention(self.ir, L, H)

    def decode(self, q, k_cache, v_cache, *, cache_seqlens=None, block_table=None, key_positions=None,
               scale: float | None = None, return_lse: bool = False, backend: str = "auto", **tables):
        """Attention of the last ``m`` positions of each sequence over its KV cache.

        ``q [B, Hq, m, D]`` holds the newest ``m`` tokens of each sequence (already appended to
        the cache: query row ``i`` of sequence ``b`` is position ``cache_seqlens[b] - m + i``).
        The cache is ``[B, Hkv, S, D]`` (``cache_seqlens`` defaults to ``S``), or paged:
        ``[pages, Hkv, page_size, D]`` with ``block_table [B, max_pages]`` (HND pages, vLLM /
        FlashInfer addressing), or per key/value head ``[B, S_g, D]`` tensors with
        ``key_positions`` (what `attnc.nn.KVCache` keeps after evicting). Equals the op's
        last ``m`` rows; only the keys the pattern allows are read, found in closed form
        without a plan (runtime/decode.py). Score-term tables are keywords. ``backend``:
        "auto" (the split-KV Triton kernel on CUDA where it can run, else the torch path),
        "torch", or "triton" (on CPU tensors with TRITON_INTERPRET=1: the interpreter).

        >>> out = pat.decode(q, k_cache, v_cache, cache_seqlens=torch.tensor([1000, 37]))
        """
        from .runtime.decode import decode
        return decode(self, q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
                      key_positions=key_positions, scale=scale, return_lse=return_lse, backend=backend, **tables)

    # -- the op
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False,
                 scale: float | None = None, backend: str = "auto", grid=None, block=None, **inputs):
        """Attention restricted to the pattern.

        q ``[B, Hq, M, D]``, k ``[B, Hkv, N, D]``, v ``[B, Hkv, N, Dv]``; GQA
        when ``Hq % Hkv == 0``. Returns ``out [B, Hq, M, Dv]`` (and
        ``lse [B, Hq, M]`` in float32 with ``return_lse=True``). Queries with
        no allowed key give 0 and lse ``-inf``. ``scale`` defaults to
        ``1/sqrt(D)``. ``backend``: "auto" (Triton where it can run, else the
        block-sparse torch path), "triton", "torch", "flex" (FlexAttention with
        attnc's BlockMask; forward only on CPU) or "reference" (dense, for
        checking). A registered ``torch.library`` op: works under autograd,
        ``torch.autograd.gradcheck`` and ``torch.compile(fullgraph=True)``.
        ``block`` picks the Triton kernels' tiles, spelled like ``plan(block=)``:
        ``(64, 32)``, or N-D tiles on a pure grid such as ``((8, 8), (8, 4))``
        (tokens permuted into tile-major order, see docs/codegen.md); other
        backends choose their own tiles.
        """
        from .runtime.ops import attention
        return attention(self, q, k, v, return_lse=return_lse, scale=scale, backend=backend, grid=grid, inputs=inputs,
                         block=block)


def _int(expr, env) -> int | None:
    """The value of `expr` under `env` (bindings may refer to each other), None if unknown."""
    import sympy
    v = sympy.sympify(expr)
    for _ in range(len(env) + 1):  # bindings are in terms of earlier ones: substitute to a fixed point
        if isinstance(v, int) or not v.free_symbols:
            break
        v = v.xreplace(env)
    if isinstance(v, int):
        return v
    return int(v) if v.is_Integer else None
