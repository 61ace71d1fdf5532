"""Semantic differential testing over random valid patterns (tests/patgen.py).

Per pattern: the reference mask (`pat.mask`) against the algebra of its parts
(`P | Q` is mask(P) | mask(Q), ...); the plan (`pat.plan`) against tiles
derived from the mask (full = all true, empty = all false, and the allowed
count); and the op's outputs, lse and gradients, through every backend in
BACKENDS, against a naive float64 softmax written here. FlexAttention's
`flex_attention` (eager, and compiled on CPU for a few cases) runs with a
mask_mod read from the dense reference mask.

Every failure is shrunk (fewer combinator arms, smaller sizes) and printed as
a minimal `.attn` snippet with its sizes. CI runs a bounded, seeded subset;
`ATTNC_LONG=1` runs >= 1000 patterns. Counts are printed at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os

import pytest
import torch

import attnc
import patgen
from conftest import tiles_from_mask
from counts import print_line

LONG = bool(os.environ.get("ATTNC_LONG"))
N_PATTERNS = 1200 if LONG else 80
N_FLEX_EAGER = 60 if LONG else 4
N_FLEX_COMPILED = 6 if LONG else 1
SEED_BASE = int(os.environ.get("ATTNC_SEED", "0"))  # rerun another slice: ATTNC_SEED=100000

#: Backends the op is compared through, by `backend=` name. The Triton kernels
#: (run with TRITON_INTERPRET=1 on CPU) and the flex export join this list when
#: they land; each entry is (name, dtype, tolerance).
BACKENDS: list[tuple[str, torch.dtype, float]] = [
    ("torch", torch.float64, 1e-9),
    ("torch", torch.float32, 2e-5),
    ("triton", torch.float32, 1e-4),  # generated kernels (interpreter on CPU): see SLOW_BACKENDS
]
#: backends too slow for every pattern (the Triton interpreter): run on every n-th seed
SLOW_BACKENDS = {"triton": 2 if LONG else 10}

COUNTS: collections.Counter = collections.Counter()
CHUNK = 40  # patterns per test item, so a failure names a small seed range


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    c = COUNTS
    per_backend = ", ".join(f"{b} {c['op_' + b]}" for b in sorted({b for b, _, _ in BACKENDS}))
    print_line(request.config,
               f"differential: {c['patterns']} patterns ({c['grid']} grid, {c['mixed']} mixed, {c['inputs']} with run-time "
               f"inputs, {c['heads']} with heads, {c['rows_empty']} with empty rows), {c['plans']} plans "
               f"({c['tiles']} tiles), {c['algebra']} algebra checks, {c['op']} op comparisons "
               f"({per_backend}), {c['flex_eager']} flex eager, "
               f"{c['flex_compiled']} flex compiled, {c['flex_skipped']} flex skipped")


# ----------------------------------------------------------------------------- oracles


def naive_attention(q, k, v, mask, scale):
    """Softmax over the allowed keys in float64, written without logsumexp tricks:
    out = sum_j p_j v_j with p_j = exp(s_j - max) / sum exp(s - max) over allowed j.
    mask [B or 1, H, M, N]. Rows with no allowed key: out 0, lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("bhmd,bhnd->bhmn", q, k) * scale
    s0 = torch.where(mask, s, torch.zeros_like(s))  # finite everywhere, so autograd stays finite
    row_max = torch.where(mask, s0, torch.full_like(s0, -1e300)).amax(dim=-1, keepdim=True).detach()
    nonempty = mask.any(dim=-1, keepdim=True)
    row_max = torch.where(nonempty, row_max, torch.zeros_like(row_max))
    e = torch.where(mask, torch.exp(s0 - row_max), torch.zeros_like(s0))
    total = e.sum(dim=-1, keepdim=True)
    safe = torch.where(nonempty, total, torch.ones_like(total))
    out = torch.einsum("bhmn,bhnd->bhmd", e / safe, v)
    lse = torch.where(nonempty, row_max + torch.log(safe), torch.full_like(safe, -math.inf)).squeeze(-1)
    return out, lse


def tile_list_dense(lst, rows: int, cols: int) -> torch.Tensor:
    """bool [Hx, rows, cols] from a plan's TileList (index padded with -1)."""
    Hx = lst.counts.shape[0]
    out = torch.zeros(Hx, rows, cols + 1, dtype=torch.bool)
    idx = lst.index.long()
    out.scatter_(2, torch.where(idx < 0, cols, idx), True)
    return out[..., :cols]


# ----------------------------------------------------------------------------- one case


class Mismatch(AssertionError):
    pass


def _bind(case: patgen.Case):
    return attnc.loads(case.source(), file="gen.attn").pattern()


def _mask(case, pat):
    m = pat.mask(case.M, case.N, heads=case.H, grid=case.grid, **case.tensors())
    return m if m.dim() == 4 else m[None]


def check_algebra(case, pat, mask):
    e = case.expr
    parts = []
    if e[0] == "bin":
        parts = [e[2], e[3]]
    elif e[0] == "not":
        parts = [e[1]]
    if not parts:
        return
    sub = [_mask(case, _bind(patgen.dataclasses.replace(case, expr=p))) for p in parts]
    want = {"|": lambda a, b: a | b, "&": lambda a, b: a & b, "-": lambda a, b: a & ~b}[e[1]](*sub) if e[0] == "bin" else ~sub[0]
    if not torch.equal(want.expand_as(mask), mask):
        raise Mismatch(f"mask of {e[0]} {e[1] if e[0] == 'bin' else ''} differs from the combination of its operands' masks")
    COUNTS["algebra"] += 1


def check_plan(case, pat, mask):
    bm, bn = case.block
    plan = pat.plan(case.M, case.N, heads=case.H, grid=case.grid, block=case.block)
    want = tiles_from_mask(mask[0], bm, bn)
    got = plan.to_dense().expand_as(want)
    if not torch.equal(got, want):
        h, i, j = (got != want).nonzero()[0].tolist()
        names = {0: "empty", 1: "partial", 2: "full"}
        raise Mismatch(f"plan ({plan.method}) says tile (head {h}, q-tile {i}, k-tile {j}) is {names[int(got[h, i, j])]}, "
                       f"the mask says {names[int(want[h, i, j])]}")
    if plan.allowed != int(mask[0].sum()):
        raise Mismatch(f"plan.allowed = {plan.allowed}, the mask has {int(mask[0].sum())} allowed pairs")
    nq, nk = plan.shape
    for fwd, back, what in ((plan.full, plan.full_t, "full"), (plan.partial, plan.partial_t, "partial")):
        if not torch.equal(tile_list_dense(fwd, nq, nk).transpose(1, 2), tile_list_dense(back, nk, nq)):
            raise Mismatch(f"plan.{what}_t is not the transpose of plan.{what}")
    COUNTS["plans"] += 1
    COUNTS["tiles"] += want.numel()


def _qkv(case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B = 2
    Hkv = max(d for d in range(1, case.H + 1) if case.H % d == 0 and (d == case.H or seed % 2))
    D, Dv = 1 + seed % 7, 1 + (seed // 7) % 5
    q = torch.randn(B, case.H, case.M, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, case.N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, case.N, Dv, generator=g, dtype=torch.float64)
    return q, k, v


def check_op(case, pat, mask):
    q64, k64, v64 = _qkv(case, torch.float64, case.seed)
    scale = 1.0 / math.sqrt(q64.shape[-1]) * (1 + case.seed % 3)
    ref_in = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    want_out, want_lse = naive_attention(*ref_in, mask, scale)
    g = torch.Generator().manual_seed(case.seed + 1)
    dout = torch.randn(want_out.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(want_lse.shape, generator=g, dtype=torch.float64)
    finite = torch.isfinite(want_lse)
    (want_out * dout).sum().add_(torch.where(finite, want_lse * dlse, 0.0).sum()).backward()
    want_grads = [t.grad for t in ref_in]
    for name, dtype, tol in BACKENDS:
        if case.seed % SLOW_BACKENDS.get(name, 1):
            continue
        ins = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
        out, lse = pat(*ins, return_lse=True, scale=scale, backend=name, grid=case.grid, **case.tensors())
        what = f"backend {name!r} {dtype}"
        if out.dtype != dtype or out.shape != want_out.shape or lse.shape != want_lse.shape:
            raise Mismatch(f"{what}: got out {out.dtype} {tuple(out.shape)}, lse {tuple(lse.shape)}")
        if not torch.equal(torch.isneginf(lse), ~finite):
            raise Mismatch(f"{what}: lse is -inf exactly on the empty rows? got {int(torch.isneginf(lse).sum())} -inf, "
                           f"want {int((~finite).sum())}")
        _close(out.double(), want_out, tol, f"{what}: out")
        _close(torch.where(finite, lse.double(), 0.0), torch.where(finite, want_lse, 0.0), tol, f"{what}: lse")
        loss = (out.double() * dout).sum() + torch.where(finite, lse.double() * dlse, 0.0).sum()
        grads = torch.autograd.grad(loss, ins)
        for gname, got, want in zip("qkv", grads, want_grads):
            if not torch.isfinite(got).all():
                raise Mismatch(f"{what}: d{gname} is not finite")
            _close(got.double(), want, tol * 10, f"{what}: d{gname}")
        COUNTS["op"] += 1
        COUNTS[f"op_{name}"] += 1


def _close(got, want, tol, what):
    err = (got - want).abs()
    bound = tol * (1 + want.abs())
    if bool((err > bound).any()):
        idx = tuple((err > bound).nonzero()[0].tolist())
        raise Mismatch(f"{what} differs at {idx}: got {float(got[idx]):.6g}, want {float(want[idx]):.6g}")


def check_case(case: patgen.Case, *, op: bool = True) -> None:
    pat = _bind(case)
    mask = _mask(case, pat)
    check_algebra(case, pat, mask)
    if not case.inputs:
        check_plan(case, pat, mask)
    if op:
        check_op(case, pat, mask)


def _still_fails(check):
    def fails(case):
        try:
            check(case)
        except attnc.AttnError:
            return False  # shrunk into an invalid pattern: not the same failure
        except (AssertionError, Exception):  # noqa: B014 - any other failure counts
            return True
        return False
    return fails


def report(case, exc, check=check_case) -> str:
    small = patgen.shrink(case, _still_fails(check))
    try:
        check(small)
        detail = str(exc)
    except BaseException as e:  # noqa: BLE001 - we are describing the failure
        detail = f"{type(e).__name__}: {e}"
    return f"differential failure (seed {case.seed}); minimal snippet:\n{small.snippet()}{detail}"


# ----------------------------------------------------------------------------- the sweeps


@pytest.mark.parametrize("chunk", range(-(-N_PATTERNS // CHUNK)))
def test_reference_plan_and_op_agree(chunk):
    lo = SEED_BASE + chunk * CHUNK
    for seed in range(lo, min(lo + CHUNK, SEED_BASE + N_PATTERNS)):
        case = patgen.generate(seed)
        try:
            check_case(case)
        except Exception as exc:  # noqa: BLE001 - shrink and report whatever broke
            pytest.fail(report(case, exc), pytrace=False)
        COUNTS["patterns"] += 1
        COUNTS["grid"] += bool(case.grid) and case.text_len is None
        COUNTS["mixed"] += case.text_len is not None
        COUNTS["inputs"] += bool(case.inputs)
        COUNTS["heads"] += "heads {" in case.source()
        COUNTS["rows_empty"] += bool((~_mask(case, _bind(case)).any(-1)).any())


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:  # older torch
        pytest.skip(f"FlexAttention is not available: {exc}")
    return flex_attention, create_block_mask


def _flex_inputs(case, mask, dtype=torch.float32):
    q, k, v = (t.to(dtype) for t in _qkv(case, dtype, case.seed))
    if v.shape[-1] != q.shape[-1]:  # flex needs one head dim for v as well on CPU
        v = v[..., :1].expand(*v.shape[:-1], q.shape[-1]).contiguous()
    dense = mask.expand(q.shape[0], -1, -1, -1).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx, kv_idx]

    return q, k, v, dense, mask_mod


@pytest.mark.parametrize("i", range(N_FLEX_EAGER))
def test_flex_attention_eager_agrees_with_the_reference(i):
    flex_attention, create_block_mask = _flex()
    case = patgen.generate(SEED_BASE + 10_000 + i)
    pat = _bind(case)
    mask = _mask(case, pat)
    q, k, v, dense, mask_mod = _flex_inputs(case, mask)
    try:
        block_mask = create_block_mask(mask_mod, q.shape[0], case.H, case.M, case.N, device="cpu")
        out, lse = flex_attention(q, k, v, block_mask=block_mask, return_lse=True, enable_gqa=q.shape[1] != k.shape[1])
    except (RuntimeError, NotImplementedError) as exc:
        COUNTS["flex_skipped"] += 1
        pytest.skip(f"flex_attention cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    want_out, want_lse = naive_attention(q, k, v, dense, 1 / math.sqrt(q.shape[-1]))
    try:
        _close(out.double(), want_out, 2e-4, "flex out")
        finite = torch.isfinite(want_lse)
        # FlexAttention reports empty rows as -inf like attnc
        if not torch.equal(torch.isneginf(lse), ~finite):
            raise Mismatch("flex lse: -inf rows differ from the empty rows of the mask")
        _close(torch.where(finite, lse.double(), 0.0), torch.where(finite, want_lse, 0.0), 2e-4, "flex lse")
    except Mismatch as exc:
        pytest.fail(f"flex differs on:\n{case.snippet()}{exc}", pytrace=False)
    COUNTS["flex_eager"] += 1


@pytest.mark.parametrize("i", range(N_FLEX_COMPILED))
def test_flex_attention_compiled_agrees_with_the_reference(i):
    flex_attention, create_block_mask = _flex()
    case = patgen.generate(SEED_BASE + 20_000 + i)
    pat = _bind(case)
    mask = _mask(case, pat)
    q, k, v, dense, mask_mod = _flex_inputs(case, mask)
    try:
        block_mask = create_block_mask(mask_mod, q.shape[0], case.H, case.M, case.N, device="cpu")
        compiled = torch.compile(flex_attention, dynamic=False)
        with torch.no_grad():  # torch.compile of flex on CPU is inference-only, without lse
            out = compiled(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    except Exception as exc:  # noqa: BLE001 - no compiler toolchain, unsupported shape...
        COUNTS["flex_skipped"] += 1
        pytest.skip(f"compiled flex_attention cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    want_out, _ = naive_attention(q, k, v, dense, 1 / math.sqrt(q.shape[-1]))
    try:
        _close(out.double(), want_out, 2e-4, "compiled flex out")
    except Mismatch as exc:
        pytest.fail(f"compiled flex differs on:\n{case.snippet()}{exc}", pytrace=False)
    COUNTS["flex_compiled"] += 1


# ----------------------------------------------------------------------------- the harness itself bites


def test_generator_is_seeded_and_valid():
    assert patgen.generate(123) == patgen.generate(123)
    assert patgen.generate(123).source() != patgen.generate(124).source()
    kinds = collections.Counter()
    for seed in range(300):
        src = patgen.generate(seed).source()
        for word in ("neighborhood", "block(", "strided", "sink", "global", "rows", "cols", "prefix", "random",
                     "where", "heads", "dilate", "blockwise", " @ ", "same(", "routed(", "seq(", "grid(", "~", "let"):
            kinds[word] += word in src
    missing = [w for w, n in kinds.items() if n == 0]
    assert not missing, f"the generator never produced {missing} in 300 seeds"


@pytest.fixture
def _uncounted():
    saved = COUNTS.copy()
    yield
    COUNTS.clear()
    COUNTS.update(saved)


def test_a_wrong_plan_is_caught_and_shrunk(monkeypatch, _uncounted):
    """Break the analysis on purpose: the harness must fail and print a small snippet."""
    from attnc import analysis

    real = analysis.plan_blocks

    def broken(pattern, M, N, heads, grid, *, block, inputs=None):
        plan = real(pattern, M, N, heads, grid, block=block, inputs=inputs)
        if plan.full.counts.sum() == 0:
            return plan
        # forget the full tiles: they would be skipped
        empty = analysis.TileList.from_dense(torch.zeros_like(tile_list_dense(plan.full, *plan.shape)))
        return analysis.Plan(M=plan.M, N=plan.N, heads=plan.heads, block=plan.block, full=empty, partial=plan.partial,
                             full_t=plan.full_t, partial_t=plan.partial_t, allowed=plan.allowed, method=plan.method)

    monkeypatch.setattr(analysis, "plan_blocks", broken)
    monkeypatch.setattr(attnc.program, "plan_blocks", broken)  # program imports it by name

    def has_full_tiles(c):
        return int(real(_bind(c).ir, c.M, c.N, c.H, c.grid, block=c.block).full.counts.sum()) > 0

    case = next(c for c in map(patgen.generate, range(500))
                if not c.inputs and c.expr[0] == "bin" and len(c.source()) > 60 and has_full_tiles(c))
    with pytest.raises(Mismatch) as info:
        check_case(case, op=False)
    text = report(case, info.value, check=lambda c: check_case(c, op=False))
    assert "minimal snippet:\n# M=" in text and "pattern p" in text
    small = text.split("minimal snippet:\n")[1].splitlines()[1]
    assert len(small) < len(case.source().strip()), text
    print(text)


def test_a_wrong_op_is_caught(monkeypatch, _uncounted):
    from attnc.runtime import torch_backend

    real = torch_backend.TorchBackend.forward
    monkeypatch.setattr(torch_backend.TorchBackend, "forward",
                        lambda self, call, q, k, v: real(self, dataclasses.replace(call, scale=call.scale * 1.001), q, k, v))
    case = next(c for c in map(patgen.generate, range(100)) if c.M > 2 and int(_mask(c, _bind(c)).sum()) > c.M)
    with pytest.raises(Mismatch, match="backend 'torch'"):
        check_op(case, _bind(case), _mask(case, _bind(case)))


@pytest.mark.parametrize("src", ["pattern p = ~random(0, seed = 71)", "pattern p = causal - random(0)",
                                 "pattern p = ~(random(0) & causal)"])
def test_found_by_the_long_run_random_zero_under_complement(src):
    """Seed 778 of the long run: random(0) gave the interval analysis zero slots,
    and the complement of 'no slot' came out empty instead of full."""
    case = patgen.Case(seed=778, expr=("prim", src.split(" = ", 1)[1]), axes=(), text_len=None, M=5, N=7, H=1,
                       grid=None, block=(2, 3))
    check_case(case, op=False)
