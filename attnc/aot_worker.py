"""The AOT worker process: compiles jobs' kernels through the runtime's own launch code and
measures them (`python -m attnc.aot_worker worker|count`, started by aot.compile_jobs /
aot.compile_counts without TRITON_INTERPRET).

input:  one JSON job per stdin line (aot.job_to_json), or a JSON list of jobs (`count`).
output: one JSON report per stdout line (aot.JobReport.to_dict), or the number of distinct
        compiled binaries per kernel (`count`).
does not: choose jobs or configs, start processes (aot.py drives the workers), or run a kernel.

[Note: same launch] The kernels are compiled by the runtime's own launch code:
a `TritonBackend` runs `forward` and `backward` on empty CPU tensors of the
call's shapes and dtype, with the kernel set's module replaced by a recorder
whose `kernel[grid](...)` calls `kernel.warmup(..., grid=grid)`. Triton then
specialises the arguments exactly as a launch would (pointer dtypes, stride-1
and divisible-by-16 integers, constexprs, num_warps / num_stages), through the
same code path (N-D tiles, closed-form loops or tile lists, tables of run-time
inputs). `warmup` asks the driver for the target; a stand-in driver answers
with the requested `GPUTarget("cuda", capability, 32)`, so no CUDA driver is
needed. Triton's `TRITON_INTERPRET=1` (the test suite sets it on machines
without CUDA) makes `@triton.jit` build interpreted functions, so compiling
happens in worker subprocesses started without it (`compile_jobs`), which also
compile in parallel. Each worker uses a fresh Triton cache directory, so the
compile seconds are cold compiles.

Registers and spills come from `cuobjdump --dump-resource-usage` on the cubin
(REG, LOCAL: bytes of local memory per thread, which holds the spills); shared
memory from Triton's metadata (dynamic) plus cuobjdump's static SHARED. A kernel
fits when it spills nothing, its shared memory is within the target's opt-in
per-block limit (`TARGETS`, codegen/kernels.py) and registers x threads <= 65536.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .aot import (AOTError, Job, JobReport, KernelReport, bind, job_from_json, parse_target, problems,
                  ptx_fingerprint, synthetic_call, torch_dtype)

# -- what a compiled kernel uses (cuobjdump) ----------------------------------------------------------

_FUNC = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_FIELD = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """`cuobjdump --dump-resource-usage` output -> {function: {"REG": .., "LOCAL": .., "SHARED": .., ...}}.

    >>> parse_resource_usage(' Function _attn_fwd:\\n  REG:128 STACK:0 SHARED:1024 LOCAL:0 ')["_attn_fwd"]["REG"]
    128
    """
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            out[current] = {}
            continue
        if current is not None and "REG:" in line:
            out[current].update({k: int(v) for k, v in _FIELD.findall(line)})
    if not out or not all("REG" in v for v in out.values()):
        raise AOTError(f"cuobjdump --dump-resource-usage: expected 'Function NAME:' lines followed by 'REG:n ... LOCAL:n', "
                       f"got {text.strip()[:200]!r}")
    return out


def tool(name: str) -> str:
    """Path of a CUDA tool shipped with the Triton wheel (triton/backends/nvidia/bin), else on PATH."""
    try:
        import triton
        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.is_file():
            return str(p)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    raise AOTError(f"{name}: expected it in the Triton wheel (triton/backends/nvidia/bin) or on PATH, got neither; "
                   f"try `pip install triton` (the NVIDIA backend ships {name})")


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise AOTError(f"cuobjdump --dump-resource-usage failed ({res.returncode}): {res.stderr.strip()[:300]}")
    return parse_resource_usage(res.stdout)


# -- compiling through the runtime's launch code ([Note: same launch]) -----------------------------------

class _StandInDriver:
    """Answers what `JITFunction.warmup` asks the driver: device, stream and the target."""

    def __init__(self):
        self.target = None
        self.device = 0

    def set_target(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)
        self.device = capability  # one device id per target: JITFunction caches binders per device

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


class _Recorder:
    """Stands in for a generated module: `module.kernel[grid](args)` compiles with warmup and records."""

    def __init__(self, module, sink: list):
        self._module, self._sink = module, sink

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        sink = self._sink

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    t = time.perf_counter()
                    compiled = fn.warmup(*args, grid=grid, **kwargs)
                    sink.append((name, compiled, time.perf_counter() - t, kwargs.get("num_warps", 4)))
                return run
        return Launch()


def _launch_job(job: Job, cap: int, dtype, sink: list) -> tuple[dict, set]:
    """Run the job's passes through a `TritonBackend` for capability `cap`, recording every
    compiled kernel into `sink` (the kernel sets in the runtime's cache are left as they are:
    later jobs share them). Returns ({sink index: config it ran with}, module keys used)."""
    import torch

    from .runtime.triton_backend import TritonBackend

    if job.passes == "decode":
        return _launch_decode(job, dtype, sink)
    call, q, k, v = synthetic_call(job, bind(job), dtype)
    be = TritonBackend(job.config, capability=cap)  # no config: the runtime's choice for this target
    config = be.call_config(call, q)
    real_kernels = be.kernels
    modules: set = set()

    def recording_kernels(call_, device, config_=None):
        ks = real_kernels(call_, device, config_)
        modules.add(ks.key)
        return _RecordedSet(ks, sink)

    be.kernels = recording_kernels
    configs = {}
    if job.passes in ("fwd", "both"):
        n0 = len(sink)
        be.forward(call, q, k, v)
        configs.update((i, config) for i in range(n0, len(sink)))
    if job.passes in ("bwd", "both"):
        bwd = be.backward_config(call, config, q)
        n0 = len(sink)
        out = torch.empty(1, call.Hq, call.M, call.Dv, dtype=dtype)
        lse = torch.zeros(1, call.Hq, call.M, dtype=torch.float32)
        be.backward_with(call, bwd, q, k, v, out, lse, out, None)
        configs.update((i, bwd) for i in range(n0, len(sink)))
    return configs, modules


def _launch_decode(job: Job, dtype, sink: list) -> tuple[dict, set]:
    """Compile the split-KV decode kernel through `pat.decode`'s own launch (module loads
    recorded instead of run): batch 2, one new token, a cache of `job.M` tokens."""
    import torch

    from .codegen import cache
    from .codegen.kernels import KernelConfig
    from .runtime import decode as dec

    pat = bind(job)
    H = job.heads or 8
    Hkv = H // 4 if H % 4 == 0 else H
    N, D, Dv = job.M or 4096, job.D, job.Dv or job.D
    q = torch.empty(2, H, 1, D, dtype=dtype)
    k, v = torch.empty(2, Hkv, N, D, dtype=dtype), torch.empty(2, Hkv, N, Dv, dtype=dtype)
    real = cache.load_module
    modules: set = set()

    def recording(key, generate, info=None):
        modules.add(key)
        return _Recorder(real(key, generate, info), sink)

    cache.load_module = recording
    try:
        dec.decode_triton(pat, q, k, v, None, [N, N], 1.0 / D ** 0.5)
    finally:
        cache.load_module = real
    config = KernelConfig(block_m=16, block_n=dec.BLOCK_N)
    return {i: config for i in range(len(sink))}, modules


def run_job(job: Job, driver: _StandInDriver) -> JobReport:
    """Compile one job's kernels in this process (which must not be in interpreter mode)."""
    job.check()
    cap, limit = parse_target(job.target)
    dtype = torch_dtype(job.dtype)
    driver.set_target(cap)
    sink: list = []
    configs, _ = _launch_job(job, cap, dtype, sink)
    report = JobReport(job=job)
    for i, (name, compiled, secs, warps) in enumerate(sink):
        usage = resource_usage(compiled.asm["cubin"])
        u = usage.get(name) or next(iter(usage.values()))
        shared = int(compiled.metadata.shared) + u.get("SHARED", 0)
        threads = 32 * warps
        report.kernels.append(KernelReport(
            kernel=name, config=_short(configs[i]), registers=u["REG"], spill_bytes=u.get("LOCAL", 0), shared=shared,
            compile_s=round(secs, 2), limit=limit, threads=threads,
            problems=problems(u["REG"], u.get("LOCAL", 0), shared, threads, limit),
            ptx_sha=ptx_fingerprint(compiled.asm["ptx"]), stack_bytes=u.get("STACK", 0)))
    return report


def _short(config) -> str:
    s = f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"
    if config.tile is not None:
        from .codegen.ndtiles import tile_text
        s += f" tile {tile_text(config.tile)}"
    return s


def worker_main() -> int:
    """`python -m attnc.aot_worker worker`: one JSON job per stdin line, one JSON report per stdout line."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("attnc.aot_worker worker: expected TRITON_INTERPRET unset (the interpreter cannot compile), got 1",
              file=sys.stderr)
        return 2
    from triton.runtime import driver as triton_driver

    stand_in = _StandInDriver()
    triton_driver.set_active(stand_in)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a compile prints must not corrupt the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        job = job_from_json(line)
        try:
            rep = run_job(job, stand_in)
        except AOTError:
            raise
        except Exception as exc:  # a compile that fails (OutOfResources, a Triton crash) is a result
            rep = JobReport(job=job, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
        out.write(json.dumps(rep.to_dict()) + "\n")
        out.flush()
    return 0


def count_main() -> int:
    """`python -m attnc.aot_worker count`: a JSON list of jobs on stdin (one pattern at several
    sizes, one target); launches each job's passes through the runtime like `run_job`
    (`_launch_job`), in one process, and prints {kernel name: distinct compiled binaries} as JSON.
    With kernels generic in the sizes, every kernel compiles once (Triton's own cache hits)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("attnc.aot_worker count: expected TRITON_INTERPRET unset, got 1", file=sys.stderr)
        return 2
    from triton.runtime import driver as triton_driver

    stand_in = _StandInDriver()
    triton_driver.set_active(stand_in)
    jobs = [job_from_json(json.dumps(j)) for j in json.loads(sys.stdin.read())]
    seen: dict[str, set] = {}
    modules: set = set()
    for job in jobs:
        job.check()
        cap, _ = parse_target(job.target)
        stand_in.set_target(cap)
        sink: list = []
        _, used = _launch_job(job, cap, torch_dtype(job.dtype), sink)
        modules |= used
        for name, compiled, _, _ in sink:
            seen.setdefault(name, set()).add(id(compiled))
    print(json.dumps({"modules": len(modules), "kernels": {n: len(ids) for n, ids in sorted(seen.items())}}))
    return 0


class _RecordedSet:
    """A kernel set whose module records compiles (the set in the runtime's cache is left as it is)."""

    def __init__(self, ks, sink):
        self._ks, self.module = ks, _Recorder(ks.module, sink)

    def __getattr__(self, name):
        return getattr(self._ks, name)


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        sys.exit(worker_main())
    if sys.argv[1:] == ["count"]:
        sys.exit(count_main())
    print("usage: python -m attnc.aot_worker worker|count  (driven by attnc.aot.compile_jobs / "
          "compile_counts)", file=sys.stderr)
    sys.exit(2)
