"""Plans of unions with one routed arm from one query per routing block ([Note: routed plans] in
attnc/routed_plans.py): the same tiles, classes and pairs as the interval sets of every query."""

import numpy as np
import pytest
import torch

import attnc
from attnc import analysis, interval_tiles, routed_plans
from attnc.dynamic import synthetic_inputs
from conftest import EXAMPLES, tiles_from_mask

CASES = [  # (source, pattern, M, N, heads, block b of the table, tiles)
    ("nsa_like", "nsa_like", 4096 + 77, None, 2, None, (128, 128)),
    ("nsa_like", "nsa_like", 3000, None, 3, None, (64, 64)),
    ("nsa_like", "nsa_like", 2500, None, 2, None, (32, 128)),
    ("biformer", "biformer", 3000 + 13, None, 2, None, (128, 128)),
    ("pattern p(sel: blocks(128)) = causal & (routed(sel) | sliding(100) | sink(5))", "p", 3000, None, 2, None, (64, 64)),
    ("pattern p(sel: blocks(32)) = (causal & routed(sel)) | sliding(100) | (sink(5) & causal)", "p", 3000, None, 2,
     None, (64, 96)),
    ("pattern p(sel: blocks(64)) = (routed(sel) & band(300, 40)) | block(100)", "p", 2000, None, 2, None, (128, 64)),
    ("pattern p(sel: blocks(64)) = causal & (routed(sel) | sliding(64))", "p", 1000, 3000, 2, None, (64, 64)),
    ("pattern p(sel: blocks(64)) = causal & (routed(sel) | heads { 0 => sliding(64); _ => sink(3) })", "p", 1500, None, 2,
     None, (64, 64)),
]


def _pattern(src, name):
    if src.startswith("pattern"):
        return attnc.loads(src).pattern(name)
    return attnc.load(EXAMPLES / f"{src}.attn").pattern(name)


def _inputs(pat, M, N, H, density, seed, holes=False):
    p2, inputs = synthetic_inputs(pat, M, N, H, None, density, {}, seed=seed)
    if holes:  # unused slots (-1) and repeated blocks, as a router may give them
        g = torch.Generator().manual_seed(seed)
        inputs = {n: torch.where(torch.rand(t.shape, generator=g) < 0.2, -1,
                                 torch.where(torch.rand(t.shape, generator=g) < 0.1, t.roll(1, -1), t)).to(t.dtype)
                  for n, t in inputs.items()}
    return p2, inputs


@pytest.mark.parametrize("src,name,M,N,H,b,tiles", CASES)
@pytest.mark.parametrize("density,holes", [(0.1, False), (0.35, True)])
def test_routed_plans_equal_the_interval_sets(src, name, M, N, H, b, tiles, density, holes, monkeypatch):
    pat = _pattern(src, name)
    N = N or M
    p2, inputs = _inputs(pat, M, N, H, density, seed=M + H, holes=holes)
    used = []
    real = routed_plans._chunk
    monkeypatch.setattr(routed_plans, "_chunk", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr(analysis, "PLAN_CHUNK", 1024)  # several chunks, the last one short
    new = p2.plan(M, N, heads=H, block=tiles, **inputs)
    assert used, "the routed path declined"
    monkeypatch.setattr(analysis, "ROUTED_PLANS", False)
    old = p2.plan(M, N, heads=H, block=tiles, **inputs)
    assert new.allowed == old.allowed and new.counts() == old.counts()
    assert torch.equal(new.to_dense(), old.to_dense())
    mask = p2.mask(M, N, heads=H, **inputs).expand(H, -1, -1)
    assert torch.equal(new.to_dense().expand(H, -1, -1), tiles_from_mask(mask, *tiles))
    assert new.allowed == int(mask.sum())


def test_a_counted_routed_plan_counts_the_same_tiles():
    pat = _pattern("nsa_like", "nsa_like")
    p2, inputs = _inputs(pat, 3000, 3000, 2, 0.2, seed=1)
    listed = p2.plan(3000, heads=2, block=(64, 64), **inputs)
    counted = p2._plan(3000, None, 2, None, (64, 64), inputs, counted=True)
    assert counted.full.is_counted and counted.counts() == listed.counts() and counted.allowed == listed.allowed
    assert torch.equal(counted.partial.counts, listed.partial.counts)


@pytest.mark.parametrize("src", [
    "pattern p(a: blocks(64), c: blocks(64)) = routed(a) | routed(c)",  # two routed arms
    "pattern p(sel: blocks(64)) = ~routed(sel) & causal",  # not a union of arms
    "pattern p(sel: blocks(48)) = causal & (routed(sel) | sliding(64))",  # blocks and tiles do not nest
])
def test_other_forms_are_planned_by_the_interval_sets(src, monkeypatch):
    pat = attnc.loads(src).pattern("p")
    p2, inputs = _inputs(pat, 1000, 1000, 2, 0.3, seed=3)
    used = []
    real = routed_plans._chunk
    monkeypatch.setattr(routed_plans, "_chunk", lambda *a: used.append(1) or real(*a))
    plan = p2.plan(1000, heads=2, block=(64, 64), **inputs)
    assert not used
    mask = p2.mask(1000, heads=2, **inputs).expand(2, -1, -1)
    assert torch.equal(plan.to_dense().expand(2, -1, -1), tiles_from_mask(mask, 64, 64))


def test_near_sets_hold_few_intervals(monkeypatch):
    """nsa_like at 2^16 tokens, 10 % routing (103 blocks a query): the sets classified per query
    hold the near blocks only, not every routed block."""
    pat = _pattern("nsa_like", "nsa_like")
    M = 1 << 16
    p2, inputs = _inputs(pat, M, M, 2, 0.1, seed=0)
    widths = []
    real = interval_tiles.tile_runs
    monkeypatch.setattr(routed_plans, "tile_runs", lambda s, bm, bn: widths.append((s.lo.shape[1], s.lo.shape[2]))
                        or real(s, bm, bn))
    plan = p2._plan(M, None, 2, None, (128, 128), inputs, counted=True)
    per_query = [w for q, w in widths if q > M // 64]  # the exact sets of every query (not per block)
    assert per_query and max(per_query) <= 16
    assert max(w for _, w in widths) > 90  # the routed rows themselves, per block
    assert plan.counts()["tiles_partial"] > 0


def test_plan_split_forms():
    ir_of = lambda s: attnc.loads(s).pattern("p").ir.body  # noqa: E731
    node, clips, rest, common = routed_plans.split(
        ir_of("pattern p(sel: blocks(64)) = causal & (routed(sel) | sliding(8) | sink(2))"))
    assert node.input == "sel" and len(clips) == 1 and len(rest) == 2 and len(common) == 1
    assert routed_plans.split(ir_of("pattern p(sel: blocks(64)) = routed(sel)"))[2] == []
    assert routed_plans.split(ir_of("pattern p = causal | sliding(4)")) is None
    np.testing.assert_equal(len(routed_plans.split(ir_of("pattern p(sel: blocks(64)) = routed(sel) & causal"))[1]), 1)


@pytest.mark.parametrize("budget,pieces,fail_at", [(0, 64, None), (1 << 24, 0, None), (1 << 24, 64, 2)])
def test_past_its_budget_a_routed_plan_falls_back(monkeypatch, budget, pieces, fail_at):
    """Past the pair budget or the pieces a row may have, also after some chunks are done, the
    interval sets plan the whole pattern: the same plan."""
    from attnc.interval_sets import NotIntervals
    pat = _pattern("nsa_like", "nsa_like")
    p2, inputs = _inputs(pat, 3000, 3000, 2, 0.2, seed=5)
    want = p2.plan(3000, heads=2, block=(64, 64), **inputs)
    monkeypatch.setattr(routed_plans, "PAIR_BUDGET", budget)
    monkeypatch.setattr(routed_plans, "MAX_PIECES", pieces)
    monkeypatch.setattr(analysis, "PLAN_CHUNK", 512)
    calls = []
    real = routed_plans._chunk

    def chunk(*a):
        calls.append(1)
        if len(calls) == fail_at:
            raise NotIntervals("as past a budget")
        return real(*a)

    monkeypatch.setattr(routed_plans, "_chunk", chunk)
    got = p2.plan(3000, heads=2, block=(64, 64), **inputs)
    assert got.allowed == want.allowed and torch.equal(got.to_dense(), want.to_dense())
    assert calls and (fail_at is None or len(calls) == fail_at)


def test_a_chunk_with_too_many_intervals_is_halved(monkeypatch):
    """TooManyIntervals in a chunk (the pair budget, the near sets' width) halves the chunk, as the
    interval sets do, instead of giving the whole plan to them."""
    from attnc.interval_sets import TooManyIntervals
    pat = _pattern("nsa_like", "nsa_like")
    p2, inputs = _inputs(pat, 3000, 3000, 2, 0.2, seed=6)
    want = p2.plan(3000, heads=2, block=(64, 64), **inputs)
    monkeypatch.setattr(analysis, "PLAN_CHUNK", 1024)
    sizes = []
    real = routed_plans._chunk

    def chunk(view, *a):
        sizes.append(len(view.q))
        if len(view.q) > 256:
            raise TooManyIntervals("as past the pair budget")
        return real(view, *a)

    monkeypatch.setattr(routed_plans, "_chunk", chunk)
    monkeypatch.setattr(analysis, "_closed_form_plan", lambda *a, **k: pytest.fail("fell back to the interval sets"))
    got = p2.plan(3000, heads=2, block=(64, 64), **inputs)
    assert got.allowed == want.allowed and torch.equal(got.to_dense(), want.to_dense())
    assert sizes[:3] == [1024, 512, 256] and max(sizes[3:]) <= 256
