"""Every verb at scale (issue 18): `plan`, `simulate` and `show` of every shipped example at
about 10^5 tokens (1-D: 131 072; 2-D grids 362 x 362; 3-D 32 x 64 x 64; MM-DiT 512 text +
256 x 256) and the 1-D ones at 10^6 (1 048 576), plus the video (30 x 48 x 80, NATTEN's
(18, 24, 24)) and CLEAR (`where`, 512 x 512 + 512 text) cases. Each run is its own process
(wall time including Python and torch start-up, peak RSS), 128x128 tiles (`--block 64`: 64x64,
`attnc show`'s default), 8 heads.

    python benchmarks/scale.py                       # everything (tens of minutes on 2 cores)
    python benchmarks/scale.py --only mistral video  # some patterns
    python benchmarks/scale.py --out benchmarks/results/scale_cpu.md
    python benchmarks/scale.py --block 64 --only sparse_fixed --verbs show

Targets (issue 18): under 5 s and under 2 GB each. A run over its `--timeout` is reported as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

from _report import emit

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"

#: name -> (file, pattern, sizes: {"seq_len": n} or {"grid": (..)}, --set values, routed density)
GRID2 = (362, 362)
GRID3 = (32, 64, 64)
ONE_D = ["mistral", "streaming_llm", "duo", "longformer", "prefix_lm", "bigbird", "natten1d", "moa",
         "sparse_strided", "sparse_fixed", "nsa_like", "biformer"]
TWO_D = ["natten2d", "dinat", "swin", "swin_shifted", "halo", "maxvit_block", "maxvit_grid", "cswin", "hilo",
         "axial_row", "axial_col", "crossformer_sda", "crossformer_lda"]
THREE_D = ["natten3d", "video", "gna_strided", "gna_blocked"]
FILES = {"sparse_strided": "sparse_transformer", "sparse_fixed": "sparse_transformer", "axial_row": "axial",
         "axial_col": "axial", "crossformer_sda": "crossformer", "crossformer_lda": "crossformer"}
ROUTED = {"nsa_like": 0.1, "biformer": 0.1}


def cases(only):
    out = []
    for n in ONE_D:
        for L in (131072, 1048576):
            out.append((n, str(EX / (FILES.get(n, n) + ".attn")), n, {"seq_len": L}))
    for n in TWO_D:
        out.append((n, str(EX / (FILES.get(n, n) + ".attn")), n, {"grid": GRID2}))
    for n in THREE_D:
        out.append((n, str(EX / (FILES.get(n, n) + ".attn")), n, {"grid": GRID3}))
    out.append(("video-hunyuan", str(EX / "natten3d.attn"), "natten3d",
                {"grid": (30, 48, 80), "set": ["size=(18, 24, 24)"]}))
    out.append(("mmdit", str(EX / "mmdit.attn"), "mmdit", {"grid": (256, 256)}))
    # CLEAR's 8K setting: 512 text tokens + a 512 x 512 latent, a disc-shaped local window (a `where`)
    out.append(("clear", str(EX / "mmdit.attn"), "mmdit", {"grid": (512, 512), "set": ["r=32"]}))
    return [c for c in out if not only or c[0] in only or c[2] in only]


RUNNER = r"""
import json, resource, sys, time
t = time.perf_counter()
verb, file, pat_name, sizes, routed, b = json.loads(sys.argv[1])
status = "ok"
import attnc
pat = attnc.load(file).pattern(pat_name, **sizes.get("params", {}))
dynamic = bool(pat.ir.inputs) or pat.has_topk()
if dynamic and verb != "simulate":
    status = "n/a: routed per call from run-time inputs or q, k"
elif verb == "plan":
    grid = tuple(sizes["grid"]) if "grid" in sizes else None
    M = None if grid else sizes["seq_len"]
    pat.plan(M, heads=8, grid=grid, block=(b, b))
else:
    from attnc.cli import main
    import io
    argv = [verb, file, "-p", pat_name, "--heads", "8"]
    argv += ["--grid", "x".join(map(str, sizes["grid"]))] if "grid" in sizes else ["--seq-len", str(sizes["seq_len"])]
    for s in sizes.get("set", []):
        argv += ["--set", s]
    argv += ["--tile", f"{b}x{b}"] if verb == "simulate" else ["--block", str(b)]
    if verb == "simulate" and routed:
        argv += ["--routed-density", str(routed)]
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, out, err)
    if rc != 0:
        status = "rc %d: %s" % (rc, err.getvalue().strip().splitlines()[0][:160] if err.getvalue().strip() else "")
print(json.dumps({"s": time.perf_counter() - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "status": status}))
"""


def run(verb, file, pat, sizes, routed, timeout, block=128):
    params = {}
    for s in sizes.get("set", []):
        k, v = s.split("=", 1)
        params[k] = eval(v, {})  # the case table's own literals
    payload = json.dumps([verb, file, pat, {**sizes, "params": params}, routed, block])
    t = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-c", RUNNER, payload], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"wall": timeout, "status": f"over {timeout} s"}
    wall = time.perf_counter() - t
    if res.returncode != 0:
        lines = [x for x in res.stderr.strip().splitlines() if x.strip() and not x.strip().startswith(("^", "~"))]
        return {"wall": wall, "status": "error: " + (lines or ["?"])[-1][:160]}
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return {"wall": wall, **info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--verbs", nargs="*", default=["plan", "simulate", "show"])
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument("--block", type=int, default=128, help="tile size (square); show's default is 64")
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    import attnc

    lines = [f"## {datetime.date.today()} {platform.node()}, {platform.processor() or platform.machine()}; "
             f"torch {torch.__version__}, attnc {attnc.__version__}, python {platform.python_version()}", "",
             f"8 heads, {args.block}x{args.block} tiles; one process per run: wall s (including start-up) / peak RSS MB", "",
             "| case | tokens | " + " | ".join(args.verbs) + " |", "|---|---|" + "---|" * len(args.verbs)]
    worst = {"wall": 0.0, "rss": 0.0}
    over = []
    for name, file, pat, sizes in cases(args.only):
        tokens = sizes.get("seq_len") or math.prod(sizes["grid"]) + (512 if pat == "mmdit" else 0)
        cells = []
        for verb in args.verbs:
            r = run(verb, file, pat, sizes, ROUTED.get(pat), args.timeout, args.block)
            ok = r["status"] == "ok"
            if r["status"].startswith("n/a"):
                cells.append("n/a (routed per call)")
                continue
            cell = f"{r['wall']:.1f} s / {r.get('rss_mb', 0):.0f} MB" if "rss_mb" in r else f"{r['wall']:.0f} s"
            if not ok:
                cell += f" ({r['status']})"
            if ok:
                worst["wall"] = max(worst["wall"], r["wall"])
                worst["rss"] = max(worst["rss"], r["rss_mb"])
            if not ok or r["wall"] > 5 or r.get("rss_mb", 0) > 2048:
                over.append(f"{name} {verb}")
            cells.append(cell)
        label = name + (" " + " ".join(sizes.get("set", [])) if sizes.get("set") else "")
        row = f"| {label} | {tokens} | " + " | ".join(cells) + " |"
        print(row, file=sys.stderr)
        lines.append(row)
    lines += ["", f"slowest finished run {worst['wall']:.1f} s, largest peak {worst['rss']:.0f} MB; "
                  f"over 5 s / 2 GB or not ok: {', '.join(over) or 'none'}", ""]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
