"""Closed-form loop bounds: which key tiles a query tile visits, as arithmetic.

input:  a bound 1-D pattern (PatternIR) at concrete sizes M, N, H, a tile
        shape, and (to verify) the pattern's Plan.
output: `LoopBounds`: per direction (rows: forward and dQ, key tiles of a
        query tile; cols: dK/dV, query tiles of a key tile) either a short
        list of *ranges* the kernels evaluate in closed form, or the reason
        the kernels read the plan's tile lists instead.
does not: print kernels (kernels.py prints `Ranges` through `Ranges.source`)
        or plan tiles (analysis.py; the plan is the oracle here).

[Note: monotone ranges] The allowed keys of an absolute query position x are
a union of a few *ranges*: [lo(x), hi(x)) for x in a guard [g0, g1) and a set
of heads, where lo and hi are non-decreasing in x (causal: [0, x + 1); band:
[x - l, x + r + 1); sink: [0, n); a block: [((x - s) // b) * b + s - halo, ...);
prefix(n): [0, n) guarded by x < n; rows(S): [0, N) guarded by S). Unions
are lists, intersections take max(lo) / min(hi) of every pair, complements
are De Morgan over the gaps. For a tile of queries [a0, a1) inside the guard,
monotonicity gives the touched key tiles [lo(a0) // BN, cdiv(hi(a1 - 1), BN))
and the full ones [cdiv(lo(a1 - 1), BN), min(hi(a0), N) // BN) (a ragged last
key tile is partial: the full loop has no bounds check): two evaluations per
range and tile.

Sizes are concrete (kernels are specialised to them), so each range list is
normalised on the host: clipped to the valid x, split where a range is empty,
touching ranges merged into one (min of lo, max of hi), clamps that never
bind dropped. The transposed direction inverts each range: the queries of key
k are [max(g0, first x with hi(x) > k), min(g1, first x with lo(x) > k)),
again monotone in k (`upper`). The kernels visit the ranges in order, each
clipped to start after the previous range's last tile, so no tile is visited
twice. Before a kernel uses the ranges, `simulate` replays exactly that
arithmetic on the host and must reproduce the plan's full and partial tiles;
anything else (or no derivation) falls back to tile lists, per direction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from attnc import ir, semantics
from attnc.reference import Evaluator, View, top_view

from . import sizes as size_tags

#: most ranges per head after normalisation (beyond: tile lists)
MAX_RANGES = 8
#: stand-in for +-infinity in inverted bounds (int32-safe)
BIG = 1 << 30
INT32 = (1 << 31) - 1


class NoClosedForm(Exception):
    """The pattern has no closed-form loop bounds here (the message says why)."""


# ----------------------------------------------------------------------------- monotone expressions of one variable


@dataclass(frozen=True)
class E:
    pass


@dataclass(frozen=True)
class X(E):
    """The variable (absolute query position, or key index when transposed)."""


class _Tagged:
    """Nodes holding integers: size-tagged integers (sizes.Sym) with different
    expressions make different nodes even when their values are equal here."""

    def __post_init__(self):
        object.__setattr__(self, "tag", size_tags.tag_of(*(getattr(self, f) for f in self._ints)))


@dataclass(frozen=True)
class C(_Tagged, E):
    value: int
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("value",)


@dataclass(frozen=True)
class Add(_Tagged, E):
    a: E
    c: int
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("c",)


@dataclass(frozen=True)
class Mul(_Tagged, E):
    a: E
    c: int  # > 0
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("c",)


@dataclass(frozen=True)
class Div(_Tagged, E):
    """floor(a / c), c > 0."""

    a: E
    c: int
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("c",)


@dataclass(frozen=True)
class Min(E):
    args: tuple


@dataclass(frozen=True)
class Max(E):
    args: tuple


@dataclass(frozen=True)
class Step(_Tagged, E):
    """`below` where a < t, else `above` (below <= above: monotone)."""

    a: E
    t: int
    below: E
    above: E
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("t",)


def ev(e: E, x: torch.Tensor) -> torch.Tensor:
    """Value of e at the int64 positions x (same shape)."""
    if isinstance(e, X):
        return x
    if isinstance(e, C):
        return torch.full_like(x, e.value)
    if isinstance(e, Add):
        return ev(e.a, x) + e.c
    if isinstance(e, Mul):
        return ev(e.a, x) * e.c
    if isinstance(e, Div):
        return torch.div(ev(e.a, x), e.c, rounding_mode="floor")
    if isinstance(e, Min):
        out = ev(e.args[0], x)
        for a in e.args[1:]:
            out = torch.minimum(out, ev(a, x))
        return out
    if isinstance(e, Max):
        out = ev(e.args[0], x)
        for a in e.args[1:]:
            out = torch.maximum(out, ev(a, x))
        return out
    if isinstance(e, Step):
        return torch.where(ev(e.a, x) < e.t, ev(e.below, x), ev(e.above, x))
    raise TypeError(e)


def subst(e: E, f: E) -> E:
    """e with the variable replaced by f."""
    if isinstance(e, X):
        return f
    if isinstance(e, C):
        return e
    if isinstance(e, (Add, Mul, Div)):
        return type(e)(subst(e.a, f), e.c)
    if isinstance(e, (Min, Max)):
        return type(e)(tuple(subst(a, f) for a in e.args))
    if isinstance(e, Step):
        return Step(subst(e.a, f), e.t, subst(e.below, f), subst(e.above, f))
    raise TypeError(e)


def _const(e: E) -> int | None:
    """The value of an expression without the variable, else None."""
    if isinstance(e, X):
        return None
    if isinstance(e, C):
        return e.value
    if isinstance(e, (Add, Mul, Div)):
        a = _const(e.a)
        if a is None:
            return None
        return a + e.c if isinstance(e, Add) else a * e.c if isinstance(e, Mul) else a // e.c
    if isinstance(e, (Min, Max)):
        vs = [_const(a) for a in e.args]
        return None if None in vs else (min(vs) if isinstance(e, Min) else max(vs))
    if isinstance(e, Step):
        a = _const(e.a)
        if a is None:
            return None
        return _const(e.below if a < e.t else e.above)
    raise TypeError(e)


def upper(e: E, k: E) -> E:
    """The first x with e(x) > k (e non-decreasing), as an expression of k's variable:
    {x : e(x) <= k} is (-inf, upper(e, k)); +-BIG stand for unbounded."""
    if isinstance(e, X):
        return Add(k, 1)
    if isinstance(e, C):
        return Step(k, e.value, C(-BIG), C(BIG))
    if isinstance(e, Add):
        return upper(e.a, Add(k, -e.c))
    if isinstance(e, Mul):  # c * a <= k  iff  a <= floor(k / c)
        return upper(e.a, Div(k, e.c))
    if isinstance(e, Div):  # floor(a / c) <= k  iff  a <= c * k + c - 1
        return upper(e.a, Add(Mul(Add(k, 1), e.c), -1))
    if isinstance(e, Min):
        return Max(tuple(upper(a, k) for a in e.args))
    if isinstance(e, Max):
        return Min(tuple(upper(a, k) for a in e.args))
    if isinstance(e, Step):
        u = _const(upper(e.a, C(e.t - 1)))  # the switch: first x with a(x) >= t
        ua = upper(e.above, k)
        return Step(ua, u + 1, Min((C(u), upper(e.below, k))), ua)
    raise TypeError(e)


def simplify(e: E, x: torch.Tensor) -> E:
    """An expression equal to e at the positions x: constants folded, Min / Max
    arguments that never decide dropped, steps that never switch resolved."""
    if isinstance(e, (X, C)):
        return e
    c = _const(e)
    if c is not None:
        return C(c)
    if isinstance(e, (Add, Mul, Div)):
        a = simplify(e.a, x)
        if isinstance(a, C):
            return C(_const(type(e)(a, e.c)))
        if isinstance(e, Add) and isinstance(a, Step):
            return simplify(Step(a.a, a.t, Add(a.below, e.c), Add(a.above, e.c)), x)
        if isinstance(e, Add):
            if isinstance(a, Add):
                a, cst = a.a, a.c + e.c
            else:
                cst = e.c
            return a if cst == 0 else Add(a, cst)
        if e.c == 1:
            return a
        return type(e)(a, e.c)
    if isinstance(e, (Min, Max)):
        args: list[E] = []
        for a in e.args:
            a = simplify(a, x)
            args += list(a.args) if type(a) is type(e) else [a]
        steps = [a for a in args if isinstance(a, Step)]
        if steps:  # hoist a step: min(a, (b if s < t else c)) = (min(a, b) if s < t else min(a, c))
            st = steps[0]
            rest = [a for a in args if a is not st]
            return simplify(Step(st.a, st.t, type(e)((*rest, st.below)), type(e)((*rest, st.above))), x)
        uniq = list(dict.fromkeys(args))
        vals = [ev(a, x) for a in uniq]
        keep = []
        for i, v in enumerate(vals):
            # drop a if another argument always decides instead (ties: keep the first)
            dominated = any((j != i) and bool(((vals[j] <= v) if isinstance(e, Min) else (vals[j] >= v)).all())
                            and (j < i or not bool((vals[j] == v).all())) for j in range(len(uniq)))
            if not dominated:
                keep.append(uniq[i])
        return keep[0] if len(keep) == 1 else type(e)(tuple(keep))
    if isinstance(e, Step):
        a = simplify(e.a, x)
        t = e.t
        while isinstance(a, Add):  # a + c < t  iff  a < t - c
            a, t = a.a, t - a.c
        av = ev(a, x)
        below, above = av < t, av >= t
        if bool(below.all()):
            return simplify(e.below, x)
        if bool(above.all()):
            return simplify(e.above, x)
        b, c = simplify(e.below, x[below]), simplify(e.above, x[above])
        return b if b == c else Step(a, t, b, c)
    raise TypeError(e)


def _subexprs(e: E):
    yield e
    for a in ((e.a,) if isinstance(e, (Add, Mul, Div)) else e.args if isinstance(e, (Min, Max))
              else (e.a, e.below, e.above) if isinstance(e, Step) else ()):
        yield from _subexprs(a)


def fits_int32(e: E, x: torch.Tensor) -> bool:
    """Every intermediate value at the positions x fits the kernels' int32 scalars."""
    return all(bool((ev(s, x).abs() <= INT32).all()) for s in _subexprs(e))


def _int_text(v, env, prec: int = 0) -> str:
    """An integer as printed: its size expression when it has one (sizes.text), else the literal."""
    return size_tags.text(v, env, 9 if prec > 0 else 0)


def _add_text(go, e, env) -> str:
    c = e.c
    if c >= 0:
        return f"{go(e.a, 1)} + {_int_text(c, env, 1)}"
    return f"{go(e.a, 1)} - {_int_text(-c, env, 1)}"


def to_text(e: E, var: str = "q", env: dict | None = None) -> str:
    """Readable math text (floor division as //); with `env`, size-tagged
    constants read as expressions of M, N (sizes.text)."""
    def go(e, prec):
        if isinstance(e, X):
            return var
        if isinstance(e, C):
            return _int_text(e.value, env, prec) if e.value >= 0 or prec == 0 else f"({_int_text(e.value, env)})"
        if isinstance(e, Add):
            s = _add_text(go, e, env)
            return f"({s})" if prec > 1 else s
        if isinstance(e, (Mul, Div)):
            s = f"{go(e.a, 2)} {'*' if isinstance(e, Mul) else '//'} {_int_text(e.c, env, 1)}"
            return f"({s})" if prec > 2 else s
        if isinstance(e, (Min, Max)):
            return ("min(" if isinstance(e, Min) else "max(") + ", ".join(go(a, 0) for a in e.args) + ")"
        if isinstance(e, Step):
            return f"({go(e.below, 0)} if {go(e.a, 0)} < {_int_text(e.t, env, 1)} else {go(e.above, 0)})"
        raise TypeError(e)
    return go(e, 0)


def to_triton(e: E, var: str, x: torch.Tensor, env: dict | None = None) -> str:
    """Triton scalar code for e at `var`, valid at the positions x: floor division
    of a numerator that may be negative is shifted to a non-negative one first
    (Triton's // truncates toward zero). With `env`, size-tagged constants print
    as expressions of the kernels' size arguments (sizes.text)."""
    def go(e, prec):
        if isinstance(e, X):
            return var
        if isinstance(e, C):
            return _int_text(e.value, env, prec) if e.value >= 0 or prec == 0 else f"({_int_text(e.value, env)})"
        if isinstance(e, Add):
            s = _add_text(go, e, env)
            return f"({s})" if prec > 1 else s
        if isinstance(e, Mul):
            s = f"{go(e.a, 2)} * {_int_text(e.c, env, 1)}"
            return f"({s})" if prec > 2 else s
        if isinstance(e, Div):
            low = int(ev(e.a, x).min()) if x.numel() else 0
            if low >= 0:
                s = f"{go(e.a, 2)} // {_int_text(e.c, env, 1)}"
            else:
                shift = -(-(-low) // e.c)  # whole periods that make the numerator >= 0
                s = f"({go(e.a, 1)} + {shift * e.c}) // {_int_text(e.c, env, 1)} - {shift}"
                return f"({s})" if prec > 1 else s
            return f"({s})" if prec > 2 else s
        if isinstance(e, (Min, Max)):
            fn = "tl.minimum" if isinstance(e, Min) else "tl.maximum"
            out = go(e.args[0], 0)
            for a in e.args[1:]:
                out = f"{fn}({out}, {go(a, 0)})"
            return out
        if isinstance(e, Step):
            return f"tl.where({go(e.a, 0)} < {_int_text(e.t, env, 1)}, {go(e.below, 0)}, {go(e.above, 0)})"
        raise TypeError(e)
    return go(e, 0)


# ----------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """Keys [lo(x), hi(x)) for x in [g0, g1) and the heads in the bit set `heads`."""

    lo: E
    hi: E
    g0: int
    g1: int
    heads: int = -1  # bit h set: head h (-1: every head)

    def text(self, var: str, domain: tuple[int, int], env: dict | None = None) -> str:
        s = f"[{to_text(self.lo, var, env)}, {to_text(self.hi, var, env)})"
        if (self.g0, self.g1) != domain:
            s += f" for {_int_text(self.g0, env)} <= {var} < {_int_text(self.g1, env)}"
        return s


def _points(g0: int, g1: int) -> torch.Tensor:
    return torch.arange(g0, g1, dtype=torch.int64)


def _runs(flags: torch.Tensor, start: int, end: int | None = None) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of True in flags (positions offset by start); a run that
    reaches the end of flags ends at `end` itself when given (start + len(flags):
    so a size-tagged end keeps its expression, sizes.py)."""
    if flags.numel() == 0:
        return []
    f = flags.to(torch.int8)
    d = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), f, torch.zeros(1, dtype=torch.int8)]))
    a = (d == 1).nonzero().flatten().tolist()
    b = (d == -1).nonzero().flatten().tolist()
    last = flags.numel()
    return [(start + i, end if end is not None and j == last else start + j) for i, j in zip(a, b)]


class Domain:
    """Where ranges live: positions [x0, x1), key length L."""

    def __init__(self, x0: int, x1: int, L: int):
        self.x0, self.x1, self.L = x0, x1, L

    def clip(self, r: Range) -> Range | None:
        g0, g1 = max(r.g0, self.x0), min(r.g1, self.x1)
        if g0 >= g1 or r.heads == 0:
            return None
        return Range(Max((r.lo, C(0))), Min((r.hi, C(self.L))), g0, g1, r.heads)

    def nonempty(self, r: Range) -> list[Range]:
        """r split into the runs of x where it is not empty, simplified there."""
        x = _points(r.g0, r.g1)
        out = []
        for a, b in _runs(ev(r.lo, x) < ev(r.hi, x), r.g0, r.g1):
            xs = _points(a, b)
            out.append(Range(simplify(r.lo, xs), simplify(r.hi, xs), a, b, r.heads))
        return out


def _restrict(r: Range, a: int, b: int) -> Range | None:
    return Range(r.lo, r.hi, max(r.g0, a), min(r.g1, b), r.heads) if max(r.g0, a) < min(r.g1, b) else None


def _outside(r: Range, a: int, b: int) -> list[Range]:
    """r on its guard minus [a, b)."""
    return [p for p in (_restrict(r, r.g0, a), _restrict(r, b, r.g1)) if p is not None]


def normalize(ranges: list[Range], dom: Domain, join: bool = True) -> list[Range]:
    """Clip, drop empty parts, merge touching ranges, coalesce equal neighbours,
    sort by first key; the ranges of one head (heads fields are kept as given)."""
    work = []
    for r in ranges:
        c = dom.clip(r)
        if c is not None:
            work += dom.nonempty(c)
    for _ in range(200):
        if len(work) > 4 * MAX_RANGES:
            raise NoClosedForm(f"more than {MAX_RANGES} key ranges per query")
        merged = _merge_once(work)
        if merged is None:
            break
        work = merged
    else:
        raise NoClosedForm("key ranges do not settle")
    work = [Range(simplify(r.lo, _points(r.g0, r.g1)), simplify(r.hi, _points(r.g0, r.g1)), r.g0, r.g1, r.heads)
            for r in _coalesce(work, join)]
    if len(work) > MAX_RANGES:
        raise NoClosedForm(f"{len(work)} key ranges per query (at most {MAX_RANGES})")
    return sorted(work, key=functools.cmp_to_key(_order))


def _order(A: Range, B: Range) -> int:
    """A before B when A's keys start no later wherever both apply (the kernels need
    ranges in order of their first tile); ranges that never overlap: by guard."""
    c0, c1 = max(A.g0, B.g0), min(A.g1, B.g1)
    if c0 >= c1:
        return -1 if A.g0 < B.g0 else 1
    d = ev(A.lo, _points(c0, c1)) - ev(B.lo, _points(c0, c1))
    if bool((d <= 0).all()) and not bool((d == 0).all()):
        return -1
    if bool((d >= 0).all()) and not bool((d == 0).all()):
        return 1
    return (A.g0 > B.g0) - (A.g0 < B.g0) or (A.g1 > B.g1) - (A.g1 < B.g1)


def _merge_once(work: list[Range]) -> list[Range] | None:
    for i in range(len(work)):
        for j in range(i + 1, len(work)):
            A, B = work[i], work[j]
            c0, c1 = max(A.g0, B.g0), min(A.g1, B.g1)
            if c0 >= c1:
                continue
            x = _points(c0, c1)
            touch = (ev(A.lo, x) <= ev(B.hi, x)) & (ev(B.lo, x) <= ev(A.hi, x))
            runs = _runs(touch, c0, c1)
            if not runs:
                continue
            a, b = runs[0]
            xs = _points(a, b)
            both = Range(simplify(Min((A.lo, B.lo)), xs), simplify(Max((A.hi, B.hi)), xs), a, b, A.heads)
            rest = [w for k, w in enumerate(work) if k not in (i, j)]
            return rest + _outside(A, a, b) + _outside(B, a, b) + [both]
    return None


def _coalesce(work: list[Range], join: bool) -> list[Range]:
    """Ranges with the same bounds on adjacent guards become one; with `join`, so
    do ranges on adjacent guards whose bounds stay monotone across the seam
    (joined by a step: `lo_A if x < b else lo_B`), the most continuous pair first."""
    work = sorted(work, key=lambda r: (repr(r.lo), repr(r.hi), r.g0))
    out: list[Range] = []
    for r in work:
        if out and out[-1].lo == r.lo and out[-1].hi == r.hi and out[-1].g1 == r.g0:
            out[-1] = Range(r.lo, r.hi, out[-1].g0, r.g1, r.heads)
        else:
            out.append(r)
    while join:
        best = None
        for i, A in enumerate(out):
            for j, B in enumerate(out):
                if A.g1 != B.g0:
                    continue
                at_a, at_b = torch.tensor([A.g1 - 1]), torch.tensor([B.g0])
                dlo = int(ev(B.lo, at_b)[0] - ev(A.lo, at_a)[0])
                dhi = int(ev(B.hi, at_b)[0] - ev(A.hi, at_a)[0])
                if dlo >= 0 and dhi >= 0 and (best is None or dlo + dhi < best[0]):
                    best = (dlo + dhi, i, j)
        if best is None:
            break
        _, i, j = best
        A, B = out[i], out[j]
        xs = _points(A.g0, B.g1)
        joined = Range(simplify(Step(X(), B.g0, A.lo, B.lo), xs), simplify(Step(X(), B.g0, A.hi, B.hi), xs),
                       A.g0, B.g1, A.heads)
        out = [r for k, r in enumerate(out) if k not in (i, j)] + [joined]
    return out


# ----------------------------------------------------------------------------- the pattern's ranges


class Derivation:
    """Mask IR -> ranges over absolute query positions (1-D, concrete sizes)."""

    def __init__(self, pattern: ir.PatternIR, M: int, N: int, H: int):
        if pattern.layout.axes or pattern.layout.text is not None:
            raise NoClosedForm("grid layouts (key sets are products over axes)")
        if pattern.inputs:
            raise NoClosedForm("run-time inputs (the plan is built per call)")
        self.pattern = pattern
        self.ev = Evaluator(pattern)
        self.view = top_view(pattern, M, N, H, None, {}, rows=(0, 0))

    def val(self, v, env) -> int:
        return size_tags.keep_expression(v, env, self.ev.val(v, env))

    def run(self) -> list[Range]:
        env = self.view.env
        return self.build(self.pattern.body, env, Domain(env[ir.N] - env[ir.M], env[ir.N], env[ir.N]))

    def build(self, node: ir.Mask, env: dict, dom: Domain) -> list[Range]:
        self.ev.check(node, View(q=self.view.q, k=self.view.k, env=env))
        parts = self.ev.keys(node, View(q=self.view.q, k=self.view.k, env=env))
        if parts is not None:
            try:
                out = self.key_ranges(parts, env, dom)
            except NoClosedForm as e:
                raise NoClosedForm(f"{type(node).__name__.rstrip('_').lower()} ({e})") from None
        else:
            m = getattr(self, "r_" + type(node).__name__.rstrip("_"), None)
            if m is None:
                raise NoClosedForm(f"{type(node).__name__.rstrip('_').lower()} (keys are not a few monotone ranges per query)")
            out = m(node, env, dom)
        pruned = []
        for r in out:
            c = dom.clip(r)
            if c is not None and dom.nonempty(c):
                pruned.append(r)
        if len(pruned) > 8 * MAX_RANGES:
            raise NoClosedForm(f"more than {8 * MAX_RANGES} key ranges while combining")
        return pruned

    def all(self, dom: Domain, lo: E, hi: E) -> list[Range]:
        return [Range(lo, hi, dom.x0, dom.x1)]

    # -- primitives: their definitions (attnc/semantics.py) as monotone ranges
    def key_ranges(self, parts: tuple[semantics.Keys, ...], env: dict, dom: Domain) -> list[Range]:
        out: list[Range] = []
        spans: list[tuple[int, int]] = []  # constant key intervals, merged into runs below
        for p in parts:
            step = 1 if p.step is None else _const(self.monotone(p.step, env))
            try:
                lo, hi = self.monotone(p.lo, env), self.monotone(p.hi, env)
            except NoClosedForm:
                if step == 1:
                    raise
                lo = hi = None
            constant = isinstance(lo, C) and isinstance(hi, C)
            if step != 1 and not constant:
                raise NoClosedForm("keys with a step: dilated or strided, not an interval")
            if p.when is None and constant:
                a, b = max(lo.value, 0), min(hi.value, dom.L)
                if step != 1 and (b - a) // step > MAX_RANGES:
                    raise NoClosedForm(f"a token set with more than {MAX_RANGES} separate runs")
                spans += [(a, b)] if step == 1 else [(x, x + 1) for x in range(a + (lo.value - a) % step, b, step)]
                continue
            for g0, g1 in self.guard(p.when, env, dom):
                out.append(Range(lo, hi, g0, g1))
        runs: list[list[int]] = []
        for a, b in sorted(s for s in spans if s[0] < s[1]):  # (ends keep their size tags)
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], b)
            else:
                runs.append([a, b])
        if len(runs) > MAX_RANGES:
            raise NoClosedForm(f"a token set with {len(runs)} separate runs")
        return out + [Range(C(a), C(b), dom.x0, dom.x1) for a, b in runs]

    def guard(self, when: ir.PExpr | None, env: dict, dom: Domain) -> list[tuple[int, int]]:
        """The runs of query positions [g0, g1) where a progression's condition holds."""
        match when:
            case None:
                return [(dom.x0, dom.x1)]
            case ir.PCmp(ops=("<",), operands=(ir.PVar(name="q", axis=None), bound)):
                return [(dom.x0, _const(self.monotone(bound, env)))]
            case ir.PIn(item=ir.PVar(name="q", axis=None), collection=tokens):
                return self._runs(tokens, env, dom.x0, dom.x1)
        raise NoClosedForm("a condition on the query that is not a range or a set")

    def monotone(self, e: ir.PExpr, env: dict) -> E:
        """A term of the definitions as a non-decreasing expression of x (NoClosedForm otherwise)."""
        match e:
            case ir.PVar(name="q", axis=None):
                return X()
            case ir.PConst(value=v):
                return C(self.val(v, env))
            case ir.PCall(func="min" | "max" as f, args=args):
                xs = tuple(self.monotone(a, env) for a in args)
                if all(isinstance(x, C) for x in xs):
                    return C(min(x.value for x in xs) if f == "min" else max(x.value for x in xs))
                return Min(xs) if f == "min" else Max(xs)
            case ir.PBin(op=op, left=a, right=b):
                x, y = self.monotone(a, env), self.monotone(b, env)
                if isinstance(x, C) and isinstance(y, C):
                    if op in ("//", "%") and y.value == 0:
                        raise NoClosedForm("a division by zero")
                    u, v = x.value, y.value
                    return C({"+": lambda: u + v, "-": lambda: u - v, "*": lambda: u * v, "//": lambda: u // v,
                              "%": lambda: u % v, "**": lambda: u ** v}[op]())
                if op == "+" and isinstance(x, C):
                    x, y = y, x
                if op in ("+", "-") and isinstance(y, C):
                    return Add(x, y.value if op == "+" else -y.value)
                if op == "*" and isinstance(x, C):
                    x, y = y, x
                if op in ("*", "//", "%") and isinstance(y, C) and y.value == 1:  # (a parameter that is 1 here)
                    return C(0) if op == "%" else x
                if op in ("*", "//") and isinstance(y, C) and y.value > 0:
                    return Mul(x, y.value) if op == "*" else Div(x, y.value)
        raise NoClosedForm("keys whose ends are not non-decreasing in the query (a remainder, or a decreasing term)")

    def _runs(self, s: ir.SetVal, env, lo: int, hi: int) -> list[tuple[int, int]]:
        """The set's integers inside [lo, hi) as runs [a, b)."""
        flags = torch.zeros(max(hi - lo, 0), dtype=torch.bool)
        if isinstance(s, ir.SetRange):
            a, b, st = (self.val(v, env) for v in (s.start, s.stop, s.step))
            a, b = max(a, lo), min(b, hi)  # (a range step keeps its phase: start from the set's own start)
            first = self.val(s.start, env)
            if a < b:
                a += (first - a) % st
                flags[a - lo:b - lo:st] = True
        else:
            inside = [i - lo for i in {self.val(i, env) for i in s.items} if lo <= i < hi]
            if inside:
                flags[torch.tensor(inside)] = True
        runs = _runs(flags, lo)
        if len(runs) > MAX_RANGES:
            raise NoClosedForm(f"a token set with {len(runs)} separate runs")
        return runs

    def r_Union(self, n, env, dom):
        return [r for p in n.parts for r in self.build(p, env, dom)]

    def r_Inter(self, n, env, dom):
        out = self.build(n.parts[0], env, dom)
        for p in n.parts[1:]:
            out = self.inter(out, self.build(p, env, dom), dom)
        return out

    def inter(self, A: list[Range], B: list[Range], dom: Domain) -> list[Range]:
        out = []
        for a in A:
            for b in B:
                r = Range(Max((a.lo, b.lo)), Min((a.hi, b.hi)), max(a.g0, b.g0), min(a.g1, b.g1), a.heads & b.heads)
                c = dom.clip(r)
                if c is not None and dom.nonempty(c):
                    out.append(r)
        if len(out) > 8 * MAX_RANGES:
            raise NoClosedForm(f"more than {8 * MAX_RANGES} key ranges while intersecting")
        return out

    def complement(self, A: list[Range], dom: Domain) -> list[Range]:
        out = self.all(dom, C(0), C(dom.L))
        for a in A:
            gaps = [Range(C(0), a.lo, a.g0, a.g1, a.heads), Range(a.hi, C(dom.L), a.g0, a.g1, a.heads),
                    Range(C(0), C(dom.L), dom.x0, a.g0, a.heads), Range(C(0), C(dom.L), a.g1, dom.x1, a.heads)]
            if a.heads != -1:
                gaps.append(Range(C(0), C(dom.L), dom.x0, dom.x1, ~a.heads))
            out = self.inter(out, gaps, dom)
        return out

    def r_Not(self, n, env, dom):
        return self.complement(self.build(n.operand, env, dom), dom)

    def r_Diff(self, n, env, dom):
        return self.inter(self.build(n.left, env, dom), self.complement(self.build(n.right, env, dom), dom), dom)

    def r_Heads(self, n, env, dom):
        out = []
        for sel, arm in self.ev.head_arms(n, View(q=self.view.q, k=self.view.k, env=env)):
            bits = sum(1 << int(h) for h in sel.nonzero().flatten().tolist())
            out += [Range(r.lo, r.hi, r.g0, r.g1, r.heads & bits) for r in self.build(arm.body, env, dom)]
        return out

    def r_Blockwise(self, n, env, dom):
        b = self.val(n.b, env)
        nb = -(-dom.L // b)
        inner_env = {**env, ir.M: -(-env[ir.M] // b), ir.N: nb}
        inner = self.build(n.operand, inner_env, Domain(dom.x0 // b, (dom.x1 - 1) // b + 1, nb))
        out = []
        for r in inner:
            lo = Mul(subst(Max((r.lo, C(0))), Div(X(), b)), b)
            hi = Min((Mul(subst(Min((r.hi, C(nb))), Div(X(), b)), b), C(dom.L)))
            out.append(Range(lo, hi, r.g0 * b, r.g1 * b, r.heads))
        return out


# ----------------------------------------------------------------------------- per direction


@dataclass(frozen=True)
class Ranges:
    """The ranges of one direction, grouped by heads with the same list.

    rows direction: position x = absolute query (row + N - M), keys in [0, N);
    cols direction: x = key, query *rows* in [0, M)."""

    direction: str  # "rows" | "cols"
    groups: tuple  # ((head bits or -1 for all, (Range, ...)), ...)
    domain: tuple[int, int]
    length: int  # key length (rows) / query rows (cols)

    @property
    def count(self) -> int:
        return sum(len(rs) for _, rs in self.groups)

    def text(self, env: dict | None = None) -> str:
        var = "q" if self.direction == "rows" else "k"
        parts = []
        for bits, rs in self.groups:
            body = " | ".join(r.text(var, self.domain, env) for r in rs) or "none"
            parts.append(body if bits == -1 else f"heads {_head_text(bits)}: {body}")
        return "; ".join(parts)


def _head_runs(bits: int, H: int) -> list[tuple[int, int]]:
    flags = torch.tensor([(bits >> h) & 1 for h in range(H)], dtype=torch.bool)
    return _runs(flags, 0)


def _head_text(bits: int, H: int | None = None) -> str:
    hs = [h for h in range(bits.bit_length()) if (bits >> h) & 1]
    return "{" + ", ".join(map(str, hs)) + "}"


def _group(per_head: list[tuple[Range, ...]]) -> tuple:
    if all(p == per_head[0] for p in per_head):
        return ((-1, per_head[0]),)
    groups: dict = {}
    for h, rs in enumerate(per_head):
        groups[rs] = groups.get(rs, 0) | (1 << h)
    return tuple((bits, rs) for rs, bits in groups.items())


def row_ranges(pattern: ir.PatternIR, M: int, N: int, H: int, join: bool = True) -> Ranges:
    """The key ranges of every query (raises NoClosedForm)."""
    raw = Derivation(pattern, M, N, H).run()
    dom = Domain(N - M, N, N)
    per_head = []
    done: dict = {}  # heads with the same raw ranges normalise once
    for h in range(H):
        mine = tuple(i for i, r in enumerate(raw) if (r.heads >> h) & 1)
        if mine not in done:
            done[mine] = tuple(normalize([Range(raw[i].lo, raw[i].hi, raw[i].g0, raw[i].g1, -1) for i in mine],
                                         dom, join))
        per_head.append(done[mine])
    return Ranges("rows", _group(per_head), (N - M, N), N)


def col_ranges(rows: Ranges, M: int, N: int, join: bool = True) -> Ranges:
    """The query-row ranges of every key, inverted from the rows' ranges."""
    off = N - M
    dom = Domain(0, N, M)
    groups = []
    for bits, rs in rows.groups:
        inv = []
        for r in rs:
            first = Max((upper(r.hi, X()), C(r.g0)))  # first query with hi(q) > k
            stop = Min((upper(r.lo, X()), C(r.g1)))  # first query with lo(q) > k
            inv.append(Range(Add(first, -off), Add(stop, -off), 0, N))
        groups.append((bits, tuple(normalize(inv, dom, join))))
    return Ranges("cols", tuple(groups), (0, N), M)


# ----------------------------------------------------------------------------- the kernels' arithmetic, on the host


def range_tiles(r: Range, a0: torch.Tensor, a1: torch.Tensor, length: int, bn: int, ragged_partial: bool = True):
    """What a kernel computes for range r and tiles of positions [a0, a1):
    (first, full_first, full_end, end, full) tile indices, int64 tensors. With
    `ragged_partial` (key tiles: the forward and dQ) a ragged last tile is never
    full ([Note: the two loops] in codegen/kernels.py)."""
    s, e = a0.clamp(min=r.g0), a1.clamp(max=r.g1)
    active = s < e
    xf, xl = s.clamp(max=r.g1 - 1), (e - 1).clamp(min=r.g0)
    lo_f, lo_l, hi_f, hi_l = ev(r.lo, xf), ev(r.lo, xl), ev(r.hi, xf), ev(r.hi, xl)
    first = torch.where(active, lo_f // bn, 0)  # an inactive range visits nothing and moves nothing
    end = torch.where(active, -(-hi_l // bn), 0)
    full_first = -(-lo_l // bn)
    if ragged_partial:
        full_end = hi_f.clamp(max=length) // bn
    else:
        full_end = torch.where(hi_f >= length, -(-length // bn), hi_f // bn)
    full = active & (s == a0) & (e == a1)
    return first, full_first, full_end, end, full


def visited(rs: Ranges, H: int, tiles: tuple[int, int]) -> tuple[list, tuple[int, int]]:
    """The tiles the kernel visits, without a dense tile map: per head, sorted
    int64 keys `row * col_tiles + col` and their int8 kinds (1 masked, 2
    unmasked), and (row tiles, col tiles). Tiles outside the column range count
    as visited (keys past the end): a kernel must never go there. Raises
    AssertionError on a tile visited twice. Cost O(row tiles * ranges + visits)."""
    bm, bn = tiles  # (tile of x, tile of the ranges' values)
    x0, x1 = rs.domain
    n = x1 - x0
    nr, nc = -(-n // bm), -(-rs.length // bn)
    t = torch.arange(nr, dtype=torch.int64)
    a0, a1 = t * bm + x0, torch.clamp((t + 1) * bm, max=n) + x0
    out = []
    seen: dict = {}  # heads in the same groups visit the same tiles: replay each group set once
    for h in range(H):
        groups = tuple((bits >> h) & 1 for bits, _ in rs.groups)
        if groups in seen:
            out.append(seen[groups])
            continue
        done = torch.zeros(nr, dtype=torch.int64)
        segs = []  # (first tile, end tile, kind) per row
        for bits, ranges in rs.groups:
            if not (bits >> h) & 1:
                continue
            for r in ranges:
                first, f_first, f_end, end, full = range_tiles(r, a0, a1, rs.length, bn, rs.direction == "rows")
                start = torch.maximum(first, done)
                stop = torch.maximum(end, start)
                fs = torch.where(full, torch.minimum(torch.maximum(f_first, start), stop), stop)
                fe = torch.where(full, torch.minimum(torch.maximum(f_end, fs), stop), stop)
                segs += [(start, fs, 1), (fs, fe, 2), (fe, stop, 1)]
                done = stop
        keys, kinds = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int8)]
        for lo, hi, kind in segs:
            cnt = (hi - lo).clamp(min=0)
            row = torch.repeat_interleave(t, cnt)
            col = torch.arange(len(row), dtype=torch.int64) - (torch.cumsum(cnt, 0) - cnt)[row] + lo[row]
            col = torch.where((col < 0) | (col >= nc), nc, col)  # outside: a key no plan tile has
            keys.append(row * (nc + 1) + col)
            kinds.append(torch.full((len(row),), kind, dtype=torch.int8))
        k, kd = torch.cat(keys), torch.cat(kinds)
        k, order = torch.sort(k, stable=True)
        if bool((k[1:] == k[:-1]).any()):
            raise AssertionError("a tile visited twice")
        seen[groups] = (k, kd[order])
        out.append(seen[groups])
    return out, (nr, nc)


def simulate(rs: Ranges, H: int, tiles: tuple[int, int]) -> torch.Tensor:
    """int8 [H, row tiles, col tiles] of the tiles the kernel visits: 0 not at
    all, 1 masked, 2 unmasked (small sizes: tests and pictures); raises
    AssertionError on a tile visited twice or outside the columns."""
    per_head, (nr, nc) = visited(rs, H, tiles)
    out = torch.zeros(H, nr * (nc + 1), dtype=torch.int8)
    for h, (k, kd) in enumerate(per_head):
        if bool((k % (nc + 1) == nc).any()):
            raise AssertionError("a tile outside the columns visited")
        out[h, k] = kd
    return out.view(H, nr, nc + 1)[..., :nc]


def _plan_keys(full, partial, h: int, nc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head h's tiles of a plan direction (compressed TileLists) as sorted keys
    `row * (nc + 1) + col` and kinds (1 partial, 2 full)."""
    hx = min(h, full.counts.shape[0] - 1)
    rows = full.counts.shape[1]
    keys, kinds = [], []
    for lst, kind in ((partial, 1), (full, 2)):
        fr = lst.flat_rows()
        mine = fr // rows == hx
        keys.append((fr[mine] % rows) * (nc + 1) + lst.cols[mine].long())
        kinds.append(torch.full((int(mine.sum()),), kind, dtype=torch.int8))
    k, order = torch.sort(torch.cat(keys))
    return k, torch.cat(kinds)[order]


# ----------------------------------------------------------------------------- loop bounds for a kernel module


@dataclass(frozen=True)
class LoopBounds:
    """How the kernels bound their tile loops: `rows` (forward and dQ) and `cols`
    (dK/dV) are `Ranges` (closed form) or None with the reason in `rows_reason` /
    `cols_reason` (the kernels then read the plan's tile lists)."""

    rows: Ranges | None = None
    cols: Ranges | None = None
    rows_reason: str = ""
    cols_reason: str = ""
    heads: int = 1

    @property
    def closed(self) -> tuple[bool, bool]:
        return self.rows is not None, self.cols is not None

    def summary(self, per_size: bool = True) -> str:
        """One line for headers and metadata; `per_size=False` leaves out what only holds at
        these sizes (the tile counts of a check that failed), for length-generic headers."""
        rows_why, cols_why = (self.rows_reason, self.cols_reason) if per_size else \
            (_without_counts(self.rows_reason), _without_counts(self.cols_reason))
        if self.rows is None and self.cols is None:
            return f"tile lists ({rows_why})" if rows_why == cols_why else \
                f"tile lists (forward and dQ: {rows_why}; dK/dV: {cols_why})"
        parts = []
        for name, rs, why, unit in (("forward and dQ", self.rows, rows_why, "key"),
                                    ("dK/dV", self.cols, cols_why, "query")):
            if rs is None:
                parts.append(f"{name}: tile lists ({why})")
            else:
                n = max(len(r) for _, r in rs.groups)
                parts.append(f"{name}: closed form ({n} {unit} range{'s' if n != 1 else ''}"
                             f"{', by head' if len(rs.groups) > 1 else ''})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"rows": "closed form" if self.rows is not None else "tile lists",
                "rows_ranges": self.rows.text() if self.rows is not None else None,
                "rows_reason": self.rows_reason or None,
                "cols": "closed form" if self.cols is not None else "tile lists",
                "cols_ranges": self.cols.text() if self.cols is not None else None,
                "cols_reason": self.cols_reason or None}


#: the reason of a closed form that does not reproduce the plan (then the counts, per size)
DIFFERS = "the closed form differs from the plan at these sizes"


def _without_counts(reason: str) -> str:
    return DIFFERS if reason.startswith(DIFFERS) else reason


def _check(rs: Ranges, H: int, tiles: tuple[int, int], full, partial) -> str:
    """'' when the ranges reproduce a plan direction's tile classes (its
    compressed `full` / `partial` TileLists, with a ragged last key tile partial
    as the kernels have it: `TileLists.build`), else why not; no dense tile map."""
    if rs.direction == "rows":
        full, partial = full.ragged_partial(partial, rs.length, tiles[1])
    for _, ranges in rs.groups:
        for r in ranges:
            xs = _points(r.g0, r.g1)
            if not (fits_int32(r.lo, xs) and fits_int32(r.hi, xs)):
                return "bounds beyond int32"
    try:
        per_head, (_, nc) = visited(rs, H, tiles)
    except AssertionError as exc:
        return str(exc)
    missed = extra = masked = unmasked = 0
    compared = set()  # (replay, plan head) pairs: heads that share both are compared once
    for h, (got_k, got_kind) in enumerate(per_head):
        pair = (id(got_k), min(h, full.counts.shape[0] - 1))
        if pair in compared:
            continue
        compared.add(pair)
        want_k, want_kind = _plan_keys(full, partial, h, nc)
        if torch.equal(got_k, want_k) and torch.equal(got_kind, want_kind):
            continue
        if len(want_k) == 0:  # the plan has no tile for this head
            extra += len(got_k)
            continue
        pos = torch.searchsorted(want_k, got_k).clamp(max=len(want_k) - 1)
        hit = want_k[pos] == got_k
        extra += int((~hit).sum())
        masked += int((hit & (got_kind == 1) & (want_kind[pos] == 2)).sum())
        unmasked += int((hit & (got_kind == 2) & (want_kind[pos] == 1)).sum())
        missed += len(want_k) - int(hit.sum())
    if missed == extra == masked == unmasked == 0:
        return ""
    return (f"{DIFFERS} ({missed} tiles missed, {extra} empty tiles "
            f"visited, {masked} full tiles masked, {unmasked} partial tiles unmasked)")


def loop_bounds(pattern: ir.PatternIR, M: int, N: int, H: int, block: tuple[int, int], plan=None) -> LoopBounds:
    """The loop bounds of the kernels for a pattern at these sizes and tiles.

    Without a plan (patterns with run-time inputs) or when the derivation or
    its check against the plan fails, a direction falls back to tile lists.
    Constants derived from M and N keep their expressions ([Note: one text, many
    sizes] in sizes.py)."""
    M, N, _ = size_tags.tag(M, N)
    if plan is None:
        why = "run-time inputs: the plan is built per call" if pattern.inputs else "no plan"
        return LoopBounds(rows_reason=why, cols_reason=why, heads=H)
    if plan.tile_shape is not None:
        return LoopBounds(rows_reason="N-D tiles", cols_reason="N-D tiles", heads=H)
    bm, bn = block
    rows = cols = None
    why_rows = why_cols = ""
    for join in (True, False):  # joined ranges are fewer; unjoined ones are sometimes exact where joined are not
        try:
            r = row_ranges(pattern, M, N, H, join)
        except NoClosedForm as exc:
            return LoopBounds(rows_reason=str(exc), cols_reason=str(exc), heads=H)
        if rows is None:
            why_rows = _check(r, H, (bm, bn), plan.full, plan.partial)
            rows = None if why_rows else r
        if cols is None:
            try:
                c = col_ranges(r, M, N, join)
                why_cols = _check(c, H, (bn, bm), plan.full_t, plan.partial_t)
                cols = None if why_cols else c
            except NoClosedForm as exc:
                why_cols = str(exc)
        if rows is not None and cols is not None:
            break
    return LoopBounds(rows=rows, cols=cols, rows_reason="" if rows else why_rows,
                      cols_reason="" if cols else why_cols, heads=H)
