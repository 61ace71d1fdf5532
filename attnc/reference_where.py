"""The reference semantics of `where` predicates: position expressions over tensors of positions.

input:  a position expression (`ir.PExpr`, attnc/ir_expr.py) and a reference `View` (its query
        and key positions, sizes, grid coordinates; see [Note: views] in attnc/reference.py).
output: `WherePredicates.pos`: the value, broadcastable to [H, Mq, Nk], and whether grid
        coordinates were used. `WherePredicates` is a mixin of reference.Evaluator, which
        supplies `val(expr, env)` (static integers) and `set_contains(s, x, env)` (static sets).
does not: evaluate mask nodes or build views (reference.py), or lower predicates to
        expressions (codegen/pointwise.py overrides `pos` for that).

Integer arithmetic is checked as it runs: division by zero and any result whose magnitude
could pass the integer limit (syntax.MAX_INT, 2**60) raise, since int64 tensors wrap silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import ir
from .errors import AttnError, error
from .syntax import MAX_INT

if TYPE_CHECKING:
    from .reference import View


class WherePredicates:
    """Mixin of reference.Evaluator: `where` position expressions over a view's tensors."""

    def pos(self, node: ir.PExpr, view: View) -> tuple[torch.Tensor, bool]:
        """(value broadcastable to [H, Mq, Nk], whether grid coordinates were used)."""
        match node:
            case ir.PVar(name="q", axis=None):
                return view.q[:, None], False
            case ir.PVar(name="k", axis=None):
                return view.k[None, :], False
            case ir.PVar(name="h", axis=None):
                return torch.arange(view.heads, dtype=torch.int64)[:, None, None], False
            case ir.PVar(name=base, axis=ax):
                if ax not in view.qc:
                    raise AttnError(error(node.span, f"grid coordinate {base}.{ax} is not defined here"))
                return (view.qc[ax][:, None] if base == "q" else view.kc[ax][None, :]), True
            case ir.PConst(value=v):
                return torch.tensor(self.val(v, view.env), dtype=torch.int64), False
            case ir.PNeg(operand=a):
                x, g = self.pos(a, view)
                return -x, g
            case ir.PBin(op=op, left=a, right=b):
                (x, g1), (y, g2) = self.pos(a, view), self.pos(b, view)
                return _arith(op, x, y, node), g1 or g2
            case ir.PCall(func=f, args=args):
                vals = [self.pos(a, view) for a in args]
                g = any(u for _, u in vals)
                xs = [x for x, _ in vals]
                if f == "abs":
                    return xs[0].abs(), g
                acc = xs[0]
                for x in xs[1:]:
                    acc = torch.minimum(acc, x) if f == "min" else torch.maximum(acc, x)
                return acc, g
            case ir.PCmp(ops=ops, operands=xs):
                vals = [self.pos(x, view) for x in xs]
                out = None
                for op, (a, _), (b, _) in zip(ops, vals, vals[1:]):
                    r = {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}[op](a, b)
                    out = r if out is None else out & r
                return out, any(g for _, g in vals)
            case ir.PBool(op=op, parts=ps):
                vals = [self.pos(p, view) for p in ps]
                out = vals[0][0]
                for v, _ in vals[1:]:
                    out = (out & v) if op == "and" else (out | v)
                return out, any(g for _, g in vals)
            case ir.PNot(operand=a):
                x, g = self.pos(a, view)
                return ~x, g
            case ir.PIn(item=i, collection=c):
                x, g = self.pos(i, view)
                return self.set_contains(c, x, view.env), g
        raise TypeError(node)


def _arith(op, x, y, node):
    if op in ("//", "%") and bool((y == 0).any()):
        raise AttnError(error(node.span, f"division by zero in `where` ('{op}' by an expression that is 0 here)"))
    # int64 wraps silently: refuse any result whose magnitude could pass MAX_INT
    ax, ay = _magnitude(x), _magnitude(y)
    bound = {"+": ax + ay, "-": ax + ay, "*": ax * ay}.get(op, 0)
    if op == "**":
        bound = ax ** min(ay, 64) if ax > 1 and ay * ax.bit_length() <= 64 else (MAX_INT + 1 if ax > 1 else 1)
    if bound > MAX_INT:
        raise AttnError(error(node.span, f"integer overflow in `where`: '{op}' can reach {bound if bound < 10**30 else 'beyond 10**30'} "
                              f"here, beyond the limit 2**60 = {MAX_INT}"))
    match op:
        case "+":
            return x + y
        case "-":
            return x - y
        case "*":
            return x * y
        case "//":
            return torch.div(x, y, rounding_mode="floor")
        case "%":
            return torch.remainder(x, y)
        case "**":
            if y.numel() == 1 and 0 <= int(y) <= 4:  # small constant powers (squared distances): products
                out = torch.ones_like(x) if int(y) == 0 else x
                for _ in range(int(y) - 1):
                    out = out * x
                return out
            return x ** y
    raise ValueError(op)


def _magnitude(x: torch.Tensor) -> int:
    """max |x| in one pass (no |x| tensor: `where` operands are whole [queries, keys] blocks)."""
    if not x.numel():
        return 0
    lo, hi = torch.aminmax(x)
    return max(-int(lo), int(hi))
