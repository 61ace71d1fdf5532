"""Numerics of the op through every backend: empty and single-key rows, extreme
scales, fp16/bf16 with large logits, lengths 1 and tile + 1. Every result is
compared with a float64 softmax computed here, and must be free of NaN.

Backends: "reference" (dense), "torch" (block-sparse, the CPU default) and
"triton" (the generated kernels; Triton's interpreter on CPU: float32 and
float16 only, tiny sizes) run forward and backward; "flex" (compiled
FlexAttention with attnc's BlockMask; forward only on CPU, no lse) runs the
checklist in a few calls, because each call shape is a compilation.

(The int64-offset case, B*H*N*D > 2**31, concerns the generated Triton
kernels' index arithmetic and is tested with them.)
"""

import math
import os

import pytest
import torch

import attnc


def rand(*shape, dtype=torch.float32, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)


def softmax64(q, k, v, mask, scale):
    """float64 softmax over the allowed keys; empty rows give 0 and -inf."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(mask, torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), 0.0)
    return p @ v.double(), lse


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BACKENDS = ["reference", "torch", "triton"]
#: what the Triton kernels cannot compute on the CPU (the interpreter), with the op's reason
TRITON_CPU_DTYPES = (torch.float32, torch.float16)


def pairs(dtypes) -> list:
    """(backend, dtype) pairs each backend computes on the CPU: the Triton interpreter has no
    float64 / bfloat16 (its refusals are tested in test_runtime.py), so those pairs are not
    generated at all rather than skipped."""
    return [pytest.param(b, d, id=f"{b}-{d}") for b in BACKENDS for d in dtypes
            if b != "triton" or d in TRITON_CPU_DTYPES]


def needs(backend: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip the combinations a backend declines by design (their refusal is tested in test_runtime.py)."""
    if backend != "triton":
        return
    if dtype not in TRITON_CPU_DTYPES:
        pytest.skip(f"the Triton interpreter computes float32 / float16, not {dtype}")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach the Triton kernels only with TRITON_INTERPRET=1")


def tol(backend: str, dtype: torch.dtype) -> float:
    """The kernels accumulate in float32 (tiles of fp16 products): a little looser than the torch path."""
    return TOL[dtype] * (4 if backend == "triton" and dtype != torch.float64 else 1)


@pytest.mark.parametrize("backend,dtype", pairs(DTYPES))
def test_fully_masked_rows(backend, dtype):
    needs(backend, dtype)
    pat = attnc.loads("pattern p = sliding(3) - rows({0, 4, 5})").pattern()
    q, k, v = (rand(2, 3, 9, 8, dtype=dtype, seed=s).requires_grad_() for s in (1, 2, 3))
    out, lse = pat(q, k, v, return_lse=True, backend=backend)
    empty = [0, 4, 5]
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, empty]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, [1, 2, 3, 6, 7, 8]]).all()
    want_out, _ = softmax64(q.detach(), k.detach(), v.detach(), pat.mask(9, heads=3), 1 / math.sqrt(8))
    t = tol(backend, dtype)
    torch.testing.assert_close(out.double(), want_out, rtol=t, atol=t * 4)
    # gradients through out and through the finite lse entries stay finite; empty rows get none
    (out.float().square().sum() + lse[:, :, [1, 2, 3, 6, 7, 8]].sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad.float()).all()
    assert torch.all(q.grad[:, :, empty] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pattern_with_no_allowed_pair_at_all(backend):
    needs(backend)
    pat = attnc.loads("pattern p = none").pattern()
    q, k, v = (rand(1, 2, 5, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    out, lse = pat(q, k, v, return_lse=True, backend=backend)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    assert all(torch.all(t.grad == 0) for t in (q, k, v))


@pytest.mark.parametrize("backend,dtype", pairs(DTYPES))
def test_single_key_rows_return_that_value(backend, dtype):
    needs(backend, dtype)
    # every query sees exactly one key: out = v[key], lse = its score, no gradient to the scores
    pat = attnc.loads("pattern p = where k == (q * 3) % N").pattern()
    M = N = 7
    q, k, v = (rand(1, 2, M, 16, dtype=dtype, seed=s).requires_grad_() for s in (4, 5, 6))
    out, lse = pat(q, k, v, return_lse=True, scale=0.25, backend=backend)
    keys = [(i * 3) % N for i in range(M)]
    torch.testing.assert_close(out, v[:, :, keys].detach(), rtol=0, atol=0)
    want = (q.double() * k.double()[:, :, keys]).sum(-1) * 0.25
    t = tol(backend, dtype)
    torch.testing.assert_close(lse.double(), want.detach(), rtol=t, atol=t * 10)
    out.float().sum().backward()
    # exactly 0 in exact arithmetic; the block-sparse paths form dS = P * (dP - delta) with rounding
    torch.testing.assert_close(q.grad, torch.zeros_like(q), rtol=0, atol=t)
    torch.testing.assert_close(k.grad, torch.zeros_like(k), rtol=0, atol=t)
    # dV[key] = p * 1 with p = exp(s - lse) = 1 in exact arithmetic; the kernels form s and
    # lse in the log2 domain, so p is off by the rounding of s: a few ulps of |s|, not more
    s = want.detach().abs().amax().item()
    bound = 8 * torch.finfo(dtype).eps * (1 + s)
    torch.testing.assert_close(v.grad[:, :, keys].float(), torch.ones_like(v.grad[:, :, keys].float()),
                               rtol=0, atol=bound)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-8, 1.0, 1e4, 1e30, -1e4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_scales(backend, scale):
    needs(backend)
    pat = attnc.loads("pattern p = band(3, 1) | sink(2)").pattern()
    q, k, v = (rand(1, 2, 11, 8, dtype=torch.float32, seed=s) for s in (7, 8, 9))
    mask = pat.mask(11, heads=2)
    out, lse = pat(q, k, v, return_lse=True, scale=scale, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    want_out, want_lse = softmax64(q, k, v, mask, scale)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-4)
    if scale == 0.0:  # uniform weights: the mean of the allowed values
        means = torch.stack([v[0, :, mask[0, i]].mean(1) for i in range(11)], dim=1)
        torch.testing.assert_close(out[0], means, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scale_that_overflows_is_an_error_not_nan(backend):
    needs(backend)
    pat = attnc.loads("pattern p = causal").pattern()
    q, k, v = (rand(1, 1, 4, 8, seed=s, std=10) for s in (1, 2, 3))
    with pytest.raises(ValueError, match=r"scale \* q.k overflows torch.float32: expected .* try a smaller scale"):
        pat(q, k, v, scale=1e38, backend=backend)
    with pytest.raises(ValueError, match=r"k: expected finite values, got inf or NaN"):
        pat(q, torch.full_like(k, math.nan), v, backend=backend)


@pytest.mark.parametrize("backend,dtype", pairs([torch.float16, torch.bfloat16]))
def test_low_precision_with_logits_past_the_dtype_range(backend, dtype):
    needs(backend, dtype)
    # q.k reaches ~1e5 > float16's 65504: scores must be formed in float32
    pat = attnc.loads("pattern p = causal | global({0})").pattern()
    q = rand(1, 2, 33, 64, dtype=dtype, seed=1, std=40)
    k = q.clone()  # q.q on the diagonal is ~ 64 * 40**2 = 1e5
    v = rand(1, 2, 33, 64, dtype=dtype, seed=3)
    q.requires_grad_()
    out, lse = pat(q, k, v, return_lse=True, scale=1.0, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert float(lse.detach().abs().max()) > 65504  # the case is real
    want_out, want_lse = softmax64(q.detach(), k, v, pat.mask(33, heads=2), 1.0)
    t = tol(backend, dtype)
    torch.testing.assert_close(out.double(), want_out, rtol=t, atol=t * 4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1.0)
    out.float().sum().backward()
    assert torch.isfinite(q.grad.float()).all()


#: 64 is the tile of the torch path and the kernels: 65 and 129 are a tile + 1
LENGTHS = [(1, 1), (1, 129), (129, 129), (65, 65), (127, 200), (129, 1000)]


@pytest.mark.parametrize("backend,M,N", [(b, M, N) for b in BACKENDS for M, N in LENGTHS
                                         # interpreter sizes stay small: 65 and 129 already cross the 64-tile
                                         if b != "triton" or N <= 200])
def test_lengths_one_and_tile_plus_one(backend, M, N):
    needs(backend)
    pat = attnc.loads("pattern p = sliding(64) | sink(4)").pattern()
    q, k, v = rand(1, 2, M, 8, seed=1), rand(1, 1, N, 8, seed=2), rand(1, 1, N, 8, seed=3)
    for x in (q, k, v):
        x.requires_grad_()
    out, lse = pat(q, k, v, return_lse=True, backend=backend)
    mask = pat.mask(M, N, heads=2)
    ke, ve = k.detach().expand(1, 2, N, 8), v.detach().expand(1, 2, N, 8)
    want_out, want_lse = softmax64(q.detach(), ke, ve, mask, 1 / math.sqrt(8))
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    # gradients against float64 autograd of the same softmax
    dout = rand(1, 2, M, 8, seed=4)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want, _ = softmax64(ref[0], ref[1].expand(1, 2, N, 8), ref[2].expand(1, 2, N, 8), mask, 1 / math.sqrt(8))
    for got, exp in zip(grads, torch.autograd.grad((want * dout.double()).sum(), ref)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5)
    plan = pat.plan(M, N, heads=2, block=(128, 128))
    assert plan.allowed == int(mask.sum())


# ----------------------------------------------------------------------------- flex (forward, compiled)


def flex(pat, q, k, v, **kw):
    """pat(..., backend="flex"), skipped only where torch cannot compile FlexAttention here."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    try:
        return pat(q, k, v, backend="flex", **kw)
    except Exception as exc:  # pragma: no cover - depends on the local C++ toolchain
        if type(exc).__name__ not in ("InductorError", "CppCompileError", "BackendCompilerFailed"):
            raise
        pytest.skip(f"compiled FlexAttention unavailable here: {type(exc).__name__}")


#: rows 0-39 see exactly one key (v of key (3q) % N), rows 40-99 a window and
#: the sinks, rows 100-128 nothing; 129 is flex's 128-tile + 1
CHECKLIST = "pattern p = ((where k == (q * 3) % N) & rows(0 .. 40)) | ((sliding(64) | sink(4)) & rows(40 .. 100))"


@pytest.mark.parametrize("dtype,scale,std", [(torch.float32, 1e-30, 1.0), (torch.float16, 1.0, 40.0),
                                             (torch.bfloat16, 1.0, 40.0)], ids=str)
def test_flex_forward_checklist(dtype, scale, std):
    """Empty rows (0), single-key rows (that key's v), tile + 1 rows, and
    logits past the dtype's range (fp16 / bf16: q.k ~ 1e5 > 65504) or
    vanishing (float32, scale 1e-30: uniform weights), in one call per dtype:
    every call is a compilation on CPU (~4 s)."""
    pat = attnc.loads(CHECKLIST).pattern()
    M = N = 129
    q = rand(1, 2, M, 64, dtype=dtype, seed=1, std=std)
    k = q.clone() if std > 1 else rand(1, 2, N, 64, dtype=dtype, seed=2)  # q.q on the diagonal ~ 64 * 40**2 = 1e5
    v = rand(1, 2, N, 64, dtype=dtype, seed=3)
    out = flex(pat, q, k, v, scale=scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    mask = pat.mask(M, heads=2)
    keys_per_row = mask[0].sum(-1)  # the case is real: 1 key, several keys, none
    assert (keys_per_row[:40] == 1).all() and (keys_per_row[40:100] > 1).all() and (keys_per_row[100:] == 0).all()
    assert torch.all(out[:, :, 100:] == 0)  # empty rows
    keys = [(i * 3) % N for i in range(40)]
    torch.testing.assert_close(out[:, :, :40], v[:, :, keys], rtol=TOL[dtype], atol=TOL[dtype])
    want_out, want_lse = softmax64(q, k, v, mask, scale)
    if std > 1:
        assert float(want_lse[torch.isfinite(want_lse)].abs().max()) > 65504  # the case is real
    torch.testing.assert_close(out.double(), want_out, rtol=TOL[dtype], atol=TOL[dtype] * 4)


def test_flex_forward_length_one():
    pat = attnc.loads("pattern p = causal").pattern()
    q, k, v = (rand(1, 2, 1, 8, seed=s) for s in (1, 2, 3))
    torch.testing.assert_close(flex(pat, q, k, v), v)
