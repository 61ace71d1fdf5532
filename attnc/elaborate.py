"""Elaboration: AST -> IR, with name resolution and checks.

input:  parsed modules (syntax.Module) of a program and a pattern to bind.
output: a `PatternIR` (integer parameters symbolic, with their bindings), or
        diagnostics collected into an `AttnError`; the file-level steps (module_scope,
        check_scope, find_pattern, bind_pattern) around `Elaborator.bind`.
does not: evaluate masks, look at sizes known only at call time (the
        reference evaluator re-checks constraints once M, N and grids are known).

The Elaborator's work is split by responsibility into mixins: elab_params.py (layout and
parameters), elab_scores.py (score terms), elab_names.py (names, lets and calls),
elab_primitives.py (primitive calls, their signatures), elab_exprs.py (operators, literals,
where / heads / @); the values and scopes they share live in elab_values.py.
"""

from __future__ import annotations

import difflib

import sympy

from . import ir, syntax as ast
from .elab_exprs import Expressions
from .elab_names import NameResolution
from .elab_params import ParamBinding
from .elab_primitives import FUNCTIONS, PRIMITIVES, PrimitiveCalls
from .elab_scores import ScoreTerms
from .elab_values import POISON, Abort, Ctx, ModuleScope, PatternRef, is_int, note_hidden, type_name
from .errors import AttnError, Collector, Span, error

# ----------------------------------------------------------------------------- the elaborator


class Elaborator(ParamBinding, ScoreTerms, NameResolution, PrimitiveCalls, Expressions):
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
        raise Abort

    def static_int(self, v) -> int | None:
        """The value of an integer expression once bindings are applied, if known."""
        if not is_int(v):
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
            except Abort:
                ctx.locals[p.name] = POISON
            note_hidden(ctx, p.name, "parameter")
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


    # -- typed helpers
    def mask_of(self, e: ast.Expr, ctx: Ctx, what: str) -> ir.Mask:
        try:
            v = self.ev(e, ctx)
            if isinstance(v, PatternRef):
                v = self.call_pattern(v, [], (), e.span, ctx)
        except Abort:
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
            raise Abort
        if not is_int(v):
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


# ----------------------------------------------------------------------------- scopes and binding
# The steps around `Elaborator.bind` that turn parsed modules into one bound pattern: what
# `attnc.loader` runs for a file and its imports (`load` / `loads`, `Program.pattern`) and
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
