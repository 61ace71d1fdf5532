"""Per-axis products on grids with 1-D tiles: exact tile counts from row segments
([Note: product counts] in attnc/products.py) against dense masks and the exact
evaluation path they replace."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attnc
from attnc import analysis, interval_sets, products
from conftest import tile_counts_from_mask, tiles_from_mask


def tokens(grid, text=0):
    n = text
    size = 1
    for g in grid:
        size *= g
    return n + size


def check_counts(layout, body, grid, block, text=0, H=2):
    pat = attnc.loads(f"pattern p on {layout} = {body}").pattern()
    N = tokens(grid, text)
    counts = products.ProductCounts(pat.ir, N, N, H, grid, *block).counts(pat.ir.body)
    m = pat.mask(N, heads=H, grid=grid)
    assert torch.equal(counts.expand(H, -1, -1), tile_counts_from_mask(m, *block))
    return pat, m


CASES = [
    # 2-D, widths not a tile multiple, tiles spanning several rows
    ("grid(h, w)", "neighborhood((9, 7))", (48, 40), (128, 128), 0),
    ("grid(h, w)", "neighborhood((9, 7))", (48, 40), (7, 13), 0),
    ("grid(h, w)", "neighborhood(5)", (13, 11), (64, 3), 0),
    ("grid(h, w)", "neighborhood((9, 7), dilation = (2, 3))", (48, 40), (16, 48), 0),
    ("grid(h, w)", "neighborhood((4, 3), stride = (2, 3), dilation = (1, 2))", (17, 15), (32, 20), 0),
    ("grid(h, w)", "neighborhood((5, 5), causal = (true, false))", (12, 10), (16, 16), 0),
    ("grid(h, w)", "block((4, 3))", (12, 10), (16, 16), 0),
    ("grid(h, w)", "band((2, 0), (1, 3))", (9, 11), (8, 8), 0),
    ("grid(h, w)", "sliding((3, 2))", (9, 11), (12, 5), 0),
    ("grid(h, w)", "strided((3, 4))", (9, 11), (12, 5), 0),
    ("grid(h, w)", "band(2, 3) @ w", (9, 11), (8, 8), 0),
    ("grid(h, w)", "causal @ h", (9, 11), (8, 8), 0),
    ("grid(h, w)", "random(2, seed = 3) @ w", (9, 11), (8, 8), 0),
    # 3-D
    ("grid(t, h, w)", "neighborhood((3, 5, 3), stride = (1, 2, 3))", (5, 6, 7), (16, 24), 0),
    ("grid(t, h, w)", "neighborhood((3, 3, 5), causal = (true, false, false))", (4, 5, 9), (32, 32), 0),
    ("grid(t, h, w)", "band(1, 0) @ t", (3, 4, 5), (7, 9), 0),
    # text tokens before the grid: they get no pairs from a per-axis pattern
    ("seq(5) + grid(h, w)", "neighborhood((5, 3), causal = (true, false))", (12, 10), (7, 13), 5),
    ("seq(16) + grid(h, w)", "neighborhood((3, 3))", (8, 8), (16, 16), 16),
    # per-head arms, and full / none arms
    ("grid(h, w)", "heads { 0 => neighborhood((3, 3)); 1 => full; _ => sliding((2, 4)) }", (9, 11), (8, 8), 0),
    ("grid(h, w)", "heads { 0 .. 2 => neighborhood((5, 3)); _ => none }", (9, 11), (16, 8), 0),
]


@pytest.mark.parametrize("layout, body, grid, block, text", CASES)
def test_product_counts_are_the_masks_tile_counts(layout, body, grid, block, text):
    pat, m = check_counts(layout, body, grid, block, text, H=3)
    plan = pat.plan(m.shape[1], heads=3, grid=grid, block=block)
    assert torch.equal(plan.to_dense().expand(3, -1, -1), tiles_from_mask(m, *block))
    assert plan.allowed == int(m.sum())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 12), st.integers(4, 12), st.integers(2, 4), st.integers(2, 4), st.integers(1, 3),
       st.integers(1, 3), st.booleans(), st.integers(1, 70), st.integers(1, 70), st.sampled_from([0, 3]))
def test_product_counts_of_random_neighborhoods(gh, gw, kh, kw, dh, dw, causal, bm, bn, text):
    dh, dw = (dh if kh * dh <= gh else 1), (dw if kw * dw <= gw else 1)
    layout = "grid(h, w)" if not text else f"seq({text}) + grid(h, w)"
    body = f"neighborhood(({kh}, {kw}), dilation = ({dh}, {dw}), causal = ({str(causal).lower()}, false))"
    check_counts(layout, body, (gh, gw), (bm, bn), text)


def test_product_counts_decline_what_is_not_a_product():
    pat = attnc.loads("pattern p on grid(h, w) = neighborhood(3) | causal").pattern()
    pc = products.ProductCounts(pat.ir, 64, 64, 1, (8, 8), 16, 16)
    with pytest.raises(interval_sets.NotIntervals):
        pc.counts(pat.ir.body)
    seq = attnc.loads("pattern p = sliding(4)").pattern()
    with pytest.raises(interval_sets.NotIntervals):
        products.ProductCounts(seq.ir, 64, 64, 1, None, 16, 16)


def plan_lists(plan):
    lists = (plan.full, plan.partial, plan.full_t, plan.partial_t)
    return [(lst.counts.tolist(), lst.cols.tolist()) for lst in lists], plan.allowed, plan.to_dense().tolist()


@pytest.mark.parametrize("grid, size, block", [
    ((64, 64), (9, 9), (128, 128)),
    ((64, 64), (5, 13), (64, 32)),
    ((48, 40), (9, 7), (128, 128)),
    ((48, 40), (7, 9), (96, 48)),
    ((48, 40), (17, 3), (40, 40)),
])
def test_product_plans_are_the_evaluated_plans(monkeypatch, grid, size, block):
    # too many intervals per query for the closed form: the old path evaluated every
    # undecided tile (TileBoxes + refine); the product counts give the same plan
    monkeypatch.setattr(interval_sets, "MAX_INTERVALS", 2)
    monkeypatch.setattr(interval_sets, "INTERVAL_BUDGET", 0)
    pat = attnc.loads(f"pattern p on grid(h, w) = neighborhood({size})").pattern()
    N = grid[0] * grid[1]
    new = pat.plan(N, heads=2, grid=grid, block=block)
    assert new.method == "closed-form" and new.tiles_evaluated == 0

    def declined(self, node):
        raise interval_sets.NotIntervals("disabled for the comparison")

    monkeypatch.setattr(products.ProductCounts, "counts", declined)
    # (and no periodic slots: a window across many rows is one slot per query, test_periodic.py)
    monkeypatch.setattr(analysis, "_closed_form_plan", lambda *a, **k: analysis._closed_form_plan_with(*a, periodic=False, **k))
    old = pat.plan(N, heads=2, grid=grid, block=block)
    assert old.method == "tile-boxes" and old.tiles_evaluated > 0
    assert plan_lists(new) == plan_lists(old)


def test_products_inside_unions_are_classified_exactly(monkeypatch):
    # a union's product part is exact in the tile boxes: only tiles partial for both parts are evaluated
    monkeypatch.setattr(interval_sets, "MAX_INTERVALS", 2)
    monkeypatch.setattr(interval_sets, "INTERVAL_BUDGET", 0)
    pat = attnc.loads("pattern p on grid(h, w) = neighborhood((5, 5)) | where k == 0").pattern()
    N = 24 * 20
    plan = pat.plan(N, grid=(24, 20), block=(32, 32))
    m = pat.mask(N, grid=(24, 20))
    assert torch.equal(plan.to_dense(), tiles_from_mask(m, 32, 32))
    assert plan.allowed == int(m.sum())
    assert plan.method == "tile-boxes"
    assert plan.tiles_evaluated == plan.counts()["tiles_partial"]


def test_nd_tile_plans_count_products_without_evaluation(monkeypatch):
    monkeypatch.setattr(interval_sets, "MAX_INTERVALS", 2)
    monkeypatch.setattr(interval_sets, "INTERVAL_BUDGET", 0)
    pat = attnc.loads("pattern p on grid(t, h, w) = neighborhood((3, 5, 3), dilation = (1, 1, 2))").pattern()
    grid = (4, 9, 10)
    N = 360
    plan = pat.plan(N, heads=2, grid=grid, block=((2, 4, 4), (2, 2, 8)))
    assert plan.method == "closed-form" and plan.tiles_evaluated == 0
    assert plan.allowed == int(pat.mask(N, heads=2, grid=grid).sum())
