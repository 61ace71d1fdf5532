"""The expression IR of lowered masks: integer / boolean expressions of (q, k, h, b).

input:  nothing but its own nodes: `Var`, `Const` (size-tagged ints keep their size
        expression, sizes.py), `Op`, `Lookup` (a host table element), built through a
        `Builder` that knows the variables' ranges.
output: simplified expressions (constant folding, flattening, comparisons the ranges decide,
        the unravel of a ravel), their nodes in order (`nodes`), substitution (`substitute`)
        and a readable one-line text (`to_text`).
does not: lower patterns (pointwise.py), print Triton (triton_text.py) or evaluate with torch
        (torch_program.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import sizes as size_tags


# ----------------------------------------------------------------------------- the expression IR


@dataclass(frozen=True, slots=True)
class Expr:
    pass


@dataclass(frozen=True, slots=True)
class Var(Expr):
    """`q` (query row of the q tensor), `k` (key), `h` (query head) or `b` (batch)."""

    name: str


@dataclass(frozen=True, slots=True)
class Const(Expr):
    value: int | bool
    #: the size expression of a size-tagged value (sizes.Sym): equal values with different
    #: expressions are different constants ([Note: one text, many sizes] in sizes.py)
    tag: object = field(default=None, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "tag", size_tags.tag_of(self.value) if not isinstance(self.value, bool) else None)


@dataclass(frozen=True, slots=True)
class Op(Expr):
    """Integer ops: add sub mul floordiv mod (floor semantics) min max neg abs;
    comparisons: lt le gt ge eq ne; boolean: and or not."""

    op: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Lookup(Expr):
    """An element of a host table (indices already clamped in range); with `bit`,
    the table holds int32 words and the result is bit `bit` of the word (bool)."""

    table: str
    index: tuple[Expr, ...]
    bit: Expr | None = None


ARITH = {"add", "sub", "mul", "floordiv", "mod", "min", "max", "neg", "abs"}
COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


class Builder:
    """Smart constructors: constant folding, flattening and range-based
    simplification (a comparison the variables' ranges decide becomes a constant)."""

    def __init__(self, var_bounds: dict[str, tuple[int | None, int | None]]):
        self.var_bounds = var_bounds
        self._bounds: dict[Expr, tuple] = {}

    # -- ranges (inclusive; None = unbounded)
    def bounds(self, e: Expr) -> tuple[int | None, int | None]:
        if isinstance(e, Const):
            return int(e.value), int(e.value)
        if isinstance(e, Var):
            return self.var_bounds.get(e.name, (0, None))
        got = self._bounds.get(e)
        if got is not None:
            return got
        if isinstance(e, Lookup):
            r = (0, 1) if e.bit is not None else (None, None)
        else:
            r = self._op_bounds(e)
        self._bounds[e] = r
        return r

    def _op_bounds(self, e: Op):
        bs = [self.bounds(a) for a in e.args]
        op = e.op
        if op in COMPARE or op in ("and", "or", "not"):
            return 0, 1

        def f(fn, *xs):
            return None if any(x is None for x in xs) else fn(*xs)

        if op == "add":
            return f(lambda a, b: a + b, bs[0][0], bs[1][0]), f(lambda a, b: a + b, bs[0][1], bs[1][1])
        if op == "sub":
            return f(lambda a, b: a - b, bs[0][0], bs[1][1]), f(lambda a, b: a - b, bs[0][1], bs[1][0])
        if op == "neg":
            return f(lambda a: -a, bs[0][1]), f(lambda a: -a, bs[0][0])
        if op == "mul":
            (a0, a1), (b0, b1) = bs
            if None in (a0, a1, b0, b1):
                if a0 is not None and b0 is not None and a0 >= 0 and b0 >= 0:
                    return a0 * b0, None
                return None, None
            ps = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
            return min(ps), max(ps)
        if op in ("floordiv", "mod"):
            (a0, a1), (c0, c1) = bs
            if c0 is None or c0 != c1 or c0 <= 0:
                return (None, None) if op == "floordiv" else ((0, None) if c0 is not None and c0 > 0 else (None, None))
            if op == "floordiv":
                return f(lambda a: a // c0, a0), f(lambda a: a // c0, a1)
            if a0 is not None and a1 is not None and a0 // c0 == a1 // c0:
                return a0 % c0, a1 % c0
            return 0, c0 - 1
        if op == "min":
            lo = None if any(b[0] is None for b in bs) else min(b[0] for b in bs)
            his = [b[1] for b in bs if b[1] is not None]
            return lo, (min(his) if his else None)
        if op == "max":
            los = [b[0] for b in bs if b[0] is not None]
            hi = None if any(b[1] is None for b in bs) else max(b[1] for b in bs)
            return (max(los) if los else None), hi
        if op == "abs":
            a0, a1 = bs[0]
            if a0 is not None and a0 >= 0:
                return a0, a1
            if a1 is not None and a1 <= 0:
                return -a1, f(lambda a: -a, a0)
            return 0, (None if a0 is None or a1 is None else max(-a0, a1))
        raise ValueError(op)

    # -- integers
    def c(self, v: int) -> Const:
        return Const(v if isinstance(v, size_tags.Sym) else int(v))

    def add(self, a: Expr, b: Expr) -> Expr:
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value + b.value)
        if isinstance(b, Const) and b.value == 0:
            return a
        if isinstance(a, Const) and a.value == 0:
            return b
        if isinstance(b, Const) and b.value < 0:
            return self.sub(a, self.c(-b.value))
        # (x + c1) + c2 -> x + (c1 + c2)
        if isinstance(b, Const) and isinstance(a, Op) and a.op in ("add", "sub") and isinstance(a.args[1], Const):
            c1 = a.args[1].value if a.op == "add" else -a.args[1].value
            return self.add(a.args[0], self.c(c1 + b.value))
        return Op("add", (a, b))

    def sub(self, a: Expr, b: Expr) -> Expr:
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value - b.value)
        if isinstance(b, Const) and b.value == 0:
            return a
        if a == b:
            return self.c(0)
        if isinstance(b, Const) and b.value < 0:
            return self.add(a, self.c(-b.value))
        if isinstance(b, Const) and isinstance(a, Op) and a.op in ("add", "sub") and isinstance(a.args[1], Const):
            c1 = a.args[1].value if a.op == "add" else -a.args[1].value
            return self.add(a.args[0], self.c(c1 - b.value))
        return Op("sub", (a, b))

    def mul(self, a: Expr, b: Expr) -> Expr:
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value * b.value)
        for x, y in ((a, b), (b, a)):
            if isinstance(x, Const) and x.value == 1:
                return y
            if isinstance(x, Const) and x.value == 0:
                return self.c(0)
        return Op("mul", (a, b))

    def floordiv(self, a: Expr, b: Expr) -> Expr:
        if isinstance(b, Const) and b.value == 0:
            raise ZeroDivisionError
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value // b.value)
        if isinstance(b, Const) and b.value == 1:
            return a
        lo, hi = self.bounds(a)
        if isinstance(b, Const) and b.value > 0 and lo is not None and hi is not None and lo // b.value == hi // b.value:
            return self.c(lo // b.value)
        split = self._split_multiple(a, b)
        if split is not None:
            return split[0]
        return Op("floordiv", (a, b))

    def _split_multiple(self, a: Expr, b: Expr) -> tuple[Expr, Expr] | None:
        """(a // c, a % c) when a = z * m + v with c dividing m and 0 <= v < c
        (for any integer z): the unravel of a ravel gives back its coordinates."""
        if not (isinstance(b, Const) and b.value > 0):
            return None
        c = b.value
        terms = [(a, self.c(0))]
        if isinstance(a, Op) and a.op == "add":
            terms = [(a.args[0], a.args[1]), (a.args[1], a.args[0])]
        for u, v in terms:
            if not (isinstance(u, Op) and u.op == "mul"):
                continue
            z, m = u.args if isinstance(u.args[1], Const) else u.args[::-1]
            if not isinstance(m, Const) or m.value % c:
                continue
            lo, hi = self.bounds(v)
            if lo is not None and hi is not None and lo >= 0 and hi < c:
                return self.mul(z, self.c(m.value // c)), v
        return None

    def mod(self, a: Expr, b: Expr) -> Expr:
        if isinstance(b, Const) and b.value == 0:
            raise ZeroDivisionError
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value % b.value)
        if isinstance(b, Const) and b.value == 1:
            return self.c(0)
        lo, hi = self.bounds(a)
        if isinstance(b, Const) and b.value > 0 and lo is not None and hi is not None and lo // b.value == hi // b.value:
            return self.sub(a, self.c(lo // b.value * b.value))
        split = self._split_multiple(a, b)
        if split is not None:
            return split[1]
        return Op("mod", (a, b))

    def minimum(self, a: Expr, b: Expr) -> Expr:
        (a0, a1), (b0, b1) = self.bounds(a), self.bounds(b)
        if a1 is not None and b0 is not None and a1 <= b0:
            return a
        if b1 is not None and a0 is not None and b1 <= a0:
            return b
        return Op("min", (a, b))

    def maximum(self, a: Expr, b: Expr) -> Expr:
        (a0, a1), (b0, b1) = self.bounds(a), self.bounds(b)
        if a0 is not None and b1 is not None and a0 >= b1:
            return a
        if b0 is not None and a1 is not None and b0 >= a1:
            return b
        return Op("max", (a, b))

    def clamp(self, a: Expr, lo: int, hi: int) -> Expr:
        return self.minimum(self.maximum(a, self.c(lo)), self.c(hi))

    def neg(self, a: Expr) -> Expr:
        if isinstance(a, Const):
            return self.c(-a.value)
        return Op("neg", (a,))

    def abs(self, a: Expr) -> Expr:
        lo, hi = self.bounds(a)
        if lo is not None and lo >= 0:
            return a
        return Op("abs", (a,))

    # -- comparisons
    def cmp(self, op: str, a: Expr, b: Expr) -> Expr:
        (a0, a1), (b0, b1) = self.bounds(a), self.bounds(b)
        known = None not in (a0, a1, b0, b1)
        decide = {
            "lt": (a1 is not None and b0 is not None and a1 < b0, a0 is not None and b1 is not None and a0 >= b1),
            "le": (a1 is not None and b0 is not None and a1 <= b0, a0 is not None and b1 is not None and a0 > b1),
            "gt": (a0 is not None and b1 is not None and a0 > b1, a1 is not None and b0 is not None and a1 <= b0),
            "ge": (a0 is not None and b1 is not None and a0 >= b1, a1 is not None and b0 is not None and a1 < b0),
            "eq": (known and a0 == a1 == b0 == b1, (a1 is not None and b0 is not None and a1 < b0)
                   or (a0 is not None and b1 is not None and a0 > b1)),
        }
        decide["ne"] = (decide["eq"][1], decide["eq"][0])
        yes, no = decide[op]
        if yes:
            return Const(True)
        if no:
            return Const(False)
        return Op(op, (a, b))

    def lt(self, a, b):
        return self.cmp("lt", a, b)

    def le(self, a, b):
        return self.cmp("le", a, b)

    def ge(self, a, b):
        return self.cmp("ge", a, b)

    def eq(self, a, b):
        return self.cmp("eq", a, b)

    # -- booleans
    def _logic(self, op: str, parts) -> Expr:
        unit, zero = (True, False) if op == "and" else (False, True)
        out: list[Expr] = []
        for p in parts:
            items = p.args if isinstance(p, Op) and p.op == op else (p,)
            for x in items:
                if isinstance(x, Const):
                    if bool(x.value) == zero:
                        return Const(zero)
                    continue
                if x not in out:
                    out.append(x)
        if not out:
            return Const(unit)
        return out[0] if len(out) == 1 else Op(op, tuple(out))

    def and_(self, *parts: Expr) -> Expr:
        return self._logic("and", parts)

    def or_(self, *parts: Expr) -> Expr:
        return self._logic("or", parts)

    def not_(self, a: Expr) -> Expr:
        if isinstance(a, Const):
            return Const(not a.value)
        if isinstance(a, Op) and a.op == "not":
            return a.args[0]
        if isinstance(a, Op) and a.op in COMPARE:
            flip = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}[a.op]
            return Op(flip, a.args)
        return Op("not", (a,))

    def in_range(self, x: Expr, lo: int, hi: int, step: int = 1) -> Expr:
        """lo <= x < hi and (x - lo) % step == 0."""
        cond = self.and_(self.ge(x, self.c(lo)), self.lt(x, self.c(hi)))
        if step != 1:
            cond = self.and_(cond, self.eq(self.mod(self.sub(x, self.c(lo)), self.c(step)), self.c(0)))
        return cond

    def in_items(self, x: Expr, items) -> Expr:
        """x in a finite set, written as runs `lo <= x < hi` and equalities."""
        vals = sorted(set(items), key=int)  # (the items themselves: size-tagged ones keep their expressions)
        runs, i = [], 0
        while i < len(vals):
            j = i
            while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
                j += 1
            runs.append((vals[i], vals[j] + 1))
            i = j + 1
        return self.or_(*[self.eq(x, self.c(a)) if b == a + 1 else self.in_range(x, a, b) for a, b in runs])


# ----------------------------------------------------------------------------- traversal and substitution


def nodes(e: Expr):
    """Every distinct node of `e`, children first."""
    seen: dict[Expr, None] = {}

    def visit(x):
        if x in seen:
            return
        if isinstance(x, Op):
            for a in x.args:
                visit(a)
        elif isinstance(x, Lookup):
            for a in x.index:
                visit(a)
            if x.bit is not None:
                visit(x.bit)
        seen[x] = None

    visit(e)
    return list(seen)


def children(n: Expr) -> tuple[Expr, ...]:
    """The operands of a node (table indices and bit of a lookup)."""
    if isinstance(n, Op):
        return n.args
    if isinstance(n, Lookup):
        return n.index + ((n.bit,) if n.bit is not None else ())
    return ()


_REBUILD = {
    "add": Builder.add, "sub": Builder.sub, "mul": Builder.mul, "floordiv": Builder.floordiv, "mod": Builder.mod,
    "min": Builder.minimum, "max": Builder.maximum, "neg": Builder.neg, "abs": Builder.abs,
    "and": Builder.and_, "or": Builder.or_, "not": Builder.not_,
}


def substitute(b: Builder, e: Expr, env: dict[str, Expr]) -> Expr:
    """`e` with variables replaced by expressions, rebuilt through `b` (so it folds
    again under b's variable ranges)."""
    memo: dict[Expr, Expr] = {}

    def go(x: Expr) -> Expr:
        got = memo.get(x)
        if got is not None:
            return got
        if isinstance(x, Var):
            r = env.get(x.name, x)
        elif isinstance(x, Const):
            r = x
        elif isinstance(x, Lookup):
            r = Lookup(x.table, tuple(go(i) for i in x.index), None if x.bit is None else go(x.bit))
        elif x.op in COMPARE:
            r = b.cmp(x.op, go(x.args[0]), go(x.args[1]))
        else:
            r = _REBUILD[x.op](b, *[go(a) for a in x.args])
        memo[x] = r
        return r

    return go(e)


def unravel(b: Builder, flat: Expr, sizes: list[int]) -> list[Expr]:
    """The row-major coordinates (axis sizes `sizes`) of the flat index `flat`, built through `b`."""
    out, rem = [], flat
    for i, s in enumerate(reversed(sizes)):
        last = i == len(sizes) - 1
        out.append(rem if last else b.mod(rem, b.c(s)))
        rem = b.floordiv(rem, b.c(s))
    return list(reversed(out))


# ----------------------------------------------------------------------------- text (for docs, headers and errors)

_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "add": 5, "sub": 5, "mul": 6, "floordiv": 6, "mod": 6, "neg": 7}
INFIX = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%"}


def to_text(e: Expr, env: dict | None = None) -> str:
    """A one-line, Python-like rendering of an expression (not Triton); with `env`
    (sizes.size_env), size-tagged constants read as expressions of M, N, G0, ..."""
    def go(x, parent_prec=0):
        if isinstance(x, Var):
            return x.name
        if isinstance(x, Const):
            return str(x.value) if isinstance(x.value, bool) else size_tags.text(x.value, env, 9)
        if isinstance(x, Lookup):
            s = f"{x.table}[{', '.join(go(i) for i in x.index)}]"
            return s if x.bit is None else f"bit({s}, {go(x.bit)})"
        op = x.op
        if op in ("and", "or"):
            s = f" {op} ".join(go(a, _PREC[op] + 1) for a in x.args)
            prec = _PREC[op]
        elif op == "not":
            s, prec = f"not {go(x.args[0], _PREC['not'])}", _PREC["not"]
        elif op in COMPARE:
            s, prec = f"{go(x.args[0], 5)} {COMPARE[op]} {go(x.args[1], 5)}", _PREC["cmp"]
        elif op in INFIX:
            prec = _PREC[op]
            s = f"{go(x.args[0], prec)} {INFIX[op]} {go(x.args[1], prec + 1)}"
        elif op == "neg":
            s, prec = f"-{go(x.args[0], 8)}", _PREC["neg"]
        else:
            s, prec = f"{op}({', '.join(go(a) for a in x.args)})", 9
        return f"({s})" if prec < parent_prec or (prec == parent_prec and op in ("and", "or") and parent_prec) else s

    return go(e)
