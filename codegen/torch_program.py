"""The torch evaluator of lowered masks: an expression as a straight-line program of tensor ops.

input:  an expression (expr.py) and, to run it, tensors or ints for its variables and the
        tables it reads.
output: `torch_program`: one step per distinct node, children first; `run_torch_program`:
        its value, built only from elementwise torch ops and table indexing (so it works under
        torch.vmap and as a FlexAttention mask_mod / score_mod).
does not: lower patterns (pointwise.py) or convert run-time inputs into tables (lowered.py).
"""

from __future__ import annotations

import torch

from .expr import Const, Expr, Lookup, Var


def torch_program(expr: Expr) -> tuple:
    """`expr` as a straight-line program: one step per distinct node, children first.

    [Note: torch program] The torch evaluator runs this list instead of walking the
    expression: shared subexpressions are computed once, and nothing is hashed or
    looked up at run time, so torch.compile (FlexAttention's mask_mod) traces it as
    plain tensor arithmetic. Size-tagged constants become plain ints here."""
    steps: list[tuple] = []
    slot: dict = {}

    def go(e) -> int:
        got = slot.get(e)
        if got is not None:
            return got
        if isinstance(e, Var):
            step = ("var", e.name, ())
        elif isinstance(e, Const):
            v = e.value  # a size-tagged int (codegen/sizes.Sym) becomes a plain int; bools and floats stay
            step = ("const", v if isinstance(v, (bool, float)) else int(v), ())
        elif isinstance(e, Lookup):
            args = tuple(go(i) for i in e.index) + (() if e.bit is None else (go(e.bit),))
            step = ("lookup", (e.table, e.bit is not None), args)
        else:
            step = ("op", e.op, tuple(go(a) for a in e.args))
        steps.append(step)
        slot[e] = len(steps) - 1
        return slot[e]

    go(expr)
    return tuple(steps)


def run_torch_program(program: tuple, env: dict, tables: dict):
    """The value of a `torch_program` with variables `env` and tables `tables`."""
    vals = []
    for kind, what, args in program:
        if kind == "var":
            r = env[what]
        elif kind == "const":
            r = what
        elif kind == "lookup":
            name, has_bit = what
            idx = [vals[i] for i in (args[:-1] if has_bit else args)]
            # one flat index (arithmetic on the row-major strides), not a tuple mixing ints and tensors:
            # dynamo, tracing a mask_mod inside flex_attention after other patterns, could turn an
            # int of that tuple into a data-dependent symbol and fail on `int(...)` (long differential run)
            table = tables[name]
            flat = 0
            for size, i in zip(table.shape, idx):
                flat = flat * size + i
            r = table.reshape(-1)[flat]
            if has_bit:
                r = ((r >> vals[args[-1]]) & 1) != 0
        else:
            r = _TORCH_OPS[what](*(vals[i] for i in args))
        vals.append(r)
    return vals[-1]


def _tmin(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.minimum(a, b)
    return torch.clamp(a, max=b) if isinstance(a, torch.Tensor) else torch.clamp(b, max=a)


def _tmax(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.maximum(a, b)
    return torch.clamp(a, min=b) if isinstance(a, torch.Tensor) else torch.clamp(b, min=a)


def _tnot(a):
    return ~a if isinstance(a, torch.Tensor) else (not a)


_TORCH_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "floordiv": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "mod": lambda a, b: torch.remainder(a, b),
    "min": _tmin,
    "max": _tmax,
    "neg": lambda a: -a,
    "abs": lambda a: torch.abs(a),
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "and": lambda *xs: _fold(lambda x, y: x & y, xs),
    "or": lambda *xs: _fold(lambda x, y: x | y, xs),
    "not": _tnot,
}


def _fold(fn, xs):
    acc = xs[0]
    for x in xs[1:]:
        acc = fn(acc, x)
    return acc
