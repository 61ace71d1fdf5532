"""Block-sparsity analysis: tile plans without evaluating N^2 positions.

input:  a bound pattern (PatternIR), sizes and a tile shape.
output: a `Plan` (plans.py): per query tile its full and partial key tiles, the
        transposed view for backward, and the exact count of allowed pairs; row
        reports (`row_report`); per-tile counts for `attnc show` are pair_counts.py's, from the same paths.
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
boxes] in tileboxes.py). N-D tiles on grids: a per-axis product (`&` of per-axis parts,
`where q.a == k.a`) from per-axis tile counts ([Note: product tiles] in products.py), other
patterns with the same boxes in tile-major token order (`NDTileBoxes`). `Plan.method` says
which path built a plan; both are exact.
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
from .interval_tiles import PLAN_BYTES_PER_RUN, tile_runs
from .interval_sets import ISet, NotIntervals, halving_chunks, merge
from .intervals import IntervalAnalysis
from .periodic import NotPeriodic, PSet, periodic_classes
from .limits import require
from .plans import Plan, Runs, TileList
from .products import is_product, nd_product, product_plan
from .progress import task
from .reference import Evaluator, View, top_view
from .routed_plans import routed_chunks
from .tileboxes import NDTileBoxes, TileBoxes, boxes_bytes, refine, tile_major

#: plan unions with one routed arm block by block ([Note: routed plans] in routed_plans.py);
#: False: through the interval sets of every query (what tests compare them with)
ROUTED_PLANS = True

#: queries per chunk of the closed-form plan builder (bounds its working memory)
PLAN_CHUNK = 16384
#: per-axis products with at most this many 1-D tile pairs are planned from ProductCounts (its
#: work and its int64 map grow with nq * nk; the closed form's with the non-empty tiles)
PRODUCT_TILES = 1 << 23


def _require_boxes(pattern, M, N, heads, nq, nk, what: str) -> None:
    require(boxes_bytes(M, N, heads, nq, nk, len(pattern.layout.axes)),
            f"{what} of '{pattern.name}' at M = {M}, N = {N} ({nq} x {nk} tiles per head)",
            "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")


def _closed_form_plan(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, bm: int, bn: int,
                      inputs: dict | None, counted: bool = False) -> Plan:
    """The plan from interval sets with periodic slots for stepped keys ([Note: periodic
    sets] in periodic.py); where the periodic algebra cannot represent a set, from interval
    sets alone (one interval per key of a progression)."""
    try:
        return _closed_form_plan_with(pattern, M, N, heads, grid, bm, bn, inputs, periodic=True, counted=counted)
    except NotPeriodic:
        return _closed_form_plan_with(pattern, M, N, heads, grid, bm, bn, inputs, periodic=False, counted=counted)


def _closed_form_plan_with(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, bm: int, bn: int,
                           inputs: dict | None, periodic: bool, counted: bool = False) -> Plan:
    """The plan from interval sets (raises NotIntervals), in chunks of whole query tiles:
    working memory O(PLAN_CHUNK * R), plus O(runs of non-empty tiles) for the result. A chunk
    with more intervals per query than `max_intervals` allows is halved and tried again (down
    to one query tile), so many keys per query (strided, routed) stay in closed form.
    `counted`: a counted plan ([Note: counted plans] in plans.py), per-row tile counts only."""
    if pattern.inputs and not inputs:
        raise NotIntervals("run-time inputs")

    def classified():
        for q0, end, s in chunk_sets(pattern, M, N, heads, grid, bm, periodic, inputs):
            if isinstance(s, ISet):
                yield q0, end, s.lo.shape[0], tile_runs(s, bm, bn)
            else:  # counted now, listed on first use (never, in a counted plan): a step that does not divide bn lists a run per tile
                f, p, count, runs = periodic_classes(s, bm, bn)
                make = functools.cache(runs)
                yield q0, end, s.lo.shape[0], (Later(f, lambda make=make: make()[0]), Later(p, lambda make=make: make()[1]),
                                               count)

    return assemble_plan(pattern, M, N, heads, bm, bn, counted, classified())


@dataclass(frozen=True)
class Later:
    """A chunk's per-row tile counts now, its runs from `make()` on first use."""

    counts: np.ndarray
    make: object


def assemble_plan(pattern: ir.PatternIR, M: int, N: int, heads: int, bm: int, bn: int, counted: bool,
                  chunks) -> Plan:
    """The plan of per-chunk classes: `chunks` yields (q0, end, Hx, (full, partial, allowed)) for
    queries [q0, end) (whole query tiles), full / partial as runs of the chunk's rows
    h * cq + local tile, or as `Later` (counts now, runs on first use: the plan's lists are
    then deferred)."""
    nq, nk = -(-M // bm), -(-N // bn)
    parts, allowed, Hx, runs = [], 0, None, 0
    with task("planning", total=M, unit="query") as bar:
        for q0, end, hx, (full, partial, count) in chunks:
            if Hx is None:
                Hx = hx
                tallies = np.zeros((2, Hx, nq), dtype=np.int64)
            elif hx != Hx:  # heads come from the IR and the inputs' shapes, never from rows
                raise AssertionError(f"chunks disagree on heads: {Hx} vs {hx}")
            allowed += count
            cq = -(-(end - q0) // bm)
            # per-row tile counts of the chunk's rows h * cq + local tile
            tallies[:, :, q0 // bm:q0 // bm + cq] = np.stack([
                x.counts if isinstance(x, Later) else np.bincount(x.row, weights=x.hi - x.lo, minlength=Hx * cq)
                for x in (full, partial)]).reshape(2, Hx, cq)
            bar.update(end - q0)
            if counted:
                continue
            if isinstance(full, Runs):
                runs += len(full.row) + len(partial.row)  # the runs of the rows done so far, projected to all M rows:
                require(PLAN_BYTES_PER_RUN * runs * M / end,
                        f"the tile plan of '{pattern.name}' at M = {M}, N = {N} with {bm}x{bn} tiles "
                        f"({runs} runs of non-empty tiles in the first {end} query rows)",
                        "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
            parts.append((q0, end, full, partial))
    fields = dict(M=M, N=N, heads=heads, block=(bm, bn), allowed=allowed * (heads // Hx), method="closed-form")
    if counted:
        return Plan(full=TileList.counted(tallies[0]), partial=TileList.counted(tallies[1]), **fields)

    def listed(i: int) -> Runs:  # the runs of every chunk's full (0) or partial (1) tiles, rows h * nq + tile
        out = []
        for q0, end, *lists in parts:
            r = lists[i].make() if isinstance(lists[i], Later) else lists[i]
            if end - q0 < M:  # chunk rows h * cq + local tile -> h * nq + q0 // bm + local tile
                cq = -(-(end - q0) // bm)
                r = Runs(r.row // cq * nq + r.row % cq + q0 // bm, r.lo, r.hi)
            out.append(r)
        r = Runs.cat(out)
        return r.sorted(nk) if Hx > 1 and len(parts) > 1 else r  # a later chunk's head 0 comes before an earlier one's head 1

    if any(isinstance(x, Later) for part in parts for x in part[2:]):
        return Plan(full=TileList.deferred(tallies[0], lambda: listed(0)),
                    partial=TileList.deferred(tallies[1], lambda: listed(1)), **fields)
    return Plan.from_runs(listed(0), listed(1), Hx, nq, nk, **fields)


def chunk_sets(pattern, M, N, heads, grid, bm: int, periodic: bool, inputs: dict | None = None):
    """(q0, end, merged sets of queries [q0, end)) over whole query tiles, PLAN_CHUNK queries
    at a time; a chunk with more intervals per query than `max_intervals` allows is halved
    and tried again (down to one query tile; then TooManyIntervals)."""
    ia = IntervalAnalysis(pattern, periodic=periodic)
    no_keys = torch.zeros(0, dtype=torch.int64)
    return halving_chunks(M, bm, PLAN_CHUNK,
                          lambda q0, end: _planchunk_sets(pattern, ia, M, N, heads, grid, inputs, q0, end, no_keys))


def _planchunk_sets(pattern, ia, M, N, heads, grid, inputs, q0, end, no_keys) -> ISet:
    """The merged interval sets of queries [q0, end) (raises NotIntervals / TooManyIntervals)."""
    rows = end - q0
    require(8 * rows * (3 + 2 * len(pattern.layout.axes)) + 64 * heads * rows,
            f"the allowed keys of {rows} queries of '{pattern.name}' (one chunk of the tile plan)",
            "a smaller query tile (block=(128, 128)) or smaller sizes")
    view = top_view(pattern, M, N, heads, grid, inputs or {}, rows=(q0, end), keys=no_keys)
    return merge(ia.eval(pattern.body, view))  # working memory O(chunk * R): bounded by max_intervals


def _uniform(length: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity order and offsets of 1-D tiles of b tokens."""
    off = torch.clamp(torch.arange(-(-length // b) + 1) * b, max=length)
    return torch.arange(length), off


@contextlib.contextmanager
def one_thread():
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


def query_interval_sets(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, inputs: dict | None = None,
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
    with one_thread():
        return _row_report(pattern, M, N, heads, grid)


def _row_report(pattern, M, N, heads, grid) -> RowReport:
    try:
        if pattern.inputs:
            raise NotIntervals("run-time inputs")
        _require_sets(pattern, M, N, heads)
        try:  # [Hx, M], in chunks of queries (working memory that of one chunk)
            counts = torch.cat([s.count() for _, _, s in chunk_sets(pattern, M, N, heads, grid, 1, True)], 1)
        except NotPeriodic:
            counts = torch.cat([s.count() for _, _, s in chunk_sets(pattern, M, N, heads, grid, 1, False)], 1)
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
                inputs: dict | None = None, counted: bool = False) -> Plan:
    """The tile plan of a bound pattern (sizes already validated). Patterns with
    run-time inputs are planned for one batch element's `inputs` in closed form
    (contiguous segments: O(N); block tables: O(M * kmax)). `counted`: what only counts
    tiles (`show`'s totals, `simulate`) may get a counted plan ([Note: counted plans] in
    plans.py): its tile counts, classes and allowed pairs are the plan's, its lists absent."""
    with one_thread():
        return _plan_blocks(pattern, M, N, heads, grid, block, inputs, counted)


def _plan_nd(pattern, M, N, heads, grid, tq, tk) -> Plan:
    """The plan of N-D tiles on a grid, in tile-major token order."""
    sizes = [int(g) for g in grid]
    nq = math.prod(-(-L // t) for L, t in zip(sizes, tq))
    nk = math.prod(-(-L // t) for L, t in zip(sizes, tk))
    _require_boxes(pattern, M + 4 * N, N + 4 * N, heads, nq, nk, "the N-D tile plan")  # + tile_major's coordinates
    order_q, off_q = tile_major(sizes, tq)
    order_k, off_k = tile_major(sizes, tk)
    try:  # a per-axis product: classes and count from per-axis tile counts ([Note: product factors])
        full, partial, Hx, allowed = nd_product(pattern, N, heads, grid, tq, tk)
        return Plan.from_runs(
            full, partial, Hx, nq, nk, M=M, N=N, heads=heads, block=(math.prod(tq), math.prod(tk)), allowed=allowed,
            method="closed-form", tile_shape=(tuple(tq), tuple(tk)), perm_q=order_q, perm_k=order_k,
            offsets_q=off_q, offsets_k=off_k)
    except NotIntervals:
        pass
    boxes = NDTileBoxes(pattern, N, heads, grid, tq, tk)
    full, nonempty = boxes.classify(pattern.body)
    allowed = None
    if isinstance(pattern.body, (*ir.AXISWISE, ir.Along)):
        # (axes too long for nd_product) a product's box classes are exact; the interval sets count the pairs
        try:
            s, _ = query_interval_sets(pattern, M, N, heads, grid)
            allowed = int(s.count().sum()) * (heads // s.lo.shape[0])
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
    """One TileList of `len(index)` heads: head h is `lists[index[h]]` (each of one head),
    as runs ([Note: tile runs]), or counts where one of them is counted."""
    rows = lists[0].counts.shape[1]
    if any(t.is_counted for t in lists):
        return TileList.counted(np.stack([lists[i].counts[0].numpy() for i in index]))
    runs = [t.to_runs() for t in lists]
    return TileList.from_runs(len(index), rows, Runs.cat([runs[i].shifted(h * rows) for h, i in enumerate(index)]))


def _plan_by_head_class(pattern, M, N, heads, grid, block, counted: bool = False) -> Plan | None:
    """The plan of a per-head pattern from one plan per group of heads with equal arms."""
    classes = head_classes(pattern, M, N, heads, grid)
    if classes is None:
        return None
    plans = [_plan_blocks(p, M, N, heads, grid, block, counted=counted) for _, p in classes]
    if any(p.full.counts.shape[0] != 1 for p in plans):  # a group still differs per head
        return None
    index = [0] * heads
    for c, (hs, _) in enumerate(classes):
        for h in hs:
            index[h] = c
    lists = {name: _stack_lists([getattr(p, name) for p in plans], index)
             for name in ("full", "partial")}
    allowed = sum(p.allowed // heads * len(hs) for p, (hs, _) in zip(plans, classes))
    methods = sorted({p.method for p in plans})
    return Plan(M=M, N=N, heads=heads, block=block, allowed=allowed, method=" + ".join(methods),
                tiles_evaluated=sum(p.tiles_evaluated for p in plans), **lists)


def _plan_blocks(pattern, M, N, heads, grid, block, inputs=None, counted: bool = False) -> Plan:
    if isinstance(block[0], tuple):
        if inputs:
            raise ValueError("block: N-D tiles are not supported with run-time inputs; try 1-D tiles like (128, 128)")
        return _plan_nd(pattern, M, N, heads, grid, *block)
    bm, bn = block
    if not inputs:
        shared = _plan_by_head_class(pattern, M, N, heads, grid, block, counted)
        if shared is not None:
            return shared
    if not inputs and is_product(pattern.body) and -(-M // bm) * -(-N // bn) <= PRODUCT_TILES:
        try:  # few tiles: counted per tile pair from row segments ([Note: product counts]), faster here
            return product_plan(pattern, M, N, heads, grid, bm, bn)
        except NotIntervals:
            pass
    if inputs and ROUTED_PLANS:
        try:  # one routed arm among few intervals per query: from one query per block ([Note: routed plans])
            return assemble_plan(pattern, M, N, heads, bm, bn, counted,
                                 routed_chunks(pattern, M, N, heads, bm, bn, inputs, PLAN_CHUNK))
        except NotIntervals:
            pass
    try:
        return _closed_form_plan(pattern, M, N, heads, grid, bm, bn, inputs, counted=counted)
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
