"""Key ranges: [lo(x), hi(x)) over a guard of positions and a set of heads, normalised.

input:  ranges whose ends are monotone expressions (monotone.py), as the derivation
        (range_derivation.py) produces them, and the domain of positions they live in.
output: `normalize`: a short sorted list per head (clipped, empty parts dropped, touching
        ranges merged, equal neighbours coalesced); `Ranges`: one direction's lists,
        grouped by heads with the same list ([Note: monotone ranges] in bounds.py).
does not: derive ranges from patterns (range_derivation.py) or check them against the
        plan (bounds.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .monotone import Const, Max, Min, MonoExpr, Position, Step, ev, int_text, order_key, simplify, to_text

#: most ranges per head after normalisation (beyond: tile lists)
MAX_RANGES = 8


class NoClosedForm(Exception):
    """The pattern has no closed-form loop bounds here (the message says why)."""


# ----------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """Keys [lo(x), hi(x)) for x in [g0, g1) and the heads in the bit set `heads`."""

    lo: MonoExpr
    hi: MonoExpr
    g0: int
    g1: int
    heads: int = -1  # bit h set: head h (-1: every head)

    def text(self, var: str, domain: tuple[int, int], env: dict | None = None) -> str:
        s = f"[{to_text(self.lo, var, env)}, {to_text(self.hi, var, env)})"
        if (self.g0, self.g1) != domain:
            s += f" for {int_text(self.g0, env)} <= {var} < {int_text(self.g1, env)}"
        return s


def points(g0: int, g1: int) -> torch.Tensor:
    """The positions g0 .. g1 - 1 (int64)."""
    return torch.arange(g0, g1, dtype=torch.int64)


def runs_of(flags: torch.Tensor, start: int, end: int | None = None) -> list[tuple[int, int]]:
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
        return Range(Max((r.lo, Const(0))), Min((r.hi, Const(self.L))), g0, g1, r.heads)

    def nonempty(self, r: Range) -> list[Range]:
        """r split into the runs of x where it is not empty, simplified there."""
        x = points(r.g0, r.g1)
        out = []
        for a, b in runs_of(ev(r.lo, x) < ev(r.hi, x), r.g0, r.g1):
            xs = points(a, b)
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
    work = [Range(simplify(r.lo, points(r.g0, r.g1)), simplify(r.hi, points(r.g0, r.g1)), r.g0, r.g1, r.heads)
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
    d = ev(A.lo, points(c0, c1)) - ev(B.lo, points(c0, c1))
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
            x = points(c0, c1)
            touch = (ev(A.lo, x) <= ev(B.hi, x)) & (ev(B.lo, x) <= ev(A.hi, x))
            runs = runs_of(touch, c0, c1)
            if not runs:
                continue
            a, b = runs[0]
            xs = points(a, b)
            both = Range(simplify(Min((A.lo, B.lo)), xs), simplify(Max((A.hi, B.hi)), xs), a, b, A.heads)
            rest = [w for k, w in enumerate(work) if k not in (i, j)]
            return rest + _outside(A, a, b) + _outside(B, a, b) + [both]
    return None


def _coalesce(work: list[Range], join: bool) -> list[Range]:
    """Ranges with the same bounds on adjacent guards become one; with `join`, so
    do ranges on adjacent guards whose bounds stay monotone across the seam
    (joined by a step: `lo_A if x < b else lo_B`), the most continuous pair first."""
    work = sorted(work, key=lambda r: (order_key(r.lo), order_key(r.hi), r.g0))
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
        xs = points(A.g0, B.g1)
        joined = Range(simplify(Step(Position(), B.g0, A.lo, B.lo), xs), simplify(Step(Position(), B.g0, A.hi, B.hi), xs),
                       A.g0, B.g1, A.heads)
        out = [r for k, r in enumerate(out) if k not in (i, j)] + [joined]
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


def head_runs(bits: int, H: int) -> list[tuple[int, int]]:
    """The heads of the bit set `bits` among H heads, as runs [a, b)."""
    flags = torch.tensor([(bits >> h) & 1 for h in range(H)], dtype=torch.bool)
    return runs_of(flags, 0)


def _head_text(bits: int, H: int | None = None) -> str:
    hs = [h for h in range(bits.bit_length()) if (bits >> h) & 1]
    return "{" + ", ".join(map(str, hs)) + "}"


def group_heads(per_head: list[tuple[Range, ...]]) -> tuple:
    """`Ranges.groups` from each head's list: one group (-1) when all heads agree, else one
    (head bits, list) per distinct list."""
    if all(p == per_head[0] for p in per_head):
        return ((-1, per_head[0]),)
    groups: dict = {}
    for h, rs in enumerate(per_head):
        groups[rs] = groups.get(rs, 0) | (1 << h)
    return tuple((bits, rs) for rs, bits in groups.items())
