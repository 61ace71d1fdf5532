"""Interval sets: every query's allowed keys as a short union of disjoint key intervals, and their algebra.

input:  lo / hi tensors of key intervals per (head, query).
output: `ISet` and its set algebra (`merge`, `union`, `intersect`, `complement`, `fold` of grid
        rows, `INTERVAL_SETS` for the boolean combinators), the limits on intervals per query
        (`MAX_INTERVALS`, `max_intervals`) and `NotIntervals` / `TooManyIntervals`.
does not: evaluate patterns (intervals.IntervalAnalysis does, into these sets) or classify
        tiles (interval_tiles.py); periodic slots are periodic.py's.

See [Note: interval sets] in intervals.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import semantics


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


def halving_chunks(M: int, bm: int, chunk: int, fn):
    """(q0, end, fn(q0, end)) over whole query tiles of `bm`, `chunk` queries at a time; a chunk
    where `fn` raises TooManyIntervals is halved and tried again (down to one query tile, which
    raises it on): fewer queries at once keep more intervals each."""
    step = bm * max(1, chunk // bm)
    q0 = 0
    while q0 < M:
        end = min(q0 + step, M)
        try:
            out = fn(q0, end)
        except TooManyIntervals:
            if step <= bm:
                raise
            step = bm * max(1, step // bm // 2)
            continue
        yield q0, end, out
        q0 = end


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


def broadcast(a: ISet, b: ISet) -> tuple[ISet, ISet]:
    h = max(a.lo.shape[0], b.lo.shape[0])
    ea = ISet(a.lo.expand(h, -1, -1), a.hi.expand(h, -1, -1), a.n, a.merged)
    eb = ISet(b.lo.expand(h, -1, -1), b.hi.expand(h, -1, -1), b.n, b.merged)
    return ea, eb


def merge(s: ISet) -> ISet:
    """Sort and merge overlapping or adjacent intervals; drop all-empty slots."""
    if not isinstance(s, ISet) or s.merged:  # a periodic set (periodic.PSet) is kept merged
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
    a, b = broadcast(a, b)
    if a.lo.shape[-1] == 1 and b.lo.shape[-1] == 1:
        return _merge_pair(a.lo[..., 0], a.hi[..., 0], b.lo[..., 0], b.hi[..., 0], a.n)
    if b.lo.shape[-1] == 1 and a.merged:
        return _union_one(a, b)
    if a.lo.shape[-1] == 1 and b.merged:
        return _union_one(b, a)
    return merge(ISet(torch.cat([a.lo, b.lo], -1), torch.cat([a.hi, b.hi], -1), a.n))


def intersect(a: ISet, b: ISet) -> ISet:
    a, b = broadcast(a, b)
    if b.lo.shape[-1] == 1 and a.merged and a.lo.shape[-1] > 1:
        return _intersect_one(a, b)
    if a.lo.shape[-1] == 1 and b.merged and b.lo.shape[-1] > 1:
        return _intersect_one(b, a)
    lo = torch.maximum(a.lo[..., :, None], b.lo[..., None, :]).flatten(-2)
    hi = torch.minimum(a.hi[..., :, None], b.hi[..., None, :]).flatten(-2)
    return merge(ISet.make(lo, hi, a.n))


# [Note: one interval] A merged set's intervals are sorted and disjoint, so those that meet
# one interval [l, h) form a contiguous range of slots [i0, i1): intersecting with it clips
# that range and shifts it to the front; a union replaces it by one interval (or inserts
# [l, h) at i0). Both are gathers, O(slots) per query with no sort: a routed set of 200 blocks
# `| sliding(w)` or `& causal` (nsa_like) sorted 200 intervals per query before.


def _shift(t: torch.Tensor, src: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    return torch.gather(t, -1, src.clamp(0, t.shape[-1] - 1)).masked_fill_(~keep, n)


def _trim(lo: torch.Tensor, hi: torch.Tensor, n: int) -> ISet:
    used = max(int((lo < n).sum(-1).max()) if lo.numel() else 0, 1)
    if used > max_intervals(lo.shape[1], lo.shape[0]):
        raise TooManyIntervals(f"more than {max_intervals(lo.shape[1], lo.shape[0])} intervals per query")
    return ISet(lo[..., :used].contiguous(), hi[..., :used].contiguous(), n, merged=True)


def _intersect_one(a: ISet, b: ISet) -> ISet:
    """a & b of a merged set `a` and one interval per query `b` ([Note: one interval])."""
    n = a.n
    l, h = b.lo, b.hi  # [Hx, Mq, 1]
    lo, hi = torch.maximum(a.lo, l), torch.minimum(a.hi, h)
    i0 = (a.hi <= l).sum(-1, keepdim=True)  # slots wholly before [l, h): the first ones
    j = torch.arange(a.lo.shape[-1]).expand_as(lo)
    src = j + i0
    keep = src < a.lo.shape[-1]
    lo, hi = _shift(lo, src, keep, n), _shift(hi, src, keep, n)
    empty = hi <= lo
    return _trim(lo.masked_fill_(empty, n), hi.masked_fill_(empty, n), n)


def _union_one(a: ISet, b: ISet) -> ISet:
    """a | b of a merged set `a` and one interval per query `b` ([Note: one interval])."""
    n = a.n
    l, h = b.lo, b.hi  # [Hx, Mq, 1]; empty: (n, n)
    real = a.lo < n
    i0 = (real & (a.hi < l)).sum(-1, keepdim=True)  # wholly before, not touching
    i1 = (real & (a.lo <= h)).sum(-1, keepdim=True)  # starting at or before its end
    meet = i1 > i0
    first = torch.gather(a.lo, -1, i0.clamp(max=a.lo.shape[-1] - 1))
    last = torch.gather(a.hi, -1, (i1 - 1).clamp(min=0))
    m_lo = torch.where(meet, torch.minimum(l, first), l)
    m_hi = torch.where(meet, torch.maximum(h, last), h)
    R = a.lo.shape[-1]
    j = torch.arange(R + 1).expand(*a.lo.shape[:-1], R + 1)
    src = torch.where(j < i0, j, j - 1 + (i1 - i0))
    keep = src < R
    lo = _shift(a.lo, src, keep, n)
    hi = _shift(a.hi, src, keep, n)
    at = j == i0
    b_real = l < n
    lo = torch.where(at & b_real, m_lo, lo)
    hi = torch.where(at & b_real, m_hi, hi)
    # an empty b: a unchanged (its slot i0 would be an empty hole)
    lo = torch.where(b_real, lo, torch.cat([a.lo, torch.full_like(a.lo[..., :1], n)], -1))
    hi = torch.where(b_real, hi, torch.cat([a.hi, torch.full_like(a.hi[..., :1], n)], -1))
    return _trim(lo, hi, n)


def complement(a: ISet) -> ISet:
    a = merge(a)
    zero = torch.zeros_like(a.lo[..., :1])
    end = torch.full_like(a.lo[..., :1], a.n)
    real_hi = torch.where(a.lo < a.n, a.hi, a.n)
    lo = torch.cat([zero, real_hi], -1)
    hi = torch.cat([a.lo, end], -1)
    return merge(ISet.make(lo, hi, a.n))


def fold(A: ISet, F: ISet, S: int) -> ISet:
    """The set {c * S + f : c in A, f in F} over A.n * S positions (A, F merged)."""
    A, F = broadcast(A, F)
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


#: interval sets for the boolean combinators ([Note: combinators] in semantics.py)
INTERVAL_SETS = semantics.Algebra(union=semantics.folding(union), intersect=semantics.folding(intersect),
                                  complement=complement)
