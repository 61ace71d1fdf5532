"""Every pattern of examples/*.attn through the generated Triton kernels on CUDA:
forward (out, lse) and every gradient (dq, dk, dv, through a random dlse too)
against the float64 reference, in float16 and bfloat16, at sizes where each
kernel compiles once and runs in milliseconds (M a few hundred, grids ~16x20,
B = 2, GQA with one key head, 64x64 tiles, ragged last tiles where M is not a
multiple of 64).

Without CUDA these tests skip (conftest skips the `gpu` marker). To check the
test itself on CPU, ATTNC_GPU_TESTS_ON_CPU=1 runs the same cases in the Triton
interpreter on CPU tensors, float16 only (the interpreter has no bfloat16):

    ATTNC_GPU_TESTS_ON_CPU=1 pytest tests/test_gpu_examples.py

Every case is a pure function of its parameters (fixed seeds, inputs built in
the test), so the module runs under pytest-xdist (`-n 12`) as it does serially.
"""

import math
import os

import pytest
import torch

from attnc.codegen import cache
from conftest import example_names, example_pattern
from kernel_check import cache_root, check, private_cache  # noqa: F401 (fixtures)

import triton  # noqa: E402,F401  (a core test dependency: conftest stops the run without it)

ON_CPU = os.environ.get("ATTNC_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
pytestmark = [] if ON_CPU else [pytest.mark.gpu]

B, HKV, D, TILES = 2, 1, 64, (64, 64)

#: name -> (parameters, M or None for a grid, query heads, grid). Sizes keep every
#: pattern sparse at 64x64 tiles (full, partial and empty tiles all occur).
CASES = {
    "mistral": (dict(window=100), 500, 2, None),
    "streaming_llm": (dict(sinks=4, recent=100), 600, 2, None),
    "duo": ({}, 700, 12, None),  # retrieval heads {0, 5, 9}: needs 10+ heads
    "longformer": (dict(window=40, globals=8), 500, 2, None),
    "prefix_lm": (dict(n=150), 500, 2, None),
    "bigbird": (dict(b=32, r=3), 700, 2, None),
    "packed": ({}, 600, 2, None),
    "natten1d": (dict(size=33, dilation=2, causal=False), 500, 2, None),
    "moa": (dict(sinks=8), 700, 4, None),
    "sparse_strided": (dict(l=32), 500, 2, None),
    "sparse_fixed": (dict(l=64, c=16), 500, 2, None),
    "biformer": ({}, 640, 2, None),
    "nsa_like": (dict(k=2), 700, 2, None),
    "natten2d": (dict(size=7), None, 2, (16, 20)),
    "dinat": (dict(size=5, dilation=2), None, 2, (16, 20)),
    "swin": (dict(win=4), None, 2, (16, 20)),
    "swin_shifted": (dict(win=4), None, 2, (16, 20)),
    "halo": (dict(b=4, halo=1), None, 2, (16, 20)),
    "maxvit_block": (dict(p=4), None, 2, (16, 20)),
    "maxvit_grid": (dict(g=4), None, 2, (16, 20)),
    "cswin": (dict(sw=4), None, 4, (16, 20)),
    "hilo": (dict(s=2), None, 4, (16, 20)),
    "axial_row": ({}, None, 2, (16, 20)),
    "axial_col": ({}, None, 2, (16, 20)),
    "crossformer_sda": (dict(g=4), None, 2, (16, 20)),
    "crossformer_lda": (dict(i=4), None, 2, (16, 20)),
    "mmdit": (dict(r=4, text=20), None, 2, (16, 20)),
    "natten3d": (dict(size=(3, 5, 5)), None, 2, (4, 8, 10)),
    "gna_strided": (dict(size=(3, 6, 6), stride=(2, 4, 4)), None, 2, (4, 8, 10)),
    "gna_blocked": (dict(size=(2, 4, 5)), None, 2, (4, 8, 10)),
    "video": (dict(size=5), None, 2, (4, 8, 10)),
    # score terms (their tables: random, kernel_check.score_tables)
    "nat_rpb": (dict(size=5, dilation=2), None, 2, (16, 20)),
    "swin_rpb": (dict(win=4, shift=2), None, 2, (16, 20)),
    "alibi": (dict(window=200), 500, 2, None),
    "gemma2_local": (dict(window=150, cap=5), 500, 2, None),
    "alibi_slopes": (dict(window=200), 500, 3, None),
}


def run_time_inputs(name: str, M: int, H: int) -> dict:
    """The run-time inputs of the patterns that have them (fixed seeds)."""
    g = torch.Generator().manual_seed(1)
    if name == "packed":  # two batch elements with different documents
        docs = []
        for _ in range(B):
            lengths = torch.randint(20, 200, (M,), generator=g)
            docs.append(torch.repeat_interleave(torch.arange(M), lengths)[:M])
        return {"doc": torch.stack(docs)}
    if name == "biformer":  # blocks(64): per query block 3 of the key blocks, one slot padded with -1
        nq = nk = math.ceil(M / 64)
        sel = torch.rand(B, H, nq, nk, generator=g).topk(3, dim=-1).indices.to(torch.int32)
        sel[..., -1, -1] = -1
        return {"sel": sel}
    return {}


def test_every_example_has_a_case():
    assert set(CASES) == example_names()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_matches_reference(name, dtype):
    if ON_CPU:
        if not cache.interpret_mode():
            pytest.skip("ATTNC_GPU_TESTS_ON_CPU=1 needs TRITON_INTERPRET=1 (conftest sets it without CUDA)")
        if dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter has no bfloat16")
    params, M, H, grid = CASES[name]
    pat = example_pattern(name, **params)
    M = M or pat.resolve_sizes(1, None, H, grid)[1]
    check(pat, B=B, Hq=H, Hkv=HKV, M=M, grid=grid, D=D, inputs=run_time_inputs(name, M, H), dtype=dtype,
          tiles=TILES, device=DEVICE)
