"""Per-tile counts of a mask and their ASCII picture: what `attnc show`, `check_rows`'
exact scan and `plan.to_string()` count and draw with.

input:  mask rows (a function of a row range), or per-tile counts already made (from a plan).
output: `TileStats` (allowed pairs per head, query tile and key tile, with the tile sizes),
        the allowed keys of every query row, and `ascii_map` of tile states.
does not: build plans (analysis.py) or render patterns and PNGs (show.py, built on this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .limits import require
from .reference import WORK_BYTES_PER_PAIR

#: elements of mask evaluated per chunk (bounds peak memory at large sizes)
CHUNK_ELEMENTS = 1 << 24


def tile_lengths(length: int, b: int) -> torch.Tensor:
    """int64 [ceil(length / b)]: the tokens of every 1-D tile of b tokens (the last may be short)."""
    t = torch.arange(-(-length // b))
    return torch.clamp((t + 1) * b, max=length) - t * b


def count_dtype(block: tuple[int, int]) -> torch.dtype:
    """int32 per-tile counts unless a tile holds 2**31 pairs or more."""
    return torch.int32 if block[0] * block[1] < 2 ** 31 else torch.int64


@dataclass(frozen=True)
class TileStats:
    """Allowed-pair counts per (head, query tile, key tile).

    `counts` has one row per distinct head (1 when every head has the same counts, else
    `heads`); tile sizes are kept as the two 1-D tile lengths, never as an [nqb, nkb]
    map, and states / fractions are made one head at a time: at 10^6 tokens in 128-token
    tiles (8192 x 8192 tiles) a map of int64 is 0.5 GB per head."""

    counts: torch.Tensor  # int32 (int64 for tiles over 2**31 pairs) [1 or heads, nqb, nkb]
    qsz: torch.Tensor  # int64 [nqb]: tokens of every query tile (the last may be short)
    ksz: torch.Tensor  # int64 [nkb]
    M: int
    N: int
    block: tuple[int, int]
    heads: int
    #: the row of `counts` (and of the row counts beside them) of every head, when rows stand
    #: for groups of heads with equal arms (analysis.head_classes); None: row min(h, rows - 1)
    index: tuple | None = None
    #: when `counts` are of display cells ([Note: display cells] in show.py): the plan's own tiles,
    #: (block, nq, nk, totals) with totals int64 [1 or heads, 2], the full and the partial tiles
    #: of each head; None when `counts` are of the plan's tiles
    tiles: tuple | None = None

    def row(self, h: int) -> int:
        return self.index[h] if self.index is not None else min(h, self.counts.shape[0] - 1)

    def tile_grid(self) -> tuple[tuple[int, int], int, int]:
        """(block, nq, nk) of the plan's tiles (of `counts` unless they are display cells)."""
        return self.tiles[:3] if self.tiles is not None else (self.block, len(self.qsz), len(self.ksz))

    def tile_totals(self, h: int) -> tuple[int, int, int]:
        """(full, partial, all) tiles of head h, of the plan's tiles."""
        if self.tiles is None:
            st = self.state(h)
            return int((st == 2).sum()), int((st == 1).sum()), st.numel()
        _, nq, nk, totals = self.tiles
        full, part = totals[min(h, totals.shape[0] - 1)].tolist()
        return full, part, nq * nk

    def cell(self) -> int:
        """Tiles per side of one entry of `counts` (1 unless they are display cells)."""
        return 1 if self.tiles is None else self.block[0] // self.tiles[0][0]

    def head(self, h: int) -> torch.Tensor:
        """Head h's counts [nqb, nkb] (a view)."""
        return self.counts[self.row(h)]

    def allowed(self, h: int | None = None) -> int:
        """Allowed pairs of head h, or of every head."""
        if h is not None:
            return int(self.head(h).sum(dtype=torch.int64))
        per = self.counts.sum((1, 2), dtype=torch.int64)
        return sum(int(per[self.row(h)]) for h in range(self.heads))

    def sizes(self, rows: slice = slice(None), dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Pairs per tile of the query-tile rows `rows` [rows, nkb] (edge tiles are smaller)."""
        return self.qsz[rows, None].to(dtype) * self.ksz[None, :].to(dtype)

    def state(self, h: int) -> torch.Tensor:
        """int8 [nqb, nkb] of head h: 0 empty, 1 partial, 2 full (row chunks: no int64 map)."""
        c = self.head(h)
        out = torch.empty(c.shape, dtype=torch.int8)
        step = max(1, CHUNK_ELEMENTS // max(1, c.shape[1]))
        for r0 in range(0, c.shape[0], step):
            part = c[r0:r0 + step]
            size = self.sizes(slice(r0, r0 + step), c.dtype)
            out[r0:r0 + step] = (part > 0).to(torch.int8) + (part == size).to(torch.int8)
        return out

    def fraction(self, h: int, cells: int | None = None) -> torch.Tensor:
        """float64 fraction of allowed pairs per tile of head h; with `cells`, tiles summed
        into at most cells x cells display cells first (pictures of large maps)."""
        c, size = self.head(h).to(torch.int64), self.sizes()
        if cells is not None and max(c.shape) > cells:
            f = -(-max(c.shape) // cells)
            c, size = _pool(c, f), _pool(size, f)
        return c.double() / size.clamp(min=1).double()

    def density(self, head: int | None = None) -> float:
        n = 1 if head is not None else self.heads
        return self.allowed(head) / (n * self.M * self.N)

    def full_and_nonempty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """bool [1 or heads, nqb, nkb] pairs: every pair allowed / some pair allowed."""
        return self.counts == self.sizes(dtype=self.counts.dtype), self.counts > 0


def _pool(x: torch.Tensor, f: int) -> torch.Tensor:
    """Sums of f x f blocks of a 2-D int64 tensor (zero padded at the edges)."""
    nq, nk = x.shape
    cq, ck = -(-nq // f), -(-nk // f)
    pad = torch.zeros(cq * f, ck * f, dtype=x.dtype)
    pad[:nq, :nk] = x
    return pad.view(cq, f, ck, f).sum((1, 3))


def stats_bytes(M: int, N: int, H: int, block: tuple[int, int]) -> int:
    """About the peak bytes of `tile_stats` (see [Note: memory limit] in attnc/limits.py): per-tile
    counts, sizes and states (and the pictures made from them), per-row counts, one chunk of mask rows
    as int64 and its per-tile sums."""
    bm, bn = block
    nqb, nkb = -(-M // bm), -(-N // bn)
    rows = min(M, max(bm, (CHUNK_ELEMENTS // max(1, H * N)) // bm * bm))
    return (8 * H + 8 * 4) * nqb * nkb + 16 * H * M + rows * N * (9 * H + WORK_BYTES_PER_PAIR) + 8 * H * rows * nkb


def tile_stats(mask_rows, M: int, N: int, H: int, block: tuple[int, int]) -> tuple[TileStats, torch.Tensor]:
    """Per-tile counts and, per head, the number of allowed keys of every query row.

    `mask_rows(lo, hi)` returns the bool mask rows lo..hi as [H, hi - lo, N]."""
    bm, bn = block
    nqb, nkb = -(-M // bm), -(-N // bn)
    rows_per_chunk = max(bm, (CHUNK_ELEMENTS // max(1, H * N)) // bm * bm)
    require(stats_bytes(M, N, H, block), f"counting the {H} x {nqb} x {nkb} tiles of {bm}x{bn} at M = {M}, N = {N}",
            "a larger tile (attnc show --block 1024), smaller sizes, or `attnc simulate`, which counts tiles from the "
            "plan without evaluating every pair")
    counts = torch.zeros(H, nqb, nkb, dtype=count_dtype(block))
    row_counts = torch.zeros(H, M, dtype=torch.int64)
    kb = torch.arange(N) // bn
    for lo in range(0, M, rows_per_chunk):
        hi = min(M, lo + rows_per_chunk)
        m = mask_rows(lo, hi).to(torch.int64)  # [H, r, N]
        row_counts[:, lo:hi] = m.sum(-1)
        qb = torch.arange(lo, hi) // bm
        per_k = torch.zeros(H, hi - lo, nkb, dtype=torch.int64).index_add_(2, kb, m)
        counts.index_add_(1, qb, per_k.to(counts.dtype))
    return stats_from_counts(counts, M, N, block, H), row_counts


def stats_from_counts(counts: torch.Tensor, M: int, N: int, block: tuple[int, int], heads: int, index=None) -> TileStats:
    """`TileStats` of per-tile counts [1 or heads, nqb, nkb] made elsewhere (`show.plan_tile_stats`)."""
    return TileStats(counts, tile_lengths(M, block[0]), tile_lengths(N, block[1]), M, N, block, heads, index)


def _cells(state: torch.Tensor, max_cells: int) -> tuple[torch.Tensor, int, int]:
    """Aggregate tiles into at most max_cells x max_cells display cells."""
    nq, nk = state.shape
    fq = -(-nq // max_cells)
    fk = -(-nk // max_cells)
    f = max(fq, fk)
    cq, ck = -(-nq // f), -(-nk // f)
    pad = torch.full((cq * f, ck * f), -1, dtype=torch.int8)
    pad[:nq, :nk] = state
    blocks = pad.view(cq, f, ck, f).permute(0, 2, 1, 3).reshape(cq, ck, f * f)
    valid = blocks >= 0
    all_full = ((blocks == 2) | ~valid).all(-1)
    all_empty = ((blocks == 0) | ~valid).all(-1)
    out = torch.where(all_full, 2, torch.where(all_empty, 0, 1)).to(torch.int8)
    return out, f, f


CHARS = {0: ".", 1: "+", 2: "#"}


def ascii_map(state: torch.Tensor, max_cells: int = 64) -> tuple[str, int]:
    cells, f, _ = _cells(state, max_cells)
    lines = ["".join(CHARS[int(x)] for x in row) for row in cells]
    return "\n".join(lines), f
