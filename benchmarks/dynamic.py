"""Dynamic sparsity on CPU (issue 6), side by side in one run, medians:

1. top-k routing overhead: the time of `pat.route(q, k)` (pooled scores,
   eligibility, selection) next to the attention itself, for
   `causal & (topk(16, block=64) | sliding(512) | sink(64))` at N = 16K;
2. packed documents: `causal & same(doc)` through attnc's torch path vs dense
   SDPA with the equivalent boolean mask, forward and forward+backward -- with
   the same documents every call (the schedule comes from the cache keyed by
   the inputs' content) and with new documents every call (built per call).

    python benchmarks/dynamic.py [--n 16384] [--heads 8] [--head-dim 64] [--skip-topk] [--out benchmarks/results/dynamic_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import attnc

NSA = "pattern nsa(k = 16) = causal & (topk(k, block = 64) | sliding(512) | sink(64))"
PACKED = "pattern packed(doc: segments) = causal & same(doc)"


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--docs", type=int, default=8, help="documents in the packed sequence (random lengths)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--skip-topk", action="store_true", help="only the packed-documents rows")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    N, H, D = args.n, args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    lines = []

    if not args.skip_topk:
        nsa = attnc.loads(NSA).pattern()
        route_ms = median_ms(lambda: nsa.route(q, k), args.reps)
        low, tables = nsa.route(q, k)
        attn_ms = median_ms(lambda: low(q, k, v, backend=args.backend, **tables), args.reps)
        total_ms = median_ms(lambda: nsa(q, k, v, backend=args.backend), args.reps)
        lines.append(f"| top-k routing (nsa, k=16, block 64) | route {route_ms:.1f} ms | attention {attn_ms:.1f} ms | "
                     f"op total {total_ms:.1f} ms | overhead {route_ms / attn_ms:.1%} of the attention |")

    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: args.docs - 1] + 1).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([N])])
    packed = attnc.loads(PACKED).pattern()
    doc = attnc.cu_seqlens(offsets)
    ids = doc.segment_ids(N, "doc")
    allowed = (ids[0][:, None] == ids[0][None, :]) & torch.ones(N, N, dtype=torch.bool).tril()

    def sdpa(qq, kk, vv):
        return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed)

    def ours(qq, kk, vv):
        return packed(qq, kk, vv, doc=doc, backend=args.backend)

    def fwdbwd(f):
        def step():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            f(qq, kk, vv).sum().backward()
        return step

    with torch.no_grad():
        s_f, o_f = median_ms(lambda: sdpa(q, k, v), args.reps), median_ms(lambda: ours(q, k, v), args.reps)
    s_b, o_b = median_ms(fwdbwd(sdpa), args.reps), median_ms(fwdbwd(ours), args.reps)
    density = allowed.float().mean().item()
    lines.append(f"| packed documents ({args.docs} docs, density {density:.3f}), same documents every call "
                 f"| dense SDPA fwd {s_f:.1f} ms, attnc {o_f:.1f} ms "
                 f"({s_f / o_f:.2f}x) | fwd+bwd: SDPA {s_b:.1f} ms, attnc {o_b:.1f} ms ({s_b / o_b:.2f}x) | | |")

    # new documents every call: the last cut moves by one token (same density), so nothing is reused
    calls = iter(range(1, 1 << 30))

    def fresh(qq, kk, vv):
        shifted = offsets.clone()
        shifted[-2] = offsets[-2] - next(calls) % max(1, int(offsets[-2] - offsets[-3] - 1))
        return packed(qq, kk, vv, doc=attnc.cu_seqlens(shifted), backend=args.backend)

    with torch.no_grad():
        n_f = median_ms(lambda: fresh(q, k, v), args.reps)
    n_b = median_ms(fwdbwd(fresh), args.reps)
    lines.append(f"| packed documents, new documents every call | attnc fwd {n_f:.1f} ms ({s_f / n_f:.2f}x SDPA) "
                 f"| fwd+bwd: attnc {n_b:.1f} ms ({s_b / n_b:.2f}x SDPA) | | |")

    header = (f"## {datetime.date.today().isoformat()} — CPU ({platform.machine()}, {torch.get_num_threads()} threads)\n\n"
              f"torch {torch.__version__}, attnc {attnc.__version__}, backend {args.backend}; N {N}, heads {H}, "
              f"head dim {D}, float32, median of {args.reps}\n\n| case | | | | |\n|---|---|---|---|---|")
    text = header + "\n" + "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
