"""Kernel generation: a lowered pattern and its plan -> one Triton module.

input:  a `Lowered` mask (pointwise.py), the tile plan it runs with
        (plans.Plan; only its shape and method go into the text) and a
        `KernelConfig`.
output: Python source of a module with `_mask`, the forward kernel and the
        three backward kernels (preprocess, dK/dV, dQ), formatted like
        Triton's fused-attention tutorial; deterministic for equal inputs.
does not: lower, plan or bound loops (it prints what those passes give: the
        pipeline, pipeline.py, runs them), launch anything
        (runtime/triton_backend.py does) or cache (cache.py). The module's text is
        kernel_templates.py's, its loops and loop-bound helpers are loop_text.py's,
        its score term score_triton.py's: generate fills them in.

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

from .expr import to_text
from .kernel_templates import ATTENTION_MODULE, LIST_PARAMS
from .loop_text import bounds_source, closed_body, list_body
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
        text = ", ".join(list(grid_args) + ([] if closed else [LIST_PARAMS]) + [table_arg(t.name) for t in low.tables]
                         + sc["params_" + kind])
        return " " * indent + text + ",\n" if text else ""

    def no_spec(closed: bool) -> str:
        return repr(dont + ([] if closed else ["full_width", "part_width"]))

    loop = {True: ("tile_lo, tile_hi", "    for j in range(tile_lo, tile_hi):\n        {s} = j * {b}"),
            False: ("tile_index, tile_count", "    for j in range(0, tile_count):\n        {s} = tl.load(tile_index + j) * {b}")}
    src = ATTENTION_MODULE.substitute(
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
        fwd_body=(closed_body("fwd", bounds.rows, tbl_args + sc["args_fwd"], sizes, env) if rows_closed
                  else list_body("fwd", tbl_args + sc["args_fwd"])),
        dkdv_body=(closed_body("dkdv", bounds.cols, tbl_args + sc["args_fwd"], sizes, env) if cols_closed
                   else list_body("dkdv", tbl_args + sc["args_fwd"])),
        dq_body=(closed_body("dq", bounds.rows, tbl_args + sc["args_dq"], sizes, env) if rows_closed
                 else list_body("dq", tbl_args + sc["args_dq"])),
    )
    return src


def _score_texts(low: Lowered, score, sizes: str, mask_source: str) -> dict:
    """The text the score term adds to the module ([Note: score kernels]); empty strings
    without one, so kernels of patterns without a score term are unchanged.

    [Note: score kernels] The loops compute qk = q . k * scale * log2(e) as before; with a
    score term, s = qk * ln 2 is the scaled dot product, and the logit is `_score(s, ...)`
    (times log2(e) again). Backward recomputes it and turns dS of the logit into dS of s
    with `_score_grad` (the term's reverse mode, printed by codegen/score_triton.py); the dQ kernel
    visits every allowed pair exactly once per head, so it also adds the tables' gradients
    (`_score_grad_tables`, float32 atomics into zeroed buffers `dsc_*`). Rows past M get
    logit -inf in the backward: without a term their zero q gave a harmless p, but a term
    such as a bias may make p overflow there (inf * 0 = NaN in dV and the tables).
    """
    keys = ("params_fwd", "params_dkdv", "params_dq", "source", "args_fwd", "args_dq", "fwd", "dkdv", "dkdv_grad",
            "dq", "dq_grad")
    if score is None:
        return {k: ([] if k.startswith("params") else "") for k in keys}
    from .score_triton import grad_arg, score_arg, triton_score_source

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
