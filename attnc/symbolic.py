"""Symbolic density: allowed pairs of a 1-D pattern as an exact formula of N
and the pattern's parameters.

input:  a bound PatternIR on `seq` (self-attention, M = N).
output: a `Formula`: allowed pairs, density and forward FLOPs as sympy
        expressions, with the conditions under which they are exact.
does not: handle grids, heads, strided/dilated/blocked/random structure or
        `where` (they raise NoFormula with the reason); count pairs for a given
        size (analysis.py does, exactly, for every pattern); implement the
        piecewise-linear algebra and the ordering of breakpoints (piecewise.py).

[Note: piecewise-linear counts] Every supported primitive gives each query q
one or a few key intervals whose ends are linear in q (band: [q - l, q + r + 1)).
The number of allowed keys of q is then a piecewise-linear function of q,
built by inclusion-exclusion over the intervals (|A u B| = |A| + |B| - |A n B|,
an intersection of intervals is an interval) and clamping to [0, N). A
piecewise function is a list of segments [s_i, s_i+1) of q, each with a
linear expression; summing each segment in closed form gives the total.
Breakpoints are symbolic, so they must be ordered: the order is the one they
have for the bound parameter values and N large (compared by the coefficient
of N first, then by value). Every comparison decided that way is recorded as a
condition; the formula is exact exactly when all conditions hold (e.g.
`N >= l + r + 1` for band(l, r)). Conditions without N restrict the
parameters (`n <= w`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from . import ir, semantics
from .lru import memoize
from .piecewise import PL, NoFormula, Order, Q, combine, extremum, sum_over_q

D = sympy.Symbol("D", integer=True, positive=True)  # head dim, for FLOPs


# ----------------------------------------------------------------------------- sets of keys per query


@dataclass(frozen=True)
class Iv:
    lo: PL
    hi: PL


@dataclass(frozen=True)
class SetExpr:
    op: str  # "iv" | "or" | "and" | "not"
    parts: tuple
    iv: Iv | None = None


def _iv(lo: PL, hi: PL) -> SetExpr:
    return SetExpr("iv", (), Iv(lo, hi))


class Counter:
    """Per-query key counts of set expressions, by inclusion-exclusion."""

    def __init__(self, order: Order):
        self.order = order
        self.zero = PL.of(0)

    def add(self, f, g, sign=1):
        return combine([f, g], lambda a, b: a + sign * b, self.order)

    def count(self, s: SetExpr) -> PL:
        o = self.order
        if s.op == "iv":
            lo = extremum(s.iv.lo, PL.of(0), o, True)
            hi = extremum(s.iv.hi, PL.of(ir.N), o, False)
            return extremum(self.add(hi, lo, -1), self.zero, o, True)
        if s.op == "not":
            return self.add(PL.of(ir.N), self.count(s.parts[0]), -1)
        if s.op == "or":
            a, rest = s.parts[0], s.parts[1:]
            b = rest[0] if len(rest) == 1 else SetExpr("or", rest)
            return self.add(self.add(self.count(a), self.count(b)), self.count(self.inter(a, b)), -1)
        if s.op == "and":
            # |P n ~X1 n ~X2| = |P| - |(P n X1) u (P n X2)|, P the positive parts' intersection
            pos = [p for p in s.parts if p.op != "not"]
            neg = [p.parts[0] for p in s.parts if p.op == "not"]
            P = pos[0] if pos else _iv(PL.of(0), PL.of(ir.N))
            for x in pos[1:]:
                P = self.inter(P, x)
            if not neg:
                return self.count(P)  # P has no "and" left only when all parts were intervals or unions
            minus = SetExpr("or", tuple(self.inter(P, x) for x in neg)) if len(neg) > 1 else self.inter(P, neg[0])
            return self.add(self.count(P), self.count(minus), -1)
        raise AssertionError(s.op)

    def inter(self, a: SetExpr, b: SetExpr) -> SetExpr:
        """a & b: intervals intersected, unions distributed, anything else a flat "and"."""
        o = self.order
        if a.op == "iv" and b.op == "iv":
            return _iv(extremum(a.iv.lo, b.iv.lo, o, True), extremum(a.iv.hi, b.iv.hi, o, False))
        for x, y in ((a, b), (b, a)):
            if x.op == "or":
                return SetExpr("or", tuple(self.inter(p, y) for p in x.parts))
        parts = []
        for x in (a, b):
            parts += list(x.parts) if x.op == "and" else [x]
        pos = [p for p in parts if p.op != "not"]
        if len(pos) > 1 and all(p.op in ("iv", "or") for p in pos):
            merged = pos[0]
            for p in pos[1:]:
                merged = self.inter(merged, p)
            parts = [merged] + [p for p in parts if p.op == "not"]
        return SetExpr("and", tuple(parts))


# ----------------------------------------------------------------------------- primitives


class FormulaBuilder:
    """Mask IR -> SetExpr over symbolic q (absolute position) and N."""

    def __init__(self, order: Order):
        self.o = order

    def scalar(self, v) -> sympy.Expr:
        if isinstance(v, tuple):
            raise NoFormula("per-axis arguments")
        return sympy.sympify(v)

    def build(self, node: ir.Mask) -> SetExpr:
        parts = semantics.keys_of(node)
        if parts is not None:
            try:
                return self.key_sets(node, parts)
            except NoFormula as e:
                raise NoFormula(f"{type(node).__name__.rstrip('_').lower()} has no closed-form count: {e}") from None
        if semantics.is_combinator(node):
            return semantics.combine(node, self.build, self.algebra)
        m = getattr(self, "b_" + type(node).__name__.rstrip("_"), None)
        if m is None:
            name = type(node).__name__.rstrip("_").lower()
            raise NoFormula(f"{'`@` (along an axis)' if name == 'along' else name} has no closed-form count")
        return m(node)

    def iv(self, lo, hi) -> SetExpr:
        return _iv(PL.of(lo), PL.of(hi))

    # -- primitives: their definitions (attnc/semantics.py) as piecewise-linear ends
    def key_sets(self, node: ir.Mask, parts: tuple[semantics.Keys, ...]) -> SetExpr:
        if any(isinstance(getattr(node, f), tuple) for f in getattr(node, "__dataclass_fields__", ()) if f != "span"):
            raise NoFormula("per-axis arguments")
        sets = []
        for p in parts:
            if p.step is not None and self.scalar(self.term(p.step)) != 1:
                raise NoFormula("a set with a step" if isinstance(node, (ir.Cols, ir.Global)) else
                                "keys with a step (dilated or strided)")
            lo, hi = self.pl(p.lo), self.pl(p.hi)
            if p.when is not None:  # outside the condition the interval is empty: hi = lo
                inside = self.indicator(p.when)
                hi = combine([lo, hi, inside], lambda a, b, c: a + (b - a) * c, self.o)
            sets.append(_iv(lo, hi))
        if not sets:
            return self.iv(0, 0)
        return sets[0] if len(sets) == 1 else SetExpr("or", tuple(sets))

    def term(self, e: ir.PExpr) -> sympy.Expr:
        """A term without the query position (a parameter expression)."""
        f = self.pl(e)
        if len(f.segs) != 1 or f.segs[0][1].has(Q):
            raise NoFormula("a step that depends on the query")
        return f.segs[0][1]

    def pl(self, e: ir.PExpr) -> PL:
        """A term of the definitions as a piecewise-linear function of q."""
        o = self.o
        match e:
            case ir.PVar(name="q", axis=None):
                return PL.of(Q)
            case ir.PConst(value=v):
                return PL.of(self.scalar(v))
            case ir.PCall(func="min" | "max" as f, args=args):
                out = self.pl(args[0])
                for a in args[1:]:
                    out = extremum(out, self.pl(a), o, f == "max")
                return out
            case ir.PBin(op=op, left=a, right=b):
                x, y = self.pl(a), self.pl(b)
                if op in ("+", "-"):
                    return combine([x, y], (lambda u, v: u + v) if op == "+" else (lambda u, v: u - v), o)
                fixed = [len(f.segs) == 1 and not f.segs[0][1].has(Q) for f in (x, y)]
                if op == "*" and any(fixed):
                    return combine([x, y], lambda u, v: u * v, o)
                if op in ("//", "%") and all(fixed):
                    u, v = x.segs[0][1], y.segs[0][1]
                    return PL.of(sympy.floor(u / v) if op == "//" else sympy.Mod(u, v))
                if op in ("//", "%"):
                    raise NoFormula("// or % of the query position (blocked, dilated or strided keys)")
        raise NoFormula(f"a term {type(e).__name__} the formulas do not handle")

    def indicator(self, cond: ir.PExpr) -> PL:
        """1 where the query satisfies a progression's condition, else 0."""
        o = self.o
        match cond:
            case ir.PCmp(ops=("<",), operands=(ir.PVar(name="q", axis=None), bound)):
                return PL.step(self.term(bound), 1, 0, o)
            case ir.PIn(item=ir.PVar(name="q", axis=None), collection=tokens):
                out = PL.of(0)
                for a, b in self._ranges(tokens):
                    out = combine([out, PL.step(a, 0, 1, o), PL.step(b, 0, 1, o)], lambda t, u, v: t + u - v, o)
                return out
        raise NoFormula("a condition on the query that is not a range or a set")

    def _ranges(self, s) -> list[tuple]:
        if isinstance(s, ir.SetRange):
            if s.step != 1:
                raise NoFormula("a set with a step")
            return [(s.start, s.stop)]
        return [(i, i + 1) for i in s.items]

    @functools.cached_property
    def algebra(self) -> semantics.Algebra:
        """Set expressions as sets for the boolean combinators ([Note: combinators] in
        semantics.py): unions and complements stay symbolic, intersections are counted."""
        return semantics.Algebra(union=lambda sets: SetExpr("or", tuple(sets)),
                                 intersect=semantics.folding(lambda a, b: Counter(self.o).inter(a, b)),
                                 complement=lambda s: SetExpr("not", (s,)))


# ----------------------------------------------------------------------------- formulas


@dataclass(frozen=True)
class Formula:
    """Exact counts of a 1-D self-attention pattern (M = N) as formulas.

    `allowed` (pairs per head), `density = allowed / N**2` and `flops`
    (forward, 4 * D * H * allowed: QK^T and PV) are sympy expressions of N,
    the parameters, D (head dim) and H (heads). They are exact whenever every
    relation in `conditions` holds; `valid_at(N)` checks that for the bound
    parameter values.
    """

    allowed: sympy.Expr
    density: sympy.Expr
    flops: sympy.Expr
    conditions: tuple  # sympy relations
    bindings: tuple  # (symbol, bound int) of the parameters

    def valid_at(self, N: int) -> bool:
        env = {**dict(self.bindings), ir.N: N}
        return all(bool(c.xreplace(env)) for c in self.conditions)

    def allowed_at(self, N: int) -> int:
        """The formula's value at N for the bound parameters (exact when valid_at(N))."""
        # exact substitution: a compiled float function would turn 1/2 into 0.5 and lose N**2 > 2**53
        v = self.allowed.xreplace({**{s: sympy.Integer(x) for s, x in self.bindings}, ir.N: sympy.Integer(N)})
        if not v.is_Integer:
            raise ValueError(f"allowed_at: the formula gives {v} at N = {N}; expected an integer (is valid_at({N}) true?)")
        return int(v)

    def condition_text(self) -> str:
        return ", ".join(_rel_text(c) for c in self.conditions) or "all N"

    def to_text(self) -> str:
        return (f"allowed = {self.allowed}\ndensity = {self.density}\nflops   = {self.flops}   (forward)\n"
                f"exact when {self.condition_text()}")

    def to_dict(self) -> dict:
        return {"allowed": str(self.allowed), "density": str(self.density), "flops": str(self.flops),
                "exact_when": [_rel_text(c) for c in self.conditions]}


def _rel_text(c) -> str:
    return f"{c.lhs} {c.rel_op} {c.rhs}"


def formula(pattern: ir.PatternIR) -> Formula:
    """The exact count formula of a bound 1-D pattern (cached per pattern:
    repeated calls do not re-derive it). Raises NoFormula with the reason
    (cached too: `attnc show` and `simulate` ask more than once)."""
    out = _formula_or_reason(pattern)
    if isinstance(out, NoFormula):
        raise NoFormula(*out.args)
    return out


@memoize("formulas", 128, "density formulas (or why there is none) per pattern")
def _formula_or_reason(pattern: ir.PatternIR) -> "Formula | NoFormula":
    try:
        return _formula(pattern)
    except NoFormula as exc:
        return exc


def _formula(pattern: ir.PatternIR) -> Formula:
    if pattern.layout.axes or pattern.layout.text is not None:
        raise NoFormula("grid layouts")
    if pattern.inputs:
        raise NoFormula("run-time inputs")
    values: dict = {}
    for sym, v in pattern.bindings:
        v = sympy.sympify(v).xreplace(values)
        if v.free_symbols:
            raise NoFormula(f"parameter {sym} = {v} depends on the sizes")
        values[sym] = int(v)
    order = Order(values)
    sets = FormulaBuilder(order).build(pattern.body)
    counts = Counter(order).count(sets)
    allowed = sum_over_q(counts, order)
    conditions = tuple(sorted(_simplify_conditions(order.conditions, values), key=lambda c: (ir.N in c.free_symbols, str(c))))
    density = sympy.collect(sympy.expand(allowed / ir.N**2), ir.N, sympy.factor)
    return Formula(allowed=allowed, density=density,
                   flops=sympy.factor_terms(4 * D * ir.H * allowed), conditions=conditions,
                   bindings=tuple((s, values[s]) for s, _ in pattern.bindings))


def _simplify_conditions(conds, values) -> list:
    """The recorded relations as `expr >= bound` (integers: `x > b` is `x >= b + 1`),
    tightest bound per expression, lower bounds on N dominated by another
    (given the parameters' own lower bounds) dropped."""
    lower: dict = {}  # expr -> bound: expr >= bound
    eqs = []
    for c in conds:
        if c in (sympy.true, sympy.false):
            continue
        d = sympy.expand(c.lhs - c.rhs)
        op = c.rel_op
        if op == "==":
            eqs.append(sympy.Eq(d, 0))
            continue
        if op in ("<", "<="):
            d, op = -d, {"<": ">", "<=": ">="}[op]
        const, expr = d.as_coeff_Add()
        bound = -const + (1 if op == ">" else 0)
        if ir.N in expr.free_symbols:
            k = expr.coeff(ir.N)
            expr, bound = ir.N, sympy.expand((bound - (expr - k * ir.N)) / k)
            lower.setdefault(ir.N, set()).add(bound)
            continue
        coeff, rest = expr.as_coeff_Mul()
        if coeff < 0:  # c * w >= b with c < 0 is w <= b / c: keep as an upper bound
            eqs.append(sympy.Le(rest, sympy.expand(bound / coeff)))  # (was -b / c: `w <= 5` read `w <= -5`)
            continue
        key = rest
        b = sympy.ceiling(bound / coeff)
        cur = lower.get(key)
        lower[key] = b if cur is None else sympy.Max(cur, b)
    param_low = {k: v for k, v in lower.items() if k != ir.N and k.is_Symbol}

    def at_least(e) -> bool:
        """e >= 0 for every parameter value allowed by param_low."""
        const, rest = sympy.expand(e).as_coeff_Add()
        total = const
        for term in sympy.Add.make_args(rest):
            if term == 0:
                continue
            c, sym = term.as_coeff_Mul()
            if not sym.is_Symbol or c < 0 or sym not in param_low:
                return False
            total += c * param_low[sym]
        return total >= 0

    out = list(eqs)
    for key, b in lower.items():
        if key != ir.N and (key.is_Symbol or not at_least(key - b)):
            out.append(sympy.Ge(key, b))
    ns = list(lower.get(ir.N, ()))
    keep = [b for b in ns if not any(o != b and at_least(o - b) for o in ns)]
    out += [sympy.Ge(ir.N, b) for b in keep]
    if any(c == sympy.false for c in out):  # sympy decided a relation: it must hold at the bound values
        raise NoFormula("the derived conditions contradict each other")
    return [c for c in dict.fromkeys(out) if c != sympy.true]  # each relation once
