"""The meaning of every positional primitive, declared once.

input:  a primitive's IR node (1-D: on grids, the per-axis component).
output: its allowed keys per query as `Keys` -- progressions whose ends are
        `ir.PExpr` expressions of the query position `q`, the view length `N`
        and the node's parameters -- and the boolean combinators over any
        consumer's set `Algebra` (`COMBINATORS`).
does not: evaluate anything. The consumers interpret these expressions: the
        dense reference and the Triton lowering evaluate the progressions as one
        pointwise condition (predicates.py; reference.py, codegen/pointwise.py), the interval analysis evaluates
        the ends over tensors of queries (intervals.py), the loop bounds
        translate them into monotone range expressions (codegen/range_derivation.py) and
        the density formulas into piecewise-linear functions of q
        (symbolic.py).

[Note: one definition] A positional primitive allows, for each query q, the
keys of a few *progressions*

    lo(q), lo(q) + step, lo(q) + 2 step, ...  below hi(q),   for the queries where when(q) holds

(step absent: every key of [lo, hi); when absent: every query). Ends may fall
outside [0, N): every consumer clips to the keys that exist. Progressions are
the shape the analyses need: an interval is one closed form for the plan, the
loop bounds and the formula, and the residue structure of dilation and
strides stays visible (a consumer that needs intervals enumerates a short
progression, or says it cannot). `where`, `random` and the run-time inputs are
not primitives here; the combinators are below ([Note: combinators]).

Adding a primitive is one decorated function below -- its name, signature and
argument constraints in `@defines`, its keys in the body -- plus its IR node
and its tests: the parser, the checks, the reference mask, the plan, the
kernels' predicate and loop bounds, the formula and KV retention all follow.
Where a consumer cannot use a form (bounds: a step or a decreasing end;
formulas: `//` or `%` of q), it reports why, in one place each
(`range_derivation.Derivation.monotone`, `symbolic.FormulaBuilder.pl`).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import sympy

from . import ir

# ----------------------------------------------------------------------------- terms

#: the query position (absolute, in the view) and the key position
Q = ir.PVar(name="q")
K = ir.PVar(name="k")
#: the view's length (N of the view: the axis length on a grid axis)
LENGTH = ir.PConst(value=ir.N)


def const(v) -> ir.PExpr:
    """A parameter or literal as a term."""
    return v if isinstance(v, ir.PNode) else ir.PConst(value=v)


def literal(e: ir.PExpr) -> int | None:
    """The integer a term is, when it is a literal (not a parameter or size)."""
    if isinstance(e, ir.PConst) and not isinstance(e.value, bool):
        v = e.value
        if isinstance(v, int) or (isinstance(v, sympy.Integer)):
            return int(v)
    return None


#: the integer operators of `where` terms on Python ints (floor semantics, as the language's)
INT_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod,
           "**": operator.pow}


def _bin(op: str, a, b) -> ir.PExpr:
    a, b = const(a), const(b)
    x, y = literal(a), literal(b)
    if x is not None and y is not None and not (op in ("//", "%") and y == 0):
        return ir.PConst(value=INT_OPS[op](x, y))
    if op in ("+", "-") and y == 0:
        return a
    if op == "+" and x == 0:
        return b
    if op == "*" and (y == 1 or x == 1):
        return a if y == 1 else b
    if op == "//" and y == 1:
        return a
    if op == "%" and y == 1:
        return ir.PConst(value=0)
    return ir.PBin(op=op, left=a, right=b)


def add(a, b) -> ir.PExpr:
    return _bin("+", a, b)


def sub(a, b) -> ir.PExpr:
    return _bin("-", a, b)


def mul(a, b) -> ir.PExpr:
    return _bin("*", a, b)


def floordiv(a, b) -> ir.PExpr:
    return _bin("//", a, b)


def mod(a, b) -> ir.PExpr:
    return _bin("%", a, b)


def minimum(a, b) -> ir.PExpr:
    return ir.PCall(func="min", args=(const(a), const(b)))


def maximum(a, b) -> ir.PExpr:
    return ir.PCall(func="max", args=(const(a), const(b)))


def less(a, b) -> ir.PExpr:
    return ir.PCmp(ops=("<",), operands=(const(a), const(b)))


def member(x, s: ir.SetVal) -> ir.PExpr:
    return ir.PIn(item=const(x), collection=s)


# ----------------------------------------------------------------------------- key sets


@dataclass(frozen=True)
class Keys:
    """Keys lo, lo + step, ... below hi, for the queries where `when` holds."""

    lo: ir.PExpr
    hi: ir.PExpr
    step: ir.PExpr | None = None  # None: every key of [lo, hi)
    when: ir.PExpr | None = None  # None: every query


Definition = Callable[[ir.Mask], tuple[Keys, ...]]

#: parameter kinds of a primitive's signature (elaborate.py checks calls against them)
INT, AXIS_INT, AXIS_BOOL, SET = "int", "axis-int", "axis-bool", "set"
REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class Primitive:
    """Everything the compiler knows about one positional primitive."""

    name: str  # the language name
    node: type  # its IR node; the parameters are its fields
    params: tuple  # ((name, kind, default or REQUIRED), ...)
    usage: str  # "neighborhood(size, dilation=1, stride=1, causal=false)"
    keys: Definition
    rules: tuple = ()  # ((parameter, predicate on one value, requirement), ...)
    relation: Callable | None = None  # (node, value_of) -> a violated requirement between parameters, or None
    length: Callable | None = None  # (node, view length, value_of) -> what the length lacks, or None


class _Index(Mapping):
    """A read-only view of a registry: `value(primitive)` under the registry's keys, for those
    primitives `value` gives something for (the other modules' tables, derived, never stored)."""

    def __init__(self, registry: dict, value: Callable):
        self._registry, self._value = registry, value

    def __getitem__(self, key):
        v = self._value(self._registry[key])
        if v is None:
            raise KeyError(key)
        return v

    def __iter__(self):
        return (k for k, p in self._registry.items() if self._value(p) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


PRIMITIVES: dict[str, Primitive] = {}  # by language name
BY_NODE: dict[type, Primitive] = {}  # by IR node
DEFINITIONS = _Index(BY_NODE, lambda p: p.keys)  # IR node -> its keys
RULES = _Index(BY_NODE, lambda p: list(p.rules) or None)  # IR node -> argument rules: constraints.py reads them
SIGNATURES = _Index(PRIMITIVES, lambda p: (list(p.params), p.usage))  # name -> (parameters, usage): elaborate
NODES = _Index(PRIMITIVES, lambda p: p.node)  # name -> IR node


def defines(node_type: type, usage: str, *params: tuple, rules=(), relation=None, length=None):
    """Register the decorated function as the definition of a primitive: its IR node, its
    call signature (`usage` names it; params are (name, kind) or (name, kind, default)), the
    constraints on its arguments, and its keys per query."""
    name = usage.split("(")[0]
    full = tuple(p if len(p) == 3 else (*p, REQUIRED) for p in params)

    def register(fn: Definition) -> Definition:
        PRIMITIVES[name] = BY_NODE[node_type] = Primitive(name, node_type, full, usage, fn, tuple(rules), relation,
                                                          length)
        return fn
    return register


def undefine(name: str) -> None:
    """Forget a primitive (tests that add one)."""
    BY_NODE.pop(PRIMITIVES.pop(name).node)


def keys_of(node: ir.Mask) -> tuple[Keys, ...] | None:
    """The node's allowed keys per query, or None when it is not a positional primitive."""
    prim = BY_NODE.get(type(node))
    return None if prim is None else prim.keys(node)


def relation_problem(node: ir.Mask, value_of) -> str | None:
    """A violated requirement between the primitive's arguments (None: none, or not known yet)."""
    prim = BY_NODE.get(type(node))
    return None if prim is None or prim.relation is None else prim.relation(node, value_of)


def length_problem(node: ir.Mask, length: int, value_of) -> str | None:
    """What the primitive needs of the view's length that it lacks (None: nothing);
    `value_of` gives a parameter's integer value."""
    prim = BY_NODE.get(type(node))
    return None if prim is None or prim.length is None else prim.length(node, length, value_of)


def _set_keys(s: ir.SetVal) -> tuple[Keys, ...]:
    """The keys of a constant token set: one progression for a range, one key per listed item."""
    if isinstance(s, ir.SetRange):
        step = const(s.step)
        return (Keys(const(s.start), const(s.stop), None if literal(step) == 1 else step),)
    return tuple(Keys(const(i), add(i, 1)) for i in s.items)


# ----------------------------------------------------------------------------- the primitives (spec §3)


@defines(ir.Full, "full")
def _full(node: ir.Full):
    return (Keys(const(0), LENGTH),)


@defines(ir.Empty, "none")
def _empty(node: ir.Empty):
    return ()


@defines(ir.Causal, "causal")
def _causal(node: ir.Causal):  # k <= q
    return (Keys(const(0), add(Q, 1)),)


@defines(ir.Band, "band(left, right)", ("left", AXIS_INT), ("right", AXIS_INT))
def _band(node: ir.Band):  # q - left <= k <= q + right
    return (Keys(sub(Q, node.left), add(add(Q, node.right), 1)),)


@defines(ir.Sliding, "sliding(w)", ("w", AXIS_INT), rules=[("w", lambda v: v >= 1, "sliding window w must be >= 1")])
def _sliding(node: ir.Sliding):  # q - w < k <= q
    return (Keys(add(sub(Q, node.w), 1), add(Q, 1)),)


@defines(ir.Sink, "sink(n)", ("n", INT), rules=[("n", lambda v: v >= 0, "sink count n must be >= 0")])
def _sink(node: ir.Sink):  # k < n
    return (Keys(const(0), const(node.n)),)


@defines(ir.Prefix, "prefix(n)", ("n", INT), rules=[("n", lambda v: v >= 0, "prefix length n must be >= 0")])
def _prefix(node: ir.Prefix):  # q < n and k < n
    return (Keys(const(0), const(node.n), when=less(Q, node.n)),)


@defines(ir.Rows, "rows(S)", ("tokens", SET))
def _rows(node: ir.Rows):  # q in S
    return (Keys(const(0), LENGTH, when=member(Q, node.tokens)),)


@defines(ir.Cols, "cols(S)", ("tokens", SET))
def _cols(node: ir.Cols):  # k in S
    return _set_keys(node.tokens)


@defines(ir.Global, "global(S)", ("tokens", SET))
def _global(node: ir.Global):  # q in S or k in S
    return _rows(node) + _cols(node)


@defines(ir.Block, "block(size, shift=0, halo=0)", ("size", AXIS_INT), ("shift", AXIS_INT, 0), ("halo", AXIS_INT, 0),
         rules=[("size", lambda v: v >= 1, "block size must be >= 1"), ("halo", lambda v: v >= 0, "block halo must be >= 0")])
def _block(node: ir.Block):
    # (q - shift) // size == (k - shift) // size, widened by halo on both sides
    start = add(mul(floordiv(sub(Q, node.shift), node.size), node.size), sub(node.shift, node.halo))
    return (Keys(start, add(start, add(node.size, mul(2, node.halo)))),)


@defines(ir.Strided, "strided(s)", ("s", AXIS_INT), rules=[("s", lambda v: v >= 1, "strided step s must be >= 1")])
def _strided(node: ir.Strided):  # (q - k) % s == 0
    return (Keys(mod(Q, node.s), LENGTH, const(node.s)),)


def _stride_within_size(node: ir.Neighborhood, value_of) -> str | None:
    sizes, strides = node.size, node.stride
    n = max((len(x) for x in (sizes, strides) if isinstance(x, tuple)), default=1)
    for i in range(n):
        s = value_of(sizes[i] if isinstance(sizes, tuple) else sizes)
        st = value_of(strides[i] if isinstance(strides, tuple) else strides)
        if s is not None and st is not None and st > s:
            return f"neighborhood stride must be <= size, got stride {st} > size {s}"
    return None


def _window_fits(node: ir.Neighborhood, length: int, value_of) -> str | None:
    size, d = value_of(node.size), value_of(node.dilation)
    if size * d > length:
        return f"neighborhood needs size * dilation <= length, got {size} * {d} > {length}"
    return None


@defines(ir.Neighborhood, "neighborhood(size, dilation=1, stride=1, causal=false)", ("size", AXIS_INT),
         ("dilation", AXIS_INT, 1), ("stride", AXIS_INT, 1), ("causal", AXIS_BOOL, False),
         rules=[("size", lambda v: v >= 2, "neighborhood size must be >= 2"),
                ("dilation", lambda v: v >= 1, "neighborhood dilation must be >= 1"),
                ("stride", lambda v: v >= 1, "neighborhood stride must be >= 1")],
         relation=_stride_within_size, length=_window_fits)
def _neighborhood(node: ir.Neighborhood):
    """NATTEN / GNA (spec §3.1): queries in dilation group g = q % d see the keys of
    their group whose group-local index k // d lies in [start, end)."""
    size, d, s = node.size, node.dilation, node.stride
    g, i = mod(Q, d), floordiv(Q, d)
    group_len = floordiv(add(sub(LENGTH, g), sub(d, 1)), d)  # ceil((N - g) / d)
    # the stride group's leader; with stride 1 every query leads its own window
    if literal(const(s)) == 1:
        leader = i
    else:
        last = add(mul(floordiv(i, s), s), floordiv(s, 2) if not node.causal else sub(s, 1))
        leader = minimum(last, sub(group_len, 1))
    if not node.causal:
        start = maximum(minimum(sub(leader, floordiv(size, 2)), sub(group_len, size)), 0)
        end = add(start, size)
    else:
        start = maximum(sub(leader, sub(size, 1)), 0)
        end = add(i, 1)
    if literal(const(d)) == 1:
        return (Keys(start, end),)
    return (Keys(add(mul(start, d), g), add(add(mul(sub(end, 1), d), g), 1), const(d)),)


# ----------------------------------------------------------------------------- properties of terms


def mentions(e: ir.PExpr, x: ir.PExpr) -> bool:
    """Whether term `x` (Q, LENGTH, ...) occurs in e."""
    if e == x:
        return True
    match e:
        case ir.PBin(left=a, right=b):
            return mentions(a, x) or mentions(b, x)
        case ir.PCall(args=args) | ir.PCmp(operands=args) | ir.PBool(parts=args):
            return any(mentions(a, x) for a in args)
        case ir.PNeg(operand=a) | ir.PNot(operand=a):
            return mentions(a, x)
        case ir.PIn(item=a):
            return mentions(a, x)
    return False


def non_decreasing(e: ir.PExpr, value_of) -> bool:
    """Whether e never decreases as q grows (proved from its form; `value_of` gives a
    constant term's integer value). False means "not proved", not "decreasing"."""
    if not mentions(e, Q):
        return True
    match e:
        case ir.PVar(name="q", axis=None):
            return True
        case ir.PCall(func="min" | "max", args=args):
            return all(non_decreasing(a, value_of) for a in args)
        case ir.PBin(op="+", left=a, right=b):
            return non_decreasing(a, value_of) and non_decreasing(b, value_of)
        case ir.PBin(op="-", left=a, right=b):
            return non_decreasing(a, value_of) and not mentions(b, Q)
        case ir.PBin(op="*" | "//" as op, left=a, right=b):
            if op == "*" and not mentions(a, Q):
                a, b = b, a
            return not mentions(b, Q) and value_of(b) >= (0 if op == "*" else 1) and non_decreasing(a, value_of)
    return False


# ----------------------------------------------------------------------------- as a pointwise condition


# ----------------------------------------------------------------------------- combinators


@dataclass(frozen=True)
class Algebra:
    """A consumer's sets, as the boolean combinators need them ([Note: combinators]).

    `union` and `intersect` take an iterator of one or more sets, produced lazily in
    the operands' order (a consumer may fold them without holding them all);
    `complement` takes one set. A consumer that over-approximates every complement by
    all keys (KV retention) gives `everything` instead: the complemented operand is
    then never evaluated."""

    union: Callable
    intersect: Callable
    complement: Callable | None = None
    everything: Callable | None = None  # () -> the set of all keys, for every complement

    def complement_of(self, s):
        """The complement of the set `s` (all keys when the algebra has `everything`)."""
        return self.everything() if self.everything is not None else self.complement(s)


def _complement(node: ir.Mask, sets: Callable, a: Algebra):
    """The complement of `node`'s set in `a` (without evaluating it when `a` has `everything`)."""
    return a.everything() if a.everything is not None else a.complement(sets(node))


def folding(op: Callable) -> Callable:
    """An n-ary `Algebra` operation from a binary one, folded left over the operands."""
    return lambda sets: functools.reduce(op, sets)


#: [Note: combinators] The boolean combinators, each defined once over any consumer's
#: `Algebra`: `a - b` is `a & ~b` here and nowhere else. The consumers give their sets'
#: union, intersection and complement: dense masks (`|`, `&`, `~`: reference.py), kernel
#: predicates (or / and / not: codegen/pointwise.py), interval sets (intervals.py), key
#: ranges (codegen/range_derivation.py), set expressions for the formulas (symbolic.py),
#: three-valued tile classes (full, nonempty) (tileboxes.py) and KV retention's kept
#: keys, where a complement keeps every key (retention.py). A new boolean combinator is
#: one entry here plus its IR node. The structural combinators (`@` along an axis,
#: `dilate`, `blockwise`, `heads`) change the view -- positions, sizes, which heads --
#: and each consumer's view is its own (tensors of positions, printed expressions,
#: tile boxes, range domains), so they stay with the views in each consumer.
COMBINATORS: dict[type, Callable] = {
    ir.Union_: lambda node, sets, a: a.union(sets(p) for p in node.parts),
    ir.Inter: lambda node, sets, a: a.intersect(sets(p) for p in node.parts),
    ir.Diff: lambda node, sets, a: a.intersect(iter((sets(node.left), _complement(node.right, sets, a)))),
    ir.Not: lambda node, sets, a: _complement(node.operand, sets, a),
}


def is_combinator(node: ir.Mask) -> bool:
    """Whether `node` is a boolean combinator (`combine` defines its set)."""
    return type(node) in COMBINATORS


def combine(node: ir.Mask, sets: Callable, algebra: Algebra):
    """The set of the boolean combinator `node` in `algebra`, from its operands' sets
    (`sets(child)`, called once per operand, in order)."""
    return COMBINATORS[type(node)](node, sets, algebra)

