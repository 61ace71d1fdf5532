"""Plans of routed unions: the tiles of `clip & routed(sel) | rest` from one query per routing block.

input:  a bound 1-D pattern whose body is a union with one routed arm, `routed(sel)` intersected
        with parts of one interval per query (`causal`, ...), possibly all under a common
        intersection (`causal & (topk | sliding | sink)` once topk is lowered to a table), and
        one batch element's block table.
output: `routed_plan`: the plan's runs (or counts) per chunk, for `analysis.assemble_plan`, or
        NotIntervals when the pattern is not of that form (the interval sets then plan it).
does not: decide tiles of other patterns, or choose blocks (dynamic.py draws tables for `simulate`).

[Note: routed plans] The interval sets give every query its allowed keys, so a routed arm of
200 blocks a query costs O(M x 200) in every union and intersection it meets (nsa_like at
131 072 tokens, 8 heads: 15 s of sets and tile classes). But a routed arm's keys are the same
for the b queries of a routing block, and the rest of the pattern (the window, the sinks, the
causal cut) is a few intervals per query. So, per query tile (row):
* the clip C (the intersection of the arm's one-interval parts) is all-in for the key tiles
  `in_all` inside every query's clip, all-out beyond the tiles it touches;
* the rest S touches a few key tiles (its own tile classes, from its interval sets);
* the *near* tiles Z = tiles S touches + tiles where the clip is not uniform. Outside Z the
  pattern is the routed row alone (or nothing), so those tiles take the classes of the routed
  rows, classified from one query per block (`tile_runs` of the block rows); inside Z, every
  query's set is evaluated exactly, but cut to Z's keys first: the routed row meets Z in a
  few blocks, so the per-query sets have a few intervals, not 200.
The allowed pairs add the same way: exact in Z, and outside it the routed row's keys in
`in_all` minus Z, once per block times its queries. Tiles and pairs are exactly those of the
interval sets (tests/test_routed_plans.py compares both on random tables).
"""

from __future__ import annotations

import numpy as np
import torch

from . import ir
from .interval_sets import (INTERVAL_BUDGET, ISet, NotIntervals, TooManyIntervals, halving_chunks, intersect,
                            max_intervals, merge, union)
from .interval_tiles import tile_runs
from .intervals import IntervalAnalysis, routed_rows
from .plans import Runs
from .reference import top_view

#: most key-interval pieces of the near / far tiles a row may have (more: the interval sets plan it)
MAX_PIECES = 64
#: most (routed interval, piece) pairs a chunk meets at once (interval_sets.INTERVAL_BUDGET):
#: past it, and past `max_intervals` in the near sets, the chunk is halved (as the interval sets do)
PAIR_BUDGET = INTERVAL_BUDGET


def split(body: ir.Mask):
    """(routed node, clip parts, rest arms) of `[C1 & ... &] (R [& clips] | A | B ...)`, or None."""
    common: list = []
    arms = [body]
    if isinstance(body, ir.Inter):
        unions = [p for p in body.parts if isinstance(p, ir.Union_)]
        if len(unions) == 1:
            common = [p for p in body.parts if p is not unions[0]]
            arms = list(unions[0].parts)
    elif isinstance(body, ir.Union_):
        arms = list(body.parts)
    routed, rest = [], []
    for arm in arms:
        parts = list(arm.parts) if isinstance(arm, ir.Inter) else [arm]
        r = [p for p in parts if isinstance(p, ir.Routed)]
        if len(r) == 1 and not any(_dynamic(p) for p in parts if p is not r[0]):
            routed.append((r[0], [p for p in parts if p is not r[0]]))
        else:
            rest.append(arm)
    if len(routed) != 1 or any(_dynamic(a) for a in rest) or any(_dynamic(c) for c in common):
        return None
    node, clips = routed[0]
    return node, clips + common, rest, common


def _dynamic(node) -> bool:
    return any(isinstance(n, (ir.Routed, ir.TopK)) for n in ir.walk(node))


def _node(cls, parts: list):
    return parts[0] if len(parts) == 1 else cls(parts=tuple(parts))


def routed_chunks(pattern: ir.PatternIR, M: int, N: int, heads: int, bm: int, bn: int, inputs: dict,
                  chunk: int):
    """(q0, end, Hx, (full, partial, allowed)) per chunk of whole query tiles ([Note: routed
    plans]); NotIntervals when the pattern is not a routed union (before any chunk), or when a
    chunk of one query tile still holds too many intervals or pieces: the caller then plans the
    whole pattern with the interval sets."""
    if pattern.layout.axes or pattern.layout.text is not None:
        raise NotIntervals("routed plans are 1-D")
    parts = split(pattern.body)
    if parts is None:
        raise NotIntervals("not a union with one routed arm")
    node, clips, rest, common = parts
    sel = inputs[node.input].to(torch.int64)  # [Hs, query blocks, kmax], -1 ignored
    ia = IntervalAnalysis(pattern)
    b = ia.val(node.block, top_view(pattern, M, N, heads, None, inputs, rows=(0, 0)).env)
    if b % bm and bm % b:
        raise NotIntervals("routing blocks and query tiles that do not nest")
    clip_ir = _node(ir.Inter, clips) if clips else None
    rest_ir = _node(ir.Inter, common + [_node(ir.Union_, rest)]) if rest else None
    return _chunks(pattern, M, N, heads, bm, bn, inputs, ia, sel, b, clip_ir, rest_ir, chunk)


def _chunks(pattern, M, N, heads, bm, bn, inputs, ia, sel, b, clip_ir, rest_ir, chunk):
    nk = -(-N // bn)
    no_keys = torch.zeros(0, dtype=torch.int64)

    def one(q0, end):
        view = top_view(pattern, M, N, heads, None, inputs, rows=(q0, end), keys=no_keys)
        return _chunk(view, ia, sel, b, clip_ir, rest_ir, q0, end, bm, bn, nk)

    for q0, end, out in halving_chunks(M, bm, chunk, one):
        yield q0, end, *out


def _chunk(view, ia, sel, b, clip_ir, rest_ir, q0, end, bm, bn, nk):
    L, Mq = view.L, end - q0
    cq = -(-Mq // bm)
    g = min(b, bm)  # one representative query per routing block, or per query tile of a longer block
    reps = torch.arange(0, Mq, g)
    routed = routed_rows(sel, view.qrel[reps] // b, b, L)  # [Hs, reps, R]
    clip = merge(ia.eval(clip_ir, view)) if clip_ir is not None else ISet.make(torch.zeros(Mq, 1, dtype=torch.int64),
                                                                            torch.full((Mq, 1), L), L)
    if not isinstance(clip, ISet) or (clip.lo.shape[-1] > 1 and bool((clip.lo[..., 1:] < L).any())):
        raise NotIntervals("the routed arm's other parts are not one interval per query")
    clip = ISet(clip.lo[..., :1], clip.hi[..., :1], L, merged=True)
    rest = merge(ia.eval(rest_ir, view)) if rest_ir is not None else None
    if rest is not None and not isinstance(rest, ISet):
        raise NotIntervals("periodic rest")
    Hx = max(routed.lo.shape[0], clip.lo.shape[0], rest.lo.shape[0] if rest is not None else 1)
    rows_n = Hx * cq

    # the clip per row: tiles inside every query's clip, and tiles some query's clip touches
    def per_row(x):  # [Hc, Mq] -> [Hx, cq, bm] numpy, the short last tile padded with its last query
        x = x.expand(Hx, -1).numpy()
        pad = cq * bm - Mq
        if pad:
            x = np.concatenate([x, np.repeat(x[:, -1:], pad, 1)], 1)
        return x.reshape(Hx, cq, bm)

    lo, hi = per_row(clip.lo[..., 0]), per_row(clip.hi[..., 0])
    real = hi > lo
    lo_r, hi_r = np.where(real, lo, L), np.where(real, hi, L)  # an empty clip counts as [L, L)
    any_real = real.any(-1).reshape(-1)
    t_lo, t_hi = lo_r.min(-1).reshape(-1) // bn, -(-hi_r.max(-1).reshape(-1) // bn)
    c_hi = hi_r.min(-1).reshape(-1)
    a_lo, a_hi = -(-lo_r.max(-1).reshape(-1) // bn), np.where(c_hi >= L, nk, c_hi // bn)
    row_ids = np.arange(rows_n)
    touched = Runs.merged(row_ids[any_real], t_lo[any_real], t_hi[any_real], nk, ordered=True)
    in_all = Runs.merged(row_ids, a_lo, np.where(real.all(-1).reshape(-1), a_hi, a_lo), nk, ordered=True)
    near = touched.minus(in_all, nk)
    if rest is not None:  # the rest's own tiles are near
        f, p, _ = tile_runs(ISet(rest.lo.expand(Hx, -1, -1), rest.hi.expand(Hx, -1, -1), L, merged=True), bm, bn)
        near = Runs.union([f, p, near], nk)
    far = in_all.minus(near, nk)

    # far tiles: the classes of the routed rows (from one query per block)
    rr = ISet(routed.lo.expand(Hx, -1, -1), routed.hi.expand(Hx, -1, -1), L, merged=True)
    rf, rp, _ = tile_runs(rr, bm // g, bn)
    full, partial = rf.intersect(far, nk), rp.intersect(far, nk)
    rep_row = (torch.arange(Hx)[:, None] * cq + reps[None, :] // bm).numpy()  # [Hx, reps]: the row of each rep
    weight = torch.clamp(Mq - reps, max=g).numpy()  # queries each rep stands for

    # far pairs: the routed row's keys in the far tiles, once per rep times its queries
    f_lo, f_hi = _pieces(far, rows_n, bn, L)
    z_lo, z_hi = _pieces(near, rows_n, bn, L)
    if rr.lo.numel() * max(f_lo.shape[1], z_lo.shape[1]) > PAIR_BUDGET:
        raise TooManyIntervals("routed rows x near / far pieces beyond the working budget")
    inter = _meet_rows(rr, f_lo, f_hi, rep_row)
    allowed = int(((inter.hi - inter.lo).sum(-1).numpy() * weight[None, :]).sum())

    # near tiles: every query's exact set, cut to the near keys first
    cut = merge(_meet_rows(rr, z_lo, z_hi, rep_row))  # [Hx, reps, few]
    width = cut.lo.shape[-1] + (rest.lo.shape[-1] if rest is not None else 0)
    if width > max_intervals(Mq, Hx):
        raise TooManyIntervals(f"more than {max_intervals(Mq, Hx)} near intervals per query")
    at = torch.arange(Mq) // g
    s = intersect(ISet(cut.lo[:, at], cut.hi[:, at], L, merged=True), clip)
    if rest is not None:
        s = union(s, rest)
    s = merge(s)
    nf, np_, n_allowed = tile_runs(s, bm, bn)
    return Hx, (Runs.union([full, nf], nk), Runs.union([partial, np_], nk), allowed + n_allowed)


def _pieces(runs: Runs, rows: int, bn: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key intervals of merged runs per row, padded: int64 [rows, K] (empty: (L, L))."""
    counts = np.bincount(runs.row, minlength=rows)
    K = max(int(counts.max()) if rows else 0, 1)
    if K > MAX_PIECES:
        raise NotIntervals(f"more than {MAX_PIECES} near or far pieces in a row")
    slot = np.arange(len(runs.row)) - (np.cumsum(counts) - counts)[runs.row]
    lo, hi = np.full((rows, K), L, dtype=np.int64), np.full((rows, K), L, dtype=np.int64)
    lo[runs.row, slot] = np.minimum(runs.lo * bn, L)
    hi[runs.row, slot] = np.minimum(runs.hi * bn, L)
    return torch.from_numpy(lo), torch.from_numpy(hi)


def _meet_rows(s: ISet, lo: torch.Tensor, hi: torch.Tensor, rep_row: np.ndarray) -> ISet:
    """Each rep's set [Hx, reps, R] met with the intervals of its row ([rows, K]): [Hx, reps, R * K]."""
    r = torch.from_numpy(rep_row)
    zl, zh = lo[r], hi[r]  # [Hx, reps, K]
    a = torch.maximum(s.lo[..., :, None], zl[..., None, :]).flatten(-2)
    c = torch.minimum(s.hi[..., :, None], zh[..., None, :]).flatten(-2)
    return ISet.make(a, c, s.n)
