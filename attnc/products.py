"""Per-axis products on grids: exact allowed counts per tile pair, 1-D and N-D tiles.

input:  a bound grid pattern whose body is a per-axis product (an axis-wise primitive,
        `P @ a`, `where q.a == k.a`, `&` of them, or `heads { }` / `full` / `empty` of
        them), sizes and a tile shape (1-D, or N-D tiles per grid axis).
output: `ProductCounts`: allowed (query, key) pairs per (query tile, key tile) of 1-D tiles,
        and the exact tile classes and plan (`product_plan`) built from them; `nd_product`:
        the non-empty N-D tiles, their full flags and the allowed count; `axis_masks`, the
        dense 1-D mask of every grid axis.
does not: plan other patterns (it raises `NotIntervals`: analysis.py goes on to the closed
        form or the tile boxes, tileboxes.TileBoxes / NDTileBoxes) or assemble N-D plans
        (analysis._plan_nd).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import ir
from .interval_sets import NotIntervals
from .interval_tiles import PLAN_BYTES_PER_TILE
from .limits import require
from .plans import Plan
from .reference import Evaluator, View, axis_component, top_view
from .tilestats import tile_lengths

#: longest grid axis whose dense 1-D mask (and, for the last axis, prefix table) ProductCounts builds
MAX_PRODUCT_AXIS = 4096
#: (query segment, key segment) pairs per chunk of ProductCounts (bounds its working memory)
PRODUCT_CHUNK = 1 << 21


def _same_coord(pred) -> list[str] | None:
    """The axes a of a `where` predicate `q.a == k.a` (or an `and` of such); None for any other."""
    if isinstance(pred, ir.PBool) and pred.op == "and":
        axes = [_same_coord(p) for p in pred.parts]
        return None if any(a is None for a in axes) else [x for a in axes for x in a]
    if isinstance(pred, ir.PCmp) and pred.ops == ("==",) and all(isinstance(x, ir.PVar) for x in pred.operands):
        a, b = pred.operands
        if a.axis and a.axis == b.axis and {a.name, b.name} == {"q", "k"}:
            return [a.axis]
    return None


def _factors(ev: Evaluator, view: View, node: ir.Mask, out: dict) -> None:
    """AND node's 1-D factors into `out` {axis: bool [1 or H, L, L]} (raises NotIntervals when
    node is not a per-axis product): an AXISWISE primitive, `P @ a`, `where q.a == k.a`
    (the identity on axis a), `full`, and `&` of them ([Note: product factors])."""
    if isinstance(node, ir.AXISWISE):
        ev.check(node, view)
        comps = {a: axis_component(node, i) for i, a in enumerate(view.axes)}
    elif isinstance(node, ir.Along):
        comps = {node.axis: node.operand}
    elif isinstance(node, ir.Inter):
        for p in node.parts:
            _factors(ev, view, p, out)
        return
    elif isinstance(node, ir.Full):
        return
    elif isinstance(node, ir.Where) and (same := _same_coord(node.pred)) is not None \
            and all(a in view.axes for a in same):
        comps = {a: None for a in same}
    else:
        raise NotIntervals(f"{type(node).__name__} is not a per-axis product")
    for a, c in comps.items():
        L = view.env[ir.axis_size(a)]
        if L > MAX_PRODUCT_AXIS:
            raise NotIntervals(f"grid axis {a} longer than {MAX_PRODUCT_AXIS}")
        if c is None:
            m = torch.eye(L, dtype=torch.bool)[None]
        else:
            x = torch.arange(L, dtype=torch.int64)
            m = ev.eval(c, View(q=x, k=x, env={**view.env, ir.M: L, ir.N: L}))
        out[a] = m if a not in out else out[a] & m


def is_product(node: ir.Mask) -> bool:
    """Whether `node` has the form of a per-axis product ([Note: product factors]; its sizes may
    still rule it out: `axis_masks` raises NotIntervals then)."""
    if isinstance(node, ir.Inter):
        return all(is_product(p) for p in node.parts)
    return isinstance(node, (*ir.AXISWISE, ir.Along, ir.Full)) or (
        isinstance(node, ir.Where) and _same_coord(node.pred) is not None)


def axis_masks(pattern: ir.PatternIR, view: View, node: ir.Mask) -> list[torch.Tensor]:
    """The dense 1-D masks bool [1 or H, L, L] of a per-axis product `node`, one per grid
    axis (all-true where unconstrained); raises NotIntervals for anything else.

    [Note: product factors] A pattern is a per-axis product when it allows (q, k) iff
    D_a[q_a, k_a] on every grid axis a: an axis-wise primitive (its components), `P @ a`
    (P's 1-D mask on a), `where q.a == k.a` (the identity on a), `full`, and an
    intersection `&` of products (the AND of their factors per axis; two parts on one axis
    AND there). Text tokens of a mixed layout get no pairs in every part, so none in the
    product either. Unions are not products (their tiles need the tile boxes)."""
    factors: dict = {}
    _factors(Evaluator(pattern), view, node, factors)
    out = []
    for a in view.axes:
        L = view.env[ir.axis_size(a)]
        out.append(factors.get(a, torch.ones(1, L, L, dtype=torch.bool)))
    return out


class ProductCounts:
    """Exact allowed counts per (query tile, key tile) of per-axis products on a
    grid with 1-D tiles (raises NotIntervals for anything else).

    [Note: product counts] A per-axis pattern allows (q, k) iff every axis
    allows (q_a, k_a): the mask is a product of 1-D masks D_a. A 1-D tile is a
    run of flat positions, i.e. a few *row segments*: fixed outer coordinates
    (all axes but the last) and a column range [a, b) of the last axis (a tile
    of 128 tokens on a 256-wide grid is half a row; on a 40-wide grid it spans
    four rows). The allowed count between a query segment (o, [a, b)) and a key
    segment (o', [c, d)) is prod over outer axes of D_i[o_i, o'_i] times
    sum over x in [a, b), y in [c, d) of D_last[x, y], which is four look-ups
    in the 2-D prefix sums of D_last. Summing segment pairs into their tiles
    gives every tile pair's exact count: full iff it is the tile's size,
    empty iff 0. Cost O(sum of axis lengths squared) for the 1-D masks plus
    O(query segments * key segments) look-ups (segments are tiles + grid rows),
    in chunks; no mask of M x N positions. Text tokens of `seq(T) + grid(...)`
    get no pairs (a per-axis pattern constrains grid tokens only); `full` and
    `empty` are counted from tile sizes; `heads { }` assembles its arms' counts.
    """

    def __init__(self, pattern: ir.PatternIR, M: int, N: int, heads: int, grid, bm: int, bn: int):
        if not pattern.layout.axes or M != N:
            raise NotIntervals("product counts need a grid and M = N")
        self.pattern, self.H, self.M, self.N = pattern, heads, M, N
        self.view = top_view(pattern, M, N, heads, grid, {})
        self.sizes = [int(g) for g in grid]
        self.G = math.prod(self.sizes)
        self.T = N - self.G
        self.nq, self.nk = -(-M // bm), -(-N // bn)
        self.qsize, self.ksize = tile_lengths(M, bm), tile_lengths(N, bn)
        self.qseg = self._segments(M, bm)
        self.kseg = self._segments(N, bn)

    def _segments(self, length: int, b: int):
        """(tile, outer coordinates per outer axis, a, b) of every row segment of the grid part of every tile."""
        nt = -(-length // b)
        t = torch.arange(nt, dtype=torch.int64)
        lo = (t * b - self.T).clamp(0, self.G)
        hi = (torch.clamp((t + 1) * b, max=length) - self.T).clamp(0, self.G)
        W = self.sizes[-1]
        r0 = lo // W
        n = torch.where(hi > lo, (hi - 1) // W + 1 - r0, 0)
        total = int(n.sum())
        tile = torch.repeat_interleave(t, n, output_size=total)
        first = torch.repeat_interleave(torch.cumsum(n, 0) - n, n, output_size=total)
        row = torch.repeat_interleave(r0, n, output_size=total) + torch.arange(total) - first
        a = (torch.repeat_interleave(lo, n, output_size=total) - row * W).clamp(min=0)
        e = (torch.repeat_interleave(hi, n, output_size=total) - row * W).clamp(max=W)
        outer = []
        for L in reversed(self.sizes[:-1]):
            outer.append(row % L)
            row = row // L
        return tile, outer[::-1], a, e

    def counts(self, node: ir.Mask) -> torch.Tensor:
        """int64 [1 or H, nq, nk]: allowed (query, key) pairs per tile pair of `node`."""
        if isinstance(node, ir.Heads):
            out = torch.zeros(self.H, self.nq, self.nk, dtype=torch.int64)
            for sel, arm in Evaluator(self.pattern).head_arms(node, self.view):
                out[sel] = self.counts(arm.body).expand(self.H, -1, -1)[sel]
            return out
        if isinstance(node, ir.Full):
            return (self.qsize[:, None] * self.ksize[None, :])[None]
        if isinstance(node, ir.Empty):
            return torch.zeros(1, self.nq, self.nk, dtype=torch.int64)
        masks = axis_masks(self.pattern, self.view, node)
        W = self.sizes[-1]
        last = masks[-1].to(torch.int64)
        P = torch.zeros(last.shape[0], W + 1, W + 1, dtype=torch.int64)
        P[:, 1:, 1:] = last.cumsum(1).cumsum(2)  # P[x, y]: allowed pairs in [0, x) x [0, y)
        Hx = max(m.shape[0] for m in masks)
        qt, qo, qa, qb = self.qseg
        kt, ko, kc, kd = self.kseg
        out = torch.zeros(Hx, self.nq, self.nk, dtype=torch.int64)
        step = max(1, PRODUCT_CHUNK // max(1, len(kt)))
        c, d = kc[None, :], kd[None, :]
        for s0 in range(0, len(qt), step):
            sl = slice(s0, s0 + step)
            a, b = qa[sl, None], qb[sl, None]
            w = P[:, b, d] - P[:, a, d] - P[:, b, c] + P[:, a, c]  # [Hl, segments, key segments]
            for i, m in enumerate(masks[:-1]):
                w = w * m[:, qo[i][sl, None], ko[i][None, :]]
            per_k = torch.zeros(w.shape[0], w.shape[1], self.nk, dtype=torch.int64).index_add_(2, kt, w)
            out.index_add_(1, qt[sl], per_k.expand(Hx, -1, -1))
        return out

    def classes(self, node: ir.Mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(full, nonempty, counts) of `node`, exact."""
        cnt = self.counts(node)
        return cnt == (self.qsize[:, None] * self.ksize[None, :])[None], cnt > 0, cnt


    def plan(self, cnt: torch.Tensor, bm: int, bn: int) -> Plan:
        """The exact plan of counts `cnt` (from `counts`)."""
        full = cnt == (self.qsize[:, None] * self.ksize[None, :])[None]
        return Plan.from_flags(full, cnt > 0, M=self.M, N=self.N, heads=self.H, block=(bm, bn),
                               allowed=int(cnt.sum()) * (self.H // cnt.shape[0]), method="closed-form")


def product_plan(pattern, M, N, heads, grid, bm, bn) -> Plan:
    """The exact plan of a per-axis product (or `heads { }` of products) on a grid
    with 1-D tiles, from ProductCounts (raises NotIntervals otherwise)."""
    pc = ProductCounts(pattern, M, N, heads, grid, bm, bn)
    return pc.plan(pc.counts(pattern.body), bm, bn)


# ----------------------------------------------------------------------------- N-D tiles


def _axis_tile_counts(m: torch.Tensor, tq: int, tk: int) -> torch.Tensor:
    """int64 [Hx, cq, ck]: allowed pairs of a 1-D mask bool [Hx, L, L] per (query tile, key tile)
    of tq / tk coordinates (the last tile of an axis may be short)."""
    Hx, L, _ = m.shape
    cq, ck = -(-L // tq), -(-L // tk)
    pad = torch.zeros(Hx, cq * tq, ck * tk, dtype=torch.int32)
    pad[:, :L, :L] = m
    return pad.view(Hx, cq, tq, ck, tk).sum((2, 4), dtype=torch.int64)


def nd_product(pattern: ir.PatternIR, N: int, heads: int, grid, tq, tk):
    """(full, partial, Hx, allowed): the non-empty N-D tiles `tq` / `tk` of a per-axis product, or
    `heads { }` of products, on a pure grid, as runs of full and of partial key tiles per row
    h * nq + query tile (`Plan.from_runs`; tiles row-major over the tile grid as
    tileboxes.tile_major), and the allowed pairs (raises NotIntervals otherwise).

    [Note: product tiles] An N-D tile pair is a box on every axis, so its allowed count is
    the product of the per-axis 1-D tile counts C_a[query tile_a, key tile_a]: full iff full
    on every axis, empty iff empty on some axis. The non-empty tiles are the Cartesian
    product of every axis' non-empty 1-D tile pairs; consecutive key tiles of the last (fastest)
    axis are consecutive tile indices, so the product is enumerated over the outer axes' pairs
    and the last axis' *runs* ([Note: tile runs] in plans.py): cost O(sum of L^2) for the 1-D
    masks plus O(runs), no [nq, nk] map, nothing evaluated, nothing listed tile by tile (a
    full head on 46 x 46 tiles a side is one run a row, not 2116 tiles)."""
    from .plans import Runs

    view = top_view(pattern, N, N, heads, grid, {})
    if view.qin is not None or len(view.axes) != len(tq):
        raise NotIntervals("N-D product tiles need a pure grid")
    per_head = _head_factors(pattern, view, pattern.body, heads, tq, tk)
    cq = [-(-int(L) // t) for L, t in zip(grid, tq)]
    ck = [-(-int(L) // t) for L, t in zip(grid, tk)]
    nq, nk = math.prod(cq), math.prod(ck)
    sizes = [tile_lengths(int(L), a)[:, None] * tile_lengths(int(L), b)[None, :] for L, a, b in zip(grid, tq, tk)]
    fulls, parts, allowed = [], [], 0
    for h, axes in enumerate(per_head):
        # the outer axes' non-empty pairs (query tile, key tile, full), as flat indices over those axes
        q = k = np.zeros(1, dtype=np.int64)
        f = np.ones(1, dtype=bool)
        for c, s, a, b in zip(axes[:-1], sizes[:-1], cq[:-1], ck[:-1]):
            qa, ka = (x.numpy() for x in (c > 0).nonzero(as_tuple=True))
            fa = (c == s).numpy()[qa, ka]
            q = (q[:, None] * a + qa[None, :]).reshape(-1)
            k = (k[:, None] * b + ka[None, :]).reshape(-1)
            f = (f[:, None] & fa[None, :]).reshape(-1)
        require(PLAN_BYTES_PER_TILE * len(q) * cq[-1], f"the N-D tile plan of '{pattern.name}' "
                f"({len(q)} outer tile pairs x {cq[-1]} query tiles)", "a larger tile or smaller sizes")
        # the last axis: per query tile, runs of full / of non-empty / of partial key tiles
        last = {name: Runs.of_keys(np.flatnonzero(sel.numpy().reshape(-1)), ck[-1])
                for name, sel in (("full", axes[-1] == sizes[-1]), ("any", axes[-1] > 0),
                                  ("part", (axes[-1] > 0) & (axes[-1] != sizes[-1])))}
        for out, pick, runs in ((fulls, f, last["full"]), (parts, f, last["part"]), (parts, ~f, last["any"])):
            qo, ko = q[pick], k[pick]
            n = len(runs.row)  # every outer pair (qo, ko) with every last-axis run (row r, [lo, hi))
            row = (h * nq + (qo[:, None] * cq[-1] + runs.row[None, :])).reshape(-1)
            base = (ko[:, None] * ck[-1]).repeat(n, 1) if n else np.zeros((len(qo), 0), dtype=np.int64)
            out.append((row, (base + runs.lo[None, :]).reshape(-1), (base + runs.hi[None, :]).reshape(-1)))
        allowed += math.prod(int(c.sum()) for c in axes)
    Hx = len(per_head)
    full, partial = (Runs.merged(*(np.concatenate(x) for x in zip(*lst)), nk) for lst in (fulls, parts))
    return full, partial, Hx, allowed * (heads // Hx)


def _head_factors(pattern, view, node, heads, tq, tk) -> list[list[torch.Tensor]]:
    """Per head (one entry when every head agrees), the per-axis 1-D tile counts [cq_a, ck_a]."""
    if isinstance(node, ir.Heads):
        out: list = [None] * heads
        for sel, arm in Evaluator(pattern).head_arms(node, view):
            sub = _head_factors(pattern, view, arm.body, heads, tq, tk)
            for h in sel.nonzero().flatten().tolist():
                out[h] = sub[min(h, len(sub) - 1)]
        return out
    counts = [_axis_tile_counts(m, a, b) for m, a, b in zip(axis_masks(pattern, view, node), tq, tk)]
    Hx = max(c.shape[0] for c in counts)
    return [[c[min(h, c.shape[0] - 1)] for c in counts] for h in range(Hx)]
