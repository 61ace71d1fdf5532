"""Tile plans: which tiles a kernel visits, stored as compressed per-row tile lists.

input:  tile classes from the analysis: dense bool maps (`Plan.from_flags`), sorted
        keys of the non-empty tiles with their full flags (`Plan.from_tiles`), or runs of
        full and of partial tiles per row (`Plan.from_runs`).
output: `Plan` (forward lists per query tile, transposed lists per key tile, the exact
        allowed count, how it was built) and `TileList` (one direction's compressed lists,
        with the padded index view the kernels read).
does not: decide which tiles are full, partial or empty (analysis.py and the modules it
        drives: intervals, interval_tiles, products, tileboxes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .limits import require


def ragged_arange(n: np.ndarray) -> np.ndarray:
    """0 .. n[0] - 1, 0 .. n[1] - 1, ...: every item's place in its group of a ragged layout."""
    return np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)


def _meet(xa, xb, ya, yb) -> tuple[np.ndarray, np.ndarray]:
    """The non-empty intersections of two sorted lists of disjoint, non-adjacent intervals
    [xa, xb) and [ya, yb), in order (disjoint, non-adjacent): each x meets a contiguous range
    of y's, found by binary search."""
    i, j = np.searchsorted(yb, xa, side="right"), np.searchsorted(ya, xb, side="left")
    n = np.maximum(j - i, 0)
    xi = np.repeat(np.arange(len(xa)), n)
    yi = ragged_arange(n) + np.repeat(i, n)
    a, b = np.maximum(xa[xi], ya[yi]), np.minimum(xb[xi], yb[yi])
    keep = b > a
    return a[keep], b[keep]


@dataclass(frozen=True, eq=False)
class Runs:
    """Runs of consecutive tile columns: row (flat h * rows + r), columns [lo, hi); int64
    numpy arrays. `merged` sorts them by (row, lo) and joins overlapping or adjacent ones."""

    row: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @staticmethod
    def merged(row: np.ndarray, lo: np.ndarray, hi: np.ndarray, nk: int, ordered: bool = False) -> "Runs":
        """The merged runs of possibly overlapping, unordered ranges (empty ones dropped);
        `ordered`: the non-empty ones are merged already (sorted by (row, lo), disjoint, not adjacent)."""
        keep = hi > lo
        row, lo, hi = (x[keep].astype(np.int64) for x in (row, lo, hi))
        if ordered or not len(row):
            return Runs(row, lo, hi)
        a, b = row * (nk + 1) + lo, row * (nk + 1) + hi  # one line: rows never touch (a row ends <= nk)
        order = np.argsort(a, kind="stable")
        a, b = a[order], np.maximum.accumulate(b[order])
        new = np.ones(len(a), dtype=bool)
        new[1:] = a[1:] > b[:-1]
        first = np.flatnonzero(new)
        a, b = a[first], b[np.append(first[1:], len(new)) - 1]
        row = a // (nk + 1)
        return Runs(row, a - row * (nk + 1), b - row * (nk + 1))

    @staticmethod
    def of_keys(keys: np.ndarray, nk: int) -> "Runs":
        """The runs of sorted unique tile keys row * nk + col."""
        return Runs.of_cells(*np.divmod(keys.astype(np.int64), nk))

    @staticmethod
    def of_cells(row: np.ndarray, col: np.ndarray) -> "Runs":
        """The runs of tiles (row, col), sorted by (row, col) and unique."""
        row, col = row.astype(np.int64), col.astype(np.int64)
        if not len(row):
            return Runs(row, col, col)
        new = np.ones(len(row), dtype=bool)
        new[1:] = (col[1:] != col[:-1] + 1) | (row[1:] != row[:-1])
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(row)) - 1
        return Runs(row[first], col[first], col[last] + 1)

    def cut(self, rows: np.ndarray, cols: np.ndarray, nk: int) -> tuple["Runs", "Runs"]:
        """(kept, taken): these runs without, and with only, the tiles in flat rows where bool
        `rows` is set or in the sorted columns `cols` (merged runs both)."""
        bad = rows[self.row]
        taken = [(self.row[bad], self.lo[bad], self.hi[bad])]
        row, lo, hi = self.row[~bad], self.lo[~bad], self.hi[~bad]
        a, b = np.searchsorted(cols, lo), np.searchsorted(cols, hi)
        n = b - a  # the cut columns inside each run
        run = np.repeat(np.arange(len(row)), n)
        at = cols[ragged_arange(n) + np.repeat(a, n)]
        taken.append((row[run], at, at + 1))
        # pieces between the cuts: [lo, c1), [c1 + 1, c2), ..., [c_last + 1, hi), in order
        owner = np.repeat(np.arange(len(row)), n + 1)
        p = ragged_arange(n + 1)
        ci = a[owner] + p
        last = max(len(cols) - 1, 0)
        starts = np.where(p == 0, lo[owner], cols[np.clip(ci - 1, 0, last)] + 1) if len(cols) else lo[owner]
        ends = np.where(p == n[owner], hi[owner], cols[np.clip(ci, 0, last)]) if len(cols) else hi[owner]
        kept = Runs.merged(row[owner], starts, ends, nk, ordered=True)  # cut tiles keep the pieces apart
        return kept, Runs.merged(*(np.concatenate(x) for x in zip(*taken)), nk)

    def intersect(self, other: "Runs", nk: int) -> "Runs":
        """The tiles in both (merged runs both; the result merged)."""
        return Runs._of_line(*_meet(*self._line(nk), *other._line(nk)), nk)

    def minus(self, other: "Runs", nk: int) -> "Runs":
        """The tiles of these runs not in `other` (merged runs both; the result merged): these
        runs met with the gaps between `other`'s runs on the line of all rows."""
        ya, yb = other._line(nk)
        big = np.array([np.iinfo(np.int64).max])
        return Runs._of_line(*_meet(*self._line(nk), np.concatenate([[0], yb]), np.concatenate([ya, big])), nk)

    def _line(self, nk: int) -> tuple[np.ndarray, np.ndarray]:
        """The runs as intervals of one line, row r's columns at r * (nk + 1) + column: rows
        never touch, and merged runs are sorted and disjoint there."""
        return self.row * (nk + 1) + self.lo, self.row * (nk + 1) + self.hi

    @staticmethod
    def _of_line(a: np.ndarray, b: np.ndarray, nk: int) -> "Runs":
        row = a // (nk + 1)
        return Runs(row, a - row * (nk + 1), b - row * (nk + 1))

    def expand(self) -> np.ndarray:
        """int32 [tiles]: every run's columns, in order."""
        n = self.hi - self.lo
        first = np.cumsum(n) - n
        return (np.arange(int(n.sum()), dtype=np.int64) + np.repeat(self.lo - first, n)).astype(np.int32)

    def shifted(self, rows: int) -> "Runs":
        return Runs(self.row + rows, self.lo, self.hi)

    @staticmethod
    def union(parts: list["Runs"], nk: int) -> "Runs":
        """The merged runs of every tile in any part."""
        return Runs.merged(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("row", "lo", "hi")), nk)

    @staticmethod
    def cat(parts: list["Runs"]) -> "Runs":
        """The runs of every part, one after the other (`sorted` puts them in row order)."""
        return Runs(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("row", "lo", "hi")))

    def sorted(self, nk: int) -> "Runs":
        """The same runs sorted by (row, lo) (disjoint runs of parts that cover different rows)."""
        order = np.argsort(self.row * (nk + 1) + self.lo, kind="stable")
        return Runs(self.row[order], self.lo[order], self.hi[order])


class TileList:
    """Per row of tiles, the column indices of some tiles, stored compressed:
    row r (flat over heads, r = h * rows + row) holds
    `cols[start[r] : start[r] + counts[r]]`, ascending, so a plan's memory is
    proportional to its non-empty tiles. `index` is the padded view the kernels
    and the torch path read ([Hx, rows, max count], -1 padded), made on first use.

    [Note: tile runs] A list made by `from_runs` holds runs of consecutive columns
    instead (a causal row of 8192 tiles is one run), and makes `cols` on first use:
    what only counts tiles (plan, simulate, show's totals, the cost model) stays
    O(runs), while a kernel's lists still come out of `cols` / `index` unchanged.

    [Note: counted plans] A list made by `counted` knows only its per-row counts: what
    `attnc show`'s totals and `simulate` read. Some plans cannot be listed in memory
    but are cheap to count: `k % 128 >= 96` in 64-key tiles alternates empty and partial
    tiles, 67 M runs at 10^6 tokens, while its counts come from two tiles a row
    ([Note: periodic runs] in periodic.py). Such a list refuses `cols`, `index` and runs.
    """

    def __init__(self, counts: torch.Tensor, cols: torch.Tensor | None = None):
        self.counts = counts  # int32 [Hx, rows]
        if cols is not None:
            self.cols = cols  # int32 [number of tiles], row-major (else made from runs)
        self._runs: Runs | None = None
        self._make_runs = None  # deferred: what makes the runs on first use (`deferred`)

    @property
    def runs(self) -> "Runs | None":
        if self._runs is None and self._make_runs is not None:
            self._runs, self._make_runs = self._make_runs(), None
        return self._runs

    @runs.setter
    def runs(self, runs: "Runs | None") -> None:
        self._runs = runs

    @staticmethod
    def deferred(counts: np.ndarray, make_runs) -> "TileList":
        """A list of known per-row counts [Hx, rows] whose runs `make_runs()` makes on first use
        (the kernels' N-D plan, whose demoted tiles only its kernels read; what counts reads the
        counts)."""
        t = TileList(torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int32)))
        t._make_runs = make_runs
        return t

    @staticmethod
    def counted(counts: np.ndarray) -> "TileList":
        """A list of per-row counts only ([Note: counted plans]); counts [Hx, rows]."""
        t = TileList(torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int32)))
        t.is_counted = True
        return t

    is_counted = False

    def _listed(self) -> None:
        if self.is_counted:
            raise RuntimeError("this plan was counted, not listed ([Note: counted plans] in attnc/plans.py): "
                               "its tile counts are exact, its tiles are not kept; plan with pat.plan(...) for them")

    @staticmethod
    def from_runs(Hx: int, rows: int, runs: "Runs") -> "TileList":
        """From runs (merged: sorted by (row, lo), disjoint, not adjacent) of flat rows h * rows + r."""
        counts = np.bincount(runs.row, weights=runs.hi - runs.lo, minlength=Hx * rows).astype(np.int32)
        t = TileList(torch.from_numpy(counts).view(Hx, rows))
        t.runs = runs
        return t

    def to_runs(self) -> "Runs":
        """This list's runs (made from `cols` for a list that was given its columns)."""
        self._listed()
        return self.runs if self.runs is not None else Runs.of_cells(self.flat_rows().numpy(), self.cols.numpy())

    @functools.cached_property
    def cols(self) -> torch.Tensor:
        """The columns of the runs, expanded (O(tiles)); only lists made by `from_runs` get here."""
        self._listed()
        tiles = int(self.counts.sum(dtype=torch.int64))
        Hx, rows = self.counts.shape
        require(20 * tiles, f"the tile list of {tiles} tiles ({Hx} x {rows} rows)",
                "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
        return torch.from_numpy(self.runs.expand())

    @functools.cached_property
    def index(self) -> torch.Tensor:
        """int32 [Hx, rows, max(counts)] (at least 1 wide), padded with -1."""
        self._listed()
        Hx, rows = self.counts.shape
        cnt = self.counts.flatten().long()
        width = max(int(cnt.max()) if cnt.numel() else 0, 1)
        require(4 * Hx * rows * width + 16 * len(self.cols), f"the padded tile index of {Hx} x {rows} rows x {width} tiles",
                "a larger tile (block=(256, 256), --tile 256x256) or smaller sizes")
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


def _transpose(lst: TileList, nq: int, nk: int) -> TileList:
    """Per key tile, its query tiles, of a per-query-tile list (a counting sort: rows are
    visited in order, so each key tile's query tiles come out ascending; O(tiles), no
    comparison sort)."""
    Hx = lst.counts.shape[0]
    bounds = np.zeros(Hx * nq + 1, dtype=np.int64)
    np.cumsum(lst.counts.numpy().reshape(-1).astype(np.int64), out=bounds[1:])
    kt = lst.cols.numpy().astype(np.int64)
    group = np.zeros((Hx, nk), dtype=np.int64)
    for h in range(Hx):
        group[h] = np.bincount(kt[bounds[h * nq]:bounds[(h + 1) * nq]], minlength=nk)
    ptr = np.zeros(Hx * nk, dtype=np.int64)
    np.cumsum(group.reshape(-1)[:-1], out=ptr[1:])
    out = np.empty(len(kt), dtype=np.int32)
    for r in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
        s, e = int(bounds[r]), int(bounds[r + 1])
        g = kt[s:e] + (r // nq) * nk
        out[ptr[g]] = r % nq
        ptr[g] += 1
    return TileList(torch.from_numpy(group.astype(np.int32)), torch.from_numpy(out))


@dataclass(frozen=True)
class Plan:
    """Which tiles a kernel must visit, like FlexAttention's BlockMask but named.

    `full` / `partial`: per query tile, the key tiles that need no mask / need
    the mask; `full_t` / `partial_t`: per key tile, its query tiles (the backward
    kernels' lists), made on first use -- only the Triton backend and its checks read
    them, so planning (the CLI verbs, the torch path, the FlexAttention export) skips
    their O(tiles) counting sort (a causal plan at 10^6 tokens has 33 M tiles).
    The head dimension is 1 when every head has the same plan.
    """

    M: int
    N: int
    heads: int
    block: tuple[int, int]
    full: TileList
    partial: TileList
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
        plan = Plan(full=TileList.from_dense(full), partial=TileList.from_dense(partial), **fields)
        plan.__dict__["full_t"] = TileList.from_dense(full.transpose(1, 2))  # from the dense map at hand
        plan.__dict__["partial_t"] = TileList.from_dense(partial.transpose(1, 2))
        return plan

    @functools.cached_property
    def full_t(self) -> TileList:
        """Per key tile, the query tiles whose (query, key) tile is full (ascending)."""
        return _transpose(self.full, *self.shape)

    @functools.cached_property
    def partial_t(self) -> TileList:
        """Per key tile, the query tiles whose (query, key) tile is partial (ascending)."""
        return _transpose(self.partial, *self.shape)

    @staticmethod
    def from_tiles(keys: np.ndarray, full: np.ndarray, Hx: int, nq: int, nk: int, **fields) -> "Plan":
        """The plan of the non-empty tiles `keys` = (h * nq + query tile) * nk + key tile
        (int64, sorted, unique) and their bool `full` flags; no dense [nq, nk] map (the
        transposed lists are made on first use, `full_t` / `partial_t`)."""
        row, kt = np.divmod(keys, nk)
        rows = Hx * nq
        bounds = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=rows), out=bounds[1:])
        del row
        kt = kt.astype(np.int32)
        acc = np.zeros(len(full) + 1, dtype=np.int64)
        np.cumsum(full, out=acc[1:])
        f_count = acc[bounds[1:]] - acc[bounds[:-1]]
        p_count = (bounds[1:] - bounds[:-1]) - f_count
        lists = [TileList(torch.from_numpy(count.astype(np.int32)).view(Hx, nq), torch.from_numpy(kt[pick]))
                 for count, pick in ((f_count, full), (p_count, ~full))]
        return Plan(full=lists[0], partial=lists[1], **fields)

    @staticmethod
    def from_runs(full: Runs, partial: Runs, Hx: int, nq: int, nk: int, **fields) -> "Plan":
        """The plan of runs of full and of partial key tiles per row h * nq + query tile
        (each merged, `Runs.merged`); O(runs): the tile lists are made on first use."""
        return Plan(full=TileList.from_runs(Hx, nq, full), partial=TileList.from_runs(Hx, nq, partial), **fields)

    @property
    def shape(self) -> tuple[int, int]:
        if self.tile_shape is not None:
            return len(self.offsets_q) - 1, len(self.offsets_k) - 1
        return -(-self.M // self.block[0]), -(-self.N // self.block[1])

    def tiles(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, full): the non-empty tiles as `from_tiles` takes them, sorted keys
        (h * nq + query tile) * nk + key tile and their full flags; O(tiles), no dense map."""
        nk = self.shape[1]
        parts = [(lst.flat_rows().numpy() * nk + lst.cols.numpy().astype(np.int64), flag)
                 for lst, flag in ((self.full, True), (self.partial, False))]
        keys = np.concatenate([k for k, _ in parts])
        full = np.concatenate([np.full(len(k), f) for k, f in parts])
        order = np.argsort(keys, kind="stable")
        return keys[order], full[order]

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

    def summary(self) -> str:
        """One line for kernel headers: tiles, method, per-head or not, and the tile counts."""
        c = self.counts()
        hx = self.full.counts.shape[0]
        heads = "one plan for all heads" if hx == 1 else f"{hx} per-head plans"
        tiles = (f"{self.block[0]}x{self.block[1]} tiles" if self.tile_shape is None else
                 "/".join("x".join(map(str, t)) for t in self.tile_shape) + f" tiles = {self.block[0]}/{self.block[1]} tokens")
        return f"{tiles} ({self.method}, {heads}): {c['tiles_full']} full + {c['tiles_partial']} partial of {c['tiles_total']}"

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
