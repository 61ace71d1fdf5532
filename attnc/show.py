"""Pictures of masks: per-tile counts, an ASCII block map and a PNG.

input:  a BoundPattern and sizes.
output: tile statistics, exact: from the tile plan (`plan_tile_stats`: full
        tiles count their size, partial tiles are counted by the analysis or
        evaluated in bounded chunks) or from the reference mask in row chunks
        (`tile_stats`, the brute-force view); and their renderings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .limits import require
from .reference import WORK_BYTES_PER_PAIR

#: elements of mask evaluated per chunk (bounds peak memory at large sizes)
CHUNK_ELEMENTS = 1 << 24
#: a PNG panel shows at most this many cells per side (tiles summed into cells beyond)
PNG_CELLS = 1024


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

    def row(self, h: int) -> int:
        return self.index[h] if self.index is not None else min(h, self.counts.shape[0] - 1)

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
    from .analysis import count_dtype

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
    return _stats(counts, M, N, block, H), row_counts


def _stats(counts: torch.Tensor, M: int, N: int, block: tuple[int, int], heads: int, index=None) -> TileStats:
    from .analysis import tile_lengths

    return TileStats(counts, tile_lengths(M, block[0]), tile_lengths(N, block[1]), M, N, block, heads, index)


def plan_tile_stats(pat, M: int, N: int, H: int, grid, block: tuple[int, int]) -> tuple[TileStats, torch.Tensor]:
    """`tile_stats` from the plan (`analysis.tile_counts`), not from dense mask rows: work
    O(tiles + pairs inside partial tiles), memory O(tiles + M)."""
    from .analysis import head_classes, tile_counts
    from .errors import AttnError

    try:
        classes = head_classes(pat.ir, M, N, H, grid)
        parts = [tile_counts(p, M, N, H, grid, block) for _, p in classes] if classes else None
        if parts is None or any(c.shape[0] != 1 for _, c, _ in parts):  # no groups, or a group differs per head
            _, counts, rows = tile_counts(pat.ir, M, N, H, grid, block)
            return _stats(counts, M, N, block, H), rows.expand(counts.shape[0], -1)
    except AttnError as err:
        raise err.with_sources(pat.program.sources) from None
    index = [0] * H
    for i, (hs, _) in enumerate(classes):
        for h in hs:
            index[h] = i
    counts = torch.cat([c for _, c, _ in parts])
    rows = torch.cat([r.expand(1, -1) for _, _, r in parts])
    return _stats(counts, M, N, block, H, tuple(index)), rows


def head_groups(stats: TileStats, row_counts: torch.Tensor) -> list[list[int]]:
    """Heads grouped by identical tile counts and row counts (what the picture shows);
    `row_counts` has the rows of the counts (`stats.row(h)` is head h's row of both)."""
    groups: list[list[int]] = []
    reps: list[int] = []
    seen: dict = {}  # row of the counts -> group: heads sharing it are equal
    for h in range(stats.heads):
        src = stats.row(h)
        if src in seen:
            groups[seen[src]].append(h)
            continue
        for i, r in enumerate(reps):
            if torch.equal(stats.head(r), stats.head(h)) and torch.equal(row_counts[stats.row(r)], row_counts[src]):
                seen[src] = i
                groups[i].append(h)
                break
        else:
            seen[src] = len(groups)
            groups.append([h])
            reps.append(h)
    return groups


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


def render_text(pat, stats: TileStats, row_counts: torch.Tensor, groups: list[list[int]], max_cells: int = 64) -> str:
    bm, bn = stats.block
    out = [f"{pat.text()}",
           f"M = {stats.M}, N = {stats.N}, heads = {stats.heads}, tiles {bm}x{bn}: "
           f"{len(stats.qsz)} x {len(stats.ksz)}"]
    for g in groups:
        h = g[0]
        st = stats.state(h)
        full, part = int((st == 2).sum()), int((st == 1).sum())
        total = st.numel()
        label = "head " + str(h) if len(g) == 1 else "heads " + _ranges(g)
        allowed = stats.allowed(h)
        empty_rows = (row_counts[stats.row(h)] == 0).nonzero().flatten()
        out.append("")
        out.append(f"{label}: density {allowed / (stats.M * stats.N):.4f} ({allowed} of {stats.M * stats.N} pairs); "
                   f"tiles: {full} full, {part} partial, {total - full - part} empty of {total} "
                   f"(tile density {(full + part) / total:.4f})")
        if len(empty_rows):
            out.append(f"  warning: {len(empty_rows)} query rows attend no key (e.g. row {int(empty_rows[0])})")
        pic, f = ascii_map(st, max_cells)
        if f > 1:
            out.append(f"  (each character: {f}x{f} tiles)")
        out.extend("  " + line for line in pic.splitlines())
    out.append("")
    out.append("legend: # full tile   + partial tile   . empty tile")
    return "\n".join(out)


def _ranges(xs: list[int]) -> str:
    parts = []
    start = prev = xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)


def render_png(path: str, pat, stats: TileStats, groups: list[list[int]], token_view: torch.Tensor | None = None,
               query_view: tuple[str, torch.Tensor] | None = None) -> None:
    """Block-density maps (fraction of allowed pairs per tile, on a square-root colour scale so
    that sparse partial tiles stay visible), one panel per distinct head,
    plus a token-level zoom of the diagonal when `token_view` is given, plus a
    `query_view = (title, image)` panel (e.g. the keys one query attends, laid out on the
    grid) when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    shown = groups[:4]
    panels = len(shown) + (token_view is not None) + (query_view is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.4), squeeze=False)
    for ax, g in zip(axes[0], shown):
        h = g[0]
        ax.imshow(stats.fraction(h, PNG_CELLS).numpy(), cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
        label = f"head {h}" if len(g) == 1 else f"heads {_ranges(g)}"
        ax.set_title(f"{label}: density {stats.density(h):.3f}", fontsize=9)
        ax.set_xlabel(f"key tile ({stats.block[1]})")
        ax.set_ylabel(f"query tile ({stats.block[0]})")
    rest = list(axes[0][len(shown):])
    if token_view is not None:
        ax = rest.pop(0)
        ax.imshow(token_view.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"token zoom, {token_view.shape[0]}x{token_view.shape[1]} at the diagonal (head {shown[0][0]})", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    if query_view is not None:
        ax = rest.pop(0)
        title, image = query_view
        ax.imshow(image.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{pat.name}  (M={stats.M}, N={stats.N})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
