"""Interval sets: every query's allowed keys as a short union of key intervals, in closed form.

input:  a bound pattern (PatternIR) and a reference `View` (the queries to answer for,
        sizes, run-time inputs).
output: an `ISet` per node (`IntervalAnalysis.eval`): int64 lo / hi tensors [Hx, queries, R]
        (their algebra: interval_sets.py), or with `periodic=True` a periodic.PSet.
does not: classify tiles (interval_tiles.py) or build plans (analysis.py); decide patterns
        that are not short interval unions per query (it raises `NotIntervals`, and the
        tile boxes take over: tileboxes.py).

[Note: interval sets] The analysis computes, for every query,
its allowed keys as a short union of disjoint half-open intervals: a tensor
pair lo/hi of shape [Hx, M, R] (Hx is 1 when all heads agree, R intervals per
query; an empty slot is (N, N)). Primitives have closed forms (causal is
[0, qa + 1), band is [qa - l, qa + r + 1), a neighborhood is NATTEN's window,
...), and the combinators are set algebra on intervals (merge, pairwise
intersection, gaps). From intervals, 1-D tiles are classified exactly by
per-tile reductions over the queries' touched / covered key-tile ranges, without
a dense tile map ([Note: sparse tiles] in interval_tiles.py): a key tile is *full*
for a query tile when every query covers it, *empty* when none touches it. Cost
O(H * M * R + non-empty tiles), no N^2 or nq * nk term.
On grids, per-axis primitives are products of per-axis sets ([Note: products]);
with more intervals than the closed form keeps, 1-D tiles of a product are
still counted exactly, from row segments ([Note: product counts] in products.py).
"""

from __future__ import annotations

import torch

from . import interval_sets, ir, semantics
from .interval_sets import (INTERVAL_SETS, ISet, NotIntervals, TooManyIntervals, broadcast, fold,
                            max_intervals, merge)
from .limits import require
from .reference import Evaluator, View, axis_component, random_table


# ----------------------------------------------------------------------------- closed forms per primitive


def routed_rows(sel: torch.Tensor, blocks: torch.Tensor, b: int, L: int) -> ISet:
    """The merged key intervals of the block table's rows `blocks` ([Hs, len(blocks), kmax]
    of int64 key-block ids, -1 unused): one row per query block, blocks of b keys."""
    rows = sel[:, blocks]
    return merge(ISet.make(torch.where(rows >= 0, rows * b, L), torch.where(rows >= 0, (rows + 1) * b, L), L))


class IntervalAnalysis(Evaluator):
    """The per-query interval sets of a 1-D pattern (raises NotIntervals). With `periodic`,
    stepped progressions with many keys per query, grid columns and `where` conditions on
    `k % m` or `q.a == k.a` become periodic slots ([Note: periodic sets] in periodic.py)
    instead of one interval per key; the sets are then ISets or periodic.PSets."""

    def __init__(self, pattern, periodic: bool = False):
        super().__init__(pattern)
        self.periodic = periodic

    @property
    def algebra(self) -> semantics.Algebra:
        """The sets the boolean combinators combine: interval sets, or with `periodic`
        interval sets with periodic slots (periodic.PERIODIC_SETS)."""
        if self.periodic:
            from .periodic import PERIODIC_SETS
            return PERIODIC_SETS
        return INTERVAL_SETS

    def eval(self, node: ir.Mask, view: View) -> ISet:  # type: ignore[override]
        if isinstance(node, ir.AXISWISE) and view.axes:
            self.check(node, view)
            return self.grid_product(view, {a: self.axis_set(axis_component(node, i), view, a) for i, a in enumerate(view.axes)})
        self.check(node, view)
        parts = self.keys(node, view)
        if parts is not None:
            return self.key_intervals(parts, view)
        if semantics.is_combinator(node):
            per_axis = self.per_axis_inter(node, view) if isinstance(node, ir.Inter) else None
            return per_axis if per_axis is not None else semantics.combine(node, lambda n: self.eval(n, view), self.algebra)
        method = getattr(self, "iv_" + type(node).__name__.rstrip("_"), None)
        if method is None:
            raise NotIntervals(type(node).__name__)
        return method(node, view)

    # -- grids: products of per-axis interval sets
    def coord_set(self, node: ir.Mask, view: View, axis: str) -> ISet:
        """The 1-D interval set of `node` along `axis`, one row per coordinate 0 .. size(axis) - 1."""
        L = view.env[ir.axis_size(axis)]
        require(128 * L, f"the allowed keys of every coordinate of axis {axis} (size {L})",
                "smaller grid sizes")
        coords = torch.arange(L, dtype=torch.int64)
        return merge(self.eval(node, View(q=coords, k=coords, env={**view.env, ir.M: L, ir.N: L})))

    def axis_set(self, node: ir.Mask, view: View, axis: str) -> ISet:
        """The 1-D interval set of `node` along `axis`, one row per query of `view`."""
        # a 1-D set depends only on the coordinate and the axis length: evaluate
        # every coordinate once (no unique() over the flat queries) and gather
        s = self.coord_set(node, view, axis)
        if not isinstance(s, ISet):
            from .periodic import take
            return take(s, view.qc[axis])
        return ISet(s.lo[:, view.qc[axis]], s.hi[:, view.qc[axis]], s.n, s.merged)

    def grid_product(self, view: View, per_axis: dict) -> ISet:
        """Flat key intervals of the box product of per-axis sets (an absent axis is
        unconstrained); tokens outside the grid part of a mixed layout get none.

        [Note: products] Axes are folded from the fastest outwards. With F the
        set over the inner axes (S positions) and A the set of the next axis: where
        F is all of [0, S) the product is A's intervals scaled by S (adjacent rows
        merge), otherwise every coordinate c of A contributes c * S + F. The
        interval count stays the number of non-full inner rows, e.g. `size`
        intervals for a 2-D neighborhood, instead of the keys' count.
        """
        sizes = [view.env[ir.axis_size(a)] for a in view.axes]
        Mq = len(view.q)
        F = None
        S = 1
        for axis, L in zip(reversed(view.axes), reversed(sizes)):
            A = per_axis.get(axis)
            if A is None:
                z = torch.zeros(1, Mq, 1, dtype=torch.int64)
                A = ISet(z, z + L, L, merged=True)
            F = A if F is None else (self._fold_periodic(A, F, S) if self.periodic else fold(A, F, S))
            S *= L
        T = view.L - S
        if not isinstance(F, ISet):
            from .periodic import shift
            return shift(F, T, view.L, None if view.qin is None else ~view.qin)
        lo, hi = F.lo + T, F.hi + T
        if view.qin is not None:
            out = ~view.qin.view(1, Mq, 1)
            lo, hi = lo.masked_fill(out, view.L), hi.masked_fill(out, view.L)
        return ISet.make(lo, hi, view.L)

    def _fold_periodic(self, A, F, S):
        """`fold` of sets that may be periodic: an outer set A repeated over full inner rows is
        scaled; one outer interval per query times inner intervals of one width each (a grid
        column, a window across many rows) is one slot per inner interval, step S; otherwise
        the outer coordinates are listed (few) and the inner set shifted to each."""
        from . import periodic as P
        n = A.n * S
        Fc = F.count()
        if bool((Fc == S).all()):
            return P.scale(A, S, n)
        if isinstance(F, ISet) and isinstance(A, ISet):
            Ac = A.count()
            C = int(Ac.masked_fill(Fc == S, 0).max()) if Ac.numel() else 0
            RF = F.lo.shape[-1]
            if C * RF <= interval_sets.MAX_INTERVALS or A.lo.shape[-1] != 1 or bool((Fc == S).any()):
                return fold(A, F, S)
            A, F = broadcast(A, F)
            a0, a1 = A.lo[..., 0:1], A.hi[..., 0:1]
            width = F.hi - F.lo
            real = (F.lo < F.n) & (a1 > a0)
            widths = []
            for r in range(RF):
                w = width[..., r][real[..., r]]
                if len(w) and bool((w != w[0]).any()):
                    return fold(A, F, S)
                widths.append(int(w[0]) if len(w) else 1)
            lo = torch.where(real, a0 * S + F.lo, n)
            hi = torch.where(real, (a1 - 1) * S + F.hi, n)
            z = torch.full_like(a0, n)
            return P.make(ISet(z, z.clone(), n, merged=True), F.lo, lo, hi, (S,) * RF, tuple(widths), n)
        Ae = P.expand(A, interval_sets.MAX_INTERVALS) if not isinstance(A, ISet) else A
        if isinstance(F, ISet):
            return fold(Ae, F, S)
        # the outer coordinates listed (their count bounded), the periodic inner set shifted to each
        Ae, Fiv = broadcast(Ae, F.iv)
        Ac = Ae.count()
        C = int(Ac.max()) if Ac.numel() else 0
        if C * (len(F.step) + F.iv.lo.shape[-1]) > interval_sets.MAX_INTERVALS:
            raise P.NotPeriodic(f"a grid product of {C} rows of a stepped set")
        iv = fold(Ae, Fiv, S)
        sizes = Ae.hi - Ae.lo
        cum = torch.cumsum(sizes, -1)
        j = torch.arange(C, dtype=torch.int64).expand(*cum.shape[:-1], C).contiguous()
        idx = torch.searchsorted(cum, j, right=True).clamp(max=sizes.shape[-1] - 1)
        coord = torch.gather(Ae.lo, -1, idx) + (j - torch.gather(cum - sizes, -1, idx))
        valid = j < Ac[..., None]
        base = (coord * S)[..., :, None]
        h = base.shape[0]
        o = (base + F.o.expand(h, -1, -1)[..., None, :]).flatten(-2)
        lo = torch.where(valid[..., None], base + F.lo.expand(h, -1, -1)[..., None, :], n).flatten(-2)
        hi = torch.where(valid[..., None], base + F.hi.expand(h, -1, -1)[..., None, :], n).flatten(-2)
        return P.make(iv, o, lo, hi, F.step * C, F.width * C, n)

    def iv_Along(self, node, view):
        return self.grid_product(view, {node.axis: self.axis_set(node.operand, view, node.axis)})

    def _iv(self, lo, hi, view) -> ISet:
        return ISet.make(lo[:, None], hi[:, None], view.L)

    # -- primitives: progressions of keys from their definitions ([Note: one definition])
    def key_intervals(self, parts: tuple[semantics.Keys, ...], view: View) -> ISet:
        """The primitive's keys per query as intervals: one per interval part, one per key of
        a stepped part (TooManyIntervals past `max_intervals`); constant parts in one tensor."""
        Mq, L = len(view.q), view.L
        limit = max_intervals(Mq)
        los, his, points, slots = [], [], [], []
        for p in parts:
            if p.when is None and p.step is None and isinstance(p.lo, ir.PConst) and isinstance(p.hi, ir.PConst):
                points.append((self.val(p.lo.value, view.env), self.val(p.hi.value, view.env)))
                continue
            lo, hi = self.per_query(p.lo, view), self.per_query(p.hi, view)
            if p.when is not None:
                hi = torch.where(self.per_query(p.when, view), hi, lo)
            if p.step is None:
                los.append(lo[:, None])
                his.append(hi[:, None])
                continue
            step = self.per_query(p.step, view)
            if bool((step != step[0]).any()) or int(step[0]) < 1:
                raise NotIntervals("a progression whose step varies")
            step = int(step[0])
            first = lo + ((-lo).clamp(min=0) + step - 1) // step * step  # keys below 0 do not exist
            hi = hi.clamp(max=L)
            count = int(((hi - first + step - 1) // step).clamp(min=0).max()) if Mq else 0
            if self.periodic and count > interval_sets.MAX_INTERVALS:  # one periodic slot, not one interval per key
                from .periodic import slot
                slots.append(slot(first, first, hi, step, 1, L))
                continue
            if count > limit:  # (the merged set is bounded again by merge())
                raise TooManyIntervals(f"more than {limit} keys of a progression per query")
            keys = first[:, None] + step * torch.arange(count, dtype=torch.int64)[None, :]
            los.append(keys)
            his.append(torch.where(keys < hi[:, None], keys + 1, keys))
        if points:
            if len(points) > limit:
                raise TooManyIntervals(f"more than {limit} key intervals per query")
            pts = torch.tensor(points, dtype=torch.int64)
            los.append(pts[:, 0].expand(Mq, -1))
            his.append(pts[:, 1].expand(Mq, -1))
        if not los:
            z = torch.zeros(Mq, 1, dtype=torch.int64)
            out = ISet.make(z, z, L)
        else:
            out = ISet.make(torch.cat(los, dim=1), torch.cat(his, dim=1), L)
            out = out if out.lo.shape[-1] == 1 else merge(out)
        for sl in slots:
            out = self.algebra.union(iter((out, sl)))
        return out

    def per_query(self, e: ir.PExpr, view: View) -> torch.Tensor:
        """A term without k (an end, step or condition of a progression) at every query: [Mq]."""
        v, _ = self.pos(e, view)
        return v.reshape(-1).expand(len(view.q)) if v.numel() == 1 else v.reshape(len(view.q))

    def iv_Same(self, node, view):
        # keys of the query's own segment: one interval when every id is one contiguous run
        doc = view.inputs[node.input].to(torch.int64)
        n = doc.shape[-1]
        starts = torch.ones(n, dtype=torch.bool)
        starts[1:] = doc[1:] != doc[:-1]
        run = torch.cumsum(starts.to(torch.int64), 0) - 1  # run index of every position
        if int(run[-1]) + 1 != len(torch.unique(doc)):
            raise NotIntervals("a segment id occurs in several runs")
        run_lo = starts.nonzero().flatten()
        run_hi = torch.cat([run_lo[1:], torch.tensor([n])])
        r = run[view.q.clamp(0, n - 1)]
        ok = (view.q >= 0) & (view.q < n)
        lo = torch.where(ok, run_lo[r], 0)
        return self._iv(lo, torch.where(ok, run_hi[r], 0), view)

    def iv_Routed(self, node, view):
        sel = view.inputs[node.input].to(torch.int64)  # [H or 1, nqb, kmax], -1 ignored
        b = self.val(node.block, view.env)
        if sel.shape[-1] > max_intervals(len(view.q), sel.shape[0]):
            raise TooManyIntervals("routed with many blocks per query block")
        # merged once per query block (its queries share the row), then read per query
        blocks = torch.unique(view.qrel // b)
        s = routed_rows(sel, blocks, b, view.L)
        at = torch.searchsorted(blocks, view.qrel // b)
        return ISet(s.lo[:, at], s.hi[:, at], view.L, merged=True)

    def iv_Random(self, node, view):
        r, seed = self.val(node.r, view.env), self.val(node.seed, view.env)
        if min(r, view.L) > max_intervals(len(view.q)):
            raise TooManyIntervals("random with many keys")
        table = random_table(view.q, view.L, r, seed)
        return merge(ISet.make(table, table + 1, view.L))

    def per_axis_inter(self, node: ir.Inter, view: View):
        """`P & Q` of per-axis parts on a grid (`(P @ h) & (Q @ w)`, axis-wise primitives):
        intersected per axis, then one product, instead of products of products; None
        when some part is not per axis. Only with periodic sets (maxvit_grid's strided axes)."""
        if not (self.periodic and view.axes and all(isinstance(p, (*ir.AXISWISE, ir.Along)) for p in node.parts)):
            return None
        per_axis: dict = {}
        for p in node.parts:
            if isinstance(p, ir.Along):
                comps = {p.axis: p.operand}
            else:
                self.check(p, view)
                comps = {a: axis_component(p, i) for i, a in enumerate(view.axes)}
            for a, c in comps.items():
                s = self.axis_set(c, view, a)
                per_axis[a] = s if a not in per_axis else self.algebra.intersect(iter((per_axis[a], s)))
        return self.grid_product(view, per_axis)

    def iv_Where(self, node, view):
        """`where` conditions: with `periodic`, the forms the periodic sets hold (`k % m OP c`,
        a slot of period m; `q.a == k.a`, a grid product; `and`, `or`, `not` of them); else
        (and in either mode) conditions on per-axis differences (`stencil`). The tile boxes
        decide other conditions."""
        if self.periodic:
            try:
                return self._where(node.pred, view)
            except NotIntervals:
                pass
        return self.stencil(node.pred, view)

    def stencil(self, pred, view) -> ISet:
        """A predicate of per-axis differences: one key interval per run of its allowed
        differences ([Note: stencils] in stencils.py); the runs are found once per size."""
        from .stencils import Stencil, is_stencil
        if not is_stencil(pred, view.axes, lambda v: self.val(v, view.env)):
            raise NotIntervals("where")
        key = (pred, tuple(sorted((str(k), v) for k, v in view.env.items())))
        cache = self.__dict__.setdefault("_stencils", {})
        if key not in cache:
            cache[key] = Stencil.of(pred, self, view)
        return cache[key].iset(view)

    def _where(self, e, view):
        from . import periodic as P
        sets = self.algebra
        if isinstance(e, ir.PBool):
            parts = (self._where(p, view) for p in e.parts)
            return sets.intersect(parts) if e.op == "and" else sets.union(parts)
        if isinstance(e, ir.PNot):
            return sets.complement(self._where(e.operand, view))
        if not (isinstance(e, ir.PCmp) and len(e.ops) == 1):
            raise NotIntervals("where")
        op, (a, b) = e.ops[0], e.operands
        flip = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "==": "==", "!=": "!="}
        is_k = lambda x: isinstance(x, ir.PVar) and x.name == "k"  # noqa: E731
        # q.a == k.a: the query's own coordinate on axis a
        if op == "==" and isinstance(a, ir.PVar) and isinstance(b, ir.PVar) and a.axis and a.axis == b.axis \
                and {a.name, b.name} == {"q", "k"} and a.axis in view.axes:
            c = view.qc[a.axis]
            one = ISet.make(c[:, None], c[:, None] + 1, view.env[ir.axis_size(a.axis)])
            return self.grid_product(view, {a.axis: one})
        if isinstance(b, ir.PBin) and b.op == "%" and is_k(b.left):
            a, b, op = b, a, flip[op]
        if not (isinstance(a, ir.PBin) and a.op == "%" and is_k(a.left) and isinstance(a.right, ir.PConst)
                and isinstance(b, ir.PConst) and a.left.axis is None and not view.axes):
            raise NotIntervals("where")
        m, c = self.val(a.right.value, view.env), self.val(b.value, view.env)
        if m < 1:
            raise NotIntervals("where: modulus below 1")
        # residues allowed: [r0, r1) of [0, m), or their complement for !=
        r0, r1 = {"<": (0, c), "<=": (0, c + 1), ">": (c + 1, m), ">=": (c, m), "==": (c, c + 1),
                  "!=": (c, c + 1)}[op]
        r0, r1 = max(0, r0), min(m, r1)
        Mq, L = len(view.q), view.L
        z = torch.zeros(Mq, dtype=torch.int64)
        s = P.slot(z + r0, z, z + L, m, r1 - r0, L) if r1 > r0 else ISet.make(z[:, None], z[:, None], L)
        return sets.complement(s) if op == "!=" else s

    def iv_Heads(self, node, view):
        H = view.heads
        chosen = [(sel, self.eval(arm.body, view)) for sel, arm in self.head_arms(node, view)]
        if not all(isinstance(s, ISet) for _, s in chosen):
            from .periodic import NotPeriodic
            raise NotPeriodic("heads { } of stepped sets")
        R = max(s.lo.shape[-1] for _, s in chosen)
        lo = torch.full((H, len(view.q), R), view.L, dtype=torch.int64)
        hi = lo.clone()
        for sel, s in chosen:
            r = s.lo.shape[-1]
            lo[sel, :, :r] = s.lo.expand(H, -1, -1)[sel]
            hi[sel, :, :r] = s.hi.expand(H, -1, -1)[sel]
        return ISet(lo, hi, view.L, merged=all(s.merged for _, s in chosen))

    def iv_Blockwise(self, node, view):
        if view.axes:
            raise NotIntervals("blockwise on a grid")
        b = self.val(node.b, view.env)
        uq, iq = torch.unique(torch.div(view.q, b, rounding_mode="floor"), return_inverse=True)
        nb = -(-view.L // b)
        env = {**view.env, ir.M: -(-view.env[ir.M] // b), ir.N: nb}
        inner = self.eval(node.operand, View(q=uq, k=torch.arange(nb), env=env))
        if not isinstance(inner, ISet):
            from .periodic import NotPeriodic
            raise NotPeriodic("blockwise of a stepped set")
        lo, hi = inner.lo[:, iq] * b, inner.hi[:, iq] * b
        return ISet.make(lo, torch.where(hi >= nb * b, view.L, hi), view.L)
