"""N-D tiles on grids: the padded tile-major token order, its plan and its kernels.

input:  a pure-grid pattern at concrete sizes and N-D tile shapes
        ((query tile shape), (key tile shape)), as `KernelConfig(tile=...)`.
output: `TileLayout` (where every grid token sits in the padded tile-major
        order: index tensors for the runtime's gather / scatter), the plan's
        tile lists in that order and the mask composed with the permutation
        (`permute`, see [Note: N-D tiles]), from which the pipeline
        (pipeline.py) generates the unchanged kernels over M' x N' positions.
does not: generate or launch anything; runtime/triton_backend.py gathers q, k, v
        into the order, runs the kernels and scatters out, lse and the gradients back.

[Note: why pad] Edge tiles of the analysis' tile-major order are smaller when a
grid size is not a multiple of the tile (`Plan.offsets_q`). The kernels want
every tile to be BLOCK_M = prod(query tile) consecutive rows, so each grid axis
is padded to a multiple of the tile's extent on it: tile t of the plan is then
positions t * BLOCK_M .. (t + 1) * BLOCK_M - 1, with the padding at the tile's
out-of-grid coordinates. Padded positions hold zero vectors and are never
allowed by the mask; a tile that contains padding is therefore demoted from
*full* to *partial* (full tiles skip the mask), which only touches edge tiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from attnc.plans import Plan, Runs, TileList

from .expr import Builder, Expr, Var, substitute, unravel
from .lowered import Lowered


# ----------------------------------------------------------------------------- the mask in tile-major order


def permute(low: Lowered, tile_q: tuple[int, ...], tile_k: tuple[int, ...]) -> Lowered:
    """The mask of a pure-grid pattern in the padded tile-major token order of N-D tiles.

    [Note: N-D tiles] Every grid axis is padded to a multiple of the tile's extent
    on it, so every tile is full size: tile t holds positions t * BLOCK .. (t + 1)
    * BLOCK - 1 (BLOCK = prod(tile)), tiles row-major over the tile grid, tokens
    row-major inside a tile (the plan's `tileboxes.tile_major` order, plus the padding).
    The returned expression is `low.expr` with `q` and `k` replaced by

        p -> (p // BLOCK, p % BLOCK) -> (tile coords, coords in the tile)
          -> x_i = tile_i * t_i + r_i -> flat index ravel(min(x_i, L_i - 1))

    and'ed with `x_i < L_i` on every axis (padded positions are never allowed;
    the clamp keeps table lookups in range). The builder's ravel/unravel folding
    turns the original `flat // L` and `flat % L` back into the coordinates, so
    the kernel computes grid coordinates once per position. M / N become the
    padded lengths; `tables` and `h`, `b` are unchanged.

    >>> low = lower(attnc.loads("pattern p on grid(y, x) = neighborhood(3)").pattern().ir, 36, 36, 1, (6, 6))
    >>> permute(low, (4, 4), (4, 4)).M
    64
    """
    if not low.grid or low.M != low.N or low.tiles is not None:
        raise ValueError(f"permute: expected a pattern lowered on a pure grid with M = N, got grid={low.grid}, "
                         f"M={low.M}, N={low.N}")
    sizes = [int(s) for s in low.grid]
    for name, t in (("query", tile_q), ("key", tile_k)):
        if len(t) != len(sizes):
            raise ValueError(f"permute: expected a {name} tile of {len(sizes)} sizes (one per grid axis), got {t!r}")
    Mp, Np = padded_length(sizes, tile_q), padded_length(sizes, tile_k)
    bounds = dict(low.var_bounds)
    bounds.update(q=(0, Mp - 1), k=(0, Np - 1))
    b = Builder(bounds)
    q_flat, q_ok = tile_major_position(b, Var("q"), sizes, tile_q)
    k_flat, k_ok = tile_major_position(b, Var("k"), sizes, tile_k)
    expr = b.and_(q_ok, k_ok, substitute(b, low.expr, {"q": q_flat, "k": k_flat}))
    return Lowered(name=low.name, text=low.text, M=Mp, N=Np, H=low.H, grid=low.grid, expr=expr, tables=low.tables,
                   var_bounds=tuple(sorted(bounds.items())), tiles=(tuple(tile_q), tuple(tile_k)))


def padded_length(sizes, tile) -> int:
    """Tokens of the padded tile-major order: every axis rounded up to a multiple of its tile extent."""
    return math.prod(-(-int(L) // t) * t for L, t in zip(sizes, tile))


def tile_major_position(b: Builder, p: Expr, sizes: list[int], tile) -> tuple[Expr, Expr]:
    """(flat grid index, valid) of position `p` of the padded tile-major order (see `permute`)."""
    counts = [-(-L // t) for L, t in zip(sizes, tile)]
    block = math.prod(tile)
    tcoords = unravel(b, b.floordiv(p, b.c(block)), counts)
    rcoords = unravel(b, b.mod(p, b.c(block)), list(tile))
    xs = [b.add(b.mul(tc, b.c(t)), rc) for tc, t, rc in zip(tcoords, tile, rcoords)]
    valid = b.and_(*[b.lt(x, b.c(L)) for x, L in zip(xs, sizes)])
    flat = b.minimum(xs[0], b.c(sizes[0] - 1))
    for x, L in zip(xs[1:], sizes[1:]):
        flat = b.add(b.mul(flat, b.c(L)), b.minimum(x, b.c(L - 1)))
    return flat, valid


# ----------------------------------------------------------------------------- tile shapes and layouts


def tile_text(tile) -> str:
    """`8x8/8x4`: the CLI's spelling of ((8, 8), (8, 4))."""
    return "/".join("x".join(map(str, t)) for t in tile)


def check_tile(tile, block: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`KernelConfig.tile` normalised to two tuples (ValueError with expected / got / try otherwise).

    Each tile's token count is a kernel tile (BLOCK_M / BLOCK_N): a power of two
    >= 16, what tl.dot needs. `block` is the config's (block_m, block_n): the
    defaults (64, 64) or the same token counts."""
    try:
        tq, tk = (tuple(t) for t in tile)
    except (TypeError, ValueError):
        raise ValueError(f"KernelConfig.tile: expected ((query tile shape), (key tile shape)) like ((8, 8), (8, 4)), "
                         f"got {tile!r}") from None
    for name, t in (("query", tq), ("key", tk)):
        if not t or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in t):
            raise ValueError(f"KernelConfig.tile: expected a {name} tile shape of positive sizes, got {t!r}; "
                             f"try ((8, 8), (8, 4))")
        n = math.prod(t)
        if n < 16 or n & (n - 1):
            raise ValueError(f"KernelConfig.tile: expected tile shapes of a power of two >= 16 tokens (tl.dot needs "
                             f"16), got the {name} tile {'x'.join(map(str, t))} = {n} tokens; try 4x4, 8x4 or 8x8")
    if len(tq) != len(tk):
        raise ValueError(f"KernelConfig.tile: expected query and key tiles over the same axes, got {tile_text((tq, tk))}; "
                         f"try {tile_text((tq, tq))}")
    counts = (math.prod(tq), math.prod(tk))
    if tuple(block) not in ((64, 64), counts):
        raise ValueError(f"KernelConfig: block_m / block_n follow the N-D tile ({counts[0]} / {counts[1]} tokens), "
                         f"got block_m={block[0]}, block_n={block[1]}; try KernelConfig(tile={(tq, tk)!r}) alone")
    return tq, tk


def nd_reason(pat, M: int, N: int, tile) -> str | None:
    """Why N-D tiles `tile` cannot run pattern `pat` (its IR, or a bound pattern) at (M, N), or None."""
    from attnc.tiles import check_block

    pattern = getattr(pat, "ir", pat)
    if pattern.inputs:
        names = ", ".join(i.name for i in pattern.inputs)
        return (f"N-D tiles {tile!r} are planned when the kernels are built, but pattern "
                f"'{pattern.name}' has run-time inputs ({names}); try 1-D tiles like KernelConfig(block_m=64, block_n=64)")
    try:
        check_block(tile, pattern.layout, M, N)
    except ValueError as exc:
        return f"N-D tiles {tile!r}: {exc}"
    return None


@dataclass(frozen=True)
class TileLayout:
    """The padded tile-major order of N-D tiles on a grid (see [Note: why pad]).

    >>> lay = TileLayout((10, 14), (4, 4), (8, 4))
    >>> lay.M, lay.N, lay.block                 # 12x16 and 16x16 padded grids
    (192, 256, (16, 32))
    >>> lay.positions("q")[:5].tolist()         # where grid tokens 0..4 (row 0) go
    [0, 1, 2, 3, 16]
    """

    grid: tuple[int, ...]
    tile_q: tuple[int, ...]
    tile_k: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        for t in (self.tile_q, self.tile_k):
            if len(t) != len(self.grid):
                raise ValueError(f"tile: expected one size per grid axis ({len(self.grid)}), got {t!r}")

    @property
    def block(self) -> tuple[int, int]:
        return math.prod(self.tile_q), math.prod(self.tile_k)

    @property
    def M(self) -> int:
        """Query positions of the padded order."""
        return padded_length(self.grid, self.tile_q)

    @property
    def N(self) -> int:
        """Key positions of the padded order."""
        return padded_length(self.grid, self.tile_k)

    def _tile(self, side: str):
        if side not in ("q", "k"):
            raise ValueError(f"side: expected 'q' or 'k', got {side!r}")
        return self.tile_q if side == "q" else self.tile_k

    def positions(self, side: str) -> torch.Tensor:
        """int64 [L]: the padded position of every grid token (row-major flat index)."""
        tile = self._tile(side)
        counts = [-(-L // t) for L, t in zip(self.grid, tile)]
        # numpy: a handful of O(L) integer ops, single-threaded (torch's intra-op threads only
        # add barrier waits here, [Note: threads] in attnc/analysis.py)
        tid = np.zeros(math.prod(self.grid), dtype=np.int64)
        off = np.zeros_like(tid)
        stride = 1
        coords = []
        for L in reversed(self.grid):
            coords.append(np.arange(L, dtype=np.int64).repeat(stride))
            stride *= L
        for x, t, c in zip(reversed(coords), tile, counts):
            x = np.tile(x, len(tid) // len(x))  # coordinate on axis i of every flat token
            tid = tid * c + x // t
            off = off * t + x % t
        return torch.from_numpy(tid * math.prod(tile) + off)

    def order(self, side: str) -> torch.Tensor:
        """int64 [M' or N']: the grid token at every padded position, -1 for padding."""
        pos = self.positions(side).numpy()
        out = np.full(self.M if side == "q" else self.N, -1, dtype=np.int64)
        out[pos] = np.arange(len(pos))
        return torch.from_numpy(out)

    def lower(self, low):
        """The lowered mask in this order (`permute`)."""
        return permute(low, self.tile_q, self.tile_k)

    def check(self, plan: Plan) -> None:
        """That the N-D plan numbers tiles like this layout: tile t of the plan is
        positions t * BLOCK .. of the padded order, minus the padding."""
        if plan.tile_shape != (self.tile_q, self.tile_k):
            raise ValueError(f"plan: expected N-D tiles {tile_text((self.tile_q, self.tile_k))}, got "
                             f"{plan.tile_shape}; build it with block={(self.tile_q, self.tile_k)!r}")
        for side, perm, offsets, bl in (("q", plan.perm_q, plan.offsets_q, self.block[0]),
                                        ("k", plan.perm_k, plan.offsets_k, self.block[1])):
            order = self.order(side).numpy()
            valid = order >= 0
            counts = valid.reshape(-1, bl).sum(1)
            if not (np.array_equal(order[valid], perm.numpy()) and np.array_equal(counts, (offsets[1:] - offsets[:-1]).numpy())):
                raise RuntimeError(f"internal error: the plan's tile-major order ({side}) differs from the padded "
                                   f"layout of tiles {tile_text((self.tile_q, self.tile_k))} on grid {self.grid}")

    def kernel_plan(self, plan: Plan) -> Plan:
        """The plan the kernels run: the same tiles, with every full tile that
        contains padding (on either side) demoted to partial, since full tiles
        skip the mask that rejects padded positions."""
        self.check(plan)
        nq, nk = plan.shape
        Hx = plan.full.counts.shape[0]
        whole_q = ((plan.offsets_q[1:] - plan.offsets_q[:-1]) == self.block[0]).numpy()
        whole_k = ((plan.offsets_k[1:] - plan.offsets_k[:-1]) == self.block[1]).numpy()
        keep = {f.name: getattr(plan, f.name) for f in fields(plan)
                if f.name not in ("full", "partial", "full_t", "partial_t")}
        # O(runs), no [nq, nk] map: the full runs cut at padded rows and columns; the counts now
        # (a padded row moves its runs, another row the padded columns inside them), the runs on
        # first use: the CPU tile choice weighs candidates by their counts alone
        rows, cols = np.tile(~whole_q, Hx), np.flatnonzero(~whole_k)
        runs = plan.full.to_runs()
        moved = np.where(rows[runs.row], runs.hi - runs.lo, np.searchsorted(cols, runs.hi) - np.searchsorted(cols, runs.lo))
        moved = np.bincount(runs.row, weights=moved, minlength=Hx * nq).astype(np.int64).reshape(Hx, nq)
        cut = functools.cache(lambda: self._cut(plan, rows, cols, nk))
        return Plan(full=TileList.deferred(plan.full.counts.numpy() - moved, lambda: cut()[0]),
                    partial=TileList.deferred(plan.partial.counts.numpy() + moved, lambda: cut()[1]), **keep)

    @staticmethod
    def _cut(plan: Plan, rows: np.ndarray, cols: np.ndarray, nk: int) -> tuple[Runs, Runs]:
        full, moved = plan.full.to_runs().cut(rows, cols, nk)
        return full, Runs.union([moved, plan.partial.to_runs()], nk)

    def describe(self) -> str:
        """What the header of a generated module says about the permutation."""
        def padded(tile):
            return "x".join(str(-(-L // t) * t) for L, t in zip(self.grid, tile))
        return (f"N-D tiles {tile_text((self.tile_q, self.tile_k))} on grid {'x'.join(map(str, self.grid))}, "
                f"tile-major order padded to {padded(self.tile_q)} / {padded(self.tile_k)}:\n"
                f"#          q, k are positions 0..{self.M - 1} / 0..{self.N - 1}; position p is in tile p // "
                f"BLOCK, row-major offset p % BLOCK inside it\n"
                f"#          (BLOCK_M = {self.block[0]}, BLOCK_N = {self.block[1]}); padded positions are never "
                f"allowed; the runtime gathers q, k, v\n"
                f"#          into this order and scatters out, lse, dq, dk, dv back")


def header_text(layout: TileLayout, plan: Plan) -> str:
    """The `plan:` header lines of an N-D module (plan, then the permutation)."""
    return plan.summary() + "\n# tokens:  " + layout.describe()
