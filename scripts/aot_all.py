#!/usr/bin/env python
"""Compile attnc's kernels ahead of time for NVIDIA targets (no GPU needed) and write the tables.

    python scripts/aot_all.py ci                     # the covering subset tests/test_aot.py compiles
    python scripts/aot_all.py all                    # every example x every config the runtime can choose
    python scripts/aot_all.py candidates             # config candidates per target (how configs_for was chosen)
    options: --python /path/to/venv/bin/python (another Triton), --processes 2, --targets sm_90,sm_80,
             --dtypes fp16,bf16, --head-dims 64,128, --only PATTERN[,PATTERN], --out FILE.md (appends a section)

Prints one line per finished job and, at the end, the table; exits 1 if any kernel does not fit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)

from attnc import aot  # noqa: E402
from attnc.codegen.kernels import KernelConfig  # noqa: E402

#: configs measured to choose kernels.configs_for (the old AUTOTUNE_CONFIGS, the default and neighbours)
CANDIDATES = (
    KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
    KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
    KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2),
)
#: one pattern per kind of kernel: closed-form loops, tile lists, a table read per element
CANDIDATE_PATTERNS = "streaming_llm,bigbird,biformer"


def parse_config(text: str) -> KernelConfig:
    """`128x64w8s3` -> KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)."""
    try:
        return KernelConfig.parse(text)
    except ValueError as exc:
        raise SystemExit(f"--configs: {exc}") from None


def jobs_for(mode: str, args) -> list:
    ex = ROOT / "examples"
    if mode == "ci":
        return aot.ci_jobs(ex)
    out = []
    files = sorted(ex.glob("*.attn")) if mode == "all" else [ex / f"{p}.attn" for p in args.patterns]
    import attnc
    for f in files:
        for name in attnc.load(f).names():
            if args.only and name not in args.only:
                continue
            for target in args.targets:
                for dtype in args.dtypes:
                    for D in args.head_dims:
                        base = aot.example_job(f, name, target=target, dtype=dtype, D=D)
                        if mode == "all":
                            try:
                                out += aot.runtime_jobs(base)
                            except Exception as exc:  # a pattern that cannot be bound at the example sizes
                                print(f"skip {name} {target} {dtype} D={D}: {exc}", flush=True)
                        else:
                            out += [aot.Job(**{**base.__dict__, "config": c, "label": name}) for c in args.configs]
    # cheap before expensive within each priority: defaults first, then autotune candidates
    return sorted(out, key=lambda j: ("(autotune)" in j.label,)) if mode == "all" else out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ci", "all", "candidates"])
    p.add_argument("--python", help="the Python whose Triton compiles (default: this one)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--targets", default="sm_90,sm_80")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--only", help="pattern names, comma-separated")
    p.add_argument("--out", help="append the table to this markdown file")
    p.add_argument("--minutes", type=float, help="start no job after this many minutes (the table says how many were left)")
    p.add_argument("--configs", help="candidates: configs like 128x64w8s3,64x64w4s2 (default: CANDIDATES)")
    p.add_argument("--patterns", default=CANDIDATE_PATTERNS, help="candidates: example patterns (file stems)")
    args = p.parse_args()
    args.targets = aot.parse_targets(args.targets)
    args.dtypes = args.dtypes.split(",")
    args.head_dims = [int(d) for d in args.head_dims.split(",")]
    args.only = set(args.only.split(",")) if args.only else None
    args.configs = [parse_config(c) for c in args.configs.split(",")] if args.configs else list(CANDIDATES)
    args.patterns = args.patterns.split(",")
    jobs = jobs_for(args.mode, args)
    version = aot.triton_version(args.python)
    print(f"{len(jobs)} jobs, triton {version}, {args.processes} processes", flush=True)
    t0 = time.time()

    def progress(r):
        worst = "fits" if r.fits else "DOES NOT FIT"
        print(f"[{time.time() - t0:6.0f} s] {r.job.label} {r.job.target} {r.job.dtype} D={r.job.D} {r.job.passes}: "
              f"{worst}", flush=True)

    deadline = None if args.minutes is None else t0 + 60 * args.minutes
    reports = aot.compile_jobs(jobs, processes=args.processes, python=args.python, progress=progress, deadline=deadline)
    left = sum(r is None for r in reports)
    reports = [r for r in reports if r is not None]
    wall = time.time() - t0
    text = aot.table(reports, markdown=bool(args.out))
    print(text)
    bad = sum(not r.fits for r in reports)
    summary = (f"{len(reports)} jobs, {sum(len(r.kernels) for r in reports)} kernels, {bad} jobs do not fit; "
               f"{wall:.0f} s wall with {args.processes} processes"
               + (f"; stopped after {args.minutes} minutes: {left} of {len(jobs)} jobs not compiled" if left else ""))
    print(summary)
    if args.out:
        import torch
        head = (f"\n## `scripts/aot_all.py {args.mode}` — triton {version}\n\n"
                f"{datetime.date.today().isoformat()}, {platform.node() or 'this machine'} ({os.cpu_count()} CPUs, "
                f"no GPU), torch {torch.__version__}, Python {platform.python_version()}; targets "
                f"{', '.join(args.targets)}. {summary}.\n\n")
        with open(args.out, "a") as f:
            f.write(head + text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
