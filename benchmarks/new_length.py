"""What a new sequence length costs on the host before the GPU kernels can run: attnc's
Triton backend (plan, closed-form loop bounds and their replay check, the module text; no
compilation when the text was seen, which is the case here) vs FlexAttention's
`create_block_mask` for that length (compiled, dynamic shapes, warm). Runs on the CPU
(TRITON_INTERPRET=1 so no GPU is needed: the host work is the same), one thread,
contenders interleaved per length, medians of wall and CPU time.

    python benchmarks/new_length.py                      # 12 random lengths 4K-32K, H = 16
    python benchmarks/new_length.py --count 4 --out benchmarks/results/new_length_cpu.md

The BlockMask and attnc's plan are checked equal at every length first (same 128x128
tiles, full / partial classes; the ragged last row and column are left out of the check:
create_block_mask also evaluates the mask at padded positions). attnc's numbers are for a pattern and config already
compiled at another length: the one-time compile is not in them (on an H200 it is ~4 s for
the first length; benchmarks/results/lengths_gpu_h200.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from _report import emit, timed  # noqa: E402

import attnc  # noqa: E402
from attnc.runtime.backend import Call  # noqa: E402
from attnc.runtime.triton_backend import TritonBackend  # noqa: E402
from attnc.codegen.kernels import KernelConfig  # noqa: E402

CASES = {  # name -> (pattern source, FlexAttention mask_mod)
    "sliding1024+sinks4": ("pattern p = sliding(1024) | (sink(4) & causal)",
                           lambda b, h, q, k: (k <= q) & ((q - k < 1024) | (k < 4))),
    "neighborhood2048": ("pattern p = neighborhood(2048)",
                         lambda b, h, q, k: (k >= torch.minimum(torch.clamp(q - 1024, min=0), N_NOW - 2048))
                         & (k < torch.minimum(torch.clamp(q - 1024, min=0), N_NOW - 2048) + 2048)),
    "causal": ("pattern p = causal", lambda b, h, q, k: k <= q),
}
#: the current length, read by the neighbourhood's mask_mod: a captured tensor updated in place, so
#: FlexAttention does not recompile per length (its best configuration)
N_NOW = torch.tensor(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--min", type=int, default=4096)
    ap.add_argument("--max", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from torch._dynamo import config as dynamo_config
    from torch.nn.attention.flex_attention import create_block_mask

    dynamo_config.cache_size_limit = 256
    cbm = torch.compile(create_block_mask)
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min, args.max) for _ in range(args.count)]
    config = KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)
    lines = [f"## {datetime.date.today()} {platform.node()} CPU, 1 thread; torch {torch.__version__}, "
             f"attnc {attnc.__version__}, python {platform.python_version()}",
             "",
             f"H={args.heads}, 128x128 tiles, {args.count} random lengths {args.min}-{args.max} (seed {args.seed}) after "
             f"two warm-up lengths; ms per new length (median over the lengths)",
             "",
             "| case | attnc wall | attnc cpu | create_block_mask wall | create_block_mask cpu | wall: flex/attnc | "
             "cpu: flex/attnc |",
             "|---|---|---|---|---|---|---|"]
    for name in args.cases:
        src, mask_mod = CASES[name]
        pat = attnc.loads(src).pattern()
        be = TritonBackend(config)
        rows = {"attnc": ([], []), "flex": ([], [])}
        for i, n in enumerate([2048, 3000] + lengths):  # the first two: compile / go dynamic
            N_NOW.fill_(n)
            call = Call(pattern=pat, B=1, Hq=args.heads, Hkv=args.heads, M=n, N=n, D=64, Dv=64, grid=None,
                        scale=0.125, inputs={})
            ks, aw, ac = timed(lambda: be.kernels(call, "cpu"))
            bm, fw, fc = timed(lambda: cbm(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=128))
            plan = call.plan((128, 128))
            want = plan.to_dense()[0]
            got = torch.zeros_like(want)
            nb = bm.kv_num_blocks[0, 0]
            for r in range(want.shape[0]):
                got[r, bm.kv_indices[0, 0, r, :nb[r]].long()] = 1
            fnb = bm.full_kv_num_blocks[0, 0]
            for r in range(want.shape[0]):
                got[r, bm.full_kv_indices[0, 0, r, :fnb[r]].long()] = 2
            whole = n // 128  # create_block_mask also evaluates padded positions: compare whole tiles only
            if not torch.equal(got[:whole, :whole], want.to(got.dtype)[:whole, :whole]):
                sys.exit(f"{name} at {n}: the BlockMask differs from attnc's plan")
            if i >= 2:
                rows["attnc"][0].append(aw), rows["attnc"][1].append(ac)
                rows["flex"][0].append(fw), rows["flex"][1].append(fc)
            print(f"{name} N={n}: attnc {aw:.1f} ms, create_block_mask {fw:.1f} ms", file=sys.stderr)
        a = [statistics.median(x) for x in rows["attnc"]]
        f = [statistics.median(x) for x in rows["flex"]]
        lines.append(f"| {name} | {a[0]:.1f} | {a[1]:.1f} | {f[0]:.1f} | {f[1]:.1f} | {f[0] / a[0]:.2f} | {f[1] / a[1]:.2f} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
