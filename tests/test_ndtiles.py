"""N-D tiles with token permutation on grids (codegen/ndtiles.py, ndtiles.permute):
the permuted mask against the reference, the padded layout against the N-D plan's
tile-major order, the kernels in the interpreter against the float64 reference
(out, lse, dq, dk, dv), the visited tiles, backend reasons and `attnc compile`.
"""

import ast
import json
import math
import random

import pytest
import torch

import attnc
from attnc.codegen.kernels import KernelConfig
from attnc.codegen.pipeline import compile_pattern
from attnc.codegen.expr import Builder, Const, Op, Var, nodes, to_text
from attnc.codegen.ndtiles import TileLayout, permute, tile_major_position
from attnc.codegen.pointwise import lower
from attnc.codegen.triton_text import TritonPrinter
from attnc.runtime.triton_backend import TritonBackend
from conftest import EXAMPLES, example_pattern
from test_codegen import backend, cache_root, check, interpreted, make_call, private_cache, run_cli  # noqa: F401
from test_pointwise import LEAVES_GRID, random_source


def grid_pattern(body: str, axes="h, w", **params):
    return attnc.loads(f"pattern p on grid({axes}) = {body}").pattern(**params)


def padded_mask(pat, grid, tq, tk, H=1):
    """The reference mask rearranged into the padded tile-major order (False on padding)."""
    lay = TileLayout(grid, tq, tk)
    L = math.prod(grid)
    m = pat.mask(L, heads=H, grid=grid)
    out = torch.zeros(m.shape[0], lay.M, lay.N, dtype=torch.bool)
    out[:, lay.positions("q")[:, None], lay.positions("k")[None, :]] = m
    return out


def permuted_eval(pat, grid, tq, tk, H=1):
    L = math.prod(grid)
    low = permute(lower(pat.ir, L, L, H, grid), tq, tk)
    fn = low.evaluator()
    return fn(torch.arange(low.M)[None, :, None], torch.arange(low.N)[None, None, :], torch.arange(H)[:, None, None]), low


# ----------------------------------------------------------------------------- the permuted mask


PERMUTE_CASES = [
    ("neighborhood((3, 5), dilation = (1, 2), causal = (true, false))", "h, w", (10, 14), (4, 4), (8, 4)),
    ("where (q.h - k.h) ** 2 + (q.w - k.w) ** 2 < 9", "h, w", (12, 12), (4, 4), (4, 4)),
    ("dilate(2, neighborhood(2)) | causal", "h, w", (6, 5), (4, 4), (2, 8)),
    ("block((2, 3)) | sink(3)", "h, w", (7, 9), (4, 4), (4, 8)),
    ("neighborhood((3, 3, 5), causal = (true, false, false))", "t, h, w", (3, 6, 7), (1, 4, 4), (2, 4, 4)),
    ("heads { 0 => neighborhood(3); _ => sliding(2) @ w }", "h, w", (9, 9), (4, 4), (4, 4)),
]


@pytest.mark.parametrize("body,axes,grid,tq,tk", PERMUTE_CASES)
def test_permuted_mask_is_the_reference_in_tile_major_order(body, axes, grid, tq, tk):
    pat = grid_pattern(body, axes)
    got, low = permuted_eval(pat, grid, tq, tk, H=2)
    assert (low.M, low.N) == (TileLayout(grid, tq, tk).M, TileLayout(grid, tq, tk).N)
    assert low.tiles == (tq, tk)
    assert torch.equal(got, padded_mask(pat, grid, tq, tk, H=2).expand_as(got))
    ast.parse(TritonPrinter(low).source())


@pytest.mark.parametrize("seed", range(12))
def test_permuted_mask_of_random_grid_patterns(seed):
    rng = random.Random(seed)
    pat = attnc.loads(f"pattern p on grid(h, w) = {random_source(rng, LEAVES_GRID, depth=2)}").pattern()
    grid = (rng.randint(5, 11), rng.randint(5, 11))
    tq = rng.choice([(4, 4), (2, 8), (8, 2)])
    tk = rng.choice([(4, 4), (4, 8), (8, 4), (1, 16)])
    got, _ = permuted_eval(pat, grid, tq, tk, H=2)
    assert torch.equal(got, padded_mask(pat, grid, tq, tk, H=2).expand_as(got)), (pat.ir, grid, tq, tk)


def test_builder_folds_the_unravel_of_a_ravel():
    b = Builder({"x": (0, 20), "y": (0, 11), "z": (0, 12)})
    x, y, z = Var("x"), Var("y"), Var("z")
    flat = b.add(b.mul(x, b.c(12)), y)
    assert b.floordiv(flat, b.c(12)) == x and b.mod(flat, b.c(12)) == y
    assert b.floordiv(b.add(b.mul(x, b.c(24)), y), b.c(12)) == b.mul(x, b.c(2))
    # z may reach 12: (12 x + z) // 12 is not x
    assert b.floordiv(b.add(b.mul(x, b.c(12)), z), b.c(12)).op == "floordiv"
    assert b.mod(b.add(b.mul(x, b.c(8)), y), b.c(12)).op == "mod"


def test_padded_positions_fold_away_when_tiles_divide_the_grid():
    b = Builder({"q": (0, 143)})
    flat, valid = tile_major_position(b, Var("q"), [12, 12], (4, 4))
    assert valid == Const(True)  # no padding: no validity term and no clamp
    assert not any(isinstance(n, Op) and n.op == "min" for n in nodes(flat))
    b = Builder({"q": (0, 191)})
    flat, valid = tile_major_position(b, Var("q"), [10, 12], (4, 4))
    assert to_text(valid) == "q // 16 // 3 * 4 + q % 16 // 4 < 10"  # only the padded axis is checked
    assert sum(isinstance(n, Op) and n.op == "min" for n in nodes(flat)) == 1


def test_permute_rejects_what_it_cannot_permute():
    low = lower(attnc.loads("pattern p = causal").pattern().ir, 16, 16, 1)
    with pytest.raises(ValueError, match="pure grid"):
        permute(low, (4, 4), (4, 4))
    low = lower(grid_pattern("causal").ir, 16, 16, 1, (4, 4))
    with pytest.raises(ValueError, match="one per grid axis"):
        permute(low, (16,), (4, 4))


# ----------------------------------------------------------------------------- layout and plan


@pytest.mark.parametrize("grid,tq,tk", [((10, 14), (4, 4), (8, 4)), ((12, 12), (4, 4), (4, 4)),
                                        ((5, 7, 9), (1, 4, 4), (2, 2, 4)), ((3, 33), (1, 16), (2, 16))])
def test_layout_numbers_tiles_like_the_plan(grid, tq, tk):
    pat = grid_pattern("neighborhood(3)", "h, w" if len(grid) == 2 else "t, h, w")
    L = math.prod(grid)
    plan = pat.plan(L, grid=grid, block=(tq, tk))
    lay = TileLayout(grid, tq, tk)
    lay.check(plan)  # raises if tile t of the plan is not positions t * BLOCK .. of the layout
    for side, perm in (("q", plan.perm_q), ("k", plan.perm_k)):
        order = lay.order(side)
        assert torch.equal(order[order >= 0], perm)
        assert torch.equal(order[lay.positions(side)], torch.arange(L))
    assert lay.M % lay.block[0] == 0 and lay.M // lay.block[0] == plan.shape[0]
    assert lay.N // lay.block[1] == plan.shape[1]


def test_kernel_plan_demotes_exactly_the_full_tiles_with_padding():
    pat = grid_pattern("neighborhood(7) | causal")
    grid, tq, tk = (10, 14), (4, 4), (8, 4)
    plan = pat.plan(140, grid=grid, block=(tq, tk))
    lay = TileLayout(grid, tq, tk)
    kp = lay.kernel_plan(plan)
    a, b = plan.to_dense()[0], kp.to_dense()[0]
    assert torch.equal(a > 0, b > 0)  # the same tiles are visited
    whole_q = (plan.offsets_q[1:] - plan.offsets_q[:-1]) == 16
    whole_k = (plan.offsets_k[1:] - plan.offsets_k[:-1]) == 32
    whole = whole_q[:, None] & whole_k[None, :]
    assert torch.equal(b == 2, (a == 2) & whole)
    assert int(((a == 2) & ~whole).sum()) > 0 and int((b == 2).sum()) > 0  # the case demotes some, keeps some
    # full tiles of the kernel plan are all-allowed in the padded order; the others are not
    m = padded_mask(pat, grid, tq, tk)[0].view(lay.M // 16, 16, lay.N // 32, 32)
    all_allowed = m.all(3).all(1)
    assert torch.equal(b == 2, all_allowed)


def test_kernel_config_tile():
    c = KernelConfig(tile=[[8, 8], [8, 4]])
    assert c.tile == ((8, 8), (8, 4)) and c.block == (64, 32) and "tile=8x8/8x4" in c.key()
    assert KernelConfig(tile=((4, 4), (4, 4)), block_m=16, block_n=16).block == (16, 16)
    assert KernelConfig().key() == KernelConfig(block_m=64).key() and "tile" not in KernelConfig().key()
    for bad, match in [(((3, 5), (4, 4)), "3x5 = 15 tokens"), (((4, 4), (4, 4, 1)), "same axes"),
                       ("8x8", "expected \\(\\(query tile shape\\)"), (((4, 0), (4, 4)), "positive sizes"),
                       (((2, 4), (4, 4)), "power of two >= 16")]:
        with pytest.raises(ValueError, match=match):
            KernelConfig(tile=bad)
    with pytest.raises(ValueError, match="block_m / block_n follow the N-D tile"):
        KernelConfig(tile=((4, 4), (4, 4)), block_m=32)


# ----------------------------------------------------------------------------- the kernels (interpreter)


RUN_CASES = [
    # (pattern body, axes, grid, tiles, B, Hq, Hkv)
    ("neighborhood((3, 5), dilation = (1, 2), causal = (true, false))", "h, w", (10, 14), ((4, 4), (8, 4)), 1, 2, 1),
    ("neighborhood(5, causal = (false, true))", "h, w", (12, 12), ((4, 4), (4, 4)), 1, 4, 2),  # GQA
    ("where (q.h - k.h) ** 2 + (q.w - k.w) ** 2 < 10", "h, w", (12, 12), ((4, 4), (4, 8)), 2, 1, 1),
    ("neighborhood(7) | causal", "h, w", (10, 14), ((4, 4), (8, 4)), 1, 1, 1),  # full tiles, some demoted
    ("neighborhood(3) & where q.h < 5", "h, w", (9, 10), ((4, 4), (4, 4)), 1, 2, 1),  # empty rows
    ("heads { 0 => neighborhood(3); _ => block((4, 2)) }", "h, w", (8, 12), ((4, 4), (4, 4)), 1, 2, 1),
    ("neighborhood((3, 3, 3), causal = (true, false, false))", "t, h, w", (3, 6, 7), ((1, 4, 4), (2, 4, 4)), 1, 2, 1),
]


@interpreted
@pytest.mark.parametrize("body,axes,grid,tiles,B,Hq,Hkv", RUN_CASES)
def test_nd_tiles_match_the_reference(body, axes, grid, tiles, B, Hq, Hkv):
    pat = grid_pattern(body, axes)
    check(pat, B=B, Hq=Hq, Hkv=Hkv, M=math.prod(grid), grid=grid, tiles=tiles, D=16, Dv=24)


@interpreted
def test_nd_tiles_fp16_and_example():
    check(example_pattern("natten2d", size=5), M=120, grid=(10, 12), tiles=((4, 4), (4, 4)), dtype=torch.float16)


def _visited(lists) -> int:
    return int(lists.full.counts.sum() + lists.partial.counts.sum())


@interpreted
def test_visited_tiles_are_the_nd_plans_nonempty_tiles():
    """What the kernels walk is the N-D plan's non-empty tiles; for a 2-D neighborhood on a grid wider
    than a 1-D tile that is far fewer tiles than the 1-D plan's at the same BLOCK_M x BLOCK_N."""
    pat = grid_pattern("neighborhood(5)")
    counts = {}
    for grid, tq in (((12, 48), (4, 4)), ((16, 64), (4, 4))):
        L = math.prod(grid)
        call = make_call(pat, 1, 1, 1, L, L, 16, 16, grid)
        nd = backend((tq, tq)).kernels(call, "cpu")
        one = backend((16, 16)).kernels(call, "cpu")
        plan = pat.plan(L, grid=grid, block=(tq, tq))
        c = plan.counts()
        assert _visited(nd.lists) == c["tiles_full"] + c["tiles_partial"]
        # the transposed lists (dK/dV) visit the same tiles
        assert int(nd.lists.full_t.counts.sum() + nd.lists.partial_t.counts.sum()) == _visited(nd.lists)
        counts[grid] = (_visited(one.lists), _visited(nd.lists))
        assert counts[grid][1] < 0.6 * counts[grid][0], counts
    assert counts == {(12, 48): (420, 238), (16, 64): (800, 460)}, counts
    # and the kernels agree with the reference at the first size
    check(pat, M=576, grid=(12, 48), tiles=((4, 4), (4, 4)), Hq=1)


@interpreted
def test_op_block_argument_runs_n_d_tiles_under_autograd():
    """`pat(q, k, v, block=((4, 4), (8, 4)))` reaches the Triton backend; autograd goes through its
    backward (permuting dout in, gradients out) and matches the float64 reference."""
    pat = grid_pattern("neighborhood(3, dilation = 2) | (causal & neighborhood(5))")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 140, 16, generator=g) for _ in range(3))
    dout, dlse = torch.randn(1, 2, 140, 16, generator=g), torch.randn(1, 2, 140, generator=g)
    grads = {}
    for backend, dtype, block in (("triton", torch.float32, ((4, 4), (8, 4))), ("reference", torch.float64, None)):
        xs = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out, lse = pat(*xs, backend=backend, grid=(10, 14), block=block, return_lse=True)
        ((out * dout.to(dtype)).sum() + (lse * dlse.to(dtype)).sum()).backward()
        grads[backend] = [out, lse] + [x.grad for x in xs]
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


def test_op_block_argument_errors():
    pat = grid_pattern("neighborhood(3)")
    q = torch.zeros(1, 1, 64, 16)
    with pytest.raises(ValueError, match="expected the kernels' tiles as two positive integers"):
        pat(q, q, q, grid=(8, 8), block=((4, 4), (8,)))
    with pytest.raises(ValueError, match="3x4 = 12 tokens"):
        pat(q, q, q, grid=(8, 8), block=((3, 4), (4, 4)), backend="triton")
    with pytest.raises(ValueError, match="pure grid, got one on seq"):
        attnc.loads("pattern p = causal").pattern()(q, q, q, block=((4, 4), (4, 4)), backend="triton")
    with pytest.raises(ValueError, match="power of two from 16"):
        pat(q, q, q, grid=(8, 8), block=(24, 16), backend="triton")
    with pytest.raises(ValueError, match="to 256 tokens"):  # not a 4 TiB allocation
        pat(q, q, q, grid=(8, 8), block=(2**40, 16), backend="triton")
    with pytest.raises(ValueError, match="try block=\\(64, 64\\)"):
        pat(q, q, q, grid=(8, 8), block=(16,))
    import numpy as np  # numpy integers are integers
    assert pat(q, q, q, grid=(8, 8), block=(np.int64(16), np.int64(16)), backend="triton").shape == (1, 1, 64, 16)
    # other backends choose their own tiles: the torch path runs with any block
    assert pat(q, q, q, grid=(8, 8), block=((4, 4), (4, 4)), backend="torch").shape == (1, 1, 64, 16)


# ----------------------------------------------------------------------------- reasons and the CLI


def test_backend_declines_n_d_tiles_it_cannot_run():
    be = TritonBackend(KernelConfig(tile=((4, 4), (4, 4))))
    q = torch.zeros(1, 1, 8, 16)
    cases = [
        (attnc.loads("pattern p = causal").pattern(), 64, None, "pure grid, got one on seq"),
        (example_pattern("mmdit", r=2, text=4), None, (4, 4), "pure grid, got one on seq\\(text\\) \\+ grid"),
        (grid_pattern("neighborhood(3)", "t, h, w"), None, (2, 4, 4), "2 positive sizes|3 positive sizes"),
        (attnc.loads("pattern p(doc: segments) on grid(h, w) = neighborhood(3) & same(doc)").pattern(), None, (4, 4),
         "run-time inputs \\(doc\\)"),
    ]
    for pat, M, grid, match in cases:
        M = M or pat.resolve_sizes(1, None, 1, grid)[1]
        call = make_call(pat, 1, 1, 1, M, None, 16, 16, grid)
        reason = be.can_run(call, q)
        assert reason is not None and __import__("re").search(match, reason), reason


def test_cli_compile_n_d_tiles(tmp_path):
    code, out, err = run_cli("compile", str(EXAMPLES / "natten2d.attn"), "--set", "size=3", "--grid", "10x14",
                             "--tile", "4x4/8x4", "-o", str(tmp_path))
    assert code == 0, err
    src = (tmp_path / "natten2d_10x14.py").read_text()
    ast.parse(src)
    head = src.split("import triton")[0]
    assert "# plan:    4x4/8x4 tiles = 16/32 tokens" in head
    assert "tile-major order padded to 12x16 / 16x16" in head and "BLOCK_M = 16, BLOCK_N = 32" in head
    assert "M=192 queries, N=256 keys" in head and "tile=4x4/8x4" in head
    meta = json.loads((tmp_path / "natten2d_10x14.json").read_text())
    lay = TileLayout((10, 14), (4, 4), (8, 4))
    perm = meta["permutation"]
    assert perm["M_padded"] == 192 and perm["order_q"] == lay.order("q").tolist()
    assert meta["plan"]["tile_shape"] == [[4, 4], [8, 4]] and meta["plan"]["block"] == [16, 32]
    kp = lay.kernel_plan(example_pattern("natten2d", size=3).plan(140, grid=(10, 14), block=((4, 4), (8, 4))))
    dense = kp.to_dense()[0]
    for row, (full, part) in enumerate(zip(meta["plan"]["full"][0], meta["plan"]["partial"][0])):
        assert sorted(full + part) == dense[row].nonzero().flatten().tolist()
    # the same module as compile_pattern with KernelConfig(tile=...)
    c = compile_pattern(example_pattern("natten2d", size=3), 140, grid=(10, 14), config=KernelConfig(tile=((4, 4), (8, 4))))
    assert c.source == src
    for bad, match in (("3x4/8x4", "12 tokens"), ("4x4/4x4x1", "same axes")):
        code, _, err = run_cli("compile", str(EXAMPLES / "natten2d.attn"), "--grid", "10x14", "--tile", bad, "-o", str(tmp_path))
        assert code == 2 and match in err, err
    code, _, err = run_cli("compile", str(EXAMPLES / "mmdit.attn"), "--grid", "8x8", "--tile", "4x4/4x4", "-o", str(tmp_path))
    assert code == 2 and "pure grid" in err


def test_n_d_mask_golden(golden):
    pat = example_pattern("natten2d", size=3)
    c = compile_pattern(pat, 140, grid=(10, 14), config=KernelConfig(tile=((4, 4), (8, 4))))
    lines = c.source.split("import triton")[0].splitlines()
    plan = lines.index(next(line for line in lines if line.startswith("# plan:")))
    head = lines[plan: plan + 5]  # plan and permutation
    golden("ndtiles_natten2d_mask.py", "\n".join(head) + "\n\n" + TritonPrinter(c.lowered).source())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nd_tiles_on_gpu(dtype):
    """The same check on CUDA (skipped without a device): a grid that is not a tile multiple, GQA."""
    check(example_pattern("natten2d", size=7), B=2, Hq=4, Hkv=2, M=720, grid=(24, 30), tiles=((8, 8), (8, 8)),
          D=64, dtype=dtype, device="cuda")
    check(grid_pattern("neighborhood((3, 5), dilation = (1, 2), causal = (true, false))"), M=720, grid=(24, 30),
          tiles=((16, 8), (8, 8)), D=40, dtype=dtype, device="cuda")
