"""The resolved, typed IR of attention patterns.

input:  produced by elaborate.py from the AST.
output: frozen nodes (structural equality and hashing), each with a `span`;
        integers are sympy expressions over the size symbols M, N, H,
        size(axis) and the pattern's integer parameters.
does not: evaluate masks (reference.py), plan tiles (later passes) or print
        nodes (ir_text.py); define the expression nodes itself (ir_expr.py,
        re-exported here: `ir` is the one public face of the IR).

Two expression languages make up the IR: *mask* nodes (the pattern algebra,
here) and *position* nodes (the `where` predicate language over q, k, h and
grid coordinates, in ir_expr.py with the score terms and static sets). Static
integers inside both are sympy expressions, so analysis can keep parameters
and sizes symbolic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Union

import networkx as nx
import sympy

from .errors import NO_SPAN, Span
from .lru import LRU
# the expression nodes are part of the IR: `ir.PConst`, `ir.SetVal`, ... (same class objects)
from .ir_expr import (Int, PBin, PBool, PCall, PCmp, PConst, PExpr, PIn, PNeg, PNode, PNot, PVar, SBin, SCall,
                      SCORE_FUNCTIONS, ScoreTerm, SetList, SetRange, SetVal, SExpr, SIndex, SNeg, SNode, SNum, SPos,
                      SScore, TableSpec)

__all__ = [
    # symbols
    "M", "N", "H", "SIZE_NAMES", "RESERVED", "axis_size", "param_symbol",
    # static values and expression nodes (ir_expr.py)
    "Int", "SetList", "SetRange", "SetVal", "Arg",
    "PNode", "PVar", "PConst", "PBin", "PNeg", "PCall", "PCmp", "PBool", "PNot", "PIn", "PExpr",
    "SNode", "SScore", "SNum", "SPos", "SBin", "SNeg", "SCall", "SIndex", "SExpr", "SCORE_FUNCTIONS",
    "TableSpec", "ScoreTerm",
    # layout
    "Layout", "SEQ",
    # mask nodes
    "Mask", "Full", "Empty", "Causal", "Band", "Sliding", "Neighborhood", "Block", "Strided", "Sink", "Global",
    "Rows", "Cols", "Prefix", "Random", "Where", "Same", "Routed", "TopK", "Union_", "Inter", "Diff", "Not",
    "Along", "Dilate", "Blockwise", "HeadArm", "Heads", "AXISWISE",
    # patterns
    "InputSpec", "PatternIR",
    # traversal
    "tree_size", "walk", "transform", "dag", "has_topk",
]

# ----------------------------------------------------------------------------- symbols

M = sympy.Symbol("M", integer=True, positive=True)
N = sympy.Symbol("N", integer=True, positive=True)
H = sympy.Symbol("H", integer=True, positive=True)
SIZE_NAMES = {"M": M, "N": N, "H": H}
RESERVED = {"M", "N", "H", "q", "k", "h", "_"}


def axis_size(axis: str) -> sympy.Symbol:
    """The symbol for `size(axis)`."""
    return sympy.Symbol(f"size({axis})", integer=True, positive=True)


def param_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True)


#: A primitive argument: one value for every axis, or one per axis.
Arg = Union[Int, tuple]


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """`seq`, `grid(a, b[, c])` or `seq(T) + grid(...)` (text = T)."""

    axes: tuple[str, ...] = ()
    text: Int | None = None
    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)

    @property
    def is_grid(self) -> bool:
        return bool(self.axes)

    @property
    def is_mixed(self) -> bool:
        return self.text is not None and bool(self.axes)

    def __str__(self) -> str:
        parts = []
        if self.text is not None:
            parts.append(f"seq({self.text})")
        if self.axes:
            parts.append(f"grid({', '.join(self.axes)})")
        return " + ".join(parts) or "seq"


SEQ = Layout()


# ----------------------------------------------------------------------------- mask nodes


@dataclass(frozen=True, slots=True, kw_only=True)
class Mask:
    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)

    def children(self) -> tuple["Mask", ...]:
        return ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Full(Mask):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Empty(Mask):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Causal(Mask):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Band(Mask):
    left: Arg
    right: Arg


@dataclass(frozen=True, slots=True, kw_only=True)
class Sliding(Mask):
    w: Arg


@dataclass(frozen=True, slots=True, kw_only=True)
class Neighborhood(Mask):
    size: Arg
    dilation: Arg
    stride: Arg
    causal: bool | tuple[bool, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Block(Mask):
    size: Arg
    shift: Arg
    halo: Arg


@dataclass(frozen=True, slots=True, kw_only=True)
class Strided(Mask):
    s: Arg


@dataclass(frozen=True, slots=True, kw_only=True)
class Sink(Mask):
    n: Int


@dataclass(frozen=True, slots=True, kw_only=True)
class Global(Mask):
    tokens: SetVal


@dataclass(frozen=True, slots=True, kw_only=True)
class Rows(Mask):
    tokens: SetVal


@dataclass(frozen=True, slots=True, kw_only=True)
class Cols(Mask):
    tokens: SetVal


@dataclass(frozen=True, slots=True, kw_only=True)
class Prefix(Mask):
    n: Int


@dataclass(frozen=True, slots=True, kw_only=True)
class Random(Mask):
    r: Int
    seed: Int


@dataclass(frozen=True, slots=True, kw_only=True)
class Where(Mask):
    pred: PExpr


@dataclass(frozen=True, slots=True, kw_only=True)
class Same(Mask):
    """`same(doc)`: doc[qa] == doc[k] for a run-time `segments` input."""

    input: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Routed(Mask):
    """`routed(sel)`: key blocks chosen outside the op, per query block."""

    input: str
    block: Int


@dataclass(frozen=True, slots=True, kw_only=True)
class TopK(Mask):
    """`topk(k, block)`: key blocks routed inside the op by pooled scores."""

    k: Int
    block: Int


@dataclass(frozen=True, slots=True, kw_only=True)
class Union_(Mask):
    parts: tuple[Mask, ...]

    def children(self):
        return self.parts


@dataclass(frozen=True, slots=True, kw_only=True)
class Inter(Mask):
    parts: tuple[Mask, ...]

    def children(self):
        return self.parts


@dataclass(frozen=True, slots=True, kw_only=True)
class Diff(Mask):
    left: Mask
    right: Mask

    def children(self):
        return (self.left, self.right)


@dataclass(frozen=True, slots=True, kw_only=True)
class Not(Mask):
    operand: Mask

    def children(self):
        return (self.operand,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Along(Mask):
    """`P @ a`: P evaluated as a 1-D pattern over grid axis a."""

    operand: Mask
    axis: str

    def children(self):
        return (self.operand,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dilate(Mask):
    d: Arg
    operand: Mask

    def children(self):
        return (self.operand,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Blockwise(Mask):
    b: Arg
    operand: Mask

    def children(self):
        return (self.operand,)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadArm:
    selector: SetVal | None  # None: the wildcard `_`
    body: Mask
    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heads(Mask):
    arms: tuple[HeadArm, ...]

    def children(self):
        return tuple(a.body for a in self.arms)


#: Primitives whose scalar arguments broadcast over grid axes, AND-ed per axis.
AXISWISE = (Band, Sliding, Neighborhood, Block, Strided)


# ----------------------------------------------------------------------------- patterns


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    """A typed run-time parameter (`doc: segments`, `sel: blocks(64)`)."""

    name: str
    kind: str  # "segments" | "blocks"
    block: Int | None = None
    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PatternIR:
    name: str
    layout: Layout
    body: Mask
    #: integer parameters kept symbolic in `body`, with their bound values
    #: (sympy expressions of M, N, H, size(a) and earlier parameters).
    bindings: tuple[tuple[sympy.Symbol, Int], ...]
    inputs: tuple[InputSpec, ...]
    span: Span = field(default=NO_SPAN, compare=False, hash=False, repr=False)
    #: `score EXPR` (None: the plain `scale * q . k`); never changes which pairs are allowed
    score: ScoreTerm | None = None

    def binding_map(self) -> dict[sympy.Symbol, Int]:
        return dict(self.bindings)

    @property
    def tables(self) -> tuple["TableSpec", ...]:
        """The score term's table inputs in declaration order (() without a score term)."""
        return self.score.tables if self.score is not None else ()


# ----------------------------------------------------------------------------- traversal
# (the canonical text of nodes and patterns: ir_text.py)


def tree_size(root, limit: int) -> int:
    """The number of IR nodes (masks, heads arms and `where` nodes) in `root` written out
    as a tree, counted on the DAG (each shared vertex once, with its size memoised by
    identity) and capped just above `limit`: linear in the DAG even when the tree is
    exponentially larger."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        kids = [v for f in dataclasses.fields(node) if f.name != "span"
                for v in (getattr(node, f.name) if isinstance(getattr(node, f.name), tuple) else (getattr(node, f.name),))
                if isinstance(v, (Mask, PNode, HeadArm))]
        if not done:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
            continue
        sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(k)] for k in kids))
    return sizes[id(root)]


_WALKS = LRU("ir_walks", 256, "the nodes of IR roots in dependency order (by identity)")


def walk(node: Mask) -> Iterator[Mask]:
    """Every distinct node of the DAG below `node`, children before parents (the order is
    kept per root: planning walks one pattern's IR several times)."""
    # keyed by identity: the entry holds the root, so no other object takes its id meanwhile
    _, nodes = _WALKS.get(id(node), lambda: (node, tuple(nx.topological_sort(dag(node).reverse(copy=False)))))
    yield from nodes


def transform(node: Mask, fn) -> Mask:
    """Rebuild `node` bottom-up; `fn(node)` returns a replacement or None to keep it."""
    changes = {}
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if isinstance(v, Mask):
            nv = transform(v, fn)
            if nv is not v:
                changes[f.name] = nv
        elif isinstance(v, tuple) and v and isinstance(v[0], Mask):
            nv = tuple(transform(x, fn) for x in v)
            if any(a is not b for a, b in zip(nv, v)):
                changes[f.name] = nv
        elif isinstance(v, tuple) and v and isinstance(v[0], HeadArm):
            nv = tuple(dataclasses.replace(a, body=transform(a.body, fn)) for a in v)
            if any(a.body is not b.body for a, b in zip(nv, v)):
                changes[f.name] = nv
    new = dataclasses.replace(node, **changes) if changes else node
    out = fn(new)
    return new if out is None else out


def dag(root: Mask) -> nx.DiGraph:
    """The mask as a DAG: structurally equal sub-patterns become one vertex.

    Edges go from a node to its children; analyses that memoise per vertex
    therefore handle a sub-pattern shared by several branches once.
    """
    g = nx.DiGraph()
    stack = [root]
    g.add_node(root)
    while stack:
        node = stack.pop()
        for child in node.children():
            if child not in g:
                g.add_node(child)
                stack.append(child)
            g.add_edge(node, child)
    return g


def has_topk(p: PatternIR) -> bool:
    """Whether the pattern routes with `topk` (resolved per call from q and k)."""
    return any(isinstance(n, TopK) for n in walk(p.body))
