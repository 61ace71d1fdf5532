"""`attnc show`'s figures from the plan (pair_counts.tile_counts, show.plan_tile_stats) against the
brute-force counts from dense mask rows (tilestats.tile_stats)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attnc
from attnc import pair_counts
from attnc.show import head_groups, plan_tile_stats, render_text
from attnc.tilestats import tile_stats
from test_analysis import grid_patterns, patterns


def both(src, M, H, grid, block):
    few = pair_counts.FEW_TILES
    try:  # few tiles: counted from interval sets at once; as at large sizes: from the plan
        for pair_counts.FEW_TILES in (few, 0):
            compare(src, M, H, grid, block)
    finally:
        pair_counts.FEW_TILES = few


def compare(src, M, H, grid, block):
    pat = attnc.loads(src).pattern()
    M, N, H, grid = pat.resolve_sizes(M, None, H, grid)
    if grid is not None:
        M = N
    fast, fast_rows = plan_tile_stats(pat, M, N, H, grid, block)
    slow, slow_rows = tile_stats(lambda lo, hi: pat.mask_rows(M, N, H, grid, lo, hi), M, N, H, block)
    for h in range(H):  # the plan keeps one row per distinct head (1 when all are equal), the scan one per head
        assert torch.equal(fast.head(h).long(), slow.head(h).long())
        assert torch.equal(fast_rows[fast.row(h)], slow_rows[slow.row(h)])
        assert torch.equal(fast.state(h), slow.state(h)) and fast.allowed(h) == slow.allowed(h)
    assert torch.equal(fast.qsz, slow.qsz) and torch.equal(fast.ksz, slow.ksz)
    assert fast.allowed() == slow.allowed() and fast.heads == slow.heads == H
    # what `attnc show` prints is the same
    assert (render_text(pat, fast, fast_rows, head_groups(fast, fast_rows))
            == render_text(pat, slow, slow_rows, head_groups(slow, slow_rows)))


@pytest.mark.parametrize("src, M, H, grid, block", [
    ("pattern p = sliding(5) | (sink(2) & causal)", 100, 1, None, (16, 16)),
    ("pattern p = sliding(5) - causal", 100, 1, None, (16, 16)),  # empty rows
    ("pattern p = where abs(q - k) <= 7 or k % 13 == 0", 90, 2, None, (16, 8)),
    ("pattern p = heads { 0 => sliding(4); _ => where k <= q - 5 * h or q % 7 == 0 }", 70, 3, None, (8, 16)),
    ("pattern p = random(3, seed = 1) | heads { 0 => causal; _ => band(2, 2) }", 50, 2, None, (8, 8)),
    # groups of heads with equal arms: one row of counts per group (analysis.head_classes)
    ("pattern p = heads { {0, 2} => sliding(6); _ => causal & sink(2) }", 90, 4, None, (16, 16)),
    ("pattern p = heads { 0 .. 3 => heads { 0 => causal; _ => sliding(3) }; _ => block(8) } | sink(1)", 77, 6, None,
     (16, 8)),
    # heads differ inside tiles whose counts agree: the plan has one head, the evaluation two
    ("pattern p = where (k + h) % 2 + 0 * (k % (q + 2)) == 0", 64, 2, None, (8, 8)),
    ("pattern p on grid(h, w) = neighborhood((5, 3))", None, 2, (9, 11), (16, 8)),
    ("pattern p on seq(4) + grid(h, w) = neighborhood((5, 3), dilation = (1, 3))", None, 2, (9, 11), (16, 8)),
    ("pattern p on seq(4) + grid(h, w) = neighborhood((5, 3), dilation = (1, 3)) | global(0 .. 4)", None, 2, (9, 11), (16, 8)),
    ("pattern p on grid(t, h, w) = band(1, 0) @ t", None, 2, (3, 4, 5), (7, 9)),
    ("pattern p on grid(h, w) = heads { 0 => neighborhood((3, 3)); _ => block((2, 4)) }", None, 2, (8, 12), (16, 16)),
])
def test_plan_counts_are_the_mask_counts(src, M, H, grid, block):
    both(src, M, H, grid, block)


def test_plan_counts_evaluate_in_bounded_chunks(monkeypatch):
    # one key tile per evaluation: the chunking over a query tile's partial key tiles is exercised
    monkeypatch.setattr(pair_counts, "COUNT_CHUNK", 1)
    both("pattern p = where abs(q - k) <= 20 or k % 13 == 0", 120, 2, None, (16, 8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.integers(12, 140), st.integers(1, 2), st.sampled_from([(16, 16), (7, 13), (64, 64)]))
def test_plan_counts_of_random_patterns(src, M, H, block):
    both(f"pattern p = {src}", M, H, None, block)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid_patterns(), st.integers(8, 11), st.integers(8, 12), st.sampled_from([(16, 16), (7, 13)]))
def test_plan_counts_of_random_grid_patterns(src, gh, gw, block):
    both(f"pattern p on grid(h, w) = {src}", None, 2, (gh, gw), block)


def test_states_and_fractions_match_the_dense_mask():
    """TileStats' per-head states and (pooled) fractions against tile sums of the dense mask,
    ragged edge tiles included: the one-head-at-a-time computation is exact."""
    pat = attnc.loads("pattern p = heads { 0 => sliding(9); _ => causal & sink(3) | block(20) }").pattern()
    M, H, block = 203, 3, (16, 32)
    stats, _ = plan_tile_stats(pat, M, M, H, None, block)
    mask = pat.mask(M, M, heads=H).expand(H, M, M)
    nq, nk = -(-M // 16), -(-M // 32)
    pad = torch.zeros(H, nq * 16, nk * 32)
    real = torch.zeros_like(pad)
    pad[:, :M, :M], real[:, :M, :M] = mask.float(), 1
    allowed = pad.view(H, nq, 16, nk, 32).sum((2, 4))
    size = real.view(H, nq, 16, nk, 32).sum((2, 4))
    for h in range(H):
        want = torch.where(allowed[h] == 0, 0, torch.where(allowed[h] == size[h], 2, 1)).to(torch.int8)
        assert torch.equal(stats.state(h), want)
        torch.testing.assert_close(stats.fraction(h), (allowed[h] / size[h]).double())
        pooled = stats.fraction(h, cells=4)  # 13 x 7 tiles -> 4 x 2 cells of 4 x 4 tiles
        assert pooled.shape == (4, 2)
        torch.testing.assert_close(pooled[0, 0], (allowed[h, :4, :4].sum() / size[h, :4, :4].sum()).double())
    assert stats.allowed() == int(mask.sum())


def test_one_dimensional_partial_tiles_are_counted_from_intervals(monkeypatch):
    """1-D patterns with interval sets count their partial tiles in closed form: no mask
    entry is evaluated (the evaluation path would be O(partial tiles x tile pairs))."""
    from attnc import tileboxes

    def boom(*a, **k):
        raise AssertionError("a mask was evaluated")

    monkeypatch.setattr(pair_counts, "evaluated_counts", boom)
    monkeypatch.setattr(tileboxes, "evaluated_counts", boom)
    monkeypatch.setattr(pair_counts, "FEW_TILES", 0)  # as at large sizes: the plan's tiles, counted
    for src, H in (("pattern p = sliding(37) | (sink(3) & causal)", 2),
                   ("pattern p = heads { 0 => band(5, 9); _ => causal - sliding(20) }", 3)):
        pat = attnc.loads(src).pattern()
        stats, rows = plan_tile_stats(pat, 301, 301, H, None, (32, 16))
        mask = pat.mask(301, heads=H).expand(H, -1, -1)
        assert stats.allowed() == int(mask.sum())
        for h in range(H):
            assert torch.equal(rows[stats.row(h)], mask[h].sum(-1))


@pytest.mark.parametrize("src, M, H, grid", [
    ("pattern p = sliding(37) | (sink(5) & causal)", 1000, 1, None),
    ("pattern p = heads { {0, 2} => causal; _ => sliding(20) | sink(3) }", 1024, 4, None),
    ("pattern p = heads { 0 => sliding(9); _ => where k <= q - 5 * h or q % 7 == 0 }", 777, 3, None),
    ("pattern p = strided(9) & causal", 1000, 1, None),
    ("pattern p on grid(h, w) = neighborhood((7, 5))", None, 2, (30, 33)),
])
def test_display_cells_draw_what_the_tiles_draw(monkeypatch, src, M, H, grid):
    # past PNG_CELLS tiles a side `show` counts pairs per display cell and takes the tile totals from
    # the plan ([Note: display cells]); what it prints is what the per-tile counts print
    from attnc import show

    pat = attnc.loads(src).pattern()
    M, N, H, grid = pat.resolve_sizes(M, None, H, grid)
    block = (16, 16)
    fine, fine_rows = plan_tile_stats(pat, M, N, H, grid, block)
    monkeypatch.setattr(show, "PNG_CELLS", 16)  # 4 x 4 tiles a cell
    cells, cell_rows = plan_tile_stats(pat, M, N, H, grid, block)
    assert cells.block == (64, 64) and cells.cell() == 4 and cells.tile_grid() == fine.tile_grid()
    assert torch.equal(cell_rows, fine_rows) and cells.allowed() == fine.allowed()
    for h in range(H):
        assert cells.tile_totals(h) == fine.tile_totals(h)
        assert torch.equal(cells.fraction(h), fine.fraction(h, 16))
    assert (render_text(pat, cells, cell_rows, head_groups(cells, cell_rows), 16)
            == render_text(pat, fine, fine_rows, head_groups(fine, fine_rows), 16))
    assert "(each character: 4x4 tiles)" in render_text(pat, cells, cell_rows, head_groups(cells, cell_rows), 16)
