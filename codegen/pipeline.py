"""The compiler's passes, in order, and the one place that runs the kernel passes.

input:  `.attn` text (parse, elaborate), or a bound pattern's IR and one validated
        `Shape` (M, N, H, grid, kernel config, run-time input shapes) for the kernel passes.
output: `Compiled`: the Triton module's source and what it was made from (lowered
        mask, plan, loop bounds, score term, N-D layout); with `device=`, also its
        cache key and the imported module.
does not: resolve or check sizes inside a pass (`Shape.resolve` / `Shape.of` do it once,
        before the passes), launch kernels (runtime/triton_backend.py), or read files
        and their imports (attnc.loader runs parse and elaborate per file for `load`).

[Note: the passes] `PASSES` lists them in the order they run; each names what it
reads and what it gives, and every value a pass reads is given by the caller
(text, shape, device) or by an earlier pass (tests/test_pipeline.py checks both):

    text  --parse-->      AST (syntax.Module)                       attnc/syntax.py
    AST   --elaborate-->  IR (ir.PatternIR)                         attnc/elaborate.py
    IR + Shape --lower-->  Lowered (the mask; N-D tiles: permuted)   pointwise.py, ndtiles.py
    IR + Shape --plan-->   Plan, or None (run-time inputs)           attnc/analysis.py, ndtiles.py
    IR + Shape + Plan --bounds--> LoopBounds                         bounds.py
    IR + Shape + Lowered + Plan + LoopBounds --kernels--> Compiled   kernels.py (score.py)
    Compiled + device --cache--> Compiled with key and module        cache.py

`compile_kernels` runs lower .. kernels (and cache with `device=`) for one shape;
`attnc compile`, `compile_pattern`, the size classes (generic.py) and the Triton
backend all call it, so the passes are sequenced here and nowhere else. Decoding
(`pat.decode`, runtime/decode.py) runs `DECODE_PASSES` through `compile_decode`:
lower, then the split-KV decode kernel (decode_kernel.py) in place of plan, loop
bounds and kernels (it lists key tiles on the host), then cache. The
mask is lowered before the plan is built: lowering is the pass that refuses
patterns without kernels (`topk`: "no pointwise form"), and that message is the
one a user should see, before any tile is planned.

[Note: one shape] Sizes are resolved and checked once per call, before the
passes: `Shape.resolve` runs the pattern's `resolve_sizes` (M, N, heads, grid)
and `Shape.of` checks the tiles against the pattern (N-D tiles need a pure
grid, M = N and no run-time inputs); the op's `Call` is already resolved, so
every backend reads the op's one value, `Call.shape` (runtime/backend.py), built
once per call. The Triton backend derives its kernels' shape from it
(`with_config`); the torch path, FlexAttention's export and `pat.plan` plan and
lower through `plan` / `lower` here with their own tiles (`with_tiles`: any
positive 1-D tiles, or N-D tiles on a pure grid), via `Call.plan` /
`Call.lowered`, and with one batch element's run-time inputs (`with_inputs`,
`plan(inputs=)`). No code outside this module calls `analysis.plan_blocks` or
`pointwise.lower` for the runtime or the API (tests/test_pipeline.py). The
passes read `shape.M`, `shape.N`, ... and never re-derive a size (the lowering and the loop
bounds only tag them with their expressions: [Note: one text, many sizes] in
sizes.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from attnc import analysis, ir, syntax
from attnc.elaborate import bind_pattern, check_scope, find_pattern, module_scope
from attnc.errors import AttnError, Collector, error
from attnc.tiles import check_block

from . import bounds as _bounds
from . import cache as _cache
from . import kernels as _kernels
from . import decode_kernel, ndtiles, pointwise
from .expr import to_text
from .kernels import KernelConfig
from .lowered import Lowered
from .score import score_fn

#: the header's plan line of modules whose plan is built per call from run-time inputs
PER_CALL_PLAN = "built per call from the run-time inputs (union over the batch)"


# ----------------------------------------------------------------------------- the shape


@dataclass(frozen=True)
class Shape:
    """One validated call shape: everything the kernel passes read besides the pattern's IR.

    M queries, N keys, H query heads, the grid's axis lengths (None on seq), the
    `KernelConfig` (tiles, warps, stages) and the shapes of the run-time inputs that
    change the code, as sorted (name, shape) pairs. Build it with `Shape.resolve`
    (sizes as the user gives them) or `Shape.of` (sizes already resolved, e.g. an op's
    `Call`): both check once; the passes take it as it is ([Note: one shape]).
    """

    M: int
    N: int
    H: int
    grid: tuple[int, ...] | None = None
    config: KernelConfig = field(default_factory=KernelConfig)
    input_shapes: tuple = ()
    #: the plan's tiles when a host path chooses its own (the torch path, FlexAttention's
    #: export, `pat.plan(block=)`): (bm, bn) of any positive sizes, or N-D tile shapes on a
    #: grid, checked by `with_tiles`; None: the kernel config's tiles
    tiles: tuple | None = None

    def __post_init__(self):
        # normal forms only (hashable, order-free): the checks are in `of` and `resolve`
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(self.grid))
        shapes = dict(self.input_shapes)
        object.__setattr__(self, "input_shapes", tuple(sorted((n, tuple(s)) for n, s in shapes.items())))

    @classmethod
    def of(cls, pattern: ir.PatternIR, M: int, N: int, H: int, grid=None, config: KernelConfig | None = None,
           input_shapes: dict | None = None) -> "Shape":
        """The shape of resolved sizes (`BoundPattern.resolve_sizes`, or an op's `Call`), its
        tiles checked against `pattern`; ValueError (expected / got / try) for tiles the
        kernels cannot use here (N-D tiles off a pure grid, with M != N or run-time inputs)."""
        config = config or KernelConfig()
        if config.tile is not None:
            reason = ndtiles.nd_reason(pattern, M, N, config.tile)
            if reason:
                raise ValueError(reason)
        return cls(M, N, H, grid, config, tuple((input_shapes or {}).items()))

    def with_config(self, pattern: ir.PatternIR, config: KernelConfig, input_shapes: dict | None = None) -> "Shape":
        """This shape with the Triton kernels' `config` (and the input shapes that change their
        code, default: these), checked like `of`."""
        shapes = self.inputs() if input_shapes is None else input_shapes
        return Shape.of(pattern, self.M, self.N, self.H, self.grid, config, shapes)

    def with_tiles(self, pattern: ir.PatternIR, block) -> "Shape":
        """This shape planned with a host path's own tiles `block` (spelled like
        `plan(block=)`: an int, (bm, bn), or N-D tile shapes), checked by
        `tiles.check_block`: ValueError (expected / got / try) for tiles that do not fit."""
        block = check_block(block, pattern.layout, self.M, self.N)
        return self if block == self.tiles else replace(self, tiles=block)

    def with_inputs(self, input_shapes: dict) -> "Shape":
        """This shape with other run-time input shapes (one batch element's, a stacked batch's)."""
        return replace(self, input_shapes=tuple(input_shapes.items()))

    @classmethod
    def resolve(cls, pat, M: int | None, N: int | None = None, *, heads: int | None = None, grid=None,
                config: KernelConfig | None = None, input_shapes: dict | None = None) -> "Shape":
        """The shape of a call to the bound pattern `pat` with sizes as a user gives them
        (N, heads and, on a grid, M may be None): `pat.resolve_sizes`, then `of`."""
        M, N, H, grid = pat.resolve_sizes(M, N, heads, grid)
        return cls.of(pat.ir, M, N, H, grid, config, input_shapes)

    @property
    def block(self) -> tuple:
        """The plan's tiles: `tiles` when a host path chose them, else the kernel config's
        (BLOCK_M, BLOCK_N) or N-D tile shapes."""
        if self.tiles is not None:
            return self.tiles
        return self.config.tile if self.config.tile is not None else self.config.block

    def layout(self) -> ndtiles.TileLayout | None:
        """The padded tile-major order of N-D tiles (None for 1-D tiles)."""
        block = self.block
        return ndtiles.TileLayout(self.grid, *block) if isinstance(block[0], tuple) else None

    def inputs(self) -> dict:
        """{run-time input name: shape} (the parts of the shapes that change the code)."""
        return dict(self.input_shapes)


# ----------------------------------------------------------------------------- what the passes give


@dataclass(frozen=True)
class Compiled:
    """What the kernel passes give: the module source, the lowered mask, the plan (None
    for patterns with run-time inputs: their plan is per call), the loop bounds and the
    score term it was generated from; with the cache pass, its key and the imported module."""

    source: str
    lowered: Lowered
    plan: object | None
    config: KernelConfig
    bounds: object | None = None  # bounds.LoopBounds
    score: object | None = None  # score.ScoreFn
    shape: Shape | None = None
    key: str | None = None  # cache pass: the cache key (the text, versions and device)
    module: object | None = None  # cache pass: the imported module

    def cache_entry(self) -> tuple[dict, str, dict]:
        """What the cache pass keys the module by besides the pattern's text and the device
        (options, config), and the notes it stores beside it."""
        shape = self.shape
        return ({"source": self.source}, self.config.key(),
                {"pattern": self.lowered.text, "config": self.config.key(),
                 "generated_at": {"M": shape.M, "N": shape.N, "H": shape.H, "grid": shape.grid}})

    def metadata(self) -> dict:
        """JSON-ready description: pattern, sizes, config and the plan's tile lists."""
        low, plan = self.lowered, self.plan
        meta = {"pattern": low.name, "ir": low.text, "M": low.M, "N": low.N, "heads": low.H,
                "grid": list(low.grid) if low.grid else None, "config": self.config.key(),
                "tables": [{"name": t.name, "kind": t.kind, "shape": list(t.shape), "batched": t.batched}
                           for t in low.tables],
                "mask": to_text(low.expr)}
        if self.score is not None:
            meta["score"] = {"term": self.score.text,
                             "tables": [{"name": n, "shape": list(shape)} for n, shape in self.score.tables]}
        if self.bounds is not None:
            meta["loops"] = {"summary": self.bounds.summary(), **self.bounds.to_dict()}
        if plan is None:
            meta["plan"] = None
            return meta

        def lists(t):
            return [[row[: int(c)].tolist() for row, c in zip(idx, cnt)] for idx, cnt in zip(t.index, t.counts)]

        meta["plan"] = {"block": list(plan.block), "method": plan.method, **plan.counts(),
                        "density": plan.density(), "summary": plan.summary(),
                        "full": lists(plan.full), "partial": lists(plan.partial)}
        return meta


@dataclass(frozen=True)
class NDCompiled(Compiled):
    """`Compiled` for N-D tiles: the plan is the kernels' plan (in the padded
    order) and `layout` says where every token goes."""

    layout: ndtiles.TileLayout | None = None

    def metadata(self) -> dict:
        meta = super().metadata()
        # N-D modules always read tile lists (the plan's summary and the header say so): no
        # "loops" entry, as before the pipeline
        meta.pop("loops", None)
        lay = self.layout
        meta["plan"]["tile_shape"] = [list(lay.tile_q), list(lay.tile_k)]
        meta["plan"]["summary"] = self.plan.summary()
        meta["permutation"] = {"tile_q": list(lay.tile_q), "tile_k": list(lay.tile_k), "M_padded": lay.M,
                               "N_padded": lay.N, "order_q": lay.order("q").tolist(), "order_k": lay.order("k").tolist()}
        return meta


@dataclass(frozen=True)
class DecodeCompiled(Compiled):
    """`Compiled` for the split-KV decode kernel (decode_kernel.py): M is the rows one
    sequence evaluates, N its length; no plan and no loop bounds (runtime/decode.py lists
    each sequence's key tiles from the pattern's interval sets)."""

    def cache_entry(self) -> tuple[dict, str, dict]:
        return ({"source": self.source, "kind": "decode"}, f"decode-{self.config.block_n}",
                {"pattern": self.lowered.text, "kind": "decode"})


# ----------------------------------------------------------------------------- the passes


def parse(text: str, file: str = "<string>") -> syntax.Module:
    """text -> AST: `syntax.parse` (AttnError on a syntax error)."""
    return syntax.parse(text, file)


def elaborate(tree: syntax.Module, name: str | None = None, params: dict | None = None,
              sources: dict[str, str] | None = None) -> ir.PatternIR:
    """AST -> IR: the pattern `name` of one parsed text (None: its only pattern) with
    `params` bound, after checking every pattern of the text, as `attnc.loads` does.
    Texts with imports are read by `attnc.load` / `attnc.loads`, which resolve them."""
    file = tree.file
    sources = sources or {}
    imports = [item for item in tree.items if isinstance(item, syntax.Import)]
    if imports:
        raise AttnError(error(imports[0].span, "pipeline.elaborate reads one text without imports",
                              "use attnc.load / attnc.loads, which resolve imports"), sources)
    diags = Collector()
    scope = module_scope(tree, diags)
    check_scope(scope, diags)
    diags.raise_if_errors(sources)
    return bind_pattern(find_pattern(scope, name, file, sources), scope, dict(params or {}), sources)


def lower(pattern: ir.PatternIR, shape: Shape, sources: dict | None = None) -> Lowered:
    """IR + Shape -> the mask as one pointwise expression (pointwise.lower); with N-D
    tiles, in the padded tile-major order (ndtiles.TileLayout.lower). LoweringError for
    patterns without a pointwise form (topk)."""
    low = pointwise.lower(pattern, shape.M, shape.N, shape.H, shape.grid, shape.inputs(), sources=sources)
    layout = shape.layout()
    return low if layout is None else layout.lower(low)


def plan(pattern: ir.PatternIR, shape: Shape, sources: dict | None = None, inputs: dict | None = None, *,
         padded: bool = True, counted: bool = False):
    """IR + Shape -> the tile plan of `shape.block` (analysis.plan_blocks). With N-D tiles,
    the kernels' plan in the layout's padded tile-major order, or with `padded=False` the
    plan in the grid's tile order (what `pat.plan` and `attnc plan` show). A pattern with run-time inputs is planned
    for one batch element's `inputs`; without them its plan is None (the kernels' plan is
    built per call). ValueError where the inputs defeat the closed form (a segment id in
    several runs): the torch path then scans the mask (schedules.scan_plan). `counted`: a
    counted plan may come back ([Note: counted plans] in attnc/plans.py; not with `padded`)."""
    if pattern.inputs and inputs is None:
        return None
    try:
        tiles = analysis.plan_blocks(pattern, shape.M, shape.N, shape.H, shape.grid, block=shape.block,
                                     inputs=inputs if pattern.inputs else None, counted=counted and not padded)
    except AttnError as err:
        raise err.with_sources(sources or {}) from None
    layout = shape.layout()
    return tiles if layout is None or not padded else layout.kernel_plan(tiles)


def bounds(pattern: ir.PatternIR, shape: Shape, tiles) -> _bounds.LoopBounds:
    """IR + Shape + Plan -> how each direction bounds its loops: closed form where it
    reproduces the plan exactly, else tile lists with the reason (bounds.loop_bounds)."""
    return _bounds.loop_bounds(pattern, shape.M, shape.N, shape.H, shape.config.block, tiles)


def kernels(pattern: ir.PatternIR, shape: Shape, lowered: Lowered, tiles, loops,
            sources: dict | None = None) -> Compiled:
    """IR + Shape + Lowered + Plan + LoopBounds -> the Triton module's source
    (kernels.generate), with the pattern's score term lowered at this shape (1-D tiles
    only: N-D tiles decline score terms, runtime/triton_backend.py)."""
    layout = shape.layout()
    if layout is not None:
        source = _kernels.generate(lowered, shape.config, ndtiles.header_text(layout, tiles), loops)
        return NDCompiled(source=source, lowered=lowered, plan=tiles, config=shape.config, bounds=loops,
                          shape=shape, layout=layout)
    text = tiles.summary() if tiles is not None else PER_CALL_PLAN
    score = _score(pattern, shape, sources)
    source = _kernels.generate(lowered, shape.config, text, loops, score)
    return Compiled(source=source, lowered=lowered, plan=tiles, config=shape.config, bounds=loops, score=score,
                    shape=shape)


def decode(pattern: ir.PatternIR, shape: Shape, lowered: Lowered, sources: dict | None = None) -> DecodeCompiled:
    """IR + Shape + Lowered -> the split-KV decode module's source (decode_kernel.decode_source):
    the kernels pass of `pat.decode`, for the newest rows of one sequence (M rows, N keys;
    `shape.config.block_n` is the kernel's key tile)."""
    score = _score(pattern, shape, sources)
    return DecodeCompiled(source=decode_kernel.decode_source(lowered, score), lowered=lowered, plan=None,
                          config=shape.config, score=score, shape=shape)


def _score(pattern: ir.PatternIR, shape: Shape, sources: dict | None):
    """The pattern's score term lowered at this shape (score.score_fn, memoised), or None."""
    if pattern.score is None:
        return None
    try:
        return score_fn(pattern, shape.M, shape.N, shape.H, shape.grid)
    except AttnError as err:
        raise err.with_sources(sources or {}) from None


def cache(compiled: Compiled, device: str) -> Compiled:
    """Compiled + device -> the same with its cache key and the module imported from the
    kernel cache (cache.load_module). `device` is what the key records about the device
    ('cuda-sm90', 'cpu-interpreter'); sizes are not in the key: the text is."""
    options, config_key, info = compiled.cache_entry()
    key = _cache.cache_key(compiled.lowered.text, options, config_key, device)
    module = _cache.load_module(key, lambda: compiled.source, info=info)
    return replace(compiled, key=key, module=module)


@dataclass(frozen=True)
class Pass:
    """One pass: its name, the values it reads, the value it gives and its function."""

    name: str
    reads: tuple[str, ...]
    gives: str
    run: Callable
    where: str  # the module that does the work


#: every pass, in the order they run ([Note: the passes])
PASSES = (
    Pass("parse", ("text",), "ast", parse, "attnc/syntax.py"),
    Pass("elaborate", ("ast",), "ir", elaborate, "attnc/elaborate.py"),
    Pass("lower", ("ir", "shape"), "lowered", lower, "codegen/pointwise.py"),
    Pass("plan", ("ir", "shape"), "plan", plan, "attnc/analysis.py"),
    Pass("bounds", ("ir", "shape", "plan"), "bounds", bounds, "codegen/bounds.py"),
    Pass("kernels", ("ir", "shape", "lowered", "plan", "bounds"), "compiled", kernels, "codegen/kernels.py"),
    Pass("cache", ("compiled", "device"), "loaded", cache, "codegen/cache.py"),
)
#: what the caller gives the passes
GIVEN = ("text", "shape", "device")
#: decoding (`pat.decode`) runs the same passes with the decode kernel in place of the plan,
#: the loop bounds and the attention kernels
DECODE_PASSES = PASSES[:3] + (Pass("decode", ("ir", "shape", "lowered"), "compiled", decode, "codegen/decode_kernel.py"),
                              PASSES[-1])


# ----------------------------------------------------------------------------- the entry points


def compile_kernels(pattern: ir.PatternIR, shape: Shape, *, sources: dict | None = None,
                    device: str | None = None) -> Compiled:
    """Run the kernel passes for one validated shape: lower, plan, bounds, kernels, and
    with `device` (see `cache`) the cache pass. `sources` (`Program.sources`) lets
    diagnostics quote the pattern's text. The one sequencing of these passes."""
    lowered = lower(pattern, shape, sources)
    tiles = plan(pattern, shape, sources)
    loops = bounds(pattern, shape, tiles)
    compiled = kernels(pattern, shape, lowered, tiles, loops, sources)
    return compiled if device is None else cache(compiled, device)


def compile_decode(pattern: ir.PatternIR, shape: Shape, *, sources: dict | None = None,
                   device: str | None = None) -> DecodeCompiled:
    """Run the decode passes for one sequence's shape: lower, decode, and with `device`
    the cache pass (`DECODE_PASSES`)."""
    compiled = decode(pattern, shape, lower(pattern, shape, sources), sources)
    return compiled if device is None else cache(compiled, device)


def compile_pattern(pat, M: int | None, N: int | None = None, *, heads: int | None = None, grid=None,
                    config: KernelConfig | None = None, input_shapes: dict | None = None) -> Compiled:
    """Generate the Triton module of a `BoundPattern` at concrete sizes (1-D or, with
    `config.tile`, N-D tiles): `Shape.resolve`, then `compile_kernels`.

    >>> c = compile_pattern(attnc.loads("pattern p = sliding(64)").pattern(), 1000)
    >>> c.source.splitlines()[3]
    '# pattern: pattern p(w = 64) on seq = sliding(w)'
    """
    shape = Shape.resolve(pat, M, N, heads=heads, grid=grid, config=config, input_shapes=input_shapes)
    return compile_kernels(pat.ir, shape, sources=pat.program.sources)
