"""The generated-Triton backend.

input:  a validated `Call` and q / k / v (CUDA tensors, or CPU tensors with
        TRITON_INTERPRET=1 in the environment, how CI runs the kernels).
output: forward (out, lse) and backward (dq, dk, dv) per the `Backend` contract.
does not: validate tensors (ops.py), choose between backends (ops.py), or lower,
        plan and generate kernels itself (codegen/pipeline.py does, for its `Shape`).

A *kernel set* is everything one call configuration needs: what the pipeline's
kernel passes give for the call's shape (the lowered mask, the plan, the loop
bounds and the module, imported from the kernel cache) and, for static
patterns, the plan's tile lists on the device. Patterns with run-time
inputs (`same`, `routed`) build their plan per call from the inputs: the union
over the batch (a tile is *full* only when full in every batch element), so
one launch serves the whole batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from types import ModuleType

import torch

from attnc.plans import TileList
from attnc.errors import AttnError
from attnc.lru import LRU

from .backend import Backend, Call

MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class TileLists:
    """A plan's four tile lists as contiguous int32 device tensors."""

    full: TileList
    partial: TileList
    full_t: TileList
    partial_t: TileList

    @staticmethod
    def build(full, partial, full_t, partial_t, N: int, block_n: int, device) -> "TileLists":
        """The device lists the kernels read. A ragged last key tile (N not a multiple of
        `block_n`) moves from the full list to the partial one: the kernels' full loop has
        no bounds check ([Note: the two loops] in codegen/kernels.py)."""
        full, partial = full.ragged_partial(partial, N, block_n)
        return TileLists(*(t.to(device) for t in (full, partial, full_t, partial_t)))

    @staticmethod
    def from_plan(plan, device) -> "TileLists":
        # N-D tiles: the kernels' N is the padded length, a tile multiple (ndtiles.kernel_plan
        # already demotes every full tile with padding)
        n, bn = (0, 1) if plan.tile_shape is not None else (plan.N, plan.block[1])
        return TileLists.build(plan.full, plan.partial, plan.full_t, plan.partial_t, n, bn, device)

    @property
    def heads(self) -> int:
        return self.full.counts.shape[0]


@dataclass
class KernelSet:
    key: str
    lowered: object  # pointwise.Lowered
    module: ModuleType
    static_tables: dict
    lists: TileLists | None  # None: built per call from run-time inputs (or not needed: closed form)
    closed: tuple[bool, bool] = (False, False)  # closed-form loop bounds: (forward and dQ, dK/dV)
    #: N-D tiles: the padded tile-major layout (ndtiles.TileLayout) and, on the device, the
    #: padded position of every query / key token (built once per kernel set)
    layout: object | None = None
    pos_q: torch.Tensor | None = None
    pos_k: torch.Tensor | None = None
    #: the grid axis lengths, the kernels' run-time size arguments after M and N (sizes.size_args)
    grid_sizes: tuple = ()

    def to_tiles(self, x: torch.Tensor, side: str, fill: float = 0.0) -> torch.Tensor:
        """[B, H, L, ...] in grid order -> [B, H, L', ...] in the padded tile-major order."""
        pos, length = (self.pos_q, self.layout.M) if side == "q" else (self.pos_k, self.layout.N)
        out = x.new_full((*x.shape[:2], length, *x.shape[3:]), fill)
        out[:, :, pos] = x
        return out

    def from_tiles(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """The inverse of `to_tiles` (padded positions dropped)."""
        return x[:, :, self.pos_q if side == "q" else self.pos_k].contiguous()


#: tile lists of patterns with run-time inputs, by the inputs' content
_INPUT_LISTS = LRU("input_lists", 16, "Triton tile lists built from run-time inputs")
#: kernel sets by (pattern, sizes, config, device): the per-size host state (plan, tile lists,
#: tables) of modules that are shared between sizes ([Note: one text, many sizes] in codegen/sizes.py)
_KERNEL_SETS = LRU("kernel_sets", 64, "Triton kernel sets (per pattern, size and config)")


def _triton_missing() -> str | None:
    try:
        import triton.language  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); try `pip install triton` or backend='torch'"
    return None


def _interpreter_reason() -> str | None:
    """Why CPU tensors cannot run in Triton's interpreter now, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return ("the Triton kernels need a CUDA device; these tensors are on the CPU "
                "(set TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter, "
                "or use backend='torch')")
    import triton.language as tl
    if type(tl.standard.zeros).__name__ != "InterpretedFunction":
        return ("TRITON_INTERPRET=1 was set after triton was imported: Triton decorates its own library at import, "
                "so the interpreter cannot run; set TRITON_INTERPRET=1 in the environment before anything imports triton")
    return None


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class TritonBackend(Backend):
    """Attention through kernels generated for the call's pattern and sizes.

    >>> be = TritonBackend()                                    # default KernelConfig
    >>> be.can_run(call, q)                                     # None, or why not
    >>> out, lse = be.forward(call, q, k, v)
    >>> dq, dk, dv = be.backward(call, q, k, v, out, lse, dout)

    Kernels take M, N and the grid axis lengths as run-time arguments: a new
    length generates the module text on the host and reuses the compiled kernels
    whenever that text was seen before ([Note: one text, many sizes] in
    codegen/sizes.py); N-D tile kernels stay specialised to their grid.
    """

    name = "triton"

    scores = True

    def __init__(self, config=None, *, autotune: bool = False, capability: int | None = None):
        from attnc.codegen.kernels import KernelConfig

        self.config = config or KernelConfig()
        #: None: the default config and the autotune candidates follow the GPU (kernels.configs_for)
        self._user_config = config
        self.autotune = autotune
        #: the compute capability to choose configs for (None: the tensors' device; AOT compiles set it)
        self.capability = capability
        self._tuned: dict[tuple, object] = {}

    # -- the contract
    def can_run(self, call: Call, q: torch.Tensor) -> str | None:
        reason = device_reason(q, call.D, call.Dv)
        if reason:
            return reason
        try:
            config = self.call_config(call)
        except ValueError as exc:
            return f"block={call.block!r}: {exc}"
        if config.tile is not None and call.pattern.ir.score is not None:
            return ("score terms are generated for 1-D tiles only (N-D tiles permute positions); "
                    "try block=(64, 64) or backend='torch'")
        try:
            shape = self.shape(call, config)  # N-D tiles: a pure grid, M = N, no run-time inputs
        except ValueError as exc:
            return str(exc)
        try:
            # the pipeline's first kernel pass without the N-D permutation, which cannot fail
            # once the shape is checked: what refuses patterns without kernels (topk)
            call.lowered(inputs=shape.inputs())
        except AttnError as exc:
            return f"cannot generate Triton code for pattern '{call.pattern.name}': {exc.diagnostics[0].message}"
        return None

    def forward(self, call: Call, q, k, v):
        return self._run_forward(call, self._config(call, q, k, v), q, k, v)

    def _run_forward(self, call: Call, config, q, k, v):
        ks = self.kernels(call, q.device, config)
        if ks.layout is not None:  # N-D tiles: run in the padded tile-major order
            out, lse = self._forward(call, ks, config, ks.to_tiles(q, "q"), ks.to_tiles(k, "k"), ks.to_tiles(v, "k"))
            return ks.from_tiles(out, "q"), ks.from_tiles(lse, "q")
        return self._forward(call, ks, config, q, k, v)

    def _forward(self, call: Call, ks: KernelSet, config, q, k, v):
        lists = self._lists(ks, call, config, q.device)
        tables = self._tables(ks, call, q)
        B, Hq, M, D = q.shape
        Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
        out = torch.empty(B, Hq, M, Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)
        bm, bn = config.block
        ks.module._attn_fwd[(-(-M // bm), B * Hq)](
            q, k, v, out, lse, call.scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *ks.grid_sizes, *_list_args(lists, 0, ks.closed[0]), *tables, *_score_tables(call, q.device),
            M=M, N=N, HQ=Hq, GROUP=Hq // Hkv, PLAN_HEADS=lists.heads if lists else 1, D=D, DV=Dv, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_D=max(16, _next_pow2(D)), BLOCK_DV=max(16, _next_pow2(Dv)),
            DOT_PRECISION=self._precision(q, config), num_warps=config.num_warps, num_stages=config.num_stages)
        return out, lse

    def backward(self, call: Call, q, k, v, out, lse, dout, dlse=None):
        return self.backward_with(call, self.backward_config(call, self._config(call, q, k, v), q), q, k, v, out, lse,
                                   dout, dlse)

    def backward_with(self, call: Call, config, q, k, v, out, lse, dout, dlse):
        ks = self.kernels(call, q.device, config)
        if ks.layout is not None:
            # padded rows: zero out / dout / dlse and lse -inf, so they add nothing to dk, dv
            dq, dk, dv = self._backward(
                call, ks, config, ks.to_tiles(q, "q"), ks.to_tiles(k, "k"), ks.to_tiles(v, "k"), ks.to_tiles(out, "q"),
                ks.to_tiles(lse, "q", float("-inf")), ks.to_tiles(dout, "q"),
                None if dlse is None else ks.to_tiles(dlse, "q"))
            return ks.from_tiles(dq, "q"), ks.from_tiles(dk, "k"), ks.from_tiles(dv, "k")
        return self._backward(call, ks, config, q, k, v, out, lse, dout, dlse)

    def _backward(self, call: Call, ks: KernelSet, config, q, k, v, out, lse, dout, dlse):
        lists = self._lists(ks, call, config, q.device)
        tables = self._tables(ks, call, q)
        B, Hq, M, D = q.shape
        Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
        bm, bn = config.block
        lse = lse.to(torch.float32).contiguous()
        dout = dout.to(q.dtype)
        delta = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)
        has_dlse = dlse is not None
        dlse_t = dlse.to(torch.float32).contiguous() if has_dlse else delta
        BLOCK_D, BLOCK_DV = max(16, _next_pow2(D)), max(16, _next_pow2(Dv))
        launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        ks.module._attn_bwd_preprocess[(-(-M // bm), B * Hq)](
            out, dout, dlse_t, delta, *out.stride(), *dout.stride(),
            M=M, HQ=Hq, DV=Dv, BLOCK_M=bm, BLOCK_DV=BLOCK_DV, HAS_DLSE=has_dlse, **launch)
        dq = torch.empty(B, Hq, M, D, dtype=q.dtype, device=q.device)
        dk = torch.empty(B, Hkv, N, D, dtype=k.dtype, device=q.device)
        dv = torch.empty(B, Hkv, N, Dv, dtype=v.dtype, device=q.device)
        common = dict(M=M, N=N, HQ=Hq, GROUP=Hq // Hkv, PLAN_HEADS=lists.heads if lists else 1, D=D, DV=Dv, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, DOT_PRECISION=self._precision(q, config), **launch)
        strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
        sc = _score_tables(call, q.device)
        dsc = [torch.zeros_like(t) for t in sc]
        ks.module._attn_bwd_dkdv[(-(-N // bn), B * Hkv)](
            q, k, v, dout, lse, delta, dk, dv, call.scale, *strides,
            *ks.grid_sizes, *_list_args(lists, 1, ks.closed[1]), *tables, *sc, **common)
        ks.module._attn_bwd_dq[(-(-M // bm), B * Hq)](
            q, k, v, dout, lse, delta, dq, call.scale, *strides,
            *ks.grid_sizes, *_list_args(lists, 0, ks.closed[0]), *tables, *sc, *dsc, **common)
        if call.pattern.ir.score is not None:
            return dq, dk, dv, {n: d.view(t.shape) for (n, t), d in zip(call.tables.items(), dsc)}
        return dq, dk, dv

    # -- kernel sets
    @staticmethod
    def _code_shapes(call: Call) -> dict:
        """The parts of run-time input shapes that change the generated code."""
        out = {}
        for spec in call.pattern.ir.inputs:
            t = call.inputs.get(spec.name)
            if t is None:
                continue
            out[spec.name] = (t.shape[-1],) if spec.kind == "segments" else (t.shape[-3], 1, 1)
        return out

    def shape(self, call: Call, config=None):
        """The kernels' `pipeline.Shape` of this call: its resolved sizes (the op resolved
        them, once), `config` (default: `call_config`) and the input shapes that change the
        code; ValueError for N-D tiles this call cannot use."""
        return call.shape.with_config(call.pattern.ir, config or self.call_config(call), self._code_shapes(call))

    def kernels(self, call: Call, device, config=None) -> KernelSet:
        """The kernel set for this call's configuration (generated, cached, memoised)."""
        from attnc.codegen import cache

        shape = self.shape(call, config)
        memo = (call.pattern.text(), shape, str(device), cache.interpret_mode())
        return _KERNEL_SETS.get(memo, lambda: self._build_kernels(call, device, shape))

    def _build_kernels(self, call: Call, device, shape) -> KernelSet:
        """The pipeline's kernel passes for this shape (host work, milliseconds) and the module
        of that text from the kernel cache: sizes whose text is equal share one module, hence
        one compilation per kernel ([Note: one text, many sizes] in codegen/sizes.py); then the
        host state the launches read (tables, tile lists, N-D positions) on `device`."""
        from attnc.codegen.pipeline import compile_kernels

        built = compile_kernels(call.pattern.ir, shape, sources=call.pattern.program.sources,
                                device=device_capability(device))
        low, plan, bounds = built.lowered, built.plan, built.bounds
        layout = getattr(built, "layout", None)
        tables = {t.name: t.data.to(device, torch.int32).contiguous() for t in low.tables if t.data is not None}
        ks = KernelSet(key=built.key, lowered=low, module=built.module, static_tables=tables,
                       lists=TileLists.from_plan(plan, device) if plan is not None and not all(bounds.closed) else None,
                       closed=bounds.closed, layout=layout, grid_sizes=shape.grid or ())
        if layout is not None:
            ks.pos_q = layout.positions("q").to(device)
            ks.pos_k = layout.positions("k").to(device)
        return ks

    def _lists(self, ks: KernelSet, call: Call, config, device) -> TileLists | None:
        """The tile lists the kernels read (None when every loop is closed-form)."""
        if ks.lists is not None or all(ks.closed):
            return ks.lists
        return self._input_lists(call, config, device)

    def _tables(self, ks: KernelSet, call: Call, q) -> list[torch.Tensor]:
        out = []
        B = q.shape[0]
        dyn = None
        for t in ks.lowered.tables:
            if t.data is not None:
                out.append(ks.static_tables[t.name])
                continue
            if dyn is None:
                dyn = ks.lowered.table_tensors(call.inputs, q.device)
            x = dyn[t.name]
            if x.shape[0] == 1 and B > 1:  # one set of inputs for the whole batch
                x = x.expand(B, *x.shape[1:]).contiguous()
            if x.shape[0] != B:
                raise ValueError(f"{t.source}: expected batch size 1 or {B}, got {x.shape[0]}")
            out.append(x)
        return out

    def _input_lists(self, call: Call, config, device) -> TileLists:
        """Plan of a pattern with run-time inputs: per batch element (closed form
        from the inputs where the analysis has one, else the reference mask in row
        chunks), united over the batch."""
        from .schedules import inputs_digest, scan_plan

        batches, _ = call.pattern.input_batches(call.M, call.N, call.Hq, call.inputs, batch=call.B)

        def build() -> TileLists:
            full = nonempty = None
            for inp in batches:
                dense = scan_plan(call, inp, config.block).to_dense()
                f, ne = dense == 2, dense > 0
                full = f if full is None else full & f
                nonempty = ne if nonempty is None else nonempty | ne
            if full.shape[0] > 1 and bool((full == full[:1]).all() and (nonempty == nonempty[:1]).all()):
                full, nonempty = full[:1], nonempty[:1]
            partial = nonempty & ~full
            return TileLists.build(*(TileList.from_dense(f) for f in (full, partial, full.transpose(1, 2),
                                                                       partial.transpose(1, 2))),
                                   call.N, config.block[1], device)

        # forward and backward of a step see the same inputs: one build, keyed by their content
        # (the torch path's input-schedule cache, [Note: input schedules] in schedules.py)
        key = (call.pattern.ir, call.M, call.N, call.Hq, call.grid, config.block, str(device),
               tuple(inputs_digest(inp) for inp in batches))
        return _INPUT_LISTS.get(key, build)

    # -- knobs
    @staticmethod
    def _precision(q, config) -> str:
        return "tf32" if (q.dtype == torch.float32 and config.allow_tf32) else "ieee"

    def call_config(self, call: Call, q=None):
        """The backend's `KernelConfig` with the call's tiles (`pat(..., block=...)`), if any:
        (bm, bn) sets block_m / block_n, ((query tile shape), (key tile shape)) N-D tiles.
        Without a config given to the backend, the base is the target's default
        (`target_configs`) for tensors like `q` (on CUDA, or with `capability` set).
        Raises ValueError (expected / got / try) for tiles the kernels cannot use."""
        base = self.config if self._user_config is not None or q is None else self.target_configs(call, q).default
        if call.block is None:
            return base
        bm, bn = call.block
        if isinstance(bm, tuple):
            return replace(base, tile=call.block, block_m=math.prod(bm), block_n=math.prod(bn))
        return replace(base, tile=None, block_m=bm, block_n=bn)

    def configure(self, config=None) -> None:
        """Use `config` for every call from now on (kernel sets are memoised per config);
        None: back to the target's default (kernels.configs_for)."""
        from attnc.codegen.kernels import KernelConfig

        self.config = config or KernelConfig()
        self._user_config = config

    def device_capability(self, q) -> int | None:
        """The compute capability configs are chosen for: `capability` if set, else q's CUDA
        device's (86 for sm_86), None on the CPU (the interpreter runs any config)."""
        if self.capability is not None:
            return self.capability
        if q.is_cuda:
            major, minor = torch.cuda.get_device_capability(q.device)
            return 10 * major + minor
        return None

    def target_configs(self, call: Call, q):
        """kernels.configs_for this call's target, head dim and dtype."""
        from attnc.codegen.kernels import configs_for

        return configs_for(self.device_capability(q), max(call.D, call.Dv), q.dtype)

    def backward_config(self, call: Call, config, q):
        """The config the backward runs with after a forward with `config`: itself when its
        backward kernels fit the target, else a fitting one (the forward may have autotuned
        to a config whose dK/dV needs more shared memory than the GPU has)."""
        return self.target_configs(call, q).backward(config)

    def _config(self, call: Call, q, k, v):
        """The call's tiles (`call_config`); with autotune on CUDA, the fastest
        forward of the target's autotune candidates (kernels.configs_for) for this configuration (measured once;
        when the tiles are chosen, by `block=` or N-D tiles, only warps and stages vary)."""
        base = self.call_config(call, q)
        if not (self.autotune and q.is_cuda):
            return base
        autotune = self.target_configs(call, q).autotune

        memo = (call.pattern.text(), call.M, call.N, call.Hq, call.grid, q.shape[0], q.dtype, call.D, call.Dv, base)
        best = self._tuned.get(memo)
        if best is None:
            import triton.testing
            times = {}
            candidates = autotune
            if call.block is not None or base.tile is not None:
                candidates = dict.fromkeys(replace(base, num_warps=c.num_warps, num_stages=c.num_stages)
                                           for c in autotune)
            for cfg in candidates:
                try:
                    times[cfg] = triton.testing.do_bench(lambda: self._run_forward(call, cfg, q, k, v), warmup=5, rep=20)
                except Exception:  # a config may not fit this device (shared memory): skip it
                    continue
            best = min(times, key=times.get) if times else base
            self._tuned[memo] = best
        return best


def device_reason(q: torch.Tensor, D: int, Dv: int) -> str | None:
    """Why no generated kernel (attention or decode) can run on tensors like `q` with these
    head dims, or None: Triton missing, no interpreter on CPU, device, dtype, head dims."""
    missing = _triton_missing()
    if missing:
        return missing
    if q.device.type == "cpu":
        reason = _interpreter_reason()
        if reason:
            return reason
    if q.device.type not in ("cpu", "cuda"):
        return f"the Triton kernels run on CUDA (or the CPU interpreter), not on {q.device.type}; try backend='torch'"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return ("Triton's interpreter cannot multiply bfloat16 tiles (numpy has no bfloat16: tl.dot sees raw "
                "16-bit integers); bfloat16 runs on a GPU. On the CPU try float16 / float32 or backend='torch'")
    if q.dtype == torch.float64:
        return "the Triton kernels compute in float16 / bfloat16 / float32; got float64: try backend='torch'"
    if max(D, Dv) > MAX_HEAD_DIM:
        return f"the Triton kernels support head dims up to {MAX_HEAD_DIM}, got D={D}, Dv={Dv}; try backend='torch'"
    return None


def _score_tables(call: Call, device) -> list[torch.Tensor]:
    """The score term's tables as the kernels read them: float32, contiguous, flat."""
    return [t.detach().to(device=device, dtype=torch.float32).contiguous().view(-1) for t in call.tables.values()]


def _list_args(lists: TileLists | None, direction: int, closed: bool) -> tuple:
    """A kernel's tile-list arguments: none for closed-form loops; else the plan's
    full and partial lists (direction 0: per query tile, 1: per key tile)."""
    if closed:
        return ()
    full, part = (lists.full, lists.partial) if direction == 0 else (lists.full_t, lists.partial_t)
    return (full.counts, full.index, full.index.shape[-1], part.counts, part.index, part.index.shape[-1])


def device_capability(device) -> str:
    """What the cache key records about the device: the CUDA capability, or
    'cpu-interpreter'."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return f"{device.type}-interpreter"
