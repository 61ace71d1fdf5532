"""The reference semantics: dense boolean masks from the IR.

input:  a `PatternIR`, sizes (M, N, H, grid) and run-time inputs.
output: a bool tensor [H, M, N] (row slices of it for large sizes); this is
        the oracle every backend is tested against.
does not: plan tiles or compute attention (runtime/dense.py does that); evaluate
        `where` position expressions itself (reference_where.py, a mixin of Evaluator).

[Note: views] Every node is evaluated in a *view*: the absolute positions of
the queries and keys it sees (1-D, flattened), the sizes bound to M, N and
size(a), and for grids the per-axis coordinates. Transformations (`@ a`,
`blockwise`, `dilate`, per-axis primitives) build a smaller view, evaluate the
operand there on the distinct positions only, and gather the answer back.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import sympy
import torch

from . import ir, predicates, semantics
from .constraints import violations
from .errors import AttnError, SizeError, error
from .limits import require
from .reference_where import WherePredicates
from .syntax import MAX_INT

MASK32 = 0xFFFFFFFF

#: dense masks as sets for the boolean combinators ([Note: combinators] in semantics.py)
MASKS = semantics.Algebra(union=semantics.folding(operator.or_), intersect=semantics.folding(operator.and_),
                          complement=operator.invert)


# ----------------------------------------------------------------------------- the documented random generator


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow."""
    lo = (x * (c & 0xFFFF)) & MASK32
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' `lowbias32` integer hash on int64 tensors holding u32."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_table(rows: torch.Tensor, n: int, r: int, seed: int) -> torch.Tensor:
    """The `r` distinct keys of `range(n)` that `random(r, seed)` gives each row.

    Floyd's sampling driven by `rand_u32(seed, row, j) =
    mix32(mix32(mix32(seed) + row) + j)`: for j in n - r .. n - 1, draw
    t = rand_u32 % (j + 1) and take t, or j if t was already taken. The same
    table on every backend and device, and no dependence on torch's RNG.
    Returns int64 [len(rows), min(r, n)].
    """
    rows = rows.to(torch.int64)
    if r >= n:
        return torch.arange(n, dtype=torch.int64).expand(rows.numel(), n).clone()
    base = mix32(mix32(torch.tensor(seed, dtype=torch.int64)) + (rows & MASK32))
    chosen = torch.full((rows.numel(), r), -1, dtype=torch.int64)
    for idx, j in enumerate(range(n - r, n)):
        t = mix32(base + j) % (j + 1)
        taken = (chosen[:, :idx] == t[:, None]).any(dim=1) if idx else torch.zeros_like(t, dtype=torch.bool)
        chosen[:, idx] = torch.where(taken, torch.full_like(t, j), t)
    return chosen


# ----------------------------------------------------------------------------- views


@dataclass
class View:
    q: torch.Tensor  # [Mq] absolute query positions in this view
    k: torch.Tensor  # [Nk] key positions
    env: dict  # sympy symbol -> int: M, N, H, size(a), parameters
    axes: tuple[str, ...] = ()
    qc: dict = field(default_factory=dict)  # axis -> [Mq] coordinates
    kc: dict = field(default_factory=dict)  # axis -> [Nk]
    qin: torch.Tensor | None = None  # [Mq] query in the grid part (mixed layouts)
    kin: torch.Tensor | None = None
    qrel: torch.Tensor | None = None  # [Mq] query index in the q tensor (top level only)
    inputs: dict = field(default_factory=dict)

    @property
    def L(self) -> int:
        return self.env[ir.N]

    @property
    def heads(self) -> int:
        return self.env[ir.H]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unravel_flat(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out = []
    rem = flat
    for s in reversed(sizes):
        out.append(rem % s)
        rem = rem // s
    return list(reversed(out))


def ravel_coords(coords: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    flat = torch.zeros_like(coords[0])
    for c, s in zip(coords, sizes):
        flat = flat * s + c
    return flat


class Evaluator(WherePredicates):
    """Evaluates mask nodes over views; one instance per mask() call (`where` predicates:
    reference_where.py)."""

    def __init__(self, pattern: ir.PatternIR):
        self.pattern = pattern

    # -- integer values
    def val(self, expr, env) -> int:
        if isinstance(expr, bool):
            return expr
        if isinstance(expr, int):
            return expr
        try:
            v = expr.xreplace(env)
            if not isinstance(v, int) and not v.is_Integer and not v.has(sympy.zoo, sympy.nan):
                v = sympy.simplify(v)
        except ZeroDivisionError:  # sympy.Mod(x, 0)
            v = sympy.zoo
        if isinstance(v, int):
            return v
        if v.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
            sizes = ", ".join(f"{s} = {env[s]}" for s in sorted(expr.free_symbols, key=str) if s in env)
            raise SizeError(error(self.pattern.span, f"{expr} divides by zero at these sizes ({sizes})",
                                  "guard the divisor, e.g. max(1, N - 16), or call with other sizes"))
        if not v.is_Integer:
            missing = ", ".join(sorted(str(s) for s in v.free_symbols))
            raise AttnError(error(self.pattern.span, f"cannot evaluate {expr}: {missing} unknown"))
        v = int(v)
        if abs(v) > MAX_INT:
            raise SizeError(error(self.pattern.span, f"{expr} evaluates to {v if abs(v) < 10**30 else 'a number'} "
                                  f"beyond the integer limit 2**60 = {MAX_INT}"))
        return v

    def set_contains(self, s: ir.SetVal, x: torch.Tensor, env) -> torch.Tensor:
        if isinstance(s, ir.SetList):
            items = torch.tensor([self.val(i, env) for i in s.items], dtype=torch.int64)
            return torch.isin(x, items)
        a, b, st = self.val(s.start, env), self.val(s.stop, env), self.val(s.step, env)
        if st < 1:
            raise SizeError(error(self.pattern.span, f"a range step must be >= 1, got {st}"))
        return (x >= a) & (x < b) & ((x - a) % st == 0)

    # -- dispatch
    def check(self, node: ir.Mask, view: View) -> None:
        """Argument constraints, now that the view's sizes make every value known."""
        problems = violations(node, lambda v: self.val(v, view.env))
        if problems:
            raise SizeError(error(node.span, problems[0]))

    def eval(self, node: ir.Mask, view: View) -> torch.Tensor:
        """bool [1 or H, Mq, Nk]."""
        self.check(node, view)
        if isinstance(node, ir.AXISWISE) and view.axes:
            return self.per_axis(node, view)
        parts = self.keys(node, view)
        if parts is not None:
            out = self.eval_keys(parts, view)
        elif semantics.is_combinator(node):
            out = semantics.combine(node, lambda n: self.eval(n, view), MASKS)
        else:
            out = getattr(self, "eval_" + type(node).__name__.rstrip("_"))(node, view)
        if out.dim() == 2:
            out = out.unsqueeze(0)
        return out

    # -- views
    def axis_view(self, view: View, axis: str) -> tuple[View, torch.Tensor, torch.Tensor]:
        """A 1-D view along `axis` over the distinct coordinates, and the gather indices."""
        uq, inv_q = torch.unique(view.qc[axis], return_inverse=True)
        uk, inv_k = torch.unique(view.kc[axis], return_inverse=True)
        size = view.env[ir.axis_size(axis)]
        env = {**view.env, ir.M: size, ir.N: size}
        return View(q=uq, k=uk, env=env), inv_q, inv_k

    def gather(self, r: torch.Tensor, inv_q, inv_k) -> torch.Tensor:
        return r[:, inv_q][:, :, inv_k]

    def in_grid(self, view: View, r: torch.Tensor) -> torch.Tensor:
        if view.qin is None:
            return r
        return r & view.qin[None, :, None] & view.kin[None, None, :]

    def per_axis(self, node: ir.Mask, view: View) -> torch.Tensor:
        out = None
        for i, axis in enumerate(view.axes):
            comp = axis_component(node, i)
            sub, iq, ik = self.axis_view(view, axis)
            r = self.gather(self.eval(comp, sub), iq, ik)
            out = r if out is None else out & r
        return self.in_grid(view, out)

    # -- primitives: their definitions in semantics.py ([Note: one definition]) as `where` conditions
    def keys(self, node: ir.Mask, view: View) -> tuple[semantics.Keys, ...] | None:
        """The positional primitive's keys per query (None for other nodes), once the
        view's length is checked against what the primitive needs."""
        parts = semantics.keys_of(node)
        if parts is not None:
            problem = semantics.length_problem(node, view.L, lambda v: self.val(v, view.env))
            if problem:
                raise SizeError(error(node.span, problem))
        return parts

    def eval_keys(self, parts: tuple[semantics.Keys, ...], view: View) -> torch.Tensor:
        pred = predicates.predicate(parts)
        if pred is None:
            return torch.zeros(len(view.q), len(view.k), dtype=torch.bool)
        val, _ = self.pos(pred, view)
        return val.expand(len(view.q), len(view.k))

    def eval_Random(self, node, view):
        r, seed = self.val(node.r, view.env), self.val(node.seed, view.env)
        n = view.L
        table = random_table(view.q, n, r, seed)
        rows = torch.zeros(len(view.q), n + 1, dtype=torch.bool)
        rows.scatter_(1, table, True)
        k = view.k.clamp(0, n)
        return rows[:, k] & (view.k < n)[None, :]

    def eval_Where(self, node, view):
        val, uses_grid = self.pos(node.pred, view)
        out = val if val.dim() == 3 else val.unsqueeze(0)
        out = out.expand(out.shape[0], len(view.q), len(view.k))
        return self.in_grid(view, out) if uses_grid else out

    def run_time_input(self, node, view) -> torch.Tensor:
        if node.input not in view.inputs:
            raise AttnError(error(node.span, f"this mask depends on the run-time input '{node.input}', which was not given here "
                                  "(plans and pictures of such patterns need the tensor)",
                                  f"pat.mask(M, N, {node.input}=tensor) or pat(q, k, v, {node.input}=tensor)"))
        return view.inputs[node.input]

    def eval_Same(self, node, view):
        doc = self.run_time_input(node, view)
        n = doc.shape[-1]
        ok = (view.q >= 0) & (view.q < n)
        dq = doc[view.q.clamp(0, n - 1)]
        return (dq[:, None] == doc[view.k][None, :]) & ok[:, None]

    def eval_Routed(self, node, view):
        sel = self.run_time_input(node, view)  # [H or 1, nqb, kmax]
        b = self.val(node.block, view.env)
        nkb = _cdiv(view.L, b)
        hs, nqb, _ = sel.shape
        blocks = torch.zeros(hs, nqb, nkb + 1, dtype=torch.bool)
        idx = torch.where(sel < 0, torch.full_like(sel, nkb), sel)
        blocks.scatter_(2, idx, True)
        blocks = blocks[:, :, :nkb]
        return blocks[:, view.qrel // b][:, :, view.k // b]

    def eval_TopK(self, node, view):
        raise AttnError(error(node.span, "topk's mask depends on the query and key tensors: it is only defined inside the op "
                              "(pat(q, k, v)); mask() cannot evaluate it"))

    # -- structural combinators (the boolean ones: semantics.COMBINATORS over `MASKS`)
    def eval_Along(self, node, view):
        sub, iq, ik = self.axis_view(view, node.axis)
        return self.in_grid(view, self.gather(self.eval(node.operand, sub), iq, ik))

    def head_arms(self, node: ir.Heads, view: View) -> list[tuple[torch.Tensor, ir.HeadArm]]:
        """The arms that win some head (first match), each with its bool [H] head selection."""
        H = view.heads
        heads = torch.arange(H, dtype=torch.int64)
        done = torch.zeros(H, dtype=torch.bool)
        chosen = []
        for arm in node.arms:
            sel = torch.ones(H, dtype=torch.bool) if arm.selector is None else self.set_contains(arm.selector, heads, view.env)
            sel = sel & ~done
            if sel.any():
                chosen.append((sel, arm))
            done |= sel
        if not bool(done.all()):
            missing = int((~done).nonzero()[0, 0])
            raise SizeError(error(node.span, f"head {missing} of {H} is not covered by any arm of heads {{ ... }}",
                                  "add a catch-all arm `_ => P`"))
        return chosen

    def eval_Heads(self, node, view):
        H = view.heads
        out = torch.zeros(H, len(view.q), len(view.k), dtype=torch.bool)
        for sel, arm in self.head_arms(node, view):
            out[sel] = self.eval(arm.body, view).expand(H, -1, -1)[sel]
        return out

    def eval_Blockwise(self, node, view):
        if view.qin is not None:
            raise AttnError(error(node.span, "blockwise is not defined on a mixed seq + grid layout"))
        if not view.axes:
            b = self.val(node.b, view.env)
            uq, iq = torch.unique(torch.div(view.q, b, rounding_mode="floor"), return_inverse=True)
            uk, ik = torch.unique(view.k // b, return_inverse=True)
            env = {**view.env, ir.M: _cdiv(view.env[ir.M], b), ir.N: _cdiv(view.env[ir.N], b)}
            return self.gather(self.eval(node.operand, View(q=uq, k=uk, env=env)), iq, ik)
        bs = [self.val(axis_value(node.b, i), view.env) for i in range(len(view.axes))]
        sizes = [_cdiv(view.env[ir.axis_size(a)], b) for a, b in zip(view.axes, bs)]
        qcs = [view.qc[a] // b for a, b in zip(view.axes, bs)]
        kcs = [view.kc[a] // b for a, b in zip(view.axes, bs)]
        env = {**view.env, **{ir.axis_size(a): s for a, s in zip(view.axes, sizes)}}
        env[ir.N] = env[ir.M] = math.prod(sizes)
        sub, iq, ik = self.grid_subview(view.axes, qcs, kcs, sizes, env)
        return self.gather(self.eval(node.operand, sub), iq, ik)

    def grid_subview(self, axes, qcs, kcs, sizes, env):
        uq, iq = torch.unique(ravel_coords(qcs, sizes), return_inverse=True)
        uk, ik = torch.unique(ravel_coords(kcs, sizes), return_inverse=True)
        sub = View(q=uq, k=uk, env=env, axes=axes,
                   qc=dict(zip(axes, unravel_flat(uq, sizes))), kc=dict(zip(axes, unravel_flat(uk, sizes))))
        return sub, iq, ik

    def eval_Dilate(self, node, view):
        if view.qin is not None:
            raise AttnError(error(node.span, "dilate is not defined on a mixed seq + grid layout"))
        out = torch.zeros(1, len(view.q), len(view.k), dtype=torch.bool)
        if not view.axes:
            d = self.val(node.d, view.env)
            for g in torch.unique(view.q % d).tolist():  # only groups that occur: d may be huge
                qi = (view.q % d == g).nonzero().flatten()
                ki = (view.k % d == g).nonzero().flatten()
                n_local = _cdiv(view.L - g, d)
                if len(qi) == 0 or len(ki) == 0 or n_local <= 0:
                    continue
                env = {**view.env, ir.N: n_local, ir.M: len(qi)}
                r = self.eval(node.operand, View(q=view.q[qi] // d, k=view.k[ki] // d, env=env))
                out = self._scatter(out, r, qi, ki)
            return out
        ds = [self.val(axis_value(node.d, i), view.env) for i in range(len(view.axes))]
        present = torch.unique(torch.stack([view.qc[a] % d for a, d in zip(view.axes, ds)], dim=1), dim=0)
        for groups in present.tolist():  # only group combinations some query is in
            qsel = torch.ones(len(view.q), dtype=torch.bool)
            ksel = torch.ones(len(view.k), dtype=torch.bool)
            for a, d, g in zip(view.axes, ds, groups):
                qsel &= view.qc[a] % d == g
                ksel &= view.kc[a] % d == g
            qi, ki = qsel.nonzero().flatten(), ksel.nonzero().flatten()
            sizes = [_cdiv(view.env[ir.axis_size(a)] - g, d) for a, d, g in zip(view.axes, ds, groups)]
            if len(qi) == 0 or len(ki) == 0 or min(sizes) <= 0:
                continue
            env = {**view.env, **{ir.axis_size(a): s for a, s in zip(view.axes, sizes)}}
            env[ir.N] = math.prod(sizes)
            env[ir.M] = len(qi)
            qcs = [view.qc[a][qi] // d for a, d in zip(view.axes, ds)]
            kcs = [view.kc[a][ki] // d for a, d in zip(view.axes, ds)]
            sub = View(q=ravel_coords(qcs, sizes), k=ravel_coords(kcs, sizes), env=env, axes=view.axes,
                       qc=dict(zip(view.axes, qcs)), kc=dict(zip(view.axes, kcs)))
            out = self._scatter(out, self.eval(node.operand, sub), qi, ki)
        return out

    @staticmethod
    def _scatter(out, r, qi, ki):
        if r.shape[0] != out.shape[0]:
            out = out.expand(r.shape[0], -1, -1).clone()
        out[:, qi[:, None], ki[None, :]] = r.expand(out.shape[0], -1, -1)
        return out


def axis_value(v, i):
    return v[i] if isinstance(v, tuple) else v


def axis_component(node: ir.Mask, i: int) -> ir.Mask:
    """The 1-D primitive for grid axis i (per-axis tuples picked apart)."""
    changes = {f.name: getattr(node, f.name)[i] for f in dataclasses.fields(node)
               if f.name != "span" and isinstance(getattr(node, f.name), tuple)}
    return dataclasses.replace(node, **changes) if changes else node


# ----------------------------------------------------------------------------- top-level views


def top_view(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, inputs: dict,
             rows: tuple[int, int] | None = None, keys: torch.Tensor | None = None,
             queries: torch.Tensor | None = None) -> View:
    """The view of the whole problem (or of query rows `rows` / query indices
    `queries`, and the key positions `keys`)."""
    env = {ir.M: M, ir.N: N, ir.H: heads}
    layout = pattern.layout
    if layout.axes:
        for a, s in zip(layout.axes, grid):
            env[ir.axis_size(a)] = int(s)
    ev = Evaluator(pattern)
    for sym, value in pattern.bindings:
        env[sym] = ev.val(value, env)
    lo, hi = rows if rows is not None else (0, M)
    qrel = torch.arange(lo, hi, dtype=torch.int64) if queries is None else queries.to(torch.int64)
    q = qrel + (N - M)
    k = torch.arange(N, dtype=torch.int64) if keys is None else keys.to(torch.int64)
    view = View(q=q, k=k, env=env, qrel=qrel, inputs=inputs)
    if layout.axes:
        T = ev.val(layout.text, env) if layout.text is not None else 0
        sizes = [int(s) for s in grid]
        view.axes = layout.axes
        qg = (q - T).clamp(min=0)
        kg = (k - T).clamp(min=0)
        view.qc = dict(zip(layout.axes, unravel_flat(qg, sizes)))
        view.kc = dict(zip(layout.axes, unravel_flat(kg, sizes)))
        if layout.text is not None:
            view.qin = q >= T
            view.kin = k >= T
    return view


#: bytes of working memory per evaluated (query, key) pair besides the result: a few int64
#: temporaries of `where` arithmetic and bool partial results alive at once
WORK_BYTES_PER_PAIR = 24


def mask_bytes(M: int, N: int, heads: int, naxes: int = 0) -> int:
    """About the peak bytes of evaluating an [H, M, N] block of the mask (see [Note: memory limit]
    in attnc/limits.py): the bool result, the working temporaries, the positions and coordinates."""
    return heads * M * N + WORK_BYTES_PER_PAIR * M * N + 8 * (M + N) * (3 + 2 * naxes)


def evaluate(pattern: ir.PatternIR, M: int, N: int, heads: int, grid, inputs: dict,
             rows: tuple[int, int] | None = None, keys: torch.Tensor | None = None,
             queries: torch.Tensor | None = None) -> torch.Tensor:
    """bool [H, rows, N] (heads broadcast out); [H, len(queries), len(keys)] for subsets.
    Raises `limits.MemoryLimitError` (a ValueError) before allocating when the block
    would need more memory than the limit."""
    nq = len(queries) if queries is not None else (rows[1] - rows[0] if rows is not None else M)
    nk = len(keys) if keys is not None else N
    require(mask_bytes(nq, nk, heads, len(pattern.layout.axes)), f"evaluating {heads} x {nq} x {nk} mask entries of '{pattern.name}'",
            "smaller sizes, or a tile plan (pat.plan, attnc simulate) instead of a dense mask")
    view = top_view(pattern, M, N, heads, grid, inputs, rows, keys, queries)
    out = Evaluator(pattern).eval(pattern.body, view)
    return out.expand(heads, -1, -1)
