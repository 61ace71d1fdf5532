"""KV retention: which cached keys a pattern lets some future query read.

input:  a bound pattern's IR, the current sequence length L (keys 0 .. L-1 are cached), heads.
output: bool [H, L]: True where key j may still be attended by a query at position p >= L
        (the next token and every later one); False keys can be evicted for good.
does not: evict (attnc.nn.KVCache does), or look at tensors.

[Note: retention] The answer is derived from the pattern's expression and is conservative by
construction -- a key is dropped only when no future query can be allowed to read it. A primitive
is read from its definition (semantics.py): each progression of keys [lo(q), hi(q)) keeps the
keys from lo(L) on -- lo at the next query, when lo is proved never to decrease -- and below hi
when hi is a constant; a progression whose condition no future query meets keeps nothing
(`prefix(n)` once L >= n, `rows(S)` without future rows). So `sliding(w)` keeps (L - w, L),
`band(l, r)` keeps [L - l, L), `sink(n)` / `cols(S)` their keys, `block` the keys from the first
future block on. `|` unions, `&` intersects (a pair allowed by P & Q is allowed by both),
`P - Q` keeps what P keeps, `heads {}` decides per head. Everything else -- `causal` (lo = 0),
`strided` (lo = q % s), `neighborhood` (its window depends on N), `random`, `where`,
complements, structural combinators, grids, run-time inputs, and any pattern whose parameters
depend on M or N (they change as the sequence grows) --
keeps every key. tests/test_decode.py checks the rule against the mask: no evicted key is
allowed for any of many later query positions, on every example and on random patterns.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import ir, ir_text, semantics
from .reference import MASKS, Evaluator, View, top_view


def retention(pattern: ir.PatternIR, L: int, heads: int = 1) -> torch.Tensor:
    """bool [heads, L]: keys that a query at any position >= L may attend (see [Note: retention])."""
    if not isinstance(L, int) or isinstance(L, bool) or L < 0:
        raise ValueError(f"retention: expected the cached length L >= 0, got {L!r}")
    if L == 0:
        return torch.zeros(heads, 0, dtype=torch.bool)
    if pattern.layout.axes or pattern.inputs or ir.has_topk(pattern) or ir_text.reads_sizes(pattern):
        return torch.ones(heads, L, dtype=torch.bool)
    view = top_view(pattern, L + 1, L + 1, heads, None, {})
    r = _Retention(pattern, view.env, L, heads)
    return r.need(pattern.body).expand(heads, L).clone()


class _Retention:
    def __init__(self, pattern: ir.PatternIR, env: dict, L: int, heads: int):
        self.ev = Evaluator(pattern)
        self.env = env
        self.L = L
        self.heads = heads
        self.keys = torch.arange(L, dtype=torch.int64)

    def val(self, x) -> int:
        return self.ev.val(x, self.env)

    def all(self) -> torch.Tensor:
        return torch.ones(1, self.L, dtype=torch.bool)

    def need(self, node: ir.Mask) -> torch.Tensor:  # bool [1 | H, L]
        parts = semantics.keys_of(node)
        if parts is not None:
            return self.keys_needed(parts)
        if semantics.is_combinator(node):
            # a complement keeps every key: what `b` excludes from `a - b` is kept too (an
            # over-approximation: eviction must never drop a key some query reads)
            return semantics.combine(node, self.need, self.algebra)
        if isinstance(node, ir.Heads):
            return self._heads(node.arms)
        return self.all()  # random, where, structural: keep everything

    @functools.cached_property
    def algebra(self) -> semantics.Algebra:
        """Kept keys as sets: the dense masks' union and intersection (`reference.MASKS`), and
        every key for any complement, so the complemented operand is never evaluated."""
        return dataclasses.replace(MASKS, complement=None, everything=self.all)

    def keys_needed(self, parts: tuple[semantics.Keys, ...]) -> torch.Tensor:
        """The cached keys some future query p >= L reads through a primitive's progressions
        (semantics.py): from lo(L) on when lo never decreases, below hi when hi is constant."""
        out = torch.zeros(1, self.L, dtype=torch.bool)
        value = self.term_value
        for p in parts:
            if p.when is not None and not semantics.mentions(p.when, semantics.LENGTH) and not self._future(p.when):
                continue
            terms = [p.lo] + [t for t in (p.step, p.when) if t is not None]
            if any(semantics.mentions(t, semantics.LENGTH) for t in terms):
                return self.all()  # the first key moves with the sequence's length
            if not semantics.non_decreasing(p.lo, value) or (p.step is not None and semantics.mentions(p.lo, semantics.Q)):
                return self.all()
            lo = self.at_next(p.lo)
            keep = self.keys >= lo
            if not (semantics.mentions(p.hi, semantics.Q) or semantics.mentions(p.hi, semantics.LENGTH)):
                keep &= self.keys < value(p.hi)  # (an end that grows with q or N bounds nothing cached)
            if p.step is not None:
                keep &= (self.keys - lo) % value(p.step) == 0
            out |= keep[None]
        return out

    def term_value(self, e: ir.PExpr) -> int:
        """A term without q (a parameter expression)."""
        return int(self.at_next(e))

    def at_next(self, e: ir.PExpr) -> int:
        """A term at the next query, q = L."""
        v, _ = self.ev.pos(e, View(q=torch.tensor([self.L]), k=torch.tensor([0]), env=self.env))
        return int(v.reshape(-1)[0])

    def _future(self, cond: ir.PExpr) -> bool:
        """Whether some query p >= L meets a progression's condition (True when unsure)."""
        match cond:
            case ir.PCmp(ops=("<",), operands=(ir.PVar(name="q", axis=None), bound)):
                return self.L < self.term_value(bound)
            case ir.PIn(item=ir.PVar(name="q", axis=None), collection=s):
                return self._has_future(s)
        return True

    def _has_future(self, s) -> bool:
        """Whether the set holds a position >= L (a future row)."""
        if isinstance(s, ir.SetRange):
            start, stop, step = self.val(s.start), self.val(s.stop), self.val(s.step)
            if stop <= start:
                return False
            last = start + ((stop - 1 - start) // step) * step
            return last >= self.L
        return any(self.val(x) >= self.L for x in s.items)

    def _heads(self, arms) -> torch.Tensor:
        out = torch.zeros(self.heads, self.L, dtype=torch.bool)
        taken = torch.zeros(self.heads, dtype=torch.bool)
        hs = torch.arange(self.heads, dtype=torch.int64)
        for arm in arms:
            sel = ~taken if arm.selector is None else self.ev.set_contains(arm.selector, hs, self.env) & ~taken
            if bool(sel.any()):
                out[sel] = self.need(arm.body).expand(self.heads, self.L)[sel]
            taken |= sel
        return out
