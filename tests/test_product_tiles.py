"""Per-axis products beyond single primitives ([Note: product factors] in attnc/products.py):
`&` of per-axis parts, `where q.a == k.a`, and N-D tiles from per-axis tile counts
([Note: product tiles]): N-D plans, 1-D plans and `show`'s per-tile counts on grids against
the dense mask and against the path they replace (tile boxes + evaluation of undecided tiles)."""

import math

import numpy as np
import pytest
import torch

import attnc
from attnc import analysis, pair_counts, products
from attnc.codegen.ndtiles import TileLayout
from attnc.interval_sets import NotIntervals
from attnc.plans import Plan
from attnc.tileboxes import tile_major
from conftest import example_pattern, tile_counts_from_mask, tiles_from_mask


def nd_states(m: torch.Tensor, grid, tq, tk) -> torch.Tensor:
    """int8 [H, nq, nk] of N-D tiles (tile-major order) straight from the dense mask."""
    oq, offq = tile_major(list(grid), tq)
    ok, offk = tile_major(list(grid), tk)
    r = m[:, oq][:, :, ok].long()
    qid = torch.repeat_interleave(torch.arange(len(offq) - 1), offq[1:] - offq[:-1])
    kid = torch.repeat_interleave(torch.arange(len(offk) - 1), offk[1:] - offk[:-1])
    H = m.shape[0]
    per_k = torch.zeros(H, r.shape[1], len(offk) - 1, dtype=torch.int64).index_add_(2, kid, r)
    cnt = torch.zeros(H, len(offq) - 1, len(offk) - 1, dtype=torch.int64).index_add_(1, qid, per_k)
    size = (offq[1:] - offq[:-1])[:, None] * (offk[1:] - offk[:-1])[None, :]
    return torch.where(cnt == size, 2, torch.where(cnt == 0, 0, 1)).to(torch.int8)


def lists(plan):
    return [(lst.counts.tolist(), lst.cols.tolist()) for lst in (plan.full, plan.partial, plan.full_t, plan.partial_t)]


def grid_pattern(body: str, axes="h, w"):
    return attnc.loads(f"pattern p on grid({axes}) = {body}").pattern()


# patterns, grids and N-D tiles not dividing the axes
ND_CASES = [
    (example_pattern("axial_col"), (23, 29), (4, 4), (3, 5)),
    (example_pattern("axial_row"), (23, 29), (5, 2), (4, 4)),
    (example_pattern("maxvit_grid"), (23, 29), (4, 4), (3, 5)),
    (example_pattern("maxvit_grid", g=3), (23, 29), (8, 8), (4, 4)),
    (example_pattern("video"), (5, 7, 9), (2, 3, 4), (1, 4, 2)),
    (example_pattern("video", size=3, frames=2), (5, 7, 9), (4, 4, 4), (2, 4, 8)),
    (grid_pattern("(band(1, 2) @ w) & (causal @ w) & where q.h == k.h"), (11, 13), (4, 4), (2, 8)),
    (grid_pattern("neighborhood((3, 5)) & (strided(4) @ h)"), (17, 19), (8, 2), (4, 4)),
    (grid_pattern("heads { 0 => where q.w == k.w; 1 => full; _ => (sliding(3) @ t) & neighborhood((3, 3, 3)) }",
                  "t, h, w"), (5, 7, 9), (2, 3, 4), (1, 4, 2)),
]


@pytest.mark.parametrize("pat, grid, tq, tk", ND_CASES)
def test_nd_product_plans_are_the_masks_tiles_and_the_evaluated_plans(monkeypatch, pat, grid, tq, tk):
    H = 3
    N = math.prod(grid)
    m = pat.mask(N, heads=H, grid=grid)
    new = pat.plan(N, heads=H, grid=grid, block=(tq, tk))
    assert new.method == "closed-form" and new.tiles_evaluated == 0
    assert new.allowed == int(m.sum())
    assert torch.equal(new.to_dense().expand(H, -1, -1), nd_states(m, grid, tq, tk))

    def declined(*a):
        raise NotIntervals("disabled for the comparison")

    monkeypatch.setattr(analysis, "nd_product", declined)
    old = pat.plan(N, heads=H, grid=grid, block=(tq, tk))
    assert lists(new) == lists(old) and new.allowed == old.allowed
    assert torch.equal(new.perm_q, old.perm_q) and torch.equal(new.offsets_k, old.offsets_k)


@pytest.mark.parametrize("pat, grid, tq, tk", ND_CASES[:6])
def test_kernel_plans_demote_padded_full_tiles_without_a_dense_map(pat, grid, tq, tk):
    N = math.prod(grid)
    plan = pat.plan(N, heads=2, grid=grid, block=(tq, tk))
    lay = TileLayout(grid, tq, tk)
    got = lay.kernel_plan(plan)
    dense = plan.to_dense()  # what kernel_plan did before: a dense map and from_flags
    whole_q = (plan.offsets_q[1:] - plan.offsets_q[:-1]) == lay.block[0]
    whole_k = (plan.offsets_k[1:] - plan.offsets_k[:-1]) == lay.block[1]
    full = (dense == 2) & whole_q[None, :, None] & whole_k[None, None, :]
    fields = {f: getattr(plan, f) for f in ("M", "N", "heads", "block", "allowed", "method", "tile_shape",
                                           "perm_q", "perm_k", "offsets_q", "offsets_k")}
    want = Plan.from_flags(full, dense > 0, **fields)
    assert lists(got) == lists(want)
    keys, flags = plan.tiles()
    assert np.all(np.diff(keys) > 0) and int(flags.sum()) == int(plan.full.counts.sum())


GRID_CASES = [
    (example_pattern("axial_col"), (23, 29), [(16, 16), (37, 11), (128, 128)]),
    (example_pattern("maxvit_grid"), (23, 29), [(16, 16), (37, 11)]),
    (example_pattern("video"), (5, 7, 9), [(16, 16), (37, 11)]),
    (grid_pattern("(band(1, 2) @ w) & (causal @ w) & where q.h == k.h"), (11, 13), [(8, 8), (13, 5)]),
    (grid_pattern("heads { 0 => where q.w == k.w; _ => (causal @ h) & neighborhood(3) }"), (11, 13), [(8, 8)]),
]


@pytest.mark.parametrize("pat, grid, blocks", GRID_CASES)
def test_1d_tile_counts_and_plans_of_products_on_grids(monkeypatch, pat, grid, blocks):
    H = 3
    N = math.prod(grid)
    m = pat.mask(N, heads=H, grid=grid)
    for block in blocks:
        # show's per-tile counts and rows: from the per-axis factors, nothing evaluated
        plan, counts, rows = pair_counts.tile_counts(pat.ir, N, N, H, grid, block)
        assert torch.equal(counts.expand(H, -1, -1).long(), tile_counts_from_mask(m, *block))
        assert torch.equal(rows.expand(H, -1), m.sum(-1))
        # the plan (ProductCounts first at few tiles) is the mask's and the closed form's
        assert torch.equal(plan.to_dense().expand(H, -1, -1), tiles_from_mask(m, *block))
        assert plan.allowed == int(m.sum())
        monkeypatch.setattr(analysis, "PRODUCT_TILES", 0)
        other = pat.plan(N, heads=H, grid=grid, block=block)
        monkeypatch.undo()
        assert torch.equal(other.to_dense().expand(H, -1, -1), plan.to_dense().expand(H, -1, -1))
        assert other.allowed == plan.allowed


def test_factors_with_text_tokens_before_the_grid():
    pat = attnc.loads("pattern p on seq(5) + grid(h, w) = (causal @ h) & where q.w == k.w").pattern()
    grid, N = (7, 6), 5 + 42
    m = pat.mask(N, heads=2, grid=grid)
    counts = products.ProductCounts(pat.ir, N, N, 2, grid, 8, 8).counts(pat.ir.body)
    assert torch.equal(counts.expand(2, -1, -1), tile_counts_from_mask(m, 8, 8))


@pytest.mark.parametrize("body", ["neighborhood(3) | causal", "where q.h == k.w", "where q.h <= k.h",
                                  "(causal @ h) & (where k == 0)", "none & neighborhood(3)"])
def test_what_is_not_a_product_is_declined(body):
    pat = grid_pattern(body)
    view = attnc.reference.top_view(pat.ir, 64, 64, 1, (8, 8), {})
    with pytest.raises(NotIntervals):
        products.axis_masks(pat.ir, view, pat.ir.body)
    with pytest.raises(NotIntervals):
        products.nd_product(pat.ir, 64, 1, (8, 8), (4, 4), (4, 4))
    # and the plans stay exact through the tile boxes
    m = pat.mask(64, grid=(8, 8))
    plan = pat.plan(64, grid=(8, 8), block=((4, 4), (2, 4)))
    assert torch.equal(plan.to_dense(), nd_states(m, (8, 8), (4, 4), (2, 4)))
