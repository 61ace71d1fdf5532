"""The block-sparse torch path against the dense reference (out, lse, dq, dk, dv):
every example, seeded random patterns, several tile configurations (multi-chunk,
multi-group, ragged edges), GQA, M != N, empty rows, dtypes, run-time inputs."""

import random

import pytest
import torch

import attnc
from attnc.runtime.backend import Call
from attnc.runtime.ops import make_call
from attnc.runtime.dense import ReferenceBackend, dense_attention
from attnc.runtime.schedules import partial_tile_masks, scan_plan
from attnc.runtime.tile_choice import TorchPathConfig
from attnc.runtime.torch_backend import TorchBackend
from conftest import example_names, example_pattern

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


#: small tiles, tiny chunks and groups: every code path of the schedule at test sizes
TINY = TorchPathConfig(block=(8, 16), chunk_elements=512, max_group_keys=32)
CONFIGS = [TorchPathConfig(), TINY, TorchPathConfig(block=(16, 8), chunk_elements=4096, max_group_keys=64,
                                                backward_chunk_elements=256)]  # backward in parts of chunks


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def tensors(B, Hq, Hkv, M, N, D, Dv=None, dtype=torch.float64, seed=0):
    return (rand(B, Hq, M, D, dtype=dtype, seed=seed), rand(B, Hkv, N, D, dtype=dtype, seed=seed + 1),
            rand(B, Hkv, N, Dv or D, dtype=dtype, seed=seed + 2))


def score_tables(pat, call_sizes, dtype=torch.float64, seed=7) -> dict:
    """Random tables for the pattern's score term at (M, N, H, grid) ({} without one)."""
    return {n: rand(*shape, dtype=dtype, seed=seed) for n, shape in pat.table_shapes(*call_sizes).items()}


def compare(pat, q, k, v, *, grid=None, configs=CONFIGS, atol=1e-9, inputs=None, scale=None):
    """Forward and backward of TorchBackend(config) against the reference backend (the
    score term's tables, if any, random; their gradients compared too)."""
    inputs = inputs or {}
    M, N, H, g = pat.resolve_sizes(q.shape[2], k.shape[2], q.shape[1], grid)
    call = make_call(pat, q, k, v, inputs, grid, scale, needs_grad=True, tables=score_tables(pat, (M, N, H, g)))
    ref = ReferenceBackend()
    want_out, want_lse = ref.forward(call, q, k, v)
    dout = rand(*want_out.shape, dtype=q.dtype, seed=11)
    dlse = rand(*want_lse.shape, dtype=want_lse.dtype, seed=12)
    want_grads = ref.backward(call, q, k, v, want_out, want_lse, dout, dlse)
    for cfg in configs:
        be = TorchBackend(cfg)
        assert be.can_run(call, q) is None
        out, lse = be.forward(call, q, k, v)
        torch.testing.assert_close(out, want_out, atol=atol, rtol=atol)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
        fin = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[fin], want_lse[fin].to(lse.dtype), atol=atol, rtol=atol)
        grads = be.backward(call, q, k, v, out, lse, dout, dlse)
        for name, g, w in zip("qkv", grads, want_grads):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, atol=atol * 10, rtol=atol * 10, msg=lambda m: f"d{name} ({cfg}): {m}")
        assert len(grads) == len(want_grads) == (4 if call.score is not None else 3)
        for name in call.tables:
            torch.testing.assert_close(grads[3][name], want_grads[3][name], atol=atol * 10, rtol=atol * 10)


def load(name, **params):
    return example_pattern(name, **params)


# every example of examples/ at small sizes: (name, params, M, N, heads, grid)
EXAMPLE_CASES = [
    ("mistral", dict(window=5), 37, 37, 2, None),
    ("streaming_llm", dict(sinks=2, recent=6), 45, 45, 2, None),
    ("duo", dict(retrieval={0, 2}), 30, 64, 4, None),
    ("bigbird", dict(b=8, r=2), 50, 50, 2, None),
    ("longformer", dict(window=3, globals=2), 33, 33, 2, None),
    ("prefix_lm", dict(n=5), 29, 29, 2, None),
    ("natten2d", dict(size=3), 42, None, 2, (6, 7)),
    ("dinat", dict(size=3, dilation=2), 56, None, 2, (7, 8)),
    ("gna_strided", dict(size=(3, 4, 5), stride=(2, 3, 4)), 120, None, 1, (4, 5, 6)),
    ("swin_shifted", dict(win=3), 36, None, 2, (6, 6)),
    ("halo", dict(b=4, halo=1), 64, None, 2, (8, 8)),
    ("maxvit_grid", dict(g=2), 48, None, 2, (6, 8)),
    ("cswin", dict(sw=3), 36, None, 4, (6, 6)),
    ("mmdit", dict(r=2, text=6), 26, None, 2, (4, 5)),
    ("axial_row", {}, 35, None, 1, (5, 7)),
    ("axial_col", {}, 35, None, 1, (5, 7)),
    ("crossformer_sda", dict(g=3), 63, None, 1, (7, 9)),
    ("crossformer_lda", dict(i=3), 63, None, 1, (7, 9)),
    ("gna_blocked", dict(size=(2, 3, 3)), 72, None, 1, (3, 4, 6)),
    ("hilo", dict(s=2), 42, None, 4, (6, 7)),
    ("maxvit_block", dict(p=3), 63, None, 1, (7, 9)),
    ("moa", dict(sinks=3), 50, 70, 4, None),
    ("natten1d", dict(size=5, dilation=2, causal=True), 45, 45, 1, None),
    ("natten3d", dict(size=(2, 3, 3)), 72, None, 1, (3, 4, 6)),
    ("sparse_strided", dict(l=8), 45, 45, 1, None),
    ("sparse_fixed", dict(l=16, c=4), 40, 50, 1, None),
    ("swin", dict(win=3), 63, None, 1, (7, 9)),
    ("video", dict(size=3), 72, None, 1, (3, 4, 6)),
    ("nat_rpb", dict(size=3, dilation=2), 56, None, 2, (7, 8)),
    ("swin_rpb", dict(win=3, shift=1), 36, None, 2, (6, 6)),
    ("alibi", dict(window=9), 40, 40, 4, None),
    ("gemma2_local", dict(window=7, cap=2), 37, 37, 2, None),
    ("alibi_slopes", dict(window=9), 40, 40, 3, None),
]


@pytest.mark.parametrize("name,params,M,N,H,grid", EXAMPLE_CASES, ids=[c[0] for c in EXAMPLE_CASES])
def test_every_example_matches_the_reference(name, params, M, N, H, grid):
    pat = load(name, **params)
    N = N or M
    q, k, v = tensors(1, H, max(1, H // 2), M, N, 8, Dv=5)
    compare(pat, q, k, v, grid=grid, configs=CONFIGS[:2])


def test_every_example_is_covered():
    covered = {c[0] for c in EXAMPLE_CASES} | {"packed", "nsa_like", "biformer"}  # run-time inputs: tests below
    assert example_names() == covered


def test_packed_documents_per_batch_element():
    pat = load("packed")
    doc = torch.tensor([[0] * 9 + [1] * 14 + [2] * 7, [0] * 20 + [1] * 10])
    q, k, v = tensors(2, 2, 1, 30, 30, 8)
    compare(pat, q, k, v, inputs={"doc": doc})
    # through the op, and a [N] input shared by the batch
    out = pat(q.float(), k.float(), v.float(), doc=doc[0], backend="torch")
    want = pat(q.float(), k.float(), v.float(), doc=doc[0], backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_routed_block_tables():
    pat = attnc.loads("pattern g(sel: blocks(8)) = causal & routed(sel)").pattern()
    sel = torch.tensor([[[[0, -1], [0, 1], [2, 0], [-1, -1], [4, 1]], [[0, 0], [1, -1], [1, 2], [3, 0], [2, 4]]]])
    q, k, v = tensors(1, 2, 2, 37, 37, 8)
    compare(pat, q, k, v, inputs={"sel": sel})


def test_topk_runs_as_routed_blocks_chosen_from_q_and_k():
    """nsa_like through the op: the reference is the lowered pattern's mask with the chosen tables."""
    pat = attnc.loads("pattern p(k = 2) = causal & (topk(k, block = 16) | sliding(8) | sink(4))").pattern()
    q, k, v = tensors(2, 4, 2, 70, 70, 8)
    low, tables = pat.route(q, k)
    for backend in ("torch", "reference"):
        out, lse = pat(q, k, v, return_lse=True, backend=backend)
        want, want_lse = low(q, k, v, return_lse=True, backend="reference", **tables)
        torch.testing.assert_close(out, want, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(lse, want_lse)
    compare(low, q, k, v, inputs=tables, configs=CONFIGS[:2])


def test_biformer_routed_regions():
    pat = load("biformer")
    q, k, v = tensors(1, 2, 2, 130, 130, 8)
    sel = torch.tensor([[[0, -1, -1], [1, 0, -1], [2, 2, 0]]]).expand(2, -1, -1)[None]
    compare(pat, q, k, v, inputs={"sel": sel}, configs=CONFIGS[:2])


# ----------------------------------------------------------------------------- seeded random patterns

PRIMS_1D = ["causal", "full", "band({a}, {b})", "sliding({w})", "sink({n})", "global({{{a}, {c}}})", "rows({a} .. {c})",
            "cols({{{b}}})", "prefix({n})", "block({w}, shift = {b})", "strided({s})", "random({s}, seed = {a})",
            "neighborhood({w2}, dilation = {s})", "neighborhood({w2}, causal = true)", "where (q - k) % {s} == 1",
            "dilate(2, causal)", "blockwise(4, band(1, 0))"]


def random_pattern(rng: random.Random, depth: int = 2) -> str:
    if depth == 0 or rng.random() < 0.3:
        vals = dict(a=rng.randint(0, 6), b=rng.randint(0, 5), c=rng.randint(7, 20), w=rng.randint(1, 9),
                    n=rng.randint(1, 6), s=rng.randint(2, 3), w2=rng.randint(2, 5))
        return rng.choice(PRIMS_1D).format(**vals)
    op = rng.choice(["|", "&", "-", "~"])
    if op == "~":
        return f"~({random_pattern(rng, depth - 1)})"
    return f"({random_pattern(rng, depth - 1)}) {op} ({random_pattern(rng, depth - 1)})"


@pytest.mark.parametrize("seed", range(12))
def test_seeded_random_patterns(seed):
    rng = random.Random(seed)
    body = random_pattern(rng)
    if rng.random() < 0.4:
        body = f"heads {{ 0 => {body}; _ => {random_pattern(rng, 1)} }}"
    pat = attnc.loads(f"pattern p = {body}").pattern()
    M = rng.choice([17, 25, 40])
    N = rng.choice([M, M + 7, 33])
    Hkv = rng.choice([1, 2])
    q, k, v = tensors(rng.choice([1, 2]), 2 * Hkv, Hkv, M, N, rng.choice([4, 8]), Dv=rng.choice([3, 8]), seed=seed)
    compare(pat, q, k, v, configs=CONFIGS)


# ----------------------------------------------------------------------------- shapes, dtypes, edge cases


def test_empty_rows_and_ragged_tiles():
    pat = attnc.loads("pattern p = (band(3, 2) & ~rows({4, 9, 10, 11, 12, 13, 14, 15, 16})) | cols({40})").pattern()
    q, k, v = tensors(2, 4, 2, 25, 41, 8, Dv=6)
    compare(pat, q, k, v)
    pat2 = attnc.loads("pattern p = none").pattern()
    out, lse = TorchBackend(TINY).forward(make_call(pat2, q, k, v, {}, None, None), q, k, v)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_m_greater_than_n_and_gqa_groups_of_four():
    pat = attnc.loads("pattern p = sliding(4) | sink(1)").pattern()
    q, k, v = tensors(1, 8, 2, 30, 21, 8)
    compare(pat, q, k, v, scale=0.7)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_against_float64(dtype, tol):
    pat = attnc.loads("pattern p = sliding(9) | (sink(2) & causal)").pattern()
    q, k, v = tensors(1, 2, 1, 50, 50, 16)
    want = dense_attention(q, k, v, pat.mask(50, heads=2)[None], 0.25)[0]
    ref_err = (dense_attention(q.to(dtype), k.to(dtype), v.to(dtype), pat.mask(50, heads=2)[None], 0.25)[0].double() - want).abs().max()
    for cfg in (TorchPathConfig(), TINY):
        call = make_call(pat, q.to(dtype), k.to(dtype), v.to(dtype), {}, None, 0.25)
        out, lse = TorchBackend(cfg).forward(call, q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype and lse.dtype == torch.float32
        # FlexAttention's _check_equal idea: the error may be a small multiple of the reference's own
        assert (out.double() - want).abs().max() <= max(tol, 3 * float(ref_err))


def test_backward_is_finite_with_empty_rows_through_the_op():
    pat = attnc.loads("pattern p = causal & ~rows(0 .. 3)").pattern()
    q, k, v = (t.requires_grad_() for t in tensors(1, 2, 2, 10, 10, 8))
    out, lse = pat(q, k, v, return_lse=True, backend="torch")
    assert torch.all(out[:, :, :3] == 0) and torch.all(torch.isneginf(lse[:, :, :3]))
    (out.sum() + lse[:, :, 3:].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, :, :3] == 0)


# ----------------------------------------------------------------------------- masks and plans


@pytest.mark.parametrize("src,M,N,H,grid,block", [
    ("pattern p = sliding(5) | sink(2)", 45, 45, 1, None, (16, 16)),
    ("pattern p = heads { 0 => causal; _ => band(2, 7) }", 30, 41, 3, None, (8, 16)),
    ("pattern p(s = 3) on grid(h, w) = neighborhood(s)", 42, None, 1, (6, 7), (8, 8)),
])
def test_partial_tile_masks_are_the_reference_tiles(src, M, N, H, grid, block):
    pat = attnc.loads(src).pattern()
    N = N or M
    call = Call(pattern=pat, B=1, Hq=H, Hkv=H, M=M, N=N, D=1, Dv=1, grid=grid, scale=1.0)
    plan = pat.plan(M, N, heads=H, grid=grid, block=block)
    masks = partial_tile_masks(call, plan, chunk_elements=64)  # several row chunks
    dense = pat.mask(M, N, heads=H, grid=grid)
    bm, bn = block
    Hx, nq, P = plan.partial.index.shape
    for h in range(Hx):
        for i in range(nq):
            for p in range(P):
                j = int(plan.partial.index[h, i, p])
                tile = masks[h, i, p]
                if j < 0:
                    assert not tile.any()
                    continue
                want = torch.zeros(bm, bn, dtype=torch.bool)
                part = dense[h, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                want[: part.shape[0], : part.shape[1]] = part
                assert torch.equal(tile, want), (h, i, j)


@pytest.mark.parametrize("src,H,b,heads_evaluated", [
    ("pattern p(doc: segments) = causal & same(doc)", 8, 8, 1),  # bits of every head alike: one head evaluated
    ("pattern p = heads { 0 => causal; _ => block(3) }", 3, 32, 3),  # bits per head: every head evaluated
])
def test_partial_tile_masks_evaluate_one_head_when_the_bits_do_not_read_h(monkeypatch, src, H, b, heads_evaluated):
    from attnc.runtime import schedules

    seen = []
    real = schedules._pointwise

    def spy(call, inputs, layout=None):
        fn, uses_h = real(call, inputs, layout)
        return (lambda q, k, h, batch: seen.append(h.shape[0]) or fn(q, k, h, batch)), uses_h

    monkeypatch.setattr(schedules, "_pointwise", spy)
    pat = attnc.loads(src).pattern()
    inputs = {"doc": torch.tensor([0] * 7 + [1] * 13)} if "doc" in src else {}
    call = Call(pattern=pat, B=1, Hq=H, Hkv=H, M=20, N=20, D=1, Dv=1, grid=None, scale=1.0, inputs=inputs)
    plan = scan_plan(call, inputs, (b, b)) if inputs else pat.plan(20, heads=H, block=(b, b))
    masks = partial_tile_masks(call, plan, inputs)
    assert set(seen) == {heads_evaluated}
    dense = pat.mask(20, heads=H, **inputs)
    dense = dense[0] if dense.dim() == 4 else dense
    for h in range(H):  # every head's tiles are those of the mask
        for i in range(plan.shape[0]):
            for p, j in enumerate(plan.partial.index[min(h, plan.partial.index.shape[0] - 1), i].tolist()):
                if j >= 0:
                    want = torch.zeros(b, b, dtype=torch.bool)
                    part = dense[h, i * b:(i + 1) * b, j * b:(j + 1) * b]
                    want[: part.shape[0], : part.shape[1]] = part
                    assert torch.equal(masks[min(h, masks.shape[0] - 1), i, p], want), (h, i, j)


def test_scan_plan_for_inputs_matches_the_mask():
    pat = load("packed")
    doc = torch.tensor([0] * 13 + [1] * 20)
    call = Call(pattern=pat, B=1, Hq=1, Hkv=1, M=33, N=33, D=1, Dv=1, grid=None, scale=1.0, inputs={"doc": doc})
    plan = scan_plan(call, {"doc": doc}, (8, 8))
    dense = pat.mask(33, doc=doc)[0]
    pad = torch.zeros(40, 40, dtype=torch.bool)
    pad[:33, :33] = dense
    tiles = pad.view(5, 8, 5, 8).sum((1, 3))
    state = plan.to_dense()[0]
    assert torch.equal(state > 0, tiles > 0)
    assert plan.allowed == int(dense.sum())


def test_schedules_of_run_time_inputs_are_cached_by_content(monkeypatch):
    """[Note: input schedules]: equal inputs (any tensor holding them) reuse the
    schedule, different or changed-in-place inputs build their own, the cache is
    bounded, and a result is never computed with another input's schedule."""

    from attnc.runtime import schedules

    schedules._INPUT_SCHEDULES.clear()
    builds = []
    real = schedules.build_schedule
    monkeypatch.setattr(schedules, "build_schedule", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    pat = load("packed")
    q, k, v = tensors(1, 2, 1, 30, 30, 8)

    def run(doc):
        B = doc.shape[0] if doc.dim() == 2 else 1  # an input batch is 1 or q's batch ([Note: input batches])
        call = make_call(pat, *(t.expand(B, *t.shape[1:]) for t in (q, k, v)), {"doc": doc}, None, None)
        return [s for _, s in schedules.schedules(call, TINY)]

    doc = torch.tensor([0] * 9 + [1] * 14 + [2] * 7)
    first = run(doc)
    assert run(doc.clone()) == first and len(builds) == 1  # equal values, another tensor: reused
    other = torch.tensor([0] * 20 + [1] * 10)
    assert run(other) != first and len(builds) == 2
    doc[25:] = 3  # changed in place: the same tensor object, new content
    assert run(doc) != first and len(builds) == 3
    # per batch element: a batch of [doc, other] builds only the changed element
    both = run(torch.stack([torch.tensor([0] * 9 + [1] * 14 + [2] * 7), other]))
    assert both == first + [run(other)[0]] and len(builds) == 3
    for i in range(schedules._INPUT_SCHEDULES.limit() + 4):  # bounded
        run(torch.tensor([0] * (i + 1) + [1] * (29 - i)))
    assert len(schedules._INPUT_SCHEDULES) == schedules._INPUT_SCHEDULES.limit()
    # through the op (forward + backward share the schedule): still the reference's numbers
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    for _ in range(2):
        out = pat(*got, doc=doc, backend="torch")
        want = pat(*ref, doc=doc, backend="reference")
        torch.testing.assert_close(out, want)
        out.sum().backward()
        want.sum().backward()
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.grad, b.grad)
