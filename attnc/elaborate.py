"""Elaboration: AST -> IR, with name resolution and checks.

input:  parsed modules (syntax.Module) of a program and a pattern to bind.
output: a `PatternIR` (integer parameters symbolic, with their bindings), or
        diagnostics collected into an `AttnError`.
does not: evaluate masks, look at sizes known only at call time (the
        reference evaluator re-checks constraints once M, N and grids are known).
"""

from __future__ import annotations

import difflib
from collections import ChainMap
from dataclasses import dataclass, field

import sympy

from . import ir, semantics, syntax as ast
from .constraints import violations
from .errors import AttnError, Collector, Span, error

# ----------------------------------------------------------------------------- values


class Poison:
    """The value of an expression that already produced a diagnostic."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance


POISON = Poison()


@dataclass(frozen=True)
class PatternRef:
    definition: ast.PatternDef
    module: "ModuleScope"


@dataclass(frozen=True)
class InputRef:
    spec: ir.InputSpec


@dataclass(frozen=True)
class TableRef:
    """A `table(...)` run-time input: only indexed inside a score term."""

    spec: ir.TableSpec


@dataclass(frozen=True)
class ScoreVal:
    """A real-valued expression inside a score term."""

    node: ir.SExpr


@dataclass(frozen=True)
class Pos:
    """A position expression inside `where`; `boolean` tells its type."""

    node: ir.PExpr
    boolean: bool


class _Abort(Exception):
    """Unwinds one expression after its diagnostic has been recorded."""


_FAILED = object()  # a memoised failure
_MISSING = object()


def _memo_key(v):
    """A hashable stand-in for an evaluated argument: IR values by identity (hashing
    a DAG-shaped mask would walk its whole tree), the rest by value."""
    if isinstance(v, (ir.Mask, PatternRef, InputRef, Pos)):
        return ("id", id(v))
    return v


def type_name(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, sympy.Expr):
        return "an integer"
    if isinstance(v, (ir.SetList, ir.SetRange)):
        return "a set"
    if isinstance(v, tuple):
        return "a tuple"
    if isinstance(v, ir.Mask):
        return "a mask"
    if isinstance(v, Pos):
        return "a condition" if v.boolean else "a position expression"
    if isinstance(v, InputRef):
        return f"a run-time input ({v.spec.kind})"
    if isinstance(v, TableRef):
        return "a table input (index it: name[i, ...])"
    if isinstance(v, ScoreVal):
        return "a real number (a score expression)"
    if isinstance(v, PatternRef):
        return "a pattern"
    return "a value"


# ----------------------------------------------------------------------------- scopes


@dataclass
class ModuleScope:
    """Names visible at the top level of one file (its own and imported)."""

    module: ast.Module
    lets: dict[str, ast.Let] = field(default_factory=dict)
    patterns: dict[str, ast.PatternDef] = field(default_factory=dict)
    imported: dict[str, "tuple[str, ModuleScope]"] = field(default_factory=dict)

    def lookup(self, name: str):
        """-> ("let", Let, scope) | ("pattern", PatternDef, scope) | None."""
        if name in self.lets:
            return ("let", self.lets[name], self)
        if name in self.patterns:
            return ("pattern", self.patterns[name], self)
        if name in self.imported:
            kind_scope = self.imported[name]
            return kind_scope[1].lookup(name)
        return None

    def visible_names(self) -> list[str]:
        return [*self.lets, *self.patterns, *self.imported]


@dataclass
class Ctx:
    """Lexical context of one expression."""

    module: ModuleScope
    layout: ir.Layout
    locals: dict[str, object]
    in_where: bool = False
    #: inside `score EXPR` (in_where is set too: q, k, h and coordinates are positions)
    in_score: bool = False
    along: str | None = None  # inside `P @ a`
    transformed: bool = False  # inside dilate / blockwise / @
    #: locals named q, k or h: name -> what binds it ("parameter" / "let binding"); inside
    #: `where` those names are positions and the head, so a use there is an error
    hidden: dict[str, str] = field(default_factory=dict)

    def child(self, **kw) -> "Ctx":
        c = Ctx(self.module, self.layout, dict(self.locals), self.in_where, self.in_score, self.along, self.transformed,
                dict(self.hidden))
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    @property
    def ndim(self) -> int:
        if self.along is not None or not self.layout.axes:
            return 1
        return len(self.layout.axes)


# ----------------------------------------------------------------------------- primitive signatures

INT, AXIS_INT, AXIS_BOOL, SET = semantics.INT, semantics.AXIS_INT, semantics.AXIS_BOOL, semantics.SET
MASK, SEGMENTS, BLOCKS = "mask", "segments", "blocks"
_REQUIRED = semantics.REQUIRED

#: name -> (parameters [(name, kind, default)], description of the call): the positional primitives'
#: signatures are declared with their definitions (semantics.py), the others here
PRIMITIVES = ChainMap(semantics.SIGNATURES, {
    "random": ([("r", INT, _REQUIRED), ("seed", INT, 0)], "random(r, seed=0)"),
    "same": ([("doc", SEGMENTS, _REQUIRED)], "same(doc)"),
    "routed": ([("sel", BLOCKS, _REQUIRED)], "routed(sel)"),
    "topk": ([("k", INT, _REQUIRED), ("block", INT, 64)], "topk(k, block=64)"),
    "dilate": ([("d", AXIS_INT, _REQUIRED), ("pattern", MASK, _REQUIRED)], "dilate(d, P)"),
    "blockwise": ([("b", AXIS_INT, _REQUIRED), ("pattern", MASK, _REQUIRED)], "blockwise(b, P)"),
})
FUNCTIONS = {"min": "min(a, b, ...)", "max": "max(a, b, ...)", "abs": "abs(x)", "size": "size(axis)"}
INPUT_TYPES = {"segments": 0, "blocks": 1, "table": None}


def _note_hidden(ctx: Ctx, name: str, kind: str) -> None:
    """Record a local named q, k or h: inside `where` those names are the positions and the
    head, so a `where` that uses one would silently ignore the local (`ev_Name` refuses it)."""
    if name in ("q", "k", "h"):
        ctx.hidden[name] = kind


def _is_int(v) -> bool:
    return isinstance(v, sympy.Expr)


def _short(v: int) -> str:
    text = str(v)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-4:]} ({len(text)} digits)"


#: primitives whose IR node takes exactly the primitive's arguments
_NODES = ChainMap(semantics.NODES, {"random": ir.Random, "topk": ir.TopK})

# ----------------------------------------------------------------------------- the elaborator


class Elaborator:
    """Turns pattern definitions into IR. Errors go to `self.diags`."""

    MAX_CALL_DEPTH = 64
    #: Deepest nesting of expressions while elaborating, counted through `let`s
    #: and pattern calls (each level costs a few Python frames; see
    #: syntax.MAX_EXPR_DEPTH for the limit on one expression).
    MAX_EVAL_DEPTH = 250
    #: Largest integer exponent kept symbolically (`p ** 64`): `(p ** 64) ** 64`
    #: would be p ** 4096, whose value no evaluator could hold.
    MAX_EXPONENT = 64
    #: Largest bound pattern, counted as a tree (lets and pattern calls inlined): every
    #: later pass (IR text, hashing, the evaluators, code generation) walks the tree.
    MAX_IR_NODES = 20_000

    def __init__(self, diags: Collector):
        self.diags = diags
        self.depth = 0
        self.bindings: dict[sympy.Symbol, ir.Int] = {}
        self.inputs: dict[str, ir.InputSpec] = {}
        self.tables: dict[str, ir.TableSpec] = {}
        self.call_stack: list[str] = []
        self.let_stack: list[str] = []
        # [Note: shared sub-results] A `let` or a pattern call is elaborated once per
        # context and its value reused, so `let a2 = a1 | a1` chains (and patterns that
        # call the previous one twice) cost linear, not exponential, time: the IR is a DAG
        # whose shared vertices are the same Python objects. Failures are memoised too.
        self.memo: dict[tuple, object] = {}

    # -- diagnostics
    def fail(self, span: Span, message: str, hint: str | None = None):
        self.diags.add(error(span, message, hint))
        raise _Abort

    def static_int(self, v) -> int | None:
        """The value of an integer expression once bindings are applied, if known."""
        if not _is_int(v):
            return None
        val = v.xreplace(self.bindings) if self.bindings else v
        if val.free_symbols:
            val = val.xreplace(self.bindings)
        return int(val) if val.is_Integer else None

    # -- patterns
    def bind(self, pdef: ast.PatternDef, module: ModuleScope, values: dict[str, object], call_span: Span) -> ir.PatternIR:
        """Elaborate `pdef` as the top-level pattern with user `values`."""
        known = {p.name for p in pdef.params}
        for name in values:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f"did you mean '{close[0]}'?" if close else None
                params = ", ".join(sorted(known)) or "none"
                self.diags.add(error(pdef.name_span, f"pattern '{pdef.name}' has no parameter '{name}' (its parameters: {params})", hint))
        layout = self.layout(pdef, module)
        ctx = Ctx(module, layout, {})
        for p in pdef.params:
            try:
                ctx.locals[p.name] = self.param_value(p, ctx, values, top=True)
            except _Abort:
                ctx.locals[p.name] = POISON
            _note_hidden(ctx, p.name, "parameter")
        layout = self.layout_text(pdef, ctx, layout)
        ctx.layout = layout
        self.call_stack.append(pdef.name)
        body = self.mask_of(pdef.body, ctx, what=f"the body of pattern '{pdef.name}'")
        self.call_stack.pop()
        size = ir.tree_size(body, self.MAX_IR_NODES)
        if size > self.MAX_IR_NODES:
            self.diags.add(error(pdef.name_span, f"pattern '{pdef.name}' is too large: more than {self.MAX_IR_NODES} "
                                 "operators and primitives once its lets and pattern calls are written out",
                                 "a chain where each definition uses the previous one twice doubles at every step; "
                                 "reuse a definition once (P | P is P)"))
            body = ir.Empty(span=pdef.body.span)
        score = self.score_of(pdef, ctx)
        return ir.PatternIR(
            name=pdef.name, layout=layout, body=body,
            bindings=tuple(self.bindings.items()), inputs=tuple(self.inputs.values()), span=pdef.span, score=score,
        )

    def layout(self, pdef: ast.PatternDef, module: ModuleScope) -> ir.Layout:
        """Axes of the layout (the text length needs parameters: layout_text)."""
        if pdef.layout is None:
            return ir.Layout(span=pdef.span)
        axes: list[str] = []
        seen_seq = seen_grid = False
        for part in pdef.layout.parts:
            if part.kind == "seq":
                if seen_seq or seen_grid:
                    self.diags.add(error(part.span, "a mixed layout is written `seq(T) + grid(a, b)`: one seq part, first"))
                seen_seq = True
                if len(part.args) > 1:
                    self.diags.add(error(part.span, f"seq takes at most one argument (the text length), got {len(part.args)}"))
            elif part.kind == "grid":
                if seen_grid:
                    self.diags.add(error(part.span, "a layout has at most one grid part"))
                seen_grid = True
                if not 1 <= len(part.args) <= 3:
                    self.diags.add(error(part.span, f"grid takes 1 to 3 axis names, got {len(part.args)}"))
                for a in part.args:
                    if not isinstance(a, ast.Name):
                        self.diags.add(error(a.span, "grid axes are names, e.g. grid(h, w); sizes are given at call time"))
                    elif a.id in ir.RESERVED - {"h"}:  # `h` alone is the head; `q.h`, `size(h)`, `@ h` the axis
                        self.diags.add(error(a.span, f"'{a.id}' cannot name a grid axis: it is reserved (M N H q k _)"))
                    elif a.id in axes:
                        self.diags.add(error(a.span, f"grid axis '{a.id}' appears twice"))
                    else:
                        axes.append(a.id)
            else:
                close = difflib.get_close_matches(part.kind, ["seq", "grid"], n=1)
                self.diags.add(error(part.span, f"unknown layout '{part.kind}': expected seq, grid(...) or seq(T) + grid(...)",
                                     f"did you mean '{close[0]}'?" if close else None))
        return ir.Layout(axes=tuple(axes), text=None, span=pdef.layout.span)

    def layout_text(self, pdef: ast.PatternDef, ctx: Ctx, layout: ir.Layout) -> ir.Layout:
        if pdef.layout is None:
            return layout
        parts = pdef.layout.parts
        seq = [p for p in parts if p.kind == "seq"]
        if not seq or not seq[0].args or len(parts) == 1:
            if seq and seq[0].args and len(parts) == 1:
                self.diags.add(error(seq[0].span, "seq(T) only makes sense before a grid part: `seq(T) + grid(h, w)`"))
            return layout
        if not layout.axes:
            return layout
        try:
            t = self.int_of(seq[0].args[0], ctx, "the text length T of seq(T)")
        except _Abort:
            return layout
        v = self.static_int(t)
        if v is not None and v < 0:
            self.diags.add(error(seq[0].args[0].span, f"the text length must be >= 0, got {v}"))
        return ir.Layout(axes=layout.axes, text=t, span=layout.span)

    def param_value(self, p: ast.Param, ctx: Ctx, values: dict[str, object], top: bool):
        if p.name in ir.SIZE_NAMES or p.name == "_":
            self.fail(p.span, f"'{p.name}' cannot be a parameter name: M, N, H and _ are reserved")
        if p.name in ctx.layout.axes:
            self.fail(p.span, f"parameter '{p.name}' has the name of a grid axis")
        if p.type is not None:
            return self.input_param(p, ctx, values, top)
        if p.name in values:
            v = values[p.name]
            if isinstance(v, ast.Node):  # an argument expression from a calling pattern
                return v
            return self.from_python(v, p, ctx, top)
        if p.default is None:
            if top:
                self.fail(p.span, f"parameter '{p.name}' has no default: bind it, e.g. prog.pattern(..., {p.name}=...)")
            self.fail(p.span, f"parameter '{p.name}' has no default and the call does not give it")
        v = self.ev(p.default, ctx)
        if isinstance(v, ir.Mask):
            return v
        if top and _is_int(v):
            sym = ir.param_symbol(p.name)
            self.bindings[sym] = v.xreplace(self.bindings)
            return sym
        return v

    def from_python(self, v, p: ast.Param, ctx: Ctx, top: bool):
        """Convert a Python value given at bind time."""
        span = p.span
        if isinstance(v, bool):
            return v
        if isinstance(v, int):
            if abs(v) > ast.MAX_INT:
                self.fail(span, f"parameter '{p.name}': {v} is too large (limit 2**60 = {ast.MAX_INT})")
            if top:
                sym = ir.param_symbol(p.name)
                self.bindings[sym] = sympy.Integer(v)
                return sym
            return sympy.Integer(v)
        if isinstance(v, range):
            if v.step < 1:
                self.fail(span, f"parameter '{p.name}': a range needs a positive step, got {v.step}")
            return ir.SetRange(start=sympy.Integer(v.start), stop=sympy.Integer(v.stop), step=sympy.Integer(v.step))
        if isinstance(v, (set, frozenset)):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                self.fail(span, f"parameter '{p.name}': expected a set of integers, got {v!r}")
            return ir.SetList(items=tuple(sympy.Integer(x) for x in sorted(v)))
        if isinstance(v, (tuple, list)):
            if v and all(isinstance(x, bool) for x in v):
                return tuple(v)
            if not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                self.fail(span, f"parameter '{p.name}': expected a tuple of integers or of booleans, got {v!r}")
            return tuple(sympy.Integer(x) for x in v)
        try:  # numpy / torch integer scalars
            import numbers
            if isinstance(v, numbers.Integral):
                return self.from_python(int(v), p, ctx, top)
        except TypeError:
            pass
        self.fail(span, f"parameter '{p.name}': expected an integer, boolean, tuple or set, got {type(v).__name__} {v!r}",
                  f"{p.name}=3, {p.name}=(3, 5) or {p.name}={{0, 1}}")

    def input_param(self, p: ast.Param, ctx: Ctx, values: dict[str, object], top: bool = True):
        t = p.type
        if t.name not in INPUT_TYPES:
            close = difflib.get_close_matches(t.name, list(INPUT_TYPES), n=1)
            self.fail(t.span, f"unknown run-time input type '{t.name}': expected segments, blocks(b) or table(d1, ...)",
                      f"did you mean '{close[0]}'?" if close else None)
        if t.name == "table":
            return self.table_param(p, ctx, values, top)
        if p.name in values and isinstance(values[p.name], InputRef):
            return values[p.name]
        if p.name in values and not isinstance(values[p.name], ast.Node):
            self.fail(p.span, f"'{p.name}' is a run-time input ({t.name}): pass it as a tensor when calling the op, not when binding",
                      f"pat(q, k, v, {p.name}=tensor)")
        block = None
        if t.name == "segments":
            if t.args:
                self.fail(t.span, f"segments takes no arguments, got {len(t.args)}")
        else:
            if len(t.args) != 1:
                self.fail(t.span, "blocks needs the block size: blocks(64)")
            block = self.int_of(t.args[0], ctx, "the block size of blocks(b)")
            bv = self.static_int(block)
            if bv is not None and bv < 1:
                self.fail(t.args[0].span, f"block size must be >= 1, got {bv}")
        spec = ir.InputSpec(name=p.name, kind=t.name, block=block, span=p.span)
        prev = self.inputs.get(p.name)
        if prev is not None and (prev.kind, prev.block) != (spec.kind, spec.block):
            self.fail(p.span, f"run-time input '{p.name}' is declared twice with different types")
        self.inputs[p.name] = spec
        return InputRef(spec)

    def table_param(self, p: ast.Param, ctx: Ctx, values: dict[str, object], top: bool):
        """`name: table(d1, d2, ...)`: a real tensor of exactly that shape, read by the score term."""
        t = p.type
        if not top:
            self.fail(p.span, f"'{p.name}' is a table input of a called pattern: tables are read by score terms, "
                              "and only the pattern that is bound has one", "declare the table on the bound pattern")
        if p.name in values and not isinstance(values[p.name], ast.Node):
            self.fail(p.span, f"'{p.name}' is a run-time input (table): pass it as a tensor when calling the op, not when binding",
                      f"pat(q, k, v, {p.name}=tensor)")
        if not t.args:
            self.fail(t.span, "table needs its shape: table(d1, d2, ...), e.g. table(H, 2 * size - 1)")
        dims = []
        for a in t.args:
            d = self.int_of(a, ctx, "a table dimension")
            dv = self.static_int(d)
            if dv is not None and dv < 1:
                self.fail(a.span, f"a table dimension must be >= 1, got {dv}")
            dims.append(d)
        spec = ir.TableSpec(name=p.name, dims=tuple(dims), span=p.span)
        self.tables[p.name] = spec
        return TableRef(spec)

    # -- score terms
    def score_of(self, pdef: ast.PatternDef, ctx: Ctx) -> ir.ScoreTerm | None:
        """The pattern's `score EXPR` as IR (None without one); tables not read are an error."""
        e = pdef.score
        if e is None:
            for spec in self.tables.values():
                self.diags.add(error(spec.span, f"table input '{spec.name}' is never read: tables are read by a score term",
                                     f"add `score score + {spec.name}[...]` after the mask, or remove the input"))
            return None
        try:
            v = self.ev(e, ctx.child(in_where=True, in_score=True))
        except _Abort:
            return None
        if v is POISON:
            return None
        if _is_int(v) or (isinstance(v, Pos) and not v.boolean):
            v = ScoreVal(ir.SPos(node=self.pos(v), span=e.span))
        if not isinstance(v, ScoreVal):
            self.diags.add(error(e.span, f"a score term must be a number, got {type_name(v)}",
                                 "score score + bias[h, q - k], score 30 * tanh(score / 30)"))
            return None
        used = {n.table for n in _score_nodes(v.node) if isinstance(n, ir.SIndex)}
        for spec in self.tables.values():
            if spec.name not in used:
                self.diags.add(error(spec.span, f"table input '{spec.name}' is never read by the score term",
                                     f"index it, e.g. {spec.name}[h, ...], or remove the input"))
        return ir.ScoreTerm(expr=v.node, tables=tuple(self.tables.values()), span=e.span)

    def real(self, v, span: Span) -> ir.SExpr:
        """An operand of real arithmetic inside a score term."""
        if isinstance(v, ScoreVal):
            return v.node
        if _is_int(v) or (isinstance(v, Pos) and not v.boolean):
            return ir.SPos(node=self.pos(v), span=span)
        self.fail(span, f"score arithmetic takes numbers, got {type_name(v)}")

    def ev_Real(self, e: ast.Real, ctx: Ctx):
        if not ctx.in_score:
            self.fail(e.span, f"'{e.value}' is not an integer: decimal numbers appear only in score terms",
                      "masks and their arguments use integers")
        return ScoreVal(ir.SNum(value=e.value, span=e.span))

    def ev_Index(self, e: ast.Index, ctx: Ctx):
        if not ctx.in_score:
            self.fail(e.span, f"'{e.base}[...]' reads a table: only score terms do", "score score + table[...]")
        ref = ctx.locals.get(e.base)
        if not isinstance(ref, TableRef):
            if e.base in ctx.locals:
                self.fail(e.base_span, f"'{e.base}' is {type_name(ctx.locals[e.base])}, not a table input",
                          f"declare it as {e.base}: table(d1, ...)")
            self.unknown(e.base, e.base_span, ctx, "table input")
        dims = ref.spec.dims
        if len(e.indices) != len(dims):
            self.fail(e.span, f"table '{e.base}' has {len(dims)} dimension(s), indexed with {len(e.indices)}",
                      f"{e.base}[" + ", ".join(f"i{j}" for j in range(len(dims))) + "]")
        idx = []
        for x in e.indices:
            v = self.ev(x, ctx)
            if v is POISON:
                raise _Abort
            if not (_is_int(v) or (isinstance(v, Pos) and not v.boolean)):
                self.fail(x.span, f"a table index must be an integer expression, got {type_name(v)}",
                          "integer arithmetic of q, k, h, q.a, k.a and parameters")
            idx.append(self.pos(v))
        return ScoreVal(ir.SIndex(table=e.base, indices=tuple(idx), span=e.span))

    # -- typed helpers
    def mask_of(self, e: ast.Expr, ctx: Ctx, what: str) -> ir.Mask:
        try:
            v = self.ev(e, ctx)
            if isinstance(v, PatternRef):
                v = self.call_pattern(v, [], (), e.span, ctx)
        except _Abort:
            v = POISON
        if v is POISON:
            if not self.diags.errors:  # never turn a failure into a silently empty mask
                self.diags.add(error(e.span, f"{what} could not be evaluated"))
            return ir.Empty(span=e.span)
        if isinstance(v, bool):
            return ir.Full(span=e.span) if v else ir.Empty(span=e.span)
        if not isinstance(v, ir.Mask):
            self.diags.add(error(e.span, f"{what} must be a mask, got {type_name(v)}",
                                 "combine primitives such as causal, band(l, r), where q - k < 8"))
            return ir.Empty(span=e.span)
        return v

    def int_of(self, e: ast.Expr, ctx: Ctx, what: str) -> ir.Int:
        v = self.ev(e, ctx)
        if v is POISON:
            raise _Abort
        if not _is_int(v):
            self.fail(e.span, f"{what} must be an integer, got {type_name(v)}")
        return v

    # -- expressions
    def ev(self, e: ast.Expr, ctx: Ctx):
        if self.depth >= self.MAX_EVAL_DEPTH:
            self.fail(e.span, f"expression too complex: more than {self.MAX_EVAL_DEPTH} nested levels, "
                      "counting the `let`s and pattern calls it goes through",
                      "flatten long chains of `let`s or pattern calls")
        method = getattr(self, "ev_" + type(e).__name__)
        self.depth += 1
        try:
            return method(e, ctx)
        finally:
            self.depth -= 1

    def ev_Num(self, e: ast.Num, ctx):
        return sympy.Integer(e.value)

    def ev_Bool(self, e: ast.Bool, ctx):
        return e.value

    def ev_Name(self, e: ast.Name, ctx: Ctx):
        name = e.id
        if name == "score" and ctx.in_score:
            if name in ctx.locals:
                self.fail(e.span, "'score' inside a score term is the pair's scaled dot product, but a parameter or let "
                                  "named 'score' is in scope and would be hidden", "rename it (e.g. 'score_')")
            return ScoreVal(ir.SScore(span=e.span))
        if ctx.in_where and name in ("q", "k", "h"):
            if name in ctx.hidden:  # a parameter / let named q, k or h would be silently hidden here
                what = "the head index" if name == "h" else ("the query position" if name == "q" else "the key position")
                kind = ctx.hidden[name]
                self.fail(e.span, f"'{name}' inside `where` is {what}, but a {kind} named '{name}' is in scope "
                                  f"and would be hidden", f"rename the {kind} (e.g. '{name}_') or use it outside `where`")
            return Pos(ir.PVar(name=name, span=e.span), False)
        if name in ctx.locals:
            return ctx.locals[name]
        if name in ("q", "k", "h"):
            self.fail(e.span, f"'{name}' (a {'head index' if name == 'h' else 'token position'}) is only defined inside `where`",
                      f"where {name} ...")
        if name in ir.SIZE_NAMES:
            return ir.SIZE_NAMES[name]
        found = ctx.module.lookup(name)
        if found is not None:
            kind, node, scope = found
            if kind == "let":
                return self.let_value(node, scope, ctx)
            return PatternRef(node, scope)
        if name in PRIMITIVES:
            params, usage = PRIMITIVES[name]
            if any(d is _REQUIRED for _, _, d in params):
                self.fail(e.span, f"'{name}' needs arguments: {usage}")
            return self.call_primitive(name, [], (), e.span, e.span, ctx)
        if name in ctx.layout.axes:
            self.fail(e.span, f"grid axis '{name}' is not a value here", f"size({name}), q.{name} or P @ {name}")
        if name in FUNCTIONS:
            self.fail(e.span, f"'{name}' is a function: {FUNCTIONS[name]}")
        if name == "_":
            self.fail(e.span, "'_' is only the catch-all selector inside heads { ... }")
        self.unknown(name, e.span, ctx)

    def unknown(self, name: str, span: Span, ctx: Ctx, what: str = "name"):
        candidates = [*ctx.locals, *ctx.module.visible_names(), *PRIMITIVES, *FUNCTIONS, *ir.SIZE_NAMES, *ctx.layout.axes]
        close = difflib.get_close_matches(name, candidates, n=1)
        self.fail(span, f"unknown {what} '{name}'", f"did you mean '{close[0]}'?" if close else None)

    def _recall(self, key: tuple):
        """The memoised value for key (see [Note: shared sub-results]), _MISSING, or _Abort replayed."""
        v = self.memo.get(key, _MISSING)
        if v is _FAILED:
            raise _Abort
        return v

    def let_value(self, let: ast.Let, scope: ModuleScope, ctx: Ctx):
        memo_key = ("let", id(let), ctx.layout, ctx.in_where, ctx.along, ctx.transformed)
        v = self._recall(memo_key)
        if v is not _MISSING:
            return v
        key = f"{let.span.file}:{let.name}"
        if key in self.let_stack:
            chain = " -> ".join([*self.let_stack[self.let_stack.index(key):], key]).replace(f"{let.span.file}:", "")
            self.fail(let.name_span, f"'{let.name}' is defined in terms of itself ({chain})")
        self.let_stack.append(key)
        try:
            # module-level lets see module names only, not the caller's locals
            v = self.ev(let.value, Ctx(scope, ctx.layout, {}, ctx.in_where, ctx.along, ctx.transformed))
        except _Abort:
            self.memo[memo_key] = _FAILED
            raise
        finally:
            self.let_stack.pop()
        self.memo[memo_key] = v
        return v

    def ev_Coord(self, e: ast.Coord, ctx: Ctx):
        if e.base not in ("q", "k"):
            self.fail(e.span, f"'{e.base}.{e.axis}': only q.AXIS and k.AXIS name grid coordinates")
        if not ctx.in_where:
            self.fail(e.span, f"'{e.base}.{e.axis}' is only defined inside `where`")
        if e.axis not in ctx.layout.axes:
            if not ctx.layout.axes:
                self.fail(e.span, f"'{e.base}.{e.axis}' needs a grid layout: pattern ... on grid(h, w) = ...")
            close = difflib.get_close_matches(e.axis, list(ctx.layout.axes), n=1)
            self.fail(e.span, f"unknown grid axis '{e.axis}' (the layout has {', '.join(ctx.layout.axes)})",
                      f"did you mean '{close[0]}'?" if close else None)
        if ctx.along is not None:
            self.fail(e.span, f"grid coordinates are not defined inside `@ {ctx.along}` (it is 1-D): use q and k")
        return Pos(ir.PVar(name=e.base, axis=e.axis, span=e.span), False)

    def ev_LetIn(self, e: ast.LetIn, ctx: Ctx):
        if e.name in ir.SIZE_NAMES or e.name == "_":
            self.fail(e.span, f"'{e.name}' cannot be bound with let: M, N, H and _ are reserved")
        v = self.ev(e.value, ctx)
        inner = ctx.child()
        inner.locals[e.name] = v
        inner.hidden.pop(e.name, None)
        _note_hidden(inner, e.name, "let binding")
        return self.ev(e.body, inner)

    def ev_Call(self, e: ast.Call, ctx: Ctx):
        name = e.func
        if name in ctx.locals and not (name in FUNCTIONS or name in PRIMITIVES):
            # a local that shadows a built-in name shadows it only as a value: `size(h)` still works
            self.fail(e.func_span, f"'{name}' is {type_name(ctx.locals[name])}, not a pattern or function")
        if name in ir.SCORE_FUNCTIONS and name not in ctx.locals and ctx.module.lookup(name) is None:
            if not ctx.in_score:
                self.fail(e.func_span, f"{name}() is a function of score terms only", f"score {name}(score)")
            if e.kwargs or len(e.args) != 1:
                self.fail(e.span, f"{name} takes one argument")
            arg = self.real(self.ev(e.args[0], ctx), e.args[0].span)
            return ScoreVal(ir.SCall(func=name, args=(arg,), span=e.span))
        if name in FUNCTIONS:
            return self.call_function(e, ctx)
        found = ctx.module.lookup(name)
        if found is not None:
            kind, node, scope = found
            if kind == "let":
                v = self.let_value(node, scope, ctx)
                if isinstance(v, PatternRef):
                    return self.call_pattern(v, e.args, e.kwargs, e.span, ctx)
                self.fail(e.func_span, f"'{name}' is {type_name(v)}, not a pattern or function")
            return self.call_pattern(PatternRef(node, scope), e.args, e.kwargs, e.span, ctx)
        if name in PRIMITIVES:
            return self.call_primitive(name, e.args, e.kwargs, e.span, e.func_span, ctx)
        if name in ("q", "k", "h", *ir.SIZE_NAMES):
            self.fail(e.func_span, f"'{name}' is not a function")
        self.unknown(name, e.func_span, ctx, "pattern or primitive")

    def call_function(self, e: ast.Call, ctx: Ctx):
        name = e.func
        if e.kwargs:
            self.fail(e.kwargs[0].span, f"{name}() takes no keyword arguments")
        if name == "size":
            if len(e.args) != 1 or not isinstance(e.args[0], ast.Name):
                self.fail(e.span, "size takes one grid axis name: size(h)")
            axis = e.args[0].id
            if axis not in ctx.layout.axes:
                if not ctx.layout.axes:
                    self.fail(e.args[0].span, f"size({axis}) needs a grid layout: pattern ... on grid({axis}, ...) = ...")
                close = difflib.get_close_matches(axis, list(ctx.layout.axes), n=1)
                self.fail(e.args[0].span, f"unknown grid axis '{axis}' (the layout has {', '.join(ctx.layout.axes)})",
                          f"did you mean '{close[0]}'?" if close else None)
            return ir.axis_size(axis)
        args = [self.ev(a, ctx) for a in e.args]
        if name == "abs" and len(args) != 1:
            self.fail(e.span, f"abs takes one argument, got {len(args)}")
        if name in ("min", "max") and len(args) < 2:
            self.fail(e.span, f"{name} takes at least two arguments, got {len(args)}")
        for a, arg in zip(e.args, args):
            if arg is POISON:
                raise _Abort
        if ctx.in_score and any(isinstance(a, ScoreVal) for a in args):
            return ScoreVal(ir.SCall(func=name, args=tuple(self.real(v, a.span) for a, v in zip(e.args, args)), span=e.span))
        for a, arg in zip(e.args, args):
            if not (_is_int(arg) or (isinstance(arg, Pos) and not arg.boolean)):
                self.fail(a.span, f"{name}() takes integers, got {type_name(arg)}")
        if any(isinstance(a, Pos) for a in args):
            return Pos(ir.PCall(func=name, args=tuple(self.pos(a) for a in args), span=e.span), False)
        fn = {"min": sympy.Min, "max": sympy.Max, "abs": sympy.Abs}[name]
        return fn(*args)

    def call_pattern(self, ref: PatternRef, args, kwargs, span: Span, ctx: Ctx):
        pdef = ref.definition
        if pdef.name in self.call_stack:
            chain = " -> ".join([*self.call_stack, pdef.name])
            self.fail(span, f"pattern '{pdef.name}' calls itself ({chain}); patterns cannot be recursive")
        if len(self.call_stack) >= self.MAX_CALL_DEPTH:
            chain = " -> ".join([*self.call_stack[:3], "...", *self.call_stack[-2:], pdef.name])
            self.fail(span, f"pattern calls nested more than {self.MAX_CALL_DEPTH} deep ({chain})")
        if pdef.layout is not None:
            callee_layout = self.layout(pdef, ref.module)
            if callee_layout.axes != ctx.layout.axes:
                self.fail(span, f"pattern '{pdef.name}' is on {callee_layout} but is used on {ctx.layout}",
                          "declare the callee without `on ...` to use it on any layout")
        if pdef.score is not None:
            self.fail(span, f"pattern '{pdef.name}' has a score term; a called pattern contributes only its mask, "
                            "so only the pattern that is bound may have one",
                      "call a mask-only pattern and write `score ...` on the calling pattern")
        params = pdef.params
        values: dict[str, object] = {}
        if len(args) > len(params):
            self.fail(span, f"pattern '{pdef.name}' takes {len(params)} argument(s), got {len(args)}")
        for p, a in zip(params, args):
            values[p.name] = a
        for kw in kwargs:
            if kw.name not in {p.name for p in params}:
                close = difflib.get_close_matches(kw.name, [p.name for p in params], n=1)
                self.fail(kw.span, f"pattern '{pdef.name}' has no parameter '{kw.name}'",
                          f"did you mean '{close[0]}'?" if close else None)
            if kw.name in values:
                self.fail(kw.span, f"argument '{kw.name}' given twice")
            values[kw.name] = kw.value
        # arguments are evaluated in the caller's context; defaults in the callee's
        evaluated: dict[str, object] = {}
        for name, v in values.items():
            evaluated[name] = self.ev(v, ctx)
            if evaluated[name] is POISON:
                raise _Abort
        try:
            memo_key = ("call", id(pdef), ctx.layout, ctx.along, ctx.transformed,
                        tuple(sorted((n, _memo_key(v)) for n, v in evaluated.items())))
            hash(memo_key)
        except TypeError:  # a value without a stable key: elaborate afresh
            memo_key = None
        else:
            v = self._recall(memo_key)
            if v is not _MISSING:
                return v[1]
        inner = Ctx(ref.module, ctx.layout, {}, False, False, ctx.along, ctx.transformed)
        for p in params:
            if p.name in evaluated:
                v = evaluated[p.name]
                if p.type is not None:
                    if not isinstance(v, InputRef) or v.spec.kind != p.type.name:
                        self.fail(span, f"argument '{p.name}' of '{pdef.name}' must be a run-time input of type {p.type.name}, got {type_name(v)}")
                inner.locals[p.name] = v
            else:
                inner.locals[p.name] = self.param_value(p, inner, {}, top=False)
            _note_hidden(inner, p.name, "parameter")
        self.call_stack.append(pdef.name)
        try:
            v = self.mask_of(pdef.body, inner, what=f"the body of pattern '{pdef.name}'")
        finally:
            self.call_stack.pop()
        if memo_key is not None:  # the arguments stay referenced, so the ids in the key stay valid
            self.memo[memo_key] = (evaluated, v)
        return v

    # -- primitives
    def call_primitive(self, name, args, kwargs, span: Span, func_span: Span, ctx: Ctx):
        params, usage = PRIMITIVES[name]
        got: dict[str, tuple[object, Span]] = {}
        if len(args) > len(params):
            self.fail(span, f"{name} takes {len(params)} argument(s), got {len(args)}", usage)
        for (pname, _, _), a in zip(params, args):
            got[pname] = (a, a.span)
        names = [p[0] for p in params]
        for kw in kwargs:
            if kw.name not in names:
                close = difflib.get_close_matches(kw.name, names, n=1)
                self.fail(kw.span, f"{name} has no parameter '{kw.name}' ({usage})",
                          f"did you mean '{close[0]}'?" if close else None)
            if kw.name in got:
                self.fail(kw.span, f"argument '{kw.name}' of {name} given twice")
            got[kw.name] = (kw.value, kw.span)
        vals: dict[str, object] = {}
        inner = ctx
        if name in ("dilate", "blockwise"):
            inner = ctx.child(transformed=True)
        for pname, kind, default in params:
            if pname not in got:
                if default is _REQUIRED:
                    self.fail(span, f"{name} is missing its argument '{pname}'", usage)
                vals[pname] = sympy.Integer(default) if isinstance(default, int) and not isinstance(default, bool) else default
                continue
            expr, aspan = got[pname]
            vals[pname] = self.arg(name, pname, kind, expr, aspan, inner if kind == MASK else ctx)
        if name in ("same", "routed", "topk"):
            if ctx.transformed:
                self.fail(span, f"{name} is a run-time primitive and cannot be used inside dilate, blockwise or @")
            if ctx.in_where:
                self.fail(span, f"{name} is a mask, not a condition")
        node = self.build(name, vals, span)
        for v in violations(node, self.static_int):
            self.fail(span, v)
        return node

    def arg(self, prim, pname, kind, expr, span, ctx: Ctx):
        v = self.ev(expr, ctx)
        if v is POISON:
            raise _Abort
        where = f"argument '{pname}' of {prim}"
        if kind == INT:
            if not _is_int(v):
                self.fail(span, f"{where} must be an integer, got {type_name(v)}")
            return v
        if kind in (AXIS_INT, AXIS_BOOL):
            want_bool = kind == AXIS_BOOL
            ok = (lambda x: isinstance(x, bool)) if want_bool else _is_int
            if isinstance(v, tuple):
                if not all(ok(x) for x in v):
                    self.fail(span, f"{where} must be a tuple of {'booleans' if want_bool else 'integers'}")
                if ctx.ndim == 1:
                    self.fail(span, f"{where} is a per-axis tuple, but the pattern is 1-D here",
                              "give one value, or use a grid layout")
                if len(v) != ctx.ndim:
                    self.fail(span, f"{where} has {len(v)} values but the grid has {ctx.ndim} axes ({', '.join(ctx.layout.axes)})")
                return v
            if not ok(v):
                self.fail(span, f"{where} must be {'a boolean' if want_bool else 'an integer'} or a per-axis tuple, got {type_name(v)}")
            return v
        if kind == SET:
            if isinstance(v, (ir.SetList, ir.SetRange)):
                return v
            if _is_int(v):
                return ir.SetList(items=(v,))
            if isinstance(v, tuple) and all(_is_int(x) for x in v):
                return ir.SetList(items=v)
            self.fail(span, f"{where} must be a set of token positions, got {type_name(v)}", "0 .. 16 or {0, N - 1}")
        if kind == MASK:
            if isinstance(v, PatternRef):
                v = self.call_pattern(v, [], (), span, ctx)
            if not isinstance(v, ir.Mask):
                self.fail(span, f"{where} must be a mask, got {type_name(v)}")
            return v
        if kind in (SEGMENTS, BLOCKS):
            if not isinstance(v, InputRef) or v.spec.kind != kind:
                decl = "doc: segments" if kind == SEGMENTS else "sel: blocks(64)"
                self.fail(span, f"{where} must be a run-time input declared as a typed parameter, got {type_name(v)}",
                          f"pattern p({decl}) = ...")
            return v
        raise ValueError(kind)

    def build(self, name: str, v: dict, span: Span) -> ir.Mask:
        if name in _NODES:  # argument names are the IR field names
            return _NODES[name](**v, span=span)
        match name:
            case "same":
                return ir.Same(input=v["doc"].spec.name, span=span)
            case "routed":
                return ir.Routed(input=v["sel"].spec.name, block=v["sel"].spec.block, span=span)
            case "dilate":
                return ir.Dilate(d=v["d"], operand=v["pattern"], span=span)
            case "blockwise":
                return ir.Blockwise(b=v["b"], operand=v["pattern"], span=span)
        raise ValueError(name)

    # -- operators
    def ev_Unary(self, e: ast.Unary, ctx: Ctx):
        v = self.ev(e.operand, ctx)
        if v is POISON:
            raise _Abort
        if isinstance(v, PatternRef):
            v = self.call_pattern(v, [], (), e.operand.span, ctx)
        if e.op == "~":
            if isinstance(v, ir.Mask):
                return ir.Not(operand=v, span=e.span)
            self.fail(e.span, f"'~' complements a mask, got {type_name(v)}", "use '-' to negate an integer" if _is_int(v) else None)
        if e.op == "-":
            if _is_int(v):
                return -v
            if isinstance(v, Pos) and not v.boolean:
                return Pos(ir.PNeg(operand=v.node, span=e.span), False)
            if isinstance(v, ScoreVal):
                return ScoreVal(ir.SNeg(operand=v.node, span=e.span))
            if isinstance(v, ir.Mask):
                self.fail(e.span, "unary '-' negates integers; the complement of a mask is '~P'", "~P")
            self.fail(e.span, f"'-' negates an integer, got {type_name(v)}")
        if e.op == "not":
            if isinstance(v, bool):
                return not v
            if isinstance(v, Pos) and v.boolean:
                return Pos(ir.PNot(operand=v.node, span=e.span), True)
            self.fail(e.span, f"'not' takes a condition, got {type_name(v)}")
        raise ValueError(e.op)

    def pos(self, v) -> ir.PExpr:
        if isinstance(v, Pos):
            return v.node
        return ir.PConst(value=v)

    def ev_Binary(self, e: ast.Binary, ctx: Ctx):
        left = right = POISON
        try:
            left = self.ev(e.left, ctx)
        except _Abort:
            pass
        try:
            right = self.ev(e.right, ctx)
        except _Abort:
            pass
        if left is POISON or right is POISON:
            if not self.diags.items:  # never unwind without telling the user why
                self.fail(e.span, "invalid operand")
            raise _Abort
        if isinstance(left, PatternRef):
            left = self.call_pattern(left, [], (), e.left.span, ctx)
        if isinstance(right, PatternRef):
            right = self.call_pattern(right, [], (), e.right.span, ctx)
        op = e.op
        if op in ("and", "or"):
            parts = []
            for side, v in ((e.left, left), (e.right, right)):
                if isinstance(v, bool):
                    v = Pos(ir.PConst(value=sympy.Integer(int(v))), True)  # folded below
                if not (isinstance(v, Pos) and v.boolean):
                    self.fail(side.span, f"'{op}' combines conditions, got {type_name(v)}")
                parts.append(v.node)
            flat = []
            for p in parts:
                flat.extend(p.parts if isinstance(p, ir.PBool) and p.op == op else (p,))
            return Pos(ir.PBool(op=op, parts=tuple(flat), span=e.span), True)
        if isinstance(left, ir.Mask) or isinstance(right, ir.Mask):
            if op in ("|", "&", "-") and isinstance(left, ir.Mask) and isinstance(right, ir.Mask):
                if op == "-":
                    return ir.Diff(left=left, right=right, span=e.span)
                cls = ir.Union_ if op == "|" else ir.Inter
                parts = [p for side in (left, right) for p in (side.parts if isinstance(side, cls) else (side,))]
                parts = list({id(p): p for p in parts}.values())  # P | P is P (shared sub-results are one object)
                if len(parts) == 1:
                    return parts[0]
                return cls(parts=tuple(parts), span=e.span)
            other = right if isinstance(left, ir.Mask) else left
            hint = None
            if isinstance(other, Pos) and other.boolean:
                hint = "wrap the condition in where: (where ...)"
            self.fail(e.span, f"'{op}' cannot combine a mask with {type_name(other)}" if op in "|&-"
                      else f"'{op}' is arithmetic; masks combine with | & - ~", hint)
        if op in ("|", "&"):
            if isinstance(left, Pos) or isinstance(right, Pos):
                self.fail(e.span, f"'{op}' combines masks; conditions inside `where` combine with '{'or' if op == '|' else 'and'}'",
                          f"where a {'or' if op == '|' else 'and'} b")
            self.fail(e.span, f"'{op}' combines masks, got {type_name(left)} and {type_name(right)}")
        real_power = op == "**" and (isinstance(right, Pos) or (_is_int(right) and (self.static_int(right) or 0) < 0))
        if ctx.in_score and (op == "/" or real_power or isinstance(left, ScoreVal) or isinstance(right, ScoreVal)):
            if op not in ("+", "-", "*", "/", "**"):
                self.fail(e.span, f"'{op}' is integer arithmetic; score terms combine reals with + - * / **")
            return ScoreVal(ir.SBin(op=op, left=self.real(left, e.left.span), right=self.real(right, e.right.span),
                                    span=e.span))
        if op == "/":
            self.fail(e.span, "'/' divides reals, which only score terms have; integers divide with '//'", "a // b")
        # arithmetic
        for side, v in ((e.left, left), (e.right, right)):
            if not (_is_int(v) or (isinstance(v, Pos) and not v.boolean)):
                self.fail(side.span, f"'{op}' needs integers, got {type_name(v)}")
        if isinstance(left, Pos) or isinstance(right, Pos):
            if op == "**":
                exp = self.static_int(right) if _is_int(right) else None
                if exp is None or exp < 0:
                    self.fail(e.right.span, "the exponent of '**' on positions must be a constant >= 0")
            if op in ("//", "%") and _is_int(right) and self.static_int(right) == 0:
                self.fail(e.right.span, f"'{op}' by zero")
            return Pos(ir.PBin(op=op, left=self.pos(left), right=self.pos(right), span=e.span), False)
        if op in ("//", "%"):
            rv = self.static_int(right)
            if rv == 0:
                self.fail(e.right.span, f"'{op}' by zero")
        if op == "**":
            rv = self.static_int(right)
            if rv is None:
                self.fail(e.right.span, "the exponent of '**' must be known when the pattern is bound "
                          "(it cannot depend on M, N, H or grid sizes)")
            if rv < 0:
                self.fail(e.right.span, f"negative exponent {rv}: integer powers must be >= 0")
            if rv > self.MAX_EXPONENT:
                self.fail(e.right.span, f"exponent {rv} is too large (limit {self.MAX_EXPONENT})")
        match op:
            case "+":
                res = left + right
            case "-":
                res = left - right
            case "*":
                res = left * right
            case "//":
                res = sympy.floor(left / right)
            case "%":
                res = sympy.Mod(left, right)
            case "**":
                res = left ** right
            case _:
                raise ValueError(op)
        self.check_magnitude(res, e)
        return res

    def check_magnitude(self, v: ir.Int, e: ast.Binary) -> None:
        """Keep integers inside what the evaluators can hold (syntax.MAX_INT)."""
        if v.is_Integer:
            if abs(int(v)) > ast.MAX_INT:
                self.fail(e.span, f"integer value too large: {_short(int(v))} (limit 2**60 = {ast.MAX_INT})")
            return
        if e.op in ("*", "**"):
            for pw in v.atoms(sympy.Pow):
                if pw.exp.is_Integer and abs(int(pw.exp)) > self.MAX_EXPONENT:
                    self.fail(e.span, f"this makes a power with exponent {int(pw.exp)} (limit {self.MAX_EXPONENT}): "
                              "its value would not fit an integer")

    def ev_Compare(self, e: ast.Compare, ctx: Ctx):
        vals = [self.ev(x, ctx) for x in e.operands]
        for x, v in zip(e.operands, vals):
            if v is POISON:
                raise _Abort
            if not (_is_int(v) or (isinstance(v, Pos) and not v.boolean)):
                self.fail(x.span, f"comparisons take integers, got {type_name(v)}")
        return Pos(ir.PCmp(ops=e.ops, operands=tuple(self.pos(v) for v in vals), span=e.span), True)

    def ev_In(self, e: ast.In, ctx: Ctx):
        item = self.ev(e.item, ctx)
        coll = self.ev(e.collection, ctx)
        if not (_is_int(item) or (isinstance(item, Pos) and not item.boolean)):
            self.fail(e.item.span, f"'in' tests an integer, got {type_name(item)}")
        if _is_int(coll):
            coll = ir.SetList(items=(coll,))
        elif isinstance(coll, tuple) and all(_is_int(x) for x in coll):
            coll = ir.SetList(items=coll)
        if not isinstance(coll, (ir.SetList, ir.SetRange)):
            self.fail(e.collection.span, f"'in' needs a set, got {type_name(coll)}")
        return Pos(ir.PIn(item=self.pos(item), collection=coll, span=e.span), True)

    def ev_Range(self, e: ast.Range, ctx: Ctx):
        start = self.int_of(e.start, ctx, "the start of a range")
        stop = self.int_of(e.stop, ctx, "the end of a range")
        step = sympy.Integer(1) if e.step is None else self.int_of(e.step, ctx, "the step of a range")
        sv = self.static_int(step)
        if sv is not None and sv < 1:
            self.fail(e.step.span, f"a range step must be >= 1, got {sv}")
        return ir.SetRange(start=start, stop=stop, step=step)

    def ev_TupleLit(self, e: ast.TupleLit, ctx: Ctx):
        vals = [self.ev(x, ctx) for x in e.items]
        if all(isinstance(v, bool) for v in vals):
            return tuple(vals)
        for x, v in zip(e.items, vals):
            if v is POISON:
                raise _Abort
            if not _is_int(v):
                self.fail(x.span, f"tuple elements must be integers (or all booleans), got {type_name(v)}")
        return tuple(vals)

    def ev_SetLit(self, e: ast.SetLit, ctx: Ctx):
        items = tuple(self.int_of(x, ctx, "a set element") for x in e.items)
        return ir.SetList(items=items)

    def ev_Heads(self, e: ast.Heads, ctx: Ctx):
        arms = []
        seen_wild = False
        for arm in e.arms:
            if seen_wild:
                self.diags.add(error(arm.span, "this arm is unreachable: the catch-all '_' arm before it matches every head"))
            sel = None
            if arm.selector is None:
                seen_wild = True
            else:
                try:
                    v = self.ev(arm.selector, ctx)
                except _Abort:
                    v = POISON
                if _is_int(v):
                    sel = ir.SetList(items=(v,))
                elif isinstance(v, (ir.SetList, ir.SetRange)):
                    sel = v
                elif isinstance(v, tuple) and all(_is_int(x) for x in v):
                    sel = ir.SetList(items=v)
                elif v is not POISON:
                    self.diags.add(error(arm.selector.span, f"a head selector must be an integer, a range or a set, got {type_name(v)}",
                                         "0 => P; 2 .. 4 => P; {5, 7} => P; _ => P"))
            body = self.mask_of(arm.body, ctx, what="a heads arm")
            arms.append(ir.HeadArm(selector=sel, body=body, span=arm.span))
        return ir.Heads(arms=tuple(arms), span=e.span)

    def ev_Where(self, e: ast.Where, ctx: Ctx):
        v = self.ev(e.pred, ctx.child(in_where=True))
        if v is POISON:
            raise _Abort
        if isinstance(v, bool):
            return ir.Full(span=e.span) if v else ir.Empty(span=e.span)
        if not (isinstance(v, Pos) and v.boolean):
            self.fail(e.pred.span, f"`where` needs a condition (a comparison), got {type_name(v)}", "where q - k < 8")
        return ir.Where(pred=v.node, span=e.span)

    def ev_Along(self, e: ast.Along, ctx: Ctx):
        if not ctx.layout.axes:
            self.fail(e.span, f"'@ {e.axis}' applies a pattern along a grid axis, but this pattern is on seq",
                      "declare the pattern `on grid(...)`")
        if e.axis not in ctx.layout.axes:
            close = difflib.get_close_matches(e.axis, list(ctx.layout.axes), n=1)
            self.fail(e.axis_span, f"unknown grid axis '{e.axis}' (the layout has {', '.join(ctx.layout.axes)})",
                      f"did you mean '{close[0]}'?" if close else None)
        if ctx.along is not None:
            self.fail(e.span, f"'@ {e.axis}' inside '@ {ctx.along}': a pattern is applied along one axis at a time")
        inner = ctx.child(along=e.axis, transformed=True)
        v = self.ev(e.operand, inner)
        if v is POISON:
            raise _Abort
        if isinstance(v, PatternRef):
            v = self.call_pattern(v, [], (), e.operand.span, inner)
        if not isinstance(v, ir.Mask):
            self.fail(e.operand.span, f"'@ {e.axis}' applies a mask along an axis, got {type_name(v)}")
        return ir.Along(operand=v, axis=e.axis, span=e.span)


def _score_nodes(node: ir.SExpr):
    """Every node of a score expression (its integer parts not entered)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, ir.SBin):
            stack += [n.left, n.right]
        elif isinstance(n, ir.SNeg):
            stack.append(n.operand)
        elif isinstance(n, ir.SCall):
            stack += list(n.args)


# ----------------------------------------------------------------------------- scopes and binding
# The steps around `Elaborator.bind` that turn parsed modules into one bound pattern: what
# `attnc.program` runs for a file and its imports (`load` / `loads`, `Program.pattern`) and
# `attnc.codegen.pipeline.elaborate` for one text without imports.


def builtin_names() -> set[str]:
    """The primitives' and functions' names, which a file cannot redefine."""
    return set(PRIMITIVES) | set(FUNCTIONS)


def module_scope(module: ast.Module, diags: Collector, imported=lambda item: None) -> ModuleScope:
    """The top-level names of one parsed file: its lets and patterns (a name defined twice or
    a built-in name is a diagnostic) and, through `imported(item) -> ModuleScope | None`, the
    names of the files its imports resolve to (already scoped: dependencies first)."""
    scope = ModuleScope(module)
    for item in module.items:
        if isinstance(item, ast.Import):
            dep = imported(item)
            if dep is None:
                continue
            for name in [*dep.lets, *dep.patterns]:
                scope.imported[name] = ("import", dep)
        elif isinstance(item, (ast.Let, ast.PatternDef)):
            span = item.name_span
            if item.name in scope.lets or item.name in scope.patterns:
                diags.add(error(span, f"'{item.name}' is defined twice in this file"))
                continue
            if item.name in ir.SIZE_NAMES or item.name in ("q", "k", "_") or item.name in builtin_names():
                diags.add(error(span, f"'{item.name}' is a built-in name and cannot be redefined"))
                continue
            target = scope.lets if isinstance(item, ast.Let) else scope.patterns
            target[item.name] = item
    return scope


def check_scope(scope: ModuleScope, diags: Collector) -> None:
    """Elaborate every pattern of a file with its defaults (placeholders for parameters
    without one), so a load reports every error of the file, not only the bound pattern's."""
    for pdef in scope.patterns.values():
        if _has_required(pdef):
            _check_with_placeholders(pdef, scope, diags)
        else:
            Elaborator(diags).bind(pdef, scope, {}, pdef.span)


def _has_required(pdef: ast.PatternDef) -> bool:
    return any(p.default is None and p.type is None for p in pdef.params)


def _check_with_placeholders(pdef, scope, diags) -> None:
    """Check a pattern whose parameters have no default, with placeholder values."""
    placeholders = {p.name: 1 for p in pdef.params if p.default is None and p.type is None}
    inner = Collector()
    Elaborator(inner).bind(pdef, scope, placeholders, pdef.span)
    for d in inner.items:
        # placeholder values may violate value constraints; report only name and type errors
        if "must be >=" not in d.message and "got 1" not in d.message:
            diags.add(d)


def find_pattern(scope: ModuleScope, name: str | None, file: str, sources: dict[str, str]) -> ast.PatternDef:
    """The pattern `name` of a file; `name` may be None when the file defines exactly one."""
    pats = scope.patterns
    span = Span(file=file, line=1, col=1, end_line=1, end_col=2)
    if name is None:
        if len(pats) == 1:
            return next(iter(pats.values()))
        listing = ", ".join(pats) or "none"
        raise AttnError(error(span, f"the file defines {len(pats)} patterns ({listing}); name one"), sources)
    if name not in pats:
        close = difflib.get_close_matches(name, list(pats), n=1)
        raise AttnError(error(span, f"no pattern named '{name}' (defined: {', '.join(pats) or 'none'})",
                              f"did you mean '{close[0]}'?" if close else None), sources)
    return pats[name]


def bind_pattern(pdef: ast.PatternDef, scope: ModuleScope, params: dict, sources: dict[str, str]) -> ir.PatternIR:
    """The IR of `pdef` with its parameters bound to `params` (AttnError with every diagnostic)."""
    diags = Collector()
    pir = Elaborator(diags).bind(pdef, scope, params, pdef.span)
    diags.raise_if_errors(sources)
    return pir
