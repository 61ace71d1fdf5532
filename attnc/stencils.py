"""Stencil `where` predicates: conditions on per-axis differences as interval sets per query.

input:  a `where` predicate (`ir.PExpr`), an Evaluator (for `pos` / `val`) and a reference
        `View` of the queries to answer for (sizes, grid coordinates).
output: `is_stencil(pred, axes)`: whether the predicate reads q and k only through per-axis
        differences; `Stencil.of(...)`: the allowed differences as runs along the last axis;
        `Stencil.iset(view)`: every query's allowed keys as an `ISet` (one interval per run).
does not: decide other predicates (the tile boxes do: tileboxes.py), combine sets
        (interval_sets.py) or classify tiles (interval_tiles.py).

[Note: stencils] A predicate whose every maximal affine sub-expression in q / k is a
combination of differences `q.a - k.a` (on a grid; `q - k` in 1-D), with no `h`, is
invariant under translation: `P(q, k) = D(q - k)` for one set D of difference vectors. D
is evaluated once, densely, on the box of all differences (prod(2 L_a - 1) points, e.g. 1M
for 512 x 512; past MAX_POINTS or the memory limit the tile boxes decide), and stored per
value of the outer differences as runs of the last axis. A query at coordinates c allows, for each run (d_outer, [s, e]), the keys of grid row
c_outer - d_outer at last coordinates [c_last - e, c_last - s] (clipped to the grid): one
key interval per run, so `where` patterns such as a disc (`(q.h - k.h)**2 + (q.w - k.w)**2
< r*r`) plan in closed form ([Note: interval sets] in intervals.py), exactly, with no
per-tile mask evaluation. Comparisons count as affine in the difference of their sides
(`q.h == k.h`, `q.w - k.w < r`). Too many runs per query raise TooManyIntervals (fewer
queries at once, then the tile boxes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ir
from .interval_sets import ISet, NotIntervals, TooManyIntervals, max_intervals
from .limits import max_bytes

#: the most difference points a stencil evaluates (beyond: the tile boxes)
MAX_POINTS = 1 << 25
#: difference points evaluated at once (bounds the working memory of the predicate's arithmetic)
CHUNK_POINTS = 1 << 20


def _affine(e, val):
    """{(base, axis): coefficient, None: constant} of an affine expression, else None."""
    match e:
        case ir.PConst(value=v):
            return {None: val(v)}
        case ir.PVar(name=n, axis=a):
            return {(n, a): 1}
        case ir.PNeg(operand=a):
            x = _affine(a, val)
            return None if x is None else {key: -c for key, c in x.items()}
        case ir.PBin(op="+" | "-", left=a, right=b):
            x, y = _affine(a, val), _affine(b, val)
            if x is None or y is None:
                return None
            s = 1 if e.op == "+" else -1
            return {key: x.get(key, 0) + s * y.get(key, 0) for key in x.keys() | y.keys()}
        case ir.PBin(op="*", left=a, right=b):
            x, y = _affine(a, val), _affine(b, val)
            if x is None or y is None:
                return None
            if set(x) <= {None}:
                x, y = y, x
            if not set(y) <= {None}:
                return None  # a product of two variable terms
            c = y.get(None, 0)
            return {key: c * v for key, v in x.items()}
    return None


def _difference_form(coef: dict, axes) -> bool | None:
    """True: only differences of q and k per axis (and at least one); False: q / k / h
    read otherwise; None: no position variable at all."""
    names = [key for key, c in coef.items() if key is not None and c != 0]
    if not names:
        return None
    for key in names:
        base, axis = key
        if base == "h" or (axis is None) != (not axes):
            return False
        if coef.get(("k" if base == "q" else "q", axis), 0) != -coef[key]:
            return False
    return True


def is_stencil(pred, axes, val) -> bool:
    """Whether `pred` reads q and k only through per-axis differences, and reads them at all."""
    seen = _check(pred, tuple(axes), val)
    return bool(seen)


def _check(e, axes, val):
    """True: difference-only and uses positions; None: no positions; False: not a stencil."""
    if isinstance(e, ir.PCmp):
        out = None
        for a, b in zip(e.operands, e.operands[1:]):
            x, y = _affine(a, val), _affine(b, val)
            if x is not None and y is not None:
                d = {key: x.get(key, 0) - y.get(key, 0) for key in x.keys() | y.keys()}
                r = _difference_form(d, axes)
            else:
                ra, rb = _check(a, axes, val), _check(b, axes, val)
                r = False if False in (ra, rb) else (True if True in (ra, rb) else None)
            if r is False:
                return False
            out = out or r
        return out
    x = _affine(e, val) if not isinstance(e, (ir.PBool, ir.PNot, ir.PIn, ir.PCall)) else None
    if x is not None:
        return _difference_form(x, axes)
    if isinstance(e, ir.PVar):
        return False
    kids = {ir.PBin: lambda: (e.left, e.right), ir.PNeg: lambda: (e.operand,), ir.PCall: lambda: e.args,
            ir.PBool: lambda: e.parts, ir.PNot: lambda: (e.operand,), ir.PIn: lambda: (e.item,)}
    out = None
    for k in kids.get(type(e), tuple)():
        r = _check(k, axes, val)
        if r is False:
            return False
        out = out or r
    return out


@dataclass(frozen=True)
class Stencil:
    """The allowed differences of a stencil predicate as runs along the last axis: run j
    allows differences (outer[j], d) for d in [s[j], e[j]], sorted so that one query's keys
    come out in increasing order (outer differences and then d descending)."""

    sizes: tuple[int, ...]  # grid sizes (1-D: (N,))
    outer: torch.Tensor  # int64 [R, d - 1]
    s: torch.Tensor  # int64 [R]
    e: torch.Tensor

    @staticmethod
    def of(pred, evaluator, view) -> "Stencil":
        """The runs of `pred` at the view's sizes (raises NotIntervals when the box of
        differences is too large to evaluate)."""
        axes = view.axes
        sizes = tuple(view.env[ir.axis_size(a)] for a in axes) if axes else (view.L,)
        # the smallest difference per axis: -(L - 1); in 1-D queries start at N - M (< 0 when M > N)
        offs = [1 - L for L in sizes] if axes else [1 - max(view.env[ir.M], view.L)]
        spans = [L - 1 - o + 1 for L, o in zip(sizes, offs)]
        points = math.prod(spans)
        limit, _ = max_bytes()  # past the memory limit too, the tile boxes decide (with their own check)
        if points > MAX_POINTS or (limit is not None and 4 * points + 48 * min(points, CHUNK_POINTS) > limit):
            raise NotIntervals(f"a stencil over {points} differences")
        W = spans[-1]
        rows = math.prod(spans[:-1])
        per = max(1, CHUNK_POINTS // W)
        parts = []
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            idx = torch.arange(r0 * W, r1 * W, dtype=torch.int64)
            diffs = []  # per axis, the difference of every point (row-major over the box)
            for i in reversed(range(len(sizes))):
                diffs.append(idx % spans[i] + offs[i])
                idx = idx // spans[i]
            diffs.reverse()
            zero = torch.zeros(1, dtype=torch.int64)
            if axes:
                sub = ir_view(view, q=zero.expand(len(diffs[0])), k=zero,
                              qc=dict(zip(axes, diffs)), kc={a: zero for a in axes})
            else:
                sub = ir_view(view, q=diffs[0], k=zero, qc={}, kc={})
            v, _ = evaluator.pos(pred, sub)
            parts.append(v.reshape(-1).expand(len(diffs[0])).reshape(r1 - r0, W) if v.numel() == 1 else v.reshape(r1 - r0, W))
        D = torch.cat(parts).to(torch.int8)
        edge = torch.diff(torch.nn.functional.pad(D, (1, 1)), dim=1)
        rs, cs = (edge == 1).nonzero(as_tuple=True)
        _, ce = (edge == -1).nonzero(as_tuple=True)
        rs, s, e = rs.flip(0), cs.flip(0) + offs[-1], ce.flip(0) - 1 + offs[-1]
        outer = torch.zeros(len(rs), len(sizes) - 1, dtype=torch.int64)
        o = rs.clone()
        for i in reversed(range(len(sizes) - 1)):
            outer[:, i] = o % spans[i] + offs[i]
            o = o // spans[i]
        return Stencil(sizes, outer, s, e)

    def iset(self, view) -> ISet:
        """Every query's allowed keys: one interval per run (empty where the key row or the
        clipped range falls outside the grid; queries outside the grid get none). The key
        row's start is found once per distinct query row, the clipped range once per last
        coordinate: then two gathers per query."""
        n, R = view.L, len(self.s)
        Mq = len(view.q)
        if R > max_intervals(Mq):
            raise TooManyIntervals(f"a stencil of {R} runs per query")
        if R == 0 or Mq == 0:
            z = torch.full((1, Mq, 1), n, dtype=torch.int64)
            return ISet(z, z.clone(), n, merged=True)
        sizes, L = self.sizes, self.sizes[-1]
        if view.axes:
            T = n - math.prod(sizes)
            qc = [view.qc[a] for a in view.axes]
        else:
            T, qc = 0, [view.q]
        outer = torch.zeros(Mq, dtype=torch.int64)  # the query's row: its outer coordinates, raveled
        for i in range(len(sizes) - 1):
            outer = outer * sizes[i] + qc[i]
        if view.qin is not None:
            outer = torch.where(view.qin, outer, -1)
        rows, inv = torch.unique(outer, return_inverse=True)
        ok = (rows >= 0)[:, None].expand(len(rows), R).clone()
        key_row = torch.zeros(len(rows), R, dtype=torch.int64)
        o, coords = rows.clamp(min=0), []
        for i in reversed(range(len(sizes) - 1)):
            coords.append(o % sizes[i])
            o = o // sizes[i]
        for i, c in enumerate(reversed(coords)):
            c = c[:, None] - self.outer[None, :, i]
            ok &= (c >= 0) & (c < sizes[i])
            key_row = key_row * sizes[i] + c
        base = torch.where(ok, T + key_row * L, n)[inv]  # [Mq, R]; n: no key (clamped to (n, n))
        last = qc[-1]
        if view.axes and L <= Mq:  # the clipped ranges of every last coordinate (0 .. L - 1), gathered
            w = torch.arange(L, dtype=torch.int64)[:, None]
            wl, wh = (w - self.e).clamp_(min=0)[last], (w - self.s + 1).clamp_(max=L)[last]
        else:
            wl, wh = (last[:, None] - self.e).clamp_(min=0), (last[:, None] - self.s + 1).clamp_(max=L)
        wh = torch.maximum(wh, wl)  # an empty range stays empty after the shift
        return ISet.make(base + wl, base + wh, n)


def ir_view(view, q, k, qc, kc):
    """A view of the same sizes over the given positions and coordinates (no text part)."""
    from .reference import View
    return View(q=q, k=k, env=view.env, axes=view.axes, qc=qc, kc=kc)
