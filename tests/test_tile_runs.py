"""Tile lists stored as runs ([Note: tile runs] in attnc/plans.py): planning stays O(runs), and the
lists the kernels read come out of the runs unchanged."""

import numpy as np
import pytest
import torch

import attnc
from attnc.plans import Runs, TileList
from conftest import tiles_from_mask


def test_merged_joins_overlapping_and_adjacent_runs_within_a_row():
    row = np.array([1, 0, 0, 0, 1, 2])
    lo = np.array([0, 5, 2, 9, 3, 4])
    hi = np.array([3, 7, 6, 9, 4, 5])  # [9, 9) is empty
    r = Runs.merged(row, lo, hi, nk=10)
    assert list(zip(r.row.tolist(), r.lo.tolist(), r.hi.tolist())) == [(0, 2, 7), (1, 0, 4), (2, 4, 5)]
    # a run ending at the last column never joins the next row's first
    r = Runs.merged(np.array([0, 1]), np.array([8, 0]), np.array([10, 2]), nk=10)
    assert r.lo.tolist() == [8, 0] and r.hi.tolist() == [10, 2]
    assert r.expand().tolist() == [8, 9, 0, 1]


def test_runs_of_keys_round_trip():
    keys = np.array([0, 1, 2, 9, 10, 11, 15, 30])  # nk = 10: row 0 cols 0-2, 9; row 1 cols 0, 1, 5; row 3 col 0
    r = Runs.of_keys(keys, 10)
    assert r.row.tolist() == [0, 0, 1, 1, 3] and r.expand().tolist() == [0, 1, 2, 9, 0, 1, 5, 0]
    t = TileList.from_runs(1, 4, r)
    assert t.counts.tolist() == [[4, 3, 0, 1]]
    assert t.index.tolist() == [[[0, 1, 2, 9], [0, 1, 5, -1], [-1, -1, -1, -1], [0, -1, -1, -1]]]


def test_a_causal_plan_at_a_million_tokens_lists_no_tile():
    pat = attnc.loads("pattern p = heads { {0, 3} => causal; _ => sliding(256) | sink(64) }").pattern()
    plan = pat.plan(2**20, heads=4, block=(128, 128))
    nq = 2**20 // 128
    for lst in (plan.full, plan.partial):
        assert "cols" not in lst.__dict__ and lst.runs is not None
    # a causal row is one run of full tiles: the lists hold O(rows) runs, not 33 M tiles
    assert len(plan.full.runs.row) <= 4 * nq and len(plan.partial.runs.row) <= 3 * 4 * nq
    assert int(plan.full.counts[0].sum()) == nq * (nq - 1) // 2 and int(plan.partial.counts[0].sum()) == nq
    assert plan.counts()["tiles_full"] == 2 * nq * (nq - 1) // 2 + int(plan.full.counts[1].sum()) * 2


@pytest.mark.parametrize("src, M, H", [
    ("pattern p = sliding(37) | (sink(5) & causal)", 1000, 1),
    ("pattern p = heads { {0, 2} => causal; _ => sliding(20) | sink(3) }", 700, 4),
    ("pattern p = dilate(3, sliding(5)) | global(0 .. 3)", 600, 1),  # several intervals a query: runs joined
    ("pattern p = strided(9) & causal", 640, 1),  # periodic slots: runs of their tile keys
])
def test_runs_expand_to_the_tiles_of_the_mask(src, M, H):
    pat = attnc.loads(src).pattern()
    plan = pat.plan(M, heads=H, block=(16, 16))
    assert torch.equal(plan.to_dense().expand(H, -1, -1), tiles_from_mask(pat.mask(M, heads=H), 16, 16))
    for lst in (plan.full, plan.partial):  # ascending columns within a row, as many as counted
        for h in range(lst.counts.shape[0]):
            for r in range(lst.counts.shape[1]):
                row, n = lst.index[h, r], int(lst.counts[h, r])
                cols = row[:n]
                assert bool((cols[1:] > cols[:-1]).all()) and bool((row[n:] == -1).all())


def test_cut_takes_rows_and_columns_out_of_runs():
    rng = np.random.default_rng(5)
    nk, rows = 40, 12
    for _ in range(30):
        lo = rng.integers(0, nk, 50)
        r = Runs.merged(rng.integers(0, rows, 50), lo, lo + rng.integers(0, 12, 50).clip(max=nk - lo), nk)
        bad_rows = rng.random(rows) < 0.2
        cols = np.flatnonzero(rng.random(nk) < 0.15)
        kept, taken = r.cut(bad_rows, cols, nk)
        dense = np.zeros((rows, nk), dtype=bool)
        for row, a, b in zip(r.row, r.lo, r.hi):
            dense[row, a:b] = True
        cut = np.zeros_like(dense)
        cut[bad_rows] = True
        cut[:, cols] = True
        for runs, want in ((kept, dense & ~cut), (taken, dense & cut)):
            got = np.zeros_like(dense)
            for row, a, b in zip(runs.row, runs.lo, runs.hi):
                got[row, a:b] = True
            assert (got == want).all()
            assert len(runs.row) == len(Runs.merged(runs.row, runs.lo, runs.hi, nk).row)  # merged already


@pytest.mark.parametrize("src, M, g", [
    ("pattern p = blockwise(8, band(1, 1) | global({0}) | random(2))", 1000, 8),  # a block's queries share keys
    ("pattern p(sel: blocks(4)) = routed(sel)", 997, 4),
    ("pattern p = sink(5)", 300, 16),  # every query the same: the whole tile
    ("pattern p = sliding(9) | sink(2)", 300, 1),
])
def test_tiles_of_equal_query_groups_are_those_of_every_query(monkeypatch, src, M, g):
    from attnc import interval_tiles

    pat = attnc.loads(src).pattern()
    inputs = {}
    if pat.ir.inputs:
        gen = torch.Generator().manual_seed(3)
        inputs["sel"] = torch.randint(-1, -(-M // 4), (2, -(-M // 4), 5), generator=gen)
    H = 2
    s, _ = attnc.analysis.query_interval_sets(pat.ir, M, M, H, None, inputs=inputs)
    assert interval_tiles.equal_groups(s, 16) == g
    grouped = interval_tiles.tile_runs(s, 16, 16)
    monkeypatch.setattr(interval_tiles, "equal_groups", lambda s, bm: 1)
    every = interval_tiles.tile_runs(s, 16, 16)
    for a, b in zip(grouped[:2], every[:2]):
        assert a.row.tolist() == b.row.tolist() and a.lo.tolist() == b.lo.tolist() and a.hi.tolist() == b.hi.tolist()
    assert grouped[2] == every[2]
    plan = pat.plan(M, heads=H, block=(16, 16), **inputs)
    assert torch.equal(plan.to_dense().expand(H, -1, -1), tiles_from_mask(pat.mask(M, heads=H, **inputs).expand(H, -1, -1), 16, 16))
