"""What a score term costs on CPU: attnc's torch path vs FlexAttention with the same score_mod.

    python benchmarks/scores.py                      # NAT 7x7 + RPB on 56x56, ALiBi and Gemma-2 soft-cap at 8K
    python benchmarks/scores.py --repeat 9 --out benchmarks/results/scores_cpu.md

For each case, side by side in one process, interleaved, one thread: attnc (torch path)
with the score term and with the mask alone, and FlexAttention compiled with its own
`create_block_mask` (compiled, at the faster of block sizes 64 and 128) with a hand-written `score_mod` (what a FlexAttention user
writes: NATTEN's rpb lookup, ALiBi's slopes, `cap * tanh(score / cap)`) and without one.
Outputs are checked equal before timing. Forward only for the FlexAttention ratio (it has
no CPU backward); attnc's forward+backward (with the table's gradient) is timed too.
Medians of CPU time and wall time, milliseconds.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from pathlib import Path

import torch

import attnc

from _report import emit, fastest_flex_mask, timed

EX = Path(__file__).resolve().parent.parent / "examples"


def cases():
    """(name, attnc scored pattern, attnc plain pattern, call kwargs, tables, flex mask_mod, flex score_mod, H, N, D)."""
    out = []
    # NAT 7x7 with relative position bias on 56x56 (NAT-Mini's first stage: 4 heads of 32)
    Y = X = 56
    K, H, D = 7, 4, 32
    rpb = torch.randn(H, 2 * K - 1, 2 * K - 1) * 0.1
    nat = attnc.load(EX / "nat_rpb.attn").pattern(size=K)
    plain = attnc.load(EX / "natten2d.attn").pattern(size=K)

    def na_mask(b, h, q_idx, kv_idx):
        qy, qx, ky, kx = q_idx // X, q_idx % X, kv_idx // X, kv_idx % X
        sy = (qy - K // 2).clamp(0, Y - K)
        sx = (qx - K // 2).clamp(0, X - K)
        return (ky >= sy) & (ky < sy + K) & (kx >= sx) & (kx < sx + K)

    def na_rpb(score, b, h, q_idx, kv_idx):
        # compiled flex evaluates score_mod on masked pairs of partial tiles too: clamp, as a user must
        dy = (kv_idx // X - q_idx // X + K - 1).clamp(0, 2 * K - 2)
        dx = (kv_idx % X - q_idx % X + K - 1).clamp(0, 2 * K - 2)
        return score + rpb[h, dy, dx]

    out.append(("NAT 7x7 + RPB, 56x56, H=4, D=32", nat, plain, dict(grid=(Y, X)), {"rpb": rpb}, na_mask, na_rpb,
                H, Y * X, D))
    # ALiBi and Gemma-2 soft-capping on a 1024 sliding window at N = 8192, H = 8, D = 64
    N, W, H, D = 8192, 1024, 8, 64
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)])

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < W)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    def softcap(score, b, h, q_idx, kv_idx):
        return 50.0 * torch.tanh(score / 50.0)

    mistral = attnc.load(EX / "mistral.attn").pattern(window=W)
    out.append((f"ALiBi, sliding {W}, N={N}, H=8, D=64", attnc.load(EX / "alibi.attn").pattern("alibi", window=W),
                mistral, {}, {}, sliding, alibi, H, N, D))
    out.append((f"Gemma-2 soft-cap 50, sliding {W}, N={N}, H=8, D=64",
                attnc.load(EX / "gemma2.attn").pattern(window=W), mistral, {}, {}, sliding, softcap, H, N, D))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the markdown result to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.config.recompile_limit = 256  # every case and block size is a new compiled graph
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for name, scored, plain, kw, tables, mask_mod, score_mod, H, N, D in cases():
        q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
        # FlexAttention at its best: its own compiled create_block_mask at the block size (64 or 128)
        # that runs the scored case faster (median of 3 calls each, after a warm-up)
        block, block_mask, _, _ = fastest_flex_mask(
            lambda bs: torch.compile(create_block_mask)(mask_mod, 1, 1, N, N, device="cpu", BLOCK_SIZE=bs),
            lambda m: flex(q, k, v, block_mask=m, score_mod=score_mod))
        fns = {
            "attnc + term": lambda: scored(q, k, v, backend="torch", **kw, **tables),
            "attnc mask only": lambda: plain(q, k, v, backend="torch", **kw),
            "flex + score_mod": lambda: flex(q, k, v, block_mask=block_mask, score_mod=score_mod),
            "flex mask only": lambda: flex(q, k, v, block_mask=block_mask),
        }
        want = fns["attnc + term"]()
        torch.testing.assert_close(fns["flex + score_mod"](), want, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(fns["flex mask only"](), fns["attnc mask only"](), atol=2e-4, rtol=2e-4)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        tg = {n: t.clone().requires_grad_() for n, t in tables.items()}
        fns["attnc + term fwd+bwd"] = lambda: scored(qg, kg, vg, backend="torch", **kw, **tg).sum().backward()
        fns["attnc mask only fwd+bwd"] = lambda: plain(qg, kg, vg, backend="torch", **kw).sum().backward()
        for fn in fns.values():  # warm: plans, schedules, compilation
            fn()
        times = {n: [] for n in fns}
        for _ in range(args.repeat):
            for n, fn in fns.items():  # interleaved
                times[n].append(timed(fn)[1:])
        med = {n: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for n, t in times.items()}
        rows.append((f"{name} (flex block {block})", med))
    lines = [f"## Score terms on CPU ({datetime.date.today()}, {platform.machine()}, {args.threads} thread(s), "
             f"torch {torch.__version__}, attnc {attnc.__version__})", "",
             "Medians of CPU time (wall in parentheses), ms, forward unless marked; outputs checked equal first. "
             "FlexAttention: compiled, its own compiled `create_block_mask` at its faster block size (64 or 128, "
             "tried per case), a hand-written `score_mod`.", "",
             "| case | attnc + term | attnc mask only | term cost (attnc) | flex + score_mod | flex mask only | "
             "term cost (flex) | flex / attnc with the term | attnc fwd+bwd + term | fwd+bwd mask only |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        c = {n: v[1] for n, v in m.items()}
        fmt = lambda n: f"{m[n][1]:.1f} ({m[n][0]:.1f})"  # noqa: E731
        lines.append(f"| {name} | {fmt('attnc + term')} | {fmt('attnc mask only')} | "
                     f"{c['attnc + term'] / c['attnc mask only']:.2f}x | {fmt('flex + score_mod')} | {fmt('flex mask only')} | "
                     f"{c['flex + score_mod'] / c['flex mask only']:.2f}x | **{c['flex + score_mod'] / c['attnc + term']:.2f}** | "
                     f"{fmt('attnc + term fwd+bwd')} | {fmt('attnc mask only fwd+bwd')} |")
    lines += ["", exp_ab(args.repeat)]
    emit("\n".join(lines), args.out)


def exp_ab(repeat: int) -> str:
    """The torch path with exp_ as exp2(t * log2 e) (its [Note: exp2]) against torch's exp_,
    interleaved in this process, on a term that reaches exp's underflow path. Patterns
    without a score term no longer call exp_ (their scores stay in base 2, [Note: base 2]
    in runtime/torch_backend.py), so only a score term is measured."""
    from attnc.runtime import torch_backend as tb

    new = tb._exp_
    old = lambda t: t.exp_()  # noqa: E731
    cases = [("ALiBi sliding 1024, N=8192", attnc.load(EX / "alibi.attn").pattern("alibi", window=1024), {}, 8192)]
    out = ["| torch path, H=8, D=64, fp32 | forward with exp_ | with exp2 | exp_ / exp2 | fwd+bwd with exp_ | with exp2 | exp_ / exp2 |",
           "|---|---|---|---|---|---|---|"]
    for name, pat, kw, N in cases:
        q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        runs = {}
        for label, fn in (("old", old), ("new", new)):
            def fwd(fn=fn):
                tb._exp_ = fn
                pat(q, k, v, backend="torch", **kw)

            def fb(fn=fn):
                tb._exp_ = fn
                pat(qg, kg, vg, backend="torch", **kw).sum().backward()
            runs[label + " fwd"], runs[label + " fb"] = fwd, fb
        tb._exp_ = old
        a = pat(q, k, v, backend="torch", **kw)
        tb._exp_ = new
        torch.testing.assert_close(pat(q, k, v, backend="torch", **kw), a, atol=1e-5, rtol=1e-5)
        for fn in runs.values():
            fn()
        times = {n: [] for n in runs}
        for _ in range(repeat):
            for n, fn in runs.items():
                times[n].append(timed(fn)[2])
        tb._exp_ = new
        m = {n: statistics.median(t) for n, t in times.items()}
        out.append(f"| {name} | {m['old fwd']:.1f} | {m['new fwd']:.1f} | **{m['old fwd'] / m['new fwd']:.2f}x** | "
                   f"{m['old fb']:.1f} | {m['new fb']:.1f} | **{m['old fb'] / m['new fb']:.2f}x** |")
    return "\n".join(["Median CPU time, ms (one thread, interleaved, outputs checked equal first):", "", *out])


if __name__ == "__main__":
    main()
