"""Pictures of masks: per-tile counts, an ASCII block map and a PNG.

input:  a BoundPattern and sizes.
output: tile statistics, exact: from the tile plan (`plan_tile_stats`: full
        tiles count their size, partial tiles are counted by the analysis or
        evaluated in bounded chunks) or from the reference mask in row chunks
        (`tilestats.tile_stats`, the brute-force view); and their renderings.
does not: plan (analysis.py) or evaluate masks itself (reference.py, in bounded chunks).
"""

from __future__ import annotations

import dataclasses

import torch

from .tilestats import TileStats, ascii_map, stats_from_counts

#: a PNG panel shows at most this many cells per side (tiles summed into cells beyond)
PNG_CELLS = 1024


def plan_tile_stats(pat, M: int, N: int, H: int, grid, block: tuple[int, int]) -> tuple[TileStats, torch.Tensor]:
    """`tile_stats` from the plan (`pair_counts.tile_counts`), not from dense mask rows: work
    O(tiles + pairs inside partial tiles), memory O(tiles + M); of display cells when there
    are more tiles than a picture shows ([Note: display cells])."""
    from .analysis import plan_blocks
    from .errors import AttnError

    nq, nk = -(-M // block[0]), -(-N // block[1])
    f = -(-max(nq, nk) // PNG_CELLS)
    if f == 1:
        return _counted_stats(pat, M, N, H, grid, block)
    # [Note: display cells] Past PNG_CELLS tiles a side, every picture sums tiles into cells
    # anyway, so the pairs are counted per cell of f x f tiles (the tiles of f-times larger
    # ones): a cell is all full / all empty exactly when its count is its size / 0, so the
    # pictures are those of the tiles, and the densities are exact. What only the tiles
    # know, how many are full and partial, comes from the plan's tile counts, which stay
    # O(runs) ([Note: tile runs] in plans.py): 10^6 tokens in 128-token tiles are 67 M
    # tiles a head, but one run per row for a causal head; or from a counted plan, no runs
    # at all ([Note: counted plans]).
    try:
        plan = plan_blocks(pat.ir, M, N, H, grid, block=block, counted=True)  # [Note: counted plans]
    except AttnError as err:
        raise err.with_sources(pat.program.sources) from None
    stats, rows = _counted_stats(pat, M, N, H, grid, (block[0] * f, block[1] * f))
    totals = torch.stack([lst.counts.sum(-1, dtype=torch.int64) for lst in (plan.full, plan.partial)], -1)
    return dataclasses.replace(stats, tiles=(tuple(block), nq, nk, totals)), rows


def _counted_stats(pat, M: int, N: int, H: int, grid, block: tuple[int, int]) -> tuple[TileStats, torch.Tensor]:
    """Per-tile counts of `block` tiles, grouped by heads with equal arms where there are such."""
    from .analysis import head_classes
    from .pair_counts import tile_counts
    from .errors import AttnError

    try:
        classes = head_classes(pat.ir, M, N, H, grid)
        parts = [tile_counts(p, M, N, H, grid, block) for _, p in classes] if classes else None
        if parts is None or any(c.shape[0] != 1 for _, c, _ in parts):  # no groups, or a group differs per head
            _, counts, rows = tile_counts(pat.ir, M, N, H, grid, block)
            return stats_from_counts(counts, M, N, block, H), rows.expand(counts.shape[0], -1)
    except AttnError as err:
        raise err.with_sources(pat.program.sources) from None
    index = [0] * H
    for i, (hs, _) in enumerate(classes):
        for h in hs:
            index[h] = i
    counts = torch.cat([c for _, c, _ in parts])
    rows = torch.cat([r.expand(1, -1) for _, _, r in parts])
    return stats_from_counts(counts, M, N, block, H, tuple(index)), rows


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
            if (torch.equal(stats.head(r), stats.head(h)) and torch.equal(row_counts[stats.row(r)], row_counts[src])
                    and stats.tile_totals(r) == stats.tile_totals(h)):
                seen[src] = i
                groups[i].append(h)
                break
        else:
            seen[src] = len(groups)
            groups.append([h])
            reps.append(h)
    return groups


def render_text(pat, stats: TileStats, row_counts: torch.Tensor, groups: list[list[int]], max_cells: int = 64) -> str:
    (bm, bn), nq, nk = stats.tile_grid()
    out = [f"{pat.text()}",
           f"M = {stats.M}, N = {stats.N}, heads = {stats.heads}, tiles {bm}x{bn}: {nq} x {nk}"]
    for g in groups:
        h = g[0]
        st = stats.state(h)
        full, part, total = stats.tile_totals(h)
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
        f *= stats.cell()
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
        (bm, bn), _, _ = stats.tile_grid()
        per = "" if stats.cell() == 1 else f", {stats.cell()}x{stats.cell()} tiles a pixel"
        ax.set_xlabel(f"key tile ({bn}{per})")
        ax.set_ylabel(f"query tile ({bm})")
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
