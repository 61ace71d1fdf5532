"""Monotone expressions of one integer variable: the ends of loop-bound ranges.

input:  nothing but its own nodes: `Position` (the variable: an absolute query position,
        or a key index in the transposed direction), `Const`, `Add`, `Mul`, `Div` (floor),
        `Min`, `Max`, `Step`, all non-decreasing in the variable (`MonoExpr`).
output: their values over tensors of positions (`ev`), substitution (`subst`), inversion
        (`upper`: the first position where an expression exceeds a bound), simplification
        at given positions (`simplify`), the int32 check (`fits_int32`), readable text
        (`to_text`) and Triton code (`to_triton`).
does not: derive ranges from patterns (range_derivation.py) or normalise them (ranges.py);
        see [Note: monotone ranges] in bounds.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import sizes as size_tags

#: stand-in for +-infinity in inverted bounds (int32-safe)
BIG = 1 << 30
INT32 = (1 << 31) - 1


# ----------------------------------------------------------------------------- monotone expressions of one variable


@dataclass(frozen=True)
class MonoExpr:
    """A non-decreasing integer expression of one variable, the position x."""


@dataclass(frozen=True)
class Position(MonoExpr):
    """The variable (absolute query position, or key index when transposed)."""


class _Tagged:
    """Nodes holding integers: size-tagged integers (sizes.Sym) with different
    expressions make different nodes even when their values are equal here."""

    def __post_init__(self):
        object.__setattr__(self, "tag", size_tags.tag_of(*(getattr(self, f) for f in self._ints)))


@dataclass(frozen=True)
class Const(_Tagged, MonoExpr):
    """An integer that does not depend on the position."""

    value: int
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("value",)


@dataclass(frozen=True)
class Add(_Tagged, MonoExpr):
    a: MonoExpr
    c: int
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("c",)


@dataclass(frozen=True)
class Mul(_Tagged, MonoExpr):
    a: MonoExpr
    c: int  # > 0
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("c",)


@dataclass(frozen=True)
class Div(_Tagged, MonoExpr):
    """floor(a / c), c > 0."""

    a: MonoExpr
    c: int
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("c",)


@dataclass(frozen=True)
class Min(MonoExpr):
    args: tuple


@dataclass(frozen=True)
class Max(MonoExpr):
    args: tuple


@dataclass(frozen=True)
class Step(_Tagged, MonoExpr):
    """`below` where a < t, else `above` (below <= above: monotone)."""

    a: MonoExpr
    t: int
    below: MonoExpr
    above: MonoExpr
    tag: object = field(default=None, repr=False, compare=True)
    _ints = ("t",)


def ev(e: MonoExpr, x: torch.Tensor) -> torch.Tensor:
    """Value of e at the int64 positions x (same shape)."""
    if isinstance(e, Position):
        return x
    if isinstance(e, Const):
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


def subst(e: MonoExpr, f: MonoExpr) -> MonoExpr:
    """e with the variable replaced by f."""
    if isinstance(e, Position):
        return f
    if isinstance(e, Const):
        return e
    if isinstance(e, (Add, Mul, Div)):
        return type(e)(subst(e.a, f), e.c)
    if isinstance(e, (Min, Max)):
        return type(e)(tuple(subst(a, f) for a in e.args))
    if isinstance(e, Step):
        return Step(subst(e.a, f), e.t, subst(e.below, f), subst(e.above, f))
    raise TypeError(e)


def const_value(e: MonoExpr) -> int | None:
    """The value of an expression without the variable, else None."""
    if isinstance(e, Position):
        return None
    if isinstance(e, Const):
        return e.value
    if isinstance(e, (Add, Mul, Div)):
        a = const_value(e.a)
        if a is None:
            return None
        return a + e.c if isinstance(e, Add) else a * e.c if isinstance(e, Mul) else a // e.c
    if isinstance(e, (Min, Max)):
        vs = [const_value(a) for a in e.args]
        return None if None in vs else (min(vs) if isinstance(e, Min) else max(vs))
    if isinstance(e, Step):
        a = const_value(e.a)
        if a is None:
            return None
        return const_value(e.below if a < e.t else e.above)
    raise TypeError(e)


def upper(e: MonoExpr, k: MonoExpr) -> MonoExpr:
    """The first x with e(x) > k (e non-decreasing), as an expression of k's variable:
    {x : e(x) <= k} is (-inf, upper(e, k)); +-BIG stand for unbounded."""
    if isinstance(e, Position):
        return Add(k, 1)
    if isinstance(e, Const):
        return Step(k, e.value, Const(-BIG), Const(BIG))
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
        u = const_value(upper(e.a, Const(e.t - 1)))  # the switch: first x with a(x) >= t
        ua = upper(e.above, k)
        return Step(ua, u + 1, Min((Const(u), upper(e.below, k))), ua)
    raise TypeError(e)


def simplify(e: MonoExpr, x: torch.Tensor) -> MonoExpr:
    """An expression equal to e at the positions x: constants folded, Min / Max
    arguments that never decide dropped, steps that never switch resolved."""
    if isinstance(e, (Position, Const)):
        return e
    c = const_value(e)
    if c is not None:
        return Const(c)
    if isinstance(e, (Add, Mul, Div)):
        a = simplify(e.a, x)
        if isinstance(a, Const):
            return Const(const_value(type(e)(a, e.c)))
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
        args: list[MonoExpr] = []
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


def _subexprs(e: MonoExpr):
    yield e
    for a in ((e.a,) if isinstance(e, (Add, Mul, Div)) else e.args if isinstance(e, (Min, Max))
              else (e.a, e.below, e.above) if isinstance(e, Step) else ()):
        yield from _subexprs(a)


def fits_int32(e: MonoExpr, x: torch.Tensor) -> bool:
    """Every intermediate value at the positions x fits the kernels' int32 scalars."""
    return all(bool((ev(s, x).abs() <= INT32).all()) for s in _subexprs(e))


def int_text(v, env, prec: int = 0) -> str:
    """An integer as printed: its size expression when it has one (sizes.text), else the literal."""
    return size_tags.text(v, env, 9 if prec > 0 else 0)


def _add_text(go, e, env) -> str:
    c = e.c
    if c >= 0:
        return f"{go(e.a, 1)} + {int_text(c, env, 1)}"
    return f"{go(e.a, 1)} - {int_text(-c, env, 1)}"


def to_text(e: MonoExpr, var: str = "q", env: dict | None = None) -> str:
    """Readable math text (floor division as //); with `env`, size-tagged
    constants read as expressions of M, N (sizes.text)."""
    def go(e, prec):
        if isinstance(e, Position):
            return var
        if isinstance(e, Const):
            return int_text(e.value, env, prec) if e.value >= 0 or prec == 0 else f"({int_text(e.value, env)})"
        if isinstance(e, Add):
            s = _add_text(go, e, env)
            return f"({s})" if prec > 1 else s
        if isinstance(e, (Mul, Div)):
            s = f"{go(e.a, 2)} {'*' if isinstance(e, Mul) else '//'} {int_text(e.c, env, 1)}"
            return f"({s})" if prec > 2 else s
        if isinstance(e, (Min, Max)):
            return ("min(" if isinstance(e, Min) else "max(") + ", ".join(go(a, 0) for a in e.args) + ")"
        if isinstance(e, Step):
            return f"({go(e.below, 0)} if {go(e.a, 0)} < {int_text(e.t, env, 1)} else {go(e.above, 0)})"
        raise TypeError(e)
    return go(e, 0)


def to_triton(e: MonoExpr, var: str, x: torch.Tensor, env: dict | None = None) -> str:
    """Triton scalar code for e at `var`, valid at the positions x: floor division
    of a numerator that may be negative is shifted to a non-negative one first
    (Triton's // truncates toward zero). With `env`, size-tagged constants print
    as expressions of the kernels' size arguments (sizes.text)."""
    def go(e, prec):
        if isinstance(e, Position):
            return var
        if isinstance(e, Const):
            return int_text(e.value, env, prec) if e.value >= 0 or prec == 0 else f"({int_text(e.value, env)})"
        if isinstance(e, Add):
            s = _add_text(go, e, env)
            return f"({s})" if prec > 1 else s
        if isinstance(e, Mul):
            s = f"{go(e.a, 2)} * {int_text(e.c, env, 1)}"
            return f"({s})" if prec > 2 else s
        if isinstance(e, Div):
            low = int(ev(e.a, x).min()) if x.numel() else 0
            if low >= 0:
                s = f"{go(e.a, 2)} // {int_text(e.c, env, 1)}"
            else:
                shift = -(-(-low) // e.c)  # whole periods that make the numerator >= 0
                s = f"({go(e.a, 1)} + {shift * e.c}) // {int_text(e.c, env, 1)} - {shift}"
                return f"({s})" if prec > 1 else s
            return f"({s})" if prec > 2 else s
        if isinstance(e, (Min, Max)):
            fn = "tl.minimum" if isinstance(e, Min) else "tl.maximum"
            out = go(e.args[0], 0)
            for a in e.args[1:]:
                out = f"{fn}({out}, {go(a, 0)})"
            return out
        if isinstance(e, Step):
            return f"tl.where({go(e.a, 0)} < {int_text(e.t, env, 1)}, {go(e.below, 0)}, {go(e.above, 0)})"
        raise TypeError(e)
    return go(e, 0)


def order_key(e: MonoExpr) -> str:
    """A canonical text of `e` that orders expressions deterministically (ranges.py sorts
    ranges by it before joining them). It spells every node as the dataclass repr did
    before the classes were renamed (`X()` for `Position()`, `C(value=..)` for `Const`), so
    ranges are joined in the same order, and kernels print the same text, as before."""
    if isinstance(e, Position):
        return "X()"
    if isinstance(e, Const):
        return f"C(value={e.value!r})"
    if isinstance(e, (Add, Mul, Div)):
        return f"{type(e).__name__}(a={order_key(e.a)}, c={e.c!r})"
    if isinstance(e, (Min, Max)):
        args = ", ".join(order_key(a) for a in e.args) + ("," if len(e.args) == 1 else "")
        return f"{type(e).__name__}(args=({args}))"
    if isinstance(e, Step):
        return f"Step(a={order_key(e.a)}, t={e.t!r}, below={order_key(e.below)}, above={order_key(e.above)})"
    raise TypeError(e)
