"""Context parallelism on CPU: R gloo ranks against one process, and the simulator at scale.

    python benchmarks/distributed.py                      # 2 and 4 ranks, three patterns
    python benchmarks/distributed.py --ranks 2 --out benchmarks/results/distributed_cpu.md

Each case (H = 8, D = 64, float32, one thread per process): the single-process op
(`pat(q, k, v)`, torch path) and `attnc.distributed.attention` on R spawned gloo ranks,
interleaved -- in each repetition rank 0 runs the single-process step while the other ranks
wait at a barrier, then every rank runs its shard. Outputs (and gradients) are checked equal
first. A distributed step's time is the slowest rank's. Bytes are what each rank handed to
`all_to_all_single`, beside the simulator's prediction and plain ring attention's volume.

The second table is the simulator alone (`attnc.sharding`) at 10^5 - 10^6 tokens and
8 - 1024 ranks, bf16, D = 128: the most bytes one rank receives per forward, against ring
attention's, and the work imbalance.

This machine has 2 cores: with 4 ranks they share them, so the wall-time speedup is
bounded by 2 whatever the exchange costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import attnc
import attnc.distributed as cp

from _report import emit

EX = Path(__file__).resolve().parent.parent / "examples"

CASES = [
    # label, example, params, sizes
    ("sliding 512 + 4 sinks, N=16384", "streaming_llm.attn", {"recent": 512}, {"seq_len": 16384}),
    ("NATTEN 7x7 on 128x128", "natten2d.attn", {"size": 7}, {"grid": (128, 128)}),
    ("causal, N=8192", None, {}, {"seq_len": 8192}),
]

SCALE = [
    # label, example or source, params, sizes, heads
    ("streaming_llm 1024 + 4, N=1M", "streaming_llm.attn", {}, {"seq_len": 1 << 20}, 8),
    ("HunyuanVideo 30x48x80, NATTEN (18, 24, 24)", "natten3d.attn", {"size": (18, 24, 24)}, {"grid": (30, 48, 80)}, 8),
    ("duo (3 of 12 heads causal), N=128K", "duo.attn", {}, {"seq_len": 1 << 17}, 12),
    ("causal, N=1M", None, {}, {"seq_len": 1 << 20}, 8),
]


def _pattern(file, params):
    return attnc.load(EX / file).pattern(**params) if file else attnc.loads("pattern causal_lm = causal").pattern()


def _worker(rank, world, store, repeat, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for (gloo's own connections use free ports)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    real = dist.all_to_all_single
    sent = [0]

    def counting(output, input, *a, **kw):
        sent[0] += input.numel() * input.element_size()
        return real(output, input, *a, **kw)

    dist.all_to_all_single = counting
    rows = []
    for label, file, params, sizes in CASES:
        pat = _pattern(file, params)
        grid = sizes.get("grid")
        N = sizes.get("seq_len") or grid[0] * grid[1]
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, 8, N, 64, generator=g) for _ in range(4))
        lay = cp.layout(pat, sizes.get("seq_len"), ranks=world, heads=8, grid=grid, link=cp.LinkModel(
            flops_per_byte=50.0, head_dim=64, bytes_per_element=4))
        mine = [lay.shard(x, rank) for x in (q, k, v)]
        dmine = lay.shard(dout, rank)

        def single(bwd):
            leaves = [x.clone().requires_grad_(bwd) for x in (q, k, v)]
            out = pat(*leaves, grid=grid, backend="torch")
            if bwd:
                out.backward(dout)
            return out, leaves

        def distributed(bwd):
            leaves = [x.clone().requires_grad_(bwd) for x in mine]
            out = cp.attention(lay, *leaves)
            if bwd:
                out.backward(dmine)
            return out, leaves

        # outputs and gradients equal first
        ref, rl = single(True) if rank == 0 else (None, None)
        got, gl = distributed(True)
        full = cp.gather(lay, got.detach())
        if rank == 0:
            err = max(float((full - ref.detach()).abs().max()),
                      *(float((lay.shard(a.grad, 0) - b.grad).abs().max()) for a, b in zip(rl, gl)))
            assert err < 1e-4, f"{label}: distributed differs from one process by {err}"
        for bwd in (False, True):
            t_single, t_dist, c_dist = [], [], []
            for _ in range(repeat):
                dist.barrier()
                if rank == 0:
                    w = time.perf_counter()
                    single(bwd)
                    t_single.append(time.perf_counter() - w)
                dist.barrier()
                sent[0] = 0
                w, c = time.perf_counter(), time.process_time()
                distributed(bwd)
                wall = torch.tensor([time.perf_counter() - w])
                cpu = torch.tensor([time.process_time() - c])
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                dist.all_reduce(cpu)
                t_dist.append(float(wall))
                c_dist.append(float(cpu))
            sent_t = torch.tensor([float(sent[0])])
            dist.all_reduce(sent_t, op=dist.ReduceOp.MAX)
            if rank == 0:
                rep = lay.report(head_dim=64, bytes_per_element=4)
                # forward sends K / V rows; backward returns the received rows' gradients (float32 here)
                pred = [s_ + (r_ if bwd else 0) for s_, r_ in zip(rep.sent_bytes, rep.recv_bytes)]
                rows.append((label, "fwd+bwd" if bwd else "fwd", statistics.median(t_single) * 1e3,
                             statistics.median(t_dist) * 1e3, statistics.median(c_dist) * 1e3, lay.sharding.strategy,
                             float(sent_t) / 2**20, max(pred) / 2**20,
                             max(rep.ring_recv_bytes) * (2 if bwd else 1) / 2**20, rep.imbalance))
    if rank == 0:
        Path(out_dir, "rows.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter finalisation: gloo's threads can abort there (pytorch/pytorch#179291)


def measured(world: int, repeat: int) -> str:
    import torch.multiprocessing as mp

    d = tempfile.mkdtemp()
    mp.spawn(_worker, args=(world, str(Path(d, "store")), repeat, d), nprocs=world, join=True)
    rows = json.loads(Path(d, "rows.json").read_text())
    lines = [f"\n### {world} gloo ranks vs one process (one thread each, medians of {repeat})\n",
             "| case | pass | one process ms | distributed ms (slowest rank) | speedup | CPU ms, all ranks | strategy "
             "| MiB sent, busiest rank (measured) | predicted | ring attention, per rank | imbalance |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, p, ts, td, cd, strat, sent, pred, ring, imb in rows:
        lines.append(f"| {label} | {p} | {ts:.1f} | {td:.1f} | {ts / td:.2f}x | {cd:.1f} | {strat} | {sent:.2f} | "
                     f"{pred:.2f} | {ring:.1f} | {imb:.3f} |")
    return "\n".join(lines)


def simulated(counts) -> str:
    from attnc.sharding import LinkModel, shard

    lines = ["\n### The simulator at scale (bf16, D = 128, tile 128, forward; backward returns the gradients of as many rows)\n",
             "| case | ranks | strategy | plan + sharding s | max MiB into a rank | ring attention MiB per rank | ring / attnc "
             "| imbalance |", "|---|---|---|---|---|---|---|---|"]
    for label, file, params, sizes, H in SCALE:
        pat = _pattern(file, params)
        grid = sizes.get("grid")
        N = sizes.get("seq_len") or grid[0] * grid[1] * grid[2]
        w = time.perf_counter()
        plan = pat.plan(N, heads=H, grid=grid, block=(128, 128))
        t_plan = time.perf_counter() - w
        for R in counts:
            if R > plan.shape[0]:
                lines.append(f"| {label} | {R} | more ranks than its {plan.shape[0]} query tiles | | | | | |")
                continue
            w = time.perf_counter()
            s = shard([plan], R, link=LinkModel(head_dim=128))
            rep = s.report(head_dim=128)
            t = t_plan + time.perf_counter() - w
            mx, ring = max(rep.recv_bytes) / 2**20, max(rep.ring_recv_bytes) / 2**20
            lines.append(f"| {label} | {R} | {rep.strategy} | {t:.1f} | {mx:.2f} | {ring:.1f} | "
                         f"{ring / mx if mx else float('inf'):.0f}x | {rep.imbalance:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scale-ranks", default="8,64,1024")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    head = (f"## Context parallelism, {datetime.date.today()}, {platform.node() or 'this machine'} "
            f"({os.cpu_count()} cores), torch {torch.__version__}, attnc {attnc.__version__}")
    parts = [head] + [measured(int(r), args.repeat) for r in args.ranks.split(",")]
    parts.append(simulated([int(r) for r in args.scale_ranks.split(",")]))
    emit("\n".join(parts), args.out)


if __name__ == "__main__":
    main()
