"""Numerics of the reference op (`pat(q, k, v)`, runtime/reference.py):
empty and single-key rows, extreme scales, fp16/bf16 with large logits,
lengths 1 and tile + 1. Every result is compared with a float64 softmax
computed here, and must be free of NaN.

(The int64-offset case, B*H*N*D > 2**31, concerns the generated Triton
kernels' index arithmetic and is tested with them.)
"""

import math

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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(dtype):
    pat = attnc.loads("pattern p = sliding(3) - rows({0, 4, 5})").pattern()
    q, k, v = (rand(2, 3, 9, 8, dtype=dtype, seed=s).requires_grad_() for s in (1, 2, 3))
    out, lse = pat(q, k, v, return_lse=True)
    empty = [0, 4, 5]
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, empty]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, [1, 2, 3, 6, 7, 8]]).all()
    # gradients through out and through the finite lse entries stay finite; empty rows get none
    (out.float().square().sum() + lse[:, :, [1, 2, 3, 6, 7, 8]].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad.float()).all()
    assert torch.all(q.grad[:, :, empty] == 0)


def test_a_pattern_with_no_allowed_pair_at_all():
    pat = attnc.loads("pattern p = none").pattern()
    q, k, v = (rand(1, 2, 5, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    out, lse = pat(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    assert all(torch.all(t.grad == 0) for t in (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_key_rows_return_that_value(dtype):
    # every query sees exactly one key: out = v[key], lse = its score, no gradient to the scores
    pat = attnc.loads("pattern p = where k == (q * 3) % N").pattern()
    M = N = 7
    q, k, v = (rand(1, 2, M, 16, dtype=dtype, seed=s).requires_grad_() for s in (4, 5, 6))
    out, lse = pat(q, k, v, return_lse=True, scale=0.25)
    keys = [(i * 3) % N for i in range(M)]
    torch.testing.assert_close(out, v[:, :, keys].detach(), rtol=0, atol=0)
    want = (q.double() * k.double()[:, :, keys]).sum(-1) * 0.25
    torch.testing.assert_close(lse.double(), want.detach(), rtol=TOL[dtype], atol=TOL[dtype] * 10)
    out.float().sum().backward()
    # exactly 0 in exact arithmetic; the block-sparse path forms dS = P * (dP - delta) with rounding
    torch.testing.assert_close(q.grad, torch.zeros_like(q), rtol=0, atol=TOL[dtype])
    torch.testing.assert_close(k.grad, torch.zeros_like(k), rtol=0, atol=TOL[dtype])
    assert torch.all(v.grad[:, :, keys].float() == 1)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-8, 1.0, 1e4, 1e30, -1e4])
def test_extreme_scales(scale):
    pat = attnc.loads("pattern p = band(3, 1) | sink(2)").pattern()
    q, k, v = (rand(1, 2, 11, 8, dtype=torch.float32, seed=s) for s in (7, 8, 9))
    mask = pat.mask(11, heads=2)
    out, lse = pat(q, k, v, return_lse=True, scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    want_out, want_lse = softmax64(q, k, v, mask, scale)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-4)
    if scale == 0.0:  # uniform weights: the mean of the allowed values
        means = torch.stack([v[0, :, mask[0, i]].mean(1) for i in range(11)], dim=1)
        torch.testing.assert_close(out[0], means, rtol=1e-6, atol=1e-6)


def test_a_scale_that_overflows_is_an_error_not_nan():
    pat = attnc.loads("pattern p = causal").pattern()
    q, k, v = (rand(1, 1, 4, 8, seed=s, std=10) for s in (1, 2, 3))
    with pytest.raises(ValueError, match=r"scale \* q.k overflows torch.float32: expected .* try a smaller scale"):
        pat(q, k, v, scale=1e38)
    with pytest.raises(ValueError, match=r"k: expected finite values, got inf or NaN"):
        pat(q, torch.full_like(k, math.nan), v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_with_logits_past_the_dtype_range(dtype):
    # q.k reaches ~1e5 > float16's 65504: scores must be formed in float32
    pat = attnc.loads("pattern p = causal | global({0})").pattern()
    q = rand(1, 2, 33, 64, dtype=dtype, seed=1, std=40)
    k = q.clone()  # q.q on the diagonal is ~ 64 * 40**2 = 1e5
    v = rand(1, 2, 33, 64, dtype=dtype, seed=3)
    q.requires_grad_()
    out, lse = pat(q, k, v, return_lse=True, scale=1.0)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert float(lse.detach().abs().max()) > 65504  # the case is real
    want_out, want_lse = softmax64(q.detach(), k, v, pat.mask(33, heads=2), 1.0)
    torch.testing.assert_close(out.double(), want_out, rtol=TOL[dtype], atol=TOL[dtype] * 4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1.0)
    out.float().sum().backward()
    assert torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("M,N", [(1, 1), (1, 129), (129, 129), (65, 65), (127, 200), (129, 1000)])
def test_lengths_one_and_tile_plus_one(M, N):
    pat = attnc.loads("pattern p = sliding(64) | sink(4)").pattern()
    q, k, v = rand(1, 2, M, 8, seed=1), rand(1, 1, N, 8, seed=2), rand(1, 1, N, 8, seed=3)
    out, lse = pat(q, k, v, return_lse=True)
    mask = pat.mask(M, N, heads=2)
    want_out, want_lse = softmax64(q, k.expand(1, 2, N, 8), v.expand(1, 2, N, 8), mask, 1 / math.sqrt(8))
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    plan = pat.plan(M, N, heads=2, block=(128, 128))
    assert plan.allowed == int(mask.sum())
