"""`attnc show`'s figures from the plan (analysis.tile_counts, show.plan_tile_stats) against the
brute-force counts from dense mask rows (show.tile_stats)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attnc
from attnc import analysis
from attnc.show import head_groups, plan_tile_stats, render_text, tile_stats
from test_analysis import grid_patterns, patterns


def both(src, M, H, grid, block):
    pat = attnc.loads(src).pattern()
    M, N, H, grid = pat.resolve_sizes(M, None, H, grid)
    if grid is not None:
        M = N
    fast, fast_rows = plan_tile_stats(pat, M, N, H, grid, block)
    slow, slow_rows = tile_stats(lambda lo, hi: pat.mask_rows(M, N, H, grid, lo, hi), M, N, H, block)
    assert torch.equal(fast.counts, slow.counts)
    assert torch.equal(fast.sizes, slow.sizes)
    assert torch.equal(fast_rows, slow_rows)
    # what `attnc show` prints is the same
    assert (render_text(pat, fast, fast_rows, head_groups(fast, fast_rows))
            == render_text(pat, slow, slow_rows, head_groups(slow, slow_rows)))


@pytest.mark.parametrize("src, M, H, grid, block", [
    ("pattern p = sliding(5) | (sink(2) & causal)", 100, 1, None, (16, 16)),
    ("pattern p = sliding(5) - causal", 100, 1, None, (16, 16)),  # empty rows
    ("pattern p = where abs(q - k) <= 7 or k % 13 == 0", 90, 2, None, (16, 8)),
    ("pattern p = heads { 0 => sliding(4); _ => where k <= q - 5 * h or q % 7 == 0 }", 70, 3, None, (8, 16)),
    ("pattern p = random(3, seed = 1) | heads { 0 => causal; _ => band(2, 2) }", 50, 2, None, (8, 8)),
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
    monkeypatch.setattr(analysis, "COUNT_CHUNK", 1)
    both("pattern p = where abs(q - k) <= 20 or k % 13 == 0", 120, 2, None, (16, 8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.integers(12, 140), st.integers(1, 2), st.sampled_from([(16, 16), (7, 13), (64, 64)]))
def test_plan_counts_of_random_patterns(src, M, H, block):
    both(f"pattern p = {src}", M, H, None, block)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid_patterns(), st.integers(8, 11), st.integers(8, 12), st.sampled_from([(16, 16), (7, 13)]))
def test_plan_counts_of_random_grid_patterns(src, gh, gw, block):
    both(f"pattern p on grid(h, w) = {src}", None, 2, (gh, gw), block)
