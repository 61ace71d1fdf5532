"""The monotone ranges of a pattern: its mask IR as key ranges per query, and inverted.

input:  a bound 1-D pattern (PatternIR) at concrete sizes M, N, H.
output: `row_ranges`: the key ranges of every query (`Ranges`, direction "rows");
        `col_ranges`: the query-row ranges of every key, inverted from them ("cols");
        `NoClosedForm` (ranges.py) with the reason where the keys are not a few monotone
        ranges per query ([Note: monotone ranges] in bounds.py).
does not: check the ranges against the plan or choose the kernels' loops (bounds.py).
"""

from __future__ import annotations

import torch

from attnc import ir, semantics
from attnc.reference import Evaluator, View, top_view

from . import sizes as size_tags
from .monotone import Add, Const, Div, Max, Min, MonoExpr, Mul, Position, const_value, subst, upper
from .ranges import MAX_RANGES, Domain, NoClosedForm, Range, Ranges, group_heads, normalize, runs_of


def _nonempty(ranges: list[Range], dom: Domain, doing: str) -> list[Range]:
    """The ranges not empty anywhere in the domain (at most 8 * MAX_RANGES of them)."""
    out = []
    for r in ranges:
        c = dom.clip(r)
        if c is not None and dom.nonempty(c):
            out.append(r)
    if len(out) > 8 * MAX_RANGES:
        raise NoClosedForm(f"more than {8 * MAX_RANGES} key ranges while {doing}")
    return out


class Derivation:
    """Mask IR -> ranges over absolute query positions (1-D, concrete sizes)."""

    def __init__(self, pattern: ir.PatternIR, M: int, N: int, H: int):
        if pattern.layout.axes or pattern.layout.text is not None:
            raise NoClosedForm("grid layouts (key sets are products over axes)")
        if pattern.inputs:
            raise NoClosedForm("run-time inputs (the plan is built per call)")
        self.pattern = pattern
        self.ev = Evaluator(pattern)
        self.view = top_view(pattern, M, N, H, None, {}, rows=(0, 0))

    def val(self, v, env) -> int:
        return size_tags.keep_expression(v, env, self.ev.val(v, env))

    def run(self) -> list[Range]:
        env = self.view.env
        return self.build(self.pattern.body, env, Domain(env[ir.N] - env[ir.M], env[ir.N], env[ir.N]))

    def build(self, node: ir.Mask, env: dict, dom: Domain) -> list[Range]:
        self.ev.check(node, View(q=self.view.q, k=self.view.k, env=env))
        parts = self.ev.keys(node, View(q=self.view.q, k=self.view.k, env=env))
        if parts is not None:
            try:
                out = self.key_ranges(parts, env, dom)
            except NoClosedForm as e:
                raise NoClosedForm(f"{type(node).__name__.rstrip('_').lower()} ({e})") from None
        elif semantics.is_combinator(node):
            out = semantics.combine(node, lambda n: self.build(n, env, dom), self.algebra(dom))
        else:
            m = getattr(self, "r_" + type(node).__name__.rstrip("_"), None)
            if m is None:
                raise NoClosedForm(f"{type(node).__name__.rstrip('_').lower()} (keys are not a few monotone ranges per query)")
            out = m(node, env, dom)
        return _nonempty(out, dom, "combining")

    def all(self, dom: Domain, lo: MonoExpr, hi: MonoExpr) -> list[Range]:
        return [Range(lo, hi, dom.x0, dom.x1)]

    # -- primitives: their definitions (attnc/semantics.py) as monotone ranges
    def key_ranges(self, parts: tuple[semantics.Keys, ...], env: dict, dom: Domain) -> list[Range]:
        out: list[Range] = []
        spans: list[tuple[int, int]] = []  # constant key intervals, merged into runs below
        for p in parts:
            step = 1 if p.step is None else const_value(self.monotone(p.step, env))
            try:
                lo, hi = self.monotone(p.lo, env), self.monotone(p.hi, env)
            except NoClosedForm:
                if step == 1:
                    raise
                lo = hi = None
            constant = isinstance(lo, Const) and isinstance(hi, Const)
            if step != 1 and not constant:
                raise NoClosedForm("keys with a step: dilated or strided, not an interval")
            if p.when is None and constant:
                a, b = max(lo.value, 0), min(hi.value, dom.L)
                if step != 1 and (b - a) // step > MAX_RANGES:
                    raise NoClosedForm(f"a token set with more than {MAX_RANGES} separate runs")
                spans += [(a, b)] if step == 1 else [(x, x + 1) for x in range(a + (lo.value - a) % step, b, step)]
                continue
            for g0, g1 in self.guard(p.when, env, dom):
                out.append(Range(lo, hi, g0, g1))
        runs: list[list[int]] = []
        for a, b in sorted(s for s in spans if s[0] < s[1]):  # (ends keep their size tags)
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], b)
            else:
                runs.append([a, b])
        if len(runs) > MAX_RANGES:
            raise NoClosedForm(f"a token set with {len(runs)} separate runs")
        return out + [Range(Const(a), Const(b), dom.x0, dom.x1) for a, b in runs]

    def guard(self, when: ir.PExpr | None, env: dict, dom: Domain) -> list[tuple[int, int]]:
        """The runs of query positions [g0, g1) where a progression's condition holds."""
        match when:
            case None:
                return [(dom.x0, dom.x1)]
            case ir.PCmp(ops=("<",), operands=(ir.PVar(name="q", axis=None), bound)):
                return [(dom.x0, const_value(self.monotone(bound, env)))]
            case ir.PIn(item=ir.PVar(name="q", axis=None), collection=tokens):
                return self._runs(tokens, env, dom.x0, dom.x1)
        raise NoClosedForm("a condition on the query that is not a range or a set")

    def monotone(self, e: ir.PExpr, env: dict) -> MonoExpr:
        """A term of the definitions as a non-decreasing expression of x (NoClosedForm otherwise)."""
        match e:
            case ir.PVar(name="q", axis=None):
                return Position()
            case ir.PConst(value=v):
                return Const(self.val(v, env))
            case ir.PCall(func="min" | "max" as f, args=args):
                xs = tuple(self.monotone(a, env) for a in args)
                if all(isinstance(x, Const) for x in xs):
                    return Const(min(x.value for x in xs) if f == "min" else max(x.value for x in xs))
                return Min(xs) if f == "min" else Max(xs)
            case ir.PBin(op=op, left=a, right=b):
                x, y = self.monotone(a, env), self.monotone(b, env)
                if isinstance(x, Const) and isinstance(y, Const):
                    if op in ("//", "%") and y.value == 0:
                        raise NoClosedForm("a division by zero")
                    return Const(semantics.INT_OPS[op](x.value, y.value))
                if op == "+" and isinstance(x, Const):
                    x, y = y, x
                if op in ("+", "-") and isinstance(y, Const):
                    return Add(x, y.value if op == "+" else -y.value)
                if op == "*" and isinstance(x, Const):
                    x, y = y, x
                if op in ("*", "//", "%") and isinstance(y, Const) and y.value == 1:  # (a parameter that is 1 here)
                    return Const(0) if op == "%" else x
                if op in ("*", "//") and isinstance(y, Const) and y.value > 0:
                    return Mul(x, y.value) if op == "*" else Div(x, y.value)
        raise NoClosedForm("keys whose ends are not non-decreasing in the query (a remainder, or a decreasing term)")

    def _runs(self, s: ir.SetVal, env, lo: int, hi: int) -> list[tuple[int, int]]:
        """The set's integers inside [lo, hi) as runs [a, b)."""
        flags = torch.zeros(max(hi - lo, 0), dtype=torch.bool)
        if isinstance(s, ir.SetRange):
            a, b, st = (self.val(v, env) for v in (s.start, s.stop, s.step))
            a, b = max(a, lo), min(b, hi)  # (a range step keeps its phase: start from the set's own start)
            first = self.val(s.start, env)
            if a < b:
                a += (first - a) % st
                flags[a - lo:b - lo:st] = True
        else:
            inside = [i - lo for i in {self.val(i, env) for i in s.items} if lo <= i < hi]
            if inside:
                flags[torch.tensor(inside)] = True
        runs = runs_of(flags, lo)
        if len(runs) > MAX_RANGES:
            raise NoClosedForm(f"a token set with {len(runs)} separate runs")
        return runs

    def algebra(self, dom: Domain) -> semantics.Algebra:
        """Range lists over `dom` as sets for the boolean combinators ([Note: combinators]
        in semantics.py): a union concatenates, an intersection meets every pair."""
        return semantics.Algebra(union=lambda lists: [r for rs in lists for r in rs],
                                 intersect=semantics.folding(lambda A, B: self.inter(A, B, dom)),
                                 complement=lambda A: self.complement(A, dom))

    def inter(self, A: list[Range], B: list[Range], dom: Domain) -> list[Range]:
        both = [Range(Max((a.lo, b.lo)), Min((a.hi, b.hi)), max(a.g0, b.g0), min(a.g1, b.g1), a.heads & b.heads)
                for a in A for b in B]
        return _nonempty(both, dom, "intersecting")

    def complement(self, A: list[Range], dom: Domain) -> list[Range]:
        out = self.all(dom, Const(0), Const(dom.L))
        for a in A:
            gaps = [Range(Const(0), a.lo, a.g0, a.g1, a.heads), Range(a.hi, Const(dom.L), a.g0, a.g1, a.heads),
                    Range(Const(0), Const(dom.L), dom.x0, a.g0, a.heads), Range(Const(0), Const(dom.L), a.g1, dom.x1, a.heads)]
            if a.heads != -1:
                gaps.append(Range(Const(0), Const(dom.L), dom.x0, dom.x1, ~a.heads))
            out = self.inter(out, gaps, dom)
        return out

    def r_Heads(self, n, env, dom):
        out = []
        for sel, arm in self.ev.head_arms(n, View(q=self.view.q, k=self.view.k, env=env)):
            bits = sum(1 << int(h) for h in sel.nonzero().flatten().tolist())
            out += [Range(r.lo, r.hi, r.g0, r.g1, r.heads & bits) for r in self.build(arm.body, env, dom)]
        return out

    def r_Blockwise(self, n, env, dom):
        b = self.val(n.b, env)
        nb = -(-dom.L // b)
        inner_env = {**env, ir.M: -(-env[ir.M] // b), ir.N: nb}
        inner = self.build(n.operand, inner_env, Domain(dom.x0 // b, (dom.x1 - 1) // b + 1, nb))
        out = []
        for r in inner:
            lo = Mul(subst(Max((r.lo, Const(0))), Div(Position(), b)), b)
            hi = Min((Mul(subst(Min((r.hi, Const(nb))), Div(Position(), b)), b), Const(dom.L)))
            out.append(Range(lo, hi, r.g0 * b, r.g1 * b, r.heads))
        return out


# ----------------------------------------------------------------------------- per direction


def row_ranges(pattern: ir.PatternIR, M: int, N: int, H: int, join: bool = True) -> Ranges:
    """The key ranges of every query (raises NoClosedForm)."""
    raw = Derivation(pattern, M, N, H).run()
    dom = Domain(N - M, N, N)
    per_head = []
    done: dict = {}  # heads with the same raw ranges normalise once
    for h in range(H):
        mine = tuple(i for i, r in enumerate(raw) if (r.heads >> h) & 1)
        if mine not in done:
            done[mine] = tuple(normalize([Range(raw[i].lo, raw[i].hi, raw[i].g0, raw[i].g1, -1) for i in mine],
                                         dom, join))
        per_head.append(done[mine])
    return Ranges("rows", group_heads(per_head), (N - M, N), N)


def col_ranges(rows: Ranges, M: int, N: int, join: bool = True) -> Ranges:
    """The query-row ranges of every key, inverted from the rows' ranges."""
    off = N - M
    dom = Domain(0, N, M)
    groups = []
    for bits, rs in rows.groups:
        inv = []
        for r in rs:
            first = Max((upper(r.hi, Position()), Const(r.g0)))  # first query with hi(q) > k
            stop = Min((upper(r.lo, Position()), Const(r.g1)))  # first query with lo(q) > k
            inv.append(Range(Add(first, -off), Add(stop, -off), 0, N))
        groups.append((bits, tuple(normalize(inv, dom, join))))
    return Ranges("cols", tuple(groups), (0, N), M)
