"""Decoding on CPU: one new token per sequence against a long KV cache, attnc vs dense SDPA.

    python benchmarks/decode.py                                   # caches of 32K and 128K tokens
    python benchmarks/decode.py --caches 32768 --out benchmarks/results/decode_cpu.md

The issue's setting: batch 8, 8 query heads / 2 key-value heads (GQA), D = 128, float32,
a 4096-token sliding window with 4 sinks (StreamingLLM / Mistral-style). Contenders,
interleaved in one process on one thread, outputs checked equal first:

* `pat.decode` over the whole cache (contiguous [B, Hkv, S, D]; reads only the window and sinks);
* `pat.decode` over a paged cache (16-token HND pages in a shuffled pool, block table);
* `pat.decode` through `attnc.nn.KVCache` after eviction (it holds sinks + window + slack);
* dense `scaled_dot_product_attention` over the whole cache (`enable_gqa=True`), which a
  window pattern does not need but is what a model without the pattern runs;
* the op `pat(q, k, v)` on the last query (M = 1) for reference (it plans per length).

Prints medians of CPU and wall time, the first call's latency (a fresh length), and ratios.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics

import torch
import torch.nn.functional as F

import attnc

from _report import emit, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default="32768,131072")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--generate", type=int, default=131072, help="tokens of the KVCache memory run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, Hq, Hkv, D, W, S = 8, 8, 2, 128, 4096, 4
    pat = attnc.loads(f"pattern p = sliding({W}) | (sink({S}) & causal)").pattern()
    rows = []
    for N in (int(x) for x in args.caches.split(",")):
        k = torch.randn(B, Hkv, N, D)
        v = torch.randn(B, Hkv, N, D)
        q = torch.randn(B, Hq, 1, D)
        P = 16
        pool = torch.randperm(B * N // P)
        table = pool.view(B, N // P)
        kp = torch.empty(B * N // P, Hkv, P, D)
        vp = torch.empty_like(kp)
        kp[table.reshape(-1)] = k.view(B, Hkv, N // P, P, D).permute(0, 2, 1, 3, 4).reshape(-1, Hkv, P, D)
        vp[table.reshape(-1)] = v.view(B, Hkv, N // P, P, D).permute(0, 2, 1, 3, 4).reshape(-1, Hkv, P, D)
        cache = attnc.nn.KVCache(pat, num_heads=Hq, num_kv_heads=Hkv)
        cache.update(k[:, :, :-1], v[:, :, :-1], attended=True)  # a prefill answered by the op: evicts
        cache.update(k[:, :, -1:], v[:, :, -1:])  # the new token, queried below
        lens = torch.full((B,), N)
        fns = {
            "decode (contiguous)": lambda: pat.decode(q, k, v),
            "decode (paged)": lambda: pat.decode(q, kp, vp, cache_seqlens=lens, block_table=table),
            "decode (evicted KVCache)": lambda: cache.attend(q),
            "dense SDPA, whole cache": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        }
        first = {}
        for name, fn in fns.items():
            if name.startswith("decode"):
                _, w, _ = timed(fn)
                first[name] = w
        want = pat(q.new_zeros(B, Hq, N, D).index_copy_(2, torch.tensor([N - 1]), q), k, v, backend="torch")[:, :, -1:] \
            if N <= 32768 else fns["decode (contiguous)"]()
        for name in ("decode (contiguous)", "decode (paged)", "decode (evicted KVCache)"):
            torch.testing.assert_close(fns[name](), want, atol=1e-5, rtol=1e-5)
        for fn in fns.values():
            fn()
        times = {n: [] for n in fns}
        for _ in range(args.repeat):
            for n, fn in fns.items():
                _, w, c = timed(fn)
                times[n].append((w, c))
        med = {n: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for n, t in times.items()}
        rows.append((N, med, first, cache.stored()))
    lines = [f"## Decoding on CPU ({datetime.date.today()}, {platform.machine()}, {args.threads} thread(s), "
             f"torch {torch.__version__}, attnc {attnc.__version__})", "",
             f"B = {B}, {Hq} query / {Hkv} key-value heads, D = {D}, fp32, one new token per sequence; pattern "
             f"`sliding({W}) | (sink({S}) & causal)`. Median CPU ms (wall); first call = a new length's latency.", "",
             "| cache | contender | CPU ms (wall) | SDPA / this | first call (wall ms) | kept entries per KV head |",
             "|---|---|---|---|---|---|"]
    for N, med, first, stored in rows:
        sd = med["dense SDPA, whole cache"][1]
        for n, (w, c) in med.items():
            fc = f"{first[n]:.1f}" if n in first else ""
            kept = str(stored) if "KVCache" in n else (str(N) if n != "dense SDPA, whole cache" else str(N))
            lines.append(f"| {N} | {n} | {c:.2f} ({w:.2f}) | **{sd / c:.1f}x** | {fc} | {kept} |")
    lines += ["", generation_memory(pat, Hq, Hkv, D, args.generate)]
    emit("\n".join(lines), args.out)


def generation_memory(pat, Hq: int, Hkv: int, D: int, total: int) -> str:
    """KVCache memory over a long generation: `total` tokens appended 256 at a time (each
    block attended by its newest token), with eviction and without."""
    rows = ["| tokens generated | kept per KV head (evicting) | cache bytes (evicting) | cache bytes (keeping all) |",
            "|---|---|---|---|"]
    cache = attnc.nn.KVCache(pat, num_heads=Hq, num_kv_heads=Hkv)
    g = torch.Generator().manual_seed(0)
    step = 256
    checkpoints = {total // 8, total // 2, total}
    for t in range(step, total + 1, step):
        k = torch.randn(1, Hkv, step, D, generator=g)
        cache.update(k, k, attended=True)
        if t in checkpoints:
            kept = cache.stored()
            used = sum(x.numel() * x.element_size() for x in cache.k + cache.v)
            full = 2 * t * Hkv * D * 4
            rows.append(f"| {t} | {kept} | {used / 2**20:.1f} MiB | {full / 2**20:.1f} MiB |")
    return "\n".join([f"KVCache over a generation (B = 1, fp32, {Hkv} KV heads, D = {D}, slack 256):", "", *rows])


if __name__ == "__main__":
    main()
