"""The kernels' numerical check, shared by the Triton test modules (test_codegen,
test_ndtiles, test_bounds, test_gpu_examples): forward (out, lse) and backward
(dq, dk, dv, with a random dlse) of `TritonBackend` against the float64 dense
reference, on CPU in the interpreter or on CUDA.

State is per process (a kernel-set memo per tile shape, a per-session cache
directory), so it is safe under pytest-xdist: every worker has its own.
"""

import math

import pytest
import torch

from attnc.codegen.kernels import KernelConfig
from attnc.runtime.backend import Call
from attnc.runtime.dense import dense_attention
from attnc.runtime.triton_backend import TritonBackend


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("attnc-cache")


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, cache_root):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(cache_root))


def make_call(pat, B, Hq, Hkv, M, N, D, Dv, grid=None, inputs=None, tables=None):
    M, N, H, grid = pat.resolve_sizes(M, N, Hq, grid)
    return Call(pattern=pat, B=B, Hq=Hq, Hkv=Hkv, M=M, N=N, D=D, Dv=Dv, grid=grid, scale=1 / math.sqrt(D),
                inputs=inputs or {}, tables=tables or {})


def score_tables(pat, M, N, H, grid, device="cpu", seed=5) -> dict:
    """Random tables for a pattern's score term (float32, on `device`): {} without one."""
    g = torch.Generator().manual_seed(seed)
    M, N, H, grid = pat.resolve_sizes(M, N, H, grid)
    return {n: torch.randn(shape, generator=g).to(device) for n, shape in pat.table_shapes(M, N, H, grid).items()}


_BACKENDS: dict = {}


def backend(tiles=(32, 32)) -> TritonBackend:
    """One backend per tile shape for the whole session (its kernel sets are memoised);
    ((query tile shape), (key tile shape)) means N-D tiles."""
    if tiles not in _BACKENDS:
        nd = isinstance(tiles[0], tuple)
        _BACKENDS[tiles] = TritonBackend(KernelConfig(tile=tiles) if nd else KernelConfig(block_m=tiles[0], block_n=tiles[1]))
    return _BACKENDS[tiles]


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


def check(pat, B=1, Hq=2, Hkv=1, M=40, N=None, D=16, Dv=None, grid=None, inputs=None, dtype=torch.float32,
          tiles=(32, 32), device="cpu", seed=0):
    """Forward and backward through TritonBackend against the float64 reference.

    A pattern with `topk` is routed first (`pat.route` on these q / k): the kernels
    run the lowered pattern with the chosen block tables, the reference its mask."""
    Dv = Dv or D
    tables = score_tables(pat, M, N, Hq, grid, device)
    call = make_call(pat, B, Hq, Hkv, M, N, D, Dv, grid, inputs, tables)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, call.M, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, call.N, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, call.N, Dv, generator=g).to(device, dtype)
    routed, tables = pat.route(q, k, grid=call.grid, **call.inputs)
    if routed is not pat:  # tables on the CPU, like the other inputs: the backend moves what it needs
        call = make_call(routed, B, Hq, Hkv, M, N, D, Dv, grid, {n: t.cpu() for n, t in tables.items()}, call.tables)
    be = backend(tiles)
    assert be.can_run(call, q) is None
    out, lse = be.forward(call, q, k, v)
    mask = call.mask()
    mask = mask[None] if mask.dim() == 3 else mask
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    td = {n: t.detach().cpu().double().requires_grad_() for n, t in call.tables.items()}
    score = None
    if call.score is not None:  # the score term's own torch form (the kernels print it separately)
        rows, keys = torch.arange(call.M).view(1, 1, -1, 1), torch.arange(call.N).view(1, 1, 1, -1)
        heads = torch.arange(call.Hq).view(1, -1, 1, 1)
        score = lambda s: call.score(s, rows, keys, heads, td)  # noqa: E731
    want_out, want_lse = dense_attention(qd, kd, vd, mask, call.scale, score)
    empty = torch.isneginf(want_lse)
    dout = torch.randn(out.shape, generator=g).to(device, dtype)
    dlse = torch.randn(lse.shape, generator=g).masked_fill(empty, 0.0).to(device)
    dq, dk, dv, *dtables = be.backward(call, q, k, v, out, lse, dout, dlse)
    (want_out * dout.cpu().double()).sum().add((want_lse.masked_fill(empty, 0) * dlse.cpu().double()).sum()).backward()
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse.cpu()), empty), "rows without keys must have lse -inf exactly"
    assert torch.all(out.cpu()[empty] == 0)
    torch.testing.assert_close(out.cpu().double(), want_out.detach(), **tol)
    torch.testing.assert_close(lse.cpu().double().masked_fill(empty, 0), want_lse.detach().masked_fill(empty, 0), **tol)
    for name, got, want in (("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        torch.testing.assert_close(got.cpu().double(), want, **tol, msg=lambda m, name=name: f"{name}: {m}")
    for name, t in td.items():  # the tables' gradients (float32 atomics): relative to their size
        got = dtables[0][name].cpu().double()
        assert got.shape == t.shape and torch.isfinite(got).all(), name
        torch.testing.assert_close(got, t.grad, atol=tol["atol"] * max(1.0, float(t.grad.abs().max())), rtol=tol["rtol"],
                                   msg=lambda m, name=name: f"d{name}: {m}")
    return call
