"""Tile classes from interval sets: which tiles of 1-D tiles are full, partial or empty.

input:  a merged interval set (interval_sets.ISet) of whole query tiles and a tile shape.
output: `classify_from_intervals`: dense bool (full, nonempty) maps [Hx, nq, nk];
        `tile_runs`: the runs of full and of partial tiles per query tile and the allowed
        count, without a dense map or a list of tiles (what `Plan.from_runs` takes);
        `interval_tile_counts` / `counted_plan`: the allowed pairs of every tile (what `show`
        draws), and the plan from them.
does not: compute interval sets (intervals.py) or chunk the queries of a plan (analysis.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .interval_sets import ISet
from .limits import require
from .periodic import PSet, periodic_tiles
from .plans import Plan, Runs
from .tilestats import count_dtype, tile_lengths

#: about the bytes a non-empty tile costs while a plan is built from sparse tiles: its key and flag,
#: the sort orders and both tile lists (row and transposed) of `Plan.from_tiles`
PLAN_BYTES_PER_TILE = 64
#: about the bytes a run of tiles ([Note: tile runs]) costs while `tile_runs` builds and merges it
PLAN_BYTES_PER_RUN = 96


def classify_from_intervals(s: ISet, M: int, bm: int, bn: int, qrel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def equal_groups(s: ISet, bm: int) -> int:
    """The largest power of two g dividing `bm` such that the queries of every aligned group
    of g (q // g equal) have the same intervals (a routing block's, a `blockwise` block's, a
    pattern that ignores q); 1 when the first two queries already differ. Cost O(M * R) per
    size tried, at most log2(bm) sizes."""
    lo, hi = s.lo, s.hi
    Hx, Mq, R = lo.shape
    if Mq < 2 or bm & (bm - 1) or not (torch.equal(lo[:, 1], lo[:, 0]) and torch.equal(hi[:, 1], hi[:, 0])):
        return 1
    g = bm
    while g > 1:
        m = Mq // g * g
        if all(torch.equal(x[:, :m].reshape(Hx, m // g, g, R), x[:, :m:g, None].expand(Hx, m // g, g, R))
               and torch.equal(x[:, m:], x[:, m:m + 1].expand(Hx, Mq - m, R)) for x in (lo, hi)):
            return g
        g //= 2
    return 1


def tile_runs(s: ISet, bm: int, bn: int) -> tuple[Runs, Runs, int]:
    """The non-empty tiles of whole query tiles (the last may be short) from merged
    interval sets, without a dense [nq, nk] map and without listing them: the runs
    ([Note: tile runs] in plans.py) of full and of partial key tiles of every row
    h * nq + query tile, and the number of allowed (head, query, key) triples of the set.

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
    their own queries only (one run per tile). Cost O(Hx * M * R) elementwise plus
    O(runs log runs); memory O(M * R + bad tiles * nk), never O(non-empty tiles)."""
    N = s.n
    Hx, Mq, R = s.lo.shape
    bm = min(bm, Mq)  # one query tile either way; padding a short tile up to a huge bm would allocate bm rows
    nq, nk = -(-Mq // bm), -(-N // bn)
    allowed = int(s.count().sum())  # empty slots are (N, N)
    g = equal_groups(s, bm)
    if g > 1:  # every aligned group of g queries has one row: a tile's classes are those of g-times fewer
        s, bm, Mq = ISet(s.lo[:, ::g], s.hi[:, ::g], N, merged=True), bm // g, -(-Mq // g)
    # slot-major [R, Hx * nq, bm] copies: reductions over a tile's queries run along the last axis
    dt = np.int32 if N + 2 * bn < 2**31 else np.int64
    lo, hi = (x.numpy().transpose(2, 0, 1).astype(dt, order="C") for x in (s.lo, s.hi))
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
    require(PLAN_BYTES_PER_RUN * 3 * Hx * nq * R + 48 * n_bad * (nk + 1) + 16 * n_bad * R * bm,
            f"the tile plan of {Mq} queries x {N} keys with {bm}x{bn} tiles",
            "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
    # good rows, per slot: touched [T_lo, T_hi) = full [F_lo, F_hi) plus partial runs on both sides
    # (a tile full through one slot is touched by no other: the query's intervals are disjoint)
    n_rows = Hx * nq
    has_full = good & (F_hi > F_lo)
    F_lo, F_hi = np.where(has_full, F_lo, T_lo), np.where(has_full, F_hi, T_lo)
    T_hi = np.where(good, T_hi, T_lo)
    row = np.repeat(np.arange(n_rows, dtype=np.int64), R)
    f_parts = [(row, F_lo.ravel(), F_hi.ravel())]
    p_parts = [(row, T_lo.ravel(), F_lo.ravel()), (row, F_hi.ravel(), T_hi.ravel())]
    rows = np.flatnonzero(bad)
    if len(rows):
        # exact classes of the bad tiles by difference arrays over their queries; a slot whose range
        # (in key tiles) is the one it had for the query before adds nothing new to the touched tiles
        # and its multiplicity to the covered ones: each run of equal ranges of a slot counts once
        # (a routing or `blockwise` block's queries share all their slots, a sliding window's
        # queries all but one)
        n_rows_bad = len(rows)
        size = n_rows_bad * (nk + 1)

        def count(a, b, weighted):
            a, b = a[:, rows], b[:, rows]  # [R, bad tiles, bm]
            new = np.ones(a.shape, dtype=bool)
            new[..., 1:] = (a[..., 1:] != a[..., :-1]) | (b[..., 1:] != b[..., :-1])
            first = np.flatnonzero(new)  # every (slot, bad tile) starts a run at its first query
            a, b = a.reshape(-1)[first], b.reshape(-1)[first]
            ok = b > a  # empty slots are [-bn, -bn): key tiles [-1, -1)
            base = (first // bm % n_rows_bad * (nk + 1))[ok]
            wt = np.diff(np.append(first, new.size))[ok].astype(np.float64) if weighted else None
            starts = np.bincount(base + a[ok], weights=wt, minlength=size)
            ends = np.bincount(base + b[ok], weights=wt, minlength=size)
            return np.cumsum((starts - ends).reshape(n_rows_bad, nk + 1), -1)[:, :nk]

        touch = count(t_lo, t_hi, False)
        cover = count(c_lo, c_hi, True)
        for parts, sel in ((f_parts, cover == bm), (p_parts, (touch > 0) & (cover != bm))):
            r, k = np.nonzero(sel)
            parts.append((rows[r], k, k + 1))
    simple = R == 1 and not len(rows)  # one range per row, rows in order: nothing to sort or join
    full = Runs.merged(*(np.concatenate(x) for x in zip(*f_parts)), nk, ordered=simple)
    partial = Runs.merged(*(np.concatenate(x) for x in zip(*p_parts)), nk)  # a row's pieces: sorted and joined
    return full, partial, allowed


#: intervals (and dense tile-row entries) `interval_tile_counts` handles at once
COUNT_CHUNK = 1 << 22


def interval_tile_counts(s: ISet, M: int, bm: int, bn: int, dtype: torch.dtype) -> torch.Tensor:
    """Allowed pairs per tile [Hx, nq, nk] (`dtype`) of the merged interval sets of all M
    queries, no mask evaluated: a chunk of query tiles at a time, each interval adds its
    pieces in its first and last key tile, and the whole key tiles between come from a
    difference array along the tile row. Work O(M * R + nq * nk), memory O(chunk)."""
    N = s.n
    Hx, _, R = s.lo.shape
    nq, nk = -(-M // bm), -(-N // bn)
    out = torch.zeros(Hx, nq, nk, dtype=dtype)
    width = nk + 1
    c = max(1, min(COUNT_CHUNK // (bm * R), COUNT_CHUNK // (Hx * width)))
    for t0 in range(0, nq, c):
        t1 = min(nq, t0 + c)
        lo, hi = s.lo[:, t0 * bm:min(M, t1 * bm)], s.hi[:, t0 * bm:min(M, t1 * bm)]
        r = lo.shape[1]
        # [Hx, r, R] at once; empty slots (n, n) add 0 (their indices stay inside the tile row)
        row = ((torch.arange(Hx) * (t1 - t0))[:, None] + torch.arange(r)[None, :] // bm)[..., None] * width
        real = lo < hi
        ta, tb = lo // bn, (hi - 1) // bn
        one = ta == tb
        acc = torch.zeros(Hx * (t1 - t0) * width, dtype=torch.int64)
        first = torch.where(one, hi - lo, (ta + 1) * bn - lo).mul_(real)
        acc.index_add_(0, (row + ta).view(-1), first.view(-1))
        acc.index_add_(0, (row + tb).view(-1), ((hi - tb * bn) * (real & ~one)).view(-1))
        span = (real & (tb > ta + 1)).to(torch.int64)  # whole tiles ta + 1 .. tb - 1 (never the short last)
        cover = torch.zeros_like(acc)
        cover.index_add_(0, (row + torch.clamp(ta + 1, max=nk)).view(-1), span.view(-1))
        cover.index_add_(0, (row + tb).view(-1), -span.view(-1))
        cover = torch.cumsum(cover.view(Hx, t1 - t0, width), -1)
        out[:, t0:t1] = (acc.view(Hx, t1 - t0, width) + cover * bn)[..., :nk].to(dtype)
    return out


def counted_plan(chunks, M: int, N: int, heads: int, block: tuple[int, int], name: str, progress=None):
    """(plan, counts, rows) from `chunks`, (q0, end, merged sets of queries [q0, end)) over all
    M queries in order (q0 at tile starts): every tile's allowed pairs (`interval_tile_counts`,
    or residue arithmetic for periodic sets), int [Hx, nq, nk]; every row's, int64 [Hx, M]; and
    the plan of the tiles with pairs, full where a tile's count is its size. Suits patterns
    whose tiles are mostly partial (a stencil's); memory O(nq * nk) for the counts."""
    bm, bn = block
    nq, nk = -(-M // bm), -(-N // bn)
    counts = rows = None
    for q0, end, s in chunks:
        if counts is None:
            Hx = s.heads if isinstance(s, PSet) else s.lo.shape[0]
            counts = torch.zeros(Hx, nq, nk, dtype=count_dtype(block))
            rows = torch.zeros(Hx, M, dtype=torch.int64)
        if isinstance(s, PSet):
            keys, _, _, cnt = periodic_tiles(s, bm, bn)
            keys = torch.from_numpy(keys)
            cq = -(-(end - q0) // bm)  # chunk keys: (h * cq + local query tile) * nk + key tile
            row, kt = keys // nk, keys % nk
            counts[row // cq, q0 // bm + row % cq, kt] = torch.from_numpy(cnt).to(counts.dtype)
        else:
            c = interval_tile_counts(s, end - q0, bm, bn, counts.dtype)
            counts[:, q0 // bm:q0 // bm + c.shape[1]] = c
        rows[:, q0:end] = s.count()
        if progress is not None:
            progress(end - q0)
    Hx = counts.shape[0]
    flat = counts.numpy().reshape(-1)
    keys = np.flatnonzero(flat)  # (h * nq + query tile) * nk + key tile, sorted
    require(PLAN_BYTES_PER_TILE * len(keys), f"the tile plan of '{name}' at M = {M}, N = {N} with "
            f"{bm}x{bn} tiles ({len(keys)} non-empty tiles)",
            "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
    size = tile_lengths(M, bm).numpy()[(keys // nk) % nq] * tile_lengths(N, bn).numpy()[keys % nk]
    plan = Plan.from_tiles(keys, flat[keys] == size, Hx, nq, nk, M=M, N=N, heads=heads, block=block,
                           allowed=int(rows.sum()) * (heads // Hx), method="closed-form")
    return plan, counts, rows
