"""Semantic differential testing over random valid patterns (tests/patgen.py).

Per pattern: the reference mask (`pat.mask`) against the algebra of its parts
(`P | Q` is mask(P) | mask(Q), ...); the plan (`pat.plan`) against tiles
derived from the mask (full = all true, empty = all false, and the allowed
count); the op's outputs, lse and gradients, through every backend in
BACKENDS, against a naive float64 softmax written here; and the FlexAttention
export (`pat.to_flex`: its mask_mod, its BlockMask against create_block_mask
of the dense mask, eager flex_attention with it, and compiled flex_attention
with it for a few cases).

Every failure is shrunk (fewer combinator arms, smaller sizes) and printed
with its seed as a minimal `.attn` snippet with its sizes. CI runs a bounded,
seeded subset; `ATTNC_LONG=1` runs >= 1000 patterns. Counts are printed at the
end.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os

import pytest
import torch

import attnc
from attnc.runtime.triton_backend import _interpreter_reason, _triton_missing
import patgen
from conftest import tiles_from_mask
from counts import print_line

LONG = bool(os.environ.get("ATTNC_LONG"))
N_PATTERNS = 1200 if LONG else 80
#: the FlexAttention export (pat.to_flex: mask_mod, BlockMask, eager flex_attention) on every n-th seed
FLEX_EVERY = 2 if LONG else 16
N_FLEX_COMPILED = 12 if LONG else 1  # each is a compilation (~4 s on CPU)
SEED_BASE = int(os.environ.get("ATTNC_SEED", "0"))  # rerun another slice: ATTNC_SEED=100000

#: Backends the op is compared through, by `backend=` name; each entry is
#: (name, dtype, tolerance). The cases' tensors are on the CPU, so the Triton
#: kernels run in the interpreter; where it is off (a CUDA machine runs pytest
#: without TRITON_INTERPRET=1, see tests/conftest.py) they leave the list and
#: the counts line says why, instead of every 10th seed failing.
TRITON_REASON = _triton_missing() or _interpreter_reason()
BACKENDS: list[tuple[str, torch.dtype, float]] = [
    ("torch", torch.float64, 1e-9),
    ("torch", torch.float32, 2e-5),
] + ([] if TRITON_REASON else [("triton", torch.float32, 1e-4)])  # interpreter on CPU: see SLOW_BACKENDS
#: backends too slow for every pattern (the Triton interpreter): run on every n-th seed
SLOW_BACKENDS = {"triton": 2 if LONG else 10}

#: patterns forced to read run-time inputs (seeds 40 000+): extreme ids, colliding names,
#: and the refusals (batch mismatch, out-of-range block ids) on every backend
N_INPUT_CASES = 200 if LONG else 10
INPUT_SEED = 40_000
#: in the input sweep, Triton (interpreter) and the flex export run on every n-th case
INPUT_SLOW_EVERY = 1 if LONG else 5

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
               f"({c['tiles']} tiles; {c['plans_scanned']} input plans left to the backends' scan), {c['algebra']} algebra checks, {c['op']} op comparisons "
               f"({per_backend}), {c['flex_export']} flex exports (mask_mod, BlockMask, eager), "
               f"{c['flex_compiled']} compiled flex runs, {c['flex_skipped']} flex skipped; "
               f"{c['more_queries']} with M > N, {c['input_cases']} input cases ({c['wide_ids']} with ids past int32, "
               f"{c['renamed']} with internal-looking names), {c['refusals']} uniform refusals"
               + (f"; triton left out: {TRITON_REASON}" if TRITON_REASON else ""))


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
    """The plan against the mask's tiles; with run-time inputs, the plan of each
    batch element (closed form from the inputs) against that element's mask."""
    if not case.inputs:
        _check_one_plan(case, pat.plan(case.M, case.N, heads=case.H, grid=case.grid, block=case.block), mask[0])
        return
    for b in range(mask.shape[0]):
        one = {n: t[b] for n, t in case.tensors().items()}
        try:
            plan = pat.plan(case.M, case.N, heads=case.H, grid=case.grid, block=case.block, **one)
        except ValueError as exc:  # no closed form for these inputs: the backends scan the mask instead
            if "closed form" not in str(exc):
                raise
            COUNTS["plans_scanned"] += 1
            continue
        _check_one_plan(case, plan, mask[b], f"batch element {b}: ")


def _check_one_plan(case, plan, mask, where=""):
    bm, bn = case.block
    want = tiles_from_mask(mask, bm, bn)
    got = plan.to_dense().expand_as(want)
    if not torch.equal(got, want):
        h, i, j = (got != want).nonzero()[0].tolist()
        names = {0: "empty", 1: "partial", 2: "full"}
        raise Mismatch(f"{where}plan ({plan.method}) says tile (head {h}, q-tile {i}, k-tile {j}) is "
                       f"{names[int(got[h, i, j])]}, the mask says {names[int(want[h, i, j])]}")
    if plan.allowed != int(mask.sum()):
        raise Mismatch(f"{where}plan.allowed = {plan.allowed}, the mask has {int(mask.sum())} allowed pairs")
    nq, nk = plan.shape
    for fwd, back, what in ((plan.full, plan.full_t, "full"), (plan.partial, plan.partial_t, "partial")):
        if not torch.equal(tile_list_dense(fwd, nq, nk).transpose(1, 2), tile_list_dense(back, nk, nq)):
            raise Mismatch(f"{where}plan.{what}_t is not the transpose of plan.{what}")
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


def check_op(case, pat, mask, backends=None):
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
    for name, dtype, tol in BACKENDS if backends is None else backends:
        if backends is None and case.seed % SLOW_BACKENDS.get(name, 1):
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


#: every backend the op can be forced to, for the refusals (they fail before computing)
REFUSING_BACKENDS = ("reference", "torch", "flex") + (() if TRITON_REASON else ("triton",))


def _refused(case, pat, backend, inputs, batch, want: str) -> None:
    q, k, v = (t.float() for t in _qkv(case, torch.float32, case.seed))
    q, k, v = (t[:1].expand(batch, *t.shape[1:]) for t in (q, k, v))
    try:
        with torch.no_grad():
            pat(q, k, v, backend=backend, grid=case.grid, **inputs)
    except ValueError as exc:
        if not str(exc).startswith(want) or "try" not in str(exc):
            raise Mismatch(f"backend {backend!r}: refused with {str(exc)[:200]!r}, want a message starting {want!r} and a try") from None
        COUNTS["refusals"] += 1
        return
    except Exception as exc:  # noqa: BLE001 - anything but the ValueError is the bug
        raise Mismatch(f"backend {backend!r}: {type(exc).__name__} instead of ValueError {want!r}: {exc}") from None
    raise Mismatch(f"backend {backend!r}: accepted inputs it must refuse ({want!r})")


def check_refusals(case, pat) -> None:
    """Bad run-time inputs get one ValueError, the same on every backend: a batch that
    is neither 1 nor q's batch, and block ids outside [0, ceil(N/b)) or -1."""
    good = case.tensors(batch=3)
    name = case.inputs[0][0]
    for backend in REFUSING_BACKENDS:
        _refused(case, pat, backend, good, 2,
                 f"{name}: expected batch size 1 (shared by the whole batch) or 2 (q's batch), got 3")
    for sel, kind, b in case.inputs:
        if kind != "blocks":
            continue
        bad = {n: t[:2].clone() for n, t in good.items()}
        nkb = -(-case.N // b)
        bad[sel].view(-1)[case.seed % bad[sel].numel()] = nkb + 2**31 if case.seed % 2 else -2 - 2**40
        for backend in REFUSING_BACKENDS:
            _refused(case, pat, backend, bad, 2, f"{sel}: expected key-block indices in [0, {nkb}) or -1 for padding")


def check_case(case: patgen.Case, *, op: bool = True, flex=False, backends=None, refusals: bool = False) -> None:
    """Every check of one case. `flex`: False, True (the export, eager) or
    "compiled"; `backends`: the op's backends (default BACKENDS, slow ones on
    every n-th seed); `refusals`: bad inputs are refused alike by every backend."""
    pat = _bind(case)
    mask = _mask(case, pat)
    check_algebra(case, pat, mask)
    check_plan(case, pat, mask)
    if op:
        check_op(case, pat, mask, backends)
    if flex:
        check_flex(case, pat, mask, compiled=flex == "compiled")
    if refusals and case.inputs:
        check_refusals(case, pat)


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


def report(case, exc, check=check_case, budget: int = 300) -> str:
    """The failure as the user sees it: the seed, the shrunk `.attn` snippet and what differs."""
    small = patgen.shrink(case, _still_fails(check), budget)
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
        check = functools.partial(check_case, flex=FLEX is not None and seed % FLEX_EVERY == 0)
        try:
            check(case)
        except Exception as exc:  # noqa: BLE001 - shrink and report whatever broke
            pytest.fail(report(case, exc, check=check), pytrace=False)
        COUNTS["patterns"] += 1
        COUNTS["flex_skipped"] += FLEX is None and seed % FLEX_EVERY == 0
        COUNTS["grid"] += bool(case.grid) and case.text_len is None
        COUNTS["mixed"] += case.text_len is not None
        COUNTS["inputs"] += bool(case.inputs)
        COUNTS["heads"] += "heads {" in case.source()
        COUNTS["rows_empty"] += bool((~_mask(case, _bind(case)).any(-1)).any())
        COUNTS["more_queries"] += case.M > case.N


def _count_inputs(case) -> None:
    COUNTS["input_cases"] += 1
    COUNTS["wide_ids"] += case.id_style not in ("small",)
    COUNTS["renamed"] += any(n not in ("doc", "sel") for n, _, _ in case.inputs)


@pytest.mark.parametrize("chunk", range(-(-N_INPUT_CASES // CHUNK)))
def test_runtime_inputs_with_extreme_values_and_names_agree(chunk):
    """Patterns that always read run-time inputs: segment ids past int32 (equal once
    narrowed), negative and int64-extreme ids, ids in several runs, input names equal
    to internal table names, M > N; every backend (Triton and the flex export on every
    n-th case) against the naive softmax, and the uniform refusals of bad inputs."""
    lo = INPUT_SEED + SEED_BASE + chunk * CHUNK
    for seed in range(lo, min(lo + CHUNK, INPUT_SEED + SEED_BASE + N_INPUT_CASES)):
        case = patgen.generate(seed, force_inputs=True)
        slow = (seed - INPUT_SEED) % INPUT_SLOW_EVERY == 0
        backends = [b for b in BACKENDS if b[0] not in SLOW_BACKENDS or slow]
        check = functools.partial(check_case, flex=FLEX is not None and slow, backends=backends, refusals=True)
        try:
            check(case)
        except Exception as exc:  # noqa: BLE001 - shrink and report whatever broke
            pytest.fail(report(case, exc, check=check), pytrace=False)
        COUNTS["patterns"] += 1
        COUNTS["inputs"] += 1
        COUNTS["more_queries"] += case.M > case.N
        _count_inputs(case)


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:  # older torch: the flex checks are skipped and counted
        return None
    return fa


FLEX = _flex_module()
#: BlockMask fields compared with create_block_mask's, as (num_blocks, indices) pairs
FLEX_FIELDS = (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
               ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices"))
_COMPILED: dict = {}


def _compiled_flex():
    """One compiled flex_attention for the whole module ([Note: compiled flex])."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(FLEX.flex_attention, dynamic=False)
    return _COMPILED["fn"]


@pytest.fixture(scope="module")
def _recompiles():
    """Every compiled case is a recompilation of the one compiled function: past
    dynamo's limit (8) it would silently run eager flex, which ignores the
    BlockMask's tile lists. Raise the limit, and make hitting it an error."""
    with torch._dynamo.config.patch(recompile_limit=max(8, 4 * N_FLEX_COMPILED), fail_on_recompile_limit_hit=True):
        yield


def _flex_inputs(case):
    q, k, v = (t.float() for t in _qkv(case, torch.float32, case.seed))
    if v.shape[-1] != q.shape[-1]:  # flex needs one head dim for v as well on CPU
        v = v[..., :1].expand(*v.shape[:-1], q.shape[-1]).contiguous()
    return q, k, v


def _blocks(num: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    """bool [B, H, rows, cols]: the tiles a (num_blocks, indices) pair lists (entries past num ignored)."""
    used = torch.arange(idx.shape[-1]) < num[..., None].long()
    out = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(used, idx.long(), cols), True)
    return out[..., :cols]


def check_flex(case, pat, mask, *, compiled: bool = False) -> None:
    """attnc's FlexAttention export (`pat.to_flex` at the case's tile shape), three ways.

    1. mask_mod, evaluated by FlexAttention's `create_mask` (vmap over b, h, q,
       k), equals the reference mask everywhere;
    2. the BlockMask's tile lists (kv / full_kv and their transposes q / full_q)
       equal those of `create_block_mask` run on the dense reference mask --
       FlexAttention's own semantics, independent of attnc's lowering;
    3. flex_attention with the export: eager (reads mask_mod only) compares out
       and lse; compiled (`compiled=True`; reads the tile lists and skips
       mask_mod on full tiles, so a wrong full tile shows) compares out.
    """
    fa = FLEX
    B = 2
    mask_mod, block_mask = pat.to_flex(case.M, case.N, heads=case.H, grid=case.grid, block=case.block,
                                       **case.tensors(B))
    dense = mask.expand(B, -1, -1, -1)
    what = f"flex export (pat.to_flex, block={case.block})"
    got = fa.create_mask(mask_mod, B, case.H, case.M, case.N, device="cpu")
    if not torch.equal(got, dense):
        b, h, i, j = (got != dense).nonzero()[0].tolist()
        raise Mismatch(f"{what}: mask_mod(b={b}, h={h}, q={i}, k={j}) is {bool(got[b, h, i, j])}, "
                       f"the mask says {bool(dense[b, h, i, j])}")
    want = fa.create_block_mask(lambda b, h, q, k: dense[b, h, q, k], B, case.H, case.M, case.N, device="cpu",
                                BLOCK_SIZE=case.block)
    if tuple(block_mask.BLOCK_SIZE) != tuple(want.BLOCK_SIZE) or tuple(block_mask.seq_lengths) != (case.M, case.N):
        raise Mismatch(f"{what}: BLOCK_SIZE {block_mask.BLOCK_SIZE}, seq_lengths {block_mask.seq_lengths}")
    for num, idx in FLEX_FIELDS:
        cols = (want.kv_indices if num.startswith(("kv", "full_kv")) else want.q_indices).shape[-1]
        g = _blocks(getattr(block_mask, num), getattr(block_mask, idx), cols)
        w = _blocks(getattr(want, num), getattr(want, idx), cols)
        if not torch.equal(g.expand_as(w), w):
            b, h, i, j = (g.expand_as(w) != w).nonzero()[0].tolist()
            raise Mismatch(f"{what}: BlockMask.{idx} {'lists' if g.expand_as(w)[b, h, i, j] else 'misses'} tile "
                           f"(b={b}, h={h}, {i}, {j}); create_block_mask of the reference mask "
                           f"{'does not' if g.expand_as(w)[b, h, i, j] else 'does'}")
    q, k, v = _flex_inputs(case)
    scale = 1.0 / math.sqrt(q.shape[-1])
    gqa = q.shape[1] != k.shape[1]
    want_out, want_lse = naive_attention(q, k, v, dense, scale)
    if compiled:
        with torch.no_grad():  # compiled flex on CPU is inference-only, without lse
            out = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        _close(out.double(), want_out, 2e-4, f"{what}, compiled flex_attention: out")
        COUNTS["flex_compiled"] += 1
        return
    if hasattr(fa, "AuxRequest"):
        out, aux = fa.flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                     return_aux=fa.AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = fa.flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
    _close(out.double(), want_out, 2e-4, f"{what}, eager flex_attention: out")
    finite = torch.isfinite(want_lse)
    if not torch.equal(torch.isneginf(lse), ~finite):  # FlexAttention reports empty rows as -inf like attnc
        raise Mismatch(f"{what}, eager flex_attention: lse is -inf on {int(torch.isneginf(lse).sum())} rows, "
                       f"the mask has {int((~finite).sum())} empty rows")
    _close(torch.where(finite, lse.double(), 0.0), torch.where(finite, want_lse, 0.0), 2e-4,
           f"{what}, eager flex_attention: lse")
    COUNTS["flex_export"] += 1


@pytest.mark.parametrize("i", range(N_FLEX_COMPILED))
def test_compiled_flex_attention_with_the_export_agrees(i, _recompiles):
    """[Note: compiled flex] torch.compile of flex_attention on CPU builds a C++
    kernel per shape and tile shape (~4 s each), so CI runs one case. One
    compiled function serves them all, with static shapes: torch 2.13's CPU
    flex template with dynamic=True fails to compile some shapes (C++ error
    "cur_qSplitSize6 was not declared"), which would only show as skips here."""
    if FLEX is None:
        COUNTS["flex_skipped"] += 1
        pytest.skip("FlexAttention is not available in this torch")
    case = patgen.generate(SEED_BASE + 20_000 + i)
    check = functools.partial(check_case, op=False, flex="compiled")
    try:
        check(case)
    except Exception as exc:  # noqa: BLE001 - shrink and report whatever broke, unless torch cannot compile here
        if type(exc).__name__ in ("InductorError", "CppCompileError", "BackendCompilerFailed"):  # no C++ toolchain
            COUNTS["flex_skipped"] += 1
            pytest.skip(f"compiled flex_attention cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        pytest.fail(report(case, exc, check=check, budget=40), pytrace=False)


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
    forced = [patgen.generate(INPUT_SEED + s, force_inputs=True) for s in range(200)]
    assert all(c.inputs for c in forced)
    assert {c.id_style for c in forced} == set(patgen.ID_STYLES)
    names = {n for c in forced for n, _, _ in c.inputs}
    assert {"random0", "in_doc", "in_sel", "topk_sel0", "key_padding"} <= names, names
    assert sum(patgen.generate(s).M > patgen.generate(s).N for s in range(300)) > 10


@pytest.fixture
def _uncounted():
    saved = COUNTS.copy()
    yield
    COUNTS.clear()
    COUNTS.update(saved)


def test_a_wrong_plan_is_caught_and_shrunk(monkeypatch, _uncounted):
    """Break the analysis on purpose: the harness must fail and print a small snippet."""
    from attnc import analysis, plans

    real = analysis.plan_blocks

    def broken(pattern, M, N, heads, grid, *, block, inputs=None, counted=False):
        plan = real(pattern, M, N, heads, grid, block=block, inputs=inputs)
        if plan.full.counts.sum() == 0:
            return plan
        # forget the full tiles: they would be skipped
        empty = plans.TileList.from_dense(torch.zeros_like(tile_list_dense(plan.full, *plan.shape)))
        out = plans.Plan(M=plan.M, N=plan.N, heads=plan.heads, block=plan.block, full=empty, partial=plan.partial,
                         allowed=plan.allowed, method=plan.method)
        out.__dict__.update(full_t=plan.full_t, partial_t=plan.partial_t)  # the backward lists stay whole
        return out

    monkeypatch.setattr(analysis, "plan_blocks", broken)

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


def _drop_a_tile(plan):
    """`plan` without the last tile of its first non-empty query-tile row (a
    partial one when the row has any): the bug of a backend that skips a tile."""
    from attnc.plans import TileList

    for lst, name in ((plan.partial, "partial"), (plan.full, "full")):
        rows = (lst.counts[0] > 0).nonzero()
        if len(rows):
            i = int(rows[0])
            counts, index = lst.counts.clone(), lst.index.clone()
            counts[:, i] -= 1
            index[:, i, counts[0, i]] = -1
            return dataclasses.replace(plan, **{name: TileList.from_padded(counts, index)})
    return plan


def _break(backend: str, monkeypatch) -> None:
    """Make `backend` drop a tile of every plan it runs, through its own tables."""

    from attnc.runtime import flex, ops, schedules

    if backend == "torch":
        real = schedules.build_schedule
        monkeypatch.setattr(schedules, "build_schedule", lambda call, plan, masks, config=schedules.CONFIG:
                            real(call, _drop_a_tile(plan), masks, config))
        schedules._SCHEDULES.clear()  # no schedule cached before the break
        schedules._INPUT_SCHEDULES.clear()
    elif backend == "triton":
        from attnc.runtime import triton_backend

        real_lists = triton_backend.TileLists.from_plan
        monkeypatch.setattr(triton_backend.TileLists, "from_plan",
                            staticmethod(lambda plan, device: real_lists(_drop_a_tile(plan), device)))
        triton_backend._KERNEL_SETS.clear()  # no kernel set memoised before the break
    else:
        real_states = flex._tile_states

        def states(plan):
            state = real_states(plan).clone()
            state.view(-1)[int((state.view(-1) > 0).nonzero()[0])] = 0  # the first non-empty tile: empty
            return state

        monkeypatch.setattr(flex, "_tile_states", states)


BROKEN = {  # backend -> (the check that runs it, what its failure message names, shrink budget)
    "torch": (functools.partial(check_case, backends=[("torch", torch.float32, 2e-5)]), "backend 'torch'", 300),
    "triton": (functools.partial(check_case, backends=[("triton", torch.float32, 1e-4)]), "backend 'triton'", 25),
    "flex": (functools.partial(check_case, op=False, flex=True), "flex export", 300),
}


@pytest.mark.parametrize("backend", sorted(BROKEN))
def test_a_backend_that_drops_a_tile_is_reported_as_a_minimal_snippet(backend, monkeypatch, _uncounted):
    """Every backend's failure reaches the user the same way: the seed, a shrunk
    `.attn` snippet with its sizes, and which backend differs where."""
    if backend == "flex" and FLEX is None:
        pytest.skip("FlexAttention is not available in this torch")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach the Triton kernels only with TRITON_INTERPRET=1")
    check, names, budget = BROKEN[backend]
    _break(backend, monkeypatch)
    failing = None
    for seed in range(200):
        case = patgen.generate(seed)
        if case.M < 2 or case.N > 40 or (backend == "triton" and case.inputs):
            continue
        try:
            check(case)
        except Mismatch as exc:
            failing = case, exc
            break
    assert failing is not None, f"a {backend} backend that drops a tile passed 200 cases"
    case, exc = failing
    text = report(case, exc, check=check, budget=budget)
    head, snippet = text.split("\n", 1)
    assert head == f"differential failure (seed {case.seed}); minimal snippet:", text
    assert snippet.startswith("# M=") and f"seed={case.seed}" in snippet.splitlines()[0], text
    source = snippet.splitlines()[1]
    assert source.startswith("pattern p") and len(source) <= len(case.source().strip()), text
    assert snippet.splitlines()[:2] != case.snippet().splitlines()[:2], "the case was not shrunk"
    assert f"\nMismatch: {names}" in text, text  # what differs, named by backend
    attnc.loads(source, file="snippet.attn").pattern()  # the snippet is a valid pattern to paste
    print(text)
