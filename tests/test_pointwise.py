"""Pointwise lowering: the torch evaluator equals the reference mask for every
example and for seeded random patterns (1-D, grids, heads, where, dilate,
blockwise, mixed layouts, run-time inputs); folding, printing and errors."""

import ast
import random

import pytest
import torch

import attnc
from attnc.codegen.expr import Builder, Const, Var, to_text
from attnc.codegen.pointwise import LoweringError, lower
from attnc.codegen.triton_text import triton_mask_source
from conftest import EXAMPLES, example_names, example_pattern


def full_mask(pat, M, N=None, H=1, grid=None, **inputs):
    """(evaluator over every (q, k, h), reference mask, lowered) for the first batch element."""
    M, N, H, grid = pat.resolve_sizes(M, N, H, grid)
    shapes = {k: tuple(v.shape) for k, v in inputs.items()}
    low = lower(pat.ir, M, N, H, grid, shapes)
    fn = low.evaluator(inputs)
    got = fn(torch.arange(M)[None, :, None], torch.arange(N)[None, None, :], torch.arange(H)[:, None, None])
    want = pat.mask(M, N, heads=H, grid=grid, **inputs)
    return got, (want[0] if want.dim() == 4 else want), low


EXAMPLE_CASES = [
    ("mistral", dict(window=17), 90, 90, 2, None),
    ("mistral", dict(window=17), 45, 90, 2, None),
    ("streaming_llm", dict(sinks=3, recent=9), 77, 77, 1, None),
    ("duo", {}, 60, 60, 12, None),
    ("duo", {}, 31, 60, 12, None),
    ("longformer", dict(window=5, globals=3), 70, 90, 1, None),
    ("prefix_lm", dict(n=13), 50, 50, 1, None),
    ("bigbird", dict(b=8, r=2), 100, 100, 2, None),
    ("bigbird", dict(b=8, r=2), 61, 100, 1, None),
    ("natten2d", {}, 224, None, 1, (16, 14)),
    ("natten2d", {}, 100, None, 1, (16, 14)),
    ("dinat", dict(size=3, dilation=3), 144, None, 1, (12, 12)),
    ("gna_strided", dict(size=(3, 4, 4), stride=(2, 2, 4)), 210, None, 1, (5, 6, 7)),
    ("swin_shifted", dict(win=4), 120, None, 1, (10, 12)),
    ("halo", dict(b=4, halo=1), 120, None, 1, (10, 12)),
    ("maxvit_grid", dict(g=3), 144, None, 1, (12, 12)),
    ("cswin", dict(sw=3), 81, None, 4, (9, 9)),
    ("mmdit", dict(r=3, text=7), 55, None, 2, (6, 8)),
    ("mmdit", dict(r=3, text=7), 30, None, 2, (6, 8)),
    ("axial_row", {}, 35, None, 1, (5, 7)),
    ("axial_col", {}, 20, None, 1, (5, 7)),
    ("crossformer_sda", dict(g=3), 63, None, 1, (7, 9)),
    ("crossformer_lda", dict(i=3), 63, None, 1, (7, 9)),
    ("gna_blocked", dict(size=(2, 3, 3)), 72, None, 1, (3, 4, 6)),
    ("hilo", dict(s=2), 42, None, 4, (6, 7)),
    ("maxvit_block", dict(p=3), 63, None, 1, (7, 9)),
    ("moa", dict(sinks=3), 70, 90, 4, None),
    ("natten1d", dict(size=5, dilation=2, causal=True), 70, 70, 1, None),
    ("natten3d", dict(size=(2, 3, 3)), 72, None, 1, (3, 4, 6)),
    ("sparse_strided", dict(l=8), 70, 70, 1, None),
    ("sparse_fixed", dict(l=16, c=4), 50, 70, 1, None),
    ("swin", dict(win=3), 63, None, 1, (7, 9)),
    ("video", dict(size=3), 72, None, 1, (3, 4, 6)),
    ("nat_rpb", dict(size=3, dilation=2), 56, None, 2, (7, 8)),
    ("swin_rpb", dict(win=3, shift=1), 36, None, 2, (6, 6)),
    ("alibi", dict(window=9), 40, 40, 4, None),
    ("gemma2_local", dict(window=7, cap=2), 37, 37, 2, None),
    ("alibi_slopes", dict(window=9), 40, 40, 3, None),
]


example = example_pattern


@pytest.mark.parametrize("name,params,M,N,H,grid", EXAMPLE_CASES)
def test_evaluator_equals_reference_for_examples(name, params, M, N, H, grid):
    pat = example(name, **params)
    got, want, _ = full_mask(pat, M, N, H, grid)
    assert torch.equal(got, want)


def test_every_example_is_covered():
    names = example_names()
    covered = {c[0] for c in EXAMPLE_CASES} | {"packed", "nsa_like", "biformer"}  # run-time inputs: own tests below
    assert names <= covered, names - covered


def test_segments_input():
    pat = attnc.load(EXAMPLES / "packed.attn").pattern("packed")
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 30, [0] * 45 + [1] * 15])
    for M in (60, 33):
        low = lower(pat.ir, M, 60, 1, None, {"doc": (2, 60)})
        fn = low.evaluator({"doc": doc})
        for b in range(2):
            got = fn(torch.arange(M)[:, None], torch.arange(60)[None, :], 0, b)
            assert torch.equal(got, pat.mask(M, 60, doc=doc)[b, 0])


@pytest.mark.parametrize("hs", [1, 3])
def test_routed_block_table(hs):
    pat = attnc.loads("pattern p(sel: blocks(8)) = causal & routed(sel) | sink(2)").pattern()
    g = torch.Generator().manual_seed(hs)
    sel = torch.randint(-1, 5, (2, hs, 5, 3), generator=g)
    low = lower(pat.ir, 37, 37, 3, None, {"sel": tuple(sel.shape)})
    fn = low.evaluator({"sel": sel})
    want = pat.mask(37, 37, heads=3, sel=sel)
    for b in range(2):
        got = fn(torch.arange(37)[None, :, None], torch.arange(37)[None, None, :], torch.arange(3)[:, None, None], b)
        assert torch.equal(got, want[b])


# ----------------------------------------------------------------------------- seeded random patterns

LEAVES_1D = ["causal", "full", "none", "sliding({a})", "band({a}, {b})", "band(-{b}, {a})", "sink({b})", "prefix({a})",
             "block({a})", "block({c}, shift = {b}, halo = {b2})", "global({{{b}, {a}}})", "rows({b} .. {a})",
             "cols({c} .. {a} step 3)", "neighborhood({n}, dilation = {d}, stride = {s})",
             "neighborhood({n}, causal = true, stride = {s})", "random(2, seed = {c})", "blockwise({c}, band(1, 0) | random(1))",
             "strided({d})", "where (q + k) % {d} == 0", "where abs(q - k) < {a} and not k in {{3, 4}}",
             "where min(q, k) // {c} == max(q, k) // {c}", "dilate({d}, causal)", "dilate({d}, band({b}, 1) | sink(1))",
             "blockwise({c}, causal - sink(1))", "where q - k >= {b} and h % 2 == 0", "where k * 2 > q - {a} or k ** 2 < {a}"]

LEAVES_GRID = ["neighborhood({n})", "neighborhood({n2}, dilation = 2)", "neighborhood(({n}, 2), stride = (1, 2))",
               "block({c})", "block(({c}, 2), shift = 1)", "strided({d}) @ w", "causal", "band(1, 2)",
               "sliding(3) @ h", "where (q.h - k.h) ** 2 + (q.w - k.w) ** 2 < {a}", "where q.w == k.w",
               "dilate(2, neighborhood(2))", "blockwise(2, band(1, 1))", "sink({b})", "global({{{b}}})"]


def random_source(rng: random.Random, leaves, depth=2) -> str:
    if depth == 0 or rng.random() < 0.4:
        vals = dict(a=rng.randint(1, 30), b=rng.randint(0, 9), b2=rng.randint(0, 2), c=rng.randint(1, 9),
                    n=rng.randint(2, 5), n2=rng.randint(2, 3), d=rng.randint(1, 3))
        vals["s"] = rng.randint(1, vals["n"])
        return rng.choice(leaves).format(**vals)
    r = rng.random()
    if r < 0.1:
        return f"~({random_source(rng, leaves, depth - 1)})"
    if r < 0.2:
        return f"heads {{ 0 => {random_source(rng, leaves, depth - 1)}; _ => {random_source(rng, leaves, depth - 1)} }}"
    op = rng.choice(["|", "&", "-"])
    return f"({random_source(rng, leaves, depth - 1)}) {op} ({random_source(rng, leaves, depth - 1)})"


@pytest.mark.parametrize("seed", range(40))
def test_evaluator_equals_reference_for_random_1d_patterns(seed):
    rng = random.Random(seed)
    src = random_source(rng, LEAVES_1D, depth=3)
    N = rng.randint(12, 90)
    M = rng.choice([N, rng.randint(1, N)])
    pat = attnc.loads(f"pattern p = {src}").pattern()
    got, want, _ = full_mask(pat, M, N, H=3)
    assert torch.equal(got, want), src


@pytest.mark.parametrize("seed", range(20))
def test_evaluator_equals_reference_for_random_grid_patterns(seed):
    rng = random.Random(1000 + seed)
    src = random_source(rng, LEAVES_GRID, depth=2)
    grid = (rng.randint(6, 9), rng.randint(6, 9))
    text = rng.choice([0, 0, 3])
    layout = f"seq({text}) + grid(h, w)" if text else "grid(h, w)"
    if text and ("dilate" in src or "blockwise" in src):
        layout = "grid(h, w)"
    pat = attnc.loads(f"pattern p on {layout} = {src}").pattern()
    N = pat.resolve_sizes(1, None, 1, grid)[1]
    M = rng.choice([N, rng.randint(1, N)])
    got, want, _ = full_mask(pat, M, N, H=2, grid=grid)
    assert torch.equal(got, want), src


# ----------------------------------------------------------------------------- folding, printing, errors


def test_sizes_fold_away_comparisons_the_ranges_decide():
    b = Builder({"q": (0, 9), "k": (0, 9)})
    assert b.lt(Var("k"), b.c(10)) == Const(True)
    assert b.ge(Var("q"), b.c(0)) == Const(True)
    assert b.mod(Var("q"), b.c(16)) == Var("q")
    assert b.floordiv(Var("q"), b.c(16)) == Const(0)
    assert b.and_(b.lt(Var("k"), b.c(3)), Const(False)) == Const(False)
    pat = attnc.loads("pattern p = causal & cols(0 .. N)").pattern()
    assert to_text(lower(pat.ir, 10).expr) == "k <= q"


def test_triton_source_parses_and_uses_floor_helpers_only_when_needed():
    pat = attnc.loads("pattern p = block(8, shift = 3) | strided(4)").pattern()
    src = triton_mask_source(lower(pat.ir, 40))
    ast.parse(src)
    assert "_floordiv(k - 3, 8)" in src and "_floormod(q - k, 4)" in src
    plain = triton_mask_source(lower(attnc.loads("pattern p = block(8)").pattern().ir, 40))
    assert "_floordiv" not in plain and "k // 8 == q // 8" in plain


def test_evaluator_works_under_vmap():
    pat = attnc.load(EXAMPLES / "bigbird.attn").pattern("bigbird", b=4, r=2)
    low = lower(pat.ir, 32, 32, 1)
    fn = low.evaluator()
    q, k = torch.arange(32), torch.arange(32)
    got = torch.vmap(torch.vmap(lambda qq, kk: fn(qq, kk, 0), in_dims=(None, 0)), in_dims=(0, None))(q, k)
    assert torch.equal(got, pat.mask(32)[0])


def test_topk_has_no_pointwise_form():
    pat = attnc.load(EXAMPLES / "nsa_like.attn").pattern("nsa_like")
    with pytest.raises(LoweringError) as info:
        lower(pat.ir, 128, sources=pat.program.sources)
    msg = str(info.value)
    assert msg.startswith("examples/nsa_like.attn:") or "nsa_like.attn:" in msg.splitlines()[0]
    assert "topk" in msg and "torch backend" in msg


def test_lowering_reports_reference_diagnostics():
    pat = attnc.load(EXAMPLES / "dinat.attn").pattern("dinat")
    with pytest.raises(attnc.AttnError, match="size \\* dilation <= length"):
        lower(pat.ir, 256, 256, 1, (16, 16), sources=pat.program.sources)
