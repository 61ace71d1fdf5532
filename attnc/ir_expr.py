"""The expression nodes of the IR: static integer sets, `where` position expressions and score terms.

input:  built by elaborate.py (elab_exprs.py, elab_scores.py) from the AST.
output: frozen nodes (structural equality and hashing), each with a `span`; static integers
        inside them are sympy expressions (`Int`). ir.py re-exports every name here as part
        of the IR (`ir.PConst`, `ir.SetVal`, ...): callers use them through `ir`.
does not: define mask nodes, layouts or patterns (ir.py), evaluate expressions
        (reference.py, reference_where.py) or print them (ir_text.py).

Two expression languages live here: *position* nodes (`PExpr`, the `where` predicate
language over q, k, h and grid coordinates) and *score* nodes (`SExpr`, the real-valued
`score EXPR` after the mask), plus the static integer sets that position nodes and mask
nodes both use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import sympy

from .errors import NO_SPAN, Span

Int = sympy.Expr


# ----------------------------------------------------------------------------- static values


@dataclass(frozen=True, slots=True, kw_only=True)
class SetList:
    """An explicit integer set `{a, b, c}`."""

    items: tuple[Int, ...]

    def __str__(self) -> str:
        return "{" + ", ".join(str(i) for i in self.items) + "}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SetRange:
    """A half-open range `start .. stop step step`."""

    start: Int
    stop: Int
    step: Int = sympy.Integer(1)

    def __str__(self) -> str:
        s = f"{self.start} .. {self.stop}"
        return s if self.step == 1 else f"{s} step {self.step}"


SetVal = Union[SetList, SetRange]


# ----------------------------------------------------------------------------- position expressions (where)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNode:
    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PVar(PNode):
    """`q` (absolute query position), `k`, `h` (head), or `q.a` / `k.a`."""

    name: str
    axis: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PConst(PNode):
    value: Int


@dataclass(frozen=True, slots=True, kw_only=True)
class PBin(PNode):
    op: str  # + - * // % **
    left: "PExpr"
    right: "PExpr"


@dataclass(frozen=True, slots=True, kw_only=True)
class PNeg(PNode):
    operand: "PExpr"


@dataclass(frozen=True, slots=True, kw_only=True)
class PCall(PNode):
    func: str  # min max abs
    args: tuple["PExpr", ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PCmp(PNode):
    ops: tuple[str, ...]
    operands: tuple["PExpr", ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PBool(PNode):
    op: str  # and | or
    parts: tuple["PExpr", ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PNot(PNode):
    operand: "PExpr"


@dataclass(frozen=True, slots=True, kw_only=True)
class PIn(PNode):
    item: "PExpr"
    collection: SetVal


PExpr = Union[PVar, PConst, PBin, PNeg, PCall, PCmp, PBool, PNot, PIn]


# ----------------------------------------------------------------------------- score terms


@dataclass(frozen=True, slots=True, kw_only=True)
class SNode:
    """A real-valued score expression (`score EXPR` after the mask, docs/language.md)."""

    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SScore(SNode):
    """`score`: the scaled dot product `scale * q . k` of the pair."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SNum(SNode):
    value: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SPos(SNode):
    """An integer expression of positions, the head, parameters and sizes, used as a real."""

    node: "PExpr"


@dataclass(frozen=True, slots=True, kw_only=True)
class SBin(SNode):
    op: str  # + - * / **
    left: "SExpr"
    right: "SExpr"


@dataclass(frozen=True, slots=True, kw_only=True)
class SNeg(SNode):
    operand: "SExpr"


@dataclass(frozen=True, slots=True, kw_only=True)
class SCall(SNode):
    func: str  # tanh exp sigmoid abs min max
    args: tuple["SExpr", ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SIndex(SNode):
    """`table[i, ...]`: an entry of a `table(...)` input; the indices are integer expressions."""

    table: str
    indices: tuple["PExpr", ...]


SExpr = Union[SScore, SNum, SPos, SBin, SNeg, SCall, SIndex]

#: functions of score terms (besides min max abs)
SCORE_FUNCTIONS = ("tanh", "exp", "sigmoid")


@dataclass(frozen=True, slots=True, kw_only=True)
class TableSpec:
    """A `table(d1, ...)` run-time input: a real tensor of exactly that shape, read by a score term
    (learnable: gradients flow into it)."""

    name: str
    dims: tuple  # Int expressions of parameters and sizes
    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreTerm:
    """The pattern's score: the logit of an allowed pair is `expr` instead of `scale * q . k`."""

    expr: SExpr
    tables: tuple[TableSpec, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)
