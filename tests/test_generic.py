"""Length-generic kernels (issue 16): M, N and the grid axis lengths are run-time
kernel arguments, one generated text (one module, one compilation per kernel)
serves every size of a size class, and the numbers stay the float64 reference's.

[Note: one text, many sizes] in codegen/sizes.py says why this is sound; the
size classes of every example are pinned here, so a change that makes the text
depend on a size again fails a test instead of silently compiling per length.
"""

import ast
import io
import json
import os

import pytest
import torch

import attnc
from attnc.cli import main
from attnc import aot
from attnc.codegen import cache, sizes
from attnc.codegen.generic import size_classes
from attnc.codegen.kernels import KernelConfig
from attnc.codegen.pipeline import compile_pattern
from attnc.lru import LRU, caches, set_limit
from attnc.runtime import triton_backend
from conftest import EXAMPLES, example_pattern
from kernel_check import backend, cache_root, check, make_call, private_cache  # noqa: F401 (fixtures)
from test_codegen import EVERY_EXAMPLE

import triton  # noqa: F401  (a core test dependency)

interpreted = pytest.mark.skipif(not cache.interpret_mode(), reason="needs TRITON_INTERPRET=1 (set before triton is imported)")
TILES = (32, 32)
CONFIG = KernelConfig(block_m=32, block_n=32)

#: examples whose text changes at some probed small size, with the reason (every other one
#: is one text at every size test_codegen's cases and the probes below use)
SIZE_DEPENDENT = {
    "bigbird": "random(r) draws per length; the blockwise band folds for fewer than 4 blocks",
    "biformer": "routed block tables: the word index k // 64 // 32 folds to 0 while N <= 2048",
    "moa": "per-head windows of N // 8 ... and the plan's closed form holds at some lengths only",
    "dinat": "dilation 2: the residue groups' lengths follow the parity of each axis",
    "nat_rpb": "dilation 2 (as dinat): the residue groups' lengths follow the parity of each axis",
    "gna_strided": "strided neighborhoods on axes of 3 to 8 tokens: windows clip differently per axis length",
    "gna_blocked": "blocked neighborhoods on axes of 3 to 8 tokens: windows clip differently per axis length",
}


def _sizes_for(name, M, grid):
    """Call sizes of one example that share one text: three lengths that are not tile
    multiples (M = N), or three grid shapes. (M != N is its own class: the texts of
    windowed patterns then hold N - M where the plan is clipped; `_OFFSET`.)"""
    if grid is None:
        return [dict(M=M + 3, N=M + 3), dict(M=M + 29, N=M + 29), dict(M=M + 61, N=M + 61)]
    grow = [tuple(g + 1 for g in grid), tuple(g + (2 if i == len(grid) - 1 else 0) for i, g in enumerate(grid))]
    return [dict(grid=grid)] + [dict(grid=g) for g in grow]


def _inputs(name, M, N):
    if name == "packed":  # three documents over the N keys
        return {"doc": (torch.arange(N) * 3 // N)[None]}
    if name == "biformer":  # 64-token regions: every query block keeps key block 0 and its own
        nqb, nkb = -(-M // 64), -(-N // 64)
        own = [min(i + (nkb - nqb), nkb - 1) for i in range(nqb)]
        return {"sel": torch.tensor([[[[0, o] for o in own]]])}
    return None


# ----------------------------------------------------------------------------- the text


def test_size_tags_print_expressions_of_the_size_arguments_and_check_them():
    M, N, grid = sizes.tag(3001, 4000, (16, 24))
    env = sizes.size_env(3001, 4000, (16, 24))
    assert sizes.text(N - M + 1028, env) == "N - M + 1028"
    assert sizes.text(-(-N // 64), env) == "(N + 63) // 64"  # the cdiv idiom stays floor-safe
    assert sizes.text(grid[1] * grid[0] - 7, env) == "G1 * G0 - 7"
    assert sizes.text((N - M) // 2, env) == "499"  # a floor division of a difference: Triton truncates, so a literal
    assert sizes.text(N, {"M": 3001, "N": 5}) == "4000"  # an expression that does not hold at these sizes: the literal
    assert sizes.Sym.size("G0", 16) != sizes.Sym.size("G1", 16)  # equal values, different constants
    assert sizes.Sym.size("G0", 16) == 16 and hash(sizes.Sym.size("G0", 16)) == hash(16)


@pytest.mark.parametrize("name,params,M,H,grid", EVERY_EXAMPLE)
def test_one_text_serves_every_size_of_an_example(name, params, M, H, grid):
    pat = example_pattern(name, **params)
    M = M or None
    texts = {}
    for size in _sizes_for(name, M, grid):
        c = compile_pattern(pat, size.get("M"), size.get("N"), heads=H, grid=size.get("grid"), config=CONFIG)
        texts.setdefault(c.source, []).append(size)
        for line in c.source.splitlines():
            assert not line.startswith("# sizes:   M="), "a generic module names concrete sizes"
    if name in SIZE_DEPENDENT:
        return
    assert len(texts) == 1, f"{name}: {len(texts)} texts for {list(texts.values())}"


def test_generic_text_parses_and_takes_sizes_as_run_time_arguments():
    c = compile_pattern(example_pattern("natten2d", size=3), None, grid=(9, 11), config=CONFIG)
    tree = ast.parse(c.source)
    kernels = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        args = {a.arg: a.annotation for a in kernels[name].args.args}
        assert args["M"] is None and args["N"] is None and args["G0"] is None and args["G1"] is None  # not constexpr
        deco = ast.unparse(kernels[name].decorator_list[0])
        assert "do_not_specialize" in deco and "'M'" in deco and "'G1'" in deco
    assert "9" not in c.source.split("def _mask")[1].split("@triton.jit")[0]  # the mask reads G1, not 11 / 9


@pytest.mark.parametrize("pattern,expected", [
    ("pattern p(w = 2000) = sliding(w) | sink(4)", 2),  # lengths <= w: the window covers every key
    ("pattern p = causal", 1),
    ("pattern p on grid(h, w) = neighborhood((3, 5))", 1),
])
def test_size_classes_group_the_probed_sizes(pattern, expected):
    pat = attnc.loads(pattern).pattern()
    classes, skipped = size_classes(pat, CONFIG)
    assert len(classes) == expected and not skipped
    probed = sum(len(c.sizes) for c in classes)
    assert probed >= 10
    if expected == 2:
        assert max(classes[1].sizes) < min(classes[0].sizes)  # the short lengths are their own class


# ----------------------------------------------------------------------------- numerics across sizes


@interpreted
@pytest.mark.parametrize("name,params,M,H,grid", EVERY_EXAMPLE)
def test_one_kernel_set_across_sizes_matches_the_reference(name, params, M, H, grid):
    """fwd + dq, dk, dv against float64 at three sizes (not tile multiples, M != N, grid
    shapes); the examples outside SIZE_DEPENDENT run one module for all three."""
    pat = example_pattern(name, **params)
    be = backend(TILES)
    keys = set()
    for size in _sizes_for(name, M, grid):
        g = size.get("grid")
        if g is None:
            m, n = size["M"], size["N"]
        else:
            m = n = pat.resolve_sizes(1, None, H, g)[1]
        call = make_call(pat, 1, H, 1, m, n, 16, 16, g)
        inputs = _inputs(name, call.M, call.N)
        check(pat, Hq=H, Hkv=1, M=call.M, N=call.N, grid=size.get("grid"), inputs=inputs, tiles=TILES)
        if not pat.has_topk():
            keys.add(be.kernels(make_call(pat, 1, H, 1, call.M, call.N, 16, 16, size.get("grid"), inputs), "cpu").key)
    if name not in SIZE_DEPENDENT and not pat.has_topk():
        assert len(keys) == 1, f"{name}: {len(keys)} modules over three sizes"
    if grid is None:  # queries at the end of a longer key sequence (M != N)
        check(pat, Hq=H, Hkv=1, M=M + 7, N=M + 40, inputs=_inputs(name, M + 7, M + 40), tiles=TILES)


@interpreted
def test_ten_lengths_import_one_module():
    """The interpreter's stand-in for compilations: one module import for ten lengths."""
    pat = attnc.loads("pattern p(w = 37) = sliding(w) | sink(3)").pattern()
    be = backend(TILES)
    before = cache.IMPORTS["count"]
    keys = set()
    for n in (61, 64, 77, 100, 128, 131, 150, 199, 200, 257):
        q = torch.randn(1, 1, n, 16)
        call = make_call(pat, 1, 1, 1, n, n, 16, 16)
        out, _ = be.forward(call, q, q, q)
        assert torch.isfinite(out).all()
        keys.add(be.kernels(call, "cpu").key)
    assert len(keys) == 1 and cache.IMPORTS["count"] - before == 1


def test_ten_lengths_compile_each_gpu_kernel_once():
    """Real compilations for sm_90 (no GPU needed: attnc/aot.py's stand-in driver), counted
    as distinct binaries Triton returns: closed-form loops and tile lists, 10 lengths each."""
    jobs = [aot.Job(file=str(EXAMPLES / "mistral.attn"), params=(("window", 512),), M=n, D=64)
            for n in (600, 1000, 1333, 2048, 3001, 4096, 5000, 8191, 12345, 16384)]
    jobs += [aot.Job(file=str(EXAMPLES / "packed.attn"), M=n, D=64)
             for n in (600, 1000, 1333, 2048, 3001, 4096, 5000, 8191, 12345, 16384)]
    got = aot.compile_counts(jobs)
    assert got["modules"] == 2  # one per pattern
    assert got["kernels"] == {"_attn_bwd_dkdv": 2, "_attn_bwd_dq": 2, "_attn_bwd_preprocess": 2, "_attn_fwd": 2}


def _binaries(fn) -> int:
    """Compiled binaries a Triton JITFunction holds (every device)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in getattr(fn, "cache", {}).values())


#: ATTNC_GPU_TESTS_ON_CPU=1 runs the @gpu case below in the interpreter (numbers and the
#: module count; no binaries to count), as tests/test_gpu_examples.py does
ON_CPU = os.environ.get("ATTNC_GPU_TESTS_ON_CPU") == "1"


#: the kernels the runtime launches (the module's other @triton.jit functions are inlined helpers)
LAUNCHED = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dq", "_attn_bwd_dkdv")


@(interpreted if ON_CPU else pytest.mark.gpu)
@pytest.mark.parametrize("name,params", [("mistral", dict(window=100)), ("packed", {}), ("natten2d", dict(size=7))])
def test_lengths_on_a_gpu_compile_each_kernel_once_and_match_the_reference(name, params):
    """On CUDA: fwd + every gradient in float16 against float64 at six sizes (ragged,
    tile multiples, grid shapes), and each kernel of the shared module compiled once."""
    pat = example_pattern(name, **params)
    device = "cpu" if ON_CPU else "cuda"
    sizes = ([dict(grid=(16, 20 + i)) for i in (0, 1, 3, 4, 7, 12)] if name == "natten2d" else
             [dict(M=n) for n in (300, 448, 513, 640, 777, 1000)])
    modules = set()
    for size in sizes:
        grid = size.get("grid")
        m = size.get("M") or pat.resolve_sizes(1, None, 2, grid)[1]
        call = check(pat, B=2, Hq=2, Hkv=1, M=m, D=64, grid=grid, inputs=_inputs(name, m, m),
                     dtype=torch.float16, tiles=(64, 64), device=device)
        modules.add(backend((64, 64)).kernels(call, device).module)
    assert len(modules) == 1, f"{name}: {len(modules)} modules over {len(sizes)} sizes"
    if ON_CPU:
        return
    module = modules.pop()
    counts = {k: _binaries(getattr(module, k)) for k in LAUNCHED}
    assert counts == dict.fromkeys(LAUNCHED, 1), counts


def test_move_column_keeps_rows_ascending_and_tiles_whole():
    from attnc.plans import TileList

    g = torch.Generator().manual_seed(3)
    flags = torch.rand(2, 6, 7, generator=g) < 0.4
    part = (torch.rand(2, 6, 7, generator=g) < 0.4) & ~flags
    full, partial = TileList.from_dense(flags).move_column(TileList.from_dense(part), 6)
    moved = flags & (torch.arange(7) == 6)
    for got, want in ((full, flags & ~moved), (partial, part | moved)):
        assert torch.equal(got.index, TileList.from_dense(want).index)
    same = TileList.from_dense(flags).move_column(TileList.from_dense(part), 99)  # no such column: unchanged
    assert torch.equal(same[0].index, TileList.from_dense(flags).index)


@pytest.mark.parametrize("M,ragged", [(700, True), (704, False)])
def test_a_ragged_last_key_tile_is_a_partial_tile_of_the_forward(M, ragged):
    """The full loops have no bounds check: the tile lists the kernels read never hold the
    ragged last key tile as full, and hold every tile of the plan exactly once."""
    pat = example_pattern("bigbird", b=32, r=3)
    plan = pat.plan(M, M, heads=2, block=(64, 64))
    lists = triton_backend.TileLists.from_plan(plan, "cpu")
    last = M // 64
    assert not bool((lists.full.cols == last).any()) or not ragged
    assert bool((lists.partial.cols == last).any()) == ragged
    for got, (f, p) in (((lists.full, lists.partial), (plan.full, plan.partial)),
                        ((lists.full_t, lists.partial_t), (plan.full_t, plan.partial_t))):
        assert int(got[0].counts.sum() + got[1].counts.sum()) == int(f.counts.sum() + p.counts.sum())
    assert torch.equal(lists.full_t.index, plan.full_t.index)  # ragged rows stay full in dK/dV


# ----------------------------------------------------------------------------- torch.compile with dynamic shapes


def test_torch_compile_dynamic_does_not_recompile_per_length():
    from torch._dynamo.testing import CompileCounterWithBackend

    pat = attnc.loads("pattern p(w = 32) = sliding(w) | sink(2)").pattern()

    def f(q, k, v):
        return pat(q, k, v, backend="torch").sum()

    counter = CompileCounterWithBackend("aot_eager")
    g = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for n in (100, 130, 257, 64, 300):
        q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
        got = g(q, k, v)
        got.backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        want = f(q, k, v)
        want.backward()
        torch.testing.assert_close(got, want)
        for a, t in zip(grads, (q, k, v)):
            torch.testing.assert_close(a, t.grad)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- bounded caches


def test_lru_is_bounded_and_its_limit_can_be_set(monkeypatch):
    c = LRU("test_generic_cache", 3, "a test cache")
    for i in range(5):
        assert c.get(i, lambda i=i: i * i) == i * i
    assert len(c) == 3 and 0 not in c and 4 in c
    assert c.get(4, lambda: -1) == 16 and c.hits == 1
    monkeypatch.setenv("ATTNC_CACHE_TEST_GENERIC_CACHE", "1")
    c.get(9, lambda: 81)
    assert len(c) == 1
    set_limit("test_generic_cache", 2)
    c.get(10, lambda: 100)
    assert len(c) == 2
    set_limit("test_generic_cache", 0)
    assert len(c) == 0
    with pytest.raises(ValueError, match="expected a number of entries"):
        set_limit("test_generic_cache", -1)
    with pytest.raises(ValueError, match="no cache named"):
        set_limit("no_such_cache", 3)
    set_limit("test_generic_cache", None)
    import attnc.runtime.torch_backend  # noqa: F401  (its caches exist once it is imported)
    names = {i["name"] for i in caches()}
    assert {"modules", "kernel_sets", "schedules", "input_schedules", "input_lists"} <= names
    monkeypatch.setenv("ATTNC_CACHE_TEST_GENERIC_CACHE", "many")
    with pytest.raises(ValueError, match=r"ATTNC_CACHE_TEST_GENERIC_CACHE: expected a number"):
        c.limit()
    monkeypatch.delenv("ATTNC_CACHE_TEST_GENERIC_CACHE")


def test_memoized_functions_are_bounded_caches_users_can_size():
    from attnc.lru import caches, memoize, set_limit
    calls = []

    @memoize("test_memoized", 2, "a test cache")
    def square(x):
        calls.append(x)
        return x * x
    assert [square(i) for i in (1, 2, 1, 3, 1, 2)] == [1, 4, 1, 9, 1, 4]
    assert calls == [1, 2, 3, 2]  # 2 was evicted (least recently used) when 3 came
    set_limit("test_memoized", 0)
    square(1), square(1)
    assert calls[-2:] == [1, 1]  # a limit of 0 keeps nothing
    set_limit("test_memoized", None)
    import attnc.codegen.score, attnc.runtime.torch_backend, attnc.symbolic  # noqa: F401,E401
    names = {i["name"] for i in caches()}
    assert {"formulas", "reads_sizes", "score_terms", "tile_positions", "device_schedules"} <= names


@interpreted
def test_kernel_sets_are_evicted_past_their_limit():
    pat = attnc.loads("pattern p = causal").pattern()
    be = backend(TILES)
    set_limit("kernel_sets", 2)
    try:
        for n in (40, 50, 60, 70):
            be.kernels(make_call(pat, 1, 1, 1, n, n, 16, 16), "cpu")
        assert len(triton_backend._KERNEL_SETS) == 2
    finally:
        set_limit("kernel_sets", None)


# ----------------------------------------------------------------------------- attnc compile without sizes


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_compile_without_sizes_writes_one_file_per_size_class(tmp_path):
    code, out, err = run_cli("compile", str(EXAMPLES / "streaming_llm.attn"), "-o", str(tmp_path))
    assert code == 0, err
    assert "2 size classes" in out and "streaming_llm_class1.py: 256, 1000, 1024" in out
    meta = json.loads((tmp_path / "streaming_llm.json").read_text())
    assert meta["generic"] and meta["size_arguments"] == ["M", "N"]
    assert [c["file"] for c in meta["classes"]] == ["streaming_llm.py", "streaming_llm_class1.py"]
    src = (tmp_path / "streaming_llm.py").read_text()
    ast.parse(src)
    assert "run-time arguments M (queries), N (keys)" in src and "N - M + 1028" in src
    code, out, err = run_cli("compile", str(EXAMPLES / "swin.attn"), "-o", str(tmp_path / "swin"))
    assert code == 0 and "1 size class over the probed grids" in out
    assert "G0, G1 (grid axes)" in (tmp_path / "swin" / "swin.py").read_text()


def test_cli_compile_without_sizes_rejects_nd_tiles(tmp_path):
    code, _, err = run_cli("compile", str(EXAMPLES / "swin.attn"), "--tile", "8x8/8x8", "-o", str(tmp_path))
    assert code == 2 and "specialised to a grid; add --grid" in err


@interpreted
def test_disk_cache_info_prune_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "kc"))
    pat = attnc.loads("pattern p(w = 21) = sliding(w)").pattern()
    be = backend(TILES)
    for n in (50, 90):  # one text: one entry
        be.forward(make_call(pat, 1, 1, 1, n, n, 16, 16), *(torch.randn(1, 1, n, 16) for _ in range(3)))
    assert len(cache.entries()) == 1
    code, out, _ = run_cli("cache", "info")
    assert code == 0 and "1 kernel modules" in out and "kernel_sets" in out and "at most 1024 MiB" in out
    code, out, _ = run_cli("cache", "clear")  # the entry, and the imported module with it
    assert code == 0 and "removed 1 cached kernel module " in out and cache.entries() == []
    be.forward(make_call(pat, 1, 1, 1, 70, 70, 16, 16), *(torch.randn(1, 1, 70, 16) for _ in range(3)))
    assert len(cache.entries()) == 1  # generated again
    assert cache.prune(limit=0) == 1 and cache.entries() == []
    monkeypatch.setenv("ATTNC_CACHE_MAX_MB", "lots")
    code, _, err = run_cli("cache", "info")
    assert code == 2 and "ATTNC_CACHE_MAX_MB: expected a size in MiB" in err
    assert attnc.set_cache_limit is set_limit
