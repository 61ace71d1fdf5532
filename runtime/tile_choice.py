"""The torch path's knobs and its tile choice: 1-D tiles, or N-D tiles on a grid when the
cost model predicts them faster.

input:  a validated `Call` (its pattern, sizes, grid and any `block=` it was given), the
        torch path's `TorchPathConfig`.
output: the tiles the torch path runs with (`choose_tile`, `tile_block`), every candidate's
        predicted time (`tile_options`), the time model itself (`tile_cost`, `COST`).
does not: build schedules (schedules.py) or compute attention (torch_backend.py); it
        plans candidate tiles only to weigh them.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnc.plans import Plan
from attnc.errors import AttnError
from attnc.lru import LRU

from .backend import Call


@dataclass(frozen=True)
class TorchPathConfig:
    """Knobs of the torch path, in one place.

    block: (query tile, key tile); chunk_elements: score elements of one
    chunk (per batch element); max_group_keys: keys merged per online-softmax step;
    backward_chunk_elements: score elements of one part of a chunk in backward.
    """

    block: tuple[int, int] = (64, 64)
    chunk_elements: int = 1 << 20
    max_group_keys: int = 2048
    mask_chunk_elements: int = 1 << 24
    #: score elements of one backward part (per batch element): backward keeps P and dS, and
    #: smaller parts stay in cache (sliding 512 at 8192: 466 ms at 1 << 18, 518 ms at 1 << 20)
    backward_chunk_elements: int = 1 << 18


CONFIG = TorchPathConfig()


def tile_block(call: Call, config: TorchPathConfig = CONFIG) -> tuple[int, int]:
    """The torch path's 1-D tile for this call: the configured one, shrunk to short sequences."""
    return min(config.block[0], _pow2_at_least(call.M)), min(config.block[1], _pow2_at_least(call.N))


#: N-D tiles the torch path considers per grid dimension: 64-token query boxes, key boxes of
#: 64 or 16 tokens (small key boxes cover a window's footprint more tightly; measured on a
#: 7x7 neighbourhood at 96x96: 8x8 / 4x4 tiles 193 ms, 8x8 / 8x8 291 ms, 1-D 301 ms)
ND_TILES = {2: (((8, 8), (8, 8)), ((8, 8), (4, 4))), 3: (((4, 4, 4), (4, 4, 4)), ((2, 4, 8), (1, 4, 4)))}
#: N-D tiles are chosen when their predicted time is at most this fraction of the 1-D
#: tiles' (the model's error on the cases it was fitted to is about 10 %)
ND_GAIN = 0.9

_TILE_CHOICES = LRU("tile_choices", 64, "the torch path's tile choice per pattern and size")

#: the torch path's time model, ns per full-tile pair, partial-tile pair, visited tile and
#: (N-D tiles) token gathered into and out of the tile-major order, per head: a least-squares
#: fit to 12 runs of 2-D / 3-D neighbourhoods and blocked attention, 1-D and N-D tiles,
#: H = 8, D = 64, fp32, one thread on this project's 2-core machine (2026-11-28), when the torch
#: path gathered 64-key tiles. With key ranges (views, runtime/key_ranges.py) it overestimates
#: 1-D tiles on grids but still orders the candidates as measured: 7x7 at 96x96 predicted 289 /
#: 152 ms (1-D / 8x8-4x4), measured 229 / 159; blocked 8x8 at 64x64 93 / 27, measured 75 / 28
COST = {"full": 2.6, "partial": 5.4, "tile": 690.0, "token": 635.0}


def tile_cost(plan: Plan, heads: int, layout=None) -> float:
    """Predicted forward time (ns) of the torch path on `plan` ([Note: N-D tiles here])."""
    bm, bn = plan.block
    per_head = 1 if plan.full.counts.shape[0] > 1 else heads
    full, partial = int(plan.full.counts.sum()) * per_head, int(plan.partial.counts.sum()) * per_head
    permute = 0 if layout is None else COST["token"] * (layout.M + layout.N) / 2 * heads
    return (COST["full"] * full * bm * bn + COST["partial"] * partial * bm * bn
            + COST["tile"] * (full + partial) + permute)


def choose_tile(call: Call, config: TorchPathConfig = CONFIG):
    """The torch path's tiles for `call`: 1-D `tile_block`, or N-D tiles on a grid.

    [Note: N-D tiles here] On a pure grid, 1-D tiles of 64 consecutive tokens cut
    across grid rows, so a 7x7 neighbourhood's tiles visit ~10x the pairs it allows. N-D
    tiles are compact boxes of the grid: q / k / v are gathered into the padded
    tile-major order (codegen/ndtiles.TileLayout), the same schedule machinery runs on
    it, and out / lse / gradients are scattered back. The choice compares the predicted
    time (`tile_cost`: full and partial pairs, tiles, the permutation) of the 1-D plan
    and of each `ND_TILES` candidate's plan (cached per pattern and size); N-D wins at
    `ND_GAIN` of the 1-D time or less. `block=` N-D tiles given to
    the op are used as asked. Patterns with run-time inputs or score terms, mixed
    layouts and grids under 256 tokens keep 1-D tiles."""
    return tile_options(call, config)[0]


def tile_options(call: Call, config: TorchPathConfig = CONFIG) -> tuple:
    """(the tiles `choose_tile` takes, {tiles: predicted time in ns} of every candidate it
    weighed; {} when it weighed none)."""
    one = tile_block(call, config)
    ir_ = call.pattern.ir
    lay = ir_.layout
    if not lay.axes or lay.text is not None or ir_.inputs or ir_.score is not None or call.M != call.N:
        return one, {}
    if call.block is not None and isinstance(call.block[0], tuple):
        return call.block, {}
    candidates = ND_TILES.get(len(lay.axes), ())
    if not candidates or config.block != CONFIG.block or call.N < 256:
        return one, {}
    key = (ir_, call.M, call.Hq, call.grid, config)

    def decide():
        try:
            call.lowered()
        except AttnError:
            return one, {}

        def cost(block):
            plan = call.kernel_plan(block)  # N-D tiles: in the layout's padded order
            return tile_cost(plan, call.Hq, tile_layout(call, block))

        costs = {block: cost(block) for block in (one, *candidates)}
        best = min(candidates, key=costs.get)
        return (best if costs[best] <= ND_GAIN * costs[one] else one), costs

    return _TILE_CHOICES.get(key, decide)


def tile_layout(call: Call, block):
    """The padded tile-major order (codegen/ndtiles.TileLayout) of N-D tiles `block` on the
    call's grid; None for 1-D tiles."""
    return call.shape.with_tiles(call.pattern.ir, block).layout()


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
