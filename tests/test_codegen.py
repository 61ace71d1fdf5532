"""Generated Triton kernels: golden source, determinism, the interpreter against
the float64 reference (out, lse, dq, dk, dv) for every example and seeded
random patterns, edge cases, backend reasons, the cache and `attnc compile`.

Interpreter tests run with TRITON_INTERPRET=1 on CPU tensors (Triton reads it
when a kernel module is imported, which the backend does on first use per
configuration; the fixture below sets it before that). Sizes stay in the low
hundreds of tokens: the interpreter runs each program in numpy.
"""

import ast
import io
import json
import math
import multiprocessing
import random

import pytest
import torch

import attnc
from attnc.cli import main
from attnc.codegen import cache
from attnc.codegen.kernels import AUTOTUNE_CONFIGS, KernelConfig
from attnc.codegen.pipeline import compile_pattern
from attnc.runtime.backend import Call
from attnc.runtime.dense import dense_attention
from attnc.runtime.triton_backend import TritonBackend
from conftest import EXAMPLES, example_names, example_pattern
from kernel_check import TOL, backend, cache_root, check, make_call, private_cache  # noqa: F401 (fixtures, shared helpers)
from test_pointwise import LEAVES_1D, LEAVES_GRID, random_source

import triton  # noqa: E402,F401  (a core test dependency: conftest stops the run without it)


#: CPU tests of the kernels need the interpreter (conftest sets it without CUDA)
interpreted = pytest.mark.skipif(not cache.interpret_mode(), reason="needs TRITON_INTERPRET=1 (set before triton is imported)")


example = example_pattern


# ----------------------------------------------------------------------------- generated source


GOLDEN_CASES = [
    ("streaming_llm", dict(sinks=4, recent=64), 256, None, 2, None, "codegen_streaming_llm.py"),
    ("bigbird", dict(b=16, r=2), 128, None, 1, None, "codegen_bigbird.py"),
    ("mmdit", dict(r=3, text=8), None, None, 1, (8, 8), "codegen_mmdit.py"),
]


@pytest.mark.parametrize("name,params,M,N,H,grid,golden_name", GOLDEN_CASES)
def test_generated_source_golden(name, params, M, N, H, grid, golden_name, golden):
    pat = example(name, **params)
    M = M or pat.resolve_sizes(1, None, H, grid)[1]
    golden(golden_name, compile_pattern(pat, M, N, heads=H, grid=grid).source)


EVERY_EXAMPLE = [
    ("mistral", dict(window=20), 70, 1, None),
    ("streaming_llm", dict(sinks=3, recent=17), 70, 1, None),
    ("duo", {}, 64, 12, None),
    ("longformer", dict(window=6, globals=3), 70, 1, None),
    ("prefix_lm", dict(n=21), 70, 1, None),
    ("bigbird", dict(b=8, r=2), 70, 1, None),
    ("packed", {}, 70, 1, None),
    ("natten2d", dict(size=3), None, 1, (7, 9)),
    ("dinat", dict(size=3, dilation=2), None, 1, (7, 9)),
    ("gna_strided", dict(size=(2, 3, 3), stride=(2, 2, 3)), None, 1, (3, 4, 6)),
    ("swin_shifted", dict(win=3), None, 1, (7, 9)),
    ("halo", dict(b=3, halo=1), None, 1, (7, 9)),
    ("maxvit_grid", dict(g=3), None, 1, (6, 9)),
    ("cswin", dict(sw=3), None, 4, (7, 9)),
    ("mmdit", dict(r=2, text=6), None, 2, (7, 8)),
    ("axial_row", {}, None, 1, (5, 7)),
    ("axial_col", {}, None, 1, (5, 7)),
    ("biformer", {}, 70, 1, None),
    ("crossformer_sda", dict(g=3), None, 1, (7, 9)),
    ("crossformer_lda", dict(i=3), None, 1, (7, 9)),
    ("gna_blocked", dict(size=(2, 3, 3)), None, 1, (3, 4, 6)),
    ("hilo", dict(s=2), None, 4, (6, 7)),
    ("maxvit_block", dict(p=3), None, 1, (7, 9)),
    ("moa", dict(sinks=3), 70, 4, None),
    ("natten1d", dict(size=5, dilation=2, causal=True), 70, 1, None),
    ("natten3d", dict(size=(2, 3, 3)), None, 1, (3, 4, 6)),
    ("sparse_strided", dict(l=8), 70, 1, None),
    ("sparse_fixed", dict(l=16, c=4), 70, 1, None),
    ("swin", dict(win=3), None, 1, (7, 9)),
    ("video", dict(size=3), None, 1, (3, 4, 6)),
    ("nat_rpb", dict(size=3, dilation=2), None, 2, (7, 9)),
    ("swin_rpb", dict(win=3, shift=1), None, 2, (6, 9)),
    ("alibi", dict(window=9), 70, 4, None),
    ("gemma2_local", dict(window=7, cap=2), 70, 2, None),
    ("alibi_slopes", dict(window=9), 70, 3, None),
]


def test_every_example_has_a_codegen_case():
    names = example_names()
    assert names - {c[0] for c in EVERY_EXAMPLE} == {"nsa_like"}


@pytest.mark.parametrize("name,params,M,H,grid", EVERY_EXAMPLE)
def test_source_parses_and_is_deterministic(name, params, M, H, grid):
    pat = example(name, **params)
    M = M or pat.resolve_sizes(1, None, H, grid)[1]
    a = compile_pattern(pat, M, heads=H, grid=grid, config=KernelConfig(block_m=32, block_n=32))
    b = compile_pattern(example(name, **params), M, heads=H, grid=grid, config=KernelConfig(block_m=32, block_n=32))
    assert a.source == b.source
    tree = ast.parse(a.source)
    kernels = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert {"_mask", "_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"} <= kernels
    assert f"# pattern: {pat.text()}" in a.source
    assert "tl.static_assert" in a.source and "offs_m" in a.source and "m_i" in a.source


# ----------------------------------------------------------------------------- numerics in the interpreter


@interpreted
@pytest.mark.parametrize("name,params,M,H,grid", EVERY_EXAMPLE)
def test_interpreter_matches_reference_for_every_example(name, params, M, H, grid):
    pat = example(name, **params)
    inputs = None
    if name == "packed":
        inputs = {"doc": torch.tensor([[0] * 9 + [1] * 30 + [2] * 31])}
    if name == "biformer":  # 64-token regions: two query blocks, two key blocks
        inputs = {"sel": torch.tensor([[[[0, -1], [1, 0]]]])}
    check(pat, Hq=H, Hkv=1, M=M or pat.resolve_sizes(1, None, H, grid)[1], grid=grid, inputs=inputs)


@interpreted
@pytest.mark.parametrize("seed", range(6))
def test_interpreter_matches_reference_for_random_1d_patterns(seed):
    rng = random.Random(seed)
    src = random_source(rng, LEAVES_1D, depth=3)
    N = rng.randint(20, 80)
    M = rng.choice([N, rng.randint(1, N)])
    check(attnc.loads(f"pattern p = {src}").pattern(), Hq=2, Hkv=rng.choice([1, 2]), M=M, N=N, seed=seed)


@interpreted
@pytest.mark.parametrize("seed", range(3))
def test_interpreter_matches_reference_for_random_grid_patterns(seed):
    rng = random.Random(500 + seed)
    src = random_source(rng, LEAVES_GRID, depth=2)
    grid = (rng.randint(6, 8), rng.randint(6, 8))
    pat = attnc.loads(f"pattern p on grid(h, w) = {src}").pattern()
    check(pat, Hq=2, Hkv=2, M=grid[0] * grid[1], grid=grid, seed=seed)


@interpreted
def test_empty_rows_give_zero_output_minus_inf_lse_and_finite_gradients():
    pat = attnc.loads("pattern p = band(3, 2) & ~rows({4, 9}) - rows(20 .. 40)").pattern()
    call = check(pat, Hq=2, Hkv=2, M=45, N=70, D=20)
    assert not call.mask().any(-1).all()


@interpreted
def test_gqa_and_odd_lengths_and_m_less_than_n():
    pat = example("streaming_llm", sinks=2, recent=11)
    check(pat, B=2, Hq=6, Hkv=2, M=37, N=83, D=16, tiles=(16, 32))


@interpreted
@pytest.mark.parametrize("D,Dv", [(24, 40), (100, 16), (256, 8)])
def test_head_dims_padded_to_powers_of_two(D, Dv):
    check(example("mistral", window=9), Hq=1, Hkv=1, M=33, D=D, Dv=Dv)


@interpreted
def test_per_head_patterns_with_a_per_head_plan():
    pat = attnc.loads("pattern p = heads { 0 => causal; 1 .. 3 => block(16); _ => sliding(5) | sink(2) }").pattern()
    call = check(pat, Hq=4, Hkv=2, M=50, tiles=(16, 16))
    assert call.plan((16, 16)).full.counts.shape[0] == 4


@interpreted
def test_float16():
    check(example("prefix_lm", n=13), Hq=2, Hkv=1, M=50, dtype=torch.float16)


@interpreted
def test_routed_blocks_and_batched_segments():
    sel = torch.tensor([[[[0, -1], [1, 0], [2, -1], [3, 1]]], [[[0, 0], [-1, -1], [0, 2], [3, -1]]]])
    pat = attnc.loads("pattern p(sel: blocks(16)) = causal & routed(sel)").pattern()
    check(pat, B=2, Hq=2, Hkv=2, M=60, inputs={"sel": sel}, tiles=(16, 16))
    doc = torch.tensor([[0] * 20 + [1] * 30, [0] * 45 + [1] * 5])
    check(example("packed"), B=2, Hq=1, Hkv=1, M=50, inputs={"doc": doc}, tiles=(16, 16))


def test_run_time_input_lists_are_built_once_per_input_content():
    """Forward and backward of a step (and repeated packed batches) reuse the tile lists
    built from equal inputs; other values, or an in-place change, rebuild them."""
    from attnc.runtime import triton_backend as tb
    pat = example("packed")
    be = backend((16, 16))
    config = be.call_config(make_call(pat, 1, 1, 1, 50, 50, 16, 16))
    doc = torch.tensor([[0] * 20 + [1] * 30])
    lists = lambda d: be._input_lists(make_call(pat, 1, 1, 1, 50, 50, 16, 16, inputs={"doc": d}), config, "cpu")
    first = lists(doc)
    assert lists(doc.clone()) is first  # equal values in another tensor
    other = lists(torch.tensor([[0] * 40 + [1] * 10]))
    assert other is not first and not torch.equal(other.partial.index, first.partial.index)
    doc[0, 20:30] = 0  # in place: now [0]*30 + [1]*20
    assert lists(doc) is not first
    assert len(tb._INPUT_LISTS) <= tb._INPUT_LISTS.limit()


# ----------------------------------------------------------------------------- backend reasons


@interpreted
def test_backend_declines_with_reasons(monkeypatch):
    be = backend()
    pat = example("mistral", window=8)
    call = make_call(pat, 1, 1, 1, 32, 32, 16, 16)
    q = torch.zeros(1, 1, 32, 16)
    assert be.can_run(call, q) is None
    assert "float64" in be.can_run(call, q.double())
    assert "up to 256" in be.can_run(make_call(pat, 1, 1, 1, 32, 32, 300, 16), torch.zeros(1, 1, 32, 300))
    nsa = example("nsa_like")
    assert "topk" in be.can_run(make_call(nsa, 1, 1, 1, 128, 128, 16, 16), torch.zeros(1, 1, 128, 16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in be.can_run(call, q)


@interpreted
def test_bfloat16_is_declined_by_the_interpreter_and_says_why():
    """Triton 3.9's interpreter multiplies bfloat16 tiles as raw 16-bit integers
    (numpy has no bfloat16), so bf16 runs on GPUs only."""
    be = backend()
    call = make_call(example("mistral", window=8), 1, 1, 1, 32, 32, 16, 16)
    reason = be.can_run(call, torch.zeros(1, 1, 32, 16, dtype=torch.bfloat16))
    assert reason is not None and "bfloat16" in reason and "GPU" in reason


# ----------------------------------------------------------------------------- the cache


def _key(text="pattern p = causal", M=64):
    return cache.cache_key(text, {"M": M}, KernelConfig().key(), "cpu-interpreter")


def test_cache_key_depends_on_everything_that_changes_the_kernel():
    base = _key()
    assert base == _key()
    assert base != _key(text="pattern p = sliding(3)")
    assert base != _key(M=65)
    assert base != cache.cache_key("pattern p = causal", {"M": 64}, KernelConfig(block_m=32).key(), "cpu-interpreter")
    assert base != cache.cache_key("pattern p = causal", {"M": 64}, KernelConfig().key(), "cuda-sm90")


def test_cache_key_follows_the_code_generator(monkeypatch):
    """A changed generator (another checkout sharing ~/.cache/attnc, an edited lowering)
    must not import kernels generated by the old one: the key hashes codegen/*.py."""
    base = _key()
    assert len(cache.codegen_hash()) == 16 and cache.versions()["codegen"] == cache.codegen_hash()
    monkeypatch.setattr(cache, "_CODEGEN_HASH", "0" * 16)
    assert _key() != base


def test_cache_reuses_and_rebuilds_corrupted_entries():
    key = _key(text="pattern cache_test = causal")
    calls = []

    def gen():
        calls.append(1)
        return "X = 1\n"

    path, hit = cache.get_source(key, gen)
    assert not hit and path.read_text() == "X = 1\n" and (path.parent / "meta.json").exists()
    _, hit = cache.get_source(key, gen)
    assert hit and len(calls) == 1
    path.write_text("X = ")  # truncated
    _, hit = cache.get_source(key, gen)
    assert not hit and len(calls) == 2 and path.read_text() == "X = 1\n"
    (path.parent / "meta.json").write_text("{not json")
    _, hit = cache.get_source(key, gen)
    assert not hit and len(calls) == 3
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def _compile_in_process(args):
    cache_dir, M = args
    import os
    os.environ["ATTNC_CACHE_DIR"] = cache_dir
    os.environ["TRITON_INTERPRET"] = "1"
    import attnc
    from attnc.codegen import cache as c
    from attnc.codegen.pipeline import compile_pattern
    pat = attnc.loads("pattern p = sliding(5) | sink(1)").pattern()
    src = compile_pattern(pat, M).source
    key = c.cache_key(pat.text(), {"M": M}, "k", "cpu-interpreter")
    mod = c.load_module(key, lambda: src)
    return key, hasattr(mod, "_attn_fwd")


def test_cache_is_safe_with_concurrent_processes(tmp_path, monkeypatch):
    # spawn, not fork: forking a process that already runs torch / triton threads can
    # deadlock the child on a lock some thread held at the fork (seen here: a hung suite)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.map(_compile_in_process, [(str(tmp_path), 96)] * 6, chunksize=1)
    keys = {k for k, _ in results}
    assert len(keys) == 1 and all(ok for _, ok in results)
    key = keys.pop()
    entry = tmp_path / key[:2] / key
    assert sorted(p.name for p in entry.iterdir()) == ["kernel.py", "meta.json"]
    meta = json.loads((entry / "meta.json").read_text())
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    assert meta["key"] == key and "def _attn_fwd(" in cache.read_entry(key)


def test_backend_reuses_the_cached_module_across_backends(cache_root):
    pat = example("mistral", window=8)
    call = make_call(pat, 1, 1, 1, 48, 48, 16, 16)
    a = TritonBackend(KernelConfig(block_m=16, block_n=16)).kernels(call, "cpu")
    before = {p for p in cache_root.rglob("kernel.py")}
    b = TritonBackend(KernelConfig(block_m=16, block_n=16)).kernels(call, "cpu")
    assert a.key == b.key and a.module is b.module
    assert {p for p in cache_root.rglob("kernel.py")} == before
    assert "sliding(window)" in (cache.entry_dir(a.key) / "kernel.py").read_text()


def test_kernel_config_validates_and_autotune_set_is_small():
    with pytest.raises(ValueError, match="power of two from 16"):
        KernelConfig(block_m=24)
    with pytest.raises(ValueError, match="to 256 tokens, got 512"):
        KernelConfig(block_n=512)
    with pytest.raises(ValueError, match="positive integer"):
        KernelConfig(num_warps=0)
    assert 1 <= len(AUTOTUNE_CONFIGS) <= 8
    assert KernelConfig.parse("128x64w8s3") == KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    for bad in ("128x64", "128x64 w8 s3", "w8s3", 128):
        with pytest.raises(ValueError, match="expected BMxBNwWARPSsSTAGES like 128x64w8s3"):
            KernelConfig.parse(bad)
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig.parse("96x64w4s2")


# ----------------------------------------------------------------------------- attnc compile


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_cli_compile_writes_source_and_plan(tmp_path):
    code, out, err = run_cli("compile", str(EXAMPLES / "natten2d.attn"), "--set", "size=3", "--grid", "8x8",
                             "--tile", "16x32", "-o", str(tmp_path / "k"))
    assert code == 0, err
    src = (tmp_path / "k" / "natten2d_8x8.py").read_text()
    ast.parse(src)
    meta = json.loads((tmp_path / "k" / "natten2d_8x8.json").read_text())
    assert meta["plan"]["block"] == [16, 32] and meta["grid"] == [8, 8]
    pat = example("natten2d", size=3)
    dense = pat.plan(64, grid=(8, 8), block=(16, 32)).to_dense()[0]
    for row, (full, part) in enumerate(zip(meta["plan"]["full"][0], meta["plan"]["partial"][0])):
        assert sorted(full + part) == dense[row].nonzero().flatten().tolist()
    assert "wrote" in out


def test_cli_compile_errors(tmp_path):
    code, _, err = run_cli("compile", str(EXAMPLES / "nsa_like.attn"), "--seq-len", "128", "-o", str(tmp_path))
    assert code == 1 and "nsa_like.attn:" in err and "topk" in err
    code, _, err = run_cli("compile", str(EXAMPLES / "mistral.attn"), "--seq-len", "128", "--tile", "24x16", "-o", str(tmp_path))
    assert code == 2 and "--tile" in err
    code, _, err = run_cli("compile", str(EXAMPLES / "mistral.attn"), "--seq-len", "128")
    assert code == 2 and "-o" in err
    (tmp_path / "file").write_text("")
    code, _, err = run_cli("compile", str(EXAMPLES / "mistral.attn"), "--seq-len", "64", "-o", str(tmp_path / "file"))
    assert code == 1 and "cannot write" in err


def test_cli_compile_run_time_inputs(tmp_path):
    code, out, _ = run_cli("compile", str(EXAMPLES / "packed.attn"), "--seq-len", "100", "-o", str(tmp_path))
    assert code == 0 and "per call" in out
    meta = json.loads((tmp_path / "packed_100.json").read_text())
    assert meta["plan"] is None and meta["tables"][0]["kind"] == "segments"


# ----------------------------------------------------------------------------- GPU


GPU_CASES = [
    ("streaming_llm", dict(sinks=4, recent=100), 1000, 1, None),
    ("duo", {}, 600, 12, None),
    ("bigbird", dict(b=32, r=3), 700, 2, None),
    ("natten2d", dict(size=7), None, 2, (24, 30)),
    ("mmdit", dict(r=4, text=20), None, 2, (16, 20)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,params,M,H,grid", GPU_CASES)
def test_gpu_matches_reference(name, params, M, H, grid, dtype):
    pat = example(name, **params)
    check(pat, B=2, Hq=H, Hkv=1, M=M or pat.resolve_sizes(1, None, H, grid)[1], grid=grid, D=64, dtype=dtype,
          tiles=(64, 64), device="cuda")


@pytest.mark.gpu
def test_gpu_gqa_odd_lengths_head_dims_and_autotune():
    check(example("mistral", window=77), B=1, Hq=8, Hkv=2, M=333, N=517, D=80, Dv=48, tiles=(64, 32), device="cuda")
    pat = example("prefix_lm", n=100)
    call = make_call(pat, 1, 2, 2, 512, 512, 64, 64)
    q, k, v = (torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    be = TritonBackend(autotune=True)
    out, lse = be.forward(call, q, k, v)
    want, _ = dense_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), call.mask()[None], call.scale)
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-2, rtol=1e-2)
    assert len(be._tuned) == 1


@interpreted
def test_topk_through_the_op_on_the_triton_backend_and_empty_selections():
    """topk is lowered to routed(sel): the kernels run it like any block table."""
    pat = attnc.loads("pattern p = causal & (topk(2, block = 16) | sliding(5)) & ~rows({3})").pattern()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = pat(qd, kd, vd, return_lse=True, backend="triton")
    low, tables = pat.route(q, k)
    want, want_lse = low(q, k, v, return_lse=True, backend="reference", **tables)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    assert torch.all(out[:, :, 3] == 0) and torch.all(torch.isneginf(lse[:, :, 3]))  # an empty row: zeros, not NaN
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (qd, kd, vd))
