"""The pipeline (codegen/pipeline.py, issue 15): the passes in order, each pass's output
feeding the next, one sequencing of the kernel passes for `attnc compile`,
`compile_pattern`, the size classes and the Triton backend (the same text for the
same shape), sizes resolved once, and a bad shape refused once, before any pass.
"""

import ast
from dataclasses import replace
import io
import sys

import pytest
import torch

import attnc
from attnc.cli import main
from attnc.codegen import cache, decode_kernel, kernels, pipeline
from attnc.codegen.generic import size_classes
from attnc.codegen.kernels import KernelConfig
from attnc.codegen.pipeline import DECODE_PASSES, GIVEN, PASSES, Shape, compile_kernels, compile_pattern
from attnc.program import BoundPattern
from attnc.runtime.triton_backend import TritonBackend
from conftest import EXAMPLES, ROOT, example_pattern
from kernel_check import make_call

interpreted = pytest.mark.skipif(not cache.interpret_mode(), reason="needs TRITON_INTERPRET=1 (set before triton is imported)")

TEXT = "pattern local(w = 16) = sliding(w) | (sink(4) & causal)"


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path_factory):
    """Generated modules go to a cache folder of this test's own."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path_factory.mktemp("attnc-cache")))


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- the pass list


def test_passes_are_listed_in_order_and_each_feeds_a_later_one():
    assert [p.name for p in PASSES] == ["parse", "elaborate", "lower", "plan", "bounds", "kernels", "cache"]
    known = set(GIVEN)
    for p in PASSES:
        missing = set(p.reads) - known
        assert not missing, f"pass {p.name} reads {missing}: neither given nor made by an earlier pass"
        known.add(p.gives)
    for i, p in enumerate(PASSES[:-1]):
        assert any(p.gives in q.reads for q in PASSES[i + 1:]), f"nothing after {p.name} reads its {p.gives}"
    # every pass function is the pipeline's own, named after its pass
    for p in PASSES:
        assert p.run is getattr(pipeline, p.name) and (ROOT / p.where).exists()


def test_decoding_runs_the_same_passes_with_its_own_kernel():
    assert [p.name for p in DECODE_PASSES] == ["parse", "elaborate", "lower", "decode", "cache"]
    known = set(GIVEN)
    for i, p in enumerate(DECODE_PASSES):
        assert set(p.reads) <= known, p.name
        known.add(p.gives)
        assert i == len(DECODE_PASSES) - 1 or any(p.gives in q.reads for q in DECODE_PASSES[i + 1:]), p.name
        assert p.run is getattr(pipeline, p.name)


def test_every_module_says_what_it_reads_gives_and_does_not_do():
    files = {p.where for p in PASSES} | {str(f.relative_to(ROOT)) for d in ("attnc", "codegen", "runtime")
                                         for f in (ROOT / d).glob("*.py") if f.name != "__init__.py"}
    assert "codegen/pipeline.py" in files and "attnc/semantics.py" in files and "runtime/ops.py" in files
    for rel in sorted(files):
        doc = ast.get_docstring(ast.parse((ROOT / rel).read_text())) or ""
        for field in ("input:", "output:", "does not:"):
            assert f"\n{field}" in doc, f"{rel}: the module docstring has no '{field}' line"


def test_front_end_passes_feed_the_kernel_passes():
    tree = pipeline.parse(TEXT)
    pir = pipeline.elaborate(tree, "local", {"w": 8}, sources={"<string>": TEXT})
    pat = attnc.loads(TEXT).pattern("local", w=8)
    assert pir == pat.ir and pir.name == "local"
    shape = Shape.resolve(pat, 100)
    assert compile_kernels(pir, shape).source == compile_pattern(pat, 100).source
    with pytest.raises(attnc.AttnError, match="one text without imports"):
        pipeline.elaborate(pipeline.parse('import "x.attn"\n' + TEXT))
    with pytest.raises(attnc.AttnError, match="no pattern named 'loc'"):
        pipeline.elaborate(tree, "loc")


@interpreted
def test_compile_kernels_runs_the_passes_in_order_on_each_others_outputs(monkeypatch):
    pat = attnc.loads(TEXT).pattern()
    shape = Shape.resolve(pat, 100, heads=2, config=KernelConfig(block_m=32, block_n=32))
    seen = []

    def spy(name):
        real = getattr(pipeline, name)

        def run(*args):
            out = real(*args)
            seen.append((name, args, out))
            return out
        monkeypatch.setattr(pipeline, name, run)

    for name in ("lower", "plan", "bounds", "kernels", "cache"):
        spy(name)
    got = compile_kernels(pat.ir, shape, sources=pat.program.sources, device="cpu-interpreter")
    assert [s[0] for s in seen] == ["lower", "plan", "bounds", "kernels", "cache"]
    out = {name: result for name, _, result in seen}
    args = {name: a for name, a, _ in seen}
    assert args["lower"][:2] == args["plan"][:2] == (pat.ir, shape)
    assert args["bounds"] == (pat.ir, shape, out["plan"])
    assert args["kernels"][2:5] == (out["lower"], out["plan"], out["bounds"])
    assert args["cache"] == (out["kernels"], "cpu-interpreter")
    assert got is out["cache"] and got.module is not None and got.key and got.shape is shape
    assert (got.lowered, got.plan, got.bounds) == (out["lower"], out["plan"], out["bounds"])


# ----------------------------------------------------------------------------- one orchestrator


@pytest.fixture
def generated(monkeypatch):
    """Every text kernels.generate makes, with the function that called it."""
    made = []
    real = kernels.generate

    def generate(*args, **kwargs):
        caller = sys._getframe(1)
        source = real(*args, **kwargs)
        made.append((caller.f_code.co_filename, caller.f_code.co_name, source))
        return source
    monkeypatch.setattr(kernels, "generate", generate)
    return made


def _only_from_the_pipeline(made):
    assert made
    for filename, function, _ in made:
        assert filename == pipeline.__file__ and function == "kernels", f"kernels.generate called from {filename}:{function}"


@interpreted
@pytest.mark.parametrize("case", ["1-D", "grid", "N-D tiles", "run-time inputs", "score term"])
def test_attnc_compile_and_the_triton_backend_generate_the_same_text_through_the_pipeline(case, generated, tmp_path):
    name, params, args, config, H, M, grid, inputs = {
        "1-D": ("streaming_llm", {}, ["--seq-len", "200", "--tile", "32x64"], KernelConfig(block_m=32, block_n=64),
                1, 200, None, {}),
        "grid": ("natten2d", {"size": 3}, ["--grid", "10x14", "--heads", "2"], KernelConfig(), 2, None, (10, 14), {}),
        "N-D tiles": ("natten2d", {"size": 3}, ["--grid", "10x14", "--tile", "4x4/8x4"], KernelConfig(tile=((4, 4), (8, 4))),
                      1, None, (10, 14), {}),
        "run-time inputs": ("packed", {}, ["--seq-len", "96"], KernelConfig(), 1, 96, None,
                            {"doc": torch.tensor([[0] * 40 + [1] * 56])}),
        "score term": ("alibi_slopes", {"window": 24}, ["--seq-len", "96", "--heads", "4"], KernelConfig(), 4, 96, None, {}),
    }[case]
    pat = example_pattern(name, **params)
    sets = [a for k, v in params.items() for a in ("--set", f"{k}={v}")]
    code, _, err = run_cli("compile", str(pat.program.root), "-p", name, *sets, *args, "-o", str(tmp_path))
    assert code == 0, err
    written = next(tmp_path.glob("*.py")).read_text()
    assert len(generated) == 1 and generated[0][2] == written
    tables = {n: torch.zeros(s) for n, s in pat.table_shapes(M or 140, M or 140, H, grid).items()}
    call = make_call(pat, 1, H, 1, M, None, 16, 16, grid, inputs, tables)
    TritonBackend(config).kernels(call, "cpu")
    assert len(generated) == 2 and generated[1][2] == written
    assert compile_pattern(pat, M, heads=H, grid=grid, config=config,
                           input_shapes=TritonBackend._code_shapes(call)).source == written
    _only_from_the_pipeline(generated)


@interpreted
def test_decoding_generates_through_the_pipeline(monkeypatch, generated):
    made = []
    real = decode_kernel.decode_source

    def decode_source(*args):
        caller = sys._getframe(1)
        made.append((caller.f_code.co_filename, caller.f_code.co_name))
        return real(*args)
    monkeypatch.setattr(decode_kernel, "decode_source", decode_source)
    pat = attnc.loads(TEXT).pattern()
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g)
    got = pat.decode(q, k, v, cache_seqlens=torch.tensor([64, 40]), backend="triton")
    torch.testing.assert_close(got, pat.decode(q, k, v, cache_seqlens=torch.tensor([64, 40]), backend="torch"),
                               atol=1e-4, rtol=1e-4)
    assert made and all(f == pipeline.__file__ and fn == "decode" for f, fn in made) and not generated


def test_size_classes_generate_through_the_pipeline(generated):
    classes, _ = size_classes(example_pattern("mistral", window=64), KernelConfig(), probes=[40, 100, 300])
    assert sum(len(c.sizes) for c in classes) == 3 and len(generated) == 3
    _only_from_the_pipeline(generated)


def test_kernels_module_no_longer_sequences_passes():
    """kernels.py prints what the passes give; it lowers, plans and bounds nothing itself."""
    tree = ast.parse((ROOT / "codegen" / "kernels.py").read_text())
    called = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call)
              and isinstance(n.func, (ast.Name, ast.Attribute))}
    assert not called & {"lower", "loop_bounds", "plan", "plan_blocks", "resolve_sizes", "load_module"}
    assert not hasattr(kernels, "compile_pattern") and not hasattr(kernels, "compile_nd")


@pytest.fixture
def planned_and_lowered(monkeypatch):
    """(function that called analysis.plan_blocks or pointwise.lower, its file) for every call."""
    from attnc import analysis
    from attnc.codegen import pointwise

    callers = []
    for module, name in ((analysis, "plan_blocks"), (pointwise, "lower")):
        real = getattr(module, name)

        def spy(*args, real=real, **kwargs):
            caller = sys._getframe(1).f_code
            callers.append((caller.co_filename, caller.co_name))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    return callers


@pytest.mark.parametrize("case", ["1-D", "grid, N-D tiles", "run-time inputs", "flex export", "pat.plan"])
def test_the_torch_path_and_the_flex_export_plan_and_lower_through_the_pipeline(case, planned_and_lowered):
    g = torch.Generator().manual_seed(0)

    def qkv(H, L):
        return [torch.randn(1, H, L, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    if case == "1-D":
        pat = attnc.loads(TEXT).pattern()
        pat(*qkv(2, 100), backend="torch")
    elif case == "grid, N-D tiles":
        pat = example_pattern("natten2d", size=3)
        pat(*qkv(1, 256), grid=(16, 16), backend="torch", block=((4, 4), (4, 4)))
    elif case == "run-time inputs":
        pat = example_pattern("packed")
        pat(*qkv(1, 96), backend="torch", doc=torch.tensor([[0] * 40 + [1] * 56]))
    elif case == "flex export":
        example_pattern("packed").to_flex(96, block=(32, 32), doc=torch.tensor([0] * 40 + [1] * 56))
        attnc.loads(TEXT).pattern().to_flex(100, heads=2, block=(32, 32))
    else:
        attnc.loads(TEXT).pattern().plan(1000, block=(64, 32))
        example_pattern("natten2d", size=3).plan(None, grid=(16, 16), block=((4, 4), (8, 8)))
    assert planned_and_lowered, "nothing was planned or lowered"
    for filename, function in planned_and_lowered:
        assert (filename, function) in {(pipeline.__file__, "plan"), (pipeline.__file__, "lower")}, (
            f"planned or lowered outside the pipeline's passes: {filename}:{function}")


def test_the_runtime_and_the_api_do_not_call_the_planner_or_the_lowering_directly():
    """Only codegen/pipeline.py runs the plan and lower passes for the runtime and the API."""
    for path in [*(ROOT / "runtime").glob("*.py"), ROOT / "attnc" / "program.py", ROOT / "attnc" / "cli.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {a.name for a in node.names}
                assert not ("plan_blocks" in names and node.module.endswith("analysis")), f"{path.name}: imports plan_blocks"
                assert not ("lower" in names and node.module.endswith("pointwise")), f"{path.name}: imports pointwise.lower"
            if isinstance(node, ast.Attribute) and node.attr == "plan_blocks":
                raise AssertionError(f"{path.name}:{node.lineno}: calls plan_blocks outside the pipeline")


# ----------------------------------------------------------------------------- sizes resolved once


@pytest.fixture
def resolutions(monkeypatch):
    """How often BoundPattern.resolve_sizes runs."""
    count = {"n": 0}
    real = BoundPattern.resolve_sizes

    def resolve_sizes(self, *args):
        count["n"] += 1
        return real(self, *args)
    monkeypatch.setattr(BoundPattern, "resolve_sizes", resolve_sizes)
    return count


@pytest.fixture
def no_passes(monkeypatch):
    """The kernel passes fail the test if they run."""
    for name in ("lower", "plan", "bounds", "kernels", "cache"):
        monkeypatch.setattr(pipeline, name, lambda *a, name=name: pytest.fail(f"pass {name} ran on a bad shape"))


def test_sizes_are_resolved_once_on_the_way_to_a_kernel(resolutions, tmp_path):
    pat = example_pattern("natten2d", size=3)
    compile_pattern(pat, None, grid=(10, 14), config=KernelConfig(tile=((4, 4), (8, 4))))
    assert resolutions["n"] == 1
    resolutions["n"] = 0
    code, _, err = run_cli("compile", str(EXAMPLES / "natten2d.attn"), "--set", "size=3", "--grid", "10x14",
                           "--tile", "4x4/8x4", "-o", str(tmp_path))
    assert code == 0 and resolutions["n"] == 1, err


@interpreted
def test_the_op_resolves_sizes_once_and_the_backend_builds_one_shape(resolutions, monkeypatch):
    pat = attnc.loads(TEXT).pattern()
    shapes = []
    real = Shape.of.__func__

    def of(cls, *args, **kwargs):
        shape = real(cls, *args, **kwargs)
        shapes.append(shape)
        return shape
    monkeypatch.setattr(Shape, "of", classmethod(of))
    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    pat(q, k, v, backend="triton")
    assert resolutions["n"] == 1
    # the call's shape (make_call's Call.shape), then the kernels': that value with their config
    first, *kernel_shapes = shapes
    assert kernel_shapes and all(s == replace(first, config=s.config) == kernel_shapes[0] for s in kernel_shapes)
    assert (shapes[0].M, shapes[0].N, shapes[0].H, shapes[0].grid) == (48, 48, 2, None)


def test_a_bad_shape_fails_once_before_any_pass(resolutions, no_passes):
    grid_pat = example_pattern("natten2d", size=3)
    with pytest.raises(ValueError, match=r"N: expected 10 \* 14 = 140 tokens for grid=\(10, 14\), got N=150") as exc:
        compile_pattern(grid_pat, None, 150, grid=(10, 14))
    assert resolutions["n"] == 1 and "\n" not in str(exc.value)
    seq_pat = attnc.loads(TEXT).pattern()
    with pytest.raises(ValueError, match="N-D tiles need a pattern on a pure grid, got one on seq"):
        compile_pattern(seq_pat, 64, config=KernelConfig(tile=((4, 4), (4, 4))))
    with pytest.raises(ValueError, match="expected M = N"):
        Shape.of(grid_pat.ir, 100, 140, 1, (10, 14), KernelConfig(tile=((4, 4), (4, 4))))
    packed = example_pattern("packed")
    with pytest.raises(ValueError, match="has run-time inputs"):
        compile_pattern(packed, 64, config=KernelConfig(tile=((4, 4), (4, 4))))


def test_a_bad_shape_is_one_message_in_attnc_compile_and_one_reason_in_the_backend(no_passes, tmp_path):
    code, out, err = run_cli("compile", str(EXAMPLES / "mistral.attn"), "--seq-len", "256", "--tile", "4x4/4x4",
                             "-o", str(tmp_path))
    assert code == 2 and not out and err.count("error") == 1 and "pure grid" in err, err
    pat = example_pattern("mistral")
    call = make_call(pat, 1, 1, 1, 256, 256, 16, 16)
    be = TritonBackend(KernelConfig(tile=((4, 4), (4, 4))))
    reason = be.can_run(call, torch.empty(1, 1, 256, 16))
    assert reason and reason in err
    with pytest.raises(ValueError, match="pure grid"):
        be.kernels(call, "cpu")


def test_a_calls_plan_is_pat_plan_and_its_kernel_plan_is_in_the_padded_order():
    from attnc.runtime.ops import probe_call

    pat = example_pattern("natten2d", size=3)
    call = probe_call(pat, 130, 130, 1, (10, 13))
    block = ((4, 4), (4, 4))
    want = pat.plan(None, grid=(10, 13), block=block)
    got = call.plan(block)
    for name in ("full", "partial", "full_t", "partial_t"):
        assert torch.equal(getattr(got, name).index, getattr(want, name).index)
    padded = call.kernel_plan(block)
    layout = Shape.of(pat.ir, 130, 130, 1, (10, 13)).with_tiles(pat.ir, block).layout()
    assert torch.equal(padded.full.index, layout.kernel_plan(want).full.index)
    assert call.kernel_plan((32, 32)).allowed == call.plan((32, 32)).allowed == want.allowed
