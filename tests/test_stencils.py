"""`where` predicates of per-axis differences planned in closed form ([Note: stencils] in
attnc/stencils.py): exact against dense masks and against the tile-box plans they replace."""

import pytest
import torch

import attnc
from attnc import analysis, interval_sets, pair_counts
from attnc.intervals import IntervalAnalysis
from attnc.reference import top_view
from attnc.stencils import is_stencil
from conftest import EXAMPLES, tile_counts_from_mask, tiles_from_mask


def plan_lists(plan):
    lists = (plan.full, plan.partial, plan.full_t, plan.partial_t)
    return [(lst.counts.tolist(), lst.cols.tolist()) for lst in lists], plan.allowed


def check(pat, M, N, H, block, grid=None):
    """The plan against the dense mask's tiles and count, and against the tile-box plan."""
    plan = pat.plan(M, N, heads=H, grid=grid, block=block)
    m = pat.mask(M, N, heads=H, grid=grid)
    assert torch.equal(plan.to_dense().expand(H, -1, -1), tiles_from_mask(m, *block))
    assert plan.allowed == int(m.sum())
    return plan


def boxes_plan(monkeypatch, pat, M, N, H, block, grid):
    """Today's plan without stencils: tile boxes and exact evaluation of undecided tiles."""
    with monkeypatch.context() as mp:
        mp.setattr(IntervalAnalysis, "stencil", lambda self, pred, view: (_ for _ in ()).throw(
            interval_sets.NotIntervals("stencils disabled for the comparison")))
        return pat.plan(M, N, heads=H, grid=grid, block=block)


@pytest.mark.parametrize("r", [1, 3, 6, 40])
@pytest.mark.parametrize("block", [(16, 16), (7, 13), (32, 8)])
def test_mmdit_plans_are_exact_in_closed_form(monkeypatch, r, block):
    pat = attnc.load(EXAMPLES / "mmdit.attn").pattern("mmdit", r=r, text=7)
    grid, N = (23, 29), 7 + 23 * 29
    for M in (N, N - 11):
        plan = check(pat, M, N, 2, block, grid)
        assert plan.method == "closed-form" and plan.tiles_evaluated == 0
        old = boxes_plan(monkeypatch, pat, M, N, 2, block, grid)
        assert old.method == "tile-boxes"
        assert plan_lists(plan) == plan_lists(old)


PREDICATES = [
    "abs(q.h - k.h) + abs(q.w - k.w) <= 4",  # a diamond
    "4 <= (q.h - k.h)**2 + (q.w - k.w)**2 and (q.h - k.h)**2 + (q.w - k.w)**2 < 20",  # an annulus
    "(q.h - k.h) % 2 == 0 and abs(q.w - k.w) < 3",  # every other row
    "max(abs(q.h - k.h), abs(q.w - k.w)) < 3",
    "not (abs(q.h - k.h) < 2)",
    "k.w - q.w in 0 .. 5",
    "k.w - q.w in {-3, 0, 2}",
    "q.w - k.w > 2 * (k.h - q.h)",  # a half-plane
    "q.h == k.h",
    "q.h - 1 == k.h + 1 or 3 * q.w - 3 * k.w == 6",
    "(q.w - k.w) // 3 == 1",
]


@pytest.mark.parametrize("pred", PREDICATES)
@pytest.mark.parametrize("text", [None, 5])
def test_stencil_predicates_match_the_mask(monkeypatch, pred, text):
    layout = "grid(h, w)" if text is None else f"seq({text}) + grid(h, w)"
    pat = attnc.loads(f"pattern p on {layout} = where {pred}").pattern()
    grid = (11, 13)
    N = (text or 0) + 11 * 13
    for M, block in ((N, (16, 16)), (N - 6, (7, 13))):
        plan = check(pat, M, N, 2, block, grid)
        assert plan.tiles_evaluated == 0, pred
        assert plan_lists(plan) == plan_lists(boxes_plan(monkeypatch, pat, M, N, 2, block, grid))


@pytest.mark.parametrize("src", [
    "neighborhood(3) & where (q.h - k.h)**2 + (q.w - k.w)**2 < 5",
    "causal - where abs(q.w - k.w) < 2",
    "~(where (q.h - k.h)**2 + (q.w - k.w)**2 < 9)",
    "global({0, 40}) | where (q.h - k.h) * (q.h - k.h) + (q.w - k.w) * (q.w - k.w) <= 8",
])
def test_stencils_inside_combinators(src):
    pat = attnc.loads(f"pattern p on grid(h, w) = {src}").pattern()
    N = 10 * 12
    for M, block in ((N, (16, 16)), (N - 5, (9, 7))):
        plan = check(pat, M, N, 2, block, (10, 12))
        assert plan.method == "closed-form"


def test_three_dimensional_and_one_dimensional_stencils():
    pat = attnc.loads("pattern p on grid(t, h, w) = where abs(q.t - k.t) <= 1 and "
                      "(q.h - k.h)**2 + (q.w - k.w)**2 < 6").pattern()
    plan = check(pat, 5 * 6 * 7, 5 * 6 * 7, 1, (16, 12), (5, 6, 7))
    assert plan.method == "closed-form"
    for src in ("where abs(q - k) <= 40 and k <= q + 3 * 7", "where (q - k) % 5 == 0 and q - k < 60"):
        pat = attnc.loads(f"pattern p = {src}").pattern()
        for M in (300, 257, 340, 6):  # M > N: queries from N - M < 0
            plan = check(pat, M, 300, 1, (32, 16))
            assert plan.method == "closed-form" and plan.tiles_evaluated == 0


@pytest.mark.parametrize("pred", [
    "q.h == k.w",  # different axes
    "q.h % 2 == 0 and abs(q.w - k.w) < 3",  # an absolute coordinate
    "(q.h % 2) == (k.h % 2)",
    "abs(q.h - k.h) < h + 1",  # the head
    "k == 3",
])
def test_other_predicates_stay_with_the_tile_boxes(pred):
    pat = attnc.loads(f"pattern p on seq(3) + grid(h, w) = where {pred}").pattern()
    N = 3 + 9 * 10
    plan = check(pat, N, N, 2, (16, 16), (9, 10))
    assert plan.method == "tile-boxes"


def test_is_stencil():
    val = int
    def pred(src, layout="grid(h, w)"):
        return attnc.loads(f"pattern p on {layout} = where {src}").pattern().ir.body.pred

    for src in PREDICATES:
        assert is_stencil(pred(src), ("h", "w"), val), src
    for src in ("q.h == k.w", "q.h % 2 == 0", "q.h * k.h < 4", "k.h < 3", "abs(q.h - k.h) < h", "q - k < 3"):
        assert not is_stencil(pred(src), ("h", "w"), val), src
    assert is_stencil(pred("abs(q - k) < 3", "seq"), (), val)
    assert not is_stencil(pred("q + k < 3", "seq"), (), val)


def test_many_runs_fall_back_to_the_tile_boxes(monkeypatch):
    # a checkerboard has one run per other key: past the interval budget the boxes decide, exactly
    monkeypatch.setattr(interval_sets, "MAX_INTERVALS", 4)
    monkeypatch.setattr(interval_sets, "INTERVAL_BUDGET", 0)
    pat = attnc.loads("pattern p on grid(h, w) = where (q.h - k.h + q.w - k.w) % 2 == 0").pattern()
    plan = check(pat, 12 * 14, 12 * 14, 1, (16, 16), (12, 14))
    assert plan.method == "tile-boxes"
    monkeypatch.undo()
    plan = check(pat, 12 * 14, 12 * 14, 1, (16, 16), (12, 14))
    assert plan.method == "closed-form"


def test_row_report_of_a_stencil():
    pat = attnc.load(EXAMPLES / "mmdit.attn").pattern("mmdit", r=2, text=3)
    N = 3 + 7 * 9
    rep = analysis.row_report(pat.ir, N, N, 2, (7, 9))
    assert rep.method == "closed-form"
    assert rep.allowed == int(pat.mask(N, heads=2, grid=(7, 9)).sum())


@pytest.mark.parametrize("block", [(16, 16), (7, 13), (64, 8)])
def test_tile_counts_of_stencils(block):
    # what `show` draws: every tile's pairs and every row's, from the intervals (no mask)
    pat = attnc.load(EXAMPLES / "mmdit.attn").pattern("mmdit", r=5, text=7)
    grid, N = (23, 29), 7 + 23 * 29
    for M in (N, N - 9):
        plan, counts, rows = pair_counts.tile_counts(pat.ir, M, N, 2, grid, block)
        m = pat.mask(M, N, heads=2, grid=grid).long()
        assert plan.shape == tuple(-(-x // b) for x, b in zip((M, N), block))
        assert torch.equal(counts.expand(2, -1, -1).long(), tile_counts_from_mask(m, *block))
        assert torch.equal(rows.expand(2, -1), m.sum(2))


def test_interval_tile_counts_against_brute_force():
    from attnc.interval_sets import ISet, merge
    from attnc.interval_tiles import interval_tile_counts

    g = torch.Generator().manual_seed(0)
    for M, N, bm, bn in ((50, 70, 8, 16), (33, 100, 7, 9), (64, 64, 64, 5)):
        lo = torch.randint(0, N, (2, M, 5), generator=g)
        hi = lo + torch.randint(0, 40, (2, M, 5), generator=g)
        s = merge(ISet.make(lo, hi, N))
        dense = torch.zeros(2, M, N, dtype=torch.bool)
        for h in range(2):
            for q in range(M):
                for a, b in zip(s.lo[h, q].tolist(), s.hi[h, q].tolist()):
                    dense[h, q, a:b] = True
        want = tile_counts_from_mask(dense, bm, bn)
        assert torch.equal(interval_tile_counts(s, M, bm, bn, torch.int32).long(), want)


def test_a_difference_box_past_the_limits_goes_to_the_tile_boxes(monkeypatch):
    from attnc import stencils

    monkeypatch.setattr(stencils, "MAX_POINTS", 100)  # 21 x 25 differences on an 11 x 13 grid
    pat = attnc.loads("pattern p on grid(h, w) = where abs(q.h - k.h) + abs(q.w - k.w) <= 2").pattern()
    assert check(pat, 143, 143, 1, (16, 16), (11, 13)).method == "tile-boxes"
    monkeypatch.undo()
    monkeypatch.setenv("ATTNC_MAX_BYTES", "20K")  # the estimate: 4 bytes a point, 48 a point at once
    view = top_view(pat.ir, 143, 143, 1, (11, 13), {})
    with pytest.raises(interval_sets.NotIntervals):
        stencils.Stencil.of(pat.ir.body.pred, IntervalAnalysis(pat.ir), view)
