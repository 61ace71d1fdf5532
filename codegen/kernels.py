"""Kernel generation: a lowered pattern and its plan -> one Triton module.

input:  a `Lowered` mask (pointwise.py), the tile plan it runs with
        (plans.Plan; only its shape and method go into the text) and a
        `KernelConfig`.
output: Python source of a module with `_mask`, the forward kernel and the
        three backward kernels (preprocess, dK/dV, dQ), formatted like
        Triton's fused-attention tutorial; deterministic for equal inputs.
does not: lower, plan or bound loops (it prints what those passes give: the
        pipeline, pipeline.py, runs them), launch anything
        (runtime/triton_backend.py does) or cache (cache.py).

[Note: the two loops] Every kernel walks the plan's tile lists twice through
one inner function: once over the *full* tiles with `MASKED=False` (no mask
arithmetic and no branch at all), once over the *partial* tiles with
`MASKED=True`, where `_mask` is evaluated on the tile's (q, k) indices. A ragged
last key tile (N not a multiple of BLOCK_N; N is a run-time value) is always a
partial tile of the forward and dQ loops: closed-form ranges end their full
tiles at N // BLOCK_N, tile lists move it to the partial list (TileLists.build
in runtime/triton_backend.py). An in-loop `start_n + BLOCK_N > N` branch cost
the H200 forward 20 % on a 2K window at 32K (2.93 -> 3.64 ms). The ragged last
query tile stays full in dK/dV: rows past M load q = dO = 0 and add nothing. Tile
lists are the Plan's `TileList`s: counts [Hx, rows] and indices
[Hx, rows, width] (int32, -1 padded), Hx = 1 when every head shares the plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from string import Template

from .expr import to_text
from .lowered import Lowered
from .triton_text import TritonPrinter, table_arg


#: largest tile (tokens per side) a kernel accepts: 256 x 256 scores already fill
#: a GPU's registers; larger tiles would only fail later, at compile or launch time
MAX_BLOCK = 256


@dataclass(frozen=True)
class KernelConfig:
    """The tuning knobs of the generated kernels, in one place.

    `block_m` / `block_n` are the query / key tile sizes (powers of two >= 16;
    the plan is built with the same tile); `num_warps` / `num_stages` go to the
    launch; `allow_tf32` lets float32 inputs use TF32 tensor cores on GPUs
    (off by default: results then match float32 references closely).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    allow_tf32: bool = False
    #: N-D tiles on a grid, spelled like `plan(block=...)`: ((query tile shape), (key tile shape)),
    #: e.g. ((8, 8), (8, 4)); block_m / block_n become their token counts (see codegen/ndtiles.py)
    tile: tuple | None = None

    def __post_init__(self):
        if self.tile is not None:
            from .ndtiles import check_tile
            object.__setattr__(self, "tile", check_tile(self.tile, (self.block_m, self.block_n)))
            object.__setattr__(self, "block_m", math.prod(self.tile[0]))
            object.__setattr__(self, "block_n", math.prod(self.tile[1]))
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v > MAX_BLOCK or v & (v - 1):
                raise ValueError(f"KernelConfig.{name}: expected a power of two from 16 (tl.dot needs 16) to {MAX_BLOCK} "
                                 f"tokens, got {v!r}; try 16, 32, 64 or 128")
        for name in ("num_warps", "num_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KernelConfig.{name}: expected a positive integer, got {v!r}")

    @classmethod
    def parse(cls, spec: str) -> "KernelConfig":
        """'128x64w8s3' -> KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3): the
        spelling of the config tables, `scripts/aot_all.py --configs` and `benchmarks/gpu.py`."""
        m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", spec.strip()) if isinstance(spec, str) else None
        if not m:
            raise ValueError(f"KernelConfig.parse: expected BMxBNwWARPSsSTAGES like 128x64w8s3, got {spec!r}")
        bm, bn, warps, stages = map(int, m.groups())
        return cls(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)

    @property
    def block(self) -> tuple[int, int]:
        return self.block_m, self.block_n

    def key(self) -> str:
        tile = "" if self.tile is None else " tile=" + "/".join("x".join(map(str, t)) for t in self.tile)
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} num_warps={self.num_warps} "
                f"num_stages={self.num_stages} allow_tf32={self.allow_tf32}{tile}")


#: The small set tried on a GPU by `TritonBackend(autotune=True)`.
AUTOTUNE_CONFIGS = (
    KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2),
    KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
)


@dataclass(frozen=True)
class TargetConfigs:
    """The configs the runtime may launch on one target (see `configs_for`)."""

    default: KernelConfig
    autotune: tuple
    #: (block_m, block_n, num_warps, num_stages) whose backward kernels fit the target; a
    #: forward config outside it runs its backward with `backward(config)` instead
    backward_ok: frozenset

    def backward(self, config: KernelConfig) -> KernelConfig:
        """The config to run the backward with after a forward with `config`: itself when
        its backward fits, else one with the same tiles that does (or the default)."""
        key = (config.block_m, config.block_n, config.num_warps, config.num_stages)
        if self.backward_ok is None or key in self.backward_ok:
            return config
        same_tiles = [k for k in sorted(self.backward_ok) if k[:2] == key[:2]]
        if same_tiles:
            return replace(config, num_warps=same_tiles[0][2], num_stages=same_tiles[0][3])
        if config.tile is not None:  # N-D tiles fix the token counts: only warps / stages can change
            return replace(config, num_warps=self.default.num_warps, num_stages=self.default.num_stages)
        return replace(self.default, allow_tf32=config.allow_tf32)


def _configs(text: str) -> tuple:
    """'128x64w8s3 64x64w4s2' -> (KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 2))."""
    return tuple(KernelConfig.parse(part) for part in text.split())


#: target name -> (compute capability, shared memory per block with opt-in, bytes; the CUDA
#: programming guide's table: 227 KB on sm_90 / sm_100, 163 KB on sm_80 / sm_87, 99 KB on sm_86 / sm_89)
TARGETS = {
    "sm_80": (80, 166912),
    "sm_86": (86, 101376),
    "sm_87": (87, 166912),
    "sm_89": (89, 101376),
    "sm_90": (90, 232448),
    "sm_100": (100, 232448),
}

# [Note: configs per target] Measured by compiling ahead of time (attnc/aot.py; docs/codegen.md
# section 7 and benchmarks/results/aot_*.md: `scripts/aot_all.py candidates`), bf16 (fp16 tiles
# take the same shared memory), Triton 3.9, for closed-form loops (streaming_llm), tile lists
# (bigbird) and per-element table reads (biformer; not at D = 256); the chosen configs are
# checked with 3.9 and 3.6 by tests/test_aot.py and `scripts/aot_all.py all`. Per
# shared-memory class and head-dim bound: (forward candidates, configs whose backward fits); the
# first forward candidate that is also a fitting backward is the default. Shared memory grows
# with D, the tiles and the stages, and is larger on sm_90 (wgmma) than on sm_80 (mma.sync) at
# equal config. No measured config spills; at D = 256 the old default 64x64 w4 s2 spills (4 warps
# cannot hold [64, 256] accumulators), so D > 128 uses 8 warps or 32x32 tiles.
_TABLE = {
    # sm_90 / sm_100: 232 448 B
    ("227K", 64): ("64x64w4s2 128x64w8s3 64x64w4s3 128x128w8s2 64x32w4s2",
                   "64x64w4s2 128x64w8s3 64x64w4s3 128x128w8s2 64x32w4s2"),
    ("227K", 128): ("64x64w4s2 128x64w8s3 64x64w4s3 128x128w8s2 64x32w4s2",
                    "64x64w4s2 64x64w4s3 64x32w4s2 128x64w8s2"),
    ("227K", 256): ("64x32w8s2 64x64w8s2 32x32w4s2", "64x32w8s2 64x64w8s2 32x32w4s2"),
    # sm_80 / sm_87: 166 912 B
    ("163K", 64): ("64x64w4s2 128x64w8s3 64x64w4s3 128x128w8s2 64x32w4s2",
                   "64x64w4s2 128x64w8s3 64x64w4s3 128x128w8s2 64x32w4s2"),
    ("163K", 128): ("64x64w4s2 128x64w8s3 64x64w4s3 128x128w8s2 64x32w4s2",
                    "64x64w4s2 64x64w4s3 64x32w4s2 128x64w8s2"),
    ("163K", 256): ("64x32w8s2 64x64w8s2 32x32w4s2", "64x32w8s2 64x64w8s2 32x32w4s2"),
    # sm_86 / sm_89 / sm_120: 101 376 B (sm_80's shared-memory figures: the same mma.sync code)
    ("99K", 64): ("64x64w4s2 64x64w4s3 128x64w8s2 64x32w4s2", "64x64w4s2 64x64w4s3 128x64w8s2 64x32w4s2"),
    ("99K", 128): ("64x64w4s2 128x64w8s2 64x32w4s2", "64x64w4s2 64x32w4s2"),
    ("99K", 256): ("32x32w4s2", "32x32w4s2"),
    # before sm_80 (sm_75: 65 536 B): not measured on that ISA; sm_80's figures of the smallest config
    # (64x32 w4 s2: 60 KiB at D=128; at D=256 no measured config fits 64 KiB: 32x32 w4 s2 needs 70)
    ("64K", 64): ("64x32w4s2", "64x32w4s2"),
    ("64K", 128): ("64x32w4s2", "64x32w4s2"),
    ("64K", 256): ("32x32w4s2", "32x32w4s2"),
}


def _shared_class(capability: int) -> str:
    if capability < 80:
        return "64K"
    limit = TARGETS.get(f"sm_{capability}", (0, 101376))[1]
    if limit >= 232448:
        return "227K"
    if limit >= 166912:
        return "163K"
    return "99K"


def configs_for(capability: int | None, head_dim: int, dtype=None) -> TargetConfigs:
    """The default config, the autotune candidates and the fitting backward configs for a
    GPU of compute capability `capability` (80 for A100, 90 for H100; None: the CPU
    interpreter, where every config runs: `KernelConfig()` and `AUTOTUNE_CONFIGS`), the
    larger head dim of q / v (1..256) and the dtype (a torch dtype or 'fp16' / 'bf16' /
    'fp32'), from the AOT figures in [Note: configs per target]. float32 keeps to the
    default (its tiles take twice the shared memory; not measured per target)."""
    if head_dim is None or isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_BLOCK:
        raise ValueError(f"configs_for: head_dim: expected 1 to {MAX_BLOCK}, got {head_dim!r}")
    if capability is None:
        return TargetConfigs(KernelConfig(), AUTOTUNE_CONFIGS, None)
    if isinstance(capability, bool) or not isinstance(capability, int) or capability < 10:
        raise ValueError(f"configs_for: capability: expected an integer like 80 (A100) or 90 (H100), or None, "
                         f"got {capability!r}; try 10 * major + minor of torch.cuda.get_device_capability()")
    bound = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    fwd_text, bwd_text = _TABLE[(_shared_class(capability), bound)]
    fwd, bwd = _configs(fwd_text), _configs(bwd_text)
    ok = frozenset((c.block_m, c.block_n, c.num_warps, c.num_stages) for c in bwd)
    default = next(c for c in fwd if c in bwd)
    if str(dtype).removeprefix("torch.") in ("fp32", "float32"):
        return TargetConfigs(default, (default,), ok)
    return TargetConfigs(default, fwd, ok)


_MODULE = Template('''\
# Generated by attnc $version: readable Triton kernels for one attention pattern.
# Do not edit; regenerate with `attnc compile`.
#
# pattern: $pattern
$size_lines
# mask:    $mask_text
# config:  $config
# loops:   $loops_text
#
# Forward: one program per (query tile, batch * head); online softmax over the
# plan's full tiles (no mask arithmetic), then its partial tiles (`_mask`).
# Backward: delta = rowsum(dO * O) - dlse; dK/dV per key tile over the
# transposed plan (summing the query heads of a GQA group: no atomics); dQ per
# query tile over the plan. Rows without an allowed key: out 0, lse -inf.

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

TABLES = $tables
CLOSED_FORM = $closed_form  # (forward and dQ, dK/dV): loop bounds as arithmetic instead of tile lists


$mask_source$score_source
$bounds_source
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                    $rows_tiles, offs_m, offs_n, offs_d, offs_dv, off_h, off_b$tbl_args$sc_fwd,
                    M, N, D: tl.constexpr, DV: tl.constexpr,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    q_idx = tl.minimum(offs_m, M - 1)
$rows_loop
        cols = start_n + offs_n
        kT = tl.load(K_base + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(cols[None, :] < N) & (offs_d[:, None] < D), other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale$score_fwd
        if MASKED:
            keep = _mask(q_idx[:, None], tl.minimum(cols, N - 1)[None, :], off_h, off_b, M, N$tbl_args)
            qk = tl.where(keep & (cols[None, :] < N), qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # a row may have no allowed key yet: subtract 0 instead of -inf (no NaN)
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_sub = m_ij
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V_base + cols[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(cols[:, None] < N) & (offs_dv[None, :] < DV), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=$fwd_generic)
def _attn_fwd(Q, K, V, Out, Lse, sm_scale,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
$fwd_params              M, N, HQ: tl.constexpr, GROUP: tl.constexpr, PLAN_HEADS: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(BLOCK_D >= D and BLOCK_DV >= DV, "head dims are padded up to BLOCK_D / BLOCK_DV")
    tl.static_assert(HQ % GROUP == 0, "query heads come in GQA groups")
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1).to(tl.int64)  # int64: offsets beyond 2**31 elements
    off_b = off_hb // HQ
    off_h = off_hb % HQ
    off_kh = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    qk_scale = sm_scale * LOG2E
    K_base = K + off_b * stride_kb + off_kh * stride_kh
    V_base = V + off_b * stride_vb + off_kh * stride_vh
$fwd_body
    # rows with no allowed key: output 0 and lse -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV))
    tl.store(Lse + off_hb * M + offs_m, lse, mask=offs_m < M)


@triton.jit(do_not_specialize=["M"])
def _attn_bwd_preprocess(O, DO, DLse, Delta,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         M, HQ: tl.constexpr, DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr):
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1).to(tl.int64)  # int64: offsets beyond 2**31 elements
    off_b = off_hb // HQ
    off_h = off_hb % HQ
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < M) & (offs_dv[None, :] < DV)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLse + off_hb * M + offs_m, mask=offs_m < M, other=0.0)
    tl.store(Delta + off_hb * M + offs_m, delta, mask=offs_m < M)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base,
                         stride_qm, stride_qd, stride_dom, stride_dod, qk_scale,
                         $cols_tiles, offs_m, offs_n, offs_d, offs_dv, off_h, off_b$tbl_args$sc_fwd,
                         M, N, D: tl.constexpr, DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k_idx = tl.minimum(offs_n, N - 1)
$cols_loop
        rows = start_m + offs_m
        q = tl.load(Q_base + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(rows[:, None] < M) & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO_base + rows[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=(rows[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(Lse_base + rows, mask=rows < M, other=0.0)
        # empty rows (lse -inf) have p = 0: use +inf so exp2(s - lse) is 0, not NaN
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        delta = tl.load(Delta_base + rows, mask=rows < M, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale$score_dkdv
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            keep = _mask(tl.minimum(rows, M - 1)[None, :], k_idx[:, None], off_h, off_b, M, N$tbl_args)
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])$score_dkdv_grad
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=$dkdv_generic)
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV_, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
$dkdv_params                   M, N, HQ: tl.constexpr, GROUP: tl.constexpr, PLAN_HEADS: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    start_n = tl.program_id(0)
    off_hb = tl.program_id(1).to(tl.int64)  # batch * key/value head (int64: offsets beyond 2**31 elements)
    off_b = off_hb // (HQ // GROUP)
    off_kh = off_hb % (HQ // GROUP)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + off_b * stride_kb + off_kh * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kh * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale = sm_scale * LOG2E
    for g in range(0, GROUP):  # the query heads sharing this key/value head
        off_h = off_kh * GROUP + g
        Q_base = Q + off_b * stride_qb + off_h * stride_qh
        DO_base = DO + off_b * stride_dob + off_h * stride_doh
        Lse_base = Lse + (off_b * HQ + off_h) * M
        Delta_base = Delta + (off_b * HQ + off_h) * M
$dkdv_body
    dk *= sm_scale
    # DK / DV_ are contiguous [B, Hkv, N, D] / [B, Hkv, N, DV]
    tl.store(DK + (off_hb * N + offs_n[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_d[None, :] < D))
    tl.store(DV_ + (off_hb * N + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                       $rows_tiles, offs_m, offs_n, offs_d, offs_dv, off_h, off_b$tbl_args$sc_dq,
                       M, N, D: tl.constexpr, DV: tl.constexpr,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q_idx = tl.minimum(offs_m, M - 1)
$rows_loop
        cols = start_n + offs_n
        k = tl.load(K_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(cols[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V_base + cols[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(cols[:, None] < N) & (offs_dv[None, :] < DV), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale$score_dq
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            keep = _mask(q_idx[:, None], tl.minimum(cols, N - 1)[None, :], off_h, off_b, M, N$tbl_args)
            p = tl.where(keep & (cols[None, :] < N), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])$score_dq_grad
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=$dq_generic)
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_dom, stride_dod,
$dq_params                 M, N, HQ: tl.constexpr, GROUP: tl.constexpr, PLAN_HEADS: tl.constexpr,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    start_m = tl.program_id(0)
    off_hb = tl.program_id(1).to(tl.int64)  # int64: offsets beyond 2**31 elements
    off_b = off_hb // HQ
    off_h = off_hb % HQ
    off_kh = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(Lse + off_hb * M + offs_m, mask=offs_m < M, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(Delta + off_hb * M + offs_m, mask=offs_m < M, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    K_base = K + off_b * stride_kb + off_kh * stride_kh
    V_base = V + off_b * stride_vb + off_kh * stride_vh
$dq_body
    dq *= sm_scale
    # DQ is contiguous [B, HQ, M, D]
    tl.store(DQ + (off_hb * M + offs_m[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_d[None, :] < D))
''')


_LIST_PARAMS = "FullCount, FullIndex, full_width, PartCount, PartIndex, part_width"

# the inner-loop calls of each kernel; {tiles} are the loop's two tile arguments, {masked} True / False
_CALLS = {
    "fwd": ("    ", """acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                qk_scale, {tiles},
                                offs_m, offs_n, offs_d, offs_dv, off_h, off_b{tbl},
                                M, N, D, DV, BLOCK_N, {masked}, DOT_PRECISION)"""),
    "dkdv": ("        ", """dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base,
                              stride_qm, stride_qd, stride_dom, stride_dod, qk_scale,
                              {tiles},
                              offs_m, offs_n, offs_d, offs_dv, off_h, off_b{tbl},
                              M, N, D, DV, BLOCK_M, {masked}, DOT_PRECISION)"""),
    "dq": ("    ", """dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
                        qk_scale, {tiles},
                        offs_m, offs_n, offs_d, offs_dv, off_h, off_b{tbl},
                        M, N, D, DV, BLOCK_N, {masked}, DOT_PRECISION)"""),
}


def _call(kind: str, tiles: str, masked: bool, tbl: str) -> str:
    indent, text = _CALLS[kind]
    body = text.format(tiles=tiles, masked=masked, tbl=tbl)
    return "\n".join(indent + line for line in body.split("\n"))


def _list_body(kind: str, tbl: str) -> str:
    """Two loops over the plan's tile lists: full tiles, then partial ones."""
    indent = _CALLS[kind][0]
    rows = "tl.cdiv(N, BLOCK_N) + start_n" if kind == "dkdv" else "tl.cdiv(M, BLOCK_M) + start_m"
    return "\n".join([f"{indent}row = (off_h % PLAN_HEADS) * {rows}",
                      _call(kind, "FullIndex + row * full_width, tl.load(FullCount + row)", False, tbl),
                      _call(kind, "PartIndex + row * part_width, tl.load(PartCount + row)", True, tbl)])


def _closed_body(kind: str, rs, tbl: str, sizes: str = "", env: dict | None = None) -> str:
    """Per range: its tiles in closed form, clipped after the previous range, then
    a masked prefix, the full middle (no mask) and a masked suffix."""
    indent = _CALLS[kind][0]
    fn, args = (("_query_tiles", f"k0, k1, off_h, M, N{sizes}, BLOCK_M") if kind == "dkdv"
                else ("_key_tiles", f"q0, q1, off_h, M, N{sizes}, BLOCK_N"))
    out = []
    if kind == "dkdv":
        out += [f"{indent}k0 = start_n * BLOCK_N  # this tile's keys: [k0, k1)",
                f"{indent}k1 = tl.minimum(k0 + BLOCK_N, N)",
                f"{indent}done = start_n * 0  # query tiles before `done` were visited by an earlier range"]
    else:
        out += [f"{indent}q0 = start_m * BLOCK_M + (N - M)  # absolute positions of this tile's queries: [q0, q1)",
                f"{indent}q1 = tl.minimum(start_m * BLOCK_M + BLOCK_M, M) + (N - M)",
                f"{indent}done = start_m * 0  # key tiles before `done` were visited by an earlier range"]
    for i, (text, _) in enumerate(_range_list(rs, env)):
        out += [f"{indent}# range {i}: {text}",
                f"{indent}first, full_first, full_end, end, full = {fn}_{i}({args})",
                f"{indent}start, full_start, full_stop, done = _split(first, full_first, full_end, end, full, done)",
                _call(kind, "start, full_start", True, tbl),
                _call(kind, "full_start, full_stop", False, tbl),
                _call(kind, "full_stop, done", True, tbl)]
    if not _range_list(rs):
        out.append(f"{indent}# the pattern allows no pair: nothing to visit")
    return "\n".join(out)


def _range_list(rs, env: dict | None = None) -> list:
    """[(text, (head bits, Range))] in kernel order: every group's ranges (a head
    outside a group finds its ranges inactive)."""
    var = "q" if rs.direction == "rows" else "k"
    out = []
    for bits, ranges in rs.groups:
        for r in ranges:
            t = (f"{'keys' if var == 'q' else 'query rows'} {r.text(var, rs.domain, env)}"
                 + ("" if bits == -1 else f" (heads {_bits_text(bits)})"))
            out.append((t, (bits, r)))
    return out


def _bits_text(bits: int) -> str:
    return "{" + ", ".join(str(h) for h in range(bits.bit_length()) if (bits >> h) & 1) + "}"


_SPLIT = '''@triton.jit
def _split(first, full_first, full_end, end, full, done):
    """One range of tiles: [first, end) touched, [full_first, full_end) full when
    `full`. Clipped to start at `done` (an earlier range visited the tiles before
    it): (start, full_start, full_stop, stop), [start, full_start) and
    [full_stop, stop) masked. Ranges come in order of their first tile, so no
    tile is skipped and none is visited twice."""
    start = tl.maximum(first, done)
    stop = tl.maximum(end, start)
    full_start = tl.where(full, tl.minimum(tl.maximum(full_first, start), stop), stop)
    full_stop = tl.where(full, tl.minimum(tl.maximum(full_end, full_start), stop), stop)
    return start, full_start, full_stop, stop
'''


def _range_helper(rs, i: int, bits: int, r, sizes: str = "", env: dict | None = None) -> str:
    """`_key_tiles_i(q0, q1, h, M, N, G.., BLOCK_N)` (or `_query_tiles_i(k0, k1, h, M, N, G..,
    BLOCK_M)`): the tiles of range i for the positions [x0, x1) of one tile, by monotonicity:
    touched [lo(first) // B, cdiv(hi(last), B)), full [cdiv(lo(last), B), hi(first) // B).
    Size-tagged constants print as expressions of the size arguments (`env`: the sizes
    they are checked against, sizes.text)."""
    import torch

    from . import sizes as size_tags
    from .monotone import to_text, to_triton

    rows = rs.direction == "rows"
    v = "q" if rows else "k"
    L, B = ("N", "BLOCK_N") if rows else ("M", "BLOCK_M")
    name = f"_key_tiles_{i}" if rows else f"_query_tiles_{i}"
    what = "keys" if rows else "query rows"
    g0, g1 = size_tags.text(r.g0, env), size_tags.text(r.g1, env)
    doc = (f'    """{what.capitalize()} [{to_text(r.lo, v, env)}, {to_text(r.hi, v, env)}) of positions {v}0 <= {v} < {v}1'
           + ("" if (r.g0, r.g1) == rs.domain else f" (for {g0} <= {v} < {g1})")
           + ("" if bits == -1 else f", heads {_bits_text(bits)}") + f".\n\n"
           f"    Returns (first, full_first, full_end, end, full): tiles [first, end) touched,\n"
           f'    [full_first, full_end) full when `full` (every position of the tile is in range)."""')
    lines = [f"@triton.jit", f"def {name}({v}0, {v}1, h, M, N{sizes}, {B}: tl.constexpr):", doc]
    guarded = (r.g0, r.g1) != rs.domain
    if guarded:
        lines += [f"    s = tl.maximum({v}0, {g0})  # clipped to the range's positions [{g0}, {g1})",
                  f"    e = tl.minimum({v}1, {g1})",
                  f"    active = s < e",
                  f"    {v}_first = tl.minimum(s, {size_tags.text(r.g1 - 1, env, 9)})",
                  f"    {v}_last = tl.maximum(e - 1, {g0})"]
    else:
        lines += [f"    active = {v}0 < {v}1", f"    {v}_first = {v}0", f"    {v}_last = {v}1 - 1"]
    if bits != -1:
        from .ranges import head_runs
        runs = head_runs(bits, bits.bit_length())
        cond = " | ".join(f"(h == {a})" if b == a + 1 else f"((h >= {a}) & (h < {b}))" for a, b in runs)
        lines.append(f"    active = active & ({cond})")
    xs = torch.arange(int(r.g0), int(r.g1), dtype=torch.int64)
    for end, expr in (("lo", r.lo), ("hi", r.hi)):
        for where in ("first", "last"):
            code = to_triton(expr, f"{v}_{where}", xs, env)
            if f"{v}_{where}" not in code:  # no position in it: keep it a tensor like the others
                code = f"tl.zeros_like({v}_{where}) + {code if code.lstrip('-').isdigit() else f'({code})'}"
            lines.append(f"    {end}_{where} = {code}")
    lines += [f"    first = tl.where(active, lo_first // {B}, 0)",
              f"    end = tl.where(active, tl.cdiv(hi_last, {B}), 0)",
              f"    full_first = tl.cdiv(lo_last, {B})",
              (f"    full_end = tl.minimum(hi_first, N) // BLOCK_N  # a ragged last key tile is partial" if rows else
               f"    full_end = tl.where(hi_first >= M, tl.cdiv(M, BLOCK_M), hi_first // BLOCK_M)  # ragged last tile"),
              f"    full = active" + (f" & (s == {v}0) & (e == {v}1)" if guarded else ""),
              f"    return first, full_first, full_end, end, full"]
    return "\n".join(lines) + "\n"


def bounds_source(bounds, sizes: str = "", env: dict | None = None) -> str:
    """The closed-form helpers of a module (empty when both directions read tile lists)."""
    if bounds is None or not any(bounds.closed):
        return ""
    parts = [_SPLIT]
    for rs in (bounds.rows, bounds.cols):
        if rs is not None:
            parts += [_range_helper(rs, i, bits, r, sizes, env) for i, (_, (bits, r)) in enumerate(_range_list(rs, env))]
    return "\n" + "\n\n".join(parts) + "\n"


def generate(low: Lowered, config: KernelConfig, plan_text: str = "built from run-time inputs per call",
             bounds=None, score=None) -> str:
    """The Triton module for a lowered pattern (deterministic text).

    `plan_text` describes the plan for the header (see `Plan.summary`). `bounds`
    (`bounds.LoopBounds`, or None: tile lists) says per direction whether the
    loops are closed-form arithmetic or read the plan's tile lists, which are
    then kernel arguments, so one module serves any plan of the same sizes
    (run-time inputs change the plan, not the code). `score` (codegen/score.ScoreFn)
    adds the pattern's score term to every loop and its derivative to the backward,
    the tables' gradients accumulated by the dQ kernel (see [Note: score kernels]).
    """
    from attnc.version import __version__

    from . import sizes as size_tags

    generic = low.tiles is None  # N-D tile kernels stay specialised to their grid (ndtiles.py)
    env = size_tags.size_env(low.M, low.N, low.grid) if generic else None
    grid_args = size_tags.size_args(len(low.grid or ()))
    sizes = "".join(f", {g}" for g in grid_args)
    tbl_args = sizes + "".join(f", {table_arg(t.name)}" for t in low.tables)
    mask_text = to_text(low.expr, env)
    if len(mask_text) > 400:
        mask_text = mask_text[:397] + "..."
    tables = "(" + "".join(f"{t.name!r}, " for t in low.tables) + ")" if low.tables else "()"
    rows_closed, cols_closed = bounds.closed if bounds is not None else (False, False)
    loops_text = bounds.summary(per_size=not generic) if bounds is not None else "tile lists (plan built per call)"
    if generic:
        axes = f", {', '.join(grid_args)} (grid axes)" if grid_args else ""
        size_lines = (f"# sizes:   run-time arguments M (queries), N (keys){axes}; H={low.H} query heads\n"
                      f"# plan:    per size on the host ({'tile lists' if not (rows_closed and cols_closed) else 'checks the closed-form loops'})")
    else:
        size_lines = (f"# sizes:   M={low.M} queries, N={low.N} keys, H={low.H} query heads"
                      + (f", grid={'x'.join(map(str, low.grid))}" if low.grid else "") + f"\n# plan:    {plan_text}")
    dont = ["M", "N", *grid_args]
    mask_source = TritonPrinter(low).source().rstrip("\n") + "\n"

    sc = _score_texts(low, score, sizes, mask_source)

    def params(indent: int, closed: bool, kind: str = "fwd") -> str:
        text = ", ".join(list(grid_args) + ([] if closed else [_LIST_PARAMS]) + [table_arg(t.name) for t in low.tables]
                         + sc["params_" + kind])
        return " " * indent + text + ",\n" if text else ""

    def no_spec(closed: bool) -> str:
        return repr(dont + ([] if closed else ["full_width", "part_width"]))

    loop = {True: ("tile_lo, tile_hi", "    for j in range(tile_lo, tile_hi):\n        {s} = j * {b}"),
            False: ("tile_index, tile_count", "    for j in range(0, tile_count):\n        {s} = tl.load(tile_index + j) * {b}")}
    src = _MODULE.substitute(
        version=__version__,
        pattern=low.text,
        size_lines=size_lines,
        mask_text=mask_text,
        config=config.key(),
        loops_text=loops_text,
        tables=tables,
        closed_form=repr((rows_closed, cols_closed)),
        mask_source=mask_source,
        score_source=sc["source"],
        sc_fwd=sc["args_fwd"],
        sc_dq=sc["args_dq"],
        score_fwd=sc["fwd"],
        score_dkdv=sc["dkdv"],
        score_dkdv_grad=sc["dkdv_grad"],
        score_dq=sc["dq"],
        score_dq_grad=sc["dq_grad"],
        bounds_source=bounds_source(bounds, sizes, env),
        tbl_args=tbl_args,
        rows_tiles=loop[rows_closed][0],
        cols_tiles=loop[cols_closed][0],
        rows_loop=loop[rows_closed][1].format(s="start_n", b="BLOCK_N"),
        cols_loop=loop[cols_closed][1].format(s="start_m", b="BLOCK_M"),
        fwd_params=params(14, rows_closed),
        dkdv_params=params(19, cols_closed),
        dq_params=params(17, rows_closed, "dq"),
        fwd_generic=no_spec(rows_closed),
        dkdv_generic=no_spec(cols_closed),
        dq_generic=no_spec(rows_closed),
        fwd_body=(_closed_body("fwd", bounds.rows, tbl_args + sc["args_fwd"], sizes, env) if rows_closed
                  else _list_body("fwd", tbl_args + sc["args_fwd"])),
        dkdv_body=(_closed_body("dkdv", bounds.cols, tbl_args + sc["args_fwd"], sizes, env) if cols_closed
                   else _list_body("dkdv", tbl_args + sc["args_fwd"])),
        dq_body=(_closed_body("dq", bounds.rows, tbl_args + sc["args_dq"], sizes, env) if rows_closed
                 else _list_body("dq", tbl_args + sc["args_dq"])),
    )
    return src


def _score_texts(low: Lowered, score, sizes: str, mask_source: str) -> dict:
    """The text the score term adds to the module ([Note: score kernels]); empty strings
    without one, so kernels of patterns without a score term are unchanged.

    [Note: score kernels] The loops compute qk = q . k * scale * log2(e) as before; with a
    score term, s = qk * ln 2 is the scaled dot product, and the logit is `_score(s, ...)`
    (times log2(e) again). Backward recomputes it and turns dS of the logit into dS of s
    with `_score_grad` (the term's reverse mode, printed by codegen/score.py); the dQ kernel
    visits every allowed pair exactly once per head, so it also adds the tables' gradients
    (`_score_grad_tables`, float32 atomics into zeroed buffers `dsc_*`). Rows past M get
    logit -inf in the backward: without a term their zero q gave a harmless p, but a term
    such as a bias may make p overflow there (inf * 0 = NaN in dV and the tables).
    """
    keys = ("params_fwd", "params_dkdv", "params_dq", "source", "args_fwd", "args_dq", "fwd", "dkdv", "dkdv_grad",
            "dq", "dq_grad")
    if score is None:
        return {k: ([] if k.startswith("params") else "") for k in keys}
    from .score import grad_arg, score_arg, triton_score_source

    tabs = [score_arg(n) for n, _ in score.tables]
    grads = [grad_arg(n) for n, _ in score.tables]
    targs = "".join(f", {t}" for t in tabs)
    gargs = "".join(f", {t}" for t in grads)
    ind = "\n        "
    fwd_pos = "q_idx[:, None], tl.minimum(cols, N - 1)[None, :], off_h, M, N" + sizes
    dkdv_pos = "tl.minimum(rows, M - 1)[None, :], k_idx[:, None], off_h, M, N" + sizes
    return {
        "params_fwd": tabs, "params_dkdv": tabs, "params_dq": tabs + grads,
        "source": "\n" + triton_score_source(score, low, mask_source).rstrip("\n") + "\n",
        "args_fwd": targs, "args_dq": targs + gargs,
        "fwd": f"{ind}qk = _score(qk * LN2, {fwd_pos}{targs}) * LOG2E  # the score term",
        # rows past M (zero q and dO) must stay neutral: the term may be large there, so drop them
        "dkdv": (f"{ind}sT = qkT * LN2{ind}qkT = _score(sT, {dkdv_pos}{targs}) * LOG2E  # the score term"
                 f"{ind}qkT = tl.where(rows[None, :] < M, qkT, float(\"-inf\"))"),
        "dkdv_grad": f"{ind}dsT = _score_grad(sT, dsT, {dkdv_pos}{targs})",
        "dq": (f"{ind}s_raw = qk * LN2{ind}qk = _score(s_raw, {fwd_pos}{targs}) * LOG2E  # the score term"
               f"{ind}qk = tl.where(offs_m[:, None] < M, qk, float(\"-inf\"))"),
        "dq_grad": f"{ind}ds = _score_grad_tables(s_raw, ds, {fwd_pos}{targs}{gargs})",
    }
