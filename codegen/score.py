"""Score terms at concrete sizes: a small tree of reals over the pointwise lowering's integers.

input:  a bound pattern (its `ScoreTerm`) and the call's sizes.
output: `ScoreFn`: the score of every pair as torch arithmetic (the reference, the
        torch path and the FlexAttention `score_mod` all call it), the exact range
        of every table index over a set of pairs (the shape check), and the
        variables it reads.
does not: decide which pairs are allowed (the mask does; a score term never changes
        the tiles visited), or check tensors (runtime/ops.py does, once).

[Note: score terms] A score term's integer parts (`q - k`, `k.y - q.y + 6`, `h`)
are lowered by the same `_Lower.pos` as `where` conditions, so grid coordinates,
mixed layouts and bottom-right alignment mean exactly what they mean in masks.
Its real parts form the tree below; `score` is the scaled dot product. Table
indices are clamped into the table before reading: the op proves first that
every *allowed* pair indexes inside the table (`index_ranges`), so clamping only
ever touches pairs the mask removes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from attnc import ir
from attnc.errors import AttnError

from . import pointwise as pw


@dataclass(frozen=True)
class Real:
    value: float


@dataclass(frozen=True)
class Score:
    pass


@dataclass(frozen=True)
class Int:
    expr: pw.Expr


@dataclass(frozen=True)
class Bin:
    op: str  # + - * / **
    a: object
    b: object


@dataclass(frozen=True)
class Neg:
    a: object


@dataclass(frozen=True)
class Fn:
    name: str  # tanh exp sigmoid abs min max
    args: tuple


@dataclass(frozen=True)
class Read:
    """An entry of table `table` (shape `dims`) at integer `index` expressions."""

    table: str
    index: tuple
    dims: tuple[int, ...]
    text: str  # the source spelling of the indices, for diagnostics


@dataclass(frozen=True)
class ScoreFn:
    """A pattern's score term at concrete sizes (see [Note: score terms])."""

    expr: object
    tables: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) in declaration order
    reads: tuple[Read, ...]
    text: str

    def uses(self, name: str) -> bool:
        """Whether the term reads `score` ("score") or a position / the head ("q", "k", "h")."""
        if name == "score":
            return any(isinstance(n, Score) for n in _nodes(self.expr))
        ints = [n.expr for n in _nodes(self.expr) if isinstance(n, Int)] + [i for r in self.reads for i in r.index]
        return any(isinstance(x, pw.Var) and x.name == name for e in ints for x in pw.nodes(e))

    def __call__(self, s: torch.Tensor, q, k, h, tables: dict[str, torch.Tensor]) -> torch.Tensor:
        """The score of pairs whose scaled dot products are `s`: query rows `q` (0..M-1),
        keys `k`, heads `h` (integer tensors broadcasting with `s`); `tables` by name,
        already in `s`'s dtype and device. Differentiable in `s` and the tables."""
        env = {"q": q, "k": k, "h": h, "b": 0}
        memo: dict = {}
        out = _eval(self.expr, s, env, tables, memo)
        if not isinstance(out, torch.Tensor):
            out = torch.full((), float(out), dtype=s.dtype, device=s.device)
        return out.to(s.dtype).expand(torch.broadcast_shapes(out.shape, s.shape))

    def backward(self, s: torch.Tensor, q, k, h, tables: dict[str, torch.Tensor], grad: torch.Tensor,
                 dtables: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reverse mode through the term: given d loss / d term (`grad`, shaped like `s`),
        return d loss / d s and add the tables' gradients into `dtables` (no autograd:
        the op's backward runs below it, and the kernels need the same derivative)."""
        env = {"q": q, "k": k, "h": h, "b": 0}
        memo: dict = {}
        vals: dict = {}
        out = _eval(self.expr, s, env, tables, memo, vals)
        ds = torch.zeros_like(s)
        shape = torch.broadcast_shapes(s.shape, out.shape) if isinstance(out, torch.Tensor) else s.shape
        _back(self.expr, grad.expand(shape), vals, ds, dtables, env, memo)
        return ds

    def index_values(self, q, k, h) -> list[tuple[Read, int, torch.Tensor | int]]:
        """Every table index's values at pairs (q, k, h): (read, axis, values)."""
        env = {"q": q, "k": k, "h": h, "b": 0}
        memo: dict = {}
        return [(r, j, pw._eval_torch(e, env, {}, set(), memo)) for r in self.reads for j, e in enumerate(r.index)]


def _nodes(e):
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        if isinstance(x, Bin):
            stack += [x.a, x.b]
        elif isinstance(x, Neg):
            stack.append(x.a)
        elif isinstance(x, Fn):
            stack += list(x.args)


def _eval(e, s, env, tables, memo, vals=None):
    out = _eval1(e, s, env, tables, memo, vals)
    if vals is not None:
        vals[id(e)] = out
    return out


def _flat_index(e: "Read", env, memo):
    flat = 0
    stride = 1
    for j in range(len(e.dims) - 1, -1, -1):
        v = pw._eval_torch(e.index[j], env, {}, set(), memo)
        v = v.clamp(0, e.dims[j] - 1) if isinstance(v, torch.Tensor) else min(max(int(v), 0), e.dims[j] - 1)
        flat = flat + v * stride
        stride *= e.dims[j]
    return flat


def _eval1(e, s, env, tables, memo, vals):
    if isinstance(e, Score):
        return s
    if isinstance(e, Real):
        return e.value
    if isinstance(e, Int):
        v = pw._eval_torch(e.expr, env, {}, set(), memo)
        return v.to(s.dtype) if isinstance(v, torch.Tensor) else float(v)
    if isinstance(e, Read):
        t = tables[e.table]
        flat = _flat_index(e, env, memo)
        if not isinstance(flat, torch.Tensor):
            return t.reshape(-1)[int(flat)]
        return t.reshape(-1)[flat.long()]
    if isinstance(e, Neg):
        return -_eval(e.a, s, env, tables, memo, vals)
    if isinstance(e, Bin):
        a, b = _eval(e.a, s, env, tables, memo, vals), _eval(e.b, s, env, tables, memo, vals)
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return _PY[e.op](float(a), float(b))
        if e.op == "**":
            if not isinstance(a, torch.Tensor):
                a = torch.tensor(float(a), dtype=s.dtype, device=s.device)
            return torch.pow(a, b)
        return _PY[e.op](a, b)
    if isinstance(e, Fn):
        xs = [_eval(a, s, env, tables, memo, vals) for a in e.args]
        if not any(isinstance(x, torch.Tensor) for x in xs):
            return _PYFN[e.name](*[float(x) for x in xs])
        xs = [x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=s.dtype, device=s.device) for x in xs]
        if e.name in ("min", "max"):
            out = xs[0]
            for x in xs[1:]:
                out = torch.minimum(out, x) if e.name == "min" else torch.maximum(out, x)
            return out
        return _TORCHFN[e.name](xs[0])
    raise TypeError(e)


def _live(e) -> bool:
    """Whether the subtree depends on `score` or a table (so it receives a gradient)."""
    return any(isinstance(n, (Score, Read)) for n in _nodes(e))


def _back(e, g, vals, ds, dtables, env, memo):
    """Accumulate d loss / d (leaves of e) given g = d loss / d e."""
    if not _live(e):
        return
    if isinstance(e, Score):
        ds.add_(g.expand(ds.shape) if g.shape != ds.shape else g)
        return
    if isinstance(e, Read):
        flat = _flat_index(e, env, memo)
        dt = dtables[e.table].view(-1)
        if isinstance(flat, torch.Tensor):
            flat, gb = torch.broadcast_tensors(flat.long(), g)
            dt.index_add_(0, flat.reshape(-1), gb.reshape(-1).to(dt.dtype))
        else:
            dt[int(flat)] += g.sum().to(dt.dtype)
        return
    if isinstance(e, Neg):
        _back(e.a, -g, vals, ds, dtables, env, memo)
        return
    if isinstance(e, Bin):
        a, b, out = vals[id(e.a)], vals[id(e.b)], vals[id(e)]
        if e.op == "+":
            ga, gb = g, g
        elif e.op == "-":
            ga, gb = g, -g
        elif e.op == "*":
            ga, gb = g * b, g * a
        elif e.op == "/":
            ga, gb = g / b, -g * out / b
        else:  # a ** b
            ga = g * b * torch.pow(torch.as_tensor(a, dtype=g.dtype, device=g.device), b - 1) if _live(e.a) else None
            gb = g * out * torch.log(torch.as_tensor(a, dtype=g.dtype, device=g.device)) if _live(e.b) else None
        if ga is not None:
            _back(e.a, ga, vals, ds, dtables, env, memo)
        if gb is not None:
            _back(e.b, gb, vals, ds, dtables, env, memo)
        return
    if isinstance(e, Fn):
        out = vals[id(e)]
        if e.name == "tanh":
            _back(e.args[0], g * (1 - out * out), vals, ds, dtables, env, memo)
        elif e.name == "exp":
            _back(e.args[0], g * out, vals, ds, dtables, env, memo)
        elif e.name == "sigmoid":
            _back(e.args[0], g * out * (1 - out), vals, ds, dtables, env, memo)
        elif e.name == "abs":
            _back(e.args[0], g * torch.sign(torch.as_tensor(vals[id(e.args[0])], dtype=g.dtype)), vals, ds, dtables, env, memo)
        else:  # min / max: the gradient goes to the first argument that attains the result
            taken = torch.zeros((), dtype=torch.bool, device=g.device)
            for a in e.args:
                hit = (torch.as_tensor(vals[id(a)], dtype=g.dtype, device=g.device) == out) & ~taken
                taken = taken | hit
                _back(a, torch.where(hit, g, torch.zeros((), dtype=g.dtype, device=g.device)), vals, ds, dtables, env, memo)
        return
    raise TypeError(e)


_PY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
       "**": lambda a, b: a ** b}
_PYFN = {"tanh": math.tanh, "exp": math.exp, "sigmoid": lambda x: 1 / (1 + math.exp(-x)), "abs": abs,
         "min": min, "max": max}
_TORCHFN = {"tanh": torch.tanh, "exp": torch.exp, "sigmoid": torch.sigmoid, "abs": torch.abs}


def lower_score(pattern: ir.PatternIR, M: int, N: int, H: int, grid=None, sources: dict | None = None) -> ScoreFn | None:
    """The score term of `pattern` at these sizes (validated: `BoundPattern.resolve_sizes`), or None."""
    term = pattern.score
    if term is None:
        return None
    low, view, *_ = pw.top_view(pattern, M, N, H, grid)
    dims = {}
    for spec in term.tables:
        dims[spec.name] = tuple(int(low.val(d, view.env)) for d in spec.dims)
    reads: list[Read] = []

    def go(n):
        match n:
            case ir.SScore():
                return Score()
            case ir.SNum(value=v):
                return Real(float(v))
            case ir.SPos(node=p):
                return Int(low.pos(p, view)[0])
            case ir.SBin(op=op, left=a, right=b):
                return Bin(op, go(a), go(b))
            case ir.SNeg(operand=a):
                return Neg(go(a))
            case ir.SCall(func=f, args=args):
                return Fn(f, tuple(go(a) for a in args))
            case ir.SIndex(table=t, indices=idx):
                r = Read(t, tuple(low.pos(i, view)[0] for i in idx), dims[t], ", ".join(ir.pformat(i) for i in idx))
                reads.append(r)
                return r
        raise TypeError(n)

    try:
        expr = go(term.expr)
    except AttnError as err:
        raise err.with_sources(sources or {}) from None
    return ScoreFn(expr=expr, tables=tuple(dims.items()), reads=tuple(reads), text=ir.pformat(term.expr))


@functools.lru_cache(maxsize=64)
def score_fn(pattern: ir.PatternIR, M: int, N: int, H: int, grid=None) -> ScoreFn | None:
    """`lower_score`, cached per pattern and sizes."""
    return lower_score(pattern, M, N, H, grid)
