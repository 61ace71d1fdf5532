"""A primitive's progressions as one pointwise condition on (q, k): what the dense reference
evaluates and the Triton kernels print.

input:  a primitive's `semantics.Keys` progressions.
output: `predicate(parts)`, one `where`-expression (`ir.PExpr`) of q and k, or None (no key).
does not: evaluate it (reference.py over tensors, codegen/pointwise.py as kernel text) or
        define any primitive (semantics.py).

The spelling is the one kernels compute best and the spec writes: a window reads
`k > q - w and k <= q`, a cell `k // m == q // m` (one division, not two comparisons), a
residue `(q - k) % s == 0`, single keys one membership test `k in {a, b, ...}`.
"""

from __future__ import annotations

import sympy

from . import ir
from .semantics import K, LENGTH, Keys, add, const, floordiv, literal, member, mod, sub


def _at_least(e: ir.PExpr) -> ir.PExpr:
    """k >= e, written k > e' when e is e' + 1 (q - w < k reads k > q - w)."""
    if isinstance(e, ir.PBin) and e.op == "+" and literal(e.right) == 1:
        return ir.PCmp(ops=(">",), operands=(K, e.left))
    return ir.PCmp(ops=(">=",), operands=(K, e))


def _below(e: ir.PExpr) -> ir.PExpr:
    """k < e, written k <= e' when e is e' + 1 (reads as the spec does: k <= q)."""
    if isinstance(e, ir.PBin) and e.op == "+" and literal(e.right) == 1:
        return ir.PCmp(ops=("<=",), operands=(K, e.left))
    return ir.PCmp(ops=("<",), operands=(K, e))


def _peel(e: ir.PExpr) -> tuple[ir.PExpr, object]:
    """e as base + offset, the offset a sum of constants (literals or parameters)."""
    off = 0
    while isinstance(e, ir.PBin) and e.op in ("+", "-") and isinstance(e.right, ir.PConst):
        off = off + (e.right.value if e.op == "+" else -e.right.value)
        e = e.left
    return e, off


def _cell(p: Keys) -> ir.PExpr | None:
    """[(x // m) * m + c, ... + m): the keys of q's cell, written (k - c) // m == x // m."""
    (base, c1), (base2, c2) = _peel(p.lo), _peel(p.hi)
    if not (base == base2 and isinstance(base, ir.PBin) and base.op == "*" and isinstance(base.left, ir.PBin)
            and base.left.op == "//" and base.left.right == base.right and isinstance(base.right, ir.PConst)):
        return None
    if sympy.simplify(sympy.sympify(c2) - sympy.sympify(c1) - sympy.sympify(base.right.value)) != 0:
        return None
    return ir.PCmp(ops=("==",), operands=(floordiv(sub(K, c1), base.right), base.left))


def _residue(p: Keys) -> ir.PExpr | None:
    """The keys k = x mod s of [0, N): (x - k) % s == 0 (k >= x % s follows for k >= 0)."""
    lo = p.lo
    if isinstance(lo, ir.PBin) and lo.op == "%" and lo.right == p.step and p.hi == LENGTH:
        return ir.PCmp(ops=("==",), operands=(mod(sub(lo.left, K), p.step), const(0)))
    return None


def _part(p: Keys) -> ir.PExpr:
    short = (_cell(p) if p.step is None else _residue(p)) if p.when is None else None
    if short is not None:
        return short
    conds = [_at_least(p.lo), _below(p.hi)]
    if p.step is not None:
        conds.append(ir.PCmp(ops=("==",), operands=(mod(sub(K, p.lo), p.step), const(0))))
    if p.when is not None:
        conds.insert(0, p.when)
    return ir.PBool(op="and", parts=tuple(conds))


def predicate(parts: tuple[Keys, ...]) -> ir.PExpr | None:
    """allowed(q, k) as one `where` condition (None: never). Single keys listed by a set
    are one membership test, `k in {a, b, ...}`."""
    points = [p for p in parts if p.step is None and p.when is None and p.hi == add(p.lo, 1)]
    rest = [p for p in parts if not any(p is x for x in points)]
    conds = [_part(p) for p in rest]
    if len(points) == 1:
        conds.append(ir.PCmp(ops=("==",), operands=(K, points[0].lo)))
    elif points:
        conds.append(member(K, ir.SetList(items=tuple(p.lo.value for p in points))))
    if not conds:
        return None
    return conds[0] if len(conds) == 1 else ir.PBool(op="or", parts=tuple(conds))
