"""Per-axis products on grids with 1-D tiles: exact allowed counts per tile pair.

input:  a bound grid pattern whose body is a per-axis product (an axis-wise primitive,
        `P @ a`, or `heads { }` / `full` / `empty` of them), sizes and a 1-D tile shape.
output: `ProductCounts`: allowed (query, key) pairs per (query tile, key tile), and the
        exact tile classes and plan (`product_plan`) built from them; `axis_masks`, the
        dense 1-D mask of every grid axis.
does not: plan other patterns (it raises `NotIntervals`: analysis.py goes on to the tile
        boxes) or N-D tiles (tileboxes.NDTileBoxes).
"""

from __future__ import annotations

import math

import torch

from . import ir
from .interval_sets import NotIntervals
from .plans import Plan
from .reference import Evaluator, View, axis_component, top_view
from .tilestats import tile_lengths

#: longest grid axis whose dense 1-D mask (and, for the last axis, prefix table) ProductCounts builds
MAX_PRODUCT_AXIS = 4096
#: (query segment, key segment) pairs per chunk of ProductCounts (bounds its working memory)
PRODUCT_CHUNK = 1 << 21


def axis_masks(pattern: ir.PatternIR, view: View, node: ir.Mask) -> list[torch.Tensor]:
    """The dense 1-D masks bool [1 or H, L, L] of a per-axis product `node` (an
    AXISWISE primitive or `P @ a`), one per grid axis (all-true where unconstrained)."""
    ev = Evaluator(pattern)
    if isinstance(node, ir.AXISWISE):
        ev.check(node, view)
        comps = {a: axis_component(node, i) for i, a in enumerate(view.axes)}
    elif isinstance(node, ir.Along):
        comps = {node.axis: node.operand}
    else:
        raise NotIntervals(f"{type(node).__name__} is not a per-axis product")
    out = []
    for a in view.axes:
        L = view.env[ir.axis_size(a)]
        if L > MAX_PRODUCT_AXIS:
            raise NotIntervals(f"grid axis {a} longer than {MAX_PRODUCT_AXIS}")
        if a not in comps:
            out.append(torch.ones(1, L, L, dtype=torch.bool))
            continue
        c = torch.arange(L, dtype=torch.int64)
        out.append(ev.eval(comps[a], View(q=c, k=c, env={**view.env, ir.M: L, ir.N: L})))
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
        self.pattern, self.H = pattern, heads
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


def product_plan(pattern, M, N, heads, grid, bm, bn) -> Plan:
    """The exact plan of a per-axis product (or `heads { }` of products) on a grid
    with 1-D tiles, from ProductCounts (raises NotIntervals otherwise)."""
    full, nonempty, cnt = ProductCounts(pattern, M, N, heads, grid, bm, bn).classes(pattern.body)
    return Plan.from_flags(full, nonempty, M=M, N=N, heads=heads, block=(bm, bn),
                           allowed=int(cnt.sum()) * (heads // cnt.shape[0]), method="closed-form")
