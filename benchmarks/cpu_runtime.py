"""CPU runtime, honestly measured: attnc's torch path against FlexAttention configured at
its best (compiled, with its own `create_block_mask` over a hand-written mask_mod, at the
block size of 64 and 128 that runs faster for the case), against
FlexAttention fed attnc's export, and against dense SDPA -- issue 19's cases.

    python benchmarks/cpu_runtime.py                          # every case, 5 repetitions
    python benchmarks/cpu_runtime.py --cases sliding-8k,nat-64 --repeat 3
    python benchmarks/cpu_runtime.py --memory                 # peak memory at N = 32768 (subprocesses)

One process, one thread, B = 1, H = 8, D = 64, float32. Per case, outputs of every
contender are checked equal to attnc's first (forward, 1e-4), and attnc's BlockMask to
create_block_mask's; then the contenders run interleaved, round-robin, `--repeat` times,
and the table shows medians of CPU time and wall time and the paired ratios (the median of
per-round ratios of CPU time). FlexAttention has no CPU backward, so fwd+bwd compares
attnc with dense SDPA, and with the simulator's tile bound (tiles_total / visited tiles).
`useful %` is attnc's throughput on allowed pairs (4 * D FLOPs each, forward) against a
single-thread 1024^3 float32 matmul measured in the same process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import attnc

from _report import FLEX_BLOCKS, fastest_flex_mask, timed


def _natten(L: int, W: int, size: int):
    """NATTEN's window on an L x W grid, written by hand (clamped window start per axis)."""
    r = size // 2

    def mask_mod(b, h, q, k):
        qh, qw, kh, kw = q // W, q % W, k // W, k % W
        sh = (qh - r).clamp(0, L - size)
        sw = (qw - r).clamp(0, W - size)
        return (kh >= sh) & (kh < sh + size) & (kw >= sw) & (kw < sw + size)

    return mask_mod


def _packed(N: int):
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[:7] + 1).values
    doc = torch.zeros(N, dtype=torch.int64)
    doc[cuts] = 1
    return doc.cumsum(0)


def _cases():
    """name -> (attnc source, grid, N, hand-written mask_mod, run-time inputs)."""
    out = {}
    for N in (8192, 16384):
        out[f"sliding-{N // 1024}k"] = ("pattern p = sliding(512) | (sink(4) & causal)", None, N,
                                        lambda b, h, q, k: (q >= k) & ((q - k < 512) | (k < 4)), {})
    for L in (64, 96):
        out[f"nat-{L}"] = ("pattern p on grid(h, w) = neighborhood(7)", (L, L), L * L, _natten(L, L, 7), {})
    out["duo-8k"] = ("pattern p = heads { {0, 1, 2, 3} => causal; _ => sliding(256) | (sink(64) & causal) }", None, 8192,
                     lambda b, h, q, k: (q >= k) & ((h < 4) | (q - k < 256) | (k < 64)), {})
    doc = _packed(16384)
    out["packed-16k"] = ("pattern p(doc: segments) = causal & same(doc)", None, 16384,
                         lambda b, h, q, k: (q >= k) & (doc[q] == doc[k]), {"doc": doc})
    out["blocked-64"] = ("pattern p on grid(h, w) = neighborhood(8, stride = 8)", (64, 64), 4096,
                         lambda b, h, q, k: (q // 64 // 8 == k // 64 // 8) & (q % 64 // 8 == k % 64 // 8), {})
    return out


def _timed(fn):
    """(wall ms, CPU ms) of one call."""
    return timed(fn)[1:]


def matmul_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = min(_timed(lambda: a @ b)[1] for _ in range(5))
    return 2 * 1024 ** 3 / (best / 1e3) / 1e9


def bench_case(name, src, grid, N, mask_mod, inputs, H, D, repeat, flex, dense_max=8192):
    per_head = name.startswith("duo")
    from torch.nn.attention.flex_attention import create_block_mask

    pat = attnc.loads(src).pattern()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    run = {}

    def attnc_fwd():
        with torch.no_grad():
            return pat(q, k, v, backend="torch", grid=grid, **inputs)

    run["attnc"] = attnc_fwd
    # FlexAttention at its best: its own compiled create_block_mask over the hand-written mask_mod,
    # one BlockMask for every head unless the mask reads h, at the block size (64 or 128) that
    # runs fastest for this case (median of 3 calls each, after a warm-up)
    block, own, own_ms, trial = fastest_flex_mask(
        lambda bs: torch.compile(create_block_mask)(mask_mod, None, H if per_head else None, N, N, device="cpu",
                                                    BLOCK_SIZE=bs),
        lambda m: flex(q, k, v, block_mask=m))
    own_ms = own_ms[block]
    t0 = time.perf_counter()
    _, exported = pat.to_flex(N if grid is None else None, heads=H, grid=grid, block=(block, block), **inputs)
    export_ms = (time.perf_counter() - t0) * 1e3
    assert torch.equal(*torch.broadcast_tensors(own.to_dense(), exported.to_dense())), \
        f"{name}: attnc's BlockMask differs from create_block_mask's"
    run["flex, own mask"] = lambda: flex(q, k, v, block_mask=own)
    run["flex, attnc export"] = lambda: flex(q, k, v, block_mask=exported)
    with torch.no_grad():
        ref = attnc_fwd()
        for impl in ("flex, own mask", "flex, attnc export"):
            got = run[impl]()
            err = float((got - ref).abs().max())
            assert err < 1e-4, f"{name}: {impl} differs from attnc by {err}"

    def attnc_fb():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        pat(qq, kk, vv, backend="torch", grid=grid, **inputs).sum().backward()

    mask = pat.mask(N, heads=H, grid=grid, **inputs)
    mask = mask[:1] if bool((mask == mask[:1]).all()) else mask
    dense = N <= dense_max  # SDPA's fwd+bwd holds H * N^2 float32 scores

    def sdpa_fb():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).sum().backward()

    fwd = {impl: [] for impl in run}
    fb = {"attnc": [], "SDPA": []} if dense else {"attnc": []}
    backward = {"attnc": attnc_fb, "SDPA": sdpa_fb}
    with torch.no_grad():
        for fn in run.values():
            fn()  # warm-up: schedules, compilation
    for impl in fb:
        backward[impl]()
    for _ in range(repeat):
        for impl, fn in run.items():
            with torch.no_grad():
                fwd[impl].append(_timed(fn))
        for impl in fb:
            fb[impl].append(_timed(backward[impl]))
    sim = pat.simulate(N, heads=H, head_dim=D, grid=grid, tile=(64, 64), **inputs)
    allowed = int(mask.sum()) * (H if mask.shape[0] == 1 else 1)
    return dict(name=name, N=N, fwd=fwd, fb=fb, bound=sim.tile_bound, allowed=allowed, own_ms=own_ms, export_ms=export_ms,
                block=block, trial=trial)


def _med(xs, i):
    return statistics.median(x[i] for x in xs)


def _paired(a, b):
    """median over rounds of b's CPU time / a's."""
    return statistics.median(y[1] / x[1] for x, y in zip(a, b))


def bench(args) -> None:
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 256  # every case is a new compiled FlexAttention graph
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    peak = matmul_gflops()
    cases = _cases()
    names = args.cases.split(",") if args.cases else list(cases)
    lines = [f"## CPU runtime vs FlexAttention at its best, {datetime.date.today()}, {platform.node()} "
             f"({platform.machine()}), torch {torch.__version__}, attnc {attnc.__version__}, python "
             f"{platform.python_version()}; threads {torch.get_num_threads()}, B=1 H={args.heads} D={args.head_dim} "
             f"fp32, medians of {args.repeat} interleaved rounds; single-thread 1024^3 matmul: {peak:.1f} GFLOP/s\n",
             "| case | attnc fwd ms (CPU / wall) | flex block (trial ms 64 / 128) | flex own-mask fwd ms | flex export fwd ms | flex own / attnc "
             "| flex export / flex own | attnc fwd+bwd ms | SDPA fwd+bwd ms | SDPA / attnc fwd+bwd | % of tile bound "
             "| useful % of matmul | create_block_mask ms / attnc export ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in names:
        src, grid, N, mm, inputs = cases[name]
        r = bench_case(name, src, grid, N, mm, inputs, args.heads, args.head_dim, args.repeat, flex)
        a, fo, fe = r["fwd"]["attnc"], r["fwd"]["flex, own mask"], r["fwd"]["flex, attnc export"]
        fa, fs = r["fb"]["attnc"], r["fb"].get("SDPA")
        useful = 4 * args.head_dim * r["allowed"] / (_med(a, 1) / 1e3) / 1e9 / peak * 100
        sdpa = (f"{_med(fs, 1):.0f} | {_paired(fa, fs):.2f}x | {100 * _med(fs, 1) / _med(fa, 1) / r['bound']:.0f}%"
                if fs else "n/a (N > 8192) | n/a | n/a")
        trial = " / ".join(f"{r['trial'][bs]:.0f}" for bs in FLEX_BLOCKS)
        row = (f"| {name} (N={N}) | {_med(a, 1):.0f} / {_med(a, 0):.0f} | {r['block']} ({trial}) "
               f"| {_med(fo, 1):.0f} / {_med(fo, 0):.0f} "
               f"| {_med(fe, 1):.0f} / {_med(fe, 0):.0f} | {_paired(a, fo):.2f}x | {_paired(fo, fe):.2f} "
               f"| {_med(fa, 1):.0f} | {sdpa} | {useful:.0f}% | {r['own_ms']:.0f} / {r['export_ms']:.0f} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")


# ----------------------------------------------------------------------------- peak memory (one process per case)


def memory_child(impl: str, N: int, grad: bool) -> None:
    torch.set_num_threads(1)
    pat = attnc.loads("pattern p = sliding(512) | (sink(4) & causal)").pattern()
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
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the table to this file")
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
