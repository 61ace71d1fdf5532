"""Periodic slots for stepped keys ([Note: periodic sets] in attnc/periodic.py): plans equal the
dense mask's tiles and the interval-only plans, at sizes that are not multiples of the tiles."""

import numpy as np
import pytest
import torch

import attnc
from attnc import analysis, interval_sets, intervals, pair_counts, periodic
from conftest import EXAMPLES, tile_counts_from_mask, tiles_from_mask

CASES = [
    ("pattern p = strided(7)", 1000, None, (32, 32)),
    ("pattern p = strided(70) & causal", 1000, None, (32, 48)),
    ("pattern p = band(70, 0) | (strided(70) & causal)", 1000, None, (64, 32)),
    ("pattern p = causal & (block(70) | where k % 70 >= 70 - 20)", 1000, None, (32, 32)),
    ("pattern p = where k % 9 != 3", 300, None, (16, 16)),
    ("pattern p = ~(where k % 9 < 3) & causal", 300, None, (16, 16)),
    ("pattern p = strided(70) & (where k % 7 == 2)", 1000, None, (16, 16)),
    ("pattern p = strided(6) & strided(4)", 500, None, (16, 16)),
    ("pattern p = neighborhood(3, dilation = 80)", 1000, None, (32, 32)),
    ("pattern p = neighborhood(5, dilation = 30, causal = true) | sink(3)", 700, None, (32, 16)),
    ("pattern p on grid(h, w) = where q.w == k.w", None, (37, 41), (32, 32)),
    ("pattern p(t = 13) on seq(t) + grid(h, w) = where q.w == k.w", None, (37, 41), (32, 48)),
    ("pattern p on grid(h, w) = band(0, 0) @ w", None, (37, 41), (32, 32)),
    ("pattern p on grid(h, w) = (strided(5) @ h) & (strided(6) @ w)", None, (37, 41), (32, 32)),
    ("pattern p on grid(h, w) = strided(4) @ h", None, (37, 41), (16, 32)),
]
EXAMPLE_CASES = [("sparse_transformer", "sparse_strided", {"l": 70}, 1000, None),
                 ("sparse_transformer", "sparse_fixed", {"l": 70, "c": 20}, 1000, None),
                 ("axial", "axial_col", {}, None, (37, 41)),
                 ("maxvit_grid", "maxvit_grid", {"g": 3}, None, (37, 41))]


@pytest.fixture
def slots_everywhere(monkeypatch):
    """Slots for any progression of more than 2 keys per query (not only past 64), and a count of
    the plans built from periodic sets, so that small sizes exercise the periodic path (grid
    products too: not planned from ProductCounts, which takes them at few tiles)."""
    monkeypatch.setattr(interval_sets, "MAX_INTERVALS", 2)
    monkeypatch.setattr(analysis, "PRODUCT_TILES", 0)
    calls = []
    real = analysis.periodic_classes
    monkeypatch.setattr(analysis, "periodic_classes", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def check(pat, M, grid, block, H=3):
    plan = pat.plan(M, heads=H, grid=grid, block=block)
    m = pat.mask(M, heads=H, grid=grid).expand(H, -1, -1)
    got = plan.to_dense().expand(H, -1, -1)
    assert torch.equal(got, tiles_from_mask(m, *block)), f"{plan.method}"
    assert plan.allowed == int(m.sum())
    return plan


@pytest.mark.parametrize("src,M,grid,block", CASES)
def test_plans_of_stepped_keys_match_the_mask(src, M, grid, block, slots_everywhere):
    plan = check(attnc.loads(src).pattern(), M, grid, block)
    # products of per-axis progressions intersect per axis first: few intervals, no slot needed
    assert plan.method == "closed-form" and (bool(slots_everywhere) or "@ h" in src)


@pytest.mark.parametrize("file,name,params,M,grid", EXAMPLE_CASES)
def test_stepped_examples_match_the_mask(file, name, params, M, grid, slots_everywhere):
    plan = check(attnc.load(EXAMPLES / f"{file}.attn").pattern(name, **params), M, grid, (32, 32))
    assert plan.method == "closed-form" and (bool(slots_everywhere) or name == "maxvit_grid")


@pytest.mark.parametrize("file,name,M,grid", [("sparse_transformer", "sparse_strided", 8192 + 77, None),
                                              ("sparse_transformer", "sparse_fixed", 8192 + 77, None),
                                              ("axial", "axial_col", None, (100, 93))])
def test_periodic_plans_equal_the_interval_only_plans(file, name, M, grid, monkeypatch):
    """At the default sizes' rules: the plan with periodic slots is the plan the interval-only
    analysis (one interval per key) or the tile boxes build, tile for tile and pair for pair."""
    pat = attnc.load(EXAMPLES / f"{file}.attn").pattern(name)
    monkeypatch.setattr(analysis, "PRODUCT_TILES", 0)  # the closed form, also for axial_col at few tiles
    new = pat.plan(M, heads=2, grid=grid, block=(128, 128))
    monkeypatch.setattr(analysis, "_closed_form_plan",
                        lambda *a, **k: analysis._closed_form_plan_with(*a, periodic=False, **k))
    old = pat.plan(M, heads=2, grid=grid, block=(128, 128))
    assert torch.equal(new.to_dense(), old.to_dense()) and new.allowed == old.allowed
    for f in ("full", "partial", "full_t", "partial_t"):
        assert torch.equal(getattr(new, f).index, getattr(old, f).index)


@pytest.mark.parametrize("chunk", [16384, 64])
def test_periodic_tile_counts_are_exact(slots_everywhere, monkeypatch, chunk):
    """show's counts per tile from the periodic sets equal the mask's, also counted in chunks of
    query rows (64: 32 chunks of two query tiles, the last one short)."""
    monkeypatch.setattr(analysis, "PLAN_CHUNK", chunk)
    pat = attnc.load(EXAMPLES / "sparse_transformer.attn").pattern("sparse_fixed", l=70, c=20)
    plan, counts, rows = pair_counts.tile_counts(pat.ir, 1000, 1000, 2, None, (32, 48))
    m = pat.mask(1000, heads=2).expand(2, -1, -1).long()
    assert plan.shape == (32, 21)
    assert torch.equal(counts.expand(2, -1, -1).long(), tile_counts_from_mask(m, 32, 48))
    assert torch.equal(rows.expand(2, -1), m.sum(-1))


def test_sets_the_algebra_does_not_hold_fall_back():
    """A union of two stepped sets is not represented: NotPeriodic, and the plan comes from the
    interval-only analysis (or the tile boxes), still exact."""
    pat = attnc.loads("pattern p = strided(3) | (where k % 7 == 1)").pattern()
    ia = intervals.IntervalAnalysis(pat.ir, periodic=True)
    from attnc.reference import top_view
    with pytest.raises(periodic.NotPeriodic):
        ia.eval(pat.ir.body, top_view(pat.ir, 1000, 1000, 1, None, {}))
    check(pat, 1000, None, (32, 32), H=1)


def test_a_million_keys_need_no_interval_per_key():
    """strided(128) at 2^20 tokens: the chunk's sets hold one slot per query, not 8192 intervals."""
    pat = attnc.load(EXAMPLES / "sparse_transformer.attn").pattern("sparse_strided")
    from attnc.reference import top_view
    view = top_view(pat.ir, 1 << 20, 1 << 20, 1, None, {}, rows=(0, 4096), keys=torch.zeros(0, dtype=torch.int64))
    s = intervals.IntervalAnalysis(pat.ir, periodic=True).eval(pat.ir.body, view)
    assert isinstance(s, periodic.PSet) and len(s.step) + s.iv.lo.shape[-1] <= 4
    assert int(s.count()[0, 4095]) == 128 + 4095 // 128 * 0 + (4095 - 128) // 128 + 1


RUN_CASES = [
    ("pattern p = strided(8) & causal", 4000, None),  # steps dividing the tile: long segments
    ("pattern p = band(64, 0) | (strided(16) & causal)", 4000, None),
    ("pattern p = causal & (block(64) | where k % 64 >= 64 - 20)", 4100, None),
    ("pattern p = where k % 9 != 3", 1500, None),  # a step that divides no tile: every tile counted
    ("pattern p = sliding(40) | (strided(32) & causal) | sink(4)", 3000, None),
    ("pattern p = neighborhood(5, dilation = 32, causal = true) | sink(3)", 3000, None),
    ("pattern p(t = 16) on seq(t) + grid(h, w) = where q.w == k.w", None, (40, 64)),
]


@pytest.mark.parametrize("src,M,grid", RUN_CASES)
@pytest.mark.parametrize("block", [(64, 64), (32, 128), (48, 96)])
def test_periodic_runs_are_the_tiles_of_periodic_tiles(monkeypatch, src, M, grid, block):
    """[Note: periodic runs]: the runs (special tiles one by one, segments as a whole) are the
    non-empty tiles and classes `periodic_tiles` finds by visiting every candidate tile."""
    monkeypatch.setattr(interval_sets, "MAX_INTERVALS", 2)
    pat = attnc.loads(src).pattern()
    M, N, H, grid = pat.resolve_sizes(M, None, 3, grid)
    s, _ = analysis.query_interval_sets(pat.ir, M, N, H, grid, periodic=True)
    assert isinstance(s, periodic.PSet)
    keys, full, allowed, _ = periodic.periodic_tiles(s, *block)
    f_runs, p_runs, allowed_runs = periodic.periodic_runs(s, *block)
    nk = -(-N // block[1])
    for runs, want in ((f_runs, keys[full]), (p_runs, keys[~full])):
        got = np.repeat(runs.row, runs.hi - runs.lo) * nk + runs.expand()
        assert got.tolist() == want.tolist()
        same = runs.row[1:] == runs.row[:-1]  # merged: rows ascend, a row's runs neither overlap nor touch
        assert bool((runs.row[1:] >= runs.row[:-1]).all()) and bool((runs.lo[1:][same] > runs.hi[:-1][same]).all())
    assert allowed_runs == allowed
    if src == RUN_CASES[0][0]:  # a strided causal row: one run of partial tiles, not one entry a tile
        assert len(f_runs.row) == 0 and len(p_runs.row) == -(-M // block[0]) < len(keys) / 10
    # counted ([Note: counted plans]): the same per-row counts and pairs, no tile listed
    f_cnt, p_cnt, allowed_cnt = periodic.periodic_runs(s, *block, counted=True)
    for runs, cnt in ((f_runs, f_cnt), (p_runs, p_cnt)):
        assert np.bincount(runs.row, weights=runs.hi - runs.lo, minlength=len(cnt)).astype(np.int64).tolist() == cnt.tolist()
    assert allowed_cnt == allowed


@pytest.mark.parametrize("block", [(64, 64), (64, 96), (32, 100)])
def test_a_step_that_does_not_divide_the_tile_is_counted_from_one_period(monkeypatch, block):
    """`k % 128 >= 96` in 64-key tiles alternates empty and partial tiles (period 2): a segment's
    tiles are counted from its first period, not one by one ([Note: periodic runs]), and the
    runs still list every partial tile (checked against the dense mask)."""
    pat = attnc.load(EXAMPLES / "sparse_transformer.attn").pattern("sparse_fixed")
    M, H = 4096 + 77, 2
    points = []
    real = periodic._sums
    monkeypatch.setattr(periodic, "_sums", lambda c, xrow, x: points.append(len(x)) or real(c, xrow, x))
    plan = check(pat, M, None, block, H=H)
    nq = -(-M // block[0])
    # one call (the classes when planning; the lists, read later, come from them): a few special
    # tiles and one period a row (tile by tile: about nq * nk / 2 points)
    assert len(points) == 1 and max(points) < nq * 64
    counted = analysis.plan_blocks(pat.ir, M, M, H, None, block=block, counted=True)
    assert counted.counts() == plan.counts() and counted.allowed == plan.allowed
    assert torch.equal(counted.partial.counts, plan.partial.counts) and torch.equal(counted.full.counts, plan.full.counts)


def test_a_counted_plan_refuses_its_lists():
    """[Note: counted plans]: counts only; asking for tiles is a clear error, not a wrong list."""
    pat = attnc.load(EXAMPLES / "sparse_transformer.attn").pattern("sparse_fixed")
    counted = analysis.plan_blocks(pat.ir, 1 << 20, 1 << 20, 8, None, block=(64, 64), counted=True)
    c = counted.counts()
    # every row of 64 queries: the causal half of its keys in tiles, half of those hold k % 128 >= 96
    assert c["tiles_partial"] + c["tiles_full"] > (1 << 28)
    for get in (lambda: counted.partial.index, lambda: counted.full.cols, lambda: counted.partial.to_runs()):
        with pytest.raises(RuntimeError, match="counted, not listed"):
            get()


def test_plans_of_periodic_slots_list_their_runs_on_first_use(monkeypatch):
    """`pat.plan` counts periodic chunks and lists their runs when the lists are first read
    (`TileList.deferred`), from the classes found when planning: `k % 128 >= 96` at 2^20 tokens
    in 64-token tiles (67 M alternating tiles) plans without listing a tile; at a small size the
    deferred lists are the mask's."""
    pat = attnc.load(EXAMPLES / "sparse_transformer.attn").pattern("sparse_fixed")
    classified, listed = [], []
    real_classes, real_lists = periodic.periodic_classes, periodic._periodic_lists
    monkeypatch.setattr(analysis, "periodic_classes", lambda *a: classified.append(1) or real_classes(*a))
    monkeypatch.setattr(periodic, "_periodic_lists", lambda *a: listed.append(1) or real_lists(*a))
    big = pat.plan(1 << 20, heads=8, block=(64, 64))
    assert classified and not listed and big.counts()["tiles_partial"] > (1 << 28)
    classified.clear()
    small = pat.plan(5000, heads=2, block=(64, 64))
    assert classified and not listed
    check(pat, 5000, None, (64, 64), H=2)  # the lists, made on first use, against the mask
    assert listed
    n_classified = len(classified)
    assert torch.equal(small.to_dense(), pat.plan(5000, heads=2, block=(64, 64)).to_dense())
    assert len(classified) == n_classified + 1  # the new plan's one chunk: reading small's lists classified nothing
