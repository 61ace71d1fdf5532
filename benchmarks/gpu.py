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
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import attnc


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    params: dict = field(default_factory=dict)
    n: int | None = None  # 1-D length
    grid: tuple[int, ...] | None = None
    tile: tuple[int, int] = (128, 128)
    routed_density: float | None = None  # for `sel: blocks(b)` inputs: fraction of key blocks chosen per query block


CASES = [
    Case("1d-w2k", "pattern p(w = 2048) = neighborhood(w)", n=32768),
    Case("1d-w2k-s256", "pattern p(w = 2048) = neighborhood(w, stride = 256)", n=32768),
    Case("2d-w80", "pattern p on grid(h, w) = neighborhood((80, 80))", grid=(256, 256)),
    Case("2d-w80-s16", "pattern p on grid(h, w) = neighborhood((80, 80), stride = (16, 16))", grid=(256, 256)),
    Case("3d-w18x24x24", "pattern p on grid(t, h, w) = neighborhood((18, 24, 24))", grid=(30, 48, 80)),
    Case("3d-w18x24x24-s16x8x8", "pattern p on grid(t, h, w) = neighborhood((18, 24, 24), stride = (16, 8, 8))",
         grid=(30, 48, 80)),
    Case("llm-32k", "pattern p = causal & (sliding(4096) | sink(64))", n=32768),
    Case("llm-128k", "pattern p = causal & (sliding(4096) | sink(64))", n=131072),
    Case("per-head-32k", "pattern p = heads { 0 .. H // 4 => causal; _ => causal & (sliding(1024) | sink(64)) }",
         n=32768),
    Case("routed-10pct-32k", "pattern p(sel: blocks(64)) = routed(sel)", n=32768, tile=(64, 64), routed_density=0.1),
]

SMOKE = {  # same structure, sizes a CPU handles in seconds
    "1d-w2k": dict(n=512, params={"w": 64}),
    "1d-w2k-s256": dict(n=512, params={"w": 64}, source="pattern p(w = 64) = neighborhood(w, stride = 16)"),
    "2d-w80": dict(grid=(16, 16), source="pattern p on grid(h, w) = neighborhood((5, 5))"),
    "llm-32k": dict(n=512, source="pattern p = causal & (sliding(64) | sink(4))"),
    "per-head-32k": dict(n=512, source="pattern p = heads { 0 .. H // 4 => causal; _ => causal & (sliding(64) | sink(4)) }"),
    "routed-10pct-32k": dict(n=512),
}


def smoke_cases() -> list[Case]:
    out = []
    for c in CASES:
        if c.name in SMOKE:
            kw = {"n": c.n, "grid": c.grid, "params": c.params, "source": c.source, **SMOKE[c.name]}
            if kw["grid"] is not None:
                kw["n"] = None
            out.append(Case(c.name, kw["source"], kw["params"], kw["n"], kw["grid"], (64, 64), c.routed_density))
    return out


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


def run_case(case: Case, args, device: torch.device, dtype: torch.dtype) -> dict:
    pat = attnc.loads(case.source).pattern(**case.params)
    H, D, B = args.heads, args.head_dim, 1
    N = case.n if case.grid is None else math.prod(case.grid)
    M = N
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn(B, H, M, D, generator=g).to(device=device, dtype=dtype)
    inputs = {}
    if case.routed_density is not None:
        inputs["sel"] = routed_selection(B, H, M, N, case.tile[0], case.routed_density, device)
    timer = Timer(device, args.warmup, args.reps)
    row: dict = {"case": case.name, "pattern": case.source, "N": N, "grid": case.grid, "tile": case.tile}

    rep = None
    if not inputs:
        rep = pat.simulate(M, N, heads=H, head_dim=D, grid=case.grid, tile=case.tile, gpu=args.gpu)
        row.update(density=rep.density, tile_bound=rep.tile_bound, predicted_speedup=rep.predicted_speedup,
                   predicted_speedup_bwd=rep.predicted_speedup_bwd)
    else:
        row.update(density=case.routed_density)

    def fwd_bwd(f):
        def step():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            f(qq, kk, vv).backward(dout)
        return step

    methods = {}

    def sdpa(qq, kk, vv):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)
    methods["dense_sdpa"] = sdpa
    methods["attnc"] = lambda qq, kk, vv: pat(qq, kk, vv, grid=case.grid, backend=args.attnc_backend, **inputs)

    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        try:
            t0 = time.perf_counter()
            mask_mod, bm = pat.to_flex(M, N, heads=H, grid=case.grid, block=case.tile, **inputs)
            row["attnc_plan_ms"] = (time.perf_counter() - t0) * 1e3
            methods["flex_attnc_mask"] = lambda qq, kk, vv: flex(qq, kk, vv, block_mask=bm)
            t0 = time.perf_counter()
            cbm = create_block_mask(mask_mod, 1, H, M, N, device=device, BLOCK_SIZE=case.tile)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["create_block_mask_ms"] = (time.perf_counter() - t0) * 1e3
            methods["flex_create_block_mask"] = lambda qq, kk, vv: flex(qq, kk, vv, block_mask=cbm)
        except Exception as exc:  # recorded, the run goes on
            row["flex_error"] = f"{type(exc).__name__}: {exc}"[:300]

    for name, f in methods.items():
        for mode, fn in (("fwd", lambda f=f: f(q, k, v)), ("fwdbwd", fwd_bwd(f))):
            if mode == "fwdbwd" and args.fwd_only:
                continue
            try:
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    row[f"{name}_{mode}_ms"] = timer(fn)
            except Exception as exc:
                row[f"{name}_{mode}_ms"] = None
                row[f"{name}_{mode}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for mode in ("fwd", "fwdbwd"):
        dense, ours = row.get(f"dense_sdpa_{mode}_ms"), row.get(f"attnc_{mode}_ms")
        if dense and ours:
            row[f"speedup_vs_dense_{mode}"] = dense / ours
        for peer in ("flex_attnc_mask", "flex_create_block_mask"):
            theirs = row.get(f"{peer}_{mode}_ms")
            if theirs and ours:
                row[f"ratio_vs_{peer}_{mode}"] = theirs / ours
    if rep is not None and row.get("speedup_vs_dense_fwd"):
        row["fraction_of_tile_bound_fwd"] = row["speedup_vs_dense_fwd"] / rep.tile_bound
    return row


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table(rows: list[dict]) -> str:
    cols = ["case", "density", "tile_bound", "predicted_speedup", "dense_sdpa_fwd_ms", "attnc_fwd_ms",
            "flex_attnc_mask_fwd_ms", "flex_create_block_mask_fwd_ms", "speedup_vs_dense_fwd",
            "ratio_vs_flex_attnc_mask_fwd", "fraction_of_tile_bound_fwd", "dense_sdpa_fwdbwd_ms",
            "attnc_fwdbwd_ms", "speedup_vs_dense_fwdbwd", "ratio_vs_flex_attnc_mask_fwdbwd"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    errors = [f"- {r['case']}: {k} = {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    return "\n".join(lines + (["", "Errors / declines:"] + errors if errors else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", help="case names (default: all)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--gpu", default="h200", help="simulator GPU for the model columns")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--attnc-backend", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (harness check)")
    ap.add_argument("--out", help="append a markdown record (date, machine, versions, table) to this file")
    ap.add_argument("--json", help="write the rows as JSON to this file")
    args = ap.parse_args(argv)

    if args.smoke:
        device, dtype, cases = torch.device("cpu"), torch.float32, smoke_cases()
        args.heads, args.head_dim = min(args.heads, 2), min(args.head_dim, 32)
        args.warmup, args.reps = 1, min(args.reps, 2)
    else:
        if not torch.cuda.is_available():
            print("benchmarks/gpu.py: no CUDA device; try --smoke to check the harness on CPU", file=sys.stderr)
            return 2
        device, dtype, cases = torch.device("cuda"), torch.bfloat16, CASES
    if args.cases:
        known = {c.name for c in cases}
        unknown = [c for c in args.cases if c not in known]
        if unknown:
            print(f"unknown cases {unknown}; expected some of {sorted(known)}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.name in args.cases]

    rows = []
    for case in cases:
        row = run_case(case, args, device, dtype)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_error")}, default=str), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = table(rows)
    print(text)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    header = (f"## {datetime.date.today().isoformat()} — {machine}\n\n"
              f"torch {torch.__version__}, triton {_version('triton')}, attnc {attnc.__version__}, "
              f"python {platform.python_version()}; heads {args.heads}, head dim {args.head_dim}, "
              f"{'bf16' if dtype == torch.bfloat16 else dtype}, batch 1, median of {args.reps}\n")
    if args.out:
        with open(args.out, "a") as f:
            f.write(header + "\n" + text + "\n\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
