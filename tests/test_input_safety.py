"""Issue 17, silently wrong results: run-time inputs, `random` rows and names.

Each test runs the op through every backend that computes on the CPU here
(`reference`, the block-sparse `torch` path, the generated `triton` kernels in
Triton's interpreter) and the FlexAttention export's `mask_mod`, and compares
them with `pat.mask` -- the reference semantics -- through a naive softmax
written here. Before the fixes each case below gave a wrong number on at least
one backend with no error (or a raw IndexError / RuntimeError on another).
"""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.codegen.pointwise import lower
from attnc.codegen.triton_text import triton_mask_source

BACKENDS = ("reference", "torch", "triton")


def naive(q, k, v, mask, scale):
    """float64 softmax over the allowed keys; rows without one give 0."""
    s = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double()) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhmn,bhnd->bhmd", p, v.double())


def qkv(B, H, M, N, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g) for L in (M, N, N))


def full_mask(pat, B, H, M, N, **inputs) -> torch.Tensor:
    m = pat.mask(M, N, heads=H, **inputs)
    return (m if m.dim() == 4 else m[None]).expand(B, -1, -1, -1)


def flex_mask(pat, B, H, M, N, block=(4, 4), **inputs) -> torch.Tensor:
    """The exported mask_mod at every (b, h, q, k), by broadcasting (it is a pure lookup)."""
    mask_mod, _ = pat.to_flex(M, N, heads=H, block=block, **inputs)
    b, h, q, k = (torch.arange(n).view([-1 if i == j else 1 for j in range(4)]) for i, n in enumerate((B, H, M, N)))
    return mask_mod(b, h, q, k).expand(B, H, M, N)


def check_every_backend(pat, B, H, M, N, **inputs):
    q, k, v = qkv(B, H, M, N)
    mask = full_mask(pat, B, H, M, N, **inputs)
    want = naive(q, k, v, mask, 0.5)
    for backend in BACKENDS:
        got = pat(q, k, v, scale=0.5, backend=backend, **inputs)
        err = (got.double() - want).abs().max().item()
        assert err < 1e-4, f"backend {backend!r} differs from pat.mask by {err}"
    assert torch.equal(flex_mask(pat, B, H, M, N, **inputs), mask), "the FlexAttention export's mask_mod differs from pat.mask"


# ----------------------------------------------------------------------------- segment ids past int32


PACKED = "pattern p(doc: segments) = causal & same(doc)"
WIDE_IDS = [
    [0, 0, 0, 0, 2**32, 2**32, 2**32, 2**32],                      # equal after a cast to int32
    [-1, -1, 2**31 - 1, 2**31 - 1, 2**31, 2**31, -2**31, -2**31 - 1],  # around both int32 edges
    [2**63 - 1] * 3 + [-2**63] * 3 + [7, 7],                        # the int64 extremes
    [5, 5 + 2**40, 5, 5 + 2**40, 5, 5, -5, -5],                     # one id in several runs
]


@pytest.mark.parametrize("ids", WIDE_IDS, ids=["2^32", "int32-edges", "int64-extremes", "interleaved"])
def test_segment_ids_beyond_int32_stay_exact_on_every_backend(ids):
    pat = attnc.loads(PACKED).pattern()
    doc = torch.tensor([ids, list(reversed(ids))])
    check_every_backend(pat, 2, 2, 8, 8, doc=doc)


def test_dense_ranks_keep_equality_per_row():
    from attnc.codegen.lowered import dense_ranks

    ids = torch.tensor([[2**40, 3, 2**40, -7], [1, 1, 1, 1]])
    r = dense_ranks(ids)
    assert r.tolist() == [[2, 1, 2, 0], [0, 0, 0, 0]]
    assert torch.equal(r[:, :, None] == r[:, None, :], ids[:, :, None] == ids[:, None, :])


# ----------------------------------------------------------------------------- random(r) with M > N


RANDOM_PATTERNS = [
    "random(2)",
    "random(3, seed = 5) | causal",
    "blockwise(2, random(1))",
    "dilate(2, random(1, seed = 3))",
    "heads { 0 => random(1); _ => random(2, seed = 9) & ~causal }",
]


@pytest.mark.parametrize("body", RANDOM_PATTERNS)
@pytest.mark.parametrize("M, N", [(13, 6), (5, 9)])
def test_random_rows_agree_with_the_mask_when_queries_and_keys_differ(body, M, N):
    pat = attnc.loads(f"pattern p = {body}").pattern()
    if M > N and body == "random(2)":  # the rows before the first key (qa < 0) are drawn too
        assert bool(pat.mask(M, N)[0, : M - N].any(-1).all())
    check_every_backend(pat, 1, 2, M, N)


# ----------------------------------------------------------------------------- user names vs internal tables


COLLIDING = [
    "pattern p(random0: segments) = (random(2) & same(random0)) | sink(1)",
    "pattern p(random0: blocks(4)) = random(3, seed = 1) | routed(random0)",
    "pattern p(in_random0: segments, random1: segments) = random(1) | (same(in_random0) & same(random1) & causal) | random(2, seed = 4)",
]


def _inputs_for(pat, B, H, M, N):
    g = torch.Generator().manual_seed(1)
    out = {}
    for spec in pat.ir.inputs:
        if spec.kind == "segments":
            out[spec.name] = torch.randint(0, 2, (B, N), generator=g)
        else:
            b = 4
            out[spec.name] = torch.randint(-1, -(-N // b), (B, H, -(-M // b), 2), generator=g)
    return out


@pytest.mark.parametrize("src", COLLIDING)
def test_an_input_named_like_an_internal_table_changes_nothing(src):
    pat = attnc.loads(src).pattern()
    B, H, M, N = 2, 2, 12, 12
    check_every_backend(pat, B, H, M, N, **_inputs_for(pat, B, H, M, N))
    low = lower(pat.ir, M, N, H, input_shapes={n: tuple(t.shape[1:]) for n, t in _inputs_for(pat, B, H, M, N).items()})
    names = [t.name for t in low.tables]
    assert len(names) == len(set(names))
    assert all(t.name == f"in_{t.source}" for t in low.tables if t.source is not None)
    assert all(not t.name.startswith("in_") for t in low.tables if t.source is None)
    src_text = triton_mask_source(low)
    assert all(f"tbl_{n}" in src_text for n in names)


# ----------------------------------------------------------------------------- batch broadcasting


BATCHED = "pattern p(doc: segments, sel: blocks(4)) = (causal & same(doc)) | routed(sel)"


def _batched_inputs(B_doc, B_sel, H=2, M=8, N=8):
    g = torch.Generator().manual_seed(3)
    return {"doc": torch.randint(0, 3, (B_doc, N), generator=g).sort(-1).values,
            "sel": torch.randint(-1, 2, (B_sel, H, M // 4, 2), generator=g)}


@pytest.mark.parametrize("B_doc, B_sel", [(1, 1), (3, 1), (1, 3), (3, 3)])
def test_inputs_of_batch_one_or_b_broadcast_alike_on_every_backend(B_doc, B_sel):
    pat = attnc.loads(BATCHED).pattern()
    check_every_backend(pat, 3, 2, 8, 8, **_batched_inputs(B_doc, B_sel))


@pytest.mark.parametrize("B_doc, B_sel", [(2, 1), (1, 2), (4, 3), (3, 2)])
@pytest.mark.parametrize("backend", ("auto", "reference", "torch", "triton", "flex"))
def test_a_batch_neither_one_nor_b_is_the_same_value_error_on_every_backend(B_doc, B_sel, backend):
    pat = attnc.loads(BATCHED).pattern()
    q, k, v = qkv(3, 2, 8, 8)
    with pytest.raises(ValueError) as info:
        with torch.no_grad():
            pat(q, k, v, backend=backend, **_batched_inputs(B_doc, B_sel))
    bad = "doc" if B_doc not in (1, 3) else "sel"
    got = B_doc if bad == "doc" else B_sel
    assert str(info.value).startswith(f"{bad}: expected batch size 1 (shared by the whole batch) or 3 (q's batch), got {got}")
    assert "try" in str(info.value)


def test_inputs_without_q_agree_among_themselves():
    pat = attnc.loads(BATCHED).pattern()
    assert pat.mask(8, heads=2, **_batched_inputs(1, 3)).shape == (3, 2, 8, 8)
    with pytest.raises(ValueError, match=r"sel: expected batch size 1 \(shared by the whole batch\) or 3 \(the batch of 'doc'\), got 2"):
        pat.mask(8, heads=2, **_batched_inputs(3, 2))
    with pytest.raises(ValueError, match="the batch of 'doc'"):
        pat.to_flex(8, heads=2, block=(4, 4), **_batched_inputs(3, 2))


@pytest.mark.parametrize("bad", [2, 2**31, 2**40, -2, -2**40])
@pytest.mark.parametrize("backend", ("reference", "torch", "triton", "flex"))
def test_block_ids_out_of_range_are_refused_before_any_narrowing(bad, backend):
    pat = attnc.loads(BATCHED).pattern()
    q, k, v = qkv(3, 2, 8, 8)
    inputs = _batched_inputs(3, 3)
    inputs["sel"][1, 0, 1, 0] = bad  # 2 key blocks of 4: only 0, 1 and -1 are valid
    with pytest.raises(ValueError, match=r"sel: expected key-block indices in \[0, 2\) or -1 for padding, got .*; try"):
        with torch.no_grad():
            pat(q, k, v, backend=backend, **inputs)
