"""Closed-form loop bounds: which key tiles a query tile visits, as arithmetic.

input:  a bound 1-D pattern (PatternIR) at concrete sizes M, N, H, a tile
        shape, and (to verify) the pattern's Plan.
output: `LoopBounds`: per direction (rows: forward and dQ, key tiles of a
        query tile; cols: dK/dV, query tiles of a key tile) either a short
        list of *ranges* the kernels evaluate in closed form, or the reason
        the kernels read the plan's tile lists instead.
does not: print kernels (loop_text.py prints the `Ranges`); derive the ranges
        (range_derivation.py), normalise them (ranges.py) or define their monotone
        ends (monotone.py); plan tiles (analysis.py; the plan is the oracle here).

[Note: monotone ranges] The allowed keys of an absolute query position x are
a union of a few *ranges*: [lo(x), hi(x)) for x in a guard [g0, g1) and a set
of heads, where lo and hi are non-decreasing in x (causal: [0, x + 1); band:
[x - l, x + r + 1); sink: [0, n); a block: [((x - s) // b) * b + s - halo, ...);
prefix(n): [0, n) guarded by x < n; rows(S): [0, N) guarded by S). Unions
are lists, intersections take max(lo) / min(hi) of every pair, complements
are De Morgan over the gaps. For a tile of queries [a0, a1) inside the guard,
monotonicity gives the touched key tiles [lo(a0) // BN, cdiv(hi(a1 - 1), BN))
and the full ones [cdiv(lo(a1 - 1), BN), min(hi(a0), N) // BN) (a ragged last
key tile is partial: the full loop has no bounds check): two evaluations per
range and tile.

Sizes are concrete (kernels are specialised to them), so each range list is
normalised on the host: clipped to the valid x, split where a range is empty,
touching ranges merged into one (min of lo, max of hi), clamps that never
bind dropped. The transposed direction inverts each range: the queries of key
k are [max(g0, first x with hi(x) > k), min(g1, first x with lo(x) > k)),
again monotone in k (`upper`). The kernels visit the ranges in order, each
clipped to start after the previous range's last tile, so no tile is visited
twice. Before a kernel uses the ranges, `simulate` replays exactly that
arithmetic on the host and must reproduce the plan's full and partial tiles;
anything else (or no derivation) falls back to tile lists, per direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnc import ir

from . import sizes as size_tags
from .monotone import ev, fits_int32
from .range_derivation import col_ranges, row_ranges
from .ranges import NoClosedForm, Range, Ranges, points


# ----------------------------------------------------------------------------- the kernels' arithmetic, on the host


def range_tiles(r: Range, a0: torch.Tensor, a1: torch.Tensor, length: int, bn: int, ragged_partial: bool = True):
    """What a kernel computes for range r and tiles of positions [a0, a1):
    (first, full_first, full_end, end, full) tile indices, int64 tensors. With
    `ragged_partial` (key tiles: the forward and dQ) a ragged last tile is never
    full ([Note: the two loops] in codegen/kernels.py)."""
    s, e = a0.clamp(min=r.g0), a1.clamp(max=r.g1)
    active = s < e
    xf, xl = s.clamp(max=r.g1 - 1), (e - 1).clamp(min=r.g0)
    lo_f, lo_l, hi_f, hi_l = ev(r.lo, xf), ev(r.lo, xl), ev(r.hi, xf), ev(r.hi, xl)
    first = torch.where(active, lo_f // bn, 0)  # an inactive range visits nothing and moves nothing
    end = torch.where(active, -(-hi_l // bn), 0)
    full_first = -(-lo_l // bn)
    if ragged_partial:
        full_end = hi_f.clamp(max=length) // bn
    else:
        full_end = torch.where(hi_f >= length, -(-length // bn), hi_f // bn)
    full = active & (s == a0) & (e == a1)
    return first, full_first, full_end, end, full


def visited(rs: Ranges, H: int, tiles: tuple[int, int]) -> tuple[list, tuple[int, int]]:
    """The tiles the kernel visits, without a dense tile map: per head, sorted
    int64 keys `row * col_tiles + col` and their int8 kinds (1 masked, 2
    unmasked), and (row tiles, col tiles). Tiles outside the column range count
    as visited (keys past the end): a kernel must never go there. Raises
    AssertionError on a tile visited twice. Cost O(row tiles * ranges + visits)."""
    bm, bn = tiles  # (tile of x, tile of the ranges' values)
    x0, x1 = rs.domain
    n = x1 - x0
    nr, nc = -(-n // bm), -(-rs.length // bn)
    t = torch.arange(nr, dtype=torch.int64)
    a0, a1 = t * bm + x0, torch.clamp((t + 1) * bm, max=n) + x0
    out = []
    seen: dict = {}  # heads in the same groups visit the same tiles: replay each group set once
    for h in range(H):
        groups = tuple((bits >> h) & 1 for bits, _ in rs.groups)
        if groups in seen:
            out.append(seen[groups])
            continue
        done = torch.zeros(nr, dtype=torch.int64)
        segs = []  # (first tile, end tile, kind) per row
        for bits, ranges in rs.groups:
            if not (bits >> h) & 1:
                continue
            for r in ranges:
                first, f_first, f_end, end, full = range_tiles(r, a0, a1, rs.length, bn, rs.direction == "rows")
                start = torch.maximum(first, done)
                stop = torch.maximum(end, start)
                fs = torch.where(full, torch.minimum(torch.maximum(f_first, start), stop), stop)
                fe = torch.where(full, torch.minimum(torch.maximum(f_end, fs), stop), stop)
                segs += [(start, fs, 1), (fs, fe, 2), (fe, stop, 1)]
                done = stop
        keys, kinds = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int8)]
        for lo, hi, kind in segs:
            cnt = (hi - lo).clamp(min=0)
            row = torch.repeat_interleave(t, cnt)
            col = torch.arange(len(row), dtype=torch.int64) - (torch.cumsum(cnt, 0) - cnt)[row] + lo[row]
            col = torch.where((col < 0) | (col >= nc), nc, col)  # outside: a key no plan tile has
            keys.append(row * (nc + 1) + col)
            kinds.append(torch.full((len(row),), kind, dtype=torch.int8))
        k, kd = torch.cat(keys), torch.cat(kinds)
        k, order = torch.sort(k, stable=True)
        if bool((k[1:] == k[:-1]).any()):
            raise AssertionError("a tile visited twice")
        seen[groups] = (k, kd[order])
        out.append(seen[groups])
    return out, (nr, nc)


def simulate(rs: Ranges, H: int, tiles: tuple[int, int]) -> torch.Tensor:
    """int8 [H, row tiles, col tiles] of the tiles the kernel visits: 0 not at
    all, 1 masked, 2 unmasked (small sizes: tests and pictures); raises
    AssertionError on a tile visited twice or outside the columns."""
    per_head, (nr, nc) = visited(rs, H, tiles)
    out = torch.zeros(H, nr * (nc + 1), dtype=torch.int8)
    for h, (k, kd) in enumerate(per_head):
        if bool((k % (nc + 1) == nc).any()):
            raise AssertionError("a tile outside the columns visited")
        out[h, k] = kd
    return out.view(H, nr, nc + 1)[..., :nc]


def _plan_keys(full, partial, h: int, nc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head h's tiles of a plan direction (compressed TileLists) as sorted keys
    `row * (nc + 1) + col` and kinds (1 partial, 2 full)."""
    hx = min(h, full.counts.shape[0] - 1)
    rows = full.counts.shape[1]
    keys, kinds = [], []
    for lst, kind in ((partial, 1), (full, 2)):
        fr = lst.flat_rows()
        mine = fr // rows == hx
        keys.append((fr[mine] % rows) * (nc + 1) + lst.cols[mine].long())
        kinds.append(torch.full((int(mine.sum()),), kind, dtype=torch.int8))
    k, order = torch.sort(torch.cat(keys))
    return k, torch.cat(kinds)[order]


# ----------------------------------------------------------------------------- loop bounds for a kernel module


@dataclass(frozen=True)
class LoopBounds:
    """How the kernels bound their tile loops: `rows` (forward and dQ) and `cols`
    (dK/dV) are `Ranges` (closed form) or None with the reason in `rows_reason` /
    `cols_reason` (the kernels then read the plan's tile lists)."""

    rows: Ranges | None = None
    cols: Ranges | None = None
    rows_reason: str = ""
    cols_reason: str = ""
    heads: int = 1

    @property
    def closed(self) -> tuple[bool, bool]:
        return self.rows is not None, self.cols is not None

    def summary(self, per_size: bool = True) -> str:
        """One line for headers and metadata; `per_size=False` leaves out what only holds at
        these sizes (the tile counts of a check that failed), for length-generic headers."""
        rows_why, cols_why = (self.rows_reason, self.cols_reason) if per_size else \
            (_without_counts(self.rows_reason), _without_counts(self.cols_reason))
        if self.rows is None and self.cols is None:
            return f"tile lists ({rows_why})" if rows_why == cols_why else \
                f"tile lists (forward and dQ: {rows_why}; dK/dV: {cols_why})"
        parts = []
        for name, rs, why, unit in (("forward and dQ", self.rows, rows_why, "key"),
                                    ("dK/dV", self.cols, cols_why, "query")):
            if rs is None:
                parts.append(f"{name}: tile lists ({why})")
            else:
                n = max(len(r) for _, r in rs.groups)
                parts.append(f"{name}: closed form ({n} {unit} range{'s' if n != 1 else ''}"
                             f"{', by head' if len(rs.groups) > 1 else ''})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"rows": "closed form" if self.rows is not None else "tile lists",
                "rows_ranges": self.rows.text() if self.rows is not None else None,
                "rows_reason": self.rows_reason or None,
                "cols": "closed form" if self.cols is not None else "tile lists",
                "cols_ranges": self.cols.text() if self.cols is not None else None,
                "cols_reason": self.cols_reason or None}


#: the reason of a closed form that does not reproduce the plan (then the counts, per size)
DIFFERS = "the closed form differs from the plan at these sizes"


def _without_counts(reason: str) -> str:
    return DIFFERS if reason.startswith(DIFFERS) else reason


def check_ranges(rs: Ranges, H: int, tiles: tuple[int, int], full, partial) -> str:
    """'' when the ranges reproduce a plan direction's tile classes (its
    compressed `full` / `partial` TileLists, with a ragged last key tile partial
    as the kernels have it: `TileLists.build`), else why not; no dense tile map."""
    if rs.direction == "rows":
        full, partial = full.ragged_partial(partial, rs.length, tiles[1])
    for _, ranges in rs.groups:
        for r in ranges:
            xs = points(r.g0, r.g1)
            if not (fits_int32(r.lo, xs) and fits_int32(r.hi, xs)):
                return "bounds beyond int32"
    try:
        per_head, (_, nc) = visited(rs, H, tiles)
    except AssertionError as exc:
        return str(exc)
    missed = extra = masked = unmasked = 0
    compared = set()  # (replay, plan head) pairs: heads that share both are compared once
    for h, (got_k, got_kind) in enumerate(per_head):
        pair = (id(got_k), min(h, full.counts.shape[0] - 1))
        if pair in compared:
            continue
        compared.add(pair)
        want_k, want_kind = _plan_keys(full, partial, h, nc)
        if torch.equal(got_k, want_k) and torch.equal(got_kind, want_kind):
            continue
        if len(want_k) == 0:  # the plan has no tile for this head
            extra += len(got_k)
            continue
        pos = torch.searchsorted(want_k, got_k).clamp(max=len(want_k) - 1)
        hit = want_k[pos] == got_k
        extra += int((~hit).sum())
        masked += int((hit & (got_kind == 1) & (want_kind[pos] == 2)).sum())
        unmasked += int((hit & (got_kind == 2) & (want_kind[pos] == 1)).sum())
        missed += len(want_k) - int(hit.sum())
    if missed == extra == masked == unmasked == 0:
        return ""
    return (f"{DIFFERS} ({missed} tiles missed, {extra} empty tiles "
            f"visited, {masked} full tiles masked, {unmasked} partial tiles unmasked)")


def loop_bounds(pattern: ir.PatternIR, M: int, N: int, H: int, block: tuple[int, int], plan=None) -> LoopBounds:
    """The loop bounds of the kernels for a pattern at these sizes and tiles.

    Without a plan (patterns with run-time inputs) or when the derivation or
    its check against the plan fails, a direction falls back to tile lists.
    Constants derived from M and N keep their expressions ([Note: one text, many
    sizes] in sizes.py)."""
    M, N, _ = size_tags.tag(M, N)
    if plan is None:
        why = "run-time inputs: the plan is built per call" if pattern.inputs else "no plan"
        return LoopBounds(rows_reason=why, cols_reason=why, heads=H)
    if plan.tile_shape is not None:
        return LoopBounds(rows_reason="N-D tiles", cols_reason="N-D tiles", heads=H)
    bm, bn = block
    rows = cols = None
    why_rows = why_cols = ""
    for join in (True, False):  # joined ranges are fewer; unjoined ones are sometimes exact where joined are not
        try:
            r = row_ranges(pattern, M, N, H, join)
        except NoClosedForm as exc:
            return LoopBounds(rows_reason=str(exc), cols_reason=str(exc), heads=H)
        if rows is None:
            why_rows = check_ranges(r, H, (bm, bn), plan.full, plan.partial)
            rows = None if why_rows else r
        if cols is None:
            try:
                c = col_ranges(r, M, N, join)
                why_cols = check_ranges(c, H, (bn, bm), plan.full_t, plan.partial_t)
                cols = None if why_cols else c
            except NoClosedForm as exc:
                why_cols = str(exc)
        if rows is not None and cols is not None:
            break
    return LoopBounds(rows=rows, cols=cols, rows_reason="" if rows else why_rows,
                      cols_reason="" if cols else why_cols, heads=H)
