"""Pointwise lowering: a bound pattern as one integer/boolean expression of (q, k, h).

input:  a `PatternIR`, concrete sizes (M, N, H, grid) and the shapes of its
        run-time inputs.
output: a `Lowered` mask: a small expression IR over the query index `q`
        (0..M-1, as in the q tensor), the key index `k`, the query head `h` and
        the batch `b`, plus the host-side tables it reads (random bits, run-time
        inputs); printed as Triton source or evaluated by elementwise torch ops.
does not: plan tiles (analysis.py) or generate kernels (kernels.py).

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

import math
from dataclasses import dataclass, field

import torch

from attnc import ir, semantics
from attnc.errors import AttnError, error
from attnc.limits import require
from attnc.reference import Evaluator, _pick, _ravel, _unravel, random_table

from . import sizes as size_tags


class LoweringError(AttnError):
    """The pattern (or a part of it) has no pointwise form, e.g. `topk`."""


# ----------------------------------------------------------------------------- the expression IR


@dataclass(frozen=True, slots=True)
class Expr:
    pass


@dataclass(frozen=True, slots=True)
class Var(Expr):
    """`q` (query row of the q tensor), `k` (key), `h` (query head) or `b` (batch)."""

    name: str


@dataclass(frozen=True, slots=True)
class Const(Expr):
    value: int | bool
    #: the size expression of a size-tagged value (sizes.Sym): equal values with different
    #: expressions are different constants ([Note: one text, many sizes] in sizes.py)
    tag: object = field(default=None, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "tag", size_tags.tag_of(self.value) if not isinstance(self.value, bool) else None)


@dataclass(frozen=True, slots=True)
class Op(Expr):
    """Integer ops: add sub mul floordiv mod (floor semantics) min max neg abs;
    comparisons: lt le gt ge eq ne; boolean: and or not."""

    op: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Lookup(Expr):
    """An element of a host table (indices already clamped in range); with `bit`,
    the table holds int32 words and the result is bit `bit` of the word (bool)."""

    table: str
    index: tuple[Expr, ...]
    bit: Expr | None = None


def input_table_name(source: str) -> str:
    """The table of the run-time input `source`: ``in_<source>``.

    [Note: table names] Table names become Triton argument names (`tbl_<name>`),
    so they are identifiers; they live in two disjoint namespaces. A run-time
    input's table is ``in_`` plus the user's name; tables the lowering makes
    itself are ``random<i>`` (random bits) and never start with ``in_``. So
    no user name -- ``random0`` included -- can select, replace or alias an
    internal table.
    """
    return f"in_{source}"


@dataclass(frozen=True)
class Table:
    """A tensor the mask reads: contiguous, int32; `batched` tables have a
    leading batch dimension indexed by `b` (run-time inputs). Names: see
    [Note: table names] (`input_table_name`)."""

    name: str
    shape: tuple[int, ...]  # without the batch dimension
    batched: bool
    data: torch.Tensor | None = None  # static tables (random bits); None for run-time inputs
    source: str | None = None  # run-time input name
    kind: str = ""  # "random" | "segments" | "blocks"
    block: int = 0  # key block of a "blocks" table

    def strides(self) -> tuple[int, ...]:
        out, acc = [], 1
        for s in reversed(self.shape):
            out.append(acc)
            acc = acc * s  # keeps size tags (sizes.Sym)
        return tuple(reversed(out))


ARITH = {"add", "sub", "mul", "floordiv", "mod", "min", "max", "neg", "abs"}
COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


class Builder:
    """Smart constructors: constant folding, flattening and range-based
    simplification (a comparison the variables' ranges decide becomes a constant)."""

    def __init__(self, var_bounds: dict[str, tuple[int | None, int | None]]):
        self.var_bounds = var_bounds
        self._bounds: dict[Expr, tuple] = {}

    # -- ranges (inclusive; None = unbounded)
    def bounds(self, e: Expr) -> tuple[int | None, int | None]:
        if isinstance(e, Const):
            return int(e.value), int(e.value)
        if isinstance(e, Var):
            return self.var_bounds.get(e.name, (0, None))
        got = self._bounds.get(e)
        if got is not None:
            return got
        if isinstance(e, Lookup):
            r = (0, 1) if e.bit is not None else (None, None)
        else:
            r = self._op_bounds(e)
        self._bounds[e] = r
        return r

    def _op_bounds(self, e: Op):
        bs = [self.bounds(a) for a in e.args]
        op = e.op
        if op in COMPARE or op in ("and", "or", "not"):
            return 0, 1

        def f(fn, *xs):
            return None if any(x is None for x in xs) else fn(*xs)

        if op == "add":
            return f(lambda a, b: a + b, bs[0][0], bs[1][0]), f(lambda a, b: a + b, bs[0][1], bs[1][1])
        if op == "sub":
            return f(lambda a, b: a - b, bs[0][0], bs[1][1]), f(lambda a, b: a - b, bs[0][1], bs[1][0])
        if op == "neg":
            return f(lambda a: -a, bs[0][1]), f(lambda a: -a, bs[0][0])
        if op == "mul":
            (a0, a1), (b0, b1) = bs
            if None in (a0, a1, b0, b1):
                if a0 is not None and b0 is not None and a0 >= 0 and b0 >= 0:
                    return a0 * b0, None
                return None, None
            ps = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
            return min(ps), max(ps)
        if op in ("floordiv", "mod"):
            (a0, a1), (c0, c1) = bs
            if c0 is None or c0 != c1 or c0 <= 0:
                return (None, None) if op == "floordiv" else ((0, None) if c0 is not None and c0 > 0 else (None, None))
            if op == "floordiv":
                return f(lambda a: a // c0, a0), f(lambda a: a // c0, a1)
            if a0 is not None and a1 is not None and a0 // c0 == a1 // c0:
                return a0 % c0, a1 % c0
            return 0, c0 - 1
        if op == "min":
            lo = None if any(b[0] is None for b in bs) else min(b[0] for b in bs)
            his = [b[1] for b in bs if b[1] is not None]
            return lo, (min(his) if his else None)
        if op == "max":
            los = [b[0] for b in bs if b[0] is not None]
            hi = None if any(b[1] is None for b in bs) else max(b[1] for b in bs)
            return (max(los) if los else None), hi
        if op == "abs":
            a0, a1 = bs[0]
            if a0 is not None and a0 >= 0:
                return a0, a1
            if a1 is not None and a1 <= 0:
                return -a1, f(lambda a: -a, a0)
            return 0, (None if a0 is None or a1 is None else max(-a0, a1))
        raise ValueError(op)

    # -- integers
    def c(self, v: int) -> Const:
        return Const(v if isinstance(v, size_tags.Sym) else int(v))

    def add(self, a: Expr, b: Expr) -> Expr:
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value + b.value)
        if isinstance(b, Const) and b.value == 0:
            return a
        if isinstance(a, Const) and a.value == 0:
            return b
        if isinstance(b, Const) and b.value < 0:
            return self.sub(a, self.c(-b.value))
        # (x + c1) + c2 -> x + (c1 + c2)
        if isinstance(b, Const) and isinstance(a, Op) and a.op in ("add", "sub") and isinstance(a.args[1], Const):
            c1 = a.args[1].value if a.op == "add" else -a.args[1].value
            return self.add(a.args[0], self.c(c1 + b.value))
        return Op("add", (a, b))

    def sub(self, a: Expr, b: Expr) -> Expr:
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value - b.value)
        if isinstance(b, Const) and b.value == 0:
            return a
        if a == b:
            return self.c(0)
        if isinstance(b, Const) and b.value < 0:
            return self.add(a, self.c(-b.value))
        if isinstance(b, Const) and isinstance(a, Op) and a.op in ("add", "sub") and isinstance(a.args[1], Const):
            c1 = a.args[1].value if a.op == "add" else -a.args[1].value
            return self.add(a.args[0], self.c(c1 - b.value))
        return Op("sub", (a, b))

    def mul(self, a: Expr, b: Expr) -> Expr:
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value * b.value)
        for x, y in ((a, b), (b, a)):
            if isinstance(x, Const) and x.value == 1:
                return y
            if isinstance(x, Const) and x.value == 0:
                return self.c(0)
        return Op("mul", (a, b))

    def floordiv(self, a: Expr, b: Expr) -> Expr:
        if isinstance(b, Const) and b.value == 0:
            raise ZeroDivisionError
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value // b.value)
        if isinstance(b, Const) and b.value == 1:
            return a
        lo, hi = self.bounds(a)
        if isinstance(b, Const) and b.value > 0 and lo is not None and hi is not None and lo // b.value == hi // b.value:
            return self.c(lo // b.value)
        split = self._split_multiple(a, b)
        if split is not None:
            return split[0]
        return Op("floordiv", (a, b))

    def _split_multiple(self, a: Expr, b: Expr) -> tuple[Expr, Expr] | None:
        """(a // c, a % c) when a = z * m + v with c dividing m and 0 <= v < c
        (for any integer z): the unravel of a ravel gives back its coordinates."""
        if not (isinstance(b, Const) and b.value > 0):
            return None
        c = b.value
        terms = [(a, self.c(0))]
        if isinstance(a, Op) and a.op == "add":
            terms = [(a.args[0], a.args[1]), (a.args[1], a.args[0])]
        for u, v in terms:
            if not (isinstance(u, Op) and u.op == "mul"):
                continue
            z, m = u.args if isinstance(u.args[1], Const) else u.args[::-1]
            if not isinstance(m, Const) or m.value % c:
                continue
            lo, hi = self.bounds(v)
            if lo is not None and hi is not None and lo >= 0 and hi < c:
                return self.mul(z, self.c(m.value // c)), v
        return None

    def mod(self, a: Expr, b: Expr) -> Expr:
        if isinstance(b, Const) and b.value == 0:
            raise ZeroDivisionError
        if isinstance(a, Const) and isinstance(b, Const):
            return self.c(a.value % b.value)
        if isinstance(b, Const) and b.value == 1:
            return self.c(0)
        lo, hi = self.bounds(a)
        if isinstance(b, Const) and b.value > 0 and lo is not None and hi is not None and lo // b.value == hi // b.value:
            return self.sub(a, self.c(lo // b.value * b.value))
        split = self._split_multiple(a, b)
        if split is not None:
            return split[1]
        return Op("mod", (a, b))

    def minimum(self, a: Expr, b: Expr) -> Expr:
        (a0, a1), (b0, b1) = self.bounds(a), self.bounds(b)
        if a1 is not None and b0 is not None and a1 <= b0:
            return a
        if b1 is not None and a0 is not None and b1 <= a0:
            return b
        return Op("min", (a, b))

    def maximum(self, a: Expr, b: Expr) -> Expr:
        (a0, a1), (b0, b1) = self.bounds(a), self.bounds(b)
        if a0 is not None and b1 is not None and a0 >= b1:
            return a
        if b0 is not None and a1 is not None and b0 >= a1:
            return b
        return Op("max", (a, b))

    def clamp(self, a: Expr, lo: int, hi: int) -> Expr:
        return self.minimum(self.maximum(a, self.c(lo)), self.c(hi))

    def neg(self, a: Expr) -> Expr:
        if isinstance(a, Const):
            return self.c(-a.value)
        return Op("neg", (a,))

    def abs(self, a: Expr) -> Expr:
        lo, hi = self.bounds(a)
        if lo is not None and lo >= 0:
            return a
        return Op("abs", (a,))

    # -- comparisons
    def cmp(self, op: str, a: Expr, b: Expr) -> Expr:
        (a0, a1), (b0, b1) = self.bounds(a), self.bounds(b)
        known = None not in (a0, a1, b0, b1)
        decide = {
            "lt": (a1 is not None and b0 is not None and a1 < b0, a0 is not None and b1 is not None and a0 >= b1),
            "le": (a1 is not None and b0 is not None and a1 <= b0, a0 is not None and b1 is not None and a0 > b1),
            "gt": (a0 is not None and b1 is not None and a0 > b1, a1 is not None and b0 is not None and a1 <= b0),
            "ge": (a0 is not None and b1 is not None and a0 >= b1, a1 is not None and b0 is not None and a1 < b0),
            "eq": (known and a0 == a1 == b0 == b1, (a1 is not None and b0 is not None and a1 < b0)
                   or (a0 is not None and b1 is not None and a0 > b1)),
        }
        decide["ne"] = (decide["eq"][1], decide["eq"][0])
        yes, no = decide[op]
        if yes:
            return Const(True)
        if no:
            return Const(False)
        return Op(op, (a, b))

    def lt(self, a, b):
        return self.cmp("lt", a, b)

    def le(self, a, b):
        return self.cmp("le", a, b)

    def ge(self, a, b):
        return self.cmp("ge", a, b)

    def eq(self, a, b):
        return self.cmp("eq", a, b)

    # -- booleans
    def _logic(self, op: str, parts) -> Expr:
        unit, zero = (True, False) if op == "and" else (False, True)
        out: list[Expr] = []
        for p in parts:
            items = p.args if isinstance(p, Op) and p.op == op else (p,)
            for x in items:
                if isinstance(x, Const):
                    if bool(x.value) == zero:
                        return Const(zero)
                    continue
                if x not in out:
                    out.append(x)
        if not out:
            return Const(unit)
        return out[0] if len(out) == 1 else Op(op, tuple(out))

    def and_(self, *parts: Expr) -> Expr:
        return self._logic("and", parts)

    def or_(self, *parts: Expr) -> Expr:
        return self._logic("or", parts)

    def not_(self, a: Expr) -> Expr:
        if isinstance(a, Const):
            return Const(not a.value)
        if isinstance(a, Op) and a.op == "not":
            return a.args[0]
        if isinstance(a, Op) and a.op in COMPARE:
            flip = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}[a.op]
            return Op(flip, a.args)
        return Op("not", (a,))

    def in_range(self, x: Expr, lo: int, hi: int, step: int = 1) -> Expr:
        """lo <= x < hi and (x - lo) % step == 0."""
        cond = self.and_(self.ge(x, self.c(lo)), self.lt(x, self.c(hi)))
        if step != 1:
            cond = self.and_(cond, self.eq(self.mod(self.sub(x, self.c(lo)), self.c(step)), self.c(0)))
        return cond

    def in_items(self, x: Expr, items) -> Expr:
        """x in a finite set, written as runs `lo <= x < hi` and equalities."""
        vals = sorted(set(items), key=int)  # (the items themselves: size-tagged ones keep their expressions)
        runs, i = [], 0
        while i < len(vals):
            j = i
            while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
                j += 1
            runs.append((vals[i], vals[j] + 1))
            i = j + 1
        return self.or_(*[self.eq(x, self.c(a)) if b == a + 1 else self.in_range(x, a, b) for a, b in runs])


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


@dataclass(frozen=True)
class Lowered:
    """A bound pattern's mask as one expression of (q, k, h, b).

    `expr` is True where query row `q` (0..M-1) of head `h` may attend key `k`
    (0..N-1) in batch element `b`. `tables` are the tensors it reads. Use
    `evaluator(inputs)` for a torch function and `triton_mask_source(low)`
    for kernel source.
    """

    name: str
    text: str  # canonical IR text of the bound pattern
    M: int
    N: int
    H: int
    grid: tuple[int, ...] | None
    expr: Expr
    tables: tuple[Table, ...]
    var_bounds: tuple[tuple[str, tuple[int | None, int | None]], ...]
    #: N-D tiles (see `permute`): ((query tile shape), (key tile shape)); then `q` / `k` are
    #: positions of the padded tile-major order and M / N its padded lengths
    tiles: tuple | None = None

    def uses(self, name: str) -> bool:
        """Whether the expression reads variable `name` ("q", "k", "h", "b")."""
        return any(isinstance(e, Var) and e.name == name for e in nodes(self.expr))

    def table_tensors(self, inputs: dict | None = None, device=None) -> dict[str, torch.Tensor]:
        """Every table as a contiguous int32 tensor (run-time inputs converted
        from the op's `inputs`: segment ids [B, N], block tables [B, H|1, nqb, kmax])."""
        out = {}
        for t in self.tables:
            if t.data is not None:
                data = t.data
            else:
                raw = (inputs or {}).get(t.source)
                if raw is None:
                    raise ValueError(f"missing run-time input '{t.source}': expected {t.source}=tensor; "
                                     f"try passing {t.source}=... to the op")
                data = _input_table(t, raw)
            out[t.name] = data.to(device=device or data.device, dtype=torch.int32).contiguous()
        return out

    def evaluator(self, inputs: dict | None = None, device=None):
        """A torch function `fn(q, k, h, b=None) -> bool tensor` of the mask.

        Arguments are integer tensors (or ints) that broadcast together; the
        result has their broadcast shape. Made only of elementwise torch ops and
        table indexing, with no data-dependent Python control flow, so it works
        under `torch.vmap` and as a FlexAttention `mask_mod` (argument order
        differs: use `lambda b, h, q, k: fn(q, k, h, b)`). `b` is needed only
        when the pattern has run-time inputs (and defaults to 0).

        >>> low = lower(attnc.loads("pattern p = sliding(2)").pattern().ir, 4, 4, 1)
        >>> fn = low.evaluator()
        >>> fn(torch.arange(4)[:, None], torch.arange(4)[None, :], 0).int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
        """
        tables = self.table_tensors(inputs, device)
        program = torch_program(self.expr)  # [Note: torch program]

        def fn(q, k, h, b=None):
            env = {"q": _as_tensor(q, device), "k": _as_tensor(k, device), "h": _as_tensor(h, device),
                   "b": _as_tensor(0 if b is None else b, device)}
            out = run_torch_program(program, env, tables)
            if not isinstance(out, torch.Tensor):
                shape = torch.broadcast_shapes(env["q"].shape, env["k"].shape, env["h"].shape)
                return torch.full(shape, bool(out), dtype=torch.bool, device=env["q"].device)
            shape = torch.broadcast_shapes(out.shape, env["q"].shape, env["k"].shape, env["h"].shape)
            # no expand when nothing broadcasts: inductor's FlexAttention lowering rejects a no-op expand
            return out if out.shape == shape else out.expand(shape)

        return fn


def _as_tensor(x, device):
    if isinstance(x, torch.Tensor):
        return x.long() if x.dtype not in (torch.int32, torch.int64) else x
    return torch.tensor(int(x), dtype=torch.int64, device=device)


def dense_ranks(ids: torch.Tensor) -> torch.Tensor:
    """int64 [B, n] segment ids -> their dense ranks per row (0 .. distinct - 1), int64.

    [Note: exact ids] The tables the mask reads are int32 (Triton, the torch
    evaluator), but segment ids are any int64 (hashes, 2**40, negative ones).
    `same` only compares ids of one batch element, so replacing each row's ids by
    their rank among the row's distinct ids keeps every equality and inequality
    exactly, and ranks are < n, which int32 holds. Narrowing the ids themselves
    would make 0 and 2**32 the same document.
    """
    if ids.numel() == 0:
        return ids
    srt, order = torch.sort(ids, dim=-1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[..., 1:] = srt[..., 1:] != srt[..., :-1]
    ranks = torch.cumsum(new.to(torch.int64), dim=-1) - 1
    return torch.empty_like(ranks).scatter_(-1, order, ranks)


def _input_table(t: Table, raw: torch.Tensor) -> torch.Tensor:
    raw = raw.to(torch.int64)
    if t.kind == "segments":
        return dense_ranks(raw[None] if raw.dim() == 1 else raw)
    # blocks: [B, Hs, nqb, kmax] of key-block ids (-1 = none) -> bitsets [B, Hs, nqb, words]
    if raw.dim() == 3:
        raw = raw[None]
    B, Hs, nqb, _ = raw.shape
    nkb = t.shape[-1] * 32
    hits = torch.zeros(B, Hs, nqb, nkb + 1, dtype=torch.bool, device=raw.device)
    hits.scatter_(3, torch.where(raw < 0, nkb, raw.clamp(max=nkb)), True)
    return pack_bits(hits[..., :nkb])


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> int32 [..., ceil(n / 32)], bit j of word w is element 32 w + j."""
    n = bits.shape[-1]
    words = -(-n // 32)
    pad = torch.zeros(*bits.shape[:-1], words * 32, dtype=torch.int64, device=bits.device)
    pad[..., :n] = bits.to(torch.int64)
    weights = (torch.ones(32, dtype=torch.int64, device=bits.device) << torch.arange(32, device=bits.device))
    packed = (pad.view(*bits.shape[:-1], words, 32) * weights).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def nodes(e: Expr):
    """Every distinct node of `e`, children first."""
    seen: dict[Expr, None] = {}

    def visit(x):
        if x in seen:
            return
        if isinstance(x, Op):
            for a in x.args:
                visit(a)
        elif isinstance(x, Lookup):
            for a in x.index:
                visit(a)
            if x.bit is not None:
                visit(x.bit)
        seen[x] = None

    visit(e)
    return list(seen)


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
            pred = semantics.predicate(parts)
            return Const(False) if pred is None else self.pos(pred, view)[0]
        return getattr(self, "lw_" + type(node).__name__.rstrip("_"))(node, view)

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
        from attnc.reference import _component
        parts = [self.eval(_component(node, i), self.axis_view(view, a)) for i, a in enumerate(view.axes)]
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
            name = f"random{len(self._random)}"  # internal: never `in_...` ([Note: table names])
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

    # -- combinators
    def lw_Union(self, node, view):
        return self.b.or_(*[self.eval(p, view) for p in node.parts])

    def lw_Inter(self, node, view):
        return self.b.and_(*[self.eval(p, view) for p in node.parts])

    def lw_Diff(self, node, view):
        return self.b.and_(self.eval(node.left, view), self.b.not_(self.eval(node.right, view)))

    def lw_Not(self, node, view):
        return self.b.not_(self.eval(node.operand, view))

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
        bs = [self.val(_pick(node.b, i), view.env) for i in range(len(view.axes))]
        sizes = [-(-view.env[ir.axis_size(a)] // x) for a, x in zip(view.axes, bs)]
        env = {**view.env, **{ir.axis_size(a): s for a, s in zip(view.axes, sizes)}}
        env[ir.N] = env[ir.M] = math.prod(sizes)
        qc = {a: b.floordiv(view.qc[a], b.c(x)) for a, x in zip(view.axes, bs)}
        kc = {a: b.floordiv(view.kc[a], b.c(x)) for a, x in zip(view.axes, bs)}
        qpos = torch.unique(_ravel([view.qcpos[a] // x for a, x in zip(view.axes, bs)], sizes))
        sub = PView(q=self.ravel([qc[a] for a in view.axes], sizes), k=self.ravel([kc[a] for a in view.axes], sizes),
                    env=env, qpos=qpos, axes=view.axes, qc=qc, kc=kc,
                    qcpos=dict(zip(view.axes, _unravel(qpos, sizes))))
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
        ds = [self.val(_pick(node.d, i), view.env) for i in range(len(view.axes))]
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
                        env=env, qpos=_ravel([qcpos[a] for a in view.axes], sizes), axes=view.axes, qc=qc, kc=kc,
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
        view.qc = dict(zip(layout.axes, _unravel_expr(b, qg, sizes)))
        view.kc = dict(zip(layout.axes, _unravel_expr(b, kg, sizes)))
        view.qcpos = dict(zip(layout.axes, _unravel((qpos - T).clamp(min=0), sizes)))
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
    return Lowered(name=pattern.name, text=ir.pattern_text(pattern), M=int(M), N=int(N), H=H,
                   grid=None if grid is None else tuple(int(g) for g in grid), expr=expr,
                   tables=tables, var_bounds=tuple(sorted(var_bounds.items())))


def permute(low: Lowered, tile_q: tuple[int, ...], tile_k: tuple[int, ...]) -> Lowered:
    """The mask of a pure-grid pattern in the padded tile-major token order of N-D tiles.

    [Note: N-D tiles] Every grid axis is padded to a multiple of the tile's extent
    on it, so every tile is full size: tile t holds positions t * BLOCK .. (t + 1)
    * BLOCK - 1 (BLOCK = prod(tile)), tiles row-major over the tile grid, tokens
    row-major inside a tile (the plan's `tile_major` order, plus the padding).
    The returned expression is `low.expr` with `q` and `k` replaced by

        p -> (p // BLOCK, p % BLOCK) -> (tile coords, coords in the tile)
          -> x_i = tile_i * t_i + r_i -> flat index ravel(min(x_i, L_i - 1))

    and'ed with `x_i < L_i` on every axis (padded positions are never allowed;
    the clamp keeps table lookups in range). The builder's ravel/unravel folding
    turns the original `flat // L` and `flat % L` back into the coordinates, so
    the kernel computes grid coordinates once per position. M / N become the
    padded lengths; `tables` and `h`, `b` are unchanged.

    >>> low = lower(attnc.loads("pattern p on grid(y, x) = neighborhood(3)").pattern().ir, 36, 36, 1, (6, 6))
    >>> permute(low, (4, 4), (4, 4)).M
    64
    """
    if not low.grid or low.M != low.N or low.tiles is not None:
        raise ValueError(f"permute: expected a pattern lowered on a pure grid with M = N, got grid={low.grid}, "
                         f"M={low.M}, N={low.N}")
    sizes = [int(s) for s in low.grid]
    for name, t in (("query", tile_q), ("key", tile_k)):
        if len(t) != len(sizes):
            raise ValueError(f"permute: expected a {name} tile of {len(sizes)} sizes (one per grid axis), got {t!r}")
    Mp, Np = padded_length(sizes, tile_q), padded_length(sizes, tile_k)
    bounds = dict(low.var_bounds)
    bounds.update(q=(0, Mp - 1), k=(0, Np - 1))
    b = Builder(bounds)
    q_flat, q_ok = _tile_major_position(b, Var("q"), sizes, tile_q)
    k_flat, k_ok = _tile_major_position(b, Var("k"), sizes, tile_k)
    expr = b.and_(q_ok, k_ok, substitute(b, low.expr, {"q": q_flat, "k": k_flat}))
    return Lowered(name=low.name, text=low.text, M=Mp, N=Np, H=low.H, grid=low.grid, expr=expr, tables=low.tables,
                   var_bounds=tuple(sorted(bounds.items())), tiles=(tuple(tile_q), tuple(tile_k)))


def padded_length(sizes, tile) -> int:
    """Tokens of the padded tile-major order: every axis rounded up to a multiple of its tile extent."""
    return math.prod(-(-int(L) // t) * t for L, t in zip(sizes, tile))


def _tile_major_position(b: Builder, p: Expr, sizes: list[int], tile) -> tuple[Expr, Expr]:
    """(flat grid index, valid) of position `p` of the padded tile-major order (see `permute`)."""
    counts = [-(-L // t) for L, t in zip(sizes, tile)]
    block = math.prod(tile)
    tcoords = _unravel_expr(b, b.floordiv(p, b.c(block)), counts)
    rcoords = _unravel_expr(b, b.mod(p, b.c(block)), list(tile))
    xs = [b.add(b.mul(tc, b.c(t)), rc) for tc, t, rc in zip(tcoords, tile, rcoords)]
    valid = b.and_(*[b.lt(x, b.c(L)) for x, L in zip(xs, sizes)])
    flat = b.minimum(xs[0], b.c(sizes[0] - 1))
    for x, L in zip(xs[1:], sizes[1:]):
        flat = b.add(b.mul(flat, b.c(L)), b.minimum(x, b.c(L - 1)))
    return flat, valid


_REBUILD = {
    "add": Builder.add, "sub": Builder.sub, "mul": Builder.mul, "floordiv": Builder.floordiv, "mod": Builder.mod,
    "min": Builder.minimum, "max": Builder.maximum, "neg": Builder.neg, "abs": Builder.abs,
    "and": Builder.and_, "or": Builder.or_, "not": Builder.not_,
}


def substitute(b: Builder, e: Expr, env: dict[str, Expr]) -> Expr:
    """`e` with variables replaced by expressions, rebuilt through `b` (so it folds
    again under b's variable ranges)."""
    memo: dict[Expr, Expr] = {}

    def go(x: Expr) -> Expr:
        got = memo.get(x)
        if got is not None:
            return got
        if isinstance(x, Var):
            r = env.get(x.name, x)
        elif isinstance(x, Const):
            r = x
        elif isinstance(x, Lookup):
            r = Lookup(x.table, tuple(go(i) for i in x.index), None if x.bit is None else go(x.bit))
        elif x.op in COMPARE:
            r = b.cmp(x.op, go(x.args[0]), go(x.args[1]))
        else:
            r = _REBUILD[x.op](b, *[go(a) for a in x.args])
        memo[x] = r
        return r

    return go(e)


def _unravel_expr(b: Builder, flat: Expr, sizes: list[int]) -> list[Expr]:
    out, rem = [], flat
    for i, s in enumerate(reversed(sizes)):
        last = i == len(sizes) - 1
        out.append(rem if last else b.mod(rem, b.c(s)))
        rem = b.floordiv(rem, b.c(s))
    return list(reversed(out))


# ----------------------------------------------------------------------------- the torch evaluator


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


# ----------------------------------------------------------------------------- text (for docs, headers and errors)

_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "add": 5, "sub": 5, "mul": 6, "floordiv": 6, "mod": 6, "neg": 7}
_INFIX = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%"}


def to_text(e: Expr, env: dict | None = None) -> str:
    """A one-line, Python-like rendering of an expression (not Triton); with `env`
    (sizes.size_env), size-tagged constants read as expressions of M, N, G0, ..."""
    def go(x, parent_prec=0):
        if isinstance(x, Var):
            return x.name
        if isinstance(x, Const):
            return str(x.value) if isinstance(x.value, bool) else size_tags.text(x.value, env, 9)
        if isinstance(x, Lookup):
            s = f"{x.table}[{', '.join(go(i) for i in x.index)}]"
            return s if x.bit is None else f"bit({s}, {go(x.bit)})"
        op = x.op
        if op in ("and", "or"):
            s = f" {op} ".join(go(a, _PREC[op] + 1) for a in x.args)
            prec = _PREC[op]
        elif op == "not":
            s, prec = f"not {go(x.args[0], _PREC['not'])}", _PREC["not"]
        elif op in COMPARE:
            s, prec = f"{go(x.args[0], 5)} {COMPARE[op]} {go(x.args[1], 5)}", _PREC["cmp"]
        elif op in _INFIX:
            prec = _PREC[op]
            s = f"{go(x.args[0], prec)} {_INFIX[op]} {go(x.args[1], prec + 1)}"
        elif op == "neg":
            s, prec = f"-{go(x.args[0], 8)}", _PREC["neg"]
        else:
            s, prec = f"{op}({', '.join(go(a) for a in x.args)})", 9
        return f"({s})" if prec < parent_prec or (prec == parent_prec and op in ("and", "or") and parent_prec) else s

    return go(e)


# ----------------------------------------------------------------------------- the Triton printer

#: Python operator precedences (higher binds tighter): `&` / `|` bind tighter
#: than comparisons, so comparisons inside them are parenthesised.
_TL_PREC = {"or": 7, "and": 9, "cmp": 5, "add": 12, "sub": 12, "mul": 13, "floordiv": 13, "mod": 13,
            "neg": 14, "not": 14, "atom": 100}
_TL_BOOL = {"and": " & ", "or": " | "}


class TritonPrinter:
    """Prints a `Lowered` mask as the body of a `@triton.jit` function
    `_mask(q, k, h, b, <table pointers>)`: one temporary per shared
    subexpression, Python floor semantics where operands may be negative."""

    def __init__(self, low: Lowered):
        self.low = low
        #: the sizes size-tagged constants are checked against ([Note: one text, many sizes]);
        #: None (N-D tiles: positions of the padded tile-major order) prints literals
        self.env = None if low.tiles is not None else size_tags.size_env(low.M, low.N, low.grid)
        self.builder = Builder(dict(low.var_bounds))
        self.tables = {t.name: t for t in low.tables}
        self.helpers: set[str] = set()

    def nonneg(self, e: Expr) -> bool:
        lo, _ = self.builder.bounds(e)
        return lo is not None and lo >= 0

    def lines(self) -> tuple[list[str], str]:
        """(statements, final expression)."""
        expr = self.low.expr
        refs: dict[Expr, int] = {}
        order = nodes(expr)
        for n in order:
            for c in _children(n):
                refs[c] = refs.get(c, 0) + 1
        text: dict[Expr, tuple[str, int]] = {}
        out: list[str] = []
        for n in order:
            t = self.render(n, text)
            composite = isinstance(n, (Op, Lookup)) and not (isinstance(n, Op) and n.op == "neg")
            long_part = len(t[0]) > 72 and refs.get(n, 0) >= 1
            if n is not expr and composite and (refs.get(n, 0) > 1 or long_part):
                name = f"t{len([1 for s in out])}"
                out.append(f"{name} = {t[0]}")
                t = (name, _TL_PREC["atom"])
            text[n] = t
        return out, text[expr][0]

    def render(self, n: Expr, text) -> tuple[str, int]:
        def sub(c, need, strict=False):
            s, p = text[c]
            return f"({s})" if p < need or (strict and p == need) else s

        if isinstance(n, Var):
            return n.name, _TL_PREC["atom"]
        if isinstance(n, Const):
            v = n.value
            if isinstance(v, bool):
                return str(v), _TL_PREC["atom"]
            s = size_tags.text(v, self.env)
            if s.lstrip("-").isdigit():  # a literal
                return s, (_TL_PREC["atom"] if v >= 0 else _TL_PREC["neg"])
            return (s if s.isidentifier() else f"({s})"), _TL_PREC["atom"]
        if isinstance(n, Lookup):
            t = self.tables[n.table]
            strides = t.strides()
            terms = []
            idx = list(n.index)
            if t.batched:
                terms.append(f"b * {size_tags.text(_product(t.shape), self.env, 2)}")
                idx = idx[1:]
            for i, s in zip(idx, strides):
                if isinstance(i, Const) and i.value == 0:
                    continue
                terms.append(sub(i, _TL_PREC["mul"]) + (f" * {size_tags.text(s, self.env, 3)}" if s != 1 else ""))
            load = f"tl.load({_table_arg(n.table)} + {' + '.join(terms) or '0'})"
            if n.bit is None:
                return load, _TL_PREC["atom"]
            return f"((({load}) >> {sub(n.bit, _TL_PREC['atom'])}) & 1) != 0", _TL_PREC["cmp"]
        op = n.op
        a = n.args
        if op in _TL_BOOL:
            need = _TL_PREC[op] + (1 if op == "or" else 0)
            return _TL_BOOL[op].join(sub(x, need + (3 if op == "or" else 0)) for x in a), _TL_PREC[op]
        if op == "not":
            return f"~{sub(a[0], _TL_PREC['atom'])}", _TL_PREC["not"]
        if op in COMPARE:
            return f"{sub(a[0], _TL_PREC['cmp'] + 1)} {COMPARE[op]} {sub(a[1], _TL_PREC['cmp'] + 1)}", _TL_PREC["cmp"]
        if op in ("floordiv", "mod"):
            c = a[1]
            if self.nonneg(a[0]) and isinstance(c, Const) and c.value > 0:
                p = _TL_PREC[op]
                return f"{sub(a[0], p)} {_INFIX[op]} {sub(c, p, strict=True)}", p
            helper = "_floordiv" if op == "floordiv" else "_floormod"
            self.helpers.add(helper)
            return f"{helper}({text[a[0]][0]}, {text[a[1]][0]})", _TL_PREC["atom"]
        if op in ("add", "sub", "mul"):
            p = _TL_PREC[op]
            return f"{sub(a[0], p)} {_INFIX[op]} {sub(a[1], p, strict=op != 'add' and op != 'mul')}", p
        if op == "neg":
            return f"-{sub(a[0], _TL_PREC['neg'])}", _TL_PREC["neg"]
        if op in ("min", "max"):
            return f"tl.{op}imum({text[a[0]][0]}, {text[a[1]][0]})", _TL_PREC["atom"]
        if op == "abs":
            return f"tl.abs({text[a[0]][0]})", _TL_PREC["atom"]
        raise ValueError(op)

    def source(self) -> str:
        """The `_mask` function (and the floor-division helpers it calls)."""
        low = self.low
        args = ", ".join(["q", "k", "h", "b", *mask_size_args(low)] + [_table_arg(t.name) for t in low.tables])
        doc = [f'    """{low.name}: True where query row q may attend key k (head h, batch b).',
               "",
               "    q, k are clamped into [0, M) and [0, N) by the caller; they broadcast",
               '    ([BLOCK_M, 1] and [1, BLOCK_N] in the forward kernel, transposed in dK/dV)."""']
        if isinstance(low.expr, Const):
            body = ["# the pattern allows every pair" if low.expr.value else "# the pattern allows no pair",
                    f"return {'(q >= 0) & (k >= 0)' if low.expr.value else '(q < 0) & (k < 0)'}"]
        else:
            stmts, final = self.lines()
            body = stmts + [f"return {final}"]
        fn = ["@triton.jit", f"def _mask({args}):", *doc, *("    " + s for s in body)]
        return "\n".join(helper_lines(self.helpers) + fn) + "\n"


#: the floor-division helpers printed expressions call (Triton's // and % truncate toward zero)
_FLOOR_HELPERS = {
    "_floordiv": ["@triton.jit", "def _floordiv(a, b):",
                  '    """Python\'s a // b (Triton\'s // truncates toward zero)."""',
                  "    q = a // b",
                  "    return tl.where((a % b != 0) & ((a < 0) != (b < 0)), q - 1, q)", "", ""],
    "_floormod": ["@triton.jit", "def _floormod(a, b):",
                  '    """Python\'s a % b (the sign of b; Triton\'s % takes the sign of a)."""',
                  "    r = a % b",
                  "    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)", "", ""],
}


def helper_lines(names, defined: str = "") -> list[str]:
    """Source lines of the floor-division helpers in `names` that `defined` (module text
    printed already) does not define yet."""
    return [line for name in ("_floordiv", "_floormod") if name in names and f"def {name}(" not in defined
            for line in _FLOOR_HELPERS[name]]


def _table_arg(name: str) -> str:
    return f"tbl_{name}"


def mask_size_args(low: Lowered) -> tuple[str, ...]:
    """The run-time sizes `_mask` takes after (q, k, h, b): M, N and one per grid axis
    (size-tagged constants print as expressions of them)."""
    return ("M", "N", *size_tags.size_args(len(low.grid or ())))


def _product(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


def _children(n: Expr) -> tuple[Expr, ...]:
    if isinstance(n, Op):
        return n.args
    if isinstance(n, Lookup):
        return n.index + ((n.bit,) if n.bit is not None else ())
    return ()


def triton_mask_source(low: Lowered) -> str:
    """Triton source of `_mask(q, k, h, b, tbl_...)` for a lowered pattern."""
    return TritonPrinter(low).source()
