"""Score terms at concrete sizes: a small tree of reals over the pointwise lowering's integers.

input:  a bound pattern (its `ScoreTerm`) and the call's sizes.
output: `ScoreFn`: the score of every pair as torch arithmetic (the reference, the
        torch path and the FlexAttention `score_mod` all call it), the exact range
        of every table index over a set of pairs (the shape check), and the
        variables it reads.
does not: decide which pairs are allowed (the mask does; a score term never changes
        the tiles visited), check tensors (runtime/ops.py does, once), or print
        Triton (score_triton.py prints the term and its derivative for the kernels).

[Note: score terms] A score term's integer parts (`q - k`, `k.y - q.y + 6`, `h`)
are lowered by the same `_Lower.pos` as `where` conditions, so grid coordinates,
mixed layouts and bottom-right alignment mean exactly what they mean in masks.
Its real parts form the tree below; `score` is the scaled dot product. Table
indices are clamped into the table before reading: the op proves first that
every *allowed* pair indexes inside the table (runtime/torch_backend.check_table_indices),
so clamping only ever touches pairs the mask removes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from attnc import ir, ir_text
from attnc.errors import AttnError
from attnc.lru import memoize

from .expr import Expr, Lookup, nodes
from .pointwise import top_view
from .torch_program import run_torch_program, torch_program


@dataclass(frozen=True)
class Real:
    value: float


@dataclass(frozen=True)
class Score:
    pass


@dataclass(frozen=True)
class Int:
    expr: Expr
    fn: object = None  # env -> value (`_closure`)


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
    fns: tuple = ()  # one `_closure` per index


@dataclass(frozen=True)
class ScoreFn:
    """A pattern's score term at concrete sizes (see [Note: score terms])."""

    expr: object
    tables: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) in declaration order
    reads: tuple[Read, ...]
    text: str

    def __call__(self, s: torch.Tensor, q, k, h, tables: dict[str, torch.Tensor]) -> torch.Tensor:
        """The score of pairs whose scaled dot products are `s`: query rows `q` (0..M-1),
        keys `k`, heads `h` (integer tensors broadcasting with `s`); `tables` by name,
        already in `s`'s dtype and device. Differentiable in `s` and the tables."""
        out = self.pointwise(s, q, k, h, tables)
        return out.expand(torch.broadcast_shapes(out.shape, s.shape))

    def apply_(self, s: torch.Tensor, q, k, h, tables: dict[str, torch.Tensor]) -> torch.Tensor:
        """As calling it, overwriting `s` where it can (the torch path's forward): the term's
        parts that do not read `score` are computed at their own, smaller broadcast shape and
        folded into `s` in place -- `score - slope * (q - k)` costs one pass over the scores
        for the product and one for the subtraction, not a new tensor per operation."""
        env = {"q": q, "k": k, "h": h, "b": 0}
        out = _eval_inplace(self.expr, s, env, tables)
        if out is s:
            return s
        # a term that does not read `score` (or a new tensor): write it into s, so the
        # caller's in-place masking never meets a broadcast view sharing its elements
        return s.copy_(out.expand(s.shape) if isinstance(out, torch.Tensor) else torch.tensor(float(out)))

    def pointwise(self, s: torch.Tensor, q, k, h, tables: dict[str, torch.Tensor]) -> torch.Tensor:
        """As calling it, without broadcasting the result to `s`'s shape (a FlexAttention
        score_mod: its compiled form traces scalars)."""
        env = {"q": q, "k": k, "h": h, "b": 0}
        out = _eval(self.expr, s, env, tables)
        if not isinstance(out, torch.Tensor):
            return s * 0 + float(out)
        return out.to(s.dtype)

    def backward(self, s: torch.Tensor, q, k, h, tables: dict[str, torch.Tensor], grad: torch.Tensor,
                 dtables: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reverse mode through the term: given d loss / d term (`grad`, shaped like `s`),
        return d loss / d s and add the tables' gradients into `dtables` (no autograd:
        the op's backward runs below it, and the kernels need the same derivative)."""
        env = {"q": q, "k": k, "h": h, "b": 0}
        vals: dict = {}
        out = _eval(self.expr, s, env, tables, vals)
        ds = torch.zeros_like(s)
        shape = torch.broadcast_shapes(s.shape, out.shape) if isinstance(out, torch.Tensor) else s.shape
        _back(self.expr, grad.expand(shape), vals, ds, dtables, env)
        return ds

    def index_values(self, q, k, h) -> list[tuple[Read, int, torch.Tensor | int]]:
        """Every table index's values at pairs (q, k, h): (read, axis, values)."""
        env = {"q": q, "k": k, "h": h, "b": 0}
        return [(r, j, f(env)) for r in self.reads for j, f in enumerate(r.fns)]


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


def _eval(e, s, env, tables, vals=None):
    """The value of node `e` (a tensor or a Python number); with `vals`, every node's value
    by id (the reverse pass reads them)."""
    out = _eval1(e, s, env, tables, vals)
    if vals is not None:
        vals[id(e)] = out
    return out


def _closure(e: Expr):
    """`e` as a function env -> value: the pointwise torch program ([Note: torch program] in
    codegen/torch_program.py), traceable by dynamo (FlexAttention traces score_mods)."""
    if any(isinstance(n, Lookup) for n in nodes(e)):
        raise AttnError("a score term's integer part cannot read tables (Lookup)")
    return functools.partial(run_torch_program, torch_program(e), tables={})


def _flat_index(e: "Read", env):
    flat = 0
    stride = 1
    for j in range(len(e.dims) - 1, -1, -1):
        v = e.fns[j](env)
        v = v.clamp(0, e.dims[j] - 1) if isinstance(v, torch.Tensor) else min(max(int(v), 0), e.dims[j] - 1)
        flat = flat + v * stride
        stride *= e.dims[j]
    return flat


def _eval1(e, s, env, tables, vals):
    if isinstance(e, Score):
        return s
    if isinstance(e, Real):
        return e.value
    if isinstance(e, Int):
        v = e.fn(env)
        return v.to(s.dtype) if isinstance(v, torch.Tensor) else float(v)
    if isinstance(e, Read):
        t = tables[e.table]
        flat = _flat_index(e, env)
        if not isinstance(flat, torch.Tensor):
            return t.reshape(-1)[int(flat)]
        return t.reshape(-1)[flat.long()]
    if isinstance(e, Neg):
        return -_eval(e.a, s, env, tables, vals)
    if isinstance(e, Bin):
        a, b = _eval(e.a, s, env, tables, vals), _eval(e.b, s, env, tables, vals)
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            # constants: torch float64 scalars, so 1 / 0 is inf and (-1) ** 0.5 NaN, as on tensors
            a = torch.tensor(float(a), dtype=torch.float64)
        if e.op == "**":
            if not isinstance(a, torch.Tensor):
                a = torch.tensor(float(a), dtype=s.dtype, device=s.device)
            return torch.pow(a, b)
        return _PY[e.op](a, b)
    if isinstance(e, Fn):
        xs = [_eval(a, s, env, tables, vals) for a in e.args]
        if not any(isinstance(x, torch.Tensor) for x in xs):  # constants: as float64 tensors (see Bin)
            xs = [torch.tensor(float(x), dtype=torch.float64) for x in xs]
        xs = [x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=s.dtype, device=s.device) for x in xs]
        if e.name in ("min", "max"):
            out = xs[0]
            for x in xs[1:]:
                out = torch.minimum(out, x) if e.name == "min" else torch.maximum(out, x)
            return out
        return _TORCHFN[e.name](xs[0])
    raise TypeError(e)


def has_score(e) -> bool:
    """Whether the subtree reads `score` (the scaled dot product)."""
    return any(isinstance(n, Score) for n in _nodes(e))


#: in-place forms for the torch path's forward. On CPU torch's tanh_ and exp_ are 3-7x slower
#: than sigmoid_ and exp2_ (runtime/torch_backend.py, [Note: exp2]); tanh x = 2 sigmoid(2x) - 1
#: (as the kernels compute it) is within 1e-7 absolutely of tanh.
_INPLACE_FN = {"tanh": lambda t: t.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0),
               "exp": lambda t: t.mul_(1.4426950408889634).exp2_(), "sigmoid": torch.Tensor.sigmoid_,
               "abs": torch.Tensor.abs_}


def _eval_inplace(e, s, env, tables):
    """`_eval`, modifying `s` in place along the path from the root to `score` (see apply_)."""
    if isinstance(e, Score):
        return s
    if not has_score(e):
        return _eval(e, s, env, tables)
    if isinstance(e, Neg):
        return _eval_inplace(e.a, s, env, tables).neg_()
    if isinstance(e, Bin) and e.op != "**":
        la, lb = has_score(e.a), has_score(e.b)
        if la != lb:
            live = _eval_inplace(e.a if la else e.b, s, env, tables)
            static = e.b if la else e.a
            if e.op in "+-" and isinstance(static, Bin) and static.op == "*":
                # live +- x * y in one pass, without the product as a tensor of the scores' size
                x, y = (_eval(t, s, env, tables) for t in (static.a, static.b))
                if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                    if e.op == "-" and not la:
                        live.neg_()
                    return live.addcmul_(x.to(live.dtype), y.to(live.dtype), value=-1.0 if e.op == "-" and la else 1.0)
            other = _eval(static, s, env, tables)
            if e.op == "+":
                return live.add_(other)
            if e.op == "*":
                return live.mul_(other)
            if e.op == "-":
                return live.sub_(other) if la else live.neg_().add_(other)
            return live.div_(other) if la else live.reciprocal_().mul_(other)
    if isinstance(e, Fn):
        if e.name in _INPLACE_FN:
            return _INPLACE_FN[e.name](_eval_inplace(e.args[0], s, env, tables))
        live = [a for a in e.args if has_score(a)]
        if len(live) == 1:
            out = _eval_inplace(live[0], s, env, tables)
            for a in e.args:
                if a is not live[0]:
                    v = _eval(a, s, env, tables)
                    v = v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=out.dtype, device=out.device)
                    (torch.minimum if e.name == "min" else torch.maximum)(out, v, out=out)
            return out
    return _eval(e, s, env, tables)


def is_live(e) -> bool:
    """Whether the subtree depends on `score` or a table (so it receives a gradient)."""
    return any(isinstance(n, (Score, Read)) for n in _nodes(e))


def _times(g, d):
    """g * d, but 0 where g is 0: a masked pair (or a padding row) has g = 0 and may have an
    infinite local derivative (`t / (q - k + 1)` where q - k = -1, `score ** -2` at 0)."""
    return torch.where(g == 0, torch.zeros((), dtype=g.dtype, device=g.device), g * d)


def _back(e, g, vals, ds, dtables, env):
    """Accumulate d loss / d (leaves of e) given g = d loss / d e."""
    if not is_live(e):
        return
    if isinstance(e, Score):
        ds.add_(g.expand(ds.shape) if g.shape != ds.shape else g)
        return
    if isinstance(e, Read):
        flat = _flat_index(e, env)
        dt = dtables[e.table].view(-1)
        if isinstance(flat, torch.Tensor):
            flat, gb = torch.broadcast_tensors(flat.long(), g)
            dt.index_add_(0, flat.reshape(-1), gb.reshape(-1).to(dt.dtype))
        else:
            dt[int(flat)] += g.sum().to(dt.dtype)
        return
    if isinstance(e, Neg):
        _back(e.a, -g, vals, ds, dtables, env)
        return
    if isinstance(e, Bin):
        a, b, out = vals[id(e.a)], vals[id(e.b)], vals[id(e)]
        if e.op == "+":
            ga, gb = g, g
        elif e.op == "-":
            ga, gb = g, -g
        elif e.op == "*":
            ga, gb = _times(g, b), _times(g, a)
        elif e.op == "/":
            ga, gb = _times(g, 1 / b), _times(g, -out / b)
        else:  # a ** b
            at = torch.as_tensor(a, dtype=g.dtype, device=g.device)
            ga = _times(g, b * torch.pow(at, b - 1)) if is_live(e.a) else None
            gb = _times(g, out * torch.log(at)) if is_live(e.b) else None
        if ga is not None:
            _back(e.a, ga, vals, ds, dtables, env)
        if gb is not None:
            _back(e.b, gb, vals, ds, dtables, env)
        return
    if isinstance(e, Fn):
        out = vals[id(e)]
        if e.name == "tanh":
            _back(e.args[0], g * (1 - out * out), vals, ds, dtables, env)
        elif e.name == "exp":
            _back(e.args[0], _times(g, out), vals, ds, dtables, env)
        elif e.name == "sigmoid":
            _back(e.args[0], g * out * (1 - out), vals, ds, dtables, env)
        elif e.name == "abs":
            _back(e.args[0], g * torch.sign(torch.as_tensor(vals[id(e.args[0])], dtype=g.dtype)), vals, ds, dtables, env)
        else:  # min / max: the gradient goes to the first argument that attains the result
            taken = torch.zeros((), dtype=torch.bool, device=g.device)
            for a in e.args:
                hit = (torch.as_tensor(vals[id(a)], dtype=g.dtype, device=g.device) == out) & ~taken
                taken = taken | hit
                _back(a, torch.where(hit, g, torch.zeros((), dtype=g.dtype, device=g.device)), vals, ds, dtables, env)
        return
    raise TypeError(e)


_PY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_TORCHFN = {"tanh": torch.tanh, "exp": torch.exp, "sigmoid": torch.sigmoid, "abs": torch.abs}


def lower_score(pattern: ir.PatternIR, M: int, N: int, H: int, grid=None, sources: dict | None = None) -> ScoreFn | None:
    """The score term of `pattern` at these sizes (validated: `BoundPattern.resolve_sizes`), or None."""
    term = pattern.score
    if term is None:
        return None
    low, view, *_ = top_view(pattern, M, N, H, grid)
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
                x = low.pos(p, view)[0]
                return Int(x, _closure(x))
            case ir.SBin(op=op, left=a, right=b):
                return Bin(op, go(a), go(b))
            case ir.SNeg(operand=a):
                return Neg(go(a))
            case ir.SCall(func=f, args=args):
                return Fn(f, tuple(go(a) for a in args))
            case ir.SIndex(table=t, indices=idx):
                xs = tuple(low.pos(i, view)[0] for i in idx)
                r = Read(t, xs, dims[t], ", ".join(ir_text.pformat(i) for i in idx), tuple(_closure(x) for x in xs))
                reads.append(r)
                return r
        raise TypeError(n)

    try:
        expr = go(term.expr)
    except AttnError as err:
        raise err.with_sources(sources or {}) from None
    return ScoreFn(expr=expr, tables=tuple(dims.items()), reads=tuple(reads), text=ir_text.pformat(term.expr))


@memoize("score_terms", 64, "lowered score terms per pattern and size")
def score_fn(pattern: ir.PatternIR, M: int, N: int, H: int, grid=None) -> ScoreFn | None:
    """`lower_score`, cached per pattern and sizes."""
    return lower_score(pattern, M, N, H, grid)
