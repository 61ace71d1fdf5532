"""Piecewise-linear functions of the query position, with breakpoints ordered symbolically.

input:  linear sympy expressions of the query position `Q`, the length N and the bound
        parameters (symbolic.FormulaBuilder builds them from the primitives' definitions).
output: `PL` functions of q on [0, N) and their algebra (`combine`, `extremum`, the closed-form
        `sum_over_q`); `Order`, which compares breakpoints as they compare for the bound
        parameter values and N large and records each comparison as a condition; `NoFormula`
        when an expression is outside that algebra.
does not: read the IR or count sets of keys (symbolic.py), or evaluate at a size.

The method (intervals per query, inclusion-exclusion, ordered breakpoints, the recorded
conditions) is [Note: piecewise-linear counts] in attnc/symbolic.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

import sympy

from . import ir

Q = sympy.Symbol("q", integer=True)


class NoFormula(ValueError):
    """The pattern has no closed-form count here (the message says why)."""


# ----------------------------------------------------------------------------- ordering with recorded conditions


#: Most breakpoint comparisons one formula may make. Inclusion-exclusion over a union of
#: n terms makes ~2**n intersections (8 `sliding` terms, or `global` of a few tokens, took
#: minutes); the examples need at most ~1200. Past the budget the formula gives up with
#: NoFormula, and `attnc show` / `simulate` report exact counts at the size asked instead.
#: A count of steps, not a timeout: the outcome is the same on every machine.
MAX_COMPARISONS = 3000


def _poly(v, gen, what: str) -> sympy.Poly:
    """`v` as a polynomial in `gen`; NoFormula when it is not one (min / max / `//` of N:
    sympy raises PolynomialError for those, which used to escape as a traceback)."""
    if not v.is_polynomial(gen):
        raise NoFormula(f"{what} is not a polynomial in {gen} (min, max, // or % of it)")
    try:
        return sympy.Poly(v, gen)
    except sympy.PolynomialError:
        raise NoFormula(f"{what} is not a polynomial in {gen}") from None


class Order:
    """Compares symbolic positions as they compare for the bound values and N large."""

    def __init__(self, values: dict, budget: int = MAX_COMPARISONS):
        self.values = values  # parameter symbol -> int (N stays symbolic)
        self.conditions: set = set()
        self.budget = budget
        # memos: unions of many similar terms compare the same ends again and again
        # (199 `causal` terms: 6000 sympy expansions, 1.3 s, before; the budget still counts every call)
        self._keys: dict = {}
        self._cmps: dict = {}

    def key(self, e) -> tuple:
        try:
            return self._keys[e]
        except (KeyError, TypeError):
            pass
        k = self._key(e)
        try:
            self._keys[e] = k
        except TypeError:  # unhashable: not memoised
            pass
        return k

    def _key(self, e) -> tuple:
        v = sympy.expand(sympy.sympify(e).xreplace(self.values))
        if v.free_symbols - {ir.N}:
            raise NoFormula(f"cannot order {e}: depends on {', '.join(map(str, v.free_symbols - {ir.N}))}")
        poly = _poly(v, ir.N, f"position {e}")
        if poly.degree() > 1 or not all(c.is_Rational for c in poly.all_coeffs()):
            raise NoFormula(f"position {e} is not linear in N")
        c1 = sympy.Rational(poly.coeff_monomial(ir.N))
        c0 = sympy.Rational(sympy.expand(v - c1 * ir.N))
        return Fraction(int(c1.p), int(c1.q)), Fraction(int(c0.p), int(c0.q))

    def cmp(self, a, b) -> int:
        """-1, 0 or 1; records the condition that makes the answer hold symbolically."""
        self.budget -= 1
        if self.budget < 0:
            raise NoFormula(f"too many terms for a closed form (more than {MAX_COMPARISONS} comparisons of "
                            "interval ends; unions of many terms grow exponentially)")
        try:
            r, rel = self._cmps[(a, b)]
        except (KeyError, TypeError):
            ka, kb = self.key(a), self.key(b)
            r = (ka > kb) - (ka < kb)
            diff = sympy.expand(sympy.sympify(a) - sympy.sympify(b))
            rel = {-1: sympy.Lt, 0: sympy.Eq, 1: sympy.Gt}[r](diff, 0) if diff.free_symbols else None
            try:
                self._cmps[(a, b)] = (r, rel)
            except TypeError:
                pass
        if rel is not None:
            self.conditions.add(rel)
        return r


# ----------------------------------------------------------------------------- piecewise-linear functions of q on [0, N)


@dataclass(frozen=True)
class PL:
    """Segments (start, expr): expr holds for start <= q < next start (last: < N)."""

    segs: tuple[tuple[sympy.Expr, sympy.Expr], ...]

    @staticmethod
    def of(e) -> "PL":
        """One segment: the expression `e` of q on all of [0, N)."""
        return PL(((sympy.Integer(0), sympy.sympify(e)),))

    @staticmethod
    def step(at, before, after, order: Order) -> "PL":
        """`before` for q < at, `after` from there on (at clamped to [0, N])."""
        if order.cmp(at, 0) <= 0:
            return PL.of(after)
        if order.cmp(at, ir.N) >= 0:
            return PL.of(before)
        return PL(((sympy.Integer(0), sympy.sympify(before)), (sympy.sympify(at), sympy.sympify(after))))


def _points(fs: list[PL], order: Order) -> list:
    pts: list = []
    for f in fs:
        for s, _ in f.segs:
            if not any(order.cmp(s, p) == 0 for p in pts):
                pts.append(s)
    return sorted(pts, key=functools.cmp_to_key(order.cmp))


def _at(f: PL, start, order: Order):
    """The expression of f on the segment beginning at `start` (a breakpoint of f's refinement)."""
    cur = f.segs[0][1]
    for s, e in f.segs:
        if order.cmp(s, start) <= 0:
            cur = e
    return cur


def combine(fs: list[PL], fn, order: Order) -> PL:
    pts = _points(fs, order)
    return PL(tuple((p, sympy.expand(fn(*[_at(f, p, order) for f in fs]))) for p in pts))


def _ends(pts, i):
    return pts[i], (pts[i + 1] if i + 1 < len(pts) else ir.N)


def extremum(f: PL, g: PL, order: Order, pick_max: bool) -> PL:
    """max(f, g) or min(f, g), splitting segments where the two lines cross."""
    pts = _points([f, g], order)
    out = []
    for i, p in enumerate(pts):
        s, e = _ends(pts, i)
        a, b = _at(f, p, order), _at(g, p, order)
        d = _poly(sympy.expand(a - b), Q, "an interval end")
        slope = d.coeff_monomial(Q) if d.degree() >= 1 else 0
        if d.degree() > 1:
            raise NoFormula("a count that is not linear in q")
        c = sympy.expand(a - b - slope * Q)
        if slope == 0:
            first_is_f = order.cmp(c, 0) >= 0  # a >= b
            out.append((s, a if first_is_f == pick_max else b))
            continue
        if slope not in (1, -1):
            raise NoFormula("interval ends with slopes other than 0 and 1")
        x = -c / slope  # a == b at q = x
        # for q < x: sign(a - b) = -sign(slope)
        lower_f = (slope < 0)  # a > b below x
        below = a if lower_f == pick_max else b
        above = b if lower_f == pick_max else a
        if order.cmp(x, s) <= 0:
            out.append((s, above))
        elif order.cmp(x, e) >= 0:
            out.append((s, below))
        else:
            out += [(s, below), (x, above)]
    return PL(tuple(out))


def sum_over_q(f: PL, order: Order) -> sympy.Expr:
    total = sympy.Integer(0)
    pts = [s for s, _ in f.segs]
    for i, (s, e_expr) in enumerate(f.segs):
        _, e = _ends(pts, i)
        total += sympy.summation(e_expr, (Q, s, e - 1))
    return sympy.factor_terms(sympy.expand(total))
