"""CPU runtime benchmark: attnc's block-sparse torch path vs compiled FlexAttention
(with attnc's BlockMask) vs dense masked SDPA, side by side in one run.

    python benchmarks/cpu_runtime.py                       # N = 2048, 4096, 8192; H = 8, D = 64
    python benchmarks/cpu_runtime.py --sizes 16384,32768   # big sizes (dense SDPA skipped above --dense-max)
    python benchmarks/cpu_runtime.py --memory              # peak memory at N = 32768, window 512 (subprocesses)

Prints medians (ms) and ratios; forward and forward+backward. FlexAttention
has no CPU backward, so its fwd+bwd column says n/a. `tile bound` is the
simulator's tiles_total / visited tiles at 128x128 (the ceiling of a tile-
skipping kernel over dense). Threads default to 1: on a shared machine,
OpenMP contention makes multi-threaded timings meaningless.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import attnc

PATTERNS = {
    # name: (source, layout) -- grids are (N // 64, 64) so every N of the sweep is a grid
    "sliding+sinks": ("pattern p = sliding(512) | (sink(4) & causal)", "seq"),
    "natten2d 13x13": ("pattern p on grid(h, w) = neighborhood(13)", "grid"),
    "per-head mix": ("pattern p(H2 = H // 2) = heads { 0 .. H2 => sliding(256) | (sink(4) & causal); "
                     "_ => band(64, 64) | global(0 .. 16) }", "seq"),
}


def grid_for(layout: str, N: int):
    return (N // 64, 64) if layout == "grid" else None


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up: schedules, plans, compilation
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def runners(pat, grid, q, k, v, H, N, with_flex: bool, with_dense: bool):
    """name -> (forward fn, forward+backward fn or None)."""
    out = {}

    def attnc_fwd():
        with torch.no_grad():
            pat(q, k, v, backend="torch", grid=grid)

    def attnc_fb():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        pat(qq, kk, vv, backend="torch", grid=grid).sum().backward()

    out["attnc torch"] = (attnc_fwd, attnc_fb)
    if with_flex:
        from torch.nn.attention.flex_attention import flex_attention
        _, bm = pat.to_flex(N, heads=H, grid=grid, block=(128, 128))
        flex = torch.compile(flex_attention, dynamic=False)

        def flex_fwd():
            with torch.no_grad():
                flex(q, k, v, block_mask=bm)

        out["flex (compiled)"] = (flex_fwd, None)
    if with_dense:
        mask = pat.mask(N, heads=H, grid=grid)
        mask = mask[:1] if bool((mask == mask[:1]).all()) else mask

        def sdpa_fwd():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        def sdpa_fb():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).sum().backward()

        out["dense SDPA"] = (sdpa_fwd, sdpa_fb)
    return out


def bench(args) -> None:
    torch.set_num_threads(args.threads)
    # every (pattern, N) is a new compiled FlexAttention graph; past dynamo's
    # recompile limit (8) flex_attention silently runs unfused and dense
    torch._dynamo.config.recompile_limit = 256
    print(f"# attnc {attnc.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, threads {torch.get_num_threads()}, B=1 H={args.heads} D={args.head_dim} fp32")
    for name in args.patterns.split(","):
        src, layout = PATTERNS[name]
        pat = attnc.loads(src).pattern()
        print(f"\n## {name}: `{src[len('pattern p'):].strip()}`")
        print("| N | tile bound | attnc fwd ms | flex fwd ms | SDPA fwd ms | flex/attnc fwd | SDPA/attnc fwd "
              "| attnc fwd+bwd ms | SDPA fwd+bwd ms | SDPA/attnc fwd+bwd | % of tile bound |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for N in [int(s) for s in args.sizes.split(",")]:
            grid = grid_for(layout, N)
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, args.heads, N, args.head_dim) for _ in range(3))
            bound = pat.simulate(N, heads=args.heads, head_dim=args.head_dim, grid=grid).tile_bound
            run = runners(pat, grid, q, k, v, args.heads, N, not args.no_flex, N <= args.dense_max)
            res = {}
            for impl, (fwd, fb) in run.items():
                try:
                    res[impl] = (median_ms(fwd, args.repeat), median_ms(fb, args.repeat) if fb else None)
                except Exception as exc:  # a competitor that cannot run here: say so in the table
                    print(f"<!-- {impl} failed at N={N}: {type(exc).__name__}: {str(exc)[:120]} -->")
            a_f, a_fb = res["attnc torch"]
            fl = res.get("flex (compiled)", (None, None))[0]
            d_f, d_fb = res.get("dense SDPA", (None, None))
            fmt = lambda x: "n/a" if x is None else f"{x:.0f}"  # noqa: E731
            ratio = lambda a, b: "n/a" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
            of_bound = "n/a" if d_fb is None else f"{100 * d_fb / a_fb / bound:.0f}%"
            print(f"| {N} | {bound:.1f} | {fmt(a_f)} | {fmt(fl)} | {fmt(d_f)} | {ratio(fl, a_f)} | {ratio(d_f, a_f)} "
                  f"| {fmt(a_fb)} | {fmt(d_fb)} | {ratio(d_fb, a_fb)} | {of_bound} |", flush=True)
    print("\nflex fwd+bwd: n/a -- FlexAttention has no CPU backward (torch.compile on CPU supports inference only).")


# ----------------------------------------------------------------------------- peak memory (one process per case)


def memory_child(impl: str, N: int, grad: bool) -> None:
    torch.set_num_threads(1)
    pat = attnc.loads(PATTERNS["sliding+sinks"][0]).pattern()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, N, 64, requires_grad=grad) for _ in range(3))
    mask = pat.mask(N) if impl == "sdpa" else None  # the dense mask is part of SDPA's cost
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if impl == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = pat(q, k, v, backend="torch")
    if grad:
        out.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mask_mb = 0 if mask is None else mask.numel() / 2**20
    print(json.dumps({"peak_mb": (peak - base) / 1024 + mask_mb}))


def memory(args) -> None:
    N = 32768
    print(f"## peak memory above inputs, N={N}, B=1, H=1, D=64, sliding(512) | sink(4), fp32 "
          f"(ru_maxrss growth; SDPA includes its [N, N] bool mask)")
    print("| impl | forward MB | forward+backward MB |")
    print("|---|---|---|")
    rows = {}
    for impl in ("attnc", "sdpa"):
        vals = []
        for grad in (False, True):
            cmd = [sys.executable, __file__, "--memory-child", impl, str(N), str(int(grad))]
            r = subprocess.run(cmd, capture_output=True, text=True)
            vals.append(json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"] if r.returncode == 0 else None)
        rows[impl] = vals
        print(f"| {impl} | " + " | ".join("failed" if x is None else f"{x:.0f}" for x in vals) + " |", flush=True)
    a, d = rows["attnc"], rows["sdpa"]
    for i, what in enumerate(("forward", "forward+backward")):
        if a[i] is not None and d[i]:
            print(f"attnc / SDPA peak memory, {what}: {100 * a[i] / d[i]:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,4096,8192")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-max", type=int, default=8192, help="largest N for dense SDPA (O(N^2) time and memory)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--memory", action="store_true", help="peak memory at N=32768 instead of timings")
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        impl, N, grad = args.memory_child
        memory_child(impl, int(N), bool(int(grad)))
    elif args.memory:
        memory(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
