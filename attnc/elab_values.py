"""Elaboration's values and scopes: what an expression evaluates to, and where names live.

input:  nothing at run time; the elaborator (elaborate.py and its elab_* mixins) builds these.
output: the value classes an expression evaluates to besides IR masks, integers, sets and
        tuples (Poison, PatternRef, InputRef, TableRef, ScoreVal, Pos), `type_name` for
        diagnostics, the scopes (ModuleScope: one file's top-level names; Ctx: one expression's
        lexical context), and the small helpers the mixins share (Abort, memoisation sentinels).
does not: evaluate anything or produce diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from . import ir, syntax as ast

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


class Abort(Exception):
    """Unwinds one expression after its diagnostic has been recorded."""


FAILED = object()  # a memoised failure
MISSING = object()


def memo_key_of(v):
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



def note_hidden(ctx: Ctx, name: str, kind: str) -> None:
    """Record a local named q, k or h: inside `where` those names are the positions and the
    head, so a `where` that uses one would silently ignore the local (`ev_Name` refuses it)."""
    if name in ("q", "k", "h"):
        ctx.hidden[name] = kind


def is_int(v) -> bool:
    return isinstance(v, sympy.Expr)
