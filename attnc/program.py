"""Bound patterns: a pattern with its parameters bound, and everything asked of it.

input:  a pattern's IR bound by `Program.pattern` (attnc/loader.py), and per call its sizes
        (M, N, heads, grid) and run-time inputs.
output: `BoundPattern`: the reference mask, tile plans, row checks, formulas, simulations,
        routing, the FlexAttention export, KV retention, decoding and the attention op.
does not: read files (loader.py), check run-time inputs itself (call_inputs.py) or compute
        anything heavy when bound; masks and plans are evaluated on demand.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from . import call_inputs, ir, ir_text
from .call_inputs import int_value
from .errors import AttnError, error
from .limits import require
from .runtime.registry import register

if TYPE_CHECKING:
    import torch

    from .loader import Program

# torch (and the analysis / reference modules built on it) are imported where they are
# used, so `attnc check` and `attnc list` load and bind patterns without importing torch


class BoundPattern:
    """A pattern with its parameters bound; callable as an attention op.

    Sizes (M, N, heads, grid) and run-time inputs are given per call.
    """

    def __init__(self, program: Program, pattern: ir.PatternIR, params: dict):
        self.program = program
        self.ir = pattern
        self.params = params
        # [Note: traced first calls] Everything `pat(q, k, v)` reads before the op is
        # computed here, eagerly: under torch.compile(fullgraph=True) the first call may
        # be traced, and dynamo cannot trace IR walks (networkx) or a registry write.
        self._topk = ir.has_topk(pattern)
        self.op_key = register(self, pattern.name)  # how the op names it (runtime/registry.py)

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def layout(self) -> ir.Layout:
        return self.ir.layout

    def __repr__(self) -> str:
        return f"<BoundPattern {ir_text.pattern_text(self.ir)}>"

    def text(self) -> str:
        """Canonical IR text (parameters symbolic, with their bindings)."""
        return ir_text.pattern_text(self.ir)

    # -- sizes
    def resolve_sizes(self, M: int, N: int | None, heads: int | None, grid) -> tuple[int, int, int, tuple | None]:
        """Validate call sizes; returns (M, N, H, grid)."""
        layout = self.ir.layout
        for name, v in (("M", M), ("N", N), ("heads", heads)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        H = heads if heads is not None else 1
        if layout.axes:
            if grid is None:
                raise ValueError(
                    f"pattern '{self.name}' is on {layout}: expected grid=(sizes of {', '.join(layout.axes)}), got grid=None; "
                    f"try grid={tuple(8 for _ in layout.axes)}")
            if isinstance(grid, int):
                grid = (grid,)
            grid = tuple(grid)
            if len(grid) != len(layout.axes) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid):
                raise ValueError(f"grid: expected {len(layout.axes)} positive sizes for axes ({', '.join(layout.axes)}), got {grid!r}")
            T = 0
            if layout.text is not None:
                # N is T + the grid's size, so T may use H, size(a) and parameters but not M or N
                env = {**self.ir.binding_map(), ir.H: H, **{ir.axis_size(a): g for a, g in zip(layout.axes, grid)}}
                T = int_value(layout.text, env)
                if T is None or T < 0:
                    why = "must not depend on M or N (N is T plus the grid's size)" if T is None else f"must be >= 0, got {T}"
                    raise AttnError(error(layout.span, f"the text length T of seq(T) {why}"), self.program.sources)
            total = T + math.prod(grid)
            if N is None:
                N = total
            if M is None:  # on a grid the sizes follow from it
                M = N
            if N != total:
                extra = f"{T} text tokens + " if layout.text is not None else ""
                raise ValueError(f"N: expected {extra}{' * '.join(map(str, grid))} = {total} tokens for grid={grid}, got N={N}; "
                                 f"try N={total} or a grid whose product matches")
            if M > N:
                raise ValueError(f"M: on a grid the queries are the last M of the N grid tokens: expected M <= {N}, got M={M}")
        else:
            if grid is not None:
                raise ValueError(f"pattern '{self.name}' is on seq: expected grid=None, got grid={grid!r}; "
                                 f"try declaring it `on grid(...)`")
            if M is None:
                raise ValueError(f"pattern '{self.name}' is on seq: expected the query length M, got None; try M=1024")
            if N is None:
                N = M
        return M, N, H, grid

    # -- reference mask
    def mask(self, M: int, N: int | None = None, *, heads: int | None = None, grid=None, **inputs) -> torch.Tensor:
        """Dense boolean reference mask.

        Returns bool ``[H, M, N]`` (``[B, H, M, N]`` when run-time inputs are
        batched), True where query ``q`` may attend key ``k``. ``N`` defaults
        to ``M`` (or to the grid's token count); ``heads`` to 1. Meant for
        checking and small sizes: memory is O(H * M * N), estimated first; past
        the memory limit ($ATTNC_MAX_BYTES, default half of physical memory) a
        `limits.MemoryLimitError` (a ValueError) says so before allocating.

        >>> attnc.loads("pattern p = sliding(2)").pattern().mask(4)[0].int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
        """
        import torch

        from .reference import mask_bytes

        M, N, H, grid = self.resolve_sizes(M, N, heads, grid)
        batches, batched = self.input_batches(M, N, H, inputs)
        need = mask_bytes(M, N, H, len(self.layout.axes)) + (len(batches) * H * M * N if batched else 0)
        sizes = f"{M}, {N}, heads={H}" + (f", grid={grid}" if grid is not None else "")
        require(need, f"pat.mask({sizes}) of '{self.name}'" + (f" for {len(batches)} batch elements" if batched else ""),
                "pat.plan(...) (full / partial / empty tiles, no dense mask), pat.check_rows(...) for empty rows, "
                "or smaller M, N or heads")
        outs = [self._evaluate(M, N, H, grid, b) for b in batches]
        return torch.stack(outs) if batched else outs[0]

    def mask_rows(self, M: int, N: int, H: int, grid, lo: int, hi: int, inputs: dict | None = None) -> torch.Tensor:
        """Rows lo..hi of the mask (sizes already validated): bool [H, hi - lo, N]."""
        return self._evaluate(M, N, H, grid, inputs or {}, rows=(lo, hi))

    def mask_window(self, M: int, N: int, H: int, grid, rows: tuple[int, int], keys: tuple[int, int]) -> torch.Tensor:
        """The mask of query rows `rows` and key columns `keys` (half-open, sizes already
        validated): bool [H, rows, keys], evaluated only there."""
        import torch

        return self._evaluate(M, N, H, grid, {}, rows=rows, keys=torch.arange(*keys))

    def _evaluate(self, M: int, N: int, H: int, grid, inputs: dict, rows=None, keys=None) -> torch.Tensor:
        """reference.evaluate of this pattern, its diagnostics pointing into this program's sources."""
        from .reference import evaluate

        try:
            return evaluate(self.ir, M, N, H, grid, inputs, rows=rows, keys=keys)
        except AttnError as err:
            raise err.with_sources(self.program.sources) from None

    # -- run-time inputs (attnc/call_inputs.py)
    def check_input_names(self, inputs: dict, tables: bool = False) -> dict:
        """Raise ValueError unless `inputs` names exactly the declared run-time
        inputs (and, with `tables`, the score term's table inputs); returns
        {name: InputSpec} of the mask's inputs in declaration order."""
        return call_inputs.check_input_names(self.ir, inputs, tables)

    def table_shapes(self, M: int, N: int, H: int, grid) -> dict[str, tuple[int, ...]]:
        """The shape of every table input of the score term at these sizes ({} without one)."""
        return call_inputs.table_shapes(self.ir, M, N, H, grid, self.program.sources)

    def input_batches(self, M: int, N: int, H: int, inputs: dict, batch: int | None = None) -> tuple[list[dict], bool]:
        """Validate run-time inputs; returns (one dict per batch element, whether
        any input carried a batch dimension). The rule: [Note: input batches] in
        attnc/call_inputs.py; the op checks it once, in `runtime/ops.make_call`."""
        return call_inputs.input_batches(self.ir, M, N, H, inputs, batch, self.program.sources)

    # -- analysis
    def plan(self, M: int, N: int | None = None, *, heads: int | None = None, grid=None, block=(128, 128), **inputs):
        """Tile plan: per query tile its full and partial key tiles (and the
        transposed view), built from the pattern's structure (see analysis.py).

        >>> plan = attnc.loads("pattern p = sliding(64)").pattern().plan(1000, block=(64, 64))
        >>> plan.counts()["tiles_partial"], plan.method
        (31, 'closed-form')
        """
        return self._plan(M, N, heads, grid, block, inputs)

    def _plan(self, M, N, heads, grid, block, inputs: dict, counted: bool = False):
        """`plan`; `counted`: a counted plan where one is cheaper ([Note: counted plans] in
        plans.py): what `simulate` reads, tile counts and pairs, without the tiles."""
        from .codegen.pipeline import Shape, plan

        M, N, H, grid = self.resolve_sizes(M, N, heads, grid)
        shape = Shape.of(self.ir, M, N, H, grid).with_tiles(self.ir, block)
        one = None
        if inputs or self.ir.inputs:
            batches, _ = self.input_batches(M, N, H, inputs)
            if len(batches) != 1:
                raise ValueError(f"plan: expected the run-time inputs of one batch element, got {len(batches)}; "
                                 f"try plan(..., {next(iter(inputs))}=x[0])")
            one = batches[0]
        shape = shape.with_inputs({n: tuple(t.shape) for n, t in (one or {}).items()})
        return plan(self.ir, shape, self.program.sources, one, padded=False, counted=counted)

    def check_rows(self, M: int, N: int | None = None, *, heads: int | None = None, grid=None):
        """Static row checks (`analysis.RowReport`): how many query rows attend no
        key, one witness (head, row), and whether the pattern is fully dense.
        Proved from the closed-form interval counts (no mask is built) when the
        pattern has one, else by an exact scan in row chunks.

        >>> attnc.loads("pattern p = sliding(4) - causal").pattern().check_rows(1 << 20).witness
        (0, 0)
        """
        M, N, H, grid = self.resolve_sizes(M, N, heads, grid)
        if self.ir.inputs:
            raise ValueError(f"pattern '{self.name}' depends on run-time inputs ({', '.join(i.name for i in self.ir.inputs)}): "
                             f"expected a static pattern; try pat.mask(..., {self.ir.inputs[0].name}=...) and inspect its rows")
        from .analysis import row_report

        try:
            return row_report(self.ir, M, N, H, grid)
        except AttnError as err:
            raise err.with_sources(self.program.sources) from None

    def formula(self):
        """Exact allowed pairs, density and forward FLOPs of this 1-D pattern as
        sympy formulas of N and the parameters (self-attention, M = N), with the
        conditions under which they hold (`symbolic.Formula`). Derived once per
        bound pattern and cached. Raises `piecewise.NoFormula` (a ValueError)
        saying why when the pattern has none (grids, block, strided, where, ...).

        >>> str(attnc.loads("pattern p(w = 8) = sliding(w)").pattern().formula().density)
        'w/N - w*(w - 1)/(2*N**2)'
        """
        from .symbolic import formula

        return formula(self.ir)

    def simulate(self, M: int, N: int | None = None, *, heads: int | None = None, head_dim: int = 128, grid=None,
                 tile=(128, 128), gpu: str = "h100", batch: int = 1, routed_density: float | None = None, **inputs):
        """Density, tile counts and the roofline speedup estimate (`SimReport`).

        Dynamic patterns: pass their run-time inputs (one batch element), or
        ``routed_density=0.1`` to draw every missing block table (and every
        ``topk``'s choice, k = ceil(0.1 * key blocks)) at that density; without
        it ``topk(k)`` is simulated with its own k among its eligible blocks.
        """
        from .simulate import simulate_plan

        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim: expected a positive integer, got {head_dim!r}")
        if self.ir.inputs or routed_density is not None or self.has_topk():
            from .dynamic import synthetic_inputs
            M, N, H, grid = self.resolve_sizes(M, N, heads, grid)
            pat, inputs = synthetic_inputs(self, M, N, H, grid, routed_density, inputs)
            plan = pat._plan(M, N, H, grid, tile, inputs, counted=True)
            return simulate_plan(plan, name=self.name, head_dim=head_dim, gpu=gpu, batch=batch)
        plan = self._plan(M, N, heads, grid, tile, {}, counted=True)
        rep = simulate_plan(plan, name=self.name, head_dim=head_dim, gpu=gpu, batch=batch)
        from .piecewise import NoFormula
        try:
            f = self.formula() if plan.M == plan.N else None
        except NoFormula:
            f = None
        if f is not None and f.valid_at(plan.N):
            import dataclasses
            rep = dataclasses.replace(rep, density_formula=str(f.density), formula_exact_when=f.condition_text())
        return rep

    def sweep(self, over: str, values, *, N: int | None = None, heads: int | None = None, head_dim: int = 128,
              grid=None, tile=(128, 128), gpu: str = "h100"):
        """`simulate` at every value of one variable (`simulate.Sweep`, with
        `to_table()`, `to_json()` and `plot(path)`): ``over="N"`` varies the
        length (M = N, 1-D patterns), any other name rebinds that parameter
        at length ``N``.

        >>> sw = attnc.loads("pattern p(w = 64) = sliding(w)").pattern().sweep("N", [1024, 4096])
        >>> [round(r.flop_bound, 1) for r in sw.reports]
        [16.5, 64.5]
        """
        from .progress import each
        from .simulate import Sweep

        values = tuple(values)
        if not values:
            raise ValueError("sweep: expected at least one value, got none; try values=[1024, 2048]")
        reports = []
        if over == "N":
            if self.layout.axes:
                raise ValueError(f"sweep over N: pattern '{self.name}' is on {self.layout}; expected a 1-D pattern; "
                                 f"try sweeping a parameter at a fixed grid")
            for v in each(values, f"simulating {over} = ...", unit="point"):
                reports.append(self.simulate(v, v, heads=heads, head_dim=head_dim, tile=tile, gpu=gpu))
        else:
            info = next((i for i in self.program.patterns() if i.name == self.name), None)
            known = [p.name for p in info.params] if info else []
            if over not in known:
                raise ValueError(f"sweep: expected N or a parameter of '{self.name}' ({', '.join(known) or 'none'}), got {over!r}")
            if N is None and grid is None:
                raise ValueError(f"sweep over {over}: expected a length N=... (or grid=...) to simulate at, got none")
            for v in each(values, f"simulating {over} = ...", unit="point"):
                pat = self.program.pattern(self.name, **{**self.params, over: v})
                n = N if grid is None else pat.resolve_sizes(1, N, heads, grid)[1]
                reports.append(pat.simulate(n, n, heads=heads, head_dim=head_dim, grid=grid, tile=tile, gpu=gpu))
        return Sweep(over=over, values=values, reports=tuple(reports))

    # -- dynamic routing
    def route(self, q: torch.Tensor, k: torch.Tensor, *, grid=None, **inputs) -> tuple["BoundPattern", dict]:
        """Resolve `topk` for these tensors: returns the pattern with every
        `topk` replaced by `routed(topk_selN)` and the inputs extended with the
        chosen block tables (int32 ``[B, H, ceil(M/b), k]``, -1 padding). A
        pattern without `topk` returns itself and the inputs unchanged.

        The lowered pattern's `mask(M, N, **inputs)` is then the reference
        for the op; the selection rule is documented in attnc/dynamic.py and
        docs/language.md.
        """
        import torch

        from . import dynamic

        if not self.has_topk():
            return self, inputs
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
            raise ValueError("route: expected q [B, Hq, M, D] and k [B, Hkv, N, D] tensors")
        B, H, M, _ = q.shape
        N = k.shape[2]
        M, N, H, grid = self.resolve_sizes(M, N, H, grid)
        batches, _ = self.input_batches(M, N, H, inputs, batch=B)
        lowered = self.topk_lowering()
        tables = dynamic.route(lowered, q, k, M, N, H, grid, batches, lambda e: self.value_at(e, M, N, H, grid))
        return self.routed_pattern, {**inputs, **tables}

    def value_at(self, expr, M: int, N: int, H: int, grid) -> int | None:
        """An integer expression of this pattern (parameters, M, N, H, size(a)) at these sizes."""
        env = {**self.ir.binding_map(), ir.M: M, ir.N: N, ir.H: H}
        if grid is not None:
            env.update({ir.axis_size(a): s for a, s in zip(self.ir.layout.axes, grid)})
        return int_value(expr, env)

    def has_topk(self) -> bool:
        return self._topk

    def topk_lowering(self):
        """The topk-lowered IR and its BoundPattern, built once per pattern."""
        from . import dynamic
        if getattr(self, "_lowered_cache", None) is None:
            self._lowered_cache = dynamic.lower_topk(self.ir)
            self.routed_pattern = BoundPattern(self.program, self._lowered_cache.pattern, self.params)
        return self._lowered_cache

    # -- FlexAttention
    def to_flex(self, M: int, N: int | None = None, *, heads: int | None = None, grid=None, block=(128, 128),
                device="cpu", **inputs):
        """``(mask_mod, block_mask)`` for ``torch.nn.attention.flex_attention``.

        The ``BlockMask`` (``BLOCK_SIZE=block``) is built from this pattern's
        tile plan, not by evaluating ``mask_mod`` on every position; ``mask_mod``
        is exact everywhere (a lookup into the plan and the partial tiles' bits).
        Run-time inputs are passed as keywords, as for the op.

        >>> mask_mod, bm = pat.to_flex(4096, heads=8)
        >>> out = torch.compile(flex_attention)(q, k, v, block_mask=bm)
        """
        from .runtime.flex import to_flex
        return to_flex(self, M, N, heads=heads, grid=grid, block=block, device=device, **inputs)

    # -- decoding
    def kv_retention(self, L: int, *, heads: int | None = None):
        """bool ``[heads, L]``: the cached keys (positions ``0 .. L-1``) that some query at a
        position ``>= L`` may still attend; the others can be evicted for good. Derived from
        the pattern in closed form and conservative (attnc/retention.py): ``sliding(w) |
        (sink(s) & causal)`` keeps the first ``s`` and the last ``w - 1``; a ``heads {}``
        mixture decides per head (DuoAttention's retrieval heads keep everything).

        >>> keep = pat.kv_retention(32768, heads=8)
        """
        from .retention import retention
        H = 1 if heads is None else heads
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"heads: expected a positive integer, got {heads!r}")
        return retention(self.ir, L, H)

    def decode(self, q, k_cache, v_cache, *, cache_seqlens=None, block_table=None, key_positions=None,
               scale: float | None = None, return_lse: bool = False, backend: str = "auto", **tables):
        """Attention of the last ``m`` positions of each sequence over its KV cache.

        ``q [B, Hq, m, D]`` holds the newest ``m`` tokens of each sequence (already appended to
        the cache: query row ``i`` of sequence ``b`` is position ``cache_seqlens[b] - m + i``).
        The cache is ``[B, Hkv, S, D]`` (``cache_seqlens`` defaults to ``S``), or paged:
        ``[pages, Hkv, page_size, D]`` with ``block_table [B, max_pages]`` (HND pages, vLLM /
        FlashInfer addressing), or per key/value head ``[B, S_g, D]`` tensors with
        ``key_positions`` (what `attnc.nn.KVCache` keeps after evicting). Equals the op's
        last ``m`` rows; only the keys the pattern allows are read, found in closed form
        without a plan (runtime/decode.py). Score-term tables are keywords. ``backend``:
        "auto" (the split-KV Triton kernel on CUDA where it can run, else the torch path),
        "torch", or "triton" (on CPU tensors with TRITON_INTERPRET=1: the interpreter).

        >>> out = pat.decode(q, k_cache, v_cache, cache_seqlens=torch.tensor([1000, 37]))
        """
        from .runtime.decode import decode
        return decode(self, q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
                      key_positions=key_positions, scale=scale, return_lse=return_lse, backend=backend, **tables)

    # -- the op
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False,
                 scale: float | None = None, backend: str = "auto", grid=None, block=None, **inputs):
        """Attention restricted to the pattern.

        q ``[B, Hq, M, D]``, k ``[B, Hkv, N, D]``, v ``[B, Hkv, N, Dv]``; GQA
        when ``Hq % Hkv == 0``. Returns ``out [B, Hq, M, Dv]`` (and
        ``lse [B, Hq, M]`` in float32 with ``return_lse=True``). Queries with
        no allowed key give 0 and lse ``-inf``. ``scale`` defaults to
        ``1/sqrt(D)``. ``backend``: "auto" (Triton where it can run, else the
        block-sparse torch path), "triton", "torch", "flex" (FlexAttention with
        attnc's BlockMask; forward only on CPU) or "reference" (dense, for
        checking). A registered ``torch.library`` op: works under autograd,
        ``torch.autograd.gradcheck`` and ``torch.compile(fullgraph=True)``.
        ``block`` picks the Triton kernels' tiles, spelled like ``plan(block=)``:
        ``(64, 32)``, or N-D tiles on a pure grid such as ``((8, 8), (8, 4))``
        (tokens permuted into tile-major order, see docs/codegen.md); other
        backends choose their own tiles.
        """
        from .runtime.ops import attention
        return attention(self, q, k, v, return_lse=return_lse, scale=scale, backend=backend, grid=grid, inputs=inputs,
                         block=block)

