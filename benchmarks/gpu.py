"""GPU benchmark (issue 9): attnc's generated Triton kernels vs FlexAttention
(compiled; once with attnc's exported BlockMask, once with create_block_mask)
vs dense SDPA (FlashAttention / cuDNN), forward and forward+backward, bf16,
side by side in one run, medians from CUDA events. Each row also carries the
simulator's `tile_bound` and `predicted_speedup` for the same plan, so the
measured speedup over dense can be read against the model.

    python benchmarks/gpu.py                      # all cases, on cuda
    python benchmarks/gpu.py --cases 1d-w2k 2d-w80 --reps 20
    python benchmarks/gpu.py --smoke              # tiny sizes on CPU: checks the harness, not speed
    python benchmarks/gpu.py --out benchmarks/results/gpu_h200.md

Every method runs in its own try block: a backend that declines or fails is
recorded with its reason and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import attnc
from attnc.codegen.kernels import KernelConfig


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    params: dict = field(default_factory=dict)
    n: int | None = None  # 1-D length
    grid: tuple[int, ...] | None = None
    tile: tuple[int, int] = (128, 128)
    routed_density: float | None = None  # for `sel: blocks(b)` inputs: fraction of key blocks chosen per query block
    #: what a FlexAttention user writes by hand for this pattern: native(H) -> mask_mod (None: no native column)
    native: Callable | None = None
    #: attnc's tiles when they differ from the flex block size: N-D tiles on grids
    #: (((16, 8), (16, 8)): 128-token boxes), what the runtime should pick (issue 19)
    attnc_block: tuple | None = None
    #: also time FlexAttention fed attnc's export (needs attnc's 1-D plan at `tile`)
    export: bool = True


# ----------------------------------------------------------------------------- native FlexAttention mask_mods
# Written the way a FlexAttention user writes them (integer arithmetic on the
# index tensors), from the documented semantics (docs/language.md), not from
# attnc. `check_native` compares each with attnc's mask before anything is timed.


def _window(x, L: int, size: int, stride: int):
    """NATTEN / GNA window along one axis (dilation 1, not causal): [start, start + size),
    clamped at the edges; queries in a stride group share their leader's window."""
    leader = torch.clamp((x // stride) * stride + stride // 2, max=L - 1)
    start = torch.clamp(leader - size // 2, min=0, max=L - size)
    return start, start + size


def neighborhood_1d(N: int, size: int, stride: int = 1):
    def mask_mod(b, h, q_idx, kv_idx):
        lo, hi = _window(q_idx, N, size, stride)
        return (kv_idx >= lo) & (kv_idx < hi)
    return lambda H: mask_mod


def neighborhood_2d(grid: tuple[int, int], size: tuple[int, int], stride: tuple[int, int] = (1, 1)):
    (Y, X), (sy, sx), (ty, tx) = grid, size, stride

    def mask_mod(b, h, q_idx, kv_idx):
        ylo, yhi = _window(q_idx // X, Y, sy, ty)
        xlo, xhi = _window(q_idx % X, X, sx, tx)
        ky, kx = kv_idx // X, kv_idx % X
        return (ky >= ylo) & (ky < yhi) & (kx >= xlo) & (kx < xhi)
    return lambda H: mask_mod


def neighborhood_3d(grid: tuple[int, int, int], size: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)):
    (T, Y, X) = grid

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for axis, (q, k) in enumerate(((q_idx // (Y * X), kv_idx // (Y * X)), ((q_idx // X) % Y, (kv_idx // X) % Y),
                                       (q_idx % X, kv_idx % X))):
            lo, hi = _window(q, grid[axis], size[axis], stride[axis])
            inside = (k >= lo) & (k < hi)
            ok = inside if ok is None else ok & inside
        return ok
    return lambda H: mask_mod


def sliding_sinks(window: int, sinks: int):
    """causal & (sliding(window) | sink(sinks)): StreamingLLM / Mistral with attention sinks."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))
    return lambda H: mask_mod


def per_head_causal_or_sliding(window: int, sinks: int):
    """heads { 0 .. H // 4 => causal; _ => causal & (sliding(window) | sink(sinks)) }"""
    def factory(H: int):
        full = H // 4

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((h < full) | (q_idx - kv_idx < window) | (kv_idx < sinks))
        mask_mod.per_head = True  # create_block_mask needs H
        return mask_mod
    return factory


CASES = [
    Case("1d-w2k", "pattern p(w = 2048) = neighborhood(w)", n=32768, native=neighborhood_1d(32768, 2048)),
    Case("1d-w2k-s256", "pattern p(w = 2048) = neighborhood(w, stride = 256)", n=32768,
         native=neighborhood_1d(32768, 2048, 256)),
    # attnc on N-D tiles (16x8 boxes); its 1-D 128-token plan of a 256x256 grid takes minutes of CPU
    # (issue 18), so the export column is left out here
    Case("2d-w80", "pattern p on grid(h, w) = neighborhood((80, 80))", grid=(256, 256),
         native=neighborhood_2d((256, 256), (80, 80)), attnc_block=((16, 8), (16, 8)), export=False),
    Case("2d-w80-s16", "pattern p on grid(h, w) = neighborhood((80, 80), stride = (16, 16))", grid=(256, 256),
         native=neighborhood_2d((256, 256), (80, 80), (16, 16)), attnc_block=((16, 8), (16, 8)), export=False),
    Case("3d-w18x24x24", "pattern p on grid(t, h, w) = neighborhood((18, 24, 24))", grid=(30, 48, 80),
         native=neighborhood_3d((30, 48, 80), (18, 24, 24))),
    Case("3d-w18x24x24-s16x8x8", "pattern p on grid(t, h, w) = neighborhood((18, 24, 24), stride = (16, 8, 8))",
         grid=(30, 48, 80), native=neighborhood_3d((30, 48, 80), (18, 24, 24), (16, 8, 8))),
    Case("llm-32k", "pattern p = causal & (sliding(4096) | sink(64))", n=32768, native=sliding_sinks(4096, 64)),
    Case("llm-128k", "pattern p = causal & (sliding(4096) | sink(64))", n=131072, native=sliding_sinks(4096, 64)),
    Case("per-head-32k", "pattern p = heads { 0 .. H // 4 => causal; _ => causal & (sliding(1024) | sink(64)) }",
         n=32768, native=per_head_causal_or_sliding(1024, 64)),
    Case("routed-10pct-32k", "pattern p(sel: blocks(64)) = routed(sel)", n=32768, tile=(64, 64), routed_density=0.1),
]

#: named subsets of CASES (--subset)
SUBSETS = {
    # 2-D last: attnc's 1-D tile plan of a 256x256 neighborhood takes minutes of CPU (measured), the case budget cuts it
    "issue23": ["1d-w2k", "1d-w2k-s256", "llm-32k", "per-head-32k", "2d-w80", "2d-w80-s16"],
}

SMOKE = {  # same structure, sizes a CPU handles in seconds
    "1d-w2k": dict(n=512, params={"w": 64}, native=neighborhood_1d(512, 64)),
    "1d-w2k-s256": dict(n=512, params={"w": 64}, source="pattern p(w = 64) = neighborhood(w, stride = 16)",
                        native=neighborhood_1d(512, 64, 16)),
    "2d-w80": dict(grid=(16, 16), source="pattern p on grid(h, w) = neighborhood((5, 5))",
                   native=neighborhood_2d((16, 16), (5, 5))),
    "2d-w80-s16": dict(grid=(16, 20), source="pattern p on grid(h, w) = neighborhood((7, 9), stride = (2, 4))",
                       native=neighborhood_2d((16, 20), (7, 9), (2, 4))),
    "3d-w18x24x24-s16x8x8": dict(grid=(6, 8, 10), source="pattern p on grid(t, h, w) = neighborhood((3, 4, 5), stride = (2, 3, 4))",
                                 native=neighborhood_3d((6, 8, 10), (3, 4, 5), (2, 3, 4))),
    "llm-32k": dict(n=512, source="pattern p = causal & (sliding(64) | sink(4))", native=sliding_sinks(64, 4)),
    "per-head-32k": dict(n=512, source="pattern p = heads { 0 .. H // 4 => causal; _ => causal & (sliding(64) | sink(4)) }",
                         native=per_head_causal_or_sliding(64, 4)),
    "routed-10pct-32k": dict(n=512),
}


def smoke_cases() -> list[Case]:
    out = []
    for c in CASES:
        if c.name in SMOKE:
            kw = {"n": c.n, "grid": c.grid, "params": c.params, "source": c.source, "native": c.native, **SMOKE[c.name]}
            if kw["grid"] is not None:
                kw["n"] = None
            out.append(Case(c.name, kw["source"], kw["params"], kw["n"], kw["grid"], (64, 64), c.routed_density,
                            kw["native"], attnc_block=((8, 8), (8, 8)) if c.attnc_block else None, export=c.export))
    return out


def _heads_once(mask: torch.Tensor) -> torch.Tensor:
    """[H, r, N] -> [1, r, N] when every head has the same mask (attnc returns an expanded view then):
    the checks broadcast instead of materialising H copies."""
    return mask[:1] if mask.shape[0] > 1 and mask.stride(0) == 0 else mask


def check_native(case: Case, H: int, rows: list[tuple[int, int]] | None = None, device="cpu") -> int:
    """Positions where the native mask_mod and attnc's mask disagree, over the query
    rows `rows` ([lo, hi) ranges; None: all), every head. 0 means they agree."""
    pat = attnc.loads(case.source).pattern(**case.params)
    N = case.n if case.grid is None else math.prod(case.grid)
    mask_mod = case.native(H)
    bad = 0
    for lo, hi in rows or [(0, N)]:
        want = _heads_once(pat.mask_rows(N, N, H, case.grid, lo, hi)).to(device)  # [H or 1, hi - lo, N]
        h = torch.arange(want.shape[0], device=device)[:, None, None]
        q = torch.arange(lo, hi, device=device)[None, :, None]
        k = torch.arange(N, device=device)[None, None, :]
        got = mask_mod(torch.zeros((), dtype=torch.long, device=device), h, q, k).expand_as(want)
        bad += int((got != want).sum())
    return bad


class Timer:
    """Median milliseconds of fn(); CUDA events on cuda, perf_counter elsewhere."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def routed_selection(B, H, M, N, b, density, device, seed=0) -> torch.Tensor:
    """[B, H, ceil(M/b), k] distinct key blocks per query block, k = ceil(density * key blocks)."""
    nq, nk = -(-M // b), -(-N // b)
    k = max(1, math.ceil(density * nk))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, H, nq, nk, generator=g)
    return scores.topk(k, dim=-1).indices.to(torch.int32).to(device)


class OutOfBudget(Exception):
    """The run's total --budget-s is spent (raised from SIGALRM or between steps)."""


def _flex_api():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return create_block_mask, flex_attention


def _reset_compiler():
    """A fresh Dynamo cache per case: each case compiles flex_attention for two block masks
    (forward and forward+backward); without a reset, later cases would hit Dynamo's
    recompile limit and run FlexAttention eagerly (unfused, not its real speed)."""
    import torch._dynamo as dynamo
    dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))


def _sample_rows(M: int, n: int) -> list[tuple[int, int]]:
    """Query-row ranges for the output check: the first, middle and last n rows (all when M <= 3n)."""
    if M <= 3 * n:
        return [(0, M)]
    mid = (M // 2) // 128 * 128
    return [(0, n), (mid, mid + n), (M - n, M)]


def reference_rows(pat, case: Case, q, k, v, H: int, rows, inputs) -> list[torch.Tensor]:
    """float32 attention restricted to attnc's mask, for the query rows `rows` only."""
    N = k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1])
    kf, vf = k.float(), v.float()
    out = []
    batches, _ = pat.input_batches(q.shape[2], N, H, inputs)  # one dict per batch element (B = 1 here)
    for lo, hi in rows:
        mask = _heads_once(pat.mask_rows(q.shape[2], N, H, case.grid, lo, hi, batches[0]))[None].to(q.device)
        s = (q[:, :, lo:hi].float() @ kf.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        out.append(p @ vf)
        del s, p, mask
    return out


def _blockmask_summary(bm) -> tuple[torch.Tensor, torch.Tensor]:
    """(every listed tile, full tiles) of a BlockMask as bool [B, H, nq, nk]."""
    def dense(num, idx):
        cols = idx.shape[-1]
        listed = torch.arange(cols, device=idx.device) < num[..., None]
        out = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.bool, device=idx.device)
        out.scatter_(-1, torch.where(listed, idx.long(), cols), True)
        return out[..., :cols]
    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices) if bm.full_kv_num_blocks is not None else None
    part = dense(bm.kv_num_blocks, bm.kv_indices)
    if full is None:
        full = torch.zeros_like(part)
    return part | full, full


def run_case(case: Case, args, device: torch.device, dtype: torch.dtype, deadline: float) -> dict:
    """One row. `deadline` (time.monotonic()) bounds the case: steps that would start after
    it are recorded as skipped, the row keeps what was measured."""
    H, D, B = args.heads, args.head_dim, 1
    N = case.n if case.grid is None else math.prod(case.grid)
    M = N
    row: dict = {"case": case.name, "pattern": case.source, "N": N, "grid": case.grid,
                 "tile": case.tile if case.attnc_block is None else case.attnc_block}

    def timed(key, fn):
        t0 = time.perf_counter()
        res = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        row[key] = (time.perf_counter() - t0) * 1e3
        return res

    def over(step: str) -> bool:
        if time.monotonic() > deadline:
            row.setdefault("skipped", []).append(step)
            return True
        return False

    pat = timed("parse_ms", lambda: attnc.loads(case.source).pattern(**case.params))
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn(B, H, M, D, generator=g).to(device=device, dtype=dtype)
    inputs = {}
    if case.routed_density is not None:
        inputs["sel"] = routed_selection(B, H, M, N, case.tile[0], case.routed_density, device)
    timer = Timer(device, args.warmup, args.reps)

    if not inputs:
        rep = timed("simulate_ms", lambda: pat.simulate(M, N, heads=H, head_dim=D, grid=case.grid, tile=case.attnc_block or case.tile,
                                                         gpu=args.gpu))
        row.update(density=rep.density, tile_bound=rep.tile_bound, predicted_speedup=rep.predicted_speedup,
                   predicted_speedup_bwd=rep.predicted_speedup_bwd)
    else:
        rep = None
        row.update(density=case.routed_density)

    # methods, most important first: the budget cuts from the end
    methods = {"attnc": lambda qq, kk, vv: pat(qq, kk, vv, grid=case.grid, backend=args.attnc_backend,
                                               block=case.attnc_block, **inputs)}
    if args.attnc_configs:  # the default config, set again before its calls (the others swap it)
        methods["attnc"] = _with_config(pat, case, inputs, None)  # None: the target's default
    for spec in args.attnc_configs or ():  # the same op with other kernel configs (tiles, warps, stages)
        methods[f"attnc@{spec}"] = _with_config(pat, case, inputs, KernelConfig.parse(spec))
    native_bm = attnc_bm = None
    if not args.no_flex:
        try:
            create_block_mask, flex_attention = _flex_api()
            _reset_compiler()
            flex = torch.compile(flex_attention, dynamic=False)
            if case.native is not None:
                kw = {"_compile": True} if device.type == "cuda" and "_compile" in inspect.signature(create_block_mask).parameters else {}
                row["native_compiled_block_mask"] = bool(kw)
                mask_mod = case.native(H)
                heads = H if getattr(mask_mod, "per_head", False) else None  # None: one mask for every head
                native_bm = timed("create_block_mask_ms", lambda: create_block_mask(
                    mask_mod, None, heads, M, N, device=device, BLOCK_SIZE=case.tile, **kw))
                methods["flex_native"] = lambda qq, kk, vv: flex(qq, kk, vv, block_mask=native_bm)
            if case.export and not args.no_export:
                _, attnc_bm = timed("attnc_to_flex_ms", lambda: pat.to_flex(M, N, heads=H, grid=case.grid, block=case.tile,
                                                                             device=device, **inputs))
                methods["flex_attnc_mask"] = lambda qq, kk, vv: flex(qq, kk, vv, block_mask=attnc_bm)
        except Exception as exc:  # recorded, the run goes on
            row["flex_error"] = f"{type(exc).__name__}: {exc}"[:300]

    def sdpa(qq, kk, vv):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)
    methods["dense_sdpa"] = sdpa

    # correctness first: masks, block masks, outputs on sampled rows
    rows = _sample_rows(M, args.check_rows)
    if case.native is not None and not over("check_native"):
        try:
            row["native_mask_mismatches"] = timed("check_native_ms", lambda: check_native(case, H, rows, device))
        except Exception as exc:
            row["check_native_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if native_bm is not None and attnc_bm is not None:
        try:
            (na, nf), (aa, af) = _blockmask_summary(native_bm), _blockmask_summary(attnc_bm)
            row["blockmask_tiles_native"], row["blockmask_tiles_attnc"] = int(na.sum()), int(aa.sum())
            row["blockmask_full_native"], row["blockmask_full_attnc"] = int(nf.sum()), int(af.sum())
            row["blockmask_equal"] = bool(torch.equal(na.expand_as(aa), aa) and torch.equal(nf.expand_as(af), af))
        except Exception as exc:
            row["blockmask_error"] = f"{type(exc).__name__}: {exc}"[:300]
    want = None
    if not over("reference"):
        try:
            with torch.no_grad():
                want = timed("reference_ms", lambda: reference_rows(pat, case, q, k, v, H, rows, inputs))
        except Exception as exc:
            row["reference_error"] = f"{type(exc).__name__}: {exc}"[:300]
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for name, f in methods.items():
        if want is None or name == "dense_sdpa" or over(f"{name}_check"):
            continue
        try:
            with torch.no_grad():
                out = f(q, k, v)
            diff = max(float((out[:, :, lo:hi].float() - w).abs().max()) for (lo, hi), w in zip(rows, want))
            row[f"{name}_max_abs_diff"] = diff
            if not diff <= tol:
                row.setdefault("mismatch", []).append(name)
            del out
        except Exception as exc:
            row[f"{name}_fwd_error"] = f"{type(exc).__name__}: {exc}"[:300]
    del want

    def fwd_bwd(f):
        def step():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            f(qq, kk, vv).backward(dout)
        return step

    for mode in ("fwd", "fwdbwd"):
        if mode == "fwdbwd" and args.fwd_only:
            continue
        for name, f in methods.items():
            if f"{name}_fwd_error" in row or over(f"{name}_{mode}"):
                continue
            fn = (lambda f=f: f(q, k, v)) if mode == "fwd" else fwd_bwd(f)
            try:
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    row[f"{name}_{mode}_ms"] = timer(fn)
            except OutOfBudget:
                raise
            except Exception as exc:
                row[f"{name}_{mode}_ms"] = None
                row[f"{name}_{mode}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    _ratios(row, rep)
    return row


def _with_config(pat, case: Case, inputs: dict, config):
    """The op on the Triton backend with `config` (None: the target's default): set at every
    call and left set, so the backward of a fwd+bwd step (run after this returns) uses it too;
    methods run one after another. Kernel sets are memoised per config: each compiles once."""
    from attnc.runtime.ops import get_backend

    def run(qq, kk, vv):
        get_backend("triton").configure(config)
        return pat(qq, kk, vv, grid=case.grid, backend="triton", block=case.attnc_block, **inputs)
    return run


def _ratios(row: dict, rep) -> None:
    for mode in ("fwd", "fwdbwd"):
        dense, ours = row.get(f"dense_sdpa_{mode}_ms"), row.get(f"attnc_{mode}_ms")
        if dense and ours:
            row[f"speedup_vs_dense_{mode}"] = dense / ours
        for peer in ("flex_native", "flex_attnc_mask"):
            theirs = row.get(f"{peer}_{mode}_ms")
            if theirs and ours:
                row[f"ratio_vs_{peer}_{mode}"] = theirs / ours
    if rep is not None and row.get("speedup_vs_dense_fwd"):
        row["fraction_of_tile_bound_fwd"] = row["speedup_vs_dense_fwd"] / rep.tile_bound


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    if isinstance(x, list):
        return ", ".join(map(str, x))
    return str(x)


def table(rows: list[dict]) -> str:
    cols = ["case", "density", "tile_bound", "predicted_speedup", "dense_sdpa_fwd_ms", "attnc_fwd_ms",
            "flex_native_fwd_ms", "flex_attnc_mask_fwd_ms", "speedup_vs_dense_fwd", "ratio_vs_flex_native_fwd",
            "ratio_vs_flex_attnc_mask_fwd", "fraction_of_tile_bound_fwd", "dense_sdpa_fwdbwd_ms", "attnc_fwdbwd_ms",
            "flex_native_fwdbwd_ms", "speedup_vs_dense_fwdbwd", "ratio_vs_flex_native_fwdbwd",
            "ratio_vs_flex_attnc_mask_fwdbwd"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    checks = ["case", "native_mask_mismatches", "blockmask_equal", "blockmask_tiles_native", "blockmask_tiles_attnc",
              "attnc_max_abs_diff", "flex_native_max_abs_diff", "flex_attnc_mask_max_abs_diff", "mismatch",
              "simulate_ms", "create_block_mask_ms", "attnc_to_flex_ms", "skipped"]
    lines += ["", "Checks (outputs vs a float32 reference on sampled query rows; mask_mod vs attnc's mask on those "
              "rows; setup times in ms):", "", "| " + " | ".join(checks) + " |", "|" + "---|" * len(checks)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in checks) + " |")
    variants = sorted({k[:-len("_fwd_ms")] for r in rows for k in r if k.startswith("attnc@") and k.endswith("_fwd_ms")})
    if variants:  # --attnc-configs: every config's times, and FlexAttention's (native) time over it
        lines += ["", "attnc kernel configs (ms; 'x flex' = native FlexAttention time / this config's time):", "",
                  "| case | config | max abs diff | fwd ms | x flex fwd | fwd+bwd ms | x flex fwd+bwd |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            for name in ["attnc"] + variants:
                cells = [r["case"], "default" if name == "attnc" else name[len("attnc@"):], fmt(r.get(f"{name}_max_abs_diff"))]
                for mode in ("fwd", "fwdbwd"):
                    ours, flex = r.get(f"{name}_{mode}_ms"), r.get(f"flex_native_{mode}_ms")
                    cells += [fmt(ours), fmt(flex / ours if ours and flex else None)]
                lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['case']}: {k} = {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    return "\n".join(lines + (["", "Errors / declines:"] + errors if errors else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", help="case names (default: all)")
    ap.add_argument("--subset", choices=sorted(SUBSETS), help="a named list of cases (e.g. issue23)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--gpu", default="h200", help="simulator GPU for the model columns")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="leave out FlexAttention fed attnc's export")
    ap.add_argument("--attnc-backend", default="auto")
    ap.add_argument("--attnc-configs", nargs="*", help="also time attnc's kernels with these configs, e.g. 128x64w8s3")
    ap.add_argument("--check-rows", type=int, default=256, help="query rows per sampled range in the output check")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run: each case gets an equal share of what is left; "
                         "steps past it are skipped and the results so far are written")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (harness check)")
    ap.add_argument("--out", help="append a markdown record (date, machine, versions, table) to this file")
    ap.add_argument("--json", help="write the rows as JSON to this file")
    args = ap.parse_args(argv)
    start = time.monotonic()

    if args.smoke:
        device, dtype, cases = torch.device("cpu"), torch.float32, smoke_cases()
        args.heads, args.head_dim = min(args.heads, 2), min(args.head_dim, 32)
        args.warmup, args.reps = 1, min(args.reps, 2)
    else:
        if not torch.cuda.is_available():
            print("benchmarks/gpu.py: no CUDA device; try --smoke to check the harness on CPU", file=sys.stderr)
            return 2
        device, dtype, cases = torch.device("cuda"), torch.bfloat16, CASES
    wanted = list(args.cases or []) + (SUBSETS[args.subset] if args.subset else [])
    if wanted:
        known = {c.name for c in cases}
        unknown = [c for c in wanted if c not in known]
        if unknown:
            print(f"unknown cases {unknown}; expected some of {sorted(known)}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.name in wanted]

    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    header = (f"## {datetime.date.today().isoformat()} — {machine}\n\n"
              f"torch {torch.__version__}, triton {_version('triton')}, attnc {attnc.__version__}, "
              f"python {platform.python_version()}; heads {args.heads}, head dim {args.head_dim}, "
              f"{'bf16' if dtype == torch.bfloat16 else dtype}, batch 1, median of {args.reps}"
              f"{f', budget {args.budget_s:.0f} s' if args.budget_s else ''}\n")
    keep = 0
    if args.out:
        with open(args.out, "a") as f:
            keep = f.tell()

    rows: list[dict] = []

    def write() -> str:
        """(Re)write the record: after every case, so a run cut short still leaves its rows."""
        text = table(rows)
        if args.out:
            with open(args.out, "r+") as f:
                f.seek(keep)
                f.truncate()
                f.write(header + "\n" + text + "\n\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1, default=str)
        return text

    end = start + args.budget_s if args.budget_s else math.inf
    old = None
    alarms = bool(args.budget_s) and hasattr(signal, "SIGALRM")
    # imports an alarm must never interrupt half-way (a partially initialised module breaks every later case)
    for mod in ("torch._dynamo", "attnc.runtime.triton_backend"):
        importlib.import_module(mod)
    if not args.no_flex:
        _flex_api()
    if alarms:  # a case past its share (a slow plan, a compile) is interrupted, the run goes on
        def alarm(signum, frame):
            raise OutOfBudget("case budget spent")
        old = signal.signal(signal.SIGALRM, alarm)
    try:
        for i, case in enumerate(cases):
            left = end - time.monotonic()
            if left <= 0:
                rows.append({"case": case.name, "pattern": case.source, "skipped": ["total budget"]})
                continue
            deadline = time.monotonic() + left / (len(cases) - i)
            print(f"[{time.monotonic() - start:6.1f} s] {case.name}: start (case budget "
                  f"{'-' if math.isinf(left) else f'{left / (len(cases) - i):.0f} s'})", flush=True)
            if alarms:  # the hard stop: the share plus a quarter (steps already check the deadline)
                signal.setitimer(signal.ITIMER_REAL, max(1.25 * (deadline - time.monotonic()), 0.01))
            try:
                row = run_case(case, args, device, dtype, deadline)
            except OutOfBudget as exc:
                row = {"case": case.name, "pattern": case.source,
                       "skipped": [f"{exc} after {time.monotonic() - deadline + left / (len(cases) - i):.0f} s"]}
            finally:
                if alarms:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            rows.append(row)
            print(f"[{time.monotonic() - start:6.1f} s] " + json.dumps({k: v for k, v in row.items() if not k.endswith("_error")},
                                                                       default=str), flush=True)
            write()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    print(write(), flush=True)
    return 0


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
