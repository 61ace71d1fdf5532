"""Each primitive and combinator against a brute-force loop written from the
spec's table (qa = q + N - M), at sizes that are multiples of nothing, with
M != N, on 2-D and 3-D grids."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnc
import paper_refs as ref


def mask(src, M, N=None, **kw):
    params = kw.pop("params", {})
    return attnc.loads(src).pattern(**params).mask(M, N, **kw)


def brute(M, N, fn):
    out = torch.zeros(M, N, dtype=torch.bool)
    for q in range(M):
        qa = q + N - M
        for k in range(N):
            out[q, k] = bool(fn(qa, k))
    return out


def brute_grid(shape, fn):
    coords = list(itertools.product(*[range(s) for s in shape]))
    n = len(coords)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            out[i, j] = bool(fn(qc, kc))
    return out


SIZES = [(37, 37), (25, 61), (61, 25), (1, 9), (9, 1)]


@pytest.mark.parametrize("M,N", SIZES)
@pytest.mark.parametrize("src,fn", [
    ("full", lambda qa, k: True),
    ("none", lambda qa, k: False),
    ("causal", lambda qa, k: k <= qa),
    ("band(3, 5)", lambda qa, k: qa - 3 <= k <= qa + 5),
    ("band(-2, 6)", lambda qa, k: qa + 2 <= k <= qa + 6),
    ("sliding(7)", lambda qa, k: qa - 7 < k <= qa),
    ("block(6)", lambda qa, k: qa // 6 == k // 6),
    ("block(6, shift = 2)", lambda qa, k: (qa - 2) // 6 == (k - 2) // 6),
    ("block(5, halo = 2)", lambda qa, k: (qa // 5) * 5 - 2 <= k < (qa // 5 + 1) * 5 + 2),
    ("block(5, shift = 3, halo = 1)", lambda qa, k: ((qa - 3) // 5) * 5 + 3 - 1 <= k < ((qa - 3) // 5 + 1) * 5 + 3 + 1),
    ("strided(4)", lambda qa, k: (qa - k) % 4 == 0),
    ("sink(3)", lambda qa, k: k < 3),
    ("global(0 .. 3)", lambda qa, k: 0 <= qa < 3 or k < 3),
    ("global({2, 30})", lambda qa, k: qa in (2, 30) or k in (2, 30)),
    ("global(1 .. 20 step 6)", lambda qa, k: qa in (1, 7, 13, 19) or k in (1, 7, 13, 19)),
    ("rows({0, 10})", lambda qa, k: qa in (0, 10)),
    ("cols(5 .. 9)", lambda qa, k: 5 <= k < 9),
    ("prefix(11)", lambda qa, k: qa < 11 and k < 11),
    ("causal | prefix(11)", lambda qa, k: k <= qa or (qa < 11 and k < 11)),
    ("band(4, 4) & ~causal", lambda qa, k: qa - 4 <= k <= qa + 4 and k > qa),
    ("band(4, 4) - sink(2)", lambda qa, k: qa - 4 <= k <= qa + 4 and k >= 2),
    ("~(sliding(3) | sink(1))", lambda qa, k: not (qa - 3 < k <= qa or k < 1)),
    ("where q - k >= 2 and (k % 3 == 0 or q == k)", lambda qa, k: qa - k >= 2 and (k % 3 == 0 or qa == k)),
    ("where abs(q - k) < 4 and not k in {3, 4}", lambda qa, k: abs(qa - k) < 4 and k not in (3, 4)),
    ("where min(q, k) // 5 == max(q, k) // 5", lambda qa, k: min(qa, k) // 5 == max(qa, k) // 5),
    ("where 0 <= q - k < 6", lambda qa, k: 0 <= qa - k < 6),
    ("where k in 0 .. N step 10", lambda qa, k: k % 10 == 0),
    ("blockwise(8, causal)", lambda qa, k: k // 8 <= qa // 8),
    ("blockwise(6, band(1, 0) | global({N - 1}))",
     lambda qa, k: None),  # filled in below (needs N)
    ("dilate(3, causal)", lambda qa, k: qa % 3 == k % 3 and k // 3 <= qa // 3),
    ("dilate(2, band(1, 1))", lambda qa, k: qa % 2 == k % 2 and abs(qa // 2 - k // 2) <= 1),
    ("let w = 3 in sliding(w) | sink(w - 1)", lambda qa, k: qa - 3 < k <= qa or k < 2),
])
def test_primitive_1d(src, fn, M, N):
    if src.startswith("blockwise(6, band"):
        nb = math.ceil(N / 6)
        fn = lambda qa, k: (0 <= qa // 6 - k // 6 <= 1) or qa // 6 == nb - 1 or k // 6 == nb - 1  # noqa: E731
    got = mask(f"pattern p = {src}", M, N)[0]
    want = brute(M, N, fn)
    assert torch.equal(got, want), f"{src}: {int((got != want).sum())} mismatches, first {(got != want).nonzero()[0].tolist()}"


@pytest.mark.parametrize("L", [2, 5, 13, 37])
def test_neighborhood_1d_all_parameters(L):
    for size in range(2, L + 1):
        for d in range(1, L // size + 1):
            for s in range(1, size + 1):
                for causal in (False, True):
                    src = f"pattern p = neighborhood({size}, dilation = {d}, stride = {s}, causal = {str(causal).lower()})"
                    got = mask(src, L)[0]
                    want = torch.zeros(L, L, dtype=torch.bool)
                    for x in range(L):
                        want[x, list(ref.natten_axis(L, x, size, d, s, causal))] = True
                    assert torch.equal(got, want), (L, size, d, s, causal)
            if L > 13 and size > 5:
                break


def test_neighborhood_cross_attention_uses_absolute_queries():
    got = mask("pattern p = neighborhood(5)", 7, 30)[0]
    for q in range(7):
        want = torch.zeros(30, dtype=torch.bool)
        want[list(ref.natten_axis(30, q + 23, 5))] = True
        assert torch.equal(got[q], want)


def test_neighborhood_causal_per_axis_video():
    shape = (5, 6, 7)
    got = mask("pattern p on grid(t, h, w) = neighborhood((3, 3, 5), causal = (true, false, false))", 210, grid=shape)[0]
    want = torch.as_tensor(ref.natten(shape, (3, 3, 5), causal=(True, False, False)))
    assert torch.equal(got, want)


@pytest.mark.parametrize("M,N,r,seed", [(37, 37, 3, 0), (20, 51, 5, 9), (40, 13, 13, 1), (10, 4, 6, 2)])
def test_random_matches_documented_generator(M, N, r, seed):
    got = mask(f"pattern p = random({r}, seed = {seed})", M, N)[0]
    for q in range(M):
        keys = ref.random_keys(seed, q + N - M, N, r)
        want = torch.zeros(N, dtype=torch.bool)
        want[sorted(keys)] = True
        assert torch.equal(got[q], want), q
        assert int(got[q].sum()) == min(r, N)


GRID_CASES = [
    ("band(1, 2)", lambda a, b: all(x - 1 <= y <= x + 2 for x, y in zip(a, b))),
    ("band((0, 1), (2, 1))", lambda a, b: a[0] <= b[0] <= a[0] + 2 and a[1] - 1 <= b[1] <= a[1] + 1),
    ("block(3)", lambda a, b: all(x // 3 == y // 3 for x, y in zip(a, b))),
    ("block((2, 4), shift = (1, 2))", lambda a, b: (a[0] - 1) // 2 == (b[0] - 1) // 2 and (a[1] - 2) // 4 == (b[1] - 2) // 4),
    ("strided(3)", lambda a, b: all((x - y) % 3 == 0 for x, y in zip(a, b))),
    ("sliding(2) @ h", lambda a, b: a[0] - 2 < b[0] <= a[0]),
    ("causal @ w", lambda a, b: b[1] <= a[1]),
    ("(band(1, 1) | sink(1)) @ w", lambda a, b: abs(a[1] - b[1]) <= 1 or b[1] < 1),
    ("sink(size(w)) @ h & causal", lambda a, b: b[0] < 7 and b[0] * 7 + b[1] <= a[0] * 7 + a[1]),
    ("where (q.h - k.h)**2 + (q.w - k.w)**2 <= 4", lambda a, b: (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 <= 4),
    ("where q.w == k.w or q.h == k.h", lambda a, b: a[1] == b[1] or a[0] == b[0]),
    ("causal", lambda a, b: b[0] * 7 + b[1] <= a[0] * 7 + a[1]),
    ("blockwise(2, band(1, 0))", lambda a, b: all(0 <= x // 2 - y // 2 <= 1 for x, y in zip(a, b))),
    ("blockwise((3, 2), block(2))", lambda a, b: a[0] // 6 == b[0] // 6 and a[1] // 4 == b[1] // 4),
    ("dilate(2, block(2))", lambda a, b: all(x % 2 == y % 2 and x // 4 == y // 4 for x, y in zip(a, b))),
    ("dilate((2, 3), band(1, 1))", lambda a, b: a[0] % 2 == b[0] % 2 and a[1] % 3 == b[1] % 3
     and abs(a[0] // 2 - b[0] // 2) <= 1 and abs(a[1] // 3 - b[1] // 3) <= 1),
]


@pytest.mark.parametrize("src,fn", GRID_CASES)
def test_primitive_2d(src, fn):
    shape = (9, 7)
    got = mask(f"pattern p on grid(h, w) = {src}", 63, grid=shape)[0]
    want = brute_grid(shape, fn)
    assert torch.equal(got, want), f"{src}: {int((got != want).sum())} mismatches"


def test_primitive_3d_and_dilated_neighborhood_matches_natten():
    shape = (4, 6, 5)
    got = mask("pattern p on grid(t, h, w) = block((2, 3, 5)) & band(1, 1)", 120, grid=shape)[0]
    want = brute_grid(shape, lambda a, b: all(x // s == y // s and abs(x - y) <= 1 for x, y, s in zip(a, b, (2, 3, 5))))
    assert torch.equal(got, want)
    # dilate(d, neighborhood(s)) is DiNAT's dilated neighborhood
    shape = (10, 9)
    got = mask("pattern p on grid(h, w) = dilate(3, neighborhood(3))", 90, grid=shape)[0]
    assert torch.equal(got, torch.as_tensor(ref.natten(shape, 3, dilation=3)))


def test_grid_cross_attention_queries_are_the_last_tokens():
    shape = (6, 5)
    full = mask("pattern p on grid(h, w) = neighborhood(3)", 30, grid=shape)[0]
    tail = mask("pattern p on grid(h, w) = neighborhood(3)", 11, 30, grid=shape)[0]
    assert torch.equal(tail, full[19:])


def test_mixed_layout_grid_primitives_hold_only_inside_the_grid():
    T, shape = 4, (3, 5)
    n = T + 15
    got = mask("pattern p on seq(4) + grid(h, w) = band(1, 1) | sink(2)", n, grid=shape)[0]

    def fn(qa, k):
        if k < 2:
            return True
        if qa < T or k < T:
            return False
        a, b = divmod(qa - T, 5), divmod(k - T, 5)
        return abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) <= 1

    assert torch.equal(got, brute(n, n, fn))


def test_heads_and_head_index():
    src = """
    pattern p(fast = {1, 3}) = heads {
        0 => causal;
        fast => sliding(2);
        4 .. H => where h == k % H;
        _ => sink(1)
    }"""
    got = mask(src, 12, heads=6)
    assert torch.equal(got[0], brute(12, 12, lambda q, k: k <= q))
    assert torch.equal(got[1], got[3]) and torch.equal(got[1], brute(12, 12, lambda q, k: q - 2 < k <= q))
    assert torch.equal(got[2], brute(12, 12, lambda q, k: k < 1))
    for h in (4, 5):
        assert torch.equal(got[h], brute(12, 12, lambda q, k: k % 6 == h))


def test_uncovered_heads_is_an_error_with_location():
    with pytest.raises(attnc.AttnError, match=r"<string>:1:13: error: head 2 of 4 is not covered"):
        mask("pattern p = heads { 0 .. 2 => causal }", 8, heads=4)


def test_pattern_calls_lets_and_defaults_of_sizes():
    src = """
    let W = 3
    pattern local(w = W) = sliding(w)
    pattern moa(frac = 4, w = N // frac) = local(w = w) | local(1) @ h
    pattern top(x = 2) = local(w = x + 1) & ~sink(1)
    """
    prog = attnc.loads(src.replace(" | local(1) @ h", ""))
    assert torch.equal(prog.pattern("moa").mask(40)[0], brute(40, 40, lambda q, k: q - 10 < k <= q))
    assert torch.equal(prog.pattern("moa", frac=8).mask(40)[0], brute(40, 40, lambda q, k: q - 5 < k <= q))
    assert torch.equal(prog.pattern("top").mask(9)[0], brute(9, 9, lambda q, k: q - 3 < k <= q and k >= 1))
    assert torch.equal(prog.pattern("local").mask(9)[0], brute(9, 9, lambda q, k: q - 3 < k <= q))


def test_imports(tmp_path):
    (tmp_path / "common.attn").write_text("let R = 2\npattern win(w = R) = sliding(w)\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "main.attn").write_text('import "../common.attn"\npattern p = win(w = R + 1) | sink(1)\n')
    # a parent folder is outside the loaded file's tree: it must be opened explicitly (docs/language.md)
    with pytest.raises(attnc.AttnError, match="outside the folders imports may read"):
        attnc.load(tmp_path / "sub" / "main.attn")
    got = attnc.load(tmp_path / "sub" / "main.attn", search_path=[tmp_path]).pattern("p").mask(10)[0]
    assert torch.equal(got, brute(10, 10, lambda q, k: q - 3 < k <= q or k < 1))


def test_blockwise_sizes_are_block_counts():
    got = mask("pattern p = blockwise(10, where k == N - 1 or q == M - 1)", 35, 35)[0]
    assert torch.equal(got, brute(35, 35, lambda q, k: k // 10 == 3 or q // 10 == 3))


def test_runtime_routed_blocks():
    sel = torch.tensor([[[[1, -1], [0, 0]], [[-1, -1], [2, 1]]]])  # [B=1, H=2, nqb=2, kmax=2]
    got = attnc.loads("pattern g(sel: blocks(4)) = routed(sel)").pattern().mask(8, 12, heads=2, sel=sel)[0]
    assert got.shape == (2, 8, 12)
    assert torch.equal(got[0], brute(8, 12, lambda qa, k: (qa - 4) // 4 == 0 and k // 4 == 1 or (qa - 4) // 4 == 1 and k // 4 == 0))
    assert torch.equal(got[1], brute(8, 12, lambda qa, k: (qa - 4) // 4 == 1 and k // 4 in (1, 2)))


def test_ir_is_a_dag_with_shared_subpatterns_once():
    from attnc import ir
    pat = attnc.loads("let s = sliding(4) | sink(2)\npattern p = (s & causal) | (s - band(0, 0))").pattern()
    g = ir.dag(pat.ir.body)
    shared = [n for n in g if isinstance(n, ir.Union_) and len(n.parts) == 2 and isinstance(n.parts[0], ir.Sliding)]
    assert len(shared) == 1 and g.in_degree(shared[0]) == 2
    order = list(ir.walk(pat.ir.body))
    assert order[-1] == pat.ir.body and all(order.index(c) < order.index(n) for n in order for c in n.children())


PRIMS = ["causal", "sliding(3)", "band(2, 1)", "sink(2)", "block(4)", "strided(3)", "prefix(5)", "global({1})",
         "where (q + k) % 4 == 0", "blockwise(3, causal)", "dilate(2, sliding(2))", "random(2, seed = 5)"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PRIMS), st.sampled_from(PRIMS), st.sampled_from(["|", "&", "-"]),
       st.integers(1, 30), st.integers(1, 30))
def test_combinators_are_set_algebra(a, b, op, M, N):
    A = mask(f"pattern p = {a}", M, N)
    B = mask(f"pattern p = {b}", M, N)
    got = mask(f"pattern p = ({a}) {op} ({b})", M, N)
    want = {"|": A | B, "&": A & B, "-": A & ~B}[op]
    assert torch.equal(got, want)
    assert torch.equal(mask(f"pattern p = ~({a})", M, N), ~A)


def test_large_mask_is_fast_enough():
    import time
    pat = attnc.loads("pattern p on grid(h, w) = neighborhood(7, dilation = 2) | sink(4)").pattern()
    t = time.perf_counter()
    m = pat.mask(4096, grid=(64, 64))
    assert m.shape == (1, 4096, 4096)
    # generous bound, only to catch accidental O(N^2) Python loops (not a benchmark)
    assert time.perf_counter() - t < 20
