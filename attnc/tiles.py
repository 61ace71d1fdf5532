"""The tiles a call may ask for: `plan(block=...)`, `pat(q, k, v, block=...)`.

input:  a `block=` argument, the pattern's layout and the sizes M, N.
output: (bm, bn) for 1-D tiles, or ((query tile shape), (key tile shape)) for N-D tiles
        on a pure grid; ValueError (expected / got / try) for anything else.
does not: build plans (analysis.py) or kernels (codegen/); every layer that takes a
        `block=` checks it here, with the same messages.
"""

from __future__ import annotations

from .ir import Layout

#: the largest tile side a plan accepts (tile tables hold sizes as int32)
MAX_TILE = 1 << 30


def check_block(block, layout: Layout, M: int, N: int) -> tuple:
    """(bm, bn), or ((query tile shape), (key tile shape)) for N-D tiles on a grid."""
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    try:
        bm, bn = block
    except (TypeError, ValueError):
        raise ValueError(f"block: expected (query tile, key tile) like (128, 128), got {block!r}") from None
    if any(isinstance(b, (tuple, list)) for b in (bm, bn)):
        d = len(layout.axes)
        shapes = tuple(tuple(b) if isinstance(b, (tuple, list)) else (b,) * d for b in (bm, bn))
        if not layout.axes or layout.text is not None:
            raise ValueError(f"block: N-D tiles need a pattern on a pure grid, got one on {layout}; try 1-D tiles like (128, 128)")
        if M != N:
            raise ValueError(f"block: N-D tiles cover the whole grid: expected M = N, got M={M}, N={N}; try 1-D tiles")
        if any(len(t) != d or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_TILE for x in t)
               for t in shapes):
            raise ValueError(f"block: expected two tile shapes of {d} positive sizes (one per axis of {layout}), "
                             f"got {block!r}; try {tuple((8,) * d for _ in range(2))}")
        return shapes
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in (bm, bn)):
        raise ValueError(f"block: expected positive tile sizes, got {block!r}")
    if max(bm, bn) > MAX_TILE:
        raise ValueError(f"block: expected tile sizes up to 2**30 = {MAX_TILE}, got {block!r}; "
                         f"try a tile no larger than the sequence, e.g. ({min(bm, M, MAX_TILE)}, {min(bn, N, MAX_TILE)})")
    return bm, bn
