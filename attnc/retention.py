"""KV retention: which cached keys a pattern lets some future query read.

input:  a bound pattern's IR, the current sequence length L (keys 0 .. L-1 are cached), heads.
output: bool [H, L]: True where key j may still be attended by a query at position p >= L
        (the next token and every later one); False keys can be evicted for good.
does not: evict (attnc.nn.KVCache does), or look at tensors.

[Note: retention] The answer is derived from the pattern's expression, per construct, and is
conservative by construction -- a key is dropped only when no future query can be allowed to
read it: `sliding(w)` keeps (L - w, L), `band(l, r)` keeps [L - l, L), `sink(n)` / `cols(S)`
their keys, `block` the keys from the first future block on, `prefix(n)` and `rows(S)` what
their future rows see, `|` unions, `&` intersects (a pair allowed by P & Q is allowed by both),
`P - Q` keeps what P keeps, `heads {}` decides per head. Everything else -- `causal`,
`strided`, `random`, `where`, complements, structural combinators, grids, run-time inputs,
and any pattern whose parameters depend on M or N (they change as the sequence grows) --
keeps every key. tests/test_decode.py checks the rule against the mask: no evicted key is
allowed for any of many later query positions, on every example and on random patterns.
"""

from __future__ import annotations

import torch

from . import ir
from .reference import Evaluator, top_view


def retention(pattern: ir.PatternIR, L: int, heads: int = 1) -> torch.Tensor:
    """bool [heads, L]: keys that a query at any position >= L may attend (see [Note: retention])."""
    if not isinstance(L, int) or isinstance(L, bool) or L < 0:
        raise ValueError(f"retention: expected the cached length L >= 0, got {L!r}")
    if L == 0:
        return torch.zeros(heads, 0, dtype=torch.bool)
    if pattern.layout.axes or pattern.inputs or ir.has_topk(pattern) or ir.reads_sizes(pattern):
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

    def from_(self, start: int) -> torch.Tensor:
        """Keys j >= start."""
        return (self.keys >= start)[None]

    def need(self, node: ir.Mask) -> torch.Tensor:  # bool [1 | H, L]
        L = self.L
        match node:
            case ir.Empty():
                return torch.zeros(1, L, dtype=torch.bool)
            case ir.Band(left=left, right=_) if not isinstance(left, tuple):
                return self.from_(L - self.val(left))
            case ir.Sliding(w=w) if not isinstance(w, tuple):
                return self.from_(L - self.val(w) + 1)
            case ir.Sink(n=n):
                return (self.keys < self.val(n))[None]
            case ir.Cols(tokens=s):
                return self.ev.set_contains(s, self.keys, self.env)[None]
            case ir.Rows(tokens=s):
                return self.all() if self._has_future(s) else torch.zeros(1, L, dtype=torch.bool)
            case ir.Global(tokens=s):
                if self._has_future(s):
                    return self.all()
                return self.ev.set_contains(s, self.keys, self.env)[None]
            case ir.Prefix(n=n):
                n = self.val(n)
                return (self.keys < n)[None] if L < n else torch.zeros(1, L, dtype=torch.bool)
            case ir.Block(size=size, shift=shift, halo=halo) if not isinstance(size, tuple):
                size, shift = self.val(size), self.val(shift) if not isinstance(shift, tuple) else None
                halo = self.val(halo) if not isinstance(halo, tuple) else None
                if shift is None or halo is None:
                    return self.all()
                first = ((L - shift) // size) * size + shift  # the block of the next query
                return self.from_(first - halo)
            case ir.Union_(parts=ps):
                out = self.need(ps[0])
                for p in ps[1:]:
                    out = out | self.need(p)
                return out
            case ir.Inter(parts=ps):
                out = self.need(ps[0])
                for p in ps[1:]:
                    out = out & self.need(p)
                return out
            case ir.Diff(left=a):
                return self.need(a)
            case ir.Heads(arms=arms):
                return self._heads(arms)
        return self.all()  # causal, full, strided, random, where, ~, structural: keep everything

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
