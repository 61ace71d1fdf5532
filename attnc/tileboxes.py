"""Tile boxes: sound three-valued tile classes for patterns without a closed form per query.

input:  a bound pattern (PatternIR) at concrete sizes and a tile shape: 1-D tiles
        (`TileBoxes`) or N-D tiles on a grid (`NDTileBoxes`, in `tile_major` token order).
output: (full, nonempty) bool maps [Hx, nq, nk] that are sound (full: every pair allowed;
        not nonempty: none), and `refine`: the exact classes and allowed count, evaluating
        the mask only inside the tiles the boxes left undecided.
does not: choose between the closed form and the boxes, or assemble a Plan (analysis.py).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import ir, semantics
from .interval_tiles import classify_from_intervals
from .interval_sets import NotIntervals, merge
from .intervals import IntervalAnalysis
from .limits import require
from .products import ProductCounts
from .progress import each
from .reference import Evaluator, axis_component, top_view


# ----------------------------------------------------------------------------- tile boxes (three-valued)


def boxes_bytes(M: int, N: int, heads: int, nq: int, nk: int, naxes: int) -> int:
    """About the peak bytes of tile-box classification ([Note: tile boxes]) before `refine`:
    positions and coordinates of every token, interval sets of every query (a few intervals each),
    and a handful of bool [H, nq, nk] tile maps (full / nonempty per node, must / may)."""
    return 8 * (M + N) * (3 + 2 * naxes) + 64 * heads * M + 8 * heads * nq * nk


def _or(a, b):
    return a[0] | b[0], a[1] | b[1]


def _and(a, b):
    return a[0] & b[0], a[1] & b[1]


#: three-valued tile classes (full, nonempty) as sets for the boolean combinators ([Note:
#: combinators] in semantics.py): a complement's full tiles are the empty ones, its
#: nonempty tiles those not full
TILE_CLASSES = semantics.Algebra(union=semantics.folding(_or), intersect=semantics.folding(_and),
                                 complement=lambda c: (~c[1], ~c[0]))


class TileBoxes:
    """Sound tile classes of patterns without a closed form per query.

    [Note: tile boxes] Every tile is a box: a query range, a key range and a
    head. A sub-pattern with interval sets is classified exactly (full /
    empty / partial); a `where` predicate is bounded by interval arithmetic
    over the box (q in [q0, q1], k in [k0, k1], grid coordinates bounded per
    axis), giving *must* (true at every point) and *may* (true at some point);
    combinators combine the classes in three-valued logic. Anything else is
    "unknown". The answer is sound, not exact: full means every pair allowed,
    empty means none; only the undecided tiles are then evaluated exactly
    (`refine`), so the plan is still exact.
    """

    def __init__(self, pattern: ir.PatternIR, M: int, N: int, heads: int, grid, bm: int, bn: int):
        self.pattern, self.M, self.N, self.H, self.bm, self.bn = pattern, M, N, heads, bm, bn
        self.view = top_view(pattern, M, N, heads, grid, {})
        self.ia = IntervalAnalysis(pattern)
        nq, nk = -(-M // bm), -(-N // bn)
        self.nq, self.nk = nq, nk
        off = N - M
        self.q0 = (torch.arange(nq) * bm + off).view(1, nq, 1)
        self.q1 = (torch.clamp((torch.arange(nq) + 1) * bm, max=M) - 1 + off).view(1, nq, 1)
        self.k0 = (torch.arange(nk) * bn).view(1, 1, nk)
        self.k1 = torch.clamp((torch.arange(nk) + 1) * bn, max=N).view(1, 1, nk) - 1
        layout = pattern.layout
        self.sizes = [int(g) for g in grid] if layout.axes else []
        self.T = N - math.prod(self.sizes) if layout.axes else 0
        self._products = None  # ProductCounts, made on first use

    def classify(self, node: ir.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, nonempty) bool [Hx, nq, nk]: full => all pairs allowed, ~nonempty => none."""
        try:
            s = merge(self.ia.eval(node, self.view))
            return classify_from_intervals(s, self.M, self.bm, self.bn, self.view.qrel)
        except NotIntervals:
            pass
        if isinstance(node, (*ir.AXISWISE, ir.Along)) and self.view.axes:
            try:  # exact classes of a per-axis product ([Note: product counts])
                if self._products is None:
                    self._products = ProductCounts(self.pattern, self.M, self.N, self.H, self.sizes, self.bm, self.bn)
                full, nonempty, _ = self._products.classes(node)
                return full, nonempty
            except NotIntervals:
                pass
        return self._combine(node)

    def _combine(self, node: ir.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Three-valued combination of the children's classes (unknown for other leaves)."""
        shape = (1, self.nq, self.nk)
        if semantics.is_combinator(node):
            return semantics.combine(node, self.classify, TILE_CLASSES)
        match node:
            case ir.Where(pred=p):
                try:
                    must, may, grid_used = self.box(p)
                except NotIntervals:
                    return torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)
                must, may = must.expand(-1, self.nq, self.nk), may.expand(-1, self.nq, self.nk)
                if grid_used and self.T:
                    inside = (self.q0 >= self.T) & (self.k0 >= self.T)
                    outside = (self.q1 < self.T) | (self.k1 < self.T)
                    must, may = must & inside, may & ~outside
                return must, may
            case ir.Heads():
                full = torch.zeros(self.H, self.nq, self.nk, dtype=torch.bool)
                ne = full.clone()
                for sel, arm in self.ia.head_arms(node, self.view):
                    f, n = self.classify(arm.body)
                    full[sel], ne[sel] = f.expand(self.H, -1, -1)[sel], n.expand(self.H, -1, -1)[sel]
                return full, ne
        return torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)

    # -- interval arithmetic over the tile box
    def coord(self, lo, hi, axis: str):
        """Bounds of grid coordinate `axis` over flat positions [lo, hi] (grid part)."""
        i = self.pattern.layout.axes.index(axis)
        S = math.prod(self.sizes[i + 1:])
        L = self.sizes[i]
        lo, hi = (lo - self.T).clamp(min=0), (hi - self.T).clamp(min=0)
        same = (lo // (S * L)) == (hi // (S * L))
        return torch.where(same, (lo // S) % L, 0), torch.where(same, (hi // S) % L, L - 1)

    def box(self, node: ir.PExpr):
        """Numbers: (lo, hi, grid); booleans: (must, may, grid); tensors broadcast to [H?, nq, nk]."""
        ev = self.ia
        match node:
            case ir.PVar(name="q", axis=None):
                return self.q0, self.q1, False
            case ir.PVar(name="k", axis=None):
                return self.k0, self.k1, False
            case ir.PVar(name="h", axis=None):
                h = torch.arange(self.H).view(self.H, 1, 1)
                return h, h, False
            case ir.PVar(name=base, axis=ax):
                if ax not in self.pattern.layout.axes:
                    raise NotIntervals("unknown axis")
                lo, hi = (self.q0, self.q1) if base == "q" else (self.k0, self.k1)
                a, b = self.coord(lo, hi, ax)
                return a, b, True
            case ir.PConst(value=v):
                c = torch.tensor(ev.val(v, self.view.env)).view(1, 1, 1)
                return c, c, False
            case ir.PNeg(operand=a):
                lo, hi, g = self.box(a)
                return -hi, -lo, g
            case ir.PBin(op=op, left=a, right=b):
                (al, ah, g1), (bl, bh, g2) = self.box(a), self.box(b)
                return (*_interval_arith(op, al, ah, bl, bh), g1 or g2)
            case ir.PCall(func=f, args=args):
                vals = [self.box(x) for x in args]
                g = any(v[2] for v in vals)
                if f == "abs":
                    lo, hi = vals[0][0], vals[0][1]
                    return torch.where((lo <= 0) & (hi >= 0), 0, torch.minimum(lo.abs(), hi.abs())), torch.maximum(lo.abs(), hi.abs()), g
                pick = torch.minimum if f == "min" else torch.maximum
                lo, hi = vals[0][0], vals[0][1]
                for v in vals[1:]:
                    lo, hi = pick(lo, v[0]), pick(hi, v[1])
                return lo, hi, g
            case ir.PCmp(ops=ops, operands=xs):
                vals = [self.box(x) for x in xs]
                must, may = torch.tensor(True).view(1, 1, 1), torch.tensor(True).view(1, 1, 1)
                for op, (al, ah, _), (bl, bh, _) in zip(ops, vals, vals[1:]):
                    m, y = _compare(op, al, ah, bl, bh)
                    must, may = must & m, may & y
                return must, may, any(v[2] for v in vals)
            case ir.PBool(op=op, parts=ps):
                vals = [self.box(p) for p in ps]
                must, may = vals[0][0], vals[0][1]
                for m, y, _ in vals[1:]:
                    must, may = (must & m, may & y) if op == "and" else (must | m, may | y)
                return must, may, any(v[2] for v in vals)
            case ir.PNot(operand=a):
                must, may, g = self.box(a)
                return ~may, ~must, g
            case ir.PIn(item=i, collection=c):
                lo, hi, g = self.box(i)
                if isinstance(c, ir.SetRange):
                    a, b, st = (ev.val(x, self.view.env) for x in (c.start, c.stop, c.step))
                    inside = (lo >= a) & (hi < b)
                    return inside & ((lo == hi) | (st == 1)) & (((lo - a) % st == 0) | (st == 1)), (hi >= a) & (lo < b), g
                items = torch.tensor([ev.val(x, self.view.env) for x in c.items], dtype=torch.int64)
                if not len(items):  # `k in {}`: never (max() of nothing used to raise)
                    none = torch.zeros_like(lo, dtype=torch.bool)
                    return none, none, g
                point = (lo == hi) & torch.isin(lo, items)
                return point, (lo <= items.max()) & (hi >= items.min()), g
        raise NotIntervals(type(node).__name__)


def _interval_arith(op, al, ah, bl, bh):
    if op == "+":
        return al + bl, ah + bh
    if op == "-":
        return al - bh, ah - bl
    if op in ("*", "//"):
        if op == "//" and bool(((bl <= 0) & (bh >= 0)).any()):
            raise NotIntervals("division by a range containing 0")
        f = (lambda x, y: x * y) if op == "*" else (lambda x, y: torch.div(x, y, rounding_mode="floor"))
        corners = [f(x, y) for x in (al, ah) for y in (bl, bh)]
        return functools.reduce(torch.minimum, corners), functools.reduce(torch.maximum, corners)
    if op == "%":
        if not bool(((bl == bh) & (bl > 0)).all()):
            raise NotIntervals("modulus by a non-constant or non-positive value")
        same = torch.div(al, bl, rounding_mode="floor") == torch.div(ah, bl, rounding_mode="floor")
        return torch.where(same, al % bl, 0), torch.where(same, ah % bl, bl - 1)
    if op == "**":
        if not bool(((bl == bh) & (bl >= 0)).all()):
            raise NotIntervals("a power with a non-constant exponent")
        e = bl
        lo_p, hi_p = al ** e, ah ** e
        even = e % 2 == 0
        has0 = (al <= 0) & (ah >= 0)
        lo = torch.where(even, torch.where(has0, 0, torch.minimum(lo_p, hi_p)), lo_p)
        hi = torch.where(even, torch.maximum(lo_p, hi_p), hi_p)
        return lo, hi
    raise NotIntervals(op)


def _compare(op, al, ah, bl, bh):
    """(must, may) of `a op b` for a in [al, ah], b in [bl, bh]."""
    if op == "<":
        return ah < bl, al < bh
    if op == "<=":
        return ah <= bl, al <= bh
    if op == ">":
        return al > bh, ah > bl
    if op == ">=":
        return al >= bh, ah >= bl
    point = (al == ah) & (bl == bh) & (al == bl)
    overlap = (al <= bh) & (bl <= ah)
    return (point, overlap) if op == "==" else (~overlap, ~point)


def refine(pattern, M, N, H, grid, order_q, off_q, order_k, off_k, full, nonempty) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact classes and allowed count, evaluating the mask only inside undecided tiles.

    Query tile t holds query indices order_q[off_q[t]:off_q[t + 1]] (keys alike)."""
    Hx = max(full.shape[0], nonempty.shape[0])
    full, nonempty = full.expand(Hx, -1, -1).clone(), nonempty.expand(Hx, -1, -1).clone()
    nq, nk = full.shape[1:]
    ksz = off_k[1:] - off_k[:-1]
    tile_of_pos = torch.repeat_interleave(torch.arange(nk), ksz)
    allowed = 0
    undecided = nonempty & ~full
    for qt in each(range(nq), "evaluating undecided tiles", unit="tile row"):
        queries = order_q[off_q[qt]:off_q[qt + 1]]
        allowed += int((full[:, qt].to(torch.int64) * ksz).sum()) * len(queries)  # decided full tiles
        cols = undecided[:, qt].any(0).nonzero().flatten()
        if len(cols) == 0:
            continue
        pos = torch.cat([torch.arange(int(off_k[c]), int(off_k[c + 1])) for c in cols.tolist()])
        local = torch.bucketize(tile_of_pos[pos], cols)  # index into cols
        per_tile = evaluated_counts(pattern, M, N, H, grid, queries, order_k[pos], local, len(cols))[0].expand(H, -1)
        if Hx == 1 and H > 1 and not bool((per_tile == per_tile[:1]).all()):
            # heads differ inside undecided tiles: widen the head dimension and start over
            return refine(pattern, M, N, H, grid, order_q, off_q, order_k, off_k,
                           full.expand(H, -1, -1), nonempty.expand(H, -1, -1))
        counts = per_tile if Hx == H else per_tile[:1]
        und = undecided[:, qt][:, cols]
        allowed += int(counts[und].sum())
        size = len(queries) * ksz[cols]
        sub_full, sub_ne = full[:, qt, cols], nonempty[:, qt, cols]
        sub_full[und] = (counts == size)[und]
        sub_ne[und] = (counts > 0)[und]
        full[:, qt, cols], nonempty[:, qt, cols] = sub_full, sub_ne
    return full, nonempty, allowed * (H // Hx)


def evaluated_counts(pattern, M, N, H, grid, queries, keys, key_tile, ncols) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact mask of `queries` x `keys` (query / key indices), reduced: allowed pairs per
    (head, tile) int64 [1 or H, ncols] (`key_tile`: each key's tile, 0 .. ncols - 1) and per
    (head, query) [1 or H, len(queries)]. The head dimension is 1 when the mask ignores heads."""
    from .reference import mask_bytes
    nq, nk = len(queries), len(keys)
    require(mask_bytes(nq, nk, H, len(pattern.layout.axes)), f"evaluating {H} x {nq} x {nk} mask entries of "
            f"'{pattern.name}' (the partial tiles of one query tile)",
            "smaller tiles (block=) or smaller sizes")
    view = top_view(pattern, M, N, H, grid, {}, keys=keys, queries=queries)
    m = Evaluator(pattern).eval(pattern.body, view).contiguous().numpy().view(np.uint8)  # [1 or H, r, K]
    # numpy's uint8 sums: ~20x faster than torch's bool reductions on one thread (r, K < 2**31)
    per_key = torch.from_numpy(m.sum(1, dtype=np.int32)).to(torch.int64)
    per_tile = torch.zeros(m.shape[0], ncols, dtype=torch.int64).index_add_(1, key_tile, per_key)
    return per_tile, torch.from_numpy(m.sum(2, dtype=np.int32)).to(torch.int64)


# ----------------------------------------------------------------------------- N-D tiles on grids


def tile_major(sizes: list[int], tile: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): grid tokens in tile-major order (tiles row-major over the tile grid,
    tokens row-major inside a tile) and the start of every tile in that order."""
    counts = [-(-L // t) for L, t in zip(sizes, tile)]
    coords = torch.stack(torch.meshgrid(*[torch.arange(L) for L in sizes], indexing="ij"), -1).reshape(-1, len(sizes))
    tid = torch.zeros(len(coords), dtype=torch.int64)
    for i, (t, c) in enumerate(zip(tile, counts)):
        tid = tid * c + coords[:, i] // t
    flat = torch.arange(len(coords))
    order = flat[torch.argsort(tid * len(coords) + flat)]  # stable: row-major inside a tile
    per_tile = torch.bincount(tid, minlength=math.prod(counts))
    return order, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_tile, 0)])


class NDTileBoxes(TileBoxes):
    """Tile classes for N-D tiles: every tile is a box in grid coordinates.

    A per-axis primitive (and `P @ a`) is a product over axes, so its N-D tile
    classes are exact: a tile is full iff it is full along every axis, non-empty
    iff non-empty along every axis (1-D classes from the axis' interval sets).
    `where` is bounded on the box as in TileBoxes, with exact coordinate ranges;
    other leaves are undecided and evaluated exactly."""

    def __init__(self, pattern, N, heads, grid, tq, tk):
        self.pattern, self.M, self.N, self.H = pattern, N, N, heads
        self.view = top_view(pattern, N, N, heads, grid, {})
        self.ia = IntervalAnalysis(pattern)
        self.sizes, self.T = [int(g) for g in grid], 0
        self.tq, self.tk = tq, tk
        self.cq = [-(-L // t) for L, t in zip(self.sizes, tq)]
        self.ck = [-(-L // t) for L, t in zip(self.sizes, tk)]
        self.nq, self.nk = math.prod(self.cq), math.prod(self.ck)
        # flat bounds of each tile box (row-major ravel is monotone in every coordinate)
        self.q0, self.q1 = self._flat_bounds(tq, self.cq, (1, self.nq, 1))
        self.k0, self.k1 = self._flat_bounds(tk, self.ck, (1, 1, self.nk))

    def _axis_bounds(self, i, tile, counts):
        t = torch.arange(counts[i])
        return t * tile[i], torch.clamp((t + 1) * tile[i], max=self.sizes[i]) - 1

    def _grid_index(self, counts):
        return torch.stack(torch.meshgrid(*[torch.arange(c) for c in counts], indexing="ij"), -1).reshape(-1, len(counts))

    def _flat_bounds(self, tile, counts, shape):
        idx = self._grid_index(counts)
        lo = torch.zeros(len(idx), dtype=torch.int64)
        hi = torch.zeros(len(idx), dtype=torch.int64)
        for i in range(len(self.sizes)):
            a, b = self._axis_bounds(i, tile, counts)
            lo, hi = lo * self.sizes[i] + a[idx[:, i]], hi * self.sizes[i] + b[idx[:, i]]
        return lo.view(shape), hi.view(shape)

    def coord(self, lo, hi, axis):
        i = self.pattern.layout.axes.index(axis)
        which = (self.tq, self.cq, (1, self.nq, 1)) if lo.shape[1] == self.nq and lo.shape[2] == 1 else (self.tk, self.ck, (1, 1, self.nk))
        tile, counts, shape = which
        a, b = self._axis_bounds(i, tile, counts)
        idx = self._grid_index(counts)[:, i]
        return a[idx].view(shape), b[idx].view(shape)

    def axis_classes(self, node, axis) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D exact classes of `node` along `axis`: bool [Hx, cq_a, ck_a]."""
        i = self.pattern.layout.axes.index(axis)
        L = self.sizes[i]
        return classify_from_intervals(self.ia.coord_set(node, self.view, axis), L, self.tq[i], self.tk[i], torch.arange(L))

    def product(self, per_axis: dict) -> tuple[torch.Tensor, torch.Tensor]:
        full = nonempty = None
        d = len(self.sizes)
        for i, axis in enumerate(self.pattern.layout.axes):
            f, ne = per_axis.get(axis) or (torch.ones(1, self.cq[i], self.ck[i], dtype=torch.bool),) * 2
            shape = [f.shape[0]] + [1] * (2 * d)
            shape[1 + i], shape[1 + d + i] = self.cq[i], self.ck[i]
            f, ne = f.view(shape), ne.view(shape)
            full, nonempty = (f, ne) if full is None else (full & f, nonempty & ne)
        Hx = full.shape[0]
        full = full.expand(Hx, *self.cq, *self.ck).reshape(Hx, self.nq, self.nk)
        nonempty = nonempty.expand(Hx, *self.cq, *self.ck).reshape(Hx, self.nq, self.nk)
        return full, nonempty

    def classify(self, node):
        try:
            if isinstance(node, ir.AXISWISE):
                self.ia.check(node, self.view)
                return self.product({a: self.axis_classes(axis_component(node, i), a) for i, a in enumerate(self.pattern.layout.axes)})
            if isinstance(node, ir.Along):
                return self.product({node.axis: self.axis_classes(node.operand, node.axis)})
            if isinstance(node, ir.Full) or isinstance(node, ir.Empty):
                v = isinstance(node, ir.Full)
                t = torch.full((1, self.nq, self.nk), v, dtype=torch.bool)
                return t, t
        except NotIntervals:
            pass
        if semantics.is_combinator(node) or isinstance(node, (ir.Where, ir.Heads)):
            return self._combine(node)
        shape = (1, self.nq, self.nk)
        return torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)
