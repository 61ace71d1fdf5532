"""Tile plans against tiles derived from mask(); the simulator's figures."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attnc
from attnc import analysis
from attnc.cli import main
from conftest import EXAMPLES, tiles_from_mask


def check_plan(pat, M, N, H, block, grid=None):
    plan = pat.plan(M, N, heads=H, grid=grid, block=block)
    m = pat.mask(M, N, heads=H, grid=grid)
    want = tiles_from_mask(m, *block)
    got = plan.to_dense().expand(H, -1, -1)
    assert torch.equal(got, want), f"{int((got != want).sum())} tiles differ ({plan.method})"
    assert plan.allowed == int(m.sum())
    assert plan.density() == pytest.approx(float(m.float().mean()))
    # the transposed view lists the same tiles
    for lst, lst_t in ((plan.full, plan.full_t), (plan.partial, plan.partial_t)):
        fwd = set()
        for h in range(lst.index.shape[0]):
            for qi in range(lst.index.shape[1]):
                fwd |= {(h, qi, int(k)) for k in lst.index[h, qi, : lst.counts[h, qi]]}
        bwd = set()
        for h in range(lst_t.index.shape[0]):
            for ki in range(lst_t.index.shape[1]):
                bwd |= {(h, int(q), ki) for q in lst_t.index[h, ki, : lst_t.counts[h, ki]]}
        assert fwd == bwd
    return plan


LEAVES = ["causal", "full", "none", "sliding({a})", "band({a}, {b})", "band(-{b}, {a})", "sink({b})", "prefix({a})",
          "block({a})", "block({a}, shift = {b}, halo = {c})", "global({{{b}, {a}}})", "rows({b} .. {a})",
          "cols({c} .. {a} step 3)", "neighborhood({n}, dilation = {d}, stride = {s})",
          "neighborhood({n}, causal = true)", "random(2, seed = {c})", "blockwise({c}, band(1, 0))",
          "strided({d})", "where (q + k) % {d} == 0", "dilate({d}, causal)"]


@st.composite
def patterns(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        leaf = draw(st.sampled_from(LEAVES))
        vals = dict(a=draw(st.integers(1, 40)), b=draw(st.integers(0, 9)), c=draw(st.integers(1, 9)),
                    n=draw(st.integers(2, 5)), d=draw(st.integers(1, 2)))
        vals["s"] = draw(st.integers(1, vals["n"]))
        return leaf.format(**vals)
    op = draw(st.sampled_from(["|", "&", "-"]))
    if draw(st.integers(0, 5)) == 0:
        return f"~({draw(patterns(depth - 1))})"
    return f"({draw(patterns(depth - 1))}) {op} ({draw(patterns(depth - 1))})"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.integers(12, 140), st.integers(12, 140), st.sampled_from([(16, 16), (32, 8), (7, 13), (64, 64)]))
def test_plan_matches_mask_for_random_patterns(src, M, N, block):
    pat = attnc.loads(f"pattern p = {src}").pattern()
    check_plan(pat, M, N, 1, block)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), patterns(), st.integers(12, 140), st.integers(12, 140), st.sampled_from([(16, 16), (7, 13), (5, 32)]),
       st.sampled_from([13, 40]))
def test_closed_form_plans_in_chunks_match_the_mask(src_a, src_b, M, N, block, chunk):
    # queries in chunks of whole query tiles (PLAN_CHUNK is 16K), per-head plans assembled across chunks
    pat = attnc.loads(f"pattern p = heads {{ 0 => {src_a}; _ => {src_b} }}").pattern()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(analysis, "PLAN_CHUNK", chunk)
        check_plan(pat, M, N, 3, block)


def test_sparse_tile_classes_need_no_dense_tile_map():
    # 2**20 queries and keys in 16x16 tiles: 4.3 G tiles, of which 0.5 M are non-empty. A dense
    # [nq, nk] map (or difference arrays over it) would need gigabytes; the closed form builds the
    # lists from the non-empty tiles, in chunks of queries. The pattern is the same for every
    # query tile away from the ends, so its figures are linear in N: fitted on two sizes checked
    # against the mask, they predict the large plan exactly.
    pat = attnc.loads("pattern p = sliding(40) | band(-100, 130)").pattern()

    def figures(plan):
        c = plan.counts()
        return c["tiles_full"], c["tiles_partial"], plan.allowed

    f1, f2 = (figures(check_plan(pat, n, n, 1, (16, 16))) for n in (1024, 2048))
    n = 2**20
    plan = pat.plan(n, block=(16, 16))
    assert plan.method == "closed-form" and plan.shape == (n // 16, n // 16)
    k = (n - 1024) // 1024
    assert figures(plan) == tuple(a + k * (b - a) for a, b in zip(f1, f2))
    assert plan.partial.index.shape == (1, n // 16, 7) and plan.full_t.index.shape == (1, n // 16, 1)


def test_plan_memory_follows_the_non_empty_tiles():
    # A sink column: key tile 0 is non-empty for every query tile, so a padded transposed list
    # would be nk x nq (2**16 x 2**16 int32 = 16 GiB here). Tile lists are stored compressed
    # (one int32 per non-empty tile) and padded only when a consumer reads `.index`.
    pat = attnc.loads("pattern p = sliding(64) | (sink(4) & causal)").pattern()
    f1, f2 = (check_plan(pat, n, n, 1, (16, 16)).counts() for n in (1024, 2048))
    n = 2**20
    plan = pat.plan(n, block=(16, 16))
    c = plan.counts()
    k = (n - 1024) // 1024
    assert c["tiles_total"] == (n // 16) ** 2
    assert all(c[key] == f1[key] + k * (f2[key] - f1[key]) for key in ("tiles_full", "tiles_partial"))
    lists = (plan.full, plan.partial, plan.full_t, plan.partial_t)
    assert sum(len(t.cols) for t in lists) == 2 * (c["tiles_full"] + c["tiles_partial"])
    assert all("index" not in t.__dict__ for t in lists)  # nothing padded was built
    assert int(plan.partial_t.counts[0, 0] + plan.full_t.counts[0, 0]) == n // 16  # the sink column: every query tile
    # the padded view, where a consumer asks for it, agrees with the compressed rows
    small = check_plan(pat, 300, 300, 1, (16, 16))
    for t in (small.full, small.partial, small.full_t, small.partial_t):
        rows = [row[:int(cnt)].tolist() for row, cnt in zip(t.index[0], t.counts[0])]
        assert sum(rows, []) == t.cols.tolist() and (t.index[0] >= -1).all()


@pytest.mark.parametrize("name,params,M,N,H,grid,block", [
    ("mistral", dict(window=50), 125, 125, 1, None, (16, 16)),
    ("streaming_llm", dict(sinks=3, recent=20), 232, 232, 1, None, (32, 32)),
    ("duo", {}, 300, 300, 12, None, (64, 32)),
    ("bigbird", dict(b=16, r=2), 250, 250, 1, None, (16, 16)),
    ("longformer", dict(window=20, globals=5), 125, 300, 1, None, (16, 32)),
    ("prefix_lm", dict(n=40), 232, 232, 1, None, (32, 32)),
    ("natten2d", dict(size=5), 144, 144, 1, (12, 12), (16, 16)),
    ("cswin", dict(sw=3), 81, 81, 4, (9, 9), (9, 9)),
    ("mmdit", dict(r=3, text=7), 7 + 64, 7 + 64, 1, (8, 8), (16, 16)),
])
def test_plan_of_examples(name, params, M, N, H, grid, block):
    pat = attnc.load(EXAMPLES / f"{name}.attn").pattern(name, **params)
    plan = check_plan(pat, M, N, H, block, grid)
    assert plan.method == "closed-form"  # mmdit's disc too: a stencil (tests/test_stencils.py)


GRID_LEAVES = ["causal", "full", "sink({b})", "global({{{b}, {a}}})", "neighborhood({n})",
               "neighborhood(({n}, 2), dilation = ({d}, 1), stride = ({s}, 1))", "neighborhood({n}, causal = true)",
               "block({c}, shift = {b}, halo = {d})", "block(({c}, 2))", "band({d}, {b}) @ w", "sliding({c}) @ h",
               "strided({c}) @ w", "band(1, 0)", "(block(2) @ h) & (strided(3) @ w)", "where q.h == k.w"]


@st.composite
def grid_patterns(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        leaf = draw(st.sampled_from(GRID_LEAVES))
        vals = dict(a=draw(st.integers(1, 40)), b=draw(st.integers(0, 5)), c=draw(st.integers(1, 4)),
                    n=draw(st.integers(2, 4)), d=draw(st.integers(1, 2)))
        vals["s"] = draw(st.integers(1, vals["n"]))
        return leaf.format(**vals)
    op = draw(st.sampled_from(["|", "&", "-"]))
    if draw(st.integers(0, 5)) == 0:
        return f"~({draw(grid_patterns(depth - 1))})"
    return f"({draw(grid_patterns(depth - 1))}) {op} ({draw(grid_patterns(depth - 1))})"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid_patterns(), st.sampled_from([None, 0, 5]), st.integers(8, 11), st.integers(8, 12), st.integers(0, 6),
       st.sampled_from([(16, 16), (7, 13), (12, 8)]))
def test_plan_matches_mask_on_grids(src, text, gh, gw, short, block):
    layout = "grid(h, w)" if text is None else f"seq({text}) + grid(h, w)"
    pat = attnc.loads(f"pattern p on {layout} = {src}").pattern()
    N = (text or 0) + gh * gw
    plan = check_plan(pat, N - short, N, 2, block, (gh, gw))
    if "where" in src:
        assert plan.method == "tile-boxes"
    elif "strided" not in src:  # strided rows may exceed the interval budget and use the boxes
        assert plan.method == "closed-form"


def test_where_tiles_are_decided_by_interval_arithmetic(monkeypatch):
    # (these predicates are stencils, planned in closed form: tests/test_stencils.py; here the boxes)
    from attnc.intervals import IntervalAnalysis
    from attnc.interval_sets import NotIntervals

    def declined(self, pred, view):
        raise NotIntervals("stencils disabled: the tile boxes under test")

    monkeypatch.setattr(IntervalAnalysis, "stencil", declined)
    # |q - k| over a tile box is bounded exactly, so only the tiles the band cuts are evaluated
    pat = attnc.loads("pattern p = where abs(q - k) <= 40 and k <= q + 3 * 7").pattern()
    plan = check_plan(pat, 700, 700, 1, (64, 64))
    assert plan.method == "tile-boxes"
    assert plan.tiles_evaluated == plan.counts()["tiles_partial"]
    # MM-DiT's circle on a grid with text tokens: only tiles near the circle's edge are evaluated
    pat = attnc.load(EXAMPLES / "mmdit.attn").pattern("mmdit", r=3, text=16)
    plan = check_plan(pat, 16 + 48 * 48, 16 + 48 * 48, 1, (48, 48), (48, 48))
    c = plan.counts()
    assert 0 < plan.tiles_evaluated <= c["tiles_partial"] < c["tiles_total"] // 5
    # heads in the predicate: h is a point in each box
    pat = attnc.loads("pattern p = where k <= q - 5 * h or q % 7 == 0").pattern()
    check_plan(pat, 300, 300, 3, (32, 16))


def nd_tiles_from_mask(m: torch.Tensor, plan) -> torch.Tensor:
    """int8 [H, nq, nk] classes of N-D tiles, from the mask permuted into the plan's tile-major order."""
    mp = m[:, plan.perm_q][:, :, plan.perm_k].long()
    oq, ok = plan.offsets_q.tolist(), plan.offsets_k.tolist()
    out = torch.zeros(m.shape[0], len(oq) - 1, len(ok) - 1, dtype=torch.int8)
    for i in range(len(oq) - 1):
        for j in range(len(ok) - 1):
            t = mp[:, oq[i]:oq[i + 1], ok[j]:ok[j + 1]]
            c, size = t.sum((1, 2)), t.shape[1] * t.shape[2]
            out[:, i, j] = torch.where(c == size, 2, torch.where(c == 0, 0, 1))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid_patterns(), st.integers(8, 11), st.integers(8, 12),
       st.sampled_from([((4, 4), (4, 4)), ((3, 4), (4, 2)), ((2, 5), (5, 3)), ((1, 8), (8, 1))]))
def test_nd_tile_plans_match_the_permuted_mask(src, gh, gw, tile):
    pat = attnc.loads(f"pattern p on grid(h, w) = {src}").pattern()
    N = gh * gw
    plan = pat.plan(N, heads=2, grid=(gh, gw), block=tile)
    m = pat.mask(N, heads=2, grid=(gh, gw))
    assert torch.equal(torch.sort(plan.perm_q).values, torch.arange(N))
    assert torch.equal(plan.to_dense().expand(2, -1, -1), nd_tiles_from_mask(m, plan))
    assert plan.allowed == int(m.sum())
    assert plan.block == (tile[0][0] * tile[0][1], tile[1][0] * tile[1][1])


def test_nd_tiles_tile_major_order_and_exact_products():
    pat = attnc.load(EXAMPLES / "natten2d.attn").pattern("natten2d", size=5)
    plan = pat.plan(12 * 12, grid=(12, 12), block=((4, 4), (4, 2)))
    # the first query tile is the top-left 4x4 box, row-major inside
    assert plan.perm_q[:16].tolist() == [r * 12 + c for r in range(4) for c in range(4)]
    assert plan.offsets_k.tolist() == list(range(0, 145, 8)) and plan.shape == (9, 18)
    assert plan.method == "closed-form" and plan.tiles_evaluated == 0  # a product: box classes are exact
    # non-multiple sizes: edge tiles are smaller
    plan = pat.plan(10 * 11, grid=(10, 11), block=((4, 4), (3, 3)))
    sizes = (plan.offsets_q[1:] - plan.offsets_q[:-1]).tolist()
    assert sizes == [16, 16, 12, 16, 16, 12, 8, 8, 6]
    with pytest.raises(ValueError, match="N-D tiles need a pattern on a pure grid"):
        attnc.loads("pattern p = causal").pattern().plan(64, block=((8,), (8,)))
    with pytest.raises(ValueError, match="expected M = N"):
        pat.plan(100, 144, grid=(12, 12), block=((4, 4), (4, 4)))


def test_three_axis_products_and_mixed_layouts():
    for src, grid in [("pattern p on seq(5) + grid(t, h, w) = causal & neighborhood((2, 3, 3), stride = (1, 2, 3)) | sink(3)",
                       (3, 5, 6)),
                      ("pattern p on grid(t, h, w) = band(1, 2) & ~(sliding(2) @ w)", (3, 5, 6)),
                      ("pattern p on grid(t, h, w) = heads { 0 => block(2) @ t; _ => neighborhood((2, 3, 2), dilation = (1, 1, 2)) }",
                       (4, 3, 5))]:
        pat = attnc.loads(src).pattern()
        N = pat.resolve_sizes(1, None, 2, grid)[1]
        assert check_plan(pat, N, N, 2, (16, 8), grid).method == "closed-form"
        assert check_plan(pat, N - 4, N, 2, (7, 9), grid).method == "closed-form"


def test_natten_published_bounds():
    # NATTEN 1-D, 32K tokens, window 2K: a 16x FLOP bound; with stride 256 perfectly block-sparse at 128x128
    for stride in (1, 256):
        pat = attnc.loads(f"pattern p = neighborhood(2048, stride = {stride})").pattern()
        rep = pat.simulate(32768, heads=1, head_dim=128, tile=(128, 128), gpu="h100")
        assert rep.flop_bound == pytest.approx(16.0)
        if stride == 256:
            assert rep.tiles_partial == 0
            assert rep.tile_bound == pytest.approx(rep.flop_bound)
            assert rep.predicted_speedup <= rep.tile_bound


def test_blocked_strided_configuration_is_perfectly_block_sparse():
    pat = attnc.loads("pattern p = block(256) | blockwise(128, strided(8))").pattern()
    rep = pat.simulate(16384, heads=2, head_dim=64, tile=(128, 128), gpu="h200")
    assert rep.tiles_partial == 0 and rep.tile_bound == pytest.approx(rep.flop_bound)


def test_huge_sizes_are_planned_without_n_squared_memory():
    import time
    pat = attnc.loads("pattern p = sliding(2048) | (sink(64) & causal)").pattern()
    t = time.perf_counter()
    plan = pat.plan(262_656, block=(128, 128))
    assert time.perf_counter() - t < 60  # catches an accidental N^2 path (that would need 69 G entries)
    assert plan.method == "closed-form"
    n = 262_656
    assert plan.allowed == sum(min(q + 1, 2048) for q in range(n)) + sum(min(64, q + 1 - 2048) for q in range(2048, n) if q + 1 > 2048)


def test_grid_with_text_tokens_is_planned_in_closed_form_at_262k_tokens():
    # a 512x512 image plus 512 text tokens: N^2 = 69 G pairs, far beyond memory for a scan
    src = "pattern p(text = 512) on seq(text) + grid(h, w) = global(0 .. text) | neighborhood(17)"
    pat = attnc.loads(src).pattern()
    n = 512 + 512 * 512
    plan = pat.plan(n, grid=(512, 512), block=(128, 128))
    assert plan.method == "closed-form"
    assert plan.allowed == 512 * n + (n - 512) * 512 + 17 * 17 * 512 * 512
    c = plan.counts()
    # text rows (4 query tiles) and text columns (4 key tiles) are full. A 128-token tile is a quarter image row;
    # the window's 17 columns make the four quarters of a row see 2, 3, 3, 2 key quarters in each of 17 rows
    assert c["tiles_full"] == 4 * 2052 + 2048 * 4
    assert c["tiles_partial"] == 512 * 17 * (2 + 3 + 3 + 2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.integers(12, 90), st.integers(0, 30), st.integers(1, 3))
def test_row_checks_match_the_mask(src, N, short, H):
    pat = attnc.loads(f"pattern p = heads {{ 0 => {src}; _ => sliding(3) }}").pattern()
    M = max(1, N - short)
    rep = pat.check_rows(M, N, heads=H)
    m = pat.mask(M, N, heads=H)
    empty = (m.sum(-1) == 0).nonzero()
    assert rep.empty_rows == len(empty)
    assert rep.witness == (tuple(int(x) for x in empty[0]) if len(empty) else None)
    assert rep.dense == bool(m.all())
    assert rep.allowed == int(m.sum())


def test_row_checks_are_proved_without_the_mask_at_large_sizes():
    n = 1 << 18  # the mask would hold 2**36 entries per head
    rep = attnc.loads("pattern p = band(-2, 8) | (sink(4) & rows(0 .. 10))").pattern().check_rows(n, heads=8)
    assert rep.method == "closed-form"
    assert (rep.empty_rows, rep.witness, rep.dense) == (2 * 8, (0, n - 2), False)
    rep = attnc.loads("pattern p = causal | ~causal").pattern().check_rows(n)
    assert rep.dense and rep.witness is None and rep.allowed == n * n
    grid = attnc.loads("pattern p on seq(3) + grid(h, w) = neighborhood(3) - band(0, 0)").pattern()
    rep = grid.check_rows(3 + 256 * 256, grid=(256, 256))
    assert rep.method == "closed-form" and rep.witness == (0, 0)  # text rows see nothing
    assert rep.empty_rows == 3


def test_check_cli_warns_from_the_closed_form(tmp_path):
    import io
    f = tmp_path / "p.attn"
    f.write_text("pattern p = band(-2, 8)\npattern d = causal | ~causal\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", str(f), "--seq-len", str(1 << 18)], out=out, err=err) == 0, err.getvalue()
    assert f"pattern 'p' has 2 empty query rows at M = N = {1 << 18} (e.g. head 0, row {(1 << 18) - 2})" in out.getvalue()
    assert "pattern 'd' is fully dense" in out.getvalue()


def test_simulate_cli_json_and_table():
    import io
    out, err = io.StringIO(), io.StringIO()
    code = main(["simulate", str(EXAMPLES / "mistral.attn"), "--set", "window=512", "--seq-len", "8192",
                 "--heads", "8", "--head-dim", "64", "--gpu", "h200", "--json"], out=out, err=err)
    assert code == 0, err.getvalue()
    rep = json.loads(out.getvalue())
    for key in ("density", "flop_bound", "tiles_total", "tiles_full", "tiles_partial", "tile_density", "tile_bound",
                "predicted_speedup"):
        assert key in rep
    assert rep["tiles_total"] == 64 * 64 * 8
    assert rep["tile_bound"] == pytest.approx(rep["tiles_total"] / (rep["tiles_full"] + rep["tiles_partial"]))
    out = io.StringIO()
    assert main(["simulate", str(EXAMPLES / "natten2d.attn"), "--grid", "16x16", "--tile", "64x64"], out=out, err=err) == 0
    assert "tile_bound" in out.getvalue()
    out = io.StringIO()
    assert main(["simulate", str(EXAMPLES / "natten2d.attn"), "--grid", "16x16", "--tile", "8x8/8x4", "--json"], out=out, err=err) == 0
    rep = json.loads(out.getvalue())
    assert rep["tile_shape"] == [[8, 8], [8, 4]] and rep["tile"] == [64, 32] and rep["permutation_ms"] > 0
    assert main(["simulate", str(EXAMPLES / "natten2d.attn"), "--grid", "16x16", "--tile", "8x8x2/8x4"], out=out, err=err) == 2
    assert main(["simulate", str(EXAMPLES / "mistral.attn"), "--seq-len", "64", "--tile", "8x8/8x4"], out=out, err=err) == 2


def test_plan_string_and_errors():
    pat = attnc.loads("pattern p = sliding(64)").pattern()
    s = pat.plan(1000, block=(64, 64)).to_string()
    assert s.startswith("plan 1000x1000, tiles 64x64 (closed-form): 0 full, 31 partial of 256")
    with pytest.raises(ValueError, match="block: expected"):
        pat.plan(100, block=(0, 4))
    with pytest.raises(ValueError, match="gpu: expected one of"):
        pat.simulate(100, gpu="tpu")


FORMULAS = [
    ("pattern p(w = 64) = sliding(w)", "w/N - w*(w - 1)/(2*N**2)", [dict(w=5), dict(w=64), dict(w=300)]),
    ("pattern p(l = 3, r = 5) = band(l, r)", "(l + r + 1)/N - (l**2 + l + r**2 + r)/(2*N**2)", [dict(l=1, r=0), dict(l=40, r=7)]),
    ("pattern p = causal", "1/2 + 1/(2*N)", [{}]),
    ("pattern p(sinks = 4, recent = 64) = sliding(recent) | (sink(sinks) & causal)", None,
     [dict(sinks=2, recent=9), dict(sinks=4, recent=128)]),
    ("pattern p(window = 16, globals = 4) = band(window, window) | global(0 .. globals)", None,
     [dict(window=16, globals=4), dict(window=3, globals=2)]),
    ("pattern p(n = 20) = causal | prefix(n)", "1/2 + 1/(2*N) + n*(n - 1)/(2*N**2)", [dict(n=2), dict(n=77)]),
    ("pattern p(size = 7) = neighborhood(size)", "size/N", [dict(size=7), dict(size=30)]),
    ("pattern p(size = 8) = neighborhood(size, causal = true)", None, [dict(size=8), dict(size=3)]),
    ("pattern p(w = 10) = sliding(w) - band(2, 0)", "(w - 3)/N - (w - 3)*(w + 2)/(2*N**2)", [dict(w=10), dict(w=4)]),
    ("pattern p(w = 6) = ~sliding(w) & causal", None, [dict(w=6)]),
]


@pytest.mark.parametrize("src,density,other_params", FORMULAS)
def test_density_formulas_are_exact_where_valid(src, density, other_params):
    import sympy
    from attnc import ir
    pat = attnc.loads(src).pattern()
    f = pat.formula()
    if density is not None:
        assert str(f.density) == density
    assert sympy.simplify(f.density - f.allowed / ir.N**2) == 0
    assert pat.formula() is f  # derived once per bound pattern
    # the formula is symbolic in the parameters: evaluate it at other bindings and other N
    for params in other_params:
        other = attnc.loads(src).pattern(**params)
        env = {s: params.get(str(s), v) for s, v in f.bindings}
        checked = 0
        for N in (50, 97, 256, 1000, 2047, 4099):
            full_env = {**env, ir.N: N}
            if not all(bool(c.xreplace(full_env)) for c in f.conditions):
                continue
            exact = other.plan(N, block=(64, 64)).allowed
            assert f.allowed.xreplace(full_env) == exact, (params, N)
            assert f.flops.xreplace({**full_env, sympy.Symbol("D", integer=True, positive=True): 64, ir.H: 2}) == 4 * 64 * 2 * exact
            checked += 1
        assert checked >= 3


def test_formula_validity_is_stated_and_checked():
    f = attnc.loads("pattern p(w = 64) = sliding(w)").pattern().formula()
    assert f.condition_text() == "w >= 2, N >= w + 1"
    assert f.valid_at(65) and not f.valid_at(64)
    assert f.allowed_at(1000) == attnc.loads("pattern p(w = 64) = sliding(w)").pattern().plan(1000).allowed
    n = 10**9 + 7  # exact integer arithmetic beyond 2**53
    assert attnc.loads("pattern p = causal").pattern().formula().allowed_at(n) == n * (n + 1) // 2
    from attnc.piecewise import NoFormula
    for src, why in [("pattern p = block(8)", "block has no closed-form count"),
                     ("pattern p on grid(h, w) = neighborhood(3)", "grid layouts"),
                     ("pattern p = neighborhood(5, stride = 2)", "dilated or strided"),
                     ("pattern p = where q - k < 3", "^where has no closed-form count$"),  # named, not ''
                     ("pattern p = random(3)", "^random has no closed-form count$")]:
        with pytest.raises(NoFormula, match=why):
            attnc.loads(src).pattern().formula()


def test_show_and_simulate_print_the_formula():
    import io
    out, err = io.StringIO(), io.StringIO()
    assert main(["show", str(EXAMPLES / "mistral.attn"), "--set", "window=100", "--seq-len", "1000"], out=out, err=err) == 0
    text = out.getvalue()
    assert "density = window/N - window*(window - 1)/(2*N**2)" in text
    assert "exact when window >= 2, N >= window + 1 (M = N)" in text
    assert "at N = 1000: allowed = 95050 per head (matches the count above)" in text
    out = io.StringIO()
    assert main(["show", str(EXAMPLES / "natten2d.attn"), "--grid", "8x8"], out=out, err=err) == 0
    assert "density formula: none (grid layouts)" in out.getvalue()
    out = io.StringIO()
    assert main(["simulate", str(EXAMPLES / "mistral.attn"), "--seq-len", "8192", "--json"], out=out, err=err) == 0
    rep = json.loads(out.getvalue())
    assert rep["density_formula"] == "window/N - window*(window - 1)/(2*N**2)"
    assert rep["formula_exact_when"] == "window >= 2, N >= window + 1"


def test_sweep_api_matches_single_point_simulations():
    pat = attnc.load(EXAMPLES / "mistral.attn").pattern("mistral", window=256)
    sw = pat.sweep("N", [1024, 4096, 16384], heads=2, head_dim=64, tile=(64, 64), gpu="a100")
    for n, rep in zip(sw.values, sw.reports):
        assert rep == pat.simulate(n, heads=2, head_dim=64, tile=(64, 64), gpu="a100")
    assert [r.N for r in sw.reports] == [1024, 4096, 16384]
    sw = pat.sweep("window", [64, 512], N=4096)
    assert [r.density for r in sw.reports] == [
        attnc.load(EXAMPLES / "mistral.attn").pattern("mistral", window=w).plan(4096).density() for w in (64, 512)]
    grid = attnc.load(EXAMPLES / "natten2d.attn").pattern("natten2d").sweep("size", [3, 5], grid=(12, 12), tile=(16, 16))
    assert [r.N for r in grid.reports] == [144, 144] and grid.reports[0].density < grid.reports[1].density
    with pytest.raises(ValueError, match="expected N or a parameter of 'mistral' \\(window\\), got 'size'"):
        pat.sweep("size", [1], N=100)
    with pytest.raises(ValueError, match="expected a 1-D pattern"):
        attnc.load(EXAMPLES / "natten2d.attn").pattern("natten2d").sweep("N", [64])


def test_sweep_cli_table_json_and_png(tmp_path):
    import io
    from attnc.simulate import parse_sweep
    assert parse_sweep("N=1024:65536:x2") == ("N", tuple(1024 * 2 ** i for i in range(7)))
    assert parse_sweep("N=1000:3000:+1000") == ("N", (1000, 2000, 3000))
    assert parse_sweep("window=64,128") == ("window", (64, 128))
    png = tmp_path / "sweep.png"
    out, err = io.StringIO(), io.StringIO()
    code = main(["simulate", str(EXAMPLES / "mistral.attn"), "--set", "window=512", "--sweep", "N=1024:8192:x2",
                 "--png", str(png)], out=out, err=err)
    assert code == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[1].split() == ["N", "density", "flop_bound", "tiles", "full+partial", "tile_bound", "speedup", "fwd",
                                "speedup", "bwd"]
    assert [ln.split()[0] for ln in lines[2:6]] == ["1024", "2048", "4096", "8192"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = io.StringIO()
    assert main(["simulate", str(EXAMPLES / "mistral.attn"), "--seq-len", "4096", "--sweep", "window=64,128", "--json"],
                out=out, err=err) == 0
    data = json.loads(out.getvalue())
    assert data["over"] == "window" and [r["N"] for r in data["reports"]] == [4096, 4096]
    for argv, msg in [(["--sweep", "N=1:3"], "cannot read"), (["--sweep", "N=64,128", "--seq-len", "64"], "drop --seq-len"),
                      (["--sweep", "window=4,8"], "expected --seq-len"), (["--png", str(png), "--seq-len", "64"], "expected --sweep"),
                      ([], "expected --seq-len N or --grid")]:
        err = io.StringIO()
        assert main(["simulate", str(EXAMPLES / "mistral.attn"), *argv], out=io.StringIO(), err=err) == 2, argv
        assert msg in err.getvalue(), (argv, err.getvalue())


def test_resolve_sizes_without_M():
    """On a grid the sizes follow from `grid=`; on seq a missing M is a clear error."""
    grid_pat = attnc.loads("pattern p on grid(Y, X) = neighborhood(3)").pattern()
    assert grid_pat.resolve_sizes(None, None, None, (6, 10)) == (60, 60, 1, (6, 10))
    seq_pat = attnc.loads("pattern p = causal").pattern()
    with pytest.raises(ValueError, match="expected the query length M"):
        seq_pat.resolve_sizes(None, None, None, None)


@pytest.mark.parametrize("Hx,nq,nk", [(1, 7, 9), (3, 5, 4), (2, 1, 6), (2, 6, 1)])
def test_plan_from_tiles_equals_plan_from_flags(Hx, nq, nk):
    """The sparse constructor (a counting sort for the transposed lists) against the dense one."""
    from attnc.plans import Plan

    g = torch.Generator().manual_seed(Hx * 100 + nq * 10 + nk)
    nonempty = torch.rand(Hx, nq, nk, generator=g) < 0.5
    full = nonempty & (torch.rand(Hx, nq, nk, generator=g) < 0.5)
    h, q, k = nonempty.nonzero(as_tuple=True)
    keys = ((h * nq + q) * nk + k).numpy()
    fields = dict(M=nq, N=nk, heads=Hx, block=(1, 1), allowed=0, method="test")  # shape (nq, nk): the transposes use it
    sparse = Plan.from_tiles(keys, full[h, q, k].numpy(), Hx, nq, nk, **fields)
    dense = Plan.from_flags(full, nonempty, **fields)
    for name in ("full", "partial", "full_t", "partial_t"):
        a, b = getattr(sparse, name), getattr(dense, name)
        assert torch.equal(a.counts, b.counts) and torch.equal(a.cols.long(), b.cols.long()), name


@pytest.mark.parametrize("power", [0, 1, 2, 3, 4, 5])
def test_where_powers_equal_repeated_products(power):
    """Small constant powers in `where` are evaluated as products (reference_where._arith): the
    same mask as the product spelled out, negative bases included; the overflow check stays."""
    prod = " * ".join(["(q - k - 3)"] * power) if power else "1"
    a = attnc.loads(f"pattern p = where (q - k - 3) ** {power} <= 40").pattern().mask(60)
    b = attnc.loads(f"pattern p = where {prod} <= 40").pattern().mask(60)
    assert torch.equal(a, b) and 0 < int(a.sum()) <= 3600  # x ** 0 = 1 <= 40: every pair
    with pytest.raises(attnc.AttnError, match="integer overflow"):
        attnc.loads("pattern p = where (q * 100000000000) ** 2 < 0").pattern().mask(60)


def test_more_intervals_per_query_when_few_queries_are_planned_at_once(monkeypatch):
    """max_intervals: the closed form keeps up to INTERVAL_BUDGET / rows intervals per query (the
    plan's chunks), so strided with many keys per query stays closed-form; the plan is the one
    the tile boxes (with exact evaluation) find."""
    from attnc import analysis, interval_sets

    pat = attnc.loads("pattern p = causal & (sliding(8) | strided(16))").pattern()
    # the interval-only analysis (with periodic slots, strided is one slot per query: test_periodic.py)
    monkeypatch.setattr(analysis, "_closed_form_plan", lambda *a, **k: analysis._closed_form_plan_with(*a, periodic=False, **k))
    monkeypatch.setattr(interval_sets, "MAX_INTERVALS", 4)
    plans = {}
    # 0: nothing beyond 4 per query (tile boxes); 40 * 512: the whole 512 rows at once; 40 * 128:
    # only chunks of 128 rows fit, so the plan halves its chunk twice
    for budget in (0, 40 * 512, 40 * 128):
        monkeypatch.setattr(interval_sets, "INTERVAL_BUDGET", budget)
        plans[budget] = analysis.plan_blocks(pat.ir, 512, 512, 1, None, block=(32, 32))
    assert plans[0].method == "tile-boxes"
    assert plans[40 * 512].method == plans[40 * 128].method == "closed-form"
    for budget in (40 * 512, 40 * 128):
        assert torch.equal(plans[0].to_dense(), plans[budget].to_dense())
        for name in ("full_t", "partial_t"):
            assert torch.equal(getattr(plans[0], name).index, getattr(plans[budget], name).index)
        assert plans[budget].allowed == plans[0].allowed == int(pat.mask(512).sum())
    assert interval_sets.max_intervals(128) == 40 and interval_sets.max_intervals(10 ** 6) == 4
    monkeypatch.setattr(interval_sets, "INTERVAL_BUDGET", 8 * 32)  # not even one query tile fits: tile boxes
    assert analysis.plan_blocks(pat.ir, 512, 512, 1, None, block=(32, 32)).method == "tile-boxes"
