"""Block-sparsity analysis: tile plans without evaluating N^2 positions.

input:  a bound pattern (PatternIR), sizes and a tile shape.
output: a `Plan` (plans.py): per query tile its full and partial key tiles, the
        transposed view for backward, and the exact count of allowed pairs; row
        reports (`row_report`) and per-tile counts (`tile_counts`) from the same paths.
does not: generate kernels; handle run-time inputs (their plans are built
        inside the op); compute interval sets, tile classes or products itself (the
        modules below, which it drives).

The plan builders try, in order: heads with equal arms once per group (`head_classes`);
the closed form, every query's allowed keys as interval sets ([Note: interval sets] in
intervals.py) classified into tiles without a dense map ([Note: sparse tiles] in
interval_tiles.py), a chunk of query tiles at a time; on grids, per-axis products counted
exactly from row segments ([Note: product counts] in products.py). Patterns that are not
short interval unions per query (`where`, `dilate`, many-key `strided`) are classified per
tile box in three-valued logic and only undecided tiles are evaluated exactly ([Note: tile
boxes] in tileboxes.py); N-D tiles on grids use the same boxes in tile-major token order
(`NDTileBoxes`). `Plan.method` says which path built a plan; both are exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import ir
from .interval_tiles import PLAN_BYTES_PER_TILE, counted_plan, sparse_tiles
from .interval_sets import ISet, NotIntervals, TooManyIntervals, merge
from .intervals import IntervalAnalysis
from .periodic import NotPeriodic, PSet, periodic_tiles, take
from .limits import require
from .plans import Plan, TileList
from .products import ProductCounts, axis_masks, product_plan
from .progress import each, task
from .reference import Evaluator, View, top_view
from .tileboxes import NDTileBoxes, TileBoxes, boxes_bytes, evaluated_counts, refine, tile_major
from .tilestats import count_dtype, tile_lengths

#: queries per chunk of the closed-form plan builder (bounds its working memory)
PLAN_CHUNK = 16384


def _require_boxes(pattern, M, N, heads, nq, nk, what: str) -> None:
    require(boxes_bytes(M, N, heads, nq, nk, len(pattern.layout.axes)),
            f"{what} of '{pattern.name}' at M = {M}, N = {N} ({nq} x {nk} tiles per head)",
            "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")


def _closed_form_plan(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, bm: int, bn: int,
                      inputs: dict | None) -> Plan:
    """The plan from interval sets with periodic slots for stepped keys ([Note: periodic
    sets] in periodic.py); where the periodic algebra cannot represent a set, from interval
    sets alone (one interval per key of a progression)."""
    try:
        return _closed_form_plan_with(pattern, M, N, heads, grid, bm, bn, inputs, periodic=True)
    except NotPeriodic:
        return _closed_form_plan_with(pattern, M, N, heads, grid, bm, bn, inputs, periodic=False)


def _closed_form_plan_with(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, bm: int, bn: int,
                           inputs: dict | None, periodic: bool) -> Plan:
    """The plan from interval sets (raises NotIntervals), in chunks of whole query tiles:
    working memory O(PLAN_CHUNK * R), plus O(non-empty tiles) for the result. A chunk with
    more intervals per query than `max_intervals` allows is halved and tried again (down to
    one query tile), so many keys per query (strided, routed) stay in closed form."""
    if pattern.inputs and not inputs:
        raise NotIntervals("run-time inputs")
    nq, nk = -(-M // bm), -(-N // bn)
    parts, allowed, Hx, tiles = [], 0, None, 0
    with task("planning", total=M, unit="query") as bar:
        for q0, end, s in _chunk_sets(pattern, M, N, heads, grid, bm, periodic, inputs):
            if Hx is None:
                Hx = s.lo.shape[0]
            elif s.lo.shape[0] != Hx:  # heads come from the IR and the inputs' shapes, never from rows
                raise AssertionError(f"chunks disagree on heads: {Hx} vs {s.lo.shape[0]}")
            if isinstance(s, ISet):
                keys, full, count = sparse_tiles(s, bm, bn)
            else:
                keys, full, count, _ = periodic_tiles(s, bm, bn)
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
    keys, full = (np.concatenate(x) for x in zip(*parts)) if len(parts) > 1 else parts[0]
    if len(parts) > 1 and Hx > 1:
        order = np.argsort(keys, kind="stable")
        keys, full = keys[order], full[order]
    return Plan.from_tiles(keys, full, Hx, nq, nk, M=M, N=N, heads=heads, block=(bm, bn),
                           allowed=allowed * (heads // Hx), method="closed-form")


def _chunk_sets(pattern, M, N, heads, grid, bm: int, periodic: bool, inputs: dict | None = None):
    """(q0, end, merged sets of queries [q0, end)) over whole query tiles, PLAN_CHUNK queries
    at a time; a chunk with more intervals per query than `max_intervals` allows is halved
    and tried again (down to one query tile; then TooManyIntervals)."""
    ia = IntervalAnalysis(pattern, periodic=periodic)
    no_keys = torch.zeros(0, dtype=torch.int64)
    step = bm * max(1, PLAN_CHUNK // bm)
    q0 = 0
    while q0 < M:
        end = min(q0 + step, M)
        try:
            s = _plan_chunk_sets(pattern, ia, M, N, heads, grid, inputs, q0, end, no_keys)
        except TooManyIntervals:
            if step <= bm:
                raise
            step = bm * max(1, step // bm // 2)  # fewer queries at once keep more intervals each
            continue
        yield q0, end, s
        q0 = end


def _plan_chunk_sets(pattern, ia, M, N, heads, grid, inputs, q0, end, no_keys) -> ISet:
    """The merged interval sets of queries [q0, end) (raises NotIntervals / TooManyIntervals)."""
    rows = end - q0
    require(8 * rows * (3 + 2 * len(pattern.layout.axes)) + 64 * heads * rows,
            f"the allowed keys of {rows} queries of '{pattern.name}' (one chunk of the tile plan)",
            "a smaller query tile (block=(128, 128)) or smaller sizes")
    view = top_view(pattern, M, N, heads, grid, inputs or {}, rows=(q0, end), keys=no_keys)
    return merge(ia.eval(pattern.body, view))  # working memory O(chunk * R): bounded by max_intervals


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


def _require_sets(pattern, M: int, N: int, heads: int) -> None:
    require(8 * (M + N) * (3 + 2 * len(pattern.layout.axes)) + 64 * heads * M,
            f"the allowed keys of every query of '{pattern.name}' at M = {M}, N = {N}",
            "smaller sizes: empty rows and density show at small sizes too (attnc check --seq-len 4096)")


def _interval_sets(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, inputs: dict | None = None,
                   periodic: bool = False) -> tuple[ISet | PSet, View]:
    """Every query's allowed keys in closed form (raises NotIntervals). `inputs`:
    one batch element's run-time inputs (segments with contiguous ids, block tables).
    `periodic`: stepped keys may come back as periodic slots (a PSet)."""
    if pattern.inputs and not inputs:
        raise NotIntervals("run-time inputs")
    _require_sets(pattern, M, N, heads)
    view = top_view(pattern, M, N, heads, grid, inputs or {})
    return merge(IntervalAnalysis(pattern, periodic=periodic).eval(pattern.body, view)), view


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
        if pattern.inputs:
            raise NotIntervals("run-time inputs")
        _require_sets(pattern, M, N, heads)
        try:  # [Hx, M], in chunks of queries (working memory that of one chunk)
            counts = torch.cat([s.count() for _, _, s in _chunk_sets(pattern, M, N, heads, grid, 1, True)], 1)
        except NotPeriodic:
            counts = torch.cat([s.count() for _, _, s in _chunk_sets(pattern, M, N, heads, grid, 1, False)], 1)
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


def _periodic_tile_counts(s: PSet, M: int, state: torch.Tensor, block) -> torch.Tensor:
    """Every tile's allowed pairs from periodic sets of all M queries, PLAN_CHUNK query rows at
    a time: `periodic_tiles`' working memory stays that of one chunk (at 10^6 tokens all
    rows at once held several GB of per-tile arrays)."""
    bm, _ = block
    nq, nk = state.shape[1:]
    counts = torch.zeros(s.heads, nq, nk, dtype=count_dtype(block))
    step = bm * max(1, PLAN_CHUNK // bm)
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
        s, _ = _interval_sets(pattern, M, N, heads, grid, periodic=True)  # [Hs, M, R], merged: disjoint intervals
    except NotPeriodic:
        s, _ = _interval_sets(pattern, M, N, heads, grid)
    bm, bn = block
    if isinstance(s, PSet):  # exact counts of every non-empty tile ([Note: periodic tiles])
        return _periodic_tile_counts(s, M, state, block), s.count()
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


def _grid_interval_tile_counts(pattern, M, N, heads, grid, block):
    """(plan, counts, rows) on a grid from interval sets (`where` stencils: [Note: stencils] in
    stencils.py), in chunks of query rows; every tile counted from the intervals, the plan from
    the counts (partial tiles are most tiles there). Raises NotIntervals."""
    for periodic in (True, False):
        try:
            with task("counting pairs in tiles", total=M, unit="query") as bar:
                return counted_plan(_chunk_sets(pattern, M, N, heads, grid, block[0], periodic), M, N, heads,
                                    block, pattern.name, bar.update)
        except NotPeriodic:
            continue
    raise NotIntervals("no interval sets")


def tile_counts(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, block: tuple[int, int]
                ) -> tuple[Plan, torch.Tensor, torch.Tensor]:
    """(plan, counts, rows): the plan of 1-D tiles `block`, the allowed pairs per tile int64
    [1 or H, nq, nk] and per query row [1 or H, M], exact, without dense mask rows.

    `where` stencils on grids count every tile from their interval sets and take the plan
    from the counts. Otherwise full tiles count their size and empty tiles 0, from the plan;
    a per-axis product's
    partial tiles come from ProductCounts and its rows from the 1-D masks' row counts;
    otherwise the mask of each query tile's partial key tiles is evaluated, at most
    COUNT_CHUNK elements at a time. Work O(tiles + partial tiles' pairs), memory O(nq * nk)."""
    with _one_thread():
        if pattern.layout.axes and any(isinstance(n, ir.Where) for n in ir.walk(pattern.body)):
            try:
                return _grid_interval_tile_counts(pattern, M, N, heads, grid, block)
            except NotIntervals:
                pass
        plan = _plan_blocks(pattern, M, N, heads, grid, block)
        bm, bn = block
        nq, nk = plan.shape
        qsz, ksz = tile_lengths(M, bm), tile_lengths(N, bn)
        state = plan.to_dense()
        if isinstance(pattern.body, (*ir.AXISWISE, ir.Along)) and pattern.layout.axes and M == N:
            try:
                pc = ProductCounts(pattern, M, N, heads, grid, bm, bn)
                counts = pc.counts(pattern.body)
                masks = axis_masks(pattern, pc.view, pattern.body)
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
                per_tile, per_row = evaluated_counts(pattern, M, N, heads, grid, queries, keys, local, len(cc))
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
                per_axis = [m.sum((1, 2)) for m in axis_masks(pattern, boxes.view, pattern.body)]
                allowed = int(functools.reduce(torch.mul, per_axis).expand(heads).sum())
            except NotIntervals:
                pass
    evaluated = 0
    if allowed is None:
        evaluated = int((nonempty & ~full).sum())
        full, nonempty, allowed = refine(pattern, M, N, heads, grid, order_q, off_q, order_k, off_k, full, nonempty)
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
        if inputs:  # the tile boxes and refine know no run-time inputs
            raise ValueError(f"cannot plan pattern '{pattern.name}' from its run-time inputs in closed form ({exc}); "
                             f"the op scans such inputs itself") from None
    _require_boxes(pattern, M, N, heads, -(-M // bm), -(-N // bn), "the tile plan")
    try:
        return product_plan(pattern, M, N, heads, grid, bm, bn)
    except NotIntervals:
        pass
    boxes = TileBoxes(pattern, M, N, heads, grid, bm, bn)
    full, nonempty = boxes.classify(pattern.body)
    evaluated = int((nonempty & ~full).sum())
    full, nonempty, allowed = refine(pattern, M, N, heads, grid, *_uniform(M, bm), *_uniform(N, bn), full, nonempty)
    return Plan.from_flags(full, nonempty, M=M, N=N, heads=heads, block=(bm, bn), allowed=allowed, method="tile-boxes",
                           tiles_evaluated=evaluated)
