"""The interval-set algebra's gathers for one interval ([Note: one interval] in attnc/interval_sets.py)
against dense key masks and against the sort-based merge."""

import pytest
import torch

from attnc.interval_sets import ISet, intersect, merge, union


def dense(s: ISet) -> torch.Tensor:
    k = torch.arange(s.n)
    return ((k >= s.lo[..., None]) & (k < s.hi[..., None])).any(-2)


def random_sets(seed: int, n: int = 200):
    g = torch.Generator().manual_seed(seed)
    H, M, R = 2, 40, int(torch.randint(2, 9, (1,), generator=g))
    lo = torch.randint(0, n, (H, M, R), generator=g)
    a = merge(ISet.make(lo, lo + torch.randint(0, 40, (H, M, R), generator=g), n))
    bl = torch.randint(0, n + 20, (H, M, 1), generator=g)  # some past n: empty intervals
    b = ISet.make(bl, bl + torch.randint(0, 90, (H, M, 1), generator=g), n)
    return a, b


@pytest.mark.parametrize("seed", range(40))
def test_union_and_intersection_with_one_interval_are_exact_and_merged(seed):
    a, b = random_sets(seed)
    for got, want in ((union(a, b), dense(a) | dense(b)), (union(b, a), dense(a) | dense(b)),
                      (intersect(a, b), dense(a) & dense(b)), (intersect(b, a), dense(a) & dense(b))):
        assert torch.equal(dense(got), want)
        assert got.merged
        again = merge(ISet(got.lo, got.hi, got.n))  # already canonical: sorted, joined, empties last, trimmed
        assert torch.equal(again.lo, got.lo) and torch.equal(again.hi, got.hi)
