"""Score terms (`score EXPR` after the mask, `table(...)` inputs): the language, every backend
against references written from the papers and libraries, gradients into the tables, the
checks, and that a score term never changes the tiles visited.

The references below share nothing with attnc: NATTEN's legacy kernels' window and bias
indexing (`get_window_start` / `get_pb_start`, natten <= 0.14 `csrc/include/natten/...`),
Swin's `WindowAttention` (relative_position_index, cyclic shift and -100 region mask),
ALiBi's official `get_slopes`, and Hugging Face Gemma 2's `eager_attention_forward`
soft-capping. Each computes attention densely in float64 with autograd.
"""

import math
import os

import pytest
import torch

import attnc
from attnc.errors import AttnError
from conftest import EXAMPLES, example_pattern


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def softmax_attention(s, v):
    """out, lse of logits s [B, H, M, N] (-inf = masked) and v [B, H, N, D]."""
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


# ----------------------------------------------------------------------------- references


def natten_window_start(index, length, K, NS, dilation):
    if dilation <= 1:
        return max(index - NS, 0) + (index + NS >= length) * (length - index - NS - 1)
    ni = index - NS * dilation
    if ni < 0:
        return index % dilation
    if index + NS * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * NS * dilation
        return a + imodd - K * dilation
    return ni


def natten_pb_start(index, length, K, NS, dilation):
    if dilation <= 1:
        return NS + (index < NS) * (NS - index) + (index + NS >= length) * (length - index - 1 - NS)
    if index - NS * dilation < 0:
        return K - 1 - (index // dilation)
    if index + NS * dilation >= length:
        return (length - index - 1) // dilation
    return NS


def nat_rpb_reference(q, k, v, rpb, shape, K, dilation):
    """NATTEN 2-D neighborhood attention with rpb [H, 2K-1, 2K-1]: q, k, v [B, H, Y*X, D]."""
    Y, X = shape
    NS = K // 2
    B, H, L, D = q.shape
    s = torch.full((B, H, L, L), float("-inf"), dtype=q.dtype)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    rows = []
    for i in range(Y):
        ni, pi = natten_window_start(i, Y, K, NS, dilation), natten_pb_start(i, Y, K, NS, dilation)
        for j in range(X):
            nj, pj = natten_window_start(j, X, K, NS, dilation), natten_pb_start(j, X, K, NS, dilation)
            for ki in range(K):
                for kj in range(K):
                    rows.append((i * X + j, (ni + ki * dilation) * X + nj + kj * dilation, pi + ki, pj + kj))
    qi, ki_, bi, bj = (torch.tensor(c) for c in zip(*rows))
    s = s.clone()
    s[:, :, qi, ki_] = logits[:, :, qi, ki_] + rpb[:, bi, bj]
    return softmax_attention(s, v)


def swin_reference(q, k, v, table, shape, win, shift):
    """Swin W-MSA / SW-MSA (official code): roll, window partition, bias from the
    ((2 win - 1)^2, H) table at relative_position_index, -100 region mask, reverse."""
    Y, X = shape
    B, H, L, D = q.shape
    coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += win - 1
    rel[:, :, 1] += win - 1
    rel[:, :, 0] *= 2 * win - 1
    index = rel.sum(-1)  # [win^2, win^2]
    bias = table[index.view(-1)].view(win * win, win * win, H).permute(2, 0, 1)
    img_mask = torch.zeros(Y, X)
    if shift:
        cnt = 0
        for hs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
            for ws in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
                img_mask[hs, ws] = cnt
                cnt += 1

    def windows(t, roll=True):  # [b, h, Y*X, C] -> [b, h, nW, win*win, C] after the cyclic shift
        b, h = t.shape[:2]
        t = t.view(b, h, Y, X, -1)
        if shift and roll:
            t = torch.roll(t, shifts=(-shift, -shift), dims=(2, 3))
        t = t.view(b, h, Y // win, win, X // win, win, -1).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(b, h, -1, win * win, t.shape[-1])

    mw = windows(img_mask.view(1, 1, Y * X, 1).double(), roll=False)[0, 0, :, :, 0]  # built in the shifted frame
    region = torch.where(mw[:, :, None] != mw[:, None, :], -100.0, 0.0)
    s = windows(q) @ windows(k).transpose(-1, -2) / math.sqrt(D) + bias[None, :, None] + region[None, None]
    lse = torch.logsumexp(s, -1)
    o = torch.softmax(s, -1) @ windows(v)  # [B, H, nW, win^2, D]
    o = o.view(B, H, Y // win, X // win, win, win, -1).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, Y, X, -1)
    lse = lse.view(B, H, Y // win, X // win, win, win).permute(0, 1, 2, 4, 3, 5).reshape(B, H, Y, X)
    if shift:
        o = torch.roll(o, shifts=(shift, shift), dims=(2, 3))
        lse = torch.roll(lse, shifts=(shift, shift), dims=(2, 3))
    return o.reshape(B, H, Y * X, -1), lse.reshape(B, H, Y * X)


def alibi_slopes(n):
    """ALiBi's official get_slopes (github.com/ofirpress/attention_with_linear_biases)."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start**i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


def alibi_reference(q, k, v, window, slopes):
    B, H, N, D = q.shape
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    slopes = slopes if isinstance(slopes, torch.Tensor) else torch.tensor(slopes, dtype=q.dtype)
    s = q @ k.transpose(-1, -2) / math.sqrt(D) - slopes.view(1, H, 1, 1) * (i - j)
    s = s.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    return softmax_attention(s, v)


def gemma2_reference(q, k, v, window, softcap):
    """transformers' Gemma 2 eager attention: scale, soft-cap, sliding mask, softmax."""
    B, H, N, D = q.shape
    w = q @ k.transpose(-1, -2) * D**-0.5
    w = torch.tanh(w / softcap) * softcap
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    w = w.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    return softmax_attention(w, v)


# ----------------------------------------------------------------------------- cases


def _nat(seed):
    shape, K, d = (9, 11), 3, 2
    pat = example_pattern("nat_rpb", size=K, dilation=d)
    rpb = rand(2, 2 * K - 1, 2 * K - 1, seed=seed)
    return pat, dict(grid=shape), {"rpb": rpb}, lambda q, k, v, t: nat_rpb_reference(q, k, v, t["rpb"], shape, K, d), 99


def _nat_plain(seed):
    shape, K = (8, 7), 5
    pat = example_pattern("nat_rpb", size=K)
    rpb = rand(2, 2 * K - 1, 2 * K - 1, seed=seed)
    return pat, dict(grid=shape), {"rpb": rpb}, lambda q, k, v, t: nat_rpb_reference(q, k, v, t["rpb"], shape, K, 1), 56


def _swin(seed, shift=2):
    shape, win = (8, 12), 4
    pat = example_pattern("swin_rpb", win=win, shift=shift)
    table = rand((2 * win - 1) ** 2, 2, seed=seed)
    return (pat, dict(grid=shape), {"bias_table": table},
            lambda q, k, v, t: swin_reference(q, k, v, t["bias_table"], shape, win, shift), 96)


def _alibi(seed):
    pat = example_pattern("alibi", window=11)
    return pat, {}, {}, lambda q, k, v, t: alibi_reference(q, k, v, 11, alibi_slopes(q.shape[1])), 45


def _alibi_table(seed):
    H = 3  # not a power of two: the paper interleaves, a table takes any slopes
    pat = example_pattern("alibi_slopes", window=11)
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64)
    return pat, {}, {"slopes": slopes}, lambda q, k, v, t: alibi_reference(q, k, v, 11, t["slopes"]), 45


def _gemma(seed):
    pat = example_pattern("gemma2_local", window=9, cap=2)
    return pat, {}, {}, lambda q, k, v, t: gemma2_reference(q, k, v, 9, 2.0), 40


CASES = {"nat_rpb_dilated": _nat, "nat_rpb": _nat_plain, "swin_rpb_shifted": _swin,
         "swin_rpb": lambda s: _swin(s, shift=0), "alibi": _alibi, "alibi_slopes": _alibi_table, "gemma2": _gemma}
HEADS = {"alibi": 8, "alibi_slopes": 3}


def _case(name, dtype=torch.float64, seed=0):
    pat, kw, tables, ref, L = CASES[name](seed + 3)
    H = HEADS.get(name, 2)
    if name == "alibi_slopes":
        tables = {"slopes": torch.tensor(alibi_slopes(H), dtype=torch.float64)}
    q, k, v = (rand(1, H, L, 8, seed=seed + i) for i in range(3))
    return pat, kw, tables, ref, (q, k, v)


def _grads(out, lse, inputs, seed=9):
    w = rand(*out.shape, seed=seed, dtype=out.dtype)
    dl = rand(*lse.shape, seed=seed + 1, dtype=lse.dtype)
    fin = torch.isfinite(lse)
    loss = (out * w).sum() + (lse.masked_fill(~fin, 0) * dl).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _against_the_reference(name, dtype, **call):
    """(ours, want): out, lse and the gradients of q, k, v and the tables, from the op with
    `call` options on `dtype` copies and from the paper's reference in float64."""
    pat, kw, tables, ref, (q, k, v) = _case(name)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    tl_ = {n: t.clone().requires_grad_() for n, t in tables.items()}
    want_out, want_lse = ref(*leaves, tl_)
    want = _grads(want_out, want_lse, [*leaves, *tl_.values()])
    got_leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
    got_t = {n: t.to(dtype, copy=True).requires_grad_() for n, t in tables.items()}
    out, lse = pat(*got_leaves, return_lse=True, **call, **kw, **got_t)
    got = _grads(out.double(), lse.double(), [*got_leaves, *got_t.values()])
    names = ["dq", "dk", "dv", *[f"d{t}" for t in tables]]
    return (out.double(), lse.double(), got), (want_out, want_lse, want), names


def _assert_close(ours, want, names, tol, grad_tol):
    torch.testing.assert_close(ours[0], want[0], atol=tol, rtol=tol)
    torch.testing.assert_close(ours[1], want[1], atol=tol, rtol=tol)
    for n, g, w in zip(names, ours[2], want[2]):
        torch.testing.assert_close(g.double(), w, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_paper_reference_with_gradients(name, backend):
    ours, want, names = _against_the_reference(name, torch.float64, backend=backend)
    _assert_close(ours, want, names, 1e-10, 1e-9)


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_interpreter_matches_the_paper_reference(name):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the generated kernels run on CPU tensors only in the interpreter (conftest sets it without CUDA)")
    ours, want, names = _against_the_reference(name, torch.float32, backend="triton", block=(16, 16))
    _assert_close(ours, want, names, 2e-5, 1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_flex_export_matches_the_paper_reference_in_eager_mode(name):
    from torch.nn.attention.flex_attention import flex_attention

    pat, kw, tables, ref, (q, k, v) = _case(name)
    want_out, _ = ref(q, k, v, tables)
    H, L = q.shape[1], q.shape[2]
    ex = pat.to_flex(L, heads=H, block=(16, 16), **kw, **{n: t.float() for n, t in tables.items()})
    mask_mod, block_mask = ex  # unpacks as before
    assert ex.score_mod is not None and ex.mask_mod is mask_mod and ex.block_mask is block_mask
    out = flex_attention(q.float(), k.float(), v.float(), block_mask=block_mask, score_mod=ex.score_mod)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)


def test_flex_backend_runs_the_score_term_compiled():
    pat, kw, tables, ref, (q, k, v) = _case("nat_rpb")
    want_out, _ = ref(q, k, v, tables)
    out = pat(q.float(), k.float(), v.float(), backend="flex", **kw, **{n: t.float() for n, t in tables.items()})
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)


def test_gradcheck_float64_with_a_learnable_table():
    pat, kw, tables, _, (q, k, v) = _case("nat_rpb_dilated")
    q, k, v = (t[:, :, :, :4].clone().requires_grad_() for t in (q, k, v))
    rpb = tables["rpb"].clone().requires_grad_()
    for backend in ("torch", "reference"):
        fn = lambda a, b, c, t: pat(a, b, c, rpb=t, return_lse=True, backend=backend, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, rpb))
    # a term that is nonlinear in the score and reads positions and a table
    mixed = attnc.loads("pattern p(t: table(H)) = sliding(5) | sink(1) "
                        "score max(score, -0.5) * sigmoid(t[h]) + exp(0.0 - abs(q - k) / 4) - 2 ** (h - 1)").pattern()
    q2, k2, v2 = (rand(1, 2, 11, 3, seed=s).requires_grad_() for s in (1, 2, 3))
    t2 = rand(2, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, t: mixed(a, b, c, t=t, backend="torch"), (q2, k2, v2, t2))


def test_the_score_term_never_changes_the_tiles():
    scored = example_pattern("nat_rpb", size=5)
    plain = example_pattern("natten2d", size=5)
    a = scored.plan(None, heads=2, grid=(20, 24), block=(32, 32))
    b = plain.plan(None, heads=2, grid=(20, 24), block=(32, 32))
    assert torch.equal(a.to_dense(), b.to_dense())
    assert torch.equal(scored.mask(None, grid=(8, 8), heads=2), plain.mask(None, grid=(8, 8), heads=2))
    assert scored.simulate(None, grid=(20, 24), heads=2).tile_bound == plain.simulate(None, grid=(20, 24), heads=2).tile_bound


def test_torch_compile_fullgraph_with_a_table_gradient():
    pat = example_pattern("nat_rpb", size=3)
    q, k, v = (rand(1, 2, 36, 8, seed=s, dtype=torch.float32).requires_grad_() for s in (1, 2, 3))
    rpb = rand(2, 5, 5, seed=4, dtype=torch.float32).requires_grad_()

    def step(q, k, v, rpb):
        return pat(q, k, v, grid=(6, 6), rpb=rpb, backend="torch").square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(q, k, v, rpb)
    g = torch.autograd.grad(loss, [q, k, v, rpb])
    loss_e = step(q, k, v, rpb)
    ge = torch.autograd.grad(loss_e, [q, k, v, rpb])
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- the language


def test_text_and_parsing():
    pat = attnc.loads("pattern g(cap = 30) = sliding(64) score cap * tanh(score / cap) + 0.5").pattern()
    assert pat.text() == "pattern g(cap = 30) on seq = sliding(64) score ((cap * tanh((score / cap))) + 0.5)"
    # `score` stays usable as a name outside score terms; `0..4` ranges still lex as integers
    p = attnc.loads("pattern p(score = 3) = sliding(score) | cols(0..4)").pattern()
    assert p.ir.score is None
    assert torch.equal(p.mask(8)[0, 7], torch.tensor([1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool))


@pytest.mark.parametrize("source,message", [
    ("pattern a = causal score foo[h]", "1:26: error: unknown table input 'foo'"),
    ("pattern a(t: table(4)) = causal", "1:11: error: table input 't' is never read"),
    ("pattern a(t: table(4), u: table(2)) = causal score t[0]", "table input 'u' is never read by the score term"),
    ("pattern a = sliding(1.5)", "1:21: error: '1.5' is not an integer: decimal numbers appear only in score terms"),
    ("pattern a = causal score tanh(score, 2)", "1:26: error: tanh takes one argument"),
    ("pattern a = where q / 2 < k", "1:19: error: '/' divides reals"),
    ("pattern a(t: table(4)) = causal score t[h, q]", "table 't' has 1 dimension(s), indexed with 2"),
    ("pattern a(t: table(4)) = causal score t[score]", "a table index must be an integer expression"),
    ("pattern a = causal score tanh(score) < 2", "comparison '<' outside a condition"),
    ("pattern a = causal score causal", "a score term must be a number, got a mask"),
    ("pattern a(score = 2) = causal score score", "'score' inside a score term is the pair's scaled dot product"),
    ("pattern a = causal score score // 2", "'//' is integer arithmetic; score terms combine reals"),
    ("pattern a = causal | tanh(2)", "tanh() is a function of score terms only"),
    ("pattern a(t: table(0)) = causal score t[0]", "a table dimension must be >= 1, got 0"),
    ("pattern a(t: tabel(4)) = causal", "did you mean 'table'?"),
    ("pattern b(t: table(4)) = causal score t[0]\npattern c = b & sliding(4)",
     "2:13: error: pattern 'b' has a score term; a called pattern contributes only its mask"),
])
def test_diagnostics_are_located(source, message):
    with pytest.raises(AttnError) as err:
        prog = attnc.loads(source)
        prog.pattern(prog.names()[-1])
    assert message in str(err.value)
    assert str(err.value).startswith("<string>:")


def test_binding_a_table_is_refused():
    prog = attnc.load(EXAMPLES / "nat_rpb.attn")
    with pytest.raises(AttnError, match="'rpb' is a run-time input \\(table\\): pass it as a tensor when calling the op"):
        prog.pattern("nat_rpb", rpb=torch.zeros(1, 13, 13))


# ----------------------------------------------------------------------------- tensors


def test_bad_tables_say_expected_got_try():
    pat = example_pattern("nat_rpb", size=3)
    q = rand(1, 2, 36, 8, dtype=torch.float32)
    good = torch.zeros(2, 5, 5)
    cases = [
        ({}, "missing table input 'rpb' of the score term: expected rpb=tensor of shape (H, 2*size - 1, 2*size - 1)"),
        ({"rpb": torch.zeros(2, 5, 4)}, "rpb: expected a table of shape (2, 5, 5) at M = 36, N = 36, H = 2, grid = (6, 6), got (2, 5, 4); try"),
        ({"rpb": torch.zeros(2, 5, 5, dtype=torch.int64)}, "rpb: expected a floating-point table, got dtype torch.int64; try rpb.float()"),
        ({"rpb": [[0.0]]}, "rpb: expected a real torch tensor (the score term's table), got list"),
        ({"rpb": good, "doc": good}, "unexpected input 'doc'"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError) as err:
            pat(q, q, q, grid=(6, 6), backend="torch", **kw)
        assert message in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="'rpb' is a table input, read only by the score term: the mask does not take it"):
        pat.mask(None, grid=(6, 6), heads=2, rpb=good)


def test_a_table_index_outside_the_table_is_an_error_on_allowed_pairs_only():
    # q - k ranges over 0..4 on a sliding window of 5: a table of 5 fits exactly, 4 does not
    fits = attnc.loads("pattern p(t: table(5)) = sliding(5) score score + t[q - k]").pattern()
    q = rand(1, 1, 20, 4, dtype=torch.float32)
    fits(q, q, q, t=torch.zeros(5), backend="torch")  # padding pairs of partial tiles read outside: not an error
    small = attnc.loads("pattern p(t: table(4)) = sliding(5) score score + t[q - k]").pattern()
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match=r"t\[\(q - k\)\]: index 0 takes values in \[0, 4\] on allowed pairs at "
                                             r"M = 20, N = 20, H = 1, but the table's dimension 0 is 4"):
            small(q, q, q, t=torch.zeros(4), backend=backend)
    with pytest.raises(ValueError, match="index 0 takes values in"):
        small.to_flex(20, t=torch.zeros(4))


def test_tables_shapes_may_depend_on_sizes():
    # an additive bias over all pairs: table(H, M, N) indexed by the query row and the key
    pat = attnc.loads("pattern p(bias: table(H, M, N)) = causal score score + bias[h, q - N + M, k]").pattern()
    q, k, v = (rand(1, 2, 9, 4, seed=s) for s in (1, 2, 3))
    bias = rand(2, 9, 9, seed=4)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2)) / 2 + bias
    want, _ = softmax_attention(s.masked_fill(~mask, float("-inf")), v)
    for backend in ("torch", "reference"):
        torch.testing.assert_close(pat(q, k, v, bias=bias, backend=backend), want)
    with pytest.raises(ValueError, match=r"expected a table of shape \(2, 8, 8\)"):
        pat(q[:, :, :8], k[:, :, :8], v[:, :, :8], bias=bias, backend="torch")


def test_a_large_term_keeps_padding_rows_neutral():
    """Rows past M in a ragged last query tile (zero q and dO) used to give p = exp(term - 0): a
    bias growing with distance overflowed there and inf * 0 turned dK, dV and the table's
    gradient into NaN. Every tile of `full` is full, so nothing masks those rows."""
    pat = attnc.loads("pattern p(t: table(H)) = full score score - t[h] * (q - k)").pattern()
    q, k, v = (rand(1, 2, 70, 8, seed=s) for s in (1, 2, 3))
    t = torch.tensor([-20.0, 3.0], dtype=torch.float64)
    backends = ["reference", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    grads = {}
    for backend in backends:
        dtype = torch.float32 if backend == "triton" else torch.float64
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, t)]
        out = pat(*leaves[:3], t=leaves[3], backend=backend)
        grads[backend] = torch.autograd.grad(out.sum(), leaves)
        assert all(bool(torch.isfinite(g).all()) for g in grads[backend]), backend
    for backend in backends[1:]:
        tol = 1e-4 if backend == "triton" else 1e-9
        for g, w in zip(grads[backend], grads["reference"]):
            torch.testing.assert_close(g.double(), w, atol=tol * max(1.0, float(w.abs().max())), rtol=tol)


# ----------------------------------------------------------------------------- modules


def _project(layer, x):
    B, H, W, C = x.shape
    heads = layer.num_heads
    return layer.qkv(x).reshape(B, H * W, 3, heads, C // heads).permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize("kernel_size,dilation", [(3, 2), (5, 1)])
def test_neighborhood_attention_2d_matches_natten_with_rpb(kernel_size, dilation):
    torch.manual_seed(0)
    layer = attnc.nn.NeighborhoodAttention2D(dim=16, num_heads=2, kernel_size=kernel_size, dilation=dilation,
                                             backend="torch").double()
    assert layer.rpb.shape == (2, 2 * kernel_size - 1, 2 * kernel_size - 1)
    x = rand(2, 9, 11, 16, seed=1)
    y = layer(x)
    q, k, v = _project(layer, x)
    o, _ = nat_rpb_reference(q, k, v, layer.rpb, (9, 11), kernel_size, dilation)
    want = layer.proj(o.transpose(1, 2).reshape(2, 9, 11, 16))
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)
    g, = torch.autograd.grad(y.square().sum(), [layer.rpb])
    gw, = torch.autograd.grad(want.square().sum(), [layer.rpb])
    torch.testing.assert_close(g, gw, atol=1e-10, rtol=1e-10)
    assert float(g.abs().sum()) > 0


def test_window_attention_2d_matches_swin_shifted():
    torch.manual_seed(0)
    layer = attnc.nn.WindowAttention2D(dim=16, num_heads=2, window_size=4, shift=2, backend="torch").double()
    assert layer.rpb.shape == (49, 2)
    x = rand(1, 8, 12, 16, seed=2)
    q, k, v = _project(layer, x)
    o, _ = swin_reference(q, k, v, layer.rpb, (8, 12), 4, 2)
    torch.testing.assert_close(layer(x), layer.proj(o.transpose(1, 2).reshape(1, 8, 12, 16)), atol=1e-12, rtol=1e-12)


def test_a_training_step_learns_the_bias_and_rpb_can_be_off():
    torch.manual_seed(0)
    layer = attnc.nn.NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, backend="torch")
    before = layer.rpb.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x, target = rand(2, 6, 6, 8, seed=3, dtype=torch.float32), rand(2, 6, 6, 8, seed=4, dtype=torch.float32)
    loss0 = (layer(x) - target).square().mean()
    loss0.backward()
    opt.step()
    assert not torch.equal(layer.rpb.detach(), before)
    assert (layer(x) - target).square().mean() < loss0
    plain = attnc.nn.NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, rpb=False, backend="torch")
    assert plain.rpb is None and "rpb" not in dict(plain.named_parameters())
    with pytest.raises(ValueError, match=r"expected x of shape \[B, H, W, 8\] \(channels last\), got shape \(2, 8, 6, 6\)"):
        plain(x.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="expected dim divisible by num_heads"):
        attnc.nn.NeighborhoodAttention2D(dim=10, num_heads=3, kernel_size=3)


def test_sparse_attention_owns_tables_that_need_no_length():
    layer = attnc.nn.SparseAttention(EXAMPLES / "alibi.attn", pattern="alibi_slopes", embed_dim=16, num_heads=4,
                                     window=8, backend="torch")
    assert dict(layer.named_parameters())["tables.slopes"].shape == (4,)
    x = rand(1, 20, 16, seed=5, dtype=torch.float32)
    y = layer(x)
    y.sum().backward()
    assert layer.tables["slopes"].grad is not None and float(layer.tables["slopes"].grad.abs().sum()) > 0
    # an explicit table wins over the owned one
    zero = layer(x, slopes=torch.zeros(4))
    plain = attnc.nn.SparseAttention(EXAMPLES / "mistral.attn", embed_dim=16, num_heads=4, window=8, backend="torch")
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("tables.")})
    torch.testing.assert_close(zero, plain(x))
    # a table whose shape needs the length is the caller's
    sized = attnc.nn.SparseAttention(attnc.loads("pattern p(bias: table(H, N)) = causal score score + bias[h, k]").pattern(),
                                     embed_dim=16, num_heads=4, backend="torch")
    assert len(sized.tables) == 0
    with pytest.raises(ValueError, match="missing table input 'bias'"):
        sized(x)
    assert sized(x, bias=torch.zeros(4, 20)).shape == (1, 20, 16)


def test_cli_lists_and_compiles_the_score_term(tmp_path):
    import io
    import json

    from attnc import cli

    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["list", str(EXAMPLES / "gemma2.attn")], out, err) == 0
    assert "    score cap * tanh(score / cap)" in out.getvalue()
    out = io.StringIO()
    assert cli.main(["compile", str(EXAMPLES / "nat_rpb.attn"), "--set", "size=3", "--grid", "12x12", "--heads", "2",
                     "-o", str(tmp_path)], out, err) == 0, err.getvalue()
    meta = json.loads((tmp_path / "nat_rpb_12x12.json").read_text())
    assert meta["score"]["tables"] == [{"name": "rpb", "shape": [2, 5, 5]}]
    source = (tmp_path / "nat_rpb_12x12.py").read_text()
    assert "def _score(" in source and "def _score_grad_tables(" in source and "tl.atomic_add(dsc_rpb" in source


def test_n_d_tiles_decline_a_score_term_with_a_reason():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    pat = example_pattern("nat_rpb", size=3)
    q = rand(1, 2, 64, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="score terms are generated for 1-D tiles only"):
        pat(q, q, q, grid=(8, 8), rpb=torch.zeros(2, 5, 5), backend="triton", block=((4, 4), (4, 4)))


def test_check_with_sizes_proves_table_indices(tmp_path):
    import io

    from attnc import cli

    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["check", str(EXAMPLES / "nat_rpb.attn"), "--grid", "20x20", "--heads", "2"], out, err) == 0
    assert "ok: 'nat_rpb' reads its tables (rpb[2, 13, 13]) only inside them at these sizes" in out.getvalue()
    bad = tmp_path / "bad.attn"
    bad.write_text("pattern p(t: table(H, 5)) = sliding(7) score score + t[h, q - k]\n")
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["check", str(bad), "--seq-len", "64"], out, err) == 1
    assert f"{bad}:1:11: error: pattern 'p': t[h, (q - k)]: index 1 takes values in [0, 6]" in err.getvalue()


# ----------------------------------------------------------------------------- review regressions


def _backends():
    return ["reference", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def test_a_term_that_ignores_the_score_with_gqa():
    """Was: the torch path returned zeros (a broadcast view masked in place) or crashed."""
    q, k, v = rand(1, 4, 24, 8, seed=1, dtype=torch.float32), rand(1, 2, 32, 8, seed=2, dtype=torch.float32), \
        rand(1, 2, 32, 8, seed=3, dtype=torch.float32)
    for src, kw in (("pattern p(t: table(H)) = full score t[h]", {"t": rand(4, seed=4, dtype=torch.float32)}),
                    ("pattern p = sliding(5) score 0.5 * (q - k) - 3", {})):
        pat = attnc.loads(src).pattern()
        want = pat(q, k, v, backend="reference", **kw)
        for backend in _backends()[1:]:
            torch.testing.assert_close(pat(q, k, v, backend=backend, block=(16, 16) if backend == "triton" else None,
                                           **kw), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("src", ["pattern p(t: table(H)) = causal score score - t[h] / (q - k + 1)",
                                 "pattern p(t: table(H)) = causal score score + t[h] * (q - k) ** 0.5"])
def test_infinite_derivatives_on_masked_pairs_do_not_poison_gradients(src):
    """Was: 0 * inf = NaN in the tables' gradients (every backend) from pairs the mask removes."""
    pat = attnc.loads(src).pattern()
    q, k, v = (rand(1, 2, 24, 8, seed=s) for s in (1, 2, 3))
    grads = {}
    for backend in _backends():
        dtype = torch.float32 if backend == "triton" else torch.float64
        t = torch.ones(2, dtype=dtype, requires_grad=True)
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = pat(*leaves, t=t, backend=backend, block=(16, 16) if backend == "triton" else None)
        grads[backend] = torch.autograd.grad(out.sum(), [*leaves, t])
        assert all(bool(torch.isfinite(g).all()) for g in grads[backend]), backend
    for backend in _backends()[1:]:
        for g, w in zip(grads[backend], grads["reference"]):
            torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_padding_rows_with_an_infinite_derivative():
    """Was: NaN dq / dk on the torch path when M is not a multiple of the tile (q = 0 there)."""
    pat = attnc.loads("pattern p = sliding(5) score score ** -2").pattern()
    q = rand(1, 2, 24, 8, seed=1).requires_grad_()
    k, v = rand(1, 2, 24, 8, seed=2), rand(1, 2, 24, 8, seed=3)
    g_torch = torch.autograd.grad(pat(q, k, v, backend="torch").sum(), q)[0]
    g_ref = torch.autograd.grad(pat(q, k, v, backend="reference").sum(), q)[0]
    torch.testing.assert_close(g_torch, g_ref)


@pytest.mark.parametrize("term", ["score ** 9", "(score - 10) ** -2", "(score - 10) ** -11", "score ** (q - k)",
                                  "abs(score) ** 0.5"])
def test_powers_of_negative_numbers_match_torch_in_the_kernels(term):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    pat = attnc.loads(f"pattern p = sliding(5) score {term}").pattern()
    # scores of order 1: score ** 9 of larger ones is a one-hot softmax whose float32 gradients are noise
    q, k, v = ((rand(1, 2, 24, 8, seed=s, dtype=torch.float32) * f).requires_grad_() for s, f in ((1, 0.5), (2, 1), (3, 1)))
    a = pat(q, k, v, backend="torch")
    b = pat(q, k, v, backend="triton", block=(16, 16))
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    ga = torch.autograd.grad(a.sum(), [q, k, v])
    gb = torch.autograd.grad(b.sum(), [q, k, v])
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)


def test_non_finite_terms_and_tables_say_so():
    q = rand(1, 2, 16, 8, dtype=torch.float32)
    pat = attnc.loads("pattern p = sliding(4) score score * (1 / (H - 2))").pattern()
    with pytest.raises(ValueError, match=r"or the score term `\(score \* \(1 / \(H - 2\)\)\)` is not finite on an allowed pair"):
        pat(q, q, q, backend="torch")
    tab = attnc.loads("pattern p(t: table(H)) = sliding(4) score score + t[h]").pattern()
    with pytest.raises(ValueError, match="t: expected a table of finite values, got inf or NaN"):
        tab(q, q, q, t=torch.tensor([float("nan"), 0.0]), backend="torch")
