"""Many sequence lengths in one process (issue 16): first-call latency and steady-state
time of attnc vs FlexAttention over random lengths, side by side.

    python benchmarks/lengths.py                         # 20 random lengths 1K-32K, CPU, 1 thread
    python benchmarks/lengths.py --count 5 --max 8192    # a quick run
    python benchmarks/lengths.py --device cuda           # where a GPU is lent: attnc's Triton kernels

Per length, in random order, each contender runs once cold (first call: attnc
builds the plan / schedule, or on CUDA generates the module text and compiles only
when the text is new; FlexAttention builds its BlockMask with `create_block_mask`
and its compiled kernel recompiles for the new shape) and then `--repeat` times
warm (medians). Outputs are checked equal (float32, atol 1e-4) before any time is
kept. The pattern is an LLM sliding window with sinks (`--window`, `--sinks`),
FlexAttention gets its own native mask_mod for it (no attnc export). Both run
under torch.compile's default dynamic-shape policy (automatic dynamic after the
first recompile) with a raised recompile limit, so neither falls back to eager.
Prints a markdown table and the totals; `--out` appends it to a results file.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time

import torch

import attnc
from _report import emit


#: dtype -> the tolerance of the equality check between the contenders
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}


def now():
    return time.perf_counter(), time.process_time()


def timed(fn, sync=lambda: None):
    sync()
    w0, c0 = now()
    out = fn()
    sync()
    w1, c1 = now()
    return out, (w1 - w0) * 1e3, (c1 - c0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--min", type=int, default=1024)
    ap.add_argument("--max", type=int, default=32768)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(TOLERANCE), default=None,
                    help="default: float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    from torch._dynamo import config as dynamo_config
    dynamo_config.cache_size_limit = max(64, 2 * args.count)  # no silent eager fallback for flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min, args.max) for _ in range(args.count)]
    pat = attnc.loads(f"pattern llm(w = {args.window}, s = {args.sinks}) = sliding(w) | (sink(s) & causal)").pattern()
    backend = "triton" if args.device == "cuda" else "torch"
    W, S = args.window, args.sinks

    def mask_mod(b, h, q, kv):
        return (kv <= q) & ((q - kv < W) | (kv < S))

    flex = torch.compile(flex_attention)
    rows, tot = [], {"attnc": [0.0, 0.0], "flex": [0.0, 0.0]}
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=g).to(args.device, dtype) for _ in range(3))

        def run_attnc():
            return pat(q, k, v, backend=backend)

        def run_flex():
            bm = create_block_mask(mask_mod, None, None, n, n, device=args.device, BLOCK_SIZE=128)
            return flex(q, k, v, block_mask=bm)

        bm_warm = create_block_mask(mask_mod, None, None, n, n, device=args.device, BLOCK_SIZE=128)
        res = {}
        for name, first in (("attnc", run_attnc), ("flex", run_flex)):
            out, wall, cpu = timed(first, sync)
            res[name] = {"out": out, "first": wall, "first_cpu": cpu}
        torch.testing.assert_close(res["attnc"]["out"].float(), res["flex"]["out"].float(), atol=tol, rtol=tol)
        warm = {"attnc": run_attnc, "flex": lambda: flex(q, k, v, block_mask=bm_warm)}
        times = {"attnc": [], "flex": []}
        for _ in range(args.repeat):  # interleaved
            for name in ("attnc", "flex"):
                _, wall, _ = timed(warm[name], sync)
                times[name].append(wall)
        row = [n]
        for name in ("attnc", "flex"):
            steady = statistics.median(times[name])
            row += [res[name]["first"], steady]
            tot[name][0] += res[name]["first"]
            tot[name][1] += steady
        rows.append(row)
        print(f"N={n}: attnc first {row[1]:.0f} ms, steady {row[2]:.1f} ms | flex first {row[3]:.0f} ms, "
              f"steady {row[4]:.1f} ms", file=sys.stderr)
    lines = [f"## {time.strftime('%Y-%m-%d')} {platform.node()} {args.device}, {args.threads} thread(s); "
             f"torch {torch.__version__}, attnc {attnc.__version__}",
             "",
             f"sliding({W}) | (sink({S}) & causal), H={args.heads}, D={args.dim}, {dtype_name}, {args.count} random lengths "
             f"{args.min}-{args.max} (seed {args.seed}), median of {args.repeat} warm runs; wall ms",
             "",
             "| N | attnc first | attnc steady | flex first | flex steady | first: flex/attnc | steady: flex/attnc |",
             "|---|---|---|---|---|---|---|"]
    for n, af, a_s, ff, fs in rows:
        lines.append(f"| {n} | {af:.0f} | {a_s:.1f} | {ff:.0f} | {fs:.1f} | {ff / af:.2f} | {fs / a_s:.2f} |")
    lines += ["", f"totals: first calls attnc {tot['attnc'][0] / 1e3:.1f} s, flex {tot['flex'][0] / 1e3:.1f} s "
                  f"(flex/attnc {tot['flex'][0] / tot['attnc'][0]:.2f}); steady attnc {tot['attnc'][1] / 1e3:.2f} s, "
                  f"flex {tot['flex'][1] / 1e3:.2f} s (flex/attnc {tot['flex'][1] / tot['attnc'][1]:.2f})", ""]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
