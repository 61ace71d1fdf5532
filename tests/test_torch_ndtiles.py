"""N-D tiles in the torch path ([Note: N-D tiles here] in runtime/tile_choice.py): q, k, v
gathered into the padded tile-major order of compact grid boxes, chosen by a cost model
or asked for with `block=`; every output and gradient equal to the reference."""

import pytest
import torch

import attnc
from attnc.runtime import schedules as sc
from attnc.runtime import tile_choice
from attnc.runtime.ops import make_call, probe_call

CASES = [
    # source, grid, heads, kv heads, tiles (None: the automatic choice)
    ("pattern p on grid(h, w) = neighborhood(7)", (19, 23), 4, 2, ((8, 8), (4, 4))),
    ("pattern p on grid(h, w) = neighborhood(5, dilation = 2)", (17, 20), 2, 2, ((8, 8), (8, 8))),
    ("pattern p on grid(t, h, w) = neighborhood((3, 5, 5))", (5, 9, 11), 2, 1, ((2, 4, 8), (1, 4, 4))),
    ("pattern p on grid(h, w) = neighborhood(8, stride = 8)", (24, 24), 2, 2, None),
    ("pattern p on grid(h, w) = heads { {0} => neighborhood(3); _ => neighborhood(7) | cols(0 .. 3) }", (18, 21), 3, 3,
     ((8, 8), (4, 4))),
]


def _grads(pat, grid, q, k, v, backend, block):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    kw = {"block": block} if block is not None and backend == "torch" else {}
    out, lse = pat(*leaves, grid=grid, backend=backend, return_lse=True, **kw)
    g = torch.Generator().manual_seed(3)
    (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum().add_(
        (lse * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()).backward()
    return [out.detach(), lse.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("src,grid,H,Hkv,block", CASES)
def test_n_d_tiles_match_the_reference(src, grid, H, Hkv, block):
    pat = attnc.loads(src).pattern()
    N = 1
    for g in grid:
        N *= g
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, H, N, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, Hkv, N, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    call = make_call(pat, q, k, v, {}, grid, 1.0, block=block)
    assert isinstance(tile_choice.choose_tile(call)[0], tuple)  # N-D tiles ran
    (sched,) = [s for _, s in sc.schedules(call)]
    assert sched.layout is not None
    got = _grads(pat, grid, q, k, v, "torch", block)
    want = _grads(pat, grid, q, k, v, "reference", None)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), name


def _choice(src, grid=None, N=None, H=8):
    pat = attnc.loads(src).pattern()
    if grid:
        N = 1
        for g in grid:
            N *= g
    return tile_choice.choose_tile(probe_call(pat, N, N, H, grid))


def test_the_cost_model_chooses_n_d_tiles_where_they_save_work():
    # a 7x7 neighbourhood on 64x64 and 96x96, blocked attention, a 3-D neighbourhood
    assert _choice("pattern p on grid(h, w) = neighborhood(7)", (64, 64)) == ((8, 8), (4, 4))
    assert _choice("pattern p on grid(h, w) = neighborhood(7)", (96, 96)) == ((8, 8), (4, 4))
    assert _choice("pattern p on grid(h, w) = neighborhood(8, stride = 8)", (64, 64)) == ((8, 8), (8, 8))
    assert _choice("pattern p on grid(t, h, w) = neighborhood((3, 7, 7))", (8, 32, 32)) == ((2, 4, 8), (1, 4, 4))
    # 1-D tiles: sequences, small grids, patterns with inputs or score terms, an axis-aligned band
    assert _choice("pattern p = sliding(512)", N=8192) == (64, 64)
    assert _choice("pattern p on grid(h, w) = neighborhood(7)", (10, 12)) == (64, 64)
    assert _choice("pattern p on grid(h, w) = full", (64, 64)) == (64, 64)
    rpb = "pattern p(r: table(13, 13)) on grid(h, w) = neighborhood(7) score score + r[k.h - q.h + 6, k.w - q.w + 6]"
    assert _choice(rpb, (64, 64)) == (64, 64)


def test_context_parallelism_keeps_one_d_tiles_on_a_grid():
    pat = attnc.loads("pattern p on grid(h, w) = neighborhood(7)").pattern()
    call = probe_call(pat, 4096, 4096, 8, (64, 64))
    assert isinstance(tile_choice.choose_tile(call)[0], tuple)
    assert all(s.layout is None for _, s in sc.schedules(call, nd=False))


def test_simulate_shows_the_torch_paths_tile_choice_and_the_alternatives():
    from test_cli import run

    from conftest import EXAMPLES

    code, out, err = run("simulate", EXAMPLES / "natten2d.attn", "--grid", "96x96", "--heads", 8)
    assert code == 0, err
    line = [ln for ln in out.splitlines() if ln.startswith("cpu torch path")]
    assert len(line) == 1 and "tiles 8x8/4x4" in line[0] and "64x64 1.90x" in line[0]
    code, out, err = run("simulate", EXAMPLES / "streaming_llm.attn", "--seq-len", 8192)
    assert code == 0 and "cpu torch path" not in out
