"""Plan build time and peak memory: attnc's closed-form plan vs FlexAttention's
create_block_mask (torch.compile'd, warm), side by side, same pattern.

    python benchmarks/plan_build.py [--sizes 16384 65536 131072] [--out benchmarks/results/plan_build.md]
    python benchmarks/plan_build.py --large     # MM-DiT-sized grids attnc alone (create_block_mask: 69 G pairs)

Pattern: causal sliding window 512 + 4 sink tokens, 128x128 tiles, B = H = 1.
Each measurement runs in a fresh subprocess so peak RSS is its own; attnc is
measured cold (first call in the process: nothing cached, not even torch's and
numpy's first-call setup of each kernel), "new" (first plan of this pattern and
size in a process that has already planned another pattern: what a running
program pays for a new layer) and warm (median of later calls of the same plan);
create_block_mask warm (median after compilation).
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

SRC = "pattern p = sliding(512) | (sink(4) & causal)"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(method: str, n: int, repeats: int) -> dict:
    import torch

    if method == "attnc-new":
        import attnc
        pat = attnc.loads(SRC).pattern()
        attnc.loads("pattern other = band(64, 64)").pattern().plan(n // 4, block=(64, 64))
        times = []
        for w in range(repeats):  # a different window each time: never the same plan twice
            pat_w = attnc.loads(SRC.replace("512", str(512 - 8 * (w + 1)))).pattern()
            t = time.perf_counter()
            pat_w.plan(n, block=(128, 128))
            times.append(time.perf_counter() - t)
        return {"new_ms": statistics.median(times) * 1e3}
    if method == "attnc":
        import attnc
        pat = attnc.loads(SRC).pattern()
        base = rss_mb()
        t = time.perf_counter()
        plan = pat.plan(n, block=(128, 128))
        cold = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            pat.plan(n, block=(128, 128))
            times.append(time.perf_counter() - t)
        c = plan.counts()
        return {"cold_ms": cold * 1e3, "warm_ms": statistics.median(times) * 1e3, "peak_mb": rss_mb() - base,
                "tiles": c["tiles_full"] + c["tiles_partial"], "method": plan.method}
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return (k <= q) & ((q - k < 512) | (k < 4))

    fn = torch.compile(create_block_mask)
    base = rss_mb()
    t = time.perf_counter()
    bm = fn(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=128)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=128)
        times.append(time.perf_counter() - t)
    tiles = int(bm.kv_num_blocks.sum() + (bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0))
    return {"cold_ms": first * 1e3, "warm_ms": statistics.median(times) * 1e3, "peak_mb": rss_mb() - base, "tiles": tiles}


def measure(method: str, n: int, repeats: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--one", method, str(n), "--repeats", str(repeats)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": tail[:120]}
    return json.loads(r.stdout.strip().splitlines()[-1])


LARGE = [
    ("neighborhood (closed form)", "pattern p(text = 512) on seq(text) + grid(h, w) = global(0 .. text) | neighborhood(17)"),
    ("circle, where (tile boxes)", "pattern p(text = 512) on seq(text) + grid(h, w) = "
                                   "global(0 .. text) | where (q.h - k.h)**2 + (q.w - k.w)**2 < 3*3"),
]


def large() -> list[str]:
    """512x512 image + 512 text tokens (262 656 tokens), 128x128 tiles: attnc only."""
    import attnc
    lines = ["| pattern (512 text + 512x512 grid) | method | build s | tiles full + partial | undecided tiles evaluated |",
             "|---|---|---|---|---|"]
    for label, src in LARGE:
        pat = attnc.loads(src).pattern()
        t = time.perf_counter()
        plan = pat.plan(512 + 512 * 512, grid=(512, 512), block=(128, 128))
        dt = time.perf_counter() - t
        c = plan.counts()
        lines.append(f"| {label} | {plan.method} | {dt:.1f} | {c['tiles_full']} + {c['tiles_partial']} | {plan.tiles_evaluated} |")
        print(lines[-1], flush=True)
    return lines


PRODUCT = "pattern p on grid(h, w) = neighborhood((80, 80))"


def products(evaluated: bool) -> list[str]:
    """A per-axis product with more than 64 intervals per query (no per-query closed form) on a
    256x256 grid: plan with 1-D 128x128 tiles, plan with N-D (16, 8) tiles, and simulate, in CPU
    seconds. `evaluated`: the path before ProductCounts (tile boxes, every undecided tile evaluated)."""
    import attnc
    from attnc import analysis, interval_sets, products
    if evaluated:
        def declined(*args, **kwargs):
            raise interval_sets.NotIntervals("declined: measuring the evaluated path")
        products.ProductCounts.counts = declined
        analysis.axis_masks = declined  # the plan drivers' per-axis masks (tile counts, N-D plans)
    pat = attnc.loads(PRODUCT).pattern()
    lines = [f"`{PRODUCT}`, 256x256 grid (65 536 tokens), {'evaluated' if evaluated else 'product counts'}:", "",
             "| step | CPU s | wall s | method | tiles full + partial | allowed |", "|---|---|---|---|---|---|"]
    for label, run in (("plan, 1-D tiles 128x128", lambda: pat.plan(65536, grid=(256, 256), block=(128, 128))),
                       ("plan, N-D tiles (16, 8)", lambda: pat.plan(65536, grid=(256, 256), block=((16, 8), (16, 8)))),
                       ("simulate, 1-D tiles 128x128", lambda: pat.simulate(65536, grid=(256, 256))),
                       ("simulate, N-D tiles (16, 8)", lambda: pat.simulate(65536, grid=(256, 256), tile=((16, 8), (16, 8))))):
        c0, w0 = time.process_time(), time.perf_counter()
        out = run()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if hasattr(out, "counts"):
            c = out.counts()
            tiles, allowed = f"{c['tiles_full']} + {c['tiles_partial']}", out.allowed
        else:
            tiles, allowed = f"{out.tiles_full} + {out.tiles_partial}", f"density {out.density:.6f}"
        lines.append(f"| {label} | {cpu:.2f} | {wall:.2f} | {out.method} | {tiles} | {allowed} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "N"))
    ap.add_argument("--large", action="store_true", help="time the 262 656-token grid plans instead")
    ap.add_argument("--products", action="store_true", help="time the 256x256 neighborhood((80, 80)) plans instead")
    ap.add_argument("--evaluated", action="store_true", help="with --products: the path before product counts")
    args = ap.parse_args()
    if args.products:
        print("\n".join(products(args.evaluated)))
        return
    if args.large:
        large()
        return
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.repeats)))
        return
    import torch
    lines = [f"# plan build: attnc vs create_block_mask ({datetime.date.today()})", "",
             f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores; "
             f"python {platform.python_version()}, torch {torch.__version__}", f"pattern: `{SRC}`, tiles 128x128, B = H = 1", "",
             "| N | attnc cold ms | attnc new ms | attnc warm ms | attnc peak MB | create_block_mask warm ms | cbm peak MB | cold-attnc vs warm-cbm | new-attnc vs warm-cbm | warm ratio | tiles (attnc / cbm) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        a = measure("attnc", n, args.repeats, args.timeout)
        a.update(measure("attnc-new", n, args.repeats, args.timeout))
        f = measure("flex", n, args.repeats, args.timeout)
        if "error" in f:
            row = (f"| {n} | {a.get('cold_ms', 0):.1f} | {a.get('new_ms', 0):.1f} | {a.get('warm_ms', 0):.1f} | "
                   f"{a.get('peak_mb', 0):.0f} | {f['error']} | - | - | - | - | {a.get('tiles')} / - |")
        else:
            row = (f"| {n} | {a['cold_ms']:.1f} | {a['new_ms']:.1f} | {a['warm_ms']:.1f} | {a['peak_mb']:.0f} | "
                   f"{f['warm_ms']:.1f} | {f['peak_mb']:.0f} | {f['warm_ms'] / a['cold_ms']:.1f}x | "
                   f"{f['warm_ms'] / a['new_ms']:.1f}x | {f['warm_ms'] / a['warm_ms']:.1f}x | {a['tiles']} / {f['tiles']} |")
        print(row, flush=True)
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
