"""Ahead-of-time compilation of the generated kernels for NVIDIA GPUs, without a GPU: the jobs,
their reports, and the driver that compiles them in worker processes.

input:  `Job`s: a pattern (file, name, parameters) at concrete sizes, a
        `KernelConfig`, a dtype, head dims D / Dv and a target ("sm_90", ...).
output: per launched kernel (`_attn_fwd`, `_attn_bwd_preprocess`,
        `_attn_bwd_dkdv`, `_attn_bwd_dq`) its registers, spilled bytes, shared
        memory, compile seconds and whether it fits the target (`KernelReport`),
        as gathered by `compile_jobs` from the workers; job lists; report tables.
does not: run anything on a GPU, compile in this process (aot_worker.py does, in
        subprocesses: [Note: same launch]), or choose configs (kernels.configs_for does,
        from the figures this module measures: docs/codegen.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .codegen.kernels import TARGETS

REGISTERS_PER_SM = 65536

KERNELS = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")

DTYPES = ("fp16", "bf16", "fp32")


class AOTError(ValueError):
    """Bad AOT input (target, dtype, sizes) or a missing tool; the message says expected / got / try."""


def parse_target(name: str) -> tuple[int, int]:
    """'sm_90' (or 'sm90', '90') -> (capability 90, shared-memory limit)."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", text)
    key = f"sm_{m.group(1)}" if m else None
    if key not in TARGETS:
        raise AOTError(f"target: expected one of {', '.join(TARGETS)}, got {name!r}; try sm_90 (H100) or sm_80 (A100)")
    return TARGETS[key]


def parse_targets(text: str) -> list[str]:
    """'sm_90,sm_80' -> ['sm_90', 'sm_80'] (checked)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise AOTError(f"--target: expected targets like sm_90 or sm_90,sm_80, got {text!r}")
    out = []
    for t in names:
        cap, _ = parse_target(t)
        out.append(f"sm_{cap}")
    return out


def torch_dtype(name: str):
    import torch
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise AOTError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}; try fp16")
    return table[name]


@dataclass(frozen=True)
class Job:
    """One AOT compile: a pattern at sizes, a config, dtype, head dims and a target.

    `file` / `pattern` / `params` locate and bind the pattern (a worker process
    loads it again); `config` is a `KernelConfig` or None (the runtime's choice
    for the target, head dim and dtype: kernels.configs_for). `passes` is
    "fwd", "bwd" or "both"; the backward runs with the config the runtime
    would launch after a forward with `config` (TritonBackend.backward_config);
    "decode" compiles the split-KV decode kernel (one new token per sequence
    against a cache of M tokens; GQA with 4 query heads per key/value head when
    the heads divide, codegen/decode_kernel.py)."""

    file: str
    pattern: str | None = None
    params: tuple = ()
    M: int | None = None
    N: int | None = None
    heads: int | None = None
    grid: tuple | None = None
    config: object = None
    dtype: str = "fp16"
    D: int = 64
    Dv: int | None = None
    target: str = "sm_90"
    passes: str = "both"
    label: str = ""

    def check(self) -> "Job":
        parse_target(self.target)
        torch_dtype(self.dtype)
        for name in ("D", "Dv"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256):
                raise AOTError(f"{name}: expected a head dim from 1 to 256 (the kernels' limit), got {v!r}; try 64 or 128")
        if self.passes not in ("fwd", "bwd", "both", "decode"):
            raise AOTError(f"passes: expected 'fwd', 'bwd', 'both' or 'decode', got {self.passes!r}")
        if not Path(self.file).is_file():
            raise AOTError(f"file: expected an .attn file, got {self.file!r} (not found)")
        return self


@dataclass
class KernelReport:
    """What compiling one kernel gave."""

    kernel: str
    config: str
    registers: int
    spill_bytes: int  # local memory per thread (cuobjdump LOCAL): the spills
    shared: int  # bytes per block: Triton's dynamic shared memory + static
    compile_s: float
    limit: int  # the target's shared memory per block
    threads: int
    problems: list = field(default_factory=list)
    ptx_sha: str = ""  # ptx_fingerprint: equal PTX (file paths aside), equal specialisation
    #: stack frame per thread (cuobjdump STACK): not a spill (ptxas reports "0 bytes spill stores"),
    #: but the driver counts it as local memory, and Triton's `n_spills` is that size / 4
    stack_bytes: int = 0

    @property
    def fits(self) -> bool:
        return not self.problems


@dataclass
class JobReport:
    job: Job
    kernels: list = field(default_factory=list)  # KernelReport
    error: str | None = None  # a compile that failed (Triton's OutOfResources, a crash): the job does not fit

    @property
    def fits(self) -> bool:
        return self.error is None and all(k.fits for k in self.kernels)

    def to_dict(self) -> dict:
        j = self.job
        return {"label": j.label, "file": j.file, "pattern": j.pattern, "target": j.target, "dtype": j.dtype, "D": j.D,
                "Dv": j.Dv or j.D, "passes": j.passes, "fits": self.fits, "error": self.error,
                "kernels": [{**asdict(k), "fits": k.fits} for k in self.kernels]}


def ptx_fingerprint(ptx: str) -> str:
    """sha256 prefix of the PTX without its `.file` lines (paths of the module and of Triton's
    library: a kernel module imported from another folder is the same kernel) and comments."""
    body = "\n".join(line for line in ptx.splitlines()
                     if not line.lstrip().startswith((".file", "//")))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def problems(registers: int, spill_bytes: int, shared: int, threads: int, limit: int) -> list[str]:
    """Why a kernel does not fit its target (empty: it fits)."""
    out = []
    if spill_bytes > 0:
        out.append(f"spills {spill_bytes} B per thread")
    if shared > limit:
        out.append(f"shared memory {shared} B > {limit} B")
    if registers * threads > REGISTERS_PER_SM:
        out.append(f"{registers} registers x {threads} threads > {REGISTERS_PER_SM}")
    return out


# -- a job's call, and jobs as JSON (both processes) ---------------------------------------------------


def synthetic_call(job: Job, pat, dtype):
    """(call, q, k, v) for the job: empty tensors of the call's shapes, run-time inputs invented
    (routed tables at density 1/4, `topk` routed from random q, k, segments: 4 equal documents)."""
    import math

    import torch

    from .dynamic import synthetic_inputs
    from .runtime.backend import Call

    M, N, H, grid = pat.resolve_sizes(job.M, job.N, job.heads, job.grid)
    D, Dv = job.D, job.Dv or job.D
    q = torch.empty(1, H, M, D, dtype=dtype)
    k = torch.empty(1, H, N, D, dtype=dtype)
    v = torch.empty(1, H, N, Dv, dtype=dtype)
    inputs = {}
    if pat.ir.inputs or pat.has_topk():
        g = torch.Generator().manual_seed(0)
        for spec in pat.ir.inputs:
            if spec.kind == "segments":
                inputs[spec.name] = (torch.arange(N) * 4 // N)[None]
        if pat.has_topk():
            qr, kr = torch.randn(1, H, M, D, generator=g), torch.randn(1, H, N, D, generator=g)
            pat, inputs = pat.route(qr, kr, grid=grid, **inputs)
        else:
            pat, inputs = synthetic_inputs(pat, M, N, H, grid, 0.25, inputs)
    tables = {n: torch.zeros(shape) for n, shape in pat.table_shapes(M, N, H, grid).items()}  # score-term tables
    call = Call(pattern=pat, B=1, Hq=H, Hkv=H, M=M, N=N, D=D, Dv=Dv, grid=grid, scale=1 / math.sqrt(D),
                inputs=inputs, needs_grad=job.passes != "fwd", tables=tables)
    return call, q, k, v


def bind(job: Job):
    """The job's pattern, loaded from its file and bound to its parameters."""
    from .loader import load
    return load(job.file).pattern(job.pattern, **dict(job.params))


def _encode(v):
    """A parameter value as JSON: ranges and sets tagged, tuples as lists."""
    if isinstance(v, range):
        return {"range": [v.start, v.stop, v.step]}
    if isinstance(v, (set, frozenset)):
        return {"set": sorted(v)}
    if isinstance(v, (tuple, list)):
        return [_encode(x) for x in v]
    return v


def _decode(v):
    if isinstance(v, dict) and "range" in v:
        return range(*v["range"])
    if isinstance(v, dict) and "set" in v:
        return set(v["set"])
    if isinstance(v, list):
        return tuple(_decode(x) for x in v)
    return v


def job_to_json(job: Job) -> str:
    """One line of the worker protocol: the job as JSON (`job_from_json` reads it back)."""
    d = asdict(job)
    d["config"] = None if job.config is None else asdict(job.config)
    d["params"] = [[k, _encode(v)] for k, v in job.params]
    return json.dumps(d)


def job_from_json(text: str) -> Job:
    from .codegen.kernels import KernelConfig

    d = json.loads(text)
    if d["config"] is not None:
        c = d["config"]
        c["tile"] = None if c["tile"] is None else tuple(tuple(t) for t in c["tile"])
        d["config"] = KernelConfig(**c)
    d["params"] = tuple((k, _decode(v)) for k, v in d["params"])
    d["grid"] = None if d["grid"] is None else tuple(d["grid"])
    return Job(**d)


# -- in the caller's process ---------------------------------------------------------------------------

def _report_from_dict(job: Job, d: dict) -> JobReport:
    rep = JobReport(job=job, error=d["error"])
    for k in d["kernels"]:
        k = dict(k)
        k.pop("fits")
        rep.kernels.append(KernelReport(**k))
    return rep


def worker_env(python: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said explicitly (silences its warning)
    return env


def compile_jobs(jobs, processes: int = 2, python: str | None = None, progress=None,
                 deadline: float | None = None) -> list[JobReport]:
    """Compile `jobs` in `processes` worker subprocesses (TRITON_INTERPRET removed from their
    environment, each with a fresh Triton cache); reports in the order of `jobs`.
    `python` runs the workers (another venv: another Triton); `progress(report)` is called per job;
    after `deadline` (a time.time() value) no job is started, and those left out are None."""
    jobs = [j.check() for j in jobs]
    if processes < 1:
        raise AOTError(f"processes: expected at least 1, got {processes}")
    _check_triton(python)
    todo: queue.Queue = queue.Queue()
    for i, j in enumerate(jobs):
        todo.put((i, j))
    results: list = [None] * len(jobs)
    failures: list[str] = []
    lock = threading.Lock()

    def drive():
        with tempfile.TemporaryDirectory(prefix="attnc-aot-") as cache:
            env = worker_env()
            env["TRITON_CACHE_DIR"] = cache
            proc = subprocess.Popen([python or sys.executable, "-m", "attnc.aot_worker", "worker"], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                while deadline is None or time.time() < deadline:
                    try:
                        i, job = todo.get_nowait()
                    except queue.Empty:
                        break
                    proc.stdin.write(job_to_json(job) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                    if not line:
                        proc.stdin.close()
                        err = proc.stderr.read().strip().splitlines()
                        with lock:
                            failures.append(f"job {job.label or job.pattern}: the worker exited: "
                                            + "\n".join(err[-15:]))
                        return
                    rep = _report_from_dict(job, json.loads(line))
                    results[i] = rep
                    if progress:
                        with lock:
                            progress(rep)
            finally:
                if proc.stdin and not proc.stdin.closed:
                    proc.stdin.close()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
                proc.stderr.close()

    threads = [threading.Thread(target=drive) for _ in range(min(processes, max(1, len(jobs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise AOTError("AOT compilation failed:\n" + "\n".join(failures))
    return results


def _check_triton(python: str | None) -> None:
    """A clear error when the workers' Python has no Triton (or no NVIDIA backend)."""
    code = "import triton, triton.backends.compiler; print(triton.__version__)"
    res = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True, env=worker_env())
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        raise AOTError(f"AOT compilation needs Triton: expected `import triton` to work in {python or sys.executable}, "
                       f"got {last}; try `pip install triton`")


def triton_version(python: str | None = None) -> str:
    res = subprocess.run([python or sys.executable, "-c", "import triton; print(triton.__version__)"],
                         capture_output=True, text=True, env=worker_env())
    return res.stdout.strip() if res.returncode == 0 else "none"


# -- job lists: the runtime's configs, the CI subset, every example ----------------------------------------

#: sizes the examples are compiled at: 4096 tokens (M = N, or a 64x64 grid; 3-D grids 32x32x32,
#: since gna_strided's neighborhood spans 18 frames), 12 heads
EXAMPLE_LENGTH = 4096
EXAMPLE_GRIDS = {1: (4096,), 2: (64, 64), 3: (32, 32, 32)}
EXAMPLE_HEADS = 12


def example_job(file, pattern=None, **kw) -> Job:
    """A job for an example pattern at the example sizes (override with M= / grid= / heads=)."""
    from .loader import load

    pat = load(file).pattern(pattern)
    base = {"heads": EXAMPLE_HEADS, "pattern": pat.name, "label": pat.name}
    if pat.layout.axes:
        base["grid"] = EXAMPLE_GRIDS[len(pat.layout.axes)]
    else:
        base["M"] = EXAMPLE_LENGTH
    return Job(str(file), **{**base, **kw})


def runtime_jobs(job: Job) -> list[Job]:
    """`job` in every config the runtime can launch for its target, head dim and dtype: the
    default and each autotune candidate forward, each with the backward the runtime would run
    after it (kernels.configs_for; a backward shared by several forwards is compiled once).
    A job with N-D tiles keeps them (the runtime varies only warps and stages then)."""
    import torch
    from dataclasses import replace as dc_replace

    from .runtime.triton_backend import TritonBackend

    job = job.check()
    cap, _ = parse_target(job.target)
    pat = bind(job)
    call, q, _, _ = synthetic_call(job, pat, torch_dtype(job.dtype))
    tc = TritonBackend(job.config, capability=cap).target_configs(call, q)
    fixed = job.config
    fwd = [fixed or tc.default]
    for c in tc.autotune:
        if fixed is not None and fixed.tile is not None:
            c = dc_replace(fixed, num_warps=c.num_warps, num_stages=c.num_stages)
        fwd.append(c)
    fwd = list(dict.fromkeys(fwd))
    out, seen_bwd = [], set()
    for i, c in enumerate(fwd):
        bwd = tc.backward(c)
        passes = "fwd" if bwd in seen_bwd else "both"
        seen_bwd.add(bwd)
        kind = "default" if i == 0 else "autotune"
        out.append(dc_replace(job, config=c, passes=passes if job.passes == "both" else job.passes,
                              label=f"{job.label or pat.name} ({kind})"))
    return out


def ci_jobs(examples_dir) -> list[Job]:
    """The covering design tests/test_aot.py compiles: five kinds of kernels (closed-form loops,
    tile lists with a table, N-D tiles on a grid, a `heads {}` mixture, a score term with a learnable
    table: relative position bias, its gradient by atomics) x sm_90 / sm_80 x
    fp16 / bf16 x D = 64 / 128, forward and backward, each pair of factor levels met at least
    once, in the runtime's default config for the target (the autotune candidates are the
    long run's: scripts/aot_all.py)."""
    from .codegen.kernels import KernelConfig

    d = Path(examples_dir)
    nd = KernelConfig(tile=((8, 8), (8, 8)))
    # (file, pattern kwargs, target, dtype, D): a covering array of strength 2 over target x dtype x D
    # per pattern kind (closed form / tile list / N-D / heads mixture)
    rows = [
        ("streaming_llm.attn", {}, "sm_90", "fp16", 64),
        ("streaming_llm.attn", {}, "sm_80", "bf16", 128),
        ("bigbird.attn", {}, "sm_90", "bf16", 128),
        ("bigbird.attn", {}, "sm_80", "fp16", 64),
        ("natten2d.attn", {"config": nd}, "sm_90", "bf16", 64),
        ("natten2d.attn", {"config": nd}, "sm_80", "fp16", 128),
        ("duo.attn", {}, "sm_90", "fp16", 128),
        ("duo.attn", {}, "sm_80", "bf16", 64),
        ("nat_rpb.attn", {}, "sm_90", "fp16", 64),
        ("nat_rpb.attn", {}, "sm_80", "bf16", 128),
    ]
    out = []
    for file, kw, target, dtype, D in rows:
        size = {"grid": (32, 32)} if file in ("natten2d.attn", "nat_rpb.attn") else {"M": 2048}
        out.append(example_job(d / file, heads=10, target=target, dtype=dtype, D=D, **size, **kw))
    # the split-KV decode kernel (runtime/decode.py), 8 query / 2 key-value heads: a window with sinks,
    # and Gemma 2's soft-capped window (a score term)
    for file, target, dtype, D in (("streaming_llm.attn", "sm_90", "bf16", 128), ("gemma2.attn", "sm_80", "fp16", 64)):
        out.append(example_job(d / file, heads=8, target=target, dtype=dtype, D=D, M=32768, passes="decode",
                               label="decode"))
    return out


# -- tables --------------------------------------------------------------------------------------------

def table(reports: list[JobReport], markdown: bool = False) -> str:
    """One row per kernel: target, dtype, D, config, kernel, registers, spills, shared, seconds, fits."""
    head = ["label", "target", "dtype", "D", "config", "kernel", "regs", "spill B", "stack B", "shared B", "limit B", "s",
            "fits"]
    rows = []
    for r in reports:
        j = r.job
        base = [j.label or j.pattern or Path(j.file).stem, j.target, j.dtype, str(j.D)]
        if r.error:
            rows.append(base + ["", "(all)", "", "", "", "", "", "", f"NO: {r.error}"])
        for k in r.kernels:
            rows.append(base + [k.config, k.kernel, str(k.registers), str(k.spill_bytes), str(k.stack_bytes), str(k.shared),
                                str(k.limit),
                                f"{k.compile_s:.1f}", "yes" if k.fits else "NO: " + "; ".join(k.problems)])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])


# -- compilations across sizes (issue 16: compile once) ---------------------------------------------


def compile_counts(jobs, python: str | None = None) -> dict:
    """Run `aot_worker.count_main` in a subprocess (no interpreter): {"modules": distinct generated
    modules, "kernels": {kernel: distinct binaries}} over `jobs`."""
    import subprocess

    payload = json.dumps([json.loads(job_to_json(j.check())) for j in jobs])
    with tempfile.TemporaryDirectory(prefix="attnc-aot-count-") as cache:
        env = {**worker_env(), "TRITON_CACHE_DIR": cache}
        res = subprocess.run([python or sys.executable, "-m", "attnc.aot_worker", "count"], input=payload,
                             capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise AOTError(f"compile count failed ({res.returncode}): {res.stderr.strip()[-800:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
