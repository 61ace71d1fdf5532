"""Exact allowed pairs per tile and per query row, for `attnc show`, without dense mask rows.

input:  a bound pattern (PatternIR), sizes and 1-D tiles.
output: `tile_counts`: (plan, counts per tile [1 or H, nq, nk], counts per query row [1 or H, M]).
does not: build plans itself (analysis.plan_blocks) or draw anything (show.py, tilestats.py).

Each count comes from the cheapest exact source: `where` stencils on grids from their interval
sets (interval_tiles.interval_tile_counts), per-axis products from their factors
(products.ProductCounts), 1-D patterns from their interval sets or periodic slots, and only
the rest from the mask of each query tile's partial key tiles, evaluated in bounded chunks.
"""

from __future__ import annotations

import torch

from . import analysis, ir
from .analysis import chunk_sets, one_thread, plan_blocks, query_interval_sets
from .interval_sets import NotIntervals
from .interval_tiles import counted_plan, interval_tile_counts
from .periodic import NotPeriodic, PSet, periodic_tiles, take
from .products import ProductCounts, axis_masks, is_product
from .plans import Plan
from .progress import each, task
from .tileboxes import evaluated_counts
from .tilestats import count_dtype, tile_lengths


def _full_tile_counts(full: torch.Tensor, qsz: torch.Tensor, ksz: torch.Tensor, block) -> torch.Tensor:
    """Per-tile counts of bool `full` tiles [H, nq, nk] (their sizes; 0 elsewhere), built in
    place without an [nq, nk] int64 map (10^6 tokens in 128-token tiles: 64 M tiles)."""
    counts = full.to(count_dtype(block))
    counts *= ksz.to(counts.dtype)[None, None, :]
    counts *= qsz.to(counts.dtype)[None, :, None]
    return counts


#: tiles a side squared up to which every tile is counted from interval sets at once, O(M * R + tiles),
#: and the plan taken from the counts (display cells, [Note: display cells] in show.py, are never more)
FEW_TILES = 1 << 20

#: mask elements evaluated per call by tile_counts (bounds its working memory)
COUNT_CHUNK = 1 << 22


def _periodic_tile_counts(s: PSet, M: int, state: torch.Tensor, block) -> torch.Tensor:
    """Every tile's allowed pairs from periodic sets of all M queries, analysis.PLAN_CHUNK query rows at
    a time: `periodic_tiles`' working memory stays that of one chunk (at 10^6 tokens all
    rows at once held several GB of per-tile arrays)."""
    bm, _ = block
    nq, nk = state.shape[1:]
    counts = torch.zeros(s.heads, nq, nk, dtype=count_dtype(block))
    step = bm * max(1, analysis.PLAN_CHUNK // bm)
    for q0 in each(range(0, M, step), "counting pairs in tiles", unit="chunk"):
        end = min(M, q0 + step)
        keys, _, _, cnt = periodic_tiles(take(s, torch.arange(q0, end)), *block)
        keys = torch.from_numpy(keys)
        cq = -(-(end - q0) // bm)  # chunk keys: (h * cq + local query tile) * nk + key tile
        row, kt = keys // nk, keys % nk
        counts[row // cq, q0 // bm + row % cq, kt] = torch.from_numpy(cnt).to(counts.dtype)
    return counts


def _interval_tile_counts(pattern, M, N, heads, grid, state, qsz, ksz, block):
    """(counts, rows) of a 1-D pattern from its interval sets, no mask evaluated: a full tile
    counts its size; a partial tile (query tile a, key tile [b, e)) counts
    sum over its queries and their intervals [lo, hi) of |[lo, hi) & [b, e)|, computed for
    all partial tiles at once in chunks; rows are the sets' own counts. Raises NotIntervals."""
    try:
        s, _ = query_interval_sets(pattern, M, N, heads, grid, periodic=True)  # [Hs, M, R], merged: disjoint intervals
    except NotPeriodic:
        s, _ = query_interval_sets(pattern, M, N, heads, grid)
    bm, bn = block
    if isinstance(s, PSet):  # exact counts of every non-empty tile ([Note: periodic tiles])
        return _periodic_tile_counts(s, M, state, block), s.count()
    Hs = s.lo.shape[0]
    Hx = max(Hs, state.shape[0])
    R = s.lo.shape[-1]
    partial = int((state == 1).sum()) * (Hx // state.shape[0])
    if partial * bm * R > Hs * M * R + Hx * state[0].numel():
        # many partial tiles (random keys, or display cells: [Note: display cells] in show.py): every
        # tile from the intervals at once, by difference arrays along tile rows, beats gathering each
        counts = interval_tile_counts(s, M, bm, bn, count_dtype(block))
        return counts.expand(Hx, -1, -1).clone() if counts.shape[0] < Hx else counts, s.count()
    counts = _full_tile_counts((state == 2).expand(Hx, -1, -1), qsz, ksz, block)
    h, qt, kt = (state.expand(Hx, -1, -1) == 1).nonzero(as_tuple=True)
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


def _counted_tile_counts(pattern, M, N, heads, grid, block):
    """(plan, counts, rows) from interval sets (`where` stencils on grids: [Note: stencils] in
    stencils.py; 1-D patterns of few tiles), in chunks of query rows; every tile counted from the
    intervals, the plan from the counts (partial tiles are most tiles of a stencil). Raises
    NotIntervals."""
    for periodic in (True, False):
        try:
            with task("counting pairs in tiles", total=M, unit="query") as bar:
                return counted_plan(chunk_sets(pattern, M, N, heads, grid, block[0], periodic), M, N, heads,
                                    block, pattern.name, bar.update)
        except NotPeriodic:
            continue
    raise NotIntervals("no interval sets")


def tile_counts(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, block: tuple[int, int]
                ) -> tuple[Plan, torch.Tensor, torch.Tensor]:
    """(plan, counts, rows): the plan of 1-D tiles `block`, the allowed pairs per tile int64
    [1 or H, nq, nk] and per query row [1 or H, M], exact, without dense mask rows.

    `where` stencils on grids, and 1-D patterns of at most FEW_TILES tiles (display cells),
    count every tile from their interval sets and take the plan from the counts. Otherwise
    full tiles count their size and empty tiles 0, from the plan;
    a per-axis product's
    partial tiles come from ProductCounts and its rows from the 1-D masks' row counts;
    otherwise the mask of each query tile's partial key tiles is evaluated, at most
    COUNT_CHUNK elements at a time. Work O(tiles + partial tiles' pairs), memory O(nq * nk)."""
    with one_thread():
        bm, bn = block
        few = not pattern.layout.axes and -(-M // bm) * -(-N // bn) <= FEW_TILES
        if few or (pattern.layout.axes and any(isinstance(n, ir.Where) for n in ir.walk(pattern.body))):
            try:
                return _counted_tile_counts(pattern, M, N, heads, grid, block)
            except NotIntervals:
                pass
        if is_product(pattern.body) and pattern.layout.axes and M == N:
            try:  # the plan, counts and rows of a product from its per-axis factors, nothing evaluated
                pc = ProductCounts(pattern, M, N, heads, grid, bm, bn)
                counts = pc.counts(pattern.body)
                masks = axis_masks(pattern, pc.view, pattern.body)
                rows = torch.ones(1, M, dtype=torch.int64)
                for a, m in zip(pattern.layout.axes, masks):
                    rows = rows * m.sum(2)[:, pc.view.qc[a]]
                if pc.view.qin is not None:
                    rows = rows * pc.view.qin
                return pc.plan(counts, bm, bn), counts, rows
            except NotIntervals:
                pass
        plan = plan_blocks(pattern, M, N, heads, grid, block=block)
        nq, nk = plan.shape
        qsz, ksz = tile_lengths(M, bm), tile_lengths(N, bn)
        state = plan.to_dense()
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
                per_tile, per_row = evaluated_counts(pattern, M, N, heads, grid, queries, keys, local, len(cc))
                if per_tile.shape[0] > counts.shape[0]:  # heads differ inside partial tiles: widen
                    counts, rows = counts.expand(heads, -1, -1).clone(), rows.expand(heads, -1).clone()
                counts[:, qt, cc] = per_tile.to(counts.dtype)
                rows[:, q0:q0 + len(queries)] += per_row
        return plan, counts, rows
