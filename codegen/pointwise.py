"""Pointwise lowering: a bound pattern as one integer/boolean expression of (q, k, h).

input:  a `PatternIR`, concrete sizes (M, N, H, grid) and the shapes of its
        run-time inputs.
output: a `Lowered` mask: a small expression IR over the query index `q`
        (0..M-1, as in the q tensor), the key index `k`, the query head `h` and
        the batch `b`, plus the host-side tables it reads (random bits, run-time
        inputs); printed as Triton source (triton_text.py) or evaluated by elementwise
        torch ops (lowered.py, torch_program.py).
does not: define the expression IR (expr.py); plan tiles (analysis.py) or generate
        kernels (kernels.py).

[Note: views, once more] The lowering walks the IR exactly like the reference
evaluator (attnc/reference.py) walks it, with the same views, except that a
view's query and key positions are *expressions* instead of tensors: `@ a`
substitutes grid coordinates, `blockwise(b, P)` substitutes `q // b`, and
`dilate(d, P)` becomes an OR over the d residue groups, each with its own
concrete group-local sizes. Every size stays a Python int, so the expression
folds to constants wherever the sizes decide a comparison (`k < N` at the top
level disappears, for instance).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from attnc import ir, ir_text, predicates, semantics
from attnc.errors import AttnError, error
from attnc.limits import require
from attnc.reference import Evaluator, axis_value, ravel_coords, unravel_flat, random_table

from . import sizes as size_tags
from .expr import Builder, Const, Expr, Lookup, Var, unravel
from .lowered import Lowered, Table, input_table_name, pack_bits


class LoweringError(AttnError):
    """The pattern (or a part of it) has no pointwise form, e.g. `topk`."""


# ----------------------------------------------------------------------------- lowering


@dataclass
class PView:
    """A reference `View` with expressions for positions (see [Note: views, once more]).

    `qpos` / `qcpos` are the concrete distinct query positions of the view
    (only `dilate` needs them: its group-local M counts the view's queries)."""

    q: Expr
    k: Expr
    env: dict
    qpos: torch.Tensor
    axes: tuple[str, ...] = ()
    qc: dict = field(default_factory=dict)
    kc: dict = field(default_factory=dict)
    qcpos: dict = field(default_factory=dict)
    qin: Expr | None = None
    kin: Expr | None = None
    top: bool = False

    @property
    def L(self) -> int:
        return self.env[ir.N]

    @property
    def heads(self) -> int:
        return self.env[ir.H]


class _Lower(Evaluator):
    """Mirrors reference.Evaluator node by node, producing expressions."""

    def __init__(self, pattern: ir.PatternIR, builder: Builder, input_shapes: dict):
        super().__init__(pattern)
        self.b = builder
        self.input_shapes = input_shapes
        self.tables: dict[str, Table] = {}
        self._random: dict[tuple, str] = {}
        self.env_top: dict = {}  # sizes and parameters of the whole problem (set by lower)

    def fail(self, node, message, hint=None):
        raise LoweringError(error(node.span, message, hint))

    def val(self, expr, env) -> int:
        """The reference's value, keeping the size expression of parameters declared
        from sizes (`w = N // 8`) so kernels compute them from their size arguments."""
        return size_tags.keep_expression(expr, env, super().val(expr, env))

    def eval(self, node: ir.Mask, view: PView) -> Expr:  # type: ignore[override]
        self.check(node, view)
        if isinstance(node, ir.AXISWISE) and view.axes:
            return self.per_axis(node, view)
        parts = self.keys(node, view)
        if parts is not None:
            pred = predicates.predicate(parts)
            return Const(False) if pred is None else self.pos(pred, view)[0]
        if semantics.is_combinator(node):
            return semantics.combine(node, lambda n: self.eval(n, view), self.algebra)
        return getattr(self, "lw_" + type(node).__name__.rstrip("_"))(node, view)

    @functools.cached_property
    def algebra(self) -> semantics.Algebra:
        """Kernel predicates as sets for the boolean combinators ([Note: combinators] in
        semantics.py): or / and / not of the printed expression."""
        b = self.b
        return semantics.Algebra(union=lambda xs: b.or_(*xs), intersect=lambda xs: b.and_(*xs), complement=b.not_)

    # -- views
    def axis_view(self, view: PView, axis: str) -> PView:  # type: ignore[override]
        size = view.env[ir.axis_size(axis)]
        env = {**view.env, ir.M: size, ir.N: size}
        return PView(q=view.qc[axis], k=view.kc[axis], env=env, qpos=torch.unique(view.qcpos[axis]))

    def in_grid(self, view: PView, r: Expr) -> Expr:  # type: ignore[override]
        if view.qin is None:
            return r
        return self.b.and_(r, view.qin, view.kin)

    def per_axis(self, node, view):
        from attnc.reference import axis_component
        parts = [self.eval(axis_component(node, i), self.axis_view(view, a)) for i, a in enumerate(view.axes)]
        return self.in_grid(view, self.b.and_(*parts))

    # -- primitives: their definitions (attnc/semantics.py) as `where` conditions
    def set_cond(self, s: ir.SetVal, x: Expr, env) -> Expr:
        if isinstance(s, ir.SetList):
            return self.b.in_items(x, [self.val(i, env) for i in s.items])
        a, stop, st = self.val(s.start, env), self.val(s.stop, env), self.val(s.step, env)
        if st < 1:
            raise AttnError(error(self.pattern.span, f"a range step must be >= 1, got {st}"))
        return self.b.in_range(x, a, stop, st)

    def lw_Random(self, node, view):
        # [Note: random rows] the generator is defined for every row the view's queries
        # have -- negative ones too (M > N: qa = q + N - M < 0; `row` enters as its low
        # 32 bits), exactly as pat.mask draws them -- so the table holds the rows
        # qpos.min() .. qpos.max() of this view, not 0 .. n - 1, and only k is bounded.
        b = self.b
        r, seed = self.val(node.r, view.env), self.val(node.seed, view.env)
        n = view.L
        lo, hi = int(view.qpos.min()), int(view.qpos.max())
        key = (n, r, seed, lo, hi)
        name = self._random.get(key)
        if name is None:
            name = f"random{len(self._random)}"  # internal: never `in_...` ([Note: table names] in lowered.py)
            self._random[key] = name
            rows = torch.arange(lo, hi + 1, dtype=torch.int64)
            table = random_table(rows, n, r, seed)
            bits = torch.zeros(len(rows), n + 1, dtype=torch.bool)
            bits.scatter_(1, table, True)
            packed = pack_bits(bits[:, :n])
            # the row stride (pack_bits: cdiv(n, 32) words per row) as an expression of n, so the
            # text does not depend on the length
            self.tables[name] = Table(name=name, shape=(packed.shape[0], -(-n // 32)), batched=False, data=packed,
                                      kind="random")
        row = b.clamp(b.sub(view.q, b.c(lo)), 0, hi - lo)
        col = b.clamp(view.k, 0, n - 1)
        hit = Lookup(name, (row, b.floordiv(col, b.c(32))), b.mod(col, b.c(32)))
        return b.and_(hit, b.ge(view.k, b.c(0)), b.lt(view.k, b.c(n)))

    def lw_Where(self, node, view):
        val, uses_grid = self.pos(node.pred, view)
        return self.in_grid(view, val) if uses_grid else val

    def lw_Same(self, node, view):
        b = self.b
        shape = self.input_shapes.get(node.input)
        n = self.env_top[ir.N]
        if shape and shape[-1] != n:
            n = shape[-1]
        name = input_table_name(node.input)
        self.tables.setdefault(name, Table(name=name, shape=(n,), batched=True, source=node.input, kind="segments"))
        dq = Lookup(name, (Var("b"), b.clamp(view.q, 0, n - 1)))
        dk = Lookup(name, (Var("b"), b.clamp(view.k, 0, n - 1)))
        return b.and_(b.eq(dq, dk), b.ge(view.q, b.c(0)), b.lt(view.q, b.c(n)))

    def lw_Routed(self, node, view):
        b = self.b
        if not view.top:
            self.fail(node, "routed(...) is only defined at the top level of a pattern (not inside @, blockwise or dilate)")
        blk = self.val(node.block, view.env)
        M, N = self.env_top[ir.M], self.env_top[ir.N]
        nqb, nkb = -(-M // blk), -(-N // blk)
        shape = self.input_shapes.get(node.input)
        hs = shape[-3] if shape else 1
        name = input_table_name(node.input)
        self.tables.setdefault(name, Table(name=name, shape=(hs, nqb, -(-nkb // 32)), batched=True, source=node.input,
                                           kind="blocks", block=blk))
        kb = b.floordiv(view.k, b.c(blk))
        hsel = Var("h") if hs > 1 else b.c(0)
        return Lookup(name, (Var("b"), hsel, b.floordiv(Var("q"), b.c(blk)), b.floordiv(kb, b.c(32))), b.mod(kb, b.c(32)))

    def lw_TopK(self, node, view):
        self.fail(node, "topk selects key blocks from the q and k tensors at run time: it has no pointwise form "
                        "(dynamic sparsity, issue 6)", "use the torch backend for patterns with topk")

    # -- structural combinators (the boolean ones: semantics.COMBINATORS, in eval)
    def lw_Along(self, node, view):
        return self.in_grid(view, self.eval(node.operand, self.axis_view(view, node.axis)))

    def lw_Heads(self, node, view):
        b = self.b
        arms = []
        for sel, arm in self.head_arms(node, view):
            heads = sel.nonzero().flatten().tolist()
            arms.append(b.and_(b.in_items(Var("h"), heads), self.eval(arm.body, view)))
        return b.or_(*arms)

    def lw_Blockwise(self, node, view):
        b = self.b
        if view.qin is not None:
            self.fail(node, "blockwise is not defined on a mixed seq + grid layout")
        if not view.axes:
            bs = self.val(node.b, view.env)
            env = {**view.env, ir.M: -(-view.env[ir.M] // bs), ir.N: -(-view.env[ir.N] // bs)}
            sub = PView(q=b.floordiv(view.q, b.c(bs)), k=b.floordiv(view.k, b.c(bs)), env=env,
                        qpos=torch.unique(torch.div(view.qpos, bs, rounding_mode="floor")))
            return self.eval(node.operand, sub)
        bs = [self.val(axis_value(node.b, i), view.env) for i in range(len(view.axes))]
        sizes = [-(-view.env[ir.axis_size(a)] // x) for a, x in zip(view.axes, bs)]
        env = {**view.env, **{ir.axis_size(a): s for a, s in zip(view.axes, sizes)}}
        env[ir.N] = env[ir.M] = math.prod(sizes)
        qc = {a: b.floordiv(view.qc[a], b.c(x)) for a, x in zip(view.axes, bs)}
        kc = {a: b.floordiv(view.kc[a], b.c(x)) for a, x in zip(view.axes, bs)}
        qpos = torch.unique(ravel_coords([view.qcpos[a] // x for a, x in zip(view.axes, bs)], sizes))
        sub = PView(q=self.ravel([qc[a] for a in view.axes], sizes), k=self.ravel([kc[a] for a in view.axes], sizes),
                    env=env, qpos=qpos, axes=view.axes, qc=qc, kc=kc,
                    qcpos=dict(zip(view.axes, unravel_flat(qpos, sizes))))
        return self.eval(node.operand, sub)

    def ravel(self, coords: list[Expr], sizes: list[int]) -> Expr:
        flat = self.b.c(0)
        for c, s in zip(coords, sizes):
            flat = self.b.add(self.b.mul(flat, self.b.c(s)), c)
        return flat

    def lw_Dilate(self, node, view):
        b = self.b
        if view.qin is not None:
            self.fail(node, "dilate is not defined on a mixed seq + grid layout")
        arms = []
        if not view.axes:
            d = self.val(node.d, view.env)
            for g in torch.unique(view.qpos % d).tolist():  # only groups some query is in
                qsel = view.qpos[view.qpos % d == g]
                n_local = -(-(view.L - g) // d)
                if len(qsel) == 0 or n_local <= 0:
                    continue
                env = {**view.env, ir.N: n_local, ir.M: len(qsel)}
                sub = PView(q=b.floordiv(view.q, b.c(d)), k=b.floordiv(view.k, b.c(d)), env=env, qpos=qsel // d)
                cond = b.and_(b.eq(b.mod(view.q, b.c(d)), b.c(g)), b.eq(b.mod(view.k, b.c(d)), b.c(g)))
                arms.append(b.and_(cond, self.eval(node.operand, sub)))
            return b.or_(*arms)
        ds = [self.val(axis_value(node.d, i), view.env) for i in range(len(view.axes))]
        present = torch.unique(torch.stack([view.qcpos[a] % d for a, d in zip(view.axes, ds)], dim=1), dim=0)
        for groups in present.tolist():  # only group combinations some query is in (d may be huge)
            qmask = torch.ones(len(view.qpos), dtype=torch.bool)
            for a, d, g in zip(view.axes, ds, groups):
                qmask &= view.qcpos[a] % d == g
            sizes = [-(-(view.env[ir.axis_size(a)] - g) // d) for a, d, g in zip(view.axes, ds, groups)]
            if int(qmask.sum()) == 0 or min(sizes) <= 0:
                continue
            env = {**view.env, **{ir.axis_size(a): s for a, s in zip(view.axes, sizes)}}
            env[ir.N] = math.prod(sizes)
            env[ir.M] = int(qmask.sum())
            qc = {a: b.floordiv(view.qc[a], b.c(d)) for a, d in zip(view.axes, ds)}
            kc = {a: b.floordiv(view.kc[a], b.c(d)) for a, d in zip(view.axes, ds)}
            qcpos = {a: view.qcpos[a][qmask] // d for a, d in zip(view.axes, ds)}
            sub = PView(q=self.ravel([qc[a] for a in view.axes], sizes), k=self.ravel([kc[a] for a in view.axes], sizes),
                        env=env, qpos=ravel_coords([qcpos[a] for a in view.axes], sizes), axes=view.axes, qc=qc, kc=kc,
                        qcpos=qcpos)
            cond = b.and_(*[b.and_(b.eq(b.mod(view.qc[a], b.c(d)), b.c(g)), b.eq(b.mod(view.kc[a], b.c(d)), b.c(g)))
                            for a, d, g in zip(view.axes, ds, groups)])
            arms.append(b.and_(cond, self.eval(node.operand, sub)))
        return b.or_(*arms)

    # -- where predicates: (expression, whether grid coordinates were used)
    def pos(self, node: ir.PExpr, view: PView) -> tuple[Expr, bool]:  # type: ignore[override]
        b = self.b
        match node:
            case ir.PVar(name="q", axis=None):
                return view.q, False
            case ir.PVar(name="k", axis=None):
                return view.k, False
            case ir.PVar(name="h", axis=None):
                return Var("h"), False
            case ir.PVar(name=base, axis=ax):
                if ax not in view.qc:
                    raise AttnError(error(node.span, f"grid coordinate {base}.{ax} is not defined here"))
                return (view.qc[ax] if base == "q" else view.kc[ax]), True
            case ir.PConst(value=v):
                return b.c(self.val(v, view.env)), False
            case ir.PNeg(operand=a):
                x, g = self.pos(a, view)
                return b.neg(x), g
            case ir.PBin(op=op, left=lhs, right=rhs):
                (x, g1), (y, g2) = self.pos(lhs, view), self.pos(rhs, view)
                return self.arith(op, x, y, node), g1 or g2
            case ir.PCall(func=f, args=args):
                vals = [self.pos(a, view) for a in args]
                g = any(u for _, u in vals)
                xs = [x for x, _ in vals]
                if f == "abs":
                    return b.abs(xs[0]), g
                acc = xs[0]
                for x in xs[1:]:
                    acc = b.minimum(acc, x) if f == "min" else b.maximum(acc, x)
                return acc, g
            case ir.PCmp(ops=ops, operands=xs):
                vals = [self.pos(x, view) for x in xs]
                names = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
                parts = [b.cmp(names[op], x, y) for op, (x, _), (y, _) in zip(ops, vals, vals[1:])]
                return b.and_(*parts), any(g for _, g in vals)
            case ir.PBool(op=op, parts=ps):
                vals = [self.pos(p, view) for p in ps]
                xs = [x for x, _ in vals]
                return (b.and_(*xs) if op == "and" else b.or_(*xs)), any(g for _, g in vals)
            case ir.PNot(operand=a):
                x, g = self.pos(a, view)
                return b.not_(x), g
            case ir.PIn(item=i, collection=c):
                x, g = self.pos(i, view)
                return self.set_cond(c, x, view.env), g
        raise TypeError(node)

    def arith(self, op, x, y, node):
        b = self.b
        try:
            match op:
                case "+":
                    return b.add(x, y)
                case "-":
                    return b.sub(x, y)
                case "*":
                    return b.mul(x, y)
                case "//":
                    return b.floordiv(x, y)
                case "%":
                    return b.mod(x, y)
                case "**":
                    if not isinstance(y, Const) or y.value < 0:
                        raise LoweringError(error(node.span, "codegen needs `**` with a constant, non-negative exponent",
                                                  "write the product out, e.g. x * x"))
                    out = b.c(1)
                    for _ in range(int(y.value)):
                        out = b.mul(out, x)
                    return out
        except ZeroDivisionError:
            raise AttnError(error(node.span, f"division by zero in `where` ('{op}' by an expression that is 0 here)")) from None
        raise ValueError(op)


def top_view(pattern: ir.PatternIR, M: int, N: int, H: int, grid, input_shapes: dict | None = None):
    """(the lowering, the top-level view of query row q / key k, and the tagged M, N, grid):
    what `lower` evaluates the mask in, and codegen/score.py the score term."""
    grid = tuple(grid) if grid is not None else None
    M, N, grid = size_tags.tag(M, N, grid)  # [Note: one text, many sizes] in sizes.py
    var_bounds = {"q": (0, M - 1), "k": (0, N - 1), "h": (0, H - 1), "b": (0, None)}
    builder = Builder(var_bounds)
    low = _Lower(pattern, builder, dict(input_shapes or {}))
    env = {ir.M: M, ir.N: N, ir.H: H}
    layout = pattern.layout
    if layout.axes:
        for a, s in zip(layout.axes, grid):
            env[ir.axis_size(a)] = s
    for sym, value in pattern.bindings:
        env[sym] = low.val(value, env)
    low.env_top = env
    b = builder
    q = b.add(Var("q"), b.c(N - M))
    k = Var("k")
    require(8 * M * (2 + 2 * len(layout.axes)), f"lowering '{pattern.name}' at M = {M}, N = {N} (per-query positions)",
            "smaller sizes: the kernels are generated for concrete sizes")
    qpos = torch.arange(N - M, N, dtype=torch.int64)
    view = PView(q=q, k=k, env=env, qpos=qpos, top=True)
    if layout.axes:
        T = low.val(layout.text, env) if layout.text is not None else 0
        sizes = list(grid)
        qg = b.maximum(b.sub(q, b.c(T)), b.c(0))
        kg = b.maximum(b.sub(k, b.c(T)), b.c(0))
        view.axes = layout.axes
        view.qc = dict(zip(layout.axes, unravel(b, qg, sizes)))
        view.kc = dict(zip(layout.axes, unravel(b, kg, sizes)))
        view.qcpos = dict(zip(layout.axes, unravel_flat((qpos - T).clamp(min=0), sizes)))
        if layout.text is not None:
            view.qin = b.ge(q, b.c(T))
            view.kin = b.ge(k, b.c(T))
    return low, view, M, N, grid


def lower(pattern: ir.PatternIR, M: int, N: int | None = None, H: int = 1, grid=None,
          input_shapes: dict[str, tuple[int, ...]] | None = None, sources: dict[str, str] | None = None) -> Lowered:
    """Lower a bound pattern at concrete sizes to one pointwise expression.

    `pattern` is `BoundPattern.ir`; sizes as for `BoundPattern.mask` (already
    validated: use `BoundPattern.resolve_sizes`). `input_shapes` gives the shapes
    of run-time inputs (only the head count of a block table changes the code);
    `sources` (`BoundPattern.program.sources`) lets diagnostics quote the source line.
    Raises `LoweringError` (an `AttnError`) for parts without a pointwise form
    (`topk`), and the reference's own diagnostics for invalid arguments.

    >>> pat = attnc.loads("pattern p = sliding(3) | sink(1)").pattern()
    >>> print(to_text(lower(pat.ir, 8, 8).expr))
    (k > q - 3 and k <= q) or k < 1
    """
    N = M if N is None else N
    low, view, M, N, grid = top_view(pattern, M, N, H, grid, input_shapes)
    var_bounds = low.b.var_bounds
    try:
        expr = low.eval(pattern.body, view)
    except AttnError as err:
        raise err.with_sources(sources or {}) from None
    tables = tuple(low.tables[n] for n in sorted(low.tables))
    return Lowered(name=pattern.name, text=ir_text.pattern_text(pattern), M=int(M), N=int(N), H=H,
                   grid=None if grid is None else tuple(int(g) for g in grid), expr=expr,
                   tables=tables, var_bounds=tuple(sorted(var_bounds.items())))
