"""Periodic interval sets: stepped progressions kept as one slot each, never one interval per key.

input:  interval sets (interval_sets.ISet) and stepped progressions of the interval analysis
        (`IntervalAnalysis(pattern, periodic=True)`: strided keys, dilation, `where k % m ...`,
        grid columns `where q.a == k.a` or `P @ a` across long outer axes).
output: `PSet`, a merged interval set plus *periodic slots*, and its set algebra
        (`union`, `intersect`, `complement`, `take`); `periodic_tiles`, the non-empty tiles of
        whole query tiles with their full flags and exact pair counts (what `show` counts);
        `periodic_runs`, the same tiles as runs of full and of partial tiles (what plans take,
        like interval_tiles.tile_runs).
does not: decide sets that fall outside the forms below (it raises `NotPeriodic`, and the
        plan builder retries with the interval-only analysis).

[Note: periodic sets] A periodic slot of a query is the keys

    k in [lo, hi) with (k - o) mod p < w           (o, lo, hi per query; p, w per slot)

i.e. runs of w keys every p keys, cut to [lo, hi): a progression of step s is (o = first, p = s,
w = 1); `k % l >= l - c` is (o = l - c, p = l, w = c); a grid column (every row's key at q's
column) is (o = column, p = row length, w = 1). An ordinary interval is p = w = 1. A `PSet`
is an ISet of intervals plus slots, all pairwise disjoint per query, so counts add. Its
keys in [lo, x) number F(x) - F(lo), F(x) = floor((x - o) / p) * w + min((x - o) mod p, w):
O(1) per query and slot. The algebra keeps disjointness: a union subtracts the merged
intervals from the slots (a slot cut to each gap), an intersection takes the pairwise
pieces (a slot cut to an interval; two slots of width 1 by the Chinese remainder theorem,
or a width-1 slot whose step the other's divides, kept or dropped per query), a complement
of one slot is its complementary runs (o + w, p, p - w) plus the outside of [lo, hi).

Tiles ([Note: periodic tiles]): the allowed pairs of a query tile in keys [0, x),
S(x) = sum over its queries q of F_q(clip(x, lo_q, hi_q)) - F_q(lo_q), give every tile's
exact count as S(e) - S(b), hence its class (full: the count is the tile's size; non-empty:
above 0). Where x lies inside every query's [lo_q, hi_q), S(x) depends on the queries only
through the residues r_q = o_q mod p: with the residues sorted and prefix-summed it is a few
binary searches, O(log bm) per (query tile, key-tile boundary) and no per-key work. Only
boundaries where some queries' ends fall (a few per query tile and slot) sum over the
tile's queries directly. Cost O(query tiles * candidate key tiles * slots * log bm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import interval_sets
from .interval_sets import ISet, NotIntervals, complement as iv_complement, intersect as iv_intersect, \
    merge, union as iv_union
from . import semantics
from .limits import require


class NotPeriodic(NotIntervals):
    """A set the periodic algebra does not represent (the interval-only analysis takes over)."""


@dataclass(frozen=True)
class PSet:
    iv: ISet  # merged intervals, disjoint from every slot
    o: torch.Tensor  # int64 [Hx, Mq, P]
    lo: torch.Tensor
    hi: torch.Tensor
    step: tuple  # P ints >= 1
    width: tuple  # P ints, 1 <= w <= p
    n: int

    def count(self) -> torch.Tensor:
        """Allowed keys per query: int64 [Hx, Mq]."""
        p, w = _pw(self)
        c = (_F(self.hi, self.o, p, w) - _F(self.lo, self.o, p, w)).clamp(min=0) * (self.hi > self.lo)
        iv, c = _broadcast_t(self.iv.count(), c.sum(-1))
        return iv + c

    @property
    def heads(self) -> int:
        return max(self.iv.lo.shape[0], self.o.shape[0])


def _broadcast_t(a: torch.Tensor, b: torch.Tensor):
    h = max(a.shape[0], b.shape[0])
    return a.expand(h, *a.shape[1:]), b.expand(h, *b.shape[1:])


def _pw(s: PSet):
    return (torch.tensor(s.step, dtype=torch.int64), torch.tensor(s.width, dtype=torch.int64))


def _F(x, o, p, w):
    """Keys of the runs (o mod p, width w) below x, up to a per-query constant (floor semantics)."""
    d = x - o
    return torch.div(d, p, rounding_mode="floor") * w + torch.minimum(torch.remainder(d, p), w)


def _mq(s) -> int:
    return (s.iv if isinstance(s, PSet) else s).lo.shape[1]


def as_pset(s) -> PSet:
    if isinstance(s, PSet):
        return s
    z = torch.zeros(s.lo.shape[0], s.lo.shape[1], 0, dtype=torch.int64)
    return PSet(merge(s), z, z, z, (), (), s.n)


def make(iv: ISet, o, lo, hi, step, width, n: int):
    """A PSet (or its ISet when no slot keeps a key): slots clipped to [0, n), all-empty ones dropped."""
    if len(step) == 0:
        return merge(iv)
    iv = merge(iv)
    lo, hi = lo.clamp(0, n), hi.clamp(0, n)
    # a slot whose runs fill their period is an interval
    keep = (hi > lo).flatten(0, 1).any(0)
    idx = [i for i in range(len(step)) if bool(keep[i])]
    if not idx:
        return iv
    sel = torch.tensor(idx, dtype=torch.int64)
    o, lo, hi = o[..., sel], lo[..., sel], hi[..., sel]
    step, width = tuple(step[i] for i in idx), tuple(width[i] for i in idx)
    if len(step) > interval_sets.MAX_INTERVALS:
        raise NotPeriodic(f"{len(step)} periodic slots per query")
    full_run = [i for i in range(len(step)) if width[i] >= step[i]]
    if full_run:  # runs that fill their period: plain intervals
        fr = torch.tensor(full_run, dtype=torch.int64)
        iv = iv_union(iv, ISet.make(lo[..., fr], hi[..., fr], n))
        rest = [i for i in range(len(step)) if i not in full_run]
        if not rest:
            return merge(iv)
        r = torch.tensor(rest, dtype=torch.int64)
        return PSet(merge(iv), o[..., r], lo[..., r], hi[..., r], tuple(step[i] for i in rest),
                    tuple(width[i] for i in rest), n)
    return PSet(iv, o, lo, hi, step, width, n)


def slot(o, lo, hi, p: int, w: int, n: int):
    """One periodic slot per query ([Hx, Mq] or [Mq] tensors) as a set."""
    while o.dim() < 2:
        o, lo, hi = o[None], lo[None], hi[None]
    lo, hi = torch.broadcast_tensors(lo, hi)
    o = o.expand_as(lo)
    z = torch.full((*lo.shape, 1), n, dtype=torch.int64)
    return make(ISet(z, z.clone(), n, merged=True), o[..., None], lo[..., None], hi[..., None], (p,), (w,), n)


def _bcast(a: PSet, b: PSet):
    h = max(a.heads, b.heads)

    def ex(s: PSet) -> PSet:
        iv = ISet(s.iv.lo.expand(h, -1, -1), s.iv.hi.expand(h, -1, -1), s.n, s.iv.merged)
        return PSet(iv, s.o.expand(h, -1, -1), s.lo.expand(h, -1, -1), s.hi.expand(h, -1, -1), s.step, s.width, s.n)
    return ex(a), ex(b)


def _cut(s: PSet, ivs: ISet):
    """Every slot of s cut to every interval of ivs: (o, lo, hi, step, width), P * R columns."""
    P, R = len(s.step), ivs.lo.shape[-1]
    h = max(s.o.shape[0], ivs.lo.shape[0])
    a_lo, a_hi = ivs.lo.expand(h, -1, -1), ivs.hi.expand(h, -1, -1)
    real = a_lo < a_hi
    lo = torch.maximum(s.lo.expand(h, -1, -1)[..., :, None], a_lo[..., None, :])
    hi = torch.minimum(s.hi.expand(h, -1, -1)[..., :, None], torch.where(real, a_hi, a_lo)[..., None, :])
    o = s.o.expand(h, -1, -1)[..., :, None].expand(-1, -1, P, R)
    return o.flatten(-2), lo.flatten(-2), hi.flatten(-2), tuple(x for x in s.step for _ in range(R)), \
        tuple(x for x in s.width for _ in range(R))


def _cat(pieces, h, mq, n):
    if not pieces:
        z = torch.zeros(h, mq, 0, dtype=torch.int64)
        return z, z, z, (), ()
    o = torch.cat([p[0].expand(h, mq, -1) for p in pieces], -1)
    lo = torch.cat([p[1].expand(h, mq, -1) for p in pieces], -1)
    hi = torch.cat([p[2].expand(h, mq, -1) for p in pieces], -1)
    return o, lo, hi, sum((p[3] for p in pieces), ()), sum((p[4] for p in pieces), ())


def union(a, b):
    if not isinstance(a, PSet) and not isinstance(b, PSet):
        return iv_union(a, b)
    a, b = _bcast(as_pset(a), as_pset(b))
    if a.step and b.step:
        raise NotPeriodic("a union of two stepped sets")
    s = a if a.step else b
    iv = iv_union(a.iv, b.iv)
    o, lo, hi, st, wd = _cut(s, iv_complement(iv))  # the slots minus the intervals: in the gaps
    return make(iv, o, lo, hi, st, wd, a.n)


def _crt(s: PSet, i: int, t: PSet, j: int):
    """Slot i of s and slot j of t, both of width 1 (or one's step dividing the other's of width 1)."""
    p1, w1, p2, w2 = s.step[i], s.width[i], t.step[j], t.width[j]
    o1, o2 = s.o[..., i], t.o[..., j]
    lo, hi = torch.maximum(s.lo[..., i], t.lo[..., j]), torch.minimum(s.hi[..., i], t.hi[..., j])
    if w2 == 1 and p2 % p1 == 0:  # t's keys share one residue mod p1: all in s's runs or none
        inside = torch.remainder(o2 - o1, p1) < w1
        return o2, lo, torch.where(inside, hi, lo), p2, 1
    if w1 == 1 and p1 % p2 == 0:
        inside = torch.remainder(o1 - o2, p2) < w2
        return o1, lo, torch.where(inside, hi, lo), p1, 1
    if w1 != 1 or w2 != 1:
        raise NotPeriodic("an intersection of two stepped sets with runs wider than one key")
    g = math.gcd(p1, p2)
    L = p1 // g * p2
    a, b = p1 // g, p2 // g
    inv = pow(a, -1, b) if b > 1 else 0
    d = o2 - o1
    ok = torch.remainder(d, g) == 0
    tt = torch.remainder(torch.div(d, g, rounding_mode="floor") * inv, b)
    return o1 + p1 * tt, lo, torch.where(ok, hi, lo), L, 1


def intersect(a, b):
    if not isinstance(a, PSet) and not isinstance(b, PSet):
        return iv_intersect(a, b)
    a, b = _bcast(as_pset(a), as_pset(b))
    h, mq = a.heads, _mq(a)
    iv = iv_intersect(a.iv, b.iv)
    pieces = []
    if a.step:
        pieces.append(_cut(a, b.iv))
    if b.step:
        pieces.append(_cut(b, a.iv))
    for i in range(len(a.step)):
        for j in range(len(b.step)):
            o, lo, hi, p, w = _crt(a, i, b, j)
            pieces.append((o[..., None], lo[..., None], hi[..., None], (p,), (w,)))
    return make(iv, *_cat(pieces, h, mq, a.n), a.n)


def complement(a):
    if not isinstance(a, PSet):
        return iv_complement(a)
    if len(a.step) != 1:
        raise NotPeriodic("the complement of several stepped sets")
    n = a.n
    lo, hi = a.lo[..., 0], a.hi[..., 0]
    p, w = a.step[0], a.width[0]
    outside = ISet.make(torch.stack([torch.zeros_like(lo), hi], -1), torch.stack([lo, torch.full_like(hi, n)], -1), n)
    c = make(outside, (a.o + w), a.lo, a.hi, (p,), (p - w,), n) if p > w else merge(outside)
    return intersect(iv_complement(a.iv), c)


#: interval sets with periodic slots for the boolean combinators ([Note: combinators] in
#: semantics.py); the interval analysis uses them with `periodic=True`
PERIODIC_SETS = semantics.Algebra(union=semantics.folding(union), intersect=semantics.folding(intersect),
                                  complement=complement)


def take(s, idx: torch.Tensor):
    """The sets of queries `idx` (a gather along the query axis)."""
    if not isinstance(s, PSet):
        return ISet(s.lo[:, idx], s.hi[:, idx], s.n, s.merged)
    iv = ISet(s.iv.lo[:, idx], s.iv.hi[:, idx], s.n, s.iv.merged)
    return PSet(iv, s.o[:, idx], s.lo[:, idx], s.hi[:, idx], s.step, s.width, s.n)


def shift(s: PSet, by: int, n: int, out: torch.Tensor | None = None) -> PSet:
    """Every key moved by `by` into a key space of length n (a grid after `by` text tokens);
    queries where `out` [Mq] holds get none."""
    def mv(lo, hi):
        real = lo < hi
        lo, hi = torch.where(real, lo + by, n), torch.where(real, hi + by, n)
        if out is not None:
            m = out.view(1, -1, 1)
            lo, hi = lo.masked_fill(m, n), hi.masked_fill(m, n)
        return lo, hi
    iv = ISet.make(*mv(s.iv.lo, s.iv.hi), n)
    return make(iv, s.o + by, *mv(s.lo, s.hi), s.step, s.width, n)


def scale(s, S: int, n: int):
    """{c * S + f : c in s, f in [0, S)} over n = s.n * S positions."""
    if not isinstance(s, PSet):
        return merge(ISet.make(s.lo * S, s.hi * S, n))
    iv = ISet.make(s.iv.lo * S, s.iv.hi * S, n)
    return make(iv, s.o * S, s.lo * S, s.hi * S, tuple(p * S for p in s.step), tuple(w * S for w in s.width), n)


def expand(s: PSet, limit: int) -> ISet:
    """The keys of a PSet's slots listed as intervals (runs), when at most `limit` per query."""
    if not isinstance(s, PSet):
        return s
    los, his = [s.iv.lo], [s.iv.hi]
    h = s.heads
    for i, (p, w) in enumerate(zip(s.step, s.width)):
        o, lo, hi = s.o[..., i], s.lo[..., i], s.hi[..., i]
        start = o + torch.div(lo - o, p, rounding_mode="floor") * p  # the run at or before lo
        runs = int(((hi - start + p - 1) // p).clamp(min=0).max()) if hi.numel() else 0
        if runs > limit:
            raise NotPeriodic(f"{runs} runs of a stepped set per query")
        r = start[..., None] + p * torch.arange(runs, dtype=torch.int64)
        a, b = torch.maximum(r, lo[..., None]), torch.minimum(r + w, hi[..., None])
        los.append(torch.where(b > a, a, s.n).expand(h, -1, -1))
        his.append(torch.where(b > a, b, s.n).expand(h, -1, -1))
    lo = torch.cat([x.expand(h, -1, -1) for x in los], -1)
    hi = torch.cat([x.expand(h, -1, -1) for x in his], -1)
    return merge(ISet.make(lo, hi, s.n))


# ----------------------------------------------------------------------------- tiles


def _np(t: torch.Tensor, h: int) -> np.ndarray:
    return t.expand(h, *t.shape[1:]).reshape(-1).numpy().astype(np.int64)


#: (query tile, boundary) pairs whose queries are summed directly per batch (bounds the memory)
DIRECT_CHUNK = 1 << 14


@dataclass
class _Columns:
    """What `periodic_tiles` / `periodic_runs` share: every column (an interval slot or a periodic
    slot) flat over (head, query), its per-row extremes, and the candidate key tiles [J0, J1)."""

    N: int
    bm: int
    bn: int
    nq: int
    nk: int
    rows: int
    qrow: np.ndarray
    qlen: np.ndarray
    qstart: np.ndarray
    cols: list
    stats: list
    J0: np.ndarray
    J1: np.ndarray
    allowed: int


def _columns(s: PSet, bm: int, bn: int) -> _Columns:
    N = s.n
    H, Mq = s.heads, _mq(s)
    nq, nk = -(-Mq // bm), -(-N // bn)
    rows = H * nq
    qrow = (np.arange(H)[:, None] * nq + np.arange(Mq)[None, :] // bm).reshape(-1)  # row of each (head, query)
    qlen = np.minimum(bm, Mq - (np.arange(rows) % nq) * bm)
    cols = []  # (o, lo, hi, p, w) per column, flat [H * Mq]
    R = s.iv.lo.shape[-1]
    for r in range(R):
        lo, hi = _np(s.iv.lo[..., r], H), _np(s.iv.hi[..., r], H)
        cols.append((np.zeros_like(lo), lo, hi, 1, 1))
    for i, (p, w) in enumerate(zip(s.step, s.width)):
        cols.append((_np(s.o[..., i], H), _np(s.lo[..., i], H), _np(s.hi[..., i], H), p, w))
    BIG = np.int64(1) << 62
    # candidate key tiles per row: [J0, J1) over every column's touched range
    J0 = np.full(rows, nk, dtype=np.int64)
    J1 = np.zeros(rows, dtype=np.int64)
    stats = []
    allowed = 0
    for o, lo, hi, p, w in cols:
        real = lo < hi
        F = lambda x: (x - o) // p * w + np.minimum((x - o) % p, w)  # noqa: E731
        per_q = np.where(real, F(hi) - F(lo), 0)
        allowed += int(per_q.sum())
        mn_lo = np.full(rows, BIG)
        np.minimum.at(mn_lo, qrow[real], lo[real])
        mx_lo = np.full(rows, -BIG)
        np.maximum.at(mx_lo, qrow[real], lo[real])
        mn_hi = np.full(rows, BIG)
        np.minimum.at(mn_hi, qrow[real], hi[real])
        mx_hi = np.full(rows, -BIG)
        np.maximum.at(mx_hi, qrow[real], hi[real])
        any_real = mx_hi > -BIG
        J0 = np.where(any_real, np.minimum(J0, mn_lo // bn), J0)
        J1 = np.where(any_real, np.maximum(J1, (mx_hi - 1) // bn + 1), J1)
        total = np.bincount(qrow, weights=per_q, minlength=rows).astype(np.int64)
        stats.append((mn_lo, mx_lo, mn_hi, mx_hi, total, real))
    qstart = np.searchsorted(qrow, np.arange(rows))  # queries of a row: [qstart, qstart + qlen)
    return _Columns(N, bm, bn, nq, nk, rows, qrow, qlen, qstart, cols, stats, J0, J1, allowed)


def _sums(c: _Columns, xrow: np.ndarray, x: np.ndarray) -> np.ndarray:
    """S(x) of row xrow ([Note: periodic tiles]): the allowed pairs of the row's queries in keys [0, x)."""
    bm = c.bm
    S = np.zeros(len(x), dtype=np.int64)
    for (o, lo, hi, p, w), (mn_lo, mx_lo, mn_hi, mx_hi, total, real) in zip(c.cols, c.stats):
        a_lo, b_lo, a_hi, b_hi = mn_lo[xrow], mx_lo[xrow], mn_hi[xrow], mx_hi[xrow]
        S += np.where(x >= b_hi, total[xrow], 0)
        pure = (x >= b_lo) & (x <= a_hi) & (x < b_hi)
        mixed = (x > a_lo) & ~pure & (x < b_hi)
        if pure.any():
            S[pure] += _pure_sums(o, lo, p, w, real, c.qrow, c.rows, xrow[pure], x[pure])
        idx = np.flatnonzero(mixed)
        for c0 in range(0, len(idx), DIRECT_CHUNK):
            ii = idx[c0:c0 + DIRECT_CHUNK]
            r = xrow[ii]
            q = c.qstart[r][:, None] + np.arange(bm)[None, :]
            ok = np.arange(bm)[None, :] < c.qlen[r][:, None]
            q = np.minimum(q, len(c.qrow) - 1)
            qo, ql, qh = o[q], lo[q], hi[q]
            xc = np.clip(x[ii][:, None], ql, np.maximum(qh, ql))
            F = lambda v: (v - qo) // p * w + np.minimum((v - qo) % p, w)  # noqa: E731
            S[ii] += np.where(ok & (ql < qh), F(xc) - F(ql), 0).sum(1)
    return S


def periodic_tiles(s: PSet, bm: int, bn: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(keys, full, allowed, counts): the sorted keys (h * nq + query tile) * nk + key tile of
    the non-empty tiles, their full flags, the allowed triples, and the exact allowed pairs of
    every listed tile ([Note: periodic tiles]). O(candidate tiles): what counts every tile
    (`show`) uses; plans take `periodic_runs`."""
    c = _columns(s, bm, bn)
    N, nk = c.N, c.nk
    nb = np.maximum(c.J1 - c.J0, 0)
    require(PLAN_BYTES * int(nb.sum()), f"the tile plan of {_mq(s)} queries x {N} keys with {bm}x{bn} tiles (stepped keys)",
            "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
    # boundaries x = J0 * bn, ..., J1 * bn per row (clipped to N)
    nx = np.where(nb > 0, nb + 1, 0)
    xrow = np.repeat(np.arange(c.rows), nx)
    first = np.cumsum(nx) - nx
    xj = c.J0[xrow] + (np.arange(len(xrow)) - first[xrow])
    S = _sums(c, xrow, np.minimum(xj * bn, N))
    # tile j of a row: S(x_{j+1}) - S(x_j)
    last = np.zeros(len(xj), dtype=bool)
    last[np.cumsum(nx)[nx > 0] - 1] = True
    cnt = (S[1:] - S[:-1])[~last[:-1]]
    trow, tj = xrow[:-1][~last[:-1]], xj[:-1][~last[:-1]]
    ne = cnt > 0
    trow, tj, cnt = trow[ne], tj[ne], cnt[ne]
    klen = np.minimum(bn, N - tj * bn)
    full = cnt == c.qlen[trow] * klen
    keys = trow * nk + tj
    return keys, full, c.allowed, cnt


#: most tiles in one period of a segment's counts ([Note: periodic runs]); a longer period
#: (a step with a large odd factor against power-of-two tiles) counts its tiles one by one
MAX_PERIOD = 1 << 12


def periodic_runs(s: PSet, bm: int, bn: int, counted: bool = False):
    """(full, partial, allowed): the runs ([Note: tile runs] in plans.py) of full and of partial
    key tiles of every row h * nq + query tile, and the allowed triples, without visiting every
    candidate tile ([Note: periodic runs]). With `counted`, (full, partial) are int64 per-row
    tile counts [rows] instead, never listing a tile (`attnc show`'s totals, `simulate`)."""
    f, p, allowed, runs = periodic_classes(s, bm, bn)
    return (f, p, allowed) if counted else (*runs(), allowed)


def periodic_classes(s: PSet, bm: int, bn: int):
    """(full counts, partial counts, allowed, runs): the per-row tile counts (int64 [rows]) and
    allowed triples of `periodic_runs`, and `runs()`, which lists its (full, partial) runs from
    the classes found here (O(special tiles + phases) kept), so a plan counts now and lists on
    first use without classifying twice."""
    from .plans import Runs, ragged_arange

    # [Note: periodic runs] A column's S_c(x) is 0 up to the least lo of the row's queries (a_lo),
    # its total from the greatest hi (b_hi) on, and between the greatest lo and the least hi
    # (b_lo .. a_hi, every query inside) a key tile [x, x + bn) adds what [x, x + bn) adds to
    # every query's F, which depends on x only through (x - o) mod p: tile j's count there is
    # periodic in j with period p / gcd(p, bn) tiles (1 when the step divides bn: one period
    # or whole periods a tile). So the row's tiles split into *special* tiles (a column's
    # [a_lo, b_lo] or [a_hi, b_hi] cuts them, the ragged last tile) counted one by one as in
    # `periodic_tiles`, and *segments* between them whose counts repeat with the period P
    # (the lcm over columns): each of a segment's first min(P, length) tiles is counted, and
    # stands for every P-th tile after it; the segment's total S(end) - S(start) must equal
    # the phases' counts times their multiplicities (checked). Past MAX_PERIOD the pure zones
    # of the steps that do not divide bn are special tiles instead (P = 1). A strided row of 8192 partial
    # tiles is a few special tiles and one segment; `k % 128 >= 96` in 64-key tiles is a
    # segment of period 2 (an empty tile, a partial one), counted from two tiles.
    c = _columns(s, bm, bn)
    N, nk, rows = c.N, c.nk, c.rows
    period = 1
    for _, _, _, p, _ in c.cols:
        period = math.lcm(period, p // math.gcd(p, bn))
    steady = period <= MAX_PERIOD
    if not steady:  # pure zones of steps that do not divide bn are special: segments count the same tile by tile
        period = 1
    lo_r, hi_r, row_r = [], [], []
    for (o, lo, hi, p, w), (mn_lo, mx_lo, mn_hi, mx_hi, total, real) in zip(c.cols, c.stats):
        has = mx_hi > mn_lo  # some query of the row has this column
        # at least one tile each: a zone boundary on a tile boundary still splits segments
        cuts = [(mn_lo // bn, np.maximum(-(-mx_lo // bn), mn_lo // bn + 1)),
                (mn_hi // bn, np.maximum(-(-mx_hi // bn), mn_hi // bn + 1))]
        if bn % p and not steady:
            cuts.append((mx_lo // bn, -(-mn_hi // bn)))
        for a, b in cuts:
            row_r.append(np.flatnonzero(has))
            lo_r.append(a[has])
            hi_r.append(b[has])
    if N % bn:
        row_r.append(np.arange(rows))
        lo_r.append(np.full(rows, nk - 1))
        hi_r.append(np.full(rows, nk))
    row, lo, hi = (np.concatenate(x) for x in (row_r, lo_r, hi_r))
    lo, hi = np.maximum(lo, c.J0[row]), np.minimum(hi, c.J1[row])
    special = Runs.merged(row, lo, hi, nk)
    # segments: every row's candidates [J0, J1) minus its special runs, i.e. the gaps between
    # consecutive items of (J0, J0), the special runs, (J1, J1) in key order
    cand = np.flatnonzero(c.J1 > c.J0)
    i_row = np.concatenate([cand, special.row, cand])
    i_a = np.concatenate([c.J0[cand], special.lo, c.J1[cand]])
    i_b = np.concatenate([c.J0[cand], special.hi, c.J1[cand]])
    order = np.argsort((i_row * (nk + 1) + i_a) * 2 + (i_b > i_a), kind="stable")
    i_row, i_a, i_b = i_row[order], i_a[order], i_b[order]
    gap = (i_row[1:] == i_row[:-1]) & (i_a[1:] > i_b[:-1])
    seg_row, seg_lo, seg_hi = i_row[:-1][gap], i_b[:-1][gap], i_a[1:][gap]
    n_seg = seg_hi - seg_lo
    # every special tile, and each segment's first min(period, length) tiles (its phases)
    n_ph = np.minimum(n_seg, period)
    tiles = special.hi - special.lo
    require(PLAN_BYTES * (int(tiles.sum()) + int(n_ph.sum()) + len(seg_row)),
            f"the tile plan of {_mq(s)} queries x {N} keys with {bm}x{bn} tiles (stepped keys)",
            "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
    seg_of = np.repeat(np.arange(len(seg_row)), n_ph)
    phase = ragged_arange(n_ph)
    t_row = np.concatenate([np.repeat(special.row, tiles), seg_row[seg_of]])
    t_j = np.concatenate([special.expand().astype(np.int64), seg_lo[seg_of] + phase])
    nt, ns = len(t_j), len(seg_row)
    x_row = np.concatenate([t_row, t_row, seg_row, seg_row])
    x = np.minimum(np.concatenate([t_j * bn, (t_j + 1) * bn, seg_lo * bn, seg_hi * bn]), N)
    S = _sums(c, x_row, x)
    t_cnt = S[nt:2 * nt] - S[:nt]
    t_full = t_cnt == c.qlen[t_row] * np.minimum(bn, N - t_j * bn)
    t_part = ~t_full & (t_cnt > 0)
    # how many tiles of its segment each phase tile stands for (1 for a special tile)
    mult = np.ones(nt, dtype=np.int64)
    n_special = nt - len(seg_of)
    mult[n_special:] = (n_seg[seg_of] - phase + period - 1) // period
    if ns:
        s_cnt = S[2 * nt + ns:] - S[2 * nt:2 * nt + ns]
        got = np.bincount(seg_of, weights=(t_cnt[n_special:] * mult[n_special:]).astype(np.float64), minlength=ns)
        if (np.rint(got).astype(np.int64) != s_cnt).any():
            raise AssertionError("periodic_runs: a segment's tiles do not repeat with its period")
    counts = [np.bincount(t_row, weights=mult * t, minlength=rows).astype(np.int64) for t in (t_full, t_part)]
    return (*counts, c.allowed,
            lambda: _periodic_lists(t_row, t_j, t_full, t_part, mult, n_special, seg_of, n_ph, seg_row, seg_lo, seg_hi,
                                    period, nk, f"{_mq(s)} queries x {N} keys with {bm}x{bn} tiles"))


def _periodic_lists(t_row, t_j, t_full, t_part, mult, n_special, seg_of, n_ph, seg_row, seg_lo, seg_hi, period, nk,
                    what):
    """(full, partial) runs of `periodic_classes`: a special tile is one run; a segment whose
    phases share a class is one run over it; other segments list every tile of the phases in
    the class (merged where they touch)."""
    from .plans import Runs, ragged_arange

    ns = len(seg_row)
    seg_full = np.bincount(seg_of, weights=t_full[n_special:], minlength=ns) == n_ph
    seg_part = np.bincount(seg_of, weights=t_part[n_special:], minlength=ns) == n_ph
    out = []
    for t_sel, s_sel in ((t_full, seg_full), (t_part, seg_part)):
        spec = np.flatnonzero(t_sel[:n_special])
        mixed = n_special + np.flatnonzero(t_sel[n_special:] & ~(s_sel[seg_of]))
        reps = mult[mixed]
        require(PLAN_BYTES_PER_TILE_RUN * int(reps.sum()),
                f"the tile plan of {what} (stepped keys: "
                f"{int(reps.sum())} tiles alternate between classes)",
                "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
        m_row, m_j = np.repeat(t_row[mixed], reps), np.repeat(t_j[mixed], reps)
        m_j = m_j + period * ragged_arange(reps)
        whole = np.flatnonzero(s_sel)
        out.append(Runs.merged(np.concatenate([t_row[spec], seg_row[whole], m_row]),
                               np.concatenate([t_j[spec], seg_lo[whole], m_j]),
                               np.concatenate([t_j[spec] + 1, seg_hi[whole], m_j + 1]), nk))
    return out[0], out[1]


#: bytes per tile listed as its own run while `periodic_runs` builds them (coordinates, sort, merge)
PLAN_BYTES_PER_TILE_RUN = 64


#: bytes per candidate tile while periodic_tiles runs (boundaries, sums, keys)
PLAN_BYTES = 96


def _pure_sums(o, lo, p, w, real, qrow, rows, xr, x) -> np.ndarray:
    """sum over the real queries q of row xr of F_q(x) - F_q(lo_q), every query's [lo_q, hi_q]
    holding x: from the sorted residues r_q = o_q mod p and their prefix sums ([Note: periodic tiles])."""
    rq, mq = o % p, o // p
    base = np.bincount(qrow[real], weights=((lo - o) // p * w + np.minimum((lo - o) % p, w))[real], minlength=rows)
    mw = np.bincount(qrow[real], weights=mq[real] * w, minlength=rows)
    n = np.bincount(qrow[real], minlength=rows).astype(np.int64)
    P2 = p + 2
    key = qrow[real] * P2 + rq[real]
    order = np.argsort(key, kind="stable")
    key = key[order]
    cs = np.concatenate([[0], np.cumsum(rq[real][order])])
    start = np.searchsorted(key, xr * P2, side="left")

    def upto(a):  # (count, sum) of the row's residues <= a
        i = np.searchsorted(key, xr * P2 + np.clip(a, -1, p), side="right")
        return i - start, cs[i] - cs[start]

    t, m = x % p, x // p
    nr = n[xr]
    c_t, s_t = upto(t)
    c_tw, s_tw = upto(t - w)
    c_tp, s_tp = upto(t + p - w)
    tot = cs[start + nr] - cs[start]
    phi = (nr * m * w - w * (nr - c_t) + c_tw * w + (c_t - c_tw) * t - (s_t - s_tw)
           + (c_tp - c_t) * w + (nr - c_tp) * (t + p) - (tot - s_tp))
    return phi - mw[xr].astype(np.int64) - base[xr].astype(np.int64)
