"""Block-sparsity analysis: tile plans without evaluating N^2 positions.

input:  a bound pattern (PatternIR), sizes and a tile shape.
output: a `Plan`: per query tile its full and partial key tiles, the
        transposed view for backward, and the exact count of allowed pairs.
does not: generate kernels; handle run-time inputs (their plans are built
        inside the op).

[Note: interval sets] The analysis computes, for every query,
its allowed keys as a short union of disjoint half-open intervals: a tensor
pair lo/hi of shape [Hx, M, R] (Hx is 1 when all heads agree, R intervals per
query; an empty slot is (N, N)). Primitives have closed forms (causal is
[0, qa + 1), band is [qa - l, qa + r + 1), a neighborhood is NATTEN's window,
...), and the combinators are set algebra on intervals (merge, pairwise
intersection, gaps). From intervals, 1-D tiles are classified exactly by
per-tile reductions over the queries' touched / covered key-tile ranges, without
a dense tile map ([Note: sparse tiles]): a key tile is *full* for a query tile
when every query covers it, *empty* when none touches it. Cost O(H * M * R +
non-empty tiles), no N^2 or nq * nk term.
On grids, per-axis primitives are products of per-axis sets ([Note: products]);
with more intervals than the closed form keeps, 1-D tiles of a product are
still counted exactly, from row segments ([Note: product counts]).

Patterns that are not short interval unions per query (`where`, `dilate`,
many-key `strided`) are classified per tile box in three-valued logic and only
undecided tiles are evaluated exactly ([Note: tile boxes]); N-D tiles on grids
use the same boxes in tile-major token order (`NDTileBoxes`). `Plan.method`
says which path built a plan; both are exact.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import ir, semantics
from .limits import require
from .progress import each, task
from .reference import Evaluator, View, _component, random_table, top_view
from .tilestats import count_dtype, tile_lengths

#: intervals per query the closed form always keeps (beyond `max_intervals`: tile boxes / scan)
MAX_INTERVALS = 64
#: intervals (heads x queries x per query) one evaluation may hold: few queries at a time (the
#: plan's chunks) may keep more per query, e.g. strided(128) at 32K tokens or 10 % routing at 128K
INTERVAL_BUDGET = 1 << 22


def max_intervals(rows: int, heads: int = 1) -> int:
    """How many intervals per query the closed form keeps for `rows` queries of `heads` heads."""
    return max(MAX_INTERVALS, INTERVAL_BUDGET // max(1, rows * heads))


class NotIntervals(Exception):
    """This node is not a short union of key intervals per query."""


class TooManyIntervals(NotIntervals):
    """More intervals per query than `max_intervals` keeps for the queries evaluated together:
    fewer queries at once may fit (the plan halves its chunk and tries again)."""


# ----------------------------------------------------------------------------- interval sets


@dataclass(frozen=True)
class ISet:
    lo: torch.Tensor  # int64 [Hx, Mq, R]
    hi: torch.Tensor
    n: int  # key length: intervals live in [0, n); (n, n) marks an empty slot
    merged: bool = False  # sorted, disjoint, non-adjacent (merge() is then the identity)

    @staticmethod
    def make(lo: torch.Tensor, hi: torch.Tensor, n: int) -> "ISet":
        while lo.dim() < 3:
            lo, hi = lo.unsqueeze(0), hi.unsqueeze(0)
        if lo.shape[-1] == 0:  # no interval at all (random(0)): one empty slot, so complement sees a row
            lo = hi = torch.full((*lo.shape[:-1], 1), n, dtype=torch.int64)
        lo = lo.clamp(0, n)  # new tensors: filled in place below
        hi = hi.clamp(0, n)
        empty = hi <= lo
        if bool(empty.any()):
            lo.masked_fill_(empty, n)
            hi.masked_fill_(empty, n)
        # one interval per query is merged by construction
        return ISet(lo, hi, n, merged=lo.shape[-1] == 1)

    def count(self) -> torch.Tensor:
        """Allowed keys per query: int64 [Hx, Mq]."""
        return (self.hi - self.lo).sum(-1)


def _broadcast(a: ISet, b: ISet) -> tuple[ISet, ISet]:
    h = max(a.lo.shape[0], b.lo.shape[0])
    ea = ISet(a.lo.expand(h, -1, -1), a.hi.expand(h, -1, -1), a.n, a.merged)
    eb = ISet(b.lo.expand(h, -1, -1), b.hi.expand(h, -1, -1), b.n, b.merged)
    return ea, eb


def merge(s: ISet) -> ISet:
    """Sort and merge overlapping or adjacent intervals; drop all-empty slots."""
    if s.merged:
        return s
    if s.lo.shape[-1] == 2:
        return _merge2(s)
    lo, order = torch.sort(s.lo, dim=-1, stable=True)
    hi = torch.gather(s.hi, -1, order)
    cm = torch.cummax(hi, dim=-1).values
    prev = torch.cat([torch.full_like(cm[..., :1], -1), cm[..., :-1]], dim=-1)
    start = lo > prev
    group = torch.cumsum(start.to(torch.int64), dim=-1) - 1
    R = lo.shape[-1]
    new_lo = torch.full_like(lo, s.n).scatter_reduce(-1, group, lo, reduce="amin", include_self=True)
    new_hi = torch.full_like(hi, -1).scatter_reduce(-1, group, hi, reduce="amax", include_self=True)
    out = ISet.make(new_lo, new_hi.clamp(min=0), s.n)
    used = int((out.lo < s.n).sum(-1).max()) if out.lo.numel() else 0
    used = max(used, 1)
    limit = max_intervals(s.lo.shape[1], s.lo.shape[0])
    if used > limit:
        raise TooManyIntervals(f"more than {limit} intervals per query")
    return ISet(out.lo[..., :used], out.hi[..., :used], s.n, merged=True) if used < R else ISet(out.lo, out.hi, s.n, merged=True)


def _merge2(s: ISet) -> ISet:
    """merge() of two slots without sorting (unions and complements of single
    intervals): a few elementwise ops instead of sort, cummax and scatters."""
    return _merge_pair(s.lo[..., 0], s.hi[..., 0], s.lo[..., 1], s.hi[..., 1], s.n)


def _merge_pair(l1, h1, l2, h2, n: int) -> ISet:
    """The merged set of two intervals per query ([Hx, Mq] each, made: empty = (n, n))."""
    swap = l2 < l1  # empty slots (n, n) sort last
    a_lo, b_lo = torch.minimum(l1, l2), torch.maximum(l1, l2)
    a_hi, b_hi = torch.where(swap, h2, h1), torch.where(swap, h1, h2)
    join = b_lo <= a_hi  # overlapping or adjacent (an empty second slot joins harmlessly)
    a_hi = torch.where(join, torch.maximum(a_hi, b_hi), a_hi)
    b_lo.masked_fill_(join, n)
    if not bool((b_lo < n).any()):
        return ISet(a_lo[..., None], a_hi[..., None], n, merged=True)
    b_hi.masked_fill_(join, n)
    return ISet(torch.stack([a_lo, b_lo], -1), torch.stack([a_hi, b_hi], -1), n, merged=True)


def union(a: ISet, b: ISet) -> ISet:
    a, b = _broadcast(a, b)
    if a.lo.shape[-1] == 1 and b.lo.shape[-1] == 1:
        return _merge_pair(a.lo[..., 0], a.hi[..., 0], b.lo[..., 0], b.hi[..., 0], a.n)
    return merge(ISet(torch.cat([a.lo, b.lo], -1), torch.cat([a.hi, b.hi], -1), a.n))


def intersect(a: ISet, b: ISet) -> ISet:
    a, b = _broadcast(a, b)
    lo = torch.maximum(a.lo[..., :, None], b.lo[..., None, :]).flatten(-2)
    hi = torch.minimum(a.hi[..., :, None], b.hi[..., None, :]).flatten(-2)
    return merge(ISet.make(lo, hi, a.n))


def complement(a: ISet) -> ISet:
    a = merge(a)
    zero = torch.zeros_like(a.lo[..., :1])
    end = torch.full_like(a.lo[..., :1], a.n)
    real_hi = torch.where(a.lo < a.n, a.hi, a.n)
    lo = torch.cat([zero, real_hi], -1)
    hi = torch.cat([a.lo, end], -1)
    return merge(ISet.make(lo, hi, a.n))


def _fold(A: ISet, F: ISet, S: int) -> ISet:
    """The set {c * S + f : c in A, f in F} over A.n * S positions (A, F merged)."""
    A, F = _broadcast(A, F)
    n = A.n * S
    full = F.count() == S  # [Hx, Mq]
    cnt = A.count()
    partial_rows = cnt.masked_fill(full, 0)
    C = int(partial_rows.max()) if partial_rows.numel() else 0
    RF = F.lo.shape[-1]
    if C * RF > max_intervals(A.lo.shape[1], A.lo.shape[0]):
        raise TooManyIntervals(f"grid product with {C * RF} intervals per query")
    scaled_lo, scaled_hi = A.lo * S, A.hi * S
    if C == 0:
        return merge(ISet.make(scaled_lo, scaled_hi, n))
    # the j-th coordinate of A for j < C: find its interval by cumulative counts
    sizes = A.hi - A.lo
    cum = torch.cumsum(sizes, -1)
    j = torch.arange(C, dtype=torch.int64).expand(*cum.shape[:-1], C).contiguous()
    idx = torch.searchsorted(cum, j, right=True).clamp(max=sizes.shape[-1] - 1)
    before = torch.gather(cum - sizes, -1, idx)
    coord = torch.gather(A.lo, -1, idx) + (j - before)
    valid = j < cnt[..., None]
    base = (coord * S)[..., :, None]
    lo = (base + F.lo[..., None, :]).flatten(-2)
    hi = (base + F.hi[..., None, :]).flatten(-2)
    keep = (valid[..., :, None] & (F.lo < F.n)[..., None, :]).flatten(-2) & ~full[..., None]
    lo, hi = lo.masked_fill(~keep, n), hi.masked_fill(~keep, n)
    f = full[..., None]
    R = max(lo.shape[-1], scaled_lo.shape[-1])
    pad = lambda t, fill: torch.cat([t, torch.full((*t.shape[:-1], R - t.shape[-1]), fill, dtype=t.dtype)], -1)
    lo = torch.where(f, pad(scaled_lo.masked_fill(~f, n), n), pad(lo, n))
    hi = torch.where(f, pad(scaled_hi.masked_fill(~f, n), n), pad(hi, n))
    return merge(ISet.make(lo, hi, n))


# ----------------------------------------------------------------------------- closed forms per primitive


class IntervalAnalysis(Evaluator):
    """The per-query interval sets of a 1-D pattern (raises NotIntervals)."""

    def eval(self, node: ir.Mask, view: View) -> ISet:  # type: ignore[override]
        if isinstance(node, ir.AXISWISE) and view.axes:
            self.check(node, view)
            return self.grid_product(view, {a: self.axis_set(_component(node, i), view, a) for i, a in enumerate(view.axes)})
        self.check(node, view)
        parts = self.keys(node, view)
        if parts is not None:
            return self.key_intervals(parts, view)
        method = getattr(self, "iv_" + type(node).__name__.rstrip("_"), None)
        if method is None:
            raise NotIntervals(type(node).__name__)
        return method(node, view)

    # -- grids: products of per-axis interval sets
    def coord_set(self, node: ir.Mask, view: View, axis: str) -> ISet:
        """The 1-D interval set of `node` along `axis`, one row per coordinate 0 .. size(axis) - 1."""
        L = view.env[ir.axis_size(axis)]
        require(128 * L, f"the allowed keys of every coordinate of axis {axis} (size {L})",
                "smaller grid sizes")
        coords = torch.arange(L, dtype=torch.int64)
        return merge(self.eval(node, View(q=coords, k=coords, env={**view.env, ir.M: L, ir.N: L})))

    def axis_set(self, node: ir.Mask, view: View, axis: str) -> ISet:
        """The 1-D interval set of `node` along `axis`, one row per query of `view`."""
        # a 1-D set depends only on the coordinate and the axis length: evaluate
        # every coordinate once (no unique() over the flat queries) and gather
        s = self.coord_set(node, view, axis)
        return ISet(s.lo[:, view.qc[axis]], s.hi[:, view.qc[axis]], s.n, s.merged)

    def grid_product(self, view: View, per_axis: dict) -> ISet:
        """Flat key intervals of the box product of per-axis sets (an absent axis is
        unconstrained); tokens outside the grid part of a mixed layout get none.

        [Note: products] Axes are folded from the fastest outwards. With F the
        set over the inner axes (S positions) and A the set of the next axis: where
        F is all of [0, S) the product is A's intervals scaled by S (adjacent rows
        merge), otherwise every coordinate c of A contributes c * S + F. The
        interval count stays the number of non-full inner rows, e.g. `size`
        intervals for a 2-D neighborhood, instead of the keys' count.
        """
        sizes = [view.env[ir.axis_size(a)] for a in view.axes]
        Mq = len(view.q)
        F = None
        S = 1
        for axis, L in zip(reversed(view.axes), reversed(sizes)):
            A = per_axis.get(axis)
            if A is None:
                z = torch.zeros(1, Mq, 1, dtype=torch.int64)
                A = ISet(z, z + L, L, merged=True)
            F = A if F is None else _fold(A, F, S)
            S *= L
        T = view.L - S
        lo, hi = F.lo + T, F.hi + T
        if view.qin is not None:
            out = ~view.qin.view(1, Mq, 1)
            lo, hi = lo.masked_fill(out, view.L), hi.masked_fill(out, view.L)
        return ISet.make(lo, hi, view.L)

    def iv_Along(self, node, view):
        return self.grid_product(view, {node.axis: self.axis_set(node.operand, view, node.axis)})

    def _iv(self, lo, hi, view) -> ISet:
        return ISet.make(lo[:, None], hi[:, None], view.L)

    # -- primitives: progressions of keys from their definitions ([Note: one definition])
    def key_intervals(self, parts: tuple[semantics.Keys, ...], view: View) -> ISet:
        """The primitive's keys per query as intervals: one per interval part, one per key of
        a stepped part (TooManyIntervals past `max_intervals`); constant parts in one tensor."""
        Mq, L = len(view.q), view.L
        limit = max_intervals(Mq)
        los, his, points = [], [], []
        for p in parts:
            if p.when is None and p.step is None and isinstance(p.lo, ir.PConst) and isinstance(p.hi, ir.PConst):
                points.append((self.val(p.lo.value, view.env), self.val(p.hi.value, view.env)))
                continue
            lo, hi = self.per_query(p.lo, view), self.per_query(p.hi, view)
            if p.when is not None:
                hi = torch.where(self.per_query(p.when, view), hi, lo)
            if p.step is None:
                los.append(lo[:, None])
                his.append(hi[:, None])
                continue
            step = self.per_query(p.step, view)
            if bool((step != step[0]).any()) or int(step[0]) < 1:
                raise NotIntervals("a progression whose step varies")
            step = int(step[0])
            first = lo + (-lo).clamp(min=0) // step * step  # keys below 0 do not exist
            first = torch.where(first < 0, first + step, first)
            hi = hi.clamp(max=L)
            count = int(((hi - first + step - 1) // step).clamp(min=0).max()) if Mq else 0
            if len(los) + count > limit:
                raise TooManyIntervals(f"more than {limit} keys of a progression per query")
            keys = first[:, None] + step * torch.arange(count, dtype=torch.int64)[None, :]
            los.append(keys)
            his.append(torch.where(keys < hi[:, None], keys + 1, keys))
        if points:
            if len(points) > limit:
                raise TooManyIntervals(f"more than {limit} key intervals per query")
            pts = torch.tensor(points, dtype=torch.int64)
            los.append(pts[:, 0].expand(Mq, -1))
            his.append(pts[:, 1].expand(Mq, -1))
        if not los:
            z = torch.zeros(Mq, 1, dtype=torch.int64)
            return ISet.make(z, z, L)
        out = ISet.make(torch.cat(los, dim=1), torch.cat(his, dim=1), L)
        return out if out.lo.shape[-1] == 1 else merge(out)

    def per_query(self, e: ir.PExpr, view: View) -> torch.Tensor:
        """A term without k (an end, step or condition of a progression) at every query: [Mq]."""
        v, _ = self.pos(e, view)
        return v.reshape(-1).expand(len(view.q)) if v.numel() == 1 else v.reshape(len(view.q))

    def iv_Same(self, node, view):
        # keys of the query's own segment: one interval when every id is one contiguous run
        doc = view.inputs[node.input].to(torch.int64)
        n = doc.shape[-1]
        starts = torch.ones(n, dtype=torch.bool)
        starts[1:] = doc[1:] != doc[:-1]
        run = torch.cumsum(starts.to(torch.int64), 0) - 1  # run index of every position
        if int(run[-1]) + 1 != len(torch.unique(doc)):
            raise NotIntervals("a segment id occurs in several runs")
        run_lo = starts.nonzero().flatten()
        run_hi = torch.cat([run_lo[1:], torch.tensor([n])])
        r = run[view.q.clamp(0, n - 1)]
        ok = (view.q >= 0) & (view.q < n)
        lo = torch.where(ok, run_lo[r], 0)
        return self._iv(lo, torch.where(ok, run_hi[r], 0), view)

    def iv_Routed(self, node, view):
        sel = view.inputs[node.input].to(torch.int64)  # [H or 1, nqb, kmax], -1 ignored
        b = self.val(node.block, view.env)
        if sel.shape[-1] > max_intervals(len(view.q), sel.shape[0]):
            raise TooManyIntervals("routed with many blocks per query block")
        rows = sel[:, view.qrel // b]  # [Hs, Mq, kmax]
        lo = torch.where(rows >= 0, rows * b, view.L)
        hi = torch.where(rows >= 0, (rows + 1) * b, view.L)
        return merge(ISet.make(lo, hi, view.L))

    def iv_Random(self, node, view):
        r, seed = self.val(node.r, view.env), self.val(node.seed, view.env)
        if min(r, view.L) > max_intervals(len(view.q)):
            raise TooManyIntervals("random with many keys")
        table = random_table(view.q, view.L, r, seed)
        return merge(ISet.make(table, table + 1, view.L))

    def iv_Union(self, node, view):
        out = self.eval(node.parts[0], view)
        for p in node.parts[1:]:
            out = union(out, self.eval(p, view))
        return out

    def iv_Inter(self, node, view):
        out = self.eval(node.parts[0], view)
        for p in node.parts[1:]:
            out = intersect(out, self.eval(p, view))
        return out

    def iv_Diff(self, node, view):
        return intersect(self.eval(node.left, view), complement(self.eval(node.right, view)))

    def iv_Not(self, node, view):
        return complement(self.eval(node.operand, view))

    def iv_Heads(self, node, view):
        H = view.heads
        chosen = [(sel, self.eval(arm.body, view)) for sel, arm in self.head_arms(node, view)]
        R = max(s.lo.shape[-1] for _, s in chosen)
        lo = torch.full((H, len(view.q), R), view.L, dtype=torch.int64)
        hi = lo.clone()
        for sel, s in chosen:
            r = s.lo.shape[-1]
            lo[sel, :, :r] = s.lo.expand(H, -1, -1)[sel]
            hi[sel, :, :r] = s.hi.expand(H, -1, -1)[sel]
        return ISet(lo, hi, view.L, merged=all(s.merged for _, s in chosen))

    def iv_Blockwise(self, node, view):
        if view.axes:
            raise NotIntervals("blockwise on a grid")
        b = self.val(node.b, view.env)
        uq, iq = torch.unique(torch.div(view.q, b, rounding_mode="floor"), return_inverse=True)
        nb = -(-view.L // b)
        env = {**view.env, ir.M: -(-view.env[ir.M] // b), ir.N: nb}
        inner = self.eval(node.operand, View(q=uq, k=torch.arange(nb), env=env))
        lo, hi = inner.lo[:, iq] * b, inner.hi[:, iq] * b
        return ISet.make(lo, torch.where(hi >= nb * b, view.L, hi), view.L)


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True, eq=False)
class TileList:
    """Per row of tiles, the column indices of some tiles, stored compressed:
    row r (flat over heads, r = h * rows + row) holds
    `cols[start[r] : start[r] + counts[r]]`, ascending, so a plan's memory is
    proportional to its non-empty tiles. `index` is the padded view the kernels
    and the torch path read ([Hx, rows, max count], -1 padded), made on first use.
    """

    counts: torch.Tensor  # int32 [Hx, rows]
    cols: torch.Tensor  # int32 [number of tiles], row-major

    @functools.cached_property
    def index(self) -> torch.Tensor:
        """int32 [Hx, rows, max(counts)] (at least 1 wide), padded with -1."""
        Hx, rows = self.counts.shape
        cnt = self.counts.flatten().long()
        width = max(int(cnt.max()) if cnt.numel() else 0, 1)
        flat_row = self.flat_rows()
        slot = torch.arange(len(self.cols), dtype=torch.int64, device=cnt.device) - (torch.cumsum(cnt, 0) - cnt)[flat_row]
        index = torch.full((Hx * rows * width,), -1, dtype=torch.int32, device=cnt.device)
        index[flat_row * width + slot] = self.cols.to(torch.int32)
        return index.view(Hx, rows, width)

    def flat_rows(self) -> torch.Tensor:
        """int64 [number of tiles]: the flat row (h * rows + row) of every entry of `cols`."""
        cnt = self.counts.flatten().long()
        return torch.repeat_interleave(torch.arange(len(cnt), device=cnt.device), cnt)

    @staticmethod
    def from_padded(counts: torch.Tensor, index: torch.Tensor) -> "TileList":
        """From per-row counts and a -1 padded index (the entries past a row's count are ignored)."""
        width = index.shape[-1]
        keep = torch.arange(width, device=index.device) < counts[..., None].long()
        t = TileList(counts.to(torch.int32), index[keep].to(torch.int32))
        t.__dict__["index"] = index.to(torch.int32)  # already padded: no need to rebuild it
        return t

    def to(self, device) -> "TileList":
        """Contiguous int32 copies on `device` (with the padded view, which kernels read)."""
        return TileList.from_padded(self.counts.to(device, torch.int32).contiguous(),
                                    self.index.to(device, torch.int32).contiguous())

    def ragged_partial(self, partial: "TileList", length: int, b: int) -> tuple["TileList", "TileList"]:
        """(full, partial) with a ragged last tile (length not a multiple of b) moved from this
        full list to `partial`: how the kernels' forward / dQ loops read key tiles (their full
        loop has no bounds check, [Note: the two loops] in codegen/kernels.py)."""
        return self.move_column(partial, length // b) if length % b else (self, partial)

    def move_column(self, to: "TileList", col: int) -> tuple["TileList", "TileList"]:
        """(self without its tiles in column `col`, `to` with them added): both stay
        ascending per row (the runtime moves a ragged last key tile from the full
        list to the partial one)."""
        sel = self.cols == col
        if not bool(sel.any()):
            return self, to
        Hx, rows = self.counts.shape
        moved_rows = self.flat_rows()[sel]
        keep = TileList(torch.bincount(self.flat_rows()[~sel], minlength=Hx * rows).to(torch.int32).view(Hx, rows),
                        self.cols[~sel].to(torch.int32))
        all_rows = torch.cat([to.flat_rows(), moved_rows])
        all_cols = torch.cat([to.cols.long(), self.cols[sel].long()])
        order = torch.argsort(all_rows * (int(all_cols.max()) + 1) + all_cols)
        add = TileList(torch.bincount(all_rows, minlength=Hx * rows).to(torch.int32).view(Hx, rows),
                       all_cols[order].to(torch.int32))
        return keep, add

    @staticmethod
    def from_dense(flags: torch.Tensor) -> "TileList":
        h, r, c = flags.nonzero(as_tuple=True)  # row-major: columns ascend within a row
        return TileList(flags.sum(-1).to(torch.int32), c.to(torch.int32))

    @staticmethod
    def from_rows(row: np.ndarray, col: np.ndarray, Hx: int, rows: int) -> "TileList":
        """From int64 numpy coordinates sorted by (row, col), row = h * rows + r."""
        counts = np.bincount(row, minlength=Hx * rows).astype(np.int32)
        return TileList(torch.from_numpy(counts).view(Hx, rows), torch.from_numpy(col.astype(np.int32)))


@dataclass(frozen=True)
class Plan:
    """Which tiles a kernel must visit, like FlexAttention's BlockMask but named.

    `full` / `partial`: per query tile, the key tiles that need no mask / need
    the mask; `full_t` / `partial_t`: per key tile, its query tiles (backward).
    The head dimension is 1 when every head has the same plan.
    """

    M: int
    N: int
    heads: int
    block: tuple[int, int]
    full: TileList
    partial: TileList
    full_t: TileList
    partial_t: TileList
    allowed: int  # exact number of allowed (head, query, key) triples
    method: str  # "closed-form" | "tile-boxes" (sound tile classes, exact evaluation inside undecided tiles)
    tiles_evaluated: int = 0  # tiles whose mask was evaluated because the boxes left them undecided
    # N-D tiles on grids (None for 1-D tiles): the tile shapes, and the token order they imply.
    # perm_q[i] is the query index (0..M-1) at position i of the tile-major order (tiles row-major
    # over the tile grid, tokens row-major inside a tile); tile t holds positions
    # offsets_q[t] .. offsets_q[t + 1] - 1 (edge tiles are smaller when sizes are not multiples).
    # `block` is then (prod(query tile), prod(key tile)).
    tile_shape: tuple | None = None
    perm_q: torch.Tensor | None = None
    perm_k: torch.Tensor | None = None
    offsets_q: torch.Tensor | None = None
    offsets_k: torch.Tensor | None = None

    @staticmethod
    def from_flags(full: torch.Tensor, nonempty: torch.Tensor, **fields) -> "Plan":
        """The plan of bool [Hx, nq, nk] tile classes (full implies nonempty);
        `fields` are the other Plan fields (M, N, heads, block, allowed, method, ...)."""
        partial = nonempty & ~full
        return Plan(full=TileList.from_dense(full), partial=TileList.from_dense(partial),
                    full_t=TileList.from_dense(full.transpose(1, 2)),
                    partial_t=TileList.from_dense(partial.transpose(1, 2)), **fields)

    @staticmethod
    def from_tiles(keys: np.ndarray, full: np.ndarray, Hx: int, nq: int, nk: int, **fields) -> "Plan":
        """The plan of the non-empty tiles `keys` = (h * nq + query tile) * nk + key tile
        (int64, sorted, unique) and their bool `full` flags; no dense [nq, nk] map.

        The transposed lists come from a counting sort by (head, key tile): query-tile rows
        are visited in order, so each key tile's query tiles come out ascending (O(tiles),
        no comparison sort of all tiles: a causal plan at 10^6 tokens has 33 M of them)."""
        row, kt = np.divmod(keys, nk)
        rows = Hx * nq
        bounds = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=rows), out=bounds[1:])
        del row
        kt = kt.astype(np.int32)

        def lists(cols: np.ndarray, flags: np.ndarray, edges: np.ndarray, Hr: int, per: int) -> tuple:
            """(full, partial) TileLists of rows [edges[i], edges[i + 1]) of `cols`."""
            acc = np.zeros(len(flags) + 1, dtype=np.int64)
            np.cumsum(flags, out=acc[1:])
            f_count = acc[edges[1:]] - acc[edges[:-1]]
            p_count = (edges[1:] - edges[:-1]) - f_count
            out = []
            for count, pick in ((f_count, flags), (p_count, ~flags)):
                out.append(TileList(torch.from_numpy(count.astype(np.int32)).view(Hr, per),
                                    torch.from_numpy(cols[pick])))
            return tuple(out)

        fwd_full, fwd_part = lists(kt, full, bounds, Hx, nq)
        group = np.zeros((Hx, nk), dtype=np.int64)
        for h in range(Hx):
            group[h] = np.bincount(kt[bounds[h * nq]:bounds[(h + 1) * nq]], minlength=nk)
        edges_t = np.zeros(Hx * nk + 1, dtype=np.int64)
        np.cumsum(group.reshape(-1), out=edges_t[1:])
        ptr = edges_t[:-1].copy()
        qt_t = np.empty(len(kt), dtype=np.int32)
        full_t = np.empty(len(kt), dtype=bool)
        for r in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            s, e = int(bounds[r]), int(bounds[r + 1])
            g = kt[s:e] + (r // nq) * nk
            pos = ptr[g]
            qt_t[pos] = r % nq
            full_t[pos] = full[s:e]
            ptr[g] += 1
        t_full, t_part = lists(qt_t, full_t, edges_t, Hx, nk)
        return Plan(full=fwd_full, partial=fwd_part, full_t=t_full, partial_t=t_part, **fields)

    @property
    def shape(self) -> tuple[int, int]:
        if self.tile_shape is not None:
            return len(self.offsets_q) - 1, len(self.offsets_k) - 1
        return -(-self.M // self.block[0]), -(-self.N // self.block[1])

    def to_dense(self) -> torch.Tensor:
        """int8 [Hx, query tiles, key tiles]: 0 empty, 1 partial, 2 full."""
        nq, nk = self.shape
        hx = self.full.counts.shape[0]
        require(2 * hx * nq * (nk + 1), f"a dense map of {hx} x {nq} x {nk} tiles",
                "a larger tile, smaller sizes, or the plan's tile lists (plan.full, plan.partial) instead of a dense map")
        out = torch.zeros(self.full.counts.shape[0], nq, nk + 1, dtype=torch.int8)
        flat = out.view(-1)
        for lst, val in ((self.partial, 1), (self.full, 2)):
            flat[lst.flat_rows() * (nk + 1) + lst.cols.long()] = val
        return out[..., :nk]

    def density(self) -> float:
        """Allowed pairs / all pairs (exact)."""
        return self.allowed / (self.heads * self.M * self.N)

    def counts(self) -> dict[str, int]:
        hx = self.full.counts.shape[0]
        rep = self.heads // hx
        nq, nk = self.shape
        full = int(self.full.counts.sum()) * rep
        part = int(self.partial.counts.sum()) * rep
        return {"tiles_total": nq * nk * self.heads, "tiles_full": full, "tiles_partial": part}

    def tile_density(self) -> float:
        c = self.counts()
        return (c["tiles_full"] + c["tiles_partial"]) / c["tiles_total"]

    def to_string(self, head: int = 0, max_cells: int = 64) -> str:
        from .tilestats import ascii_map
        dense = self.to_dense()
        pic, f = ascii_map(dense[min(head, dense.shape[0] - 1)], max_cells)
        c = self.counts()
        tiles = (f"{self.block[0]}x{self.block[1]}" if self.tile_shape is None else
                 "/".join("x".join(map(str, t)) for t in self.tile_shape) + " (tile-major order)")
        head_line = (f"plan {self.M}x{self.N}, tiles {tiles} ({self.method}): "
                     f"{c['tiles_full']} full, {c['tiles_partial']} partial of {c['tiles_total']}; density {self.density():.4f}")
        return head_line + ("" if f == 1 else f"\n(each character: {f}x{f} tiles)") + "\n" + pic


def _classify_from_intervals(s: ISet, M: int, bm: int, bn: int, qrel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, nonempty) bool [Hx, nq, nk] from per-query intervals, by difference arrays."""
    N = s.n
    Hx, Mq, R = s.lo.shape
    nq, nk = -(-M // bm), -(-N // bn)
    real = s.lo < N
    qt = (qrel // bm).view(1, Mq, 1).expand(Hx, Mq, R)
    hidx = torch.arange(Hx).view(Hx, 1, 1).expand(Hx, Mq, R)
    # covered key tiles: t with t*bn >= lo and min((t+1)*bn, N) <= hi
    c_lo = (s.lo + bn - 1) // bn
    c_hi = s.hi // bn + ((s.hi == N) & (N % bn != 0)).to(torch.int64)
    t_lo = s.lo // bn
    t_hi = (s.hi + bn - 1) // bn

    row = (hidx * nq + qt) * (nk + 1)
    size = Hx * nq * (nk + 1)

    def accumulate(a, b):
        ok = real & (b > a)  # empty slots go to a dump bin past the end
        starts = torch.bincount(torch.where(ok, row + a, size).flatten(), minlength=size + 1)
        ends = torch.bincount(torch.where(ok, row + b, size).flatten(), minlength=size + 1)
        return torch.cumsum((starts - ends)[:size].view(Hx, nq, nk + 1), dim=-1)[..., :nk]

    cover = accumulate(c_lo, c_hi)
    touch = accumulate(t_lo, t_hi)
    return cover == tile_lengths(M, bm).view(1, nq, 1), touch > 0


def _expand(lo: np.ndarray, hi: np.ndarray, nk: int) -> np.ndarray:
    """Keys row * nk + t of every tile t in the ranges [lo, hi) of [rows, R] arrays."""
    n = np.maximum(hi - lo, 0).ravel()
    idx = np.repeat(np.arange(n.size), n)
    first = np.cumsum(n) - n
    return (idx // lo.shape[-1]) * nk + lo.ravel()[idx] + (np.arange(len(idx)) - first[idx])


def _sparse_tiles(s: ISet, bm: int, bn: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The non-empty tiles of whole query tiles (the last may be short) from merged
    interval sets, without a dense [nq, nk] map: sorted unique int64 keys
    (h * nq + query tile) * nk + key tile, bool `full` per key, and the number
    of allowed (head, query, key) triples of the set.

    [Note: sparse tiles] Per query tile and interval slot r (a query's r-th
    interval, in tile units: touched key tiles [t_lo, t_hi), covered ones
    [c_lo, c_hi)), two reductions over the tile's queries give its classes:
    * non-empty tiles = union over r of the union over q of [t_lo, t_hi), which
      is the one range [min t_lo, max t_hi) when every query of the tile has slot
      r (or none does), t_hi does not decrease and each range starts before
      the previous one ends;
    * full tiles = union over r of the intersection over q of [c_lo, c_hi), i.e.
      [max c_lo, min c_hi), when no key tile may be covered through two slots:
      the slots' ranges [min c_lo, max c_hi) over covering queries are disjoint
      (a query's own intervals are disjoint, so then every query must cover a
      full tile through the same slot).
    Tiles where a condition fails (a slot appears or splits inside the tile,
    a random or dilated pattern) are classified exactly by difference arrays over
    their own queries only. Cost O(Hx * M * R) elementwise plus O(non-empty tiles);
    memory O(M * R + non-empty tiles + bad tiles * nk)."""
    N = s.n
    Hx, Mq, R = s.lo.shape
    bm = min(bm, Mq)  # one query tile either way; padding a short tile up to a huge bm would allocate bm rows
    nq, nk = -(-Mq // bm), -(-N // bn)
    # slot-major [R, Hx * nq, bm] copies: reductions over a tile's queries run along the last axis
    dt = np.int32 if N + 2 * bn < 2**31 else np.int64
    lo, hi = (x.numpy().transpose(2, 0, 1).astype(dt, order="C") for x in (s.lo, s.hi))
    allowed = int(np.subtract(hi, lo).sum(dtype=np.int64))  # empty slots are (N, N)
    pad = nq * bm - Mq
    if pad:  # the short last tile repeats its last query: no class changes
        lo = np.concatenate([lo, np.repeat(lo[..., -1:], pad, -1)], -1)
        hi = np.concatenate([hi, np.repeat(hi[..., -1:], pad, -1)], -1)
    lo, hi = lo.reshape(R, Hx * nq, bm), hi.reshape(R, Hx * nq, bm)
    real = lo < N
    # an empty slot becomes [-bn, -bn): key tile -1 in all four ranges below
    np.putmask(lo, ~real, -bn)
    np.putmask(hi, ~real, -bn)
    shift = bn.bit_length() - 1 if bn & (bn - 1) == 0 else None
    div = (lambda x: x >> shift) if shift is not None else (lambda x: x // bn)
    t_lo, t_hi = div(lo), div(hi + (bn - 1))  # touched key tiles [t_lo, t_hi)
    c_lo, c_hi = div(lo + (bn - 1)), div(hi)  # covered key tiles [c_lo, c_hi)
    if N % bn:  # the short last key tile is covered by intervals that reach N
        np.putmask(c_hi, hi == N, nk)
    # consecutive queries keep the slot (-1 marks a missing one), t_hi never decreases,
    # each range starts before the previous one ends
    b0 = t_hi[..., :-1]
    bad = ((t_hi[..., 1:] < b0) | (t_lo[..., 1:] > b0)).any(-1).any(0)  # [Hx * nq]
    T_lo, T_hi = t_lo.min(-1).T.astype(np.int64), t_hi.max(-1).T.astype(np.int64)  # [Hx * nq, R]
    F_lo, F_hi = c_lo.max(-1).T.astype(np.int64), c_hi.min(-1).T.astype(np.int64)
    if R > 1:  # the slots' may-cover ranges (a superset: non-covering queries included) must be disjoint
        m_lo, m_hi = c_lo.min(-1).T, c_hi.max(-1).T
        order = np.argsort(m_lo, axis=-1, kind="stable")
        m_lo, m_hi = np.take_along_axis(m_lo, order, -1), np.maximum.accumulate(np.take_along_axis(m_hi, order, -1), -1)
        bad |= (m_lo[:, 1:] < m_hi[:, :-1]).any(-1)
    good = ~bad[:, None]
    n_bad = int(bad.sum())
    require(PLAN_BYTES_PER_TILE * int(np.subtract(np.where(good, T_hi, T_lo), T_lo).sum(dtype=np.int64))
            + 48 * n_bad * (nk + 1) + 16 * n_bad * R * bm,
            f"the tile plan of {Mq} queries x {N} keys with {bm}x{bn} tiles",
            "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
    keys = _expand(T_lo, np.where(good, T_hi, T_lo), nk)
    fkeys = _expand(F_lo, np.where(good, F_hi, F_lo), nk)
    rows = np.flatnonzero(bad)
    if len(rows):
        # exact classes of the bad tiles by difference arrays over their queries
        b_real = real[:, rows]
        base = (np.arange(len(rows)) * (nk + 1))[None, :, None]
        size = len(rows) * (nk + 1)

        def count(a, b, ok):
            starts = np.bincount(np.where(ok, base + a, size).ravel(), minlength=size + 1)
            ends = np.bincount(np.where(ok, base + b, size).ravel(), minlength=size + 1)
            return np.cumsum((starts - ends)[:size].reshape(len(rows), nk + 1), -1)[:, :nk]

        bc_lo, bc_hi = c_lo[:, rows], c_hi[:, rows]
        touch = count(t_lo[:, rows], t_hi[:, rows], b_real)
        cover = count(bc_lo, bc_hi, b_real & (bc_hi > bc_lo))
        r_t, k_t = np.nonzero(touch > 0)
        r_f, k_f = np.nonzero(cover == bm)
        keys = np.concatenate([keys, rows[r_t] * nk + k_t])
        fkeys = np.concatenate([fkeys, rows[r_f] * nk + k_f])
    if R > 1 or len(rows):  # slots may touch the same tile (np.unique would import numpy.ma: 7 ms cold)
        keys, fkeys = np.sort(keys), np.sort(fkeys)
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    pos = np.searchsorted(fkeys, keys).clip(max=max(len(fkeys) - 1, 0))
    full = fkeys[pos] == keys if len(fkeys) else np.zeros(len(keys), dtype=bool)
    return keys, full, allowed


#: queries per chunk of the closed-form plan builder (bounds its working memory)
PLAN_CHUNK = 16384
#: about the bytes a non-empty tile costs while a plan is built from sparse tiles: its key and flag,
#: the sort orders and both tile lists (row and transposed) of `Plan.from_tiles`
PLAN_BYTES_PER_TILE = 64


def boxes_bytes(M: int, N: int, heads: int, nq: int, nk: int, naxes: int) -> int:
    """About the peak bytes of tile-box classification ([Note: tile boxes]) before `_refine`:
    positions and coordinates of every token, interval sets of every query (a few intervals each),
    and a handful of bool [H, nq, nk] tile maps (full / nonempty per node, must / may)."""
    return 8 * (M + N) * (3 + 2 * naxes) + 64 * heads * M + 8 * heads * nq * nk


def _require_boxes(pattern, M, N, heads, nq, nk, what: str) -> None:
    require(boxes_bytes(M, N, heads, nq, nk, len(pattern.layout.axes)),
            f"{what} of '{pattern.name}' at M = {M}, N = {N} ({nq} x {nk} tiles per head)",
            "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")


def _closed_form_plan(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, bm: int, bn: int,
                      inputs: dict | None) -> Plan:
    """The plan from interval sets (raises NotIntervals), in chunks of whole query tiles:
    working memory O(PLAN_CHUNK * R), plus O(non-empty tiles) for the result. A chunk with
    more intervals per query than `max_intervals` allows is halved and tried again (down to
    one query tile), so many keys per query (strided, routed) stay in closed form."""
    if pattern.inputs and not inputs:
        raise NotIntervals("run-time inputs")
    ia = IntervalAnalysis(pattern)
    nq, nk = -(-M // bm), -(-N // bn)
    step = bm * max(1, PLAN_CHUNK // bm)
    no_keys = torch.zeros(0, dtype=torch.int64)
    parts, allowed, Hx, tiles = [], 0, None, 0
    q0 = 0
    with task("planning", total=M, unit="query") as bar:
        while q0 < M:
            end = min(q0 + step, M)
            try:
                s = _plan_chunk_sets(pattern, ia, M, N, heads, grid, inputs, q0, end, no_keys)
            except TooManyIntervals:
                if step <= bm:
                    raise
                step = bm * max(1, step // bm // 2)  # fewer queries at once keep more intervals each
                continue
            if Hx is None:
                Hx = s.lo.shape[0]
            elif s.lo.shape[0] != Hx:  # heads come from the IR and the inputs' shapes, never from rows
                raise AssertionError(f"chunks disagree on heads: {Hx} vs {s.lo.shape[0]}")
            keys, full, count = _sparse_tiles(s, bm, bn)
            allowed += count
            tiles += len(keys)  # the tiles of the rows done so far, projected to all M rows:
            require(PLAN_BYTES_PER_TILE * tiles * M / end,
                    f"the tile plan of '{pattern.name}' at M = {M}, N = {N} with {bm}x{bn} tiles "
                    f"({tiles} non-empty tiles in the first {end} query rows)",
                    "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
            if end - q0 < M:  # chunk keys (h * cq + local tile) * nk + key tile -> global
                cq = -(-(end - q0) // bm)
                row, kt = keys // nk, keys % nk
                keys = ((row // cq) * nq + row % cq + q0 // bm) * nk + kt
            parts.append((keys, full))
            bar.update(end - q0)
            q0 = end
    keys, full = (np.concatenate(x) for x in zip(*parts)) if len(parts) > 1 else parts[0]
    if len(parts) > 1 and Hx > 1:
        order = np.argsort(keys, kind="stable")
        keys, full = keys[order], full[order]
    return Plan.from_tiles(keys, full, Hx, nq, nk, M=M, N=N, heads=heads, block=(bm, bn),
                           allowed=allowed * (heads // Hx), method="closed-form")


def _plan_chunk_sets(pattern, ia, M, N, heads, grid, inputs, q0, end, no_keys) -> ISet:
    """The merged interval sets of queries [q0, end) (raises NotIntervals / TooManyIntervals)."""
    rows = end - q0
    require(8 * rows * (3 + 2 * len(pattern.layout.axes)) + 64 * heads * rows,
            f"the allowed keys of {rows} queries of '{pattern.name}' (one chunk of the tile plan)",
            "a smaller query tile (block=(128, 128)) or smaller sizes")
    view = top_view(pattern, M, N, heads, grid, inputs or {}, rows=(q0, end), keys=no_keys)
    return merge(ia.eval(pattern.body, view))  # working memory O(chunk * R): bounded by max_intervals


# ----------------------------------------------------------------------------- tile boxes (three-valued)


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
    (`_refine`), so the plan is still exact.
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
            return _classify_from_intervals(s, self.M, self.bm, self.bn, self.view.qrel)
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
        match node:
            case ir.Union_(parts=ps) | ir.Inter(parts=ps):
                parts = [self.classify(p) for p in ps]
                f, ne = parts[0]
                for pf, pne in parts[1:]:
                    f, ne = (f | pf, ne | pne) if isinstance(node, ir.Union_) else (f & pf, ne & pne)
                return f, ne
            case ir.Diff(left=a, right=b):
                (fa, na), (fb, nb) = self.classify(a), self.classify(b)
                return fa & ~nb, na & ~fb
            case ir.Not(operand=a):
                f, ne = self.classify(a)
                return ~ne, ~f
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


def _refine(pattern, M, N, H, grid, order_q, off_q, order_k, off_k, full, nonempty) -> tuple[torch.Tensor, torch.Tensor, int]:
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
        per_tile = _evaluated_counts(pattern, M, N, H, grid, queries, order_k[pos], local, len(cols))[0].expand(H, -1)
        if Hx == 1 and H > 1 and not bool((per_tile == per_tile[:1]).all()):
            # heads differ inside undecided tiles: widen the head dimension and start over
            return _refine(pattern, M, N, H, grid, order_q, off_q, order_k, off_k,
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


def _evaluated_counts(pattern, M, N, H, grid, queries, keys, key_tile, ncols) -> tuple[torch.Tensor, torch.Tensor]:
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


def _full_tile_counts(full: torch.Tensor, qsz: torch.Tensor, ksz: torch.Tensor, block) -> torch.Tensor:
    """Per-tile counts of bool `full` tiles [H, nq, nk] (their sizes; 0 elsewhere), built in
    place without an [nq, nk] int64 map (10^6 tokens in 128-token tiles: 64 M tiles)."""
    counts = full.to(count_dtype(block))
    counts *= ksz.to(counts.dtype)[None, None, :]
    counts *= qsz.to(counts.dtype)[None, :, None]
    return counts


def _uniform(length: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity order and offsets of 1-D tiles of b tokens."""
    off = torch.clamp(torch.arange(-(-length // b) + 1) * b, max=length)
    return torch.arange(length), off


# ----------------------------------------------------------------------------- products on grids, 1-D tiles

#: longest grid axis whose dense 1-D mask (and, for the last axis, prefix table) ProductCounts builds
MAX_PRODUCT_AXIS = 4096
#: (query segment, key segment) pairs per chunk of ProductCounts (bounds its working memory)
PRODUCT_CHUNK = 1 << 21


def _axis_masks(pattern: ir.PatternIR, view: View, node: ir.Mask) -> list[torch.Tensor]:
    """The dense 1-D masks bool [1 or H, L, L] of a per-axis product `node` (an
    AXISWISE primitive or `P @ a`), one per grid axis (all-true where unconstrained)."""
    ev = Evaluator(pattern)
    if isinstance(node, ir.AXISWISE):
        ev.check(node, view)
        comps = {a: _component(node, i) for i, a in enumerate(view.axes)}
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
        masks = _axis_masks(self.pattern, self.view, node)
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


def _product_plan(pattern, M, N, heads, grid, bm, bn) -> Plan:
    """The exact plan of a per-axis product (or `heads { }` of products) on a grid
    with 1-D tiles, from ProductCounts (raises NotIntervals otherwise)."""
    full, nonempty, cnt = ProductCounts(pattern, M, N, heads, grid, bm, bn).classes(pattern.body)
    return Plan.from_flags(full, nonempty, M=M, N=N, heads=heads, block=(bm, bn),
                           allowed=int(cnt.sum()) * (heads // cnt.shape[0]), method="closed-form")


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
        return _classify_from_intervals(self.ia.coord_set(node, self.view, axis), L, self.tq[i], self.tk[i], torch.arange(L))

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
                return self.product({a: self.axis_classes(_component(node, i), a) for i, a in enumerate(self.pattern.layout.axes)})
            if isinstance(node, ir.Along):
                return self.product({node.axis: self.axis_classes(node.operand, node.axis)})
            if isinstance(node, ir.Full) or isinstance(node, ir.Empty):
                v = isinstance(node, ir.Full)
                t = torch.full((1, self.nq, self.nk), v, dtype=torch.bool)
                return t, t
        except NotIntervals:
            pass
        if isinstance(node, (ir.Union_, ir.Inter, ir.Diff, ir.Not, ir.Where, ir.Heads)):
            return self._combine(node)
        shape = (1, self.nq, self.nk)
        return torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)


@contextlib.contextmanager
def _one_thread():
    """[Note: threads] A plan is a few hundred small tensor ops (O(M) elements
    each). Intra-op parallelism only adds barrier waits there: on the 2-core CI
    machine under load one reduction took 7 ms with 2 threads and 0.05 ms with
    one, and a 64K plan 1.2 s instead of 35 ms. So the builder runs on one
    thread and restores the caller's setting."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def _interval_sets(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, inputs: dict | None = None) -> tuple[ISet, View]:
    """Every query's allowed keys in closed form (raises NotIntervals). `inputs`:
    one batch element's run-time inputs (segments with contiguous ids, block tables)."""
    if pattern.inputs and not inputs:
        raise NotIntervals("run-time inputs")
    require(8 * (M + N) * (3 + 2 * len(pattern.layout.axes)) + 64 * heads * M,
            f"the allowed keys of every query of '{pattern.name}' at M = {M}, N = {N}",
            "smaller sizes: empty rows and density show at small sizes too (attnc check --seq-len 4096)")
    view = top_view(pattern, M, N, heads, grid, inputs or {})
    return merge(IntervalAnalysis(pattern).eval(pattern.body, view)), view


@dataclass(frozen=True)
class RowReport:
    """What the analysis proves about query rows, without building the mask."""

    M: int
    N: int
    heads: int
    empty_rows: int  # (head, query) rows with no allowed key: output 0, lse -inf
    witness: tuple[int, int] | None  # (head, query row) of one empty row
    dense: bool  # every pair allowed: sparsity buys nothing
    allowed: int
    method: str  # "closed-form" | "exact-scan"


def row_report(pattern: ir.PatternIR, M: int, N: int, heads: int, grid) -> RowReport:
    """Empty rows (with a witness) and full density from the interval sets' counts;
    patterns without a closed form are scanned in row chunks."""
    with _one_thread():
        return _row_report(pattern, M, N, heads, grid)


def _row_report(pattern, M, N, heads, grid) -> RowReport:
    try:
        s, _ = _interval_sets(pattern, M, N, heads, grid)
        counts = s.count()  # [Hx, M]
        method = "closed-form"
    except NotIntervals:
        from .reference import evaluate
        from .tilestats import tile_stats
        _, counts = tile_stats(lambda lo, hi: evaluate(pattern, M, N, heads, grid, {}, rows=(lo, hi)), M, N, heads, (64, 64))
        method = "exact-scan"
    rep = heads // counts.shape[0]
    empty = (counts == 0).nonzero()
    witness = (int(empty[0, 0]), int(empty[0, 1])) if len(empty) else None
    allowed = int(counts.sum()) * rep
    return RowReport(M=M, N=N, heads=heads, empty_rows=len(empty) * rep, witness=witness,
                     dense=allowed == heads * M * N, allowed=allowed, method=method)


def plan_blocks(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, *, block: tuple[int, int],
                inputs: dict | None = None) -> Plan:
    """The tile plan of a bound pattern (sizes already validated). Patterns with
    run-time inputs are planned for one batch element's `inputs` in closed form
    (contiguous segments: O(N); block tables: O(M * kmax))."""
    with _one_thread():
        return _plan_blocks(pattern, M, N, heads, grid, block, inputs)


#: mask elements evaluated per call by tile_counts (bounds its working memory)
COUNT_CHUNK = 1 << 22


def _interval_tile_counts(pattern, M, N, heads, grid, state, qsz, ksz, block):
    """(counts, rows) of a 1-D pattern from its interval sets, no mask evaluated: a full tile
    counts its size; a partial tile (query tile a, key tile [b, e)) counts
    sum over its queries and their intervals [lo, hi) of |[lo, hi) & [b, e)|, computed for
    all partial tiles at once in chunks; rows are the sets' own counts. Raises NotIntervals."""
    s, _ = _interval_sets(pattern, M, N, heads, grid)  # [Hs, M, R], merged: disjoint intervals
    bm, bn = block
    Hs = s.lo.shape[0]
    Hx = max(Hs, state.shape[0])
    counts = _full_tile_counts((state == 2).expand(Hx, -1, -1), qsz, ksz, block)
    h, qt, kt = (state.expand(Hx, -1, -1) == 1).nonzero(as_tuple=True)
    R = s.lo.shape[-1]
    per = max(1, COUNT_CHUNK // (bm * R))
    for c0 in each(range(0, len(h), per), "counting pairs in partial tiles", unit="chunk"):
        hh, qq, kk = h[c0:c0 + per], qt[c0:c0 + per], kt[c0:c0 + per]
        q = qq[:, None] * bm + torch.arange(bm)[None, :]  # [P, bm]
        valid = q < M
        q = q.clamp(max=M - 1)
        hs = hh.clamp(max=Hs - 1)[:, None].expand_as(q)
        lo, hi = s.lo[hs, q], s.hi[hs, q]  # [P, bm, R]
        b = (kk * bn)[:, None, None]
        e = torch.clamp(b + bn, max=N)
        inside = (torch.minimum(hi, e) - torch.maximum(lo, b)).clamp(min=0) * valid[..., None]
        counts[hh, qq, kk] = inside.sum((1, 2)).to(counts.dtype)
    return counts, s.count()


def tile_counts(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, block: tuple[int, int]
                ) -> tuple[Plan, torch.Tensor, torch.Tensor]:
    """(plan, counts, rows): the plan of 1-D tiles `block`, the allowed pairs per tile int64
    [1 or H, nq, nk] and per query row [1 or H, M], exact, without dense mask rows.

    Full tiles count their size and empty tiles 0, from the plan; a per-axis product's
    partial tiles come from ProductCounts and its rows from the 1-D masks' row counts;
    otherwise the mask of each query tile's partial key tiles is evaluated, at most
    COUNT_CHUNK elements at a time. Work O(tiles + partial tiles' pairs), memory O(nq * nk)."""
    with _one_thread():
        plan = _plan_blocks(pattern, M, N, heads, grid, block)
        bm, bn = block
        nq, nk = plan.shape
        qsz, ksz = tile_lengths(M, bm), tile_lengths(N, bn)
        state = plan.to_dense()
        if isinstance(pattern.body, (*ir.AXISWISE, ir.Along)) and pattern.layout.axes and M == N:
            try:
                pc = ProductCounts(pattern, M, N, heads, grid, bm, bn)
                counts = pc.counts(pattern.body)
                masks = _axis_masks(pattern, pc.view, pattern.body)
                rows = torch.ones(1, M, dtype=torch.int64)
                for a, m in zip(pattern.layout.axes, masks):
                    rows = rows * m.sum(2)[:, pc.view.qc[a]]
                if pc.view.qin is not None:
                    rows = rows * pc.view.qin
                return plan, counts, rows
            except NotIntervals:
                pass
        if not pattern.layout.axes:
            try:
                return (plan, *_interval_tile_counts(pattern, M, N, heads, grid, state, qsz, ksz, block))
            except NotIntervals:
                pass
        full = state == 2
        partial = (state == 1).any(0)  # [nq, nk]: evaluated below for every head
        del state
        counts = _full_tile_counts(full, qsz, ksz, block)
        # per query row, the keys of its tile row's full tiles (rows with partial tiles add theirs below)
        per_tile_row = torch.zeros(full.shape[0], nq, dtype=torch.int64)
        step = max(1, COUNT_CHUNK // max(1, nk))
        for r0 in range(0, nq, step):
            sure = full[:, r0:r0 + step] & ~partial[None, r0:r0 + step]
            per_tile_row[:, r0:r0 + step] = (sure.to(torch.int64) * ksz).sum(-1)
        rows = torch.repeat_interleave(per_tile_row, qsz, dim=1)  # [Hx, M]
        del full, per_tile_row
        kstart = torch.arange(nk) * bn
        for qt in each(partial.any(1).nonzero().flatten().tolist(), "counting pairs in partial tiles", unit="tile row"):
            q0 = qt * bm
            queries = torch.arange(q0, q0 + int(qsz[qt]))
            cols = partial[qt].nonzero().flatten()
            per = max(1, COUNT_CHUNK // (heads * bm * bn))
            for c0 in range(0, len(cols), per):
                cc = cols[c0:c0 + per]
                keys = torch.cat([torch.arange(int(kstart[c]), int(kstart[c]) + int(ksz[c])) for c in cc.tolist()])
                local = torch.repeat_interleave(torch.arange(len(cc)), ksz[cc])
                per_tile, per_row = _evaluated_counts(pattern, M, N, heads, grid, queries, keys, local, len(cc))
                if per_tile.shape[0] > counts.shape[0]:  # heads differ inside partial tiles: widen
                    counts, rows = counts.expand(heads, -1, -1).clone(), rows.expand(heads, -1).clone()
                counts[:, qt, cc] = per_tile.to(counts.dtype)
                rows[:, q0:q0 + len(queries)] += per_row
        return plan, counts, rows


def _plan_nd(pattern, M, N, heads, grid, tq, tk) -> Plan:
    """The plan of N-D tiles on a grid, in tile-major token order."""
    sizes = [int(g) for g in grid]
    nq = math.prod(-(-L // t) for L, t in zip(sizes, tq))
    nk = math.prod(-(-L // t) for L, t in zip(sizes, tk))
    _require_boxes(pattern, M + 4 * N, N + 4 * N, heads, nq, nk, "the N-D tile plan")  # + tile_major's coordinates
    boxes = NDTileBoxes(pattern, N, heads, grid, tq, tk)
    full, nonempty = boxes.classify(pattern.body)
    order_q, off_q = tile_major(sizes, tq)
    order_k, off_k = tile_major(sizes, tk)
    allowed = None
    if isinstance(pattern.body, (*ir.AXISWISE, ir.Along)):
        # a product's box classes are exact; the flat interval sets count the pairs
        try:
            s, _ = _interval_sets(pattern, M, N, heads, grid)
            allowed = int(s.count().sum()) * (heads // s.lo.shape[0])
        except NotIntervals:
            try:  # per head, the product of the 1-D masks' counts ([Note: product counts])
                per_axis = [m.sum((1, 2)) for m in _axis_masks(pattern, boxes.view, pattern.body)]
                allowed = int(functools.reduce(torch.mul, per_axis).expand(heads).sum())
            except NotIntervals:
                pass
    evaluated = 0
    if allowed is None:
        evaluated = int((nonempty & ~full).sum())
        full, nonempty, allowed = _refine(pattern, M, N, heads, grid, order_q, off_q, order_k, off_k, full, nonempty)
    return Plan.from_flags(
        full, nonempty, M=M, N=N, heads=heads, block=(math.prod(tq), math.prod(tk)),
        allowed=allowed, method="closed-form" if evaluated == 0 else "tile-boxes", tiles_evaluated=evaluated,
        tile_shape=(tuple(tq), tuple(tk)), perm_q=order_q, perm_k=order_k, offsets_q=off_q, offsets_k=off_k,
    )


# ----------------------------------------------------------------------------- heads with equal arms


def _mentions_head(p) -> bool:
    """Whether a `where` predicate reads `h`."""
    if isinstance(p, ir.PVar):
        return p.name == "h"
    kids = (v for f in dataclasses.fields(p) for v in (getattr(p, f.name) if isinstance(getattr(p, f.name), tuple)
                                                        else (getattr(p, f.name),)))
    return any(_mentions_head(k) for k in kids if isinstance(k, ir.PNode))


def head_classes(pattern: ir.PatternIR, M: int, N: int, heads: int, grid) -> list | None:
    """[(heads, head-free pattern)]: the heads grouped by the arms of `heads { }` they take,
    each group with the pattern its heads see (every `heads { }` node replaced by the chosen
    arm), so per-head work runs once per group ("per-head patterns share work across heads
    with identical arms"). None when there is nothing to share: no `heads { }` node, one group
    per head, or a head dependence elsewhere (a `where` over h, run-time inputs, routing)."""
    from .ir import transform

    every = list(ir.walk(pattern.body))
    nodes = [n for n in every if isinstance(n, ir.Heads)]
    if not nodes or pattern.inputs or heads < 2:
        return None
    if any(isinstance(n, (ir.Routed, ir.TopK, ir.Same)) or (isinstance(n, ir.Where) and _mentions_head(n.pred))
           for n in every):
        return None
    ev = Evaluator(pattern)
    view = top_view(pattern, M, N, heads, grid, {}, rows=(0, min(1, M)), keys=torch.zeros(0, dtype=torch.int64))
    choice = torch.full((len(nodes), heads), -1, dtype=torch.int64)
    for i, n in enumerate(nodes):
        for sel, arm in ev.head_arms(n, view):
            choice[i, sel] = n.arms.index(arm)
    groups: dict = {}
    for h in range(heads):
        groups.setdefault(tuple(choice[:, h].tolist()), []).append(h)
    if len(groups) == heads:
        return None

    def arm_of(h: int):  # every `heads { }` node (arms already rebuilt) -> the body head h takes
        return lambda n: next(a.body for sel, a in ev.head_arms(n, view) if sel[h]) if isinstance(n, ir.Heads) else None

    return [(hs, dataclasses.replace(pattern, body=transform(pattern.body, arm_of(hs[0])))) for hs in groups.values()]


def _stack_lists(lists: list, index: list[int]) -> TileList:
    """One TileList of `len(index)` heads: head h is `lists[index[h]]` (each of one head)."""
    counts = torch.cat([lists[i].counts for i in index])
    cols = torch.cat([lists[i].cols for i in index])
    return TileList(counts.to(torch.int32), cols.to(torch.int32))


def _plan_by_head_class(pattern, M, N, heads, grid, block) -> Plan | None:
    """The plan of a per-head pattern from one plan per group of heads with equal arms."""
    classes = head_classes(pattern, M, N, heads, grid)
    if classes is None:
        return None
    plans = [_plan_blocks(p, M, N, heads, grid, block) for _, p in classes]
    if any(p.full.counts.shape[0] != 1 for p in plans):  # a group still differs per head
        return None
    index = [0] * heads
    for c, (hs, _) in enumerate(classes):
        for h in hs:
            index[h] = c
    lists = {name: _stack_lists([getattr(p, name) for p in plans], index)
             for name in ("full", "partial", "full_t", "partial_t")}
    allowed = sum(p.allowed // heads * len(hs) for p, (hs, _) in zip(plans, classes))
    methods = sorted({p.method for p in plans})
    return Plan(M=M, N=N, heads=heads, block=block, allowed=allowed, method=" + ".join(methods),
                tiles_evaluated=sum(p.tiles_evaluated for p in plans), **lists)


def _plan_blocks(pattern, M, N, heads, grid, block, inputs=None) -> Plan:
    if isinstance(block[0], tuple):
        if inputs:
            raise ValueError("block: N-D tiles are not supported with run-time inputs; try 1-D tiles like (128, 128)")
        return _plan_nd(pattern, M, N, heads, grid, *block)
    bm, bn = block
    if not inputs:
        shared = _plan_by_head_class(pattern, M, N, heads, grid, block)
        if shared is not None:
            return shared
    try:
        return _closed_form_plan(pattern, M, N, heads, grid, bm, bn, inputs)
    except NotIntervals as exc:
        if inputs:  # the tile boxes and _refine know no run-time inputs
            raise ValueError(f"cannot plan pattern '{pattern.name}' from its run-time inputs in closed form ({exc}); "
                             f"the op scans such inputs itself") from None
    _require_boxes(pattern, M, N, heads, -(-M // bm), -(-N // bn), "the tile plan")
    try:
        return _product_plan(pattern, M, N, heads, grid, bm, bn)
    except NotIntervals:
        pass
    boxes = TileBoxes(pattern, M, N, heads, grid, bm, bn)
    full, nonempty = boxes.classify(pattern.body)
    evaluated = int((nonempty & ~full).sum())
    full, nonempty, allowed = _refine(pattern, M, N, heads, grid, *_uniform(M, bm), *_uniform(N, bn), full, nonempty)
    return Plan.from_flags(full, nonempty, M=M, N=N, heads=heads, block=(bm, bn), allowed=allowed, method="tile-boxes",
                           tiles_evaluated=evaluated)
