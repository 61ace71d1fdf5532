#!/usr/bin/env python
"""On a CUDA machine: does AOT compilation (attnc/aot.py) give the kernels a real launch compiles?

For a few jobs of the CI subset on the GPU's own target, compiles them ahead of time (stand-in
driver, subprocess) and then runs the same call through TritonBackend on the GPU, and compares
per kernel the PTX (sha256), registers, spills and shared memory Triton reports for the launched
kernel. Prints one line per kernel; exits 1 on any difference.

    PYTHONPATH=... python scripts/aot_gpu_check.py
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from attnc import aot  # noqa: E402


def real_kernels(job) -> dict:
    """{kernel: (ptx sha, registers, spills, shared)} of a real launch of the job's call."""
    from attnc.runtime.triton_backend import TritonBackend

    pat = aot.bind(job)
    call, q, k, v = aot.synthetic_call(job, pat, aot.torch_dtype(job.dtype))
    q, k, v = (torch.randn(x.shape, dtype=x.dtype, device="cuda") for x in (q, k, v))
    inputs = {n: t.cuda() for n, t in call.inputs.items()}
    from dataclasses import replace
    call = replace(call, inputs=inputs)
    be = TritonBackend(job.config)
    cfg = be.call_config(call, q)
    out, lse = be.forward(call, q, k, v)
    be.backward(call, q, k, v, out, lse, torch.randn_like(out))
    torch.cuda.synchronize()
    got = {}
    for c in {cfg, be.backward_config(call, cfg, q)}:
        ks = be.kernels(call, q.device, c)
        for name in aot.KERNELS:
            fn = getattr(ks.module, name)
            for cache in fn.device_caches.values():
                for kern in cache[0].values():
                    kern._init_handles()
                    got.setdefault(name, set()).add((aot.ptx_fingerprint(kern.asm["ptx"]),
                                                     kern.n_regs, kern.n_spills, kern.metadata.shared))
    return got


def main() -> int:
    major, minor = torch.cuda.get_device_capability()
    target = f"sm_{10 * major + minor}"
    jobs = [j for j in aot.ci_jobs(ROOT / "examples") if j.target == "sm_90"]
    jobs = [aot.Job(**{**j.__dict__, "target": target}) for j in jobs]
    reports = aot.compile_jobs(jobs, processes=min(8, len(jobs)))
    bad = 0
    for rep in reports:
        real = real_kernels(rep.job)
        for kr in rep.kernels:
            seen = real.get(kr.kernel, set())
            match = [r for r in seen if r[0] == kr.ptx_sha]
            # Triton's n_spills is the driver's local size / 4: stack frame + spills (cuobjdump STACK + LOCAL);
            # its metadata.shared is the dynamic part: the AOT figure adds the static (cuobjdump SHARED)
            ok = bool(match) and match[0][1] == kr.registers and 4 * match[0][2] == kr.spill_bytes + kr.stack_bytes \
                and match[0][3] <= kr.shared
            bad += not ok
            print(f"{'same' if ok else 'DIFFERENT'}  {rep.job.label} {rep.job.dtype} D={rep.job.D} {kr.kernel} {kr.config}: "
                  f"aot ptx {kr.ptx_sha} regs {kr.registers} spill {kr.spill_bytes} stack {kr.stack_bytes} "
                  f"shared {kr.shared}; launched (ptx, regs, n_spills, shared) {sorted(seen)}")
    print(f"{bad} kernels differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
