"""FlexAttention export: the BlockMask built from attnc's plan equals
create_block_mask's, mask_mod is exact everywhere, and compiled flex_attention
with it matches the reference; the "flex" backend runs forward on CPU."""

import pytest
import torch

import attnc
from conftest import EXAMPLES

fa = pytest.importorskip("torch.nn.attention.flex_attention")

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


CASES = [
    ("pattern p = sliding(5) | (sink(2) & causal)", 70, 70, 1, None, (16, 16), {}),
    ("pattern p = band(3, 2) & ~rows({4, 9})", 25, 40, 1, None, (16, 16), {}),  # ragged, M != N, empty rows
    ("pattern p = heads { 0 => causal; _ => block(8) }", 50, 50, 3, None, (16, 32), {}),
    ("pattern p = heads { 0 => causal; _ => block(3) }", 20, 20, 2, None, (32, 32), {}),  # one tile, bits per head
    ("pattern p(size=3) on grid(h, w) = neighborhood(size)", 42, None, 1, (6, 7), (16, 16), {}),
    ("pattern p(doc: segments) = causal & same(doc)", 30, 30, 1, None, (8, 8),
     {"doc": torch.tensor([[0] * 10 + [1] * 20, [0] * 25 + [1] * 5])}),
]


def dense_mask(pat, M, N, H, grid, inputs):
    m = pat.mask(M, N, heads=H, grid=grid, **inputs)
    return m if m.dim() == 4 else m[None]


@pytest.mark.parametrize("src,M,N,H,grid,block,inputs", CASES)
def test_block_mask_equals_create_block_mask_and_mask_mod_is_exact(src, M, N, H, grid, block, inputs):
    pat = attnc.loads(src).pattern()
    N = N or M
    mask_mod, bm = pat.to_flex(M, N, heads=H, grid=grid, block=block, **inputs)
    dense = dense_mask(pat, M, N, H, grid, inputs)
    B = dense.shape[0]
    want = fa.create_block_mask(lambda b, h, q, k: dense[b, h, q, k], B, H, M, N, device="cpu", BLOCK_SIZE=block)
    assert bm.BLOCK_SIZE == want.BLOCK_SIZE and tuple(bm.seq_lengths) == (M, N)
    for name in FIELDS:
        got, exp = getattr(bm, name), getattr(want, name)
        assert torch.equal(got.expand_as(exp), exp), name
    # mask_mod at every (b, h, q, k), through vmap as FlexAttention calls it
    qq, kk = torch.meshgrid(torch.arange(M), torch.arange(N), indexing="ij")
    for b in range(B):
        for h in range(H):
            got = mask_mod(torch.tensor(b), torch.tensor(h), qq, kk)
            assert torch.equal(got, dense[b, h])
    vm = torch.vmap(torch.vmap(mask_mod, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None))
    assert torch.equal(vm(torch.tensor(0), torch.tensor(H - 1), torch.arange(M), torch.arange(N)), dense[0, H - 1])
    # positions beyond the sequence (FlexAttention pads) are False, never an index error
    assert not mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(M + 5), torch.tensor(N + 7))


def test_compiled_flex_attention_with_the_export_matches_the_reference():
    pat = attnc.load(EXAMPLES / "streaming_llm.attn").pattern(sinks=2, recent=9)
    M, N, H = 100, 100, 2
    mask_mod, bm = pat.to_flex(M, N, heads=H, block=(32, 32))
    q, k, v = rand(1, H, M, 16, seed=1), rand(1, H, N, 16, seed=2), rand(1, H, N, 16, seed=3)
    try:
        got = torch.compile(fa.flex_attention, dynamic=False)(q, k, v, block_mask=bm)
    except Exception as exc:  # pragma: no cover - depends on the local C++ toolchain
        pytest.skip(f"compiled FlexAttention unavailable here: {type(exc).__name__}")
    want = pat(q, k, v, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_flex_backend_forward_on_cpu_matches_torch_path():
    pat = attnc.loads("pattern p = (band(4, 3) | sink(2)) & ~rows({5})").pattern()
    q, k, v = rand(1, 4, 45, 16, seed=1), rand(1, 2, 45, 16, seed=2), rand(1, 2, 45, 16, seed=3)
    try:
        got = pat(q, k, v, backend="flex")
    except Exception as exc:  # pragma: no cover - depends on the local C++ toolchain
        if isinstance(exc, ValueError):
            raise
        pytest.skip(f"compiled FlexAttention unavailable here: {type(exc).__name__}")
    want = pat(q, k, v, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.all(got[:, :, 5] == 0)  # an empty row


def test_flex_backward_uses_the_saved_lse():
    """On CUDA the flex backend's backward is the torch path's (FlexAttention's
    autograd cannot run inside a custom op); on CPU without an lse it refuses."""
    from attnc.runtime.flex import FlexBackend
    from attnc.runtime.ops import make_call
    from attnc.runtime.dense import ReferenceBackend

    pat = attnc.loads("pattern p = sliding(4)").pattern()
    q, k, v = (rand(1, 1, 20, 8, seed=s).double() for s in (1, 2, 3))
    call = make_call(pat, q, k, v, {}, None, None, needs_grad=True)
    out, lse = ReferenceBackend().forward(call, q, k, v)
    dout = rand(1, 1, 20, 8, seed=4).double()
    got = FlexBackend().backward(call, q, k, v, out, lse, dout, None)
    want = ReferenceBackend().backward(call, q, k, v, out, lse, dout, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="expected the logsumexp of the forward, got NaN"):
        FlexBackend().backward(call, q, k, v, out, torch.full_like(lse, float("nan")), dout, None)


def test_to_flex_bad_arguments():
    pat = attnc.load(EXAMPLES / "natten2d.attn").pattern(size=3)
    with pytest.raises(ValueError, match=r"expected grid=\(sizes of h, w\)"):
        pat.to_flex(36)
    with pytest.raises(ValueError, match="block: expected"):
        pat.to_flex(36, grid=(6, 6), block=(16, 0))
    packed = attnc.load(EXAMPLES / "packed.attn").pattern()
    with pytest.raises(ValueError, match="missing run-time input 'doc'"):
        packed.to_flex(36)


def test_the_export_is_closed_form_arithmetic_without_gathers_unless_the_pattern_reads_inputs():
    """[Note: mask_mod]: as cheap as a hand-written mask_mod (a few compares), lookups only for inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def ops(pat, **kw):
        mm, _ = pat.to_flex(kw.pop("M", 1024), block=(128, 128), **kw)
        z = torch.zeros(1, 1, dtype=torch.long)
        g = make_fx(mm)(z, z, torch.arange(4)[:, None], torch.arange(4)[None])
        return [str(n.target) for n in g.graph.nodes if n.op == "call_function"]

    window = ops(attnc.loads("pattern p = sliding(512) | (sink(4) & causal)").pattern())
    assert not any("index" in o or "gather" in o for o in window) and len(window) <= 16
    nat = ops(attnc.loads("pattern p on grid(h, w) = neighborhood(7)").pattern(), M=None, grid=(32, 32))
    assert not any("index" in o or "gather" in o for o in nat)
    packed = ops(attnc.loads("pattern p(doc: segments) = causal & same(doc)").pattern(), doc=torch.zeros(1024, dtype=torch.long))
    assert sum("index" in o for o in packed) == 2  # doc[b, q] and doc[b, k]


def test_the_lookup_fallback_is_exact(monkeypatch):
    """Patterns without a pointwise form get the plan lookup; force it and compare everywhere."""
    import attnc.codegen.pointwise as pw
    from attnc.codegen.pointwise import LoweringError

    def no_lowering(*a, **k):
        raise LoweringError([])

    monkeypatch.setattr(pw, "lower", no_lowering)
    pat = attnc.loads("pattern p = sliding(7) | sink(2)").pattern()
    mask_mod, _ = pat.to_flex(45, heads=2, block=(16, 16))
    qq, kk = torch.meshgrid(torch.arange(45), torch.arange(45), indexing="ij")
    assert torch.equal(mask_mod(torch.tensor(0), torch.tensor(1), qq, kk), pat.mask(45, heads=2)[1])
    assert not mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(50), torch.tensor(3))
    assert "state" in mask_mod.__code__.co_freevars  # the lookup, not the closed form


def test_the_flex_backend_reuses_its_export_for_equal_inputs(monkeypatch):
    import attnc.runtime.flex as fx

    built = []
    init = fx.FlexExport.__init__

    def counting(self, *args):
        built.append(1)
        init(self, *args)

    monkeypatch.setattr(fx.FlexExport, "__init__", counting)
    pat = attnc.load(EXAMPLES / "packed.attn").pattern()
    q = torch.randn(1, 2, 256, 16)
    doc = torch.tensor([0] * 100 + [1] * 156)
    with torch.no_grad():
        a = pat(q, q, q, backend="flex", doc=doc)
        b = pat(q, q, q, backend="flex", doc=doc.clone())  # equal values, another tensor: no rebuild
        pat(q, q, q, backend="flex", doc=torch.tensor([0] * 50 + [1] * 206))
        ref = pat(q, q, q, backend="reference", doc=doc)
    assert len(built) == 2
    assert torch.equal(a, b) and torch.allclose(a, ref, atol=1e-5)
