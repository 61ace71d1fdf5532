"""Per-head patterns share work across heads with equal arms (issue 18): analysis.head_classes
groups the heads by the arms of `heads { }` they take; plans and `attnc show` counts are built
once per group and must equal the per-head computation exactly."""

import pytest
import torch

import attnc
from attnc import analysis
from conftest import example_pattern


def _unshared(pat, M, N, H, grid, block, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(analysis, "head_classes", lambda *a: None)
        return analysis.plan_blocks(pat.ir, M, N, H, grid, block=block)


def _dense(plan, H):
    out = []
    for name in ("full", "partial", "full_t", "partial_t"):
        lst = getattr(plan, name)
        idx = lst.index
        out.append(idx.expand(H, -1, -1) if idx.shape[0] == 1 else idx)
    return out


CASES = [
    ("duo", {}, 12, 1000, None, [[0, 5, 9], [1, 2, 3, 4, 6, 7, 8, 10, 11]]),
    ("hilo", {}, 10, None, (12, 14), [[0], list(range(1, 10))]),
    ("cswin", {}, 4, None, (14, 12), [[0, 1], [2, 3]]),
    ("moa", {}, 4, 900, None, None),  # four different arms: nothing to share
]


@pytest.mark.parametrize("name,params,H,M,grid,groups", CASES)
def test_shared_plans_equal_per_head_plans(name, params, H, M, grid, groups, monkeypatch):
    pat = example_pattern(name, **params)
    M, N, H, grid = pat.resolve_sizes(M, None, H, grid)
    classes = analysis.head_classes(pat.ir, M, N, H, grid)
    assert (None if classes is None else [hs for hs, _ in classes]) == groups
    for block in ((64, 64), (32, 16)):
        shared = analysis.plan_blocks(pat.ir, M, N, H, grid, block=block)
        alone = _unshared(pat, M, N, H, grid, block, monkeypatch)
        for a, b in zip(_dense(shared, H), _dense(alone, H)):
            w = max(a.shape[-1], b.shape[-1])
            pad = lambda t: torch.nn.functional.pad(t, (0, w - t.shape[-1]), value=-1)  # noqa: E731
            assert torch.equal(pad(a), pad(b))
        assert shared.allowed == alone.allowed == int(pat.mask(M, N, heads=H, grid=grid).expand(H, M, N).sum())


def test_nested_arms_and_head_dependent_predicates():
    src = "pattern p = heads { 0 .. 3 => heads { 0 => causal; _ => sliding(3) }; _ => block(8) }"
    pat = attnc.loads(src).pattern()
    classes = analysis.head_classes(pat.ir, 40, 40, 6, None)
    assert [hs for hs, _ in classes] == [[0], [1, 2], [3, 4, 5]]
    from attnc.reference import evaluate

    for hs, p in classes:  # each group's pattern is head-free and is its heads' mask
        got = evaluate(p, 40, 40, 6, None, {})
        assert (got == got[:1]).all()
        assert torch.equal(got[:1].expand(len(hs), -1, -1), pat.mask(40, heads=6)[hs])
    # `where` over h is a head dependence outside the arms: nothing is shared
    pat = attnc.loads("pattern p = heads { 0 => causal; _ => where k <= q - h }").pattern()
    assert analysis.head_classes(pat.ir, 40, 40, 6, None) is None


def test_show_keeps_one_row_per_group():
    from attnc.show import plan_tile_stats

    pat = example_pattern("duo")
    stats, rows = plan_tile_stats(pat, 1000, 1000, 12, None, (64, 64))
    assert stats.counts.shape[0] == 2 and rows.shape[0] == 2
    assert [stats.row(h) for h in range(12)] == [0 if h in (0, 5, 9) else 1 for h in range(12)]
    assert stats.allowed() == int(pat.mask(1000, heads=12).expand(12, -1, -1).sum())
