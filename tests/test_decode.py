"""Decoding (`pat.decode`), KV retention (`pat.kv_retention`) and the evicting cache
(`attnc.nn.KVCache`): decode rows equal the op's rows (contiguous, paged and per-head caches,
ragged lengths, GQA, per-head patterns, score terms, patterns without interval sets); no
evicted key is ever allowed for a later query; decoding with eviction equals decoding without
it, token for token, while the memory of streaming heads stays bounded."""

import pytest
import torch

import attnc
from attnc.errors import AttnError
from conftest import EXAMPLES, example_pattern
from patgen import generate


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def op_rows(pat, q, k, v, lengths, **tables):
    """The op's last m rows per sequence: (out, lse) [B, Hq, m, *] from the reference backend."""
    B, Hq, m, D = q.shape
    outs, lses = [], []
    for b, L in enumerate(lengths):
        qq = torch.zeros(1, Hq, L, D, dtype=q.dtype)
        qq[0, :, L - m:] = q[b]
        o, l = pat(qq, k[b:b + 1, :, :L], v[b:b + 1, :, :L], backend="reference", return_lse=True, **tables)
        outs.append(o[0, :, L - m:])
        lses.append(l[0, :, L - m:])
    return torch.stack(outs), torch.stack(lses)


def paged(k, v, page):
    """The same cache as HND pages in a shuffled pool: (k_pages, v_pages, block_table)."""
    B, Hkv, S, D = k.shape
    n = S // page
    table = torch.randperm(B * n, generator=torch.Generator().manual_seed(3)).view(B, n)
    kp = torch.zeros(B * n, Hkv, page, D, dtype=k.dtype)
    vp = torch.zeros(B * n, Hkv, page, v.shape[-1], dtype=v.dtype)
    for b in range(B):
        for i in range(n):
            kp[table[b, i]] = k[b, :, i * page:(i + 1) * page]
            vp[table[b, i]] = v[b, :, i * page:(i + 1) * page]
    return kp, vp, table


CASES = [
    ("mistral", dict(window=9)),
    ("streaming_llm", dict(sinks=3, recent=10)),
    ("duo", dict(retrieval={0, 3})),
    ("longformer", dict(window=4, globals=3)),
    ("prefix_lm", dict(n=20)),
    ("sparse_strided", dict(l=8)),
    ("natten1d", dict(size=5, dilation=2, causal=True)),
    ("moa", dict(sinks=3)),
    ("bigbird", dict(b=4, r=2)),
    ("alibi", dict(window=12)),
    ("gemma2_local", dict(window=7, cap=2)),
]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("name,params", CASES, ids=[c[0] for c in CASES])
def test_decode_equals_the_op_rows(name, params, m):
    pat = example_pattern(name, **params)
    B, Hq, Hkv, D, S = 3, 12 if name == "duo" else 4, 2, 8, 64
    lengths = [40, 23, 64]
    k, v = rand(B, Hkv, S, D, seed=1), rand(B, Hkv, S, 6, seed=2)
    q = rand(B, Hq, m, D, seed=3)
    want_out, want_lse = op_rows(pat, q, k, v, lengths)
    out, lse = pat.decode(q, k, v, cache_seqlens=torch.tensor(lengths), return_lse=True)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    kp, vp, table = paged(k, v, page=8)
    torch.testing.assert_close(pat.decode(q, kp, vp, cache_seqlens=torch.tensor(lengths), block_table=table), want_out,
                               atol=1e-12, rtol=1e-12)
    # per key/value head storage with positions, some slots empty (-1) and some evicted positions absent
    ks = [k[:, g] for g in range(Hkv)]
    vs = [v[:, g] for g in range(Hkv)]
    pos = [torch.arange(S) for _ in range(Hkv)]
    torch.testing.assert_close(pat.decode(q, ks, vs, key_positions=pos, cache_seqlens=torch.tensor(lengths)), want_out,
                               atol=1e-12, rtol=1e-12)


def test_decode_reads_score_tables_and_keeps_float32():
    pat = attnc.load(EXAMPLES / "alibi.attn").pattern("alibi_slopes", window=10)
    B, Hq, Hkv, D = 2, 3, 1, 8
    k, v = rand(B, Hkv, 30, D, seed=1), rand(B, Hkv, 30, D, seed=2)
    q = rand(B, Hq, 1, D, seed=3)
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    want, _ = op_rows(pat, q, k, v, [30, 17], slopes=slopes)
    got = pat.decode(q, k, v, cache_seqlens=torch.tensor([30, 17]), slopes=slopes)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    got32 = pat.decode(q.float(), k.float(), v.float(), cache_seqlens=torch.tensor([30, 17]), slopes=slopes.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, atol=1e-5, rtol=1e-5)


def test_decode_says_expected_got_try():
    pat = example_pattern("mistral", window=8)
    q, k = rand(2, 4, 1, 8), rand(2, 2, 16, 8)
    cases = [
        (lambda: pat.decode(q, k, k, cache_seqlens=torch.tensor([16, 17])), "cache_seqlens[1] must be in [m, S] = [1, 16]"),
        (lambda: pat.decode(q, k, k, cache_seqlens=torch.tensor([16])), "cache_seqlens must be an integer tensor [B] = [2]"),
        (lambda: pat.decode(q[0], k, k), "q must be [B, Hq, m, D]"),
        (lambda: pat.decode(rand(2, 3, 1, 8), k, k), "Hq must be a multiple of Hkv"),
        (lambda: pat.decode(q, rand(4, 2, 8, 8), rand(4, 2, 8, 8), block_table=torch.zeros(2, 2, dtype=torch.int64)),
         "a paged cache needs cache_seqlens"),
        (lambda: example_pattern("natten2d", size=3).decode(q, k, k), "expected a pattern on a sequence"),
        (lambda: example_pattern("packed").decode(q, k, k), "has run-time inputs or topk"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError) as err:
            fn()
        assert message in str(err.value), str(err.value)


# ----------------------------------------------------------------------------- retention


def future_needs(pat, L, heads, horizon=80):
    """bool [heads, L]: keys some query at positions L .. L + horizon - 1 is allowed (the mask)."""
    mask = pat.mask(L + horizon, heads=heads)
    return mask[:, L:, :L].any(1)


@pytest.mark.parametrize("name,params", CASES + [("streaming_llm", dict(sinks=0, recent=1))], ids=lambda c: str(c))
def test_no_retained_key_is_missing_on_examples(name, params):
    pat = example_pattern(name, **params)
    H = 12 if name == "duo" else 4
    for L in (1, 17, 40):
        keep = pat.kv_retention(L, heads=H)
        need = future_needs(pat, L, H)
        assert keep.shape == (H, L)
        assert not bool((need & ~keep).any()), f"{name}: evicts a key a later query reads at L = {L}"


def test_no_retained_key_is_missing_on_random_patterns():
    checked = 0
    for seed in range(400):
        case = generate(seed)
        if case.axes or case.inputs:
            continue
        try:
            pat = attnc.loads(case.source()).pattern()
            for L in sorted({max(1, case.N // 2), case.N}):
                keep = pat.kv_retention(L, heads=case.H)
                need = future_needs(pat, L, case.H, horizon=case.N + 20)
        except AttnError:
            continue  # valid at the case's sizes only (e.g. a window wider than a longer axis)
        assert not bool((need & ~keep).any()), case.snippet()
        checked += 1
    assert checked > 100


def test_streaming_retention_is_tight_and_duo_keeps_retrieval_heads():
    pat = example_pattern("streaming_llm", sinks=4, recent=1024)
    keep = pat.kv_retention(100_000, heads=2)
    assert keep.sum(-1).tolist() == [4 + 1023, 4 + 1023]
    assert keep[0, :4].all() and keep[0, -1023:].all() and not keep[0, 4:-1023].any()
    duo = example_pattern("duo", retrieval={0, 5})
    keep = duo.kv_retention(5000, heads=8)
    assert keep[0].all() and keep[5].all() and int(keep[1].sum()) == 64 + 255
    # windows that move with the length keep everything (they are not a decoding pattern)
    assert example_pattern("moa", sinks=3).kv_retention(300, heads=4).all()


# ----------------------------------------------------------------------------- the evicting cache


@pytest.mark.parametrize("name,params,H,G", [("streaming_llm", dict(sinks=4, recent=40), 4, 2),
                                             ("duo", dict(retrieval={0}), 4, 2),
                                             ("mistral", dict(window=33), 2, 1)])
def test_eviction_equals_keeping_everything_token_for_token(name, params, H, G):
    pat = example_pattern(name, **params)
    Hkv, D, B = H // G, 8, 2
    ev = attnc.nn.KVCache(pat, num_heads=H, num_kv_heads=Hkv, slack=16)
    full = attnc.nn.KVCache(pat, num_heads=H, num_kv_heads=Hkv, evict=False)
    g = torch.Generator().manual_seed(0)
    prompt_k, prompt_v = torch.randn(B, Hkv, 50, D, generator=g), torch.randn(B, Hkv, 50, D, generator=g)
    ev.update(prompt_k, prompt_v, attended=True)  # a prefill the op answered
    full.update(prompt_k, prompt_v, attended=True)
    most = 0
    for step in range(600):
        k, v = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
        ev.update(k, v)
        full.update(k, v)
        q = torch.randn(B, H, 1, D, generator=g)
        assert torch.equal(ev.attend(q), full.attend(q)), f"step {step}"
        most = max(most, max(ev.stored()))
    assert full.stored() == [650] * Hkv
    if name == "streaming_llm":
        assert most <= 4 + 40 + 16 and ev.stored()[0] >= 4 + 39
    if name == "duo":  # kv head 0 serves the retrieval head 0: whole; kv head 1 streams
        assert ev.stored()[0] == 650 and ev.stored()[1] <= 64 + 256 + 16


def test_cache_errors():
    pat = example_pattern("mistral", window=8)
    cache = attnc.nn.KVCache(pat, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="the cache is empty"):
        cache.attend(rand(1, 4, 1, 8))
    with pytest.raises(ValueError, match=r"expected k, v of shape \[B, 2, t, D\]"):
        cache.update(rand(1, 3, 1, 8), rand(1, 3, 1, 8))
    with pytest.raises(ValueError, match="num_heads to be a multiple of num_kv_heads"):
        attnc.nn.KVCache(pat, num_heads=3, num_kv_heads=2)


# ----------------------------------------------------------------------------- the split-KV kernel

import os  # noqa: E402

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the decode kernel runs on CPU tensors only in the Triton interpreter")

KERNEL_CASES = [
    "pattern p = sliding(40) | (sink(3) & causal)",
    "pattern p = sliding(40) | (sink(3) & causal) score 5 * tanh(score / 5) - 2 ** (-8 * (h + 1) / H) * (q - k)",
    "pattern p = heads { {0, 3} => causal; _ => sliding(30) | (sink(2) & causal) }",
    "pattern p = causal & where (q - k) % 3 == 0 | sink(1)",  # no interval form: every tile, masked
    "pattern p = blockwise(8, band(1, 1) | global({0}) | random(2))",  # tables in _mask
    "pattern p = strided(7) & causal",
]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("src", KERNEL_CASES)
def test_split_kv_kernel_equals_the_torch_decode(src, dtype):
    pat = attnc.loads(src).pattern()
    B, Hq, Hkv, D, S = 3, 4, 2, 16, 200
    lengths = torch.tensor([150, 37, 200])  # ragged, one of them the whole cache
    k, v = rand(B, Hkv, S, D, seed=1, dtype=dtype), rand(B, Hkv, S, D, seed=2, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    for m in (1, 3):
        q = rand(B, Hq, m, D, seed=3, dtype=dtype)
        want, want_lse = pat.decode(q.double(), k.double(), v.double(), cache_seqlens=lengths, backend="torch",
                                    return_lse=True)
        got, lse = pat.decode(q, k, v, cache_seqlens=lengths, backend="triton", return_lse=True)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)
        torch.testing.assert_close(lse.double(), want_lse, **tol)
        kp, vp, table = paged(k, v, page=8)
        got_p = pat.decode(q, kp, vp, cache_seqlens=lengths, block_table=table, backend="triton")
        torch.testing.assert_close(got_p.double(), want, **tol)


@interpreted
def test_split_kv_kernel_declines_with_a_reason():
    q, k = rand(1, 2, 1, 8, dtype=torch.float32), rand(1, 2, 16, 8, dtype=torch.float32)
    alibi = example_pattern("alibi", window=8)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: the Triton kernels compute in float16"):
        alibi.decode(q.double(), k.double(), k.double(), backend="triton")
    torch.testing.assert_close(alibi.decode(q, k, k), alibi.decode(q, k, k, backend="torch"))  # auto on CPU: torch
    with pytest.raises(ValueError, match="per-head caches .* are read by the torch path"):
        example_pattern("mistral", window=4).decode(q, [k[:, 0], k[:, 1]], [k[:, 0], k[:, 1]],
                                                    key_positions=[torch.arange(16)] * 2, cache_seqlens=torch.tensor([16]),
                                                    backend="triton")
    with pytest.raises(ValueError, match="backend expected one of 'auto', 'torch', 'triton'"):
        alibi.decode(q, k, k, backend="flex")


# ----------------------------------------------------------------------------- review regressions


@pytest.mark.parametrize("src", ["pattern p = rows({M - 1}) | sliding(2)", "pattern p = sliding(M // 4 + 1)"])
def test_patterns_reading_m_decode_as_the_last_rows_of_the_whole_sequence(src):
    """Was: decode evaluated them at M = m, unlike the op over the sequence."""
    pat = attnc.loads(src).pattern()
    k, v = rand(2, 1, 30, 4, seed=1), rand(2, 1, 30, 4, seed=2)
    lengths = [30, 19]
    for m in (1, 3):
        q = rand(2, 2, m, 4, seed=3)
        want, _ = op_rows(pat, q, k, v, lengths)
        torch.testing.assert_close(pat.decode(q, k, v, cache_seqlens=torch.tensor(lengths)), want)
        if os.environ.get("TRITON_INTERPRET") == "1":
            got = pat.decode(q.float(), k.float(), v.float(), cache_seqlens=torch.tensor(lengths), backend="triton")
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_per_head_positions_may_pad_at_either_end():
    """Was: -1 slots after the valid ones (the natural ragged layout) gave 0 and lse -inf."""
    pat = attnc.loads("pattern p = sliding(2)").pattern()
    k = v = rand(2, 10, 4, seed=1)
    q = rand(2, 1, 1, 4, seed=2)
    lengths = torch.tensor([10, 2])
    want = pat.decode(q, k[:, None], v[:, None], cache_seqlens=lengths)
    end = torch.tensor([list(range(10)), [0, 1] + [-1] * 8])
    start = torch.tensor([list(range(10)), [-1] * 8 + [0, 1]])
    k_start = k.clone()
    k_start[1, 8:] = k[1, :2]
    for pos, kk in ((end, k), (start, k_start)):
        out, lse = pat.decode(q, [kk], [kk], key_positions=[pos], cache_seqlens=lengths, return_lse=True)
        torch.testing.assert_close(out, want)
        assert torch.isfinite(lse).all()
    with pytest.raises(ValueError, match=r"key_positions\[0\] must be ascending"):
        pat.decode(q, [k], [v], key_positions=[torch.tensor([3, 1] + list(range(2, 10)))], cache_seqlens=lengths)


def test_dense_fallback_with_nothing_stored_is_empty_not_a_crash():
    pat = attnc.loads("pattern p = where k == q - 100").pattern()
    out, lse = pat.decode(rand(1, 1, 1, 4), [rand(1, 0, 4)], [rand(1, 0, 4)], key_positions=[torch.zeros(0, dtype=torch.int64)],
                          cache_seqlens=torch.tensor([5]), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_ragged_decoding_with_length_shaped_tables_is_refused_clearly():
    pat = attnc.loads("pattern p(t: table(H, N)) = sliding(4) score score + t[h, k]").pattern()
    k = rand(2, 1, 12, 4)
    with pytest.raises(ValueError, match="the score term's tables change shape with the length"):
        pat.decode(rand(2, 1, 1, 4), k, k, cache_seqlens=torch.tensor([12, 7]), t=torch.zeros(1, 12))


def test_cache_refuses_other_heads_and_requeried_positions():
    pat = attnc.loads("pattern p = heads { 0 .. 2 => sliding(2); _ => causal }").pattern()
    cache = attnc.nn.KVCache(pat, num_heads=2, num_kv_heads=1, slack=1)
    kk = rand(1, 1, 7, 4)
    cache.update(kk[:, :, :6], kk[:, :, :6], attended=True)
    cache.update(kk[:, :, 6:], kk[:, :, 6:])
    with pytest.raises(ValueError, match=r"expected q of shape \[1, 2, m, D\]"):
        cache.attend(rand(1, 4, 1, 4))
    with pytest.raises(ValueError, match="expected at most the 1 token"):
        cache.attend(rand(1, 2, 2, 4))
    cache.attend(rand(1, 2, 1, 4))
    with pytest.raises(ValueError, match="expected at most the 0 token"):
        cache.attend(rand(1, 2, 1, 4))


@interpreted
def test_split_kv_kernel_reads_score_tables():
    pat = attnc.load(EXAMPLES / "alibi.attn").pattern("alibi_slopes", window=50)
    B, Hq, Hkv, D = 2, 4, 2, 16
    k, v = rand(B, Hkv, 120, D, seed=1, dtype=torch.float32), rand(B, Hkv, 120, D, seed=2, dtype=torch.float32)
    q = rand(B, Hq, 2, D, seed=3, dtype=torch.float32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    lengths = torch.tensor([120, 77])
    want = pat.decode(q, k, v, cache_seqlens=lengths, backend="torch", slopes=slopes)
    got = pat.decode(q, k, v, cache_seqlens=lengths, backend="triton", slopes=slopes)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
