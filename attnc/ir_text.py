"""The canonical text of the IR: one line per node, one per bound pattern.

input:  IR nodes (attnc/ir.py): masks, position and score expressions, bound patterns.
output: `pformat(node)` and `pattern_text(pattern)`, the canonical text used for printing,
        hashing and kernel-cache keys, and `reads_sizes(pattern)` (which of M and N it mentions).
does not: parse text back into IR, or evaluate anything.
"""

from __future__ import annotations

import re
from dataclasses import fields

from .ir import (Along, Band, Block, Blockwise, Causal, Cols, Diff, Dilate, Empty, Full, Global, Heads, Inter, Mask,
                 Neighborhood, Not, PBin, PBool, PCall, PCmp, PConst, PExpr, PIn, PNeg, PNot, PVar, PatternIR,
                 Prefix, Random, Routed, Rows, SBin, SCall, SExpr, SIndex, SNeg, SNum, SPos, SScore, Same, Sink,
                 Sliding, Strided, TopK, Union_, Where)
from .lru import memoize


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def pformat(node: "Mask | PExpr | SExpr") -> str:
    """Canonical one-line text of an IR node (used for printing and hashing)."""
    match node:
        case Full():
            return "full"
        case Empty():
            return "none"
        case Causal():
            return "causal"
        case Band(left=l, right=r):
            return f"band({_fmt(l)}, {_fmt(r)})"
        case Sliding(w=w):
            return f"sliding({_fmt(w)})"
        case Neighborhood(size=s, dilation=d, stride=st, causal=c):
            return f"neighborhood({_fmt(s)}, dilation={_fmt(d)}, stride={_fmt(st)}, causal={_fmt(c)})"
        case Block(size=s, shift=sh, halo=ha):
            return f"block({_fmt(s)}, shift={_fmt(sh)}, halo={_fmt(ha)})"
        case Strided(s=s):
            return f"strided({_fmt(s)})"
        case Sink(n=n):
            return f"sink({n})"
        case Global(tokens=t):
            return f"global({t})"
        case Rows(tokens=t):
            return f"rows({t})"
        case Cols(tokens=t):
            return f"cols({t})"
        case Prefix(n=n):
            return f"prefix({n})"
        case Random(r=r, seed=s):
            return f"random({r}, seed={s})"
        case Where(pred=p):
            return f"(where {pformat(p)})"
        case Same(input=i):
            return f"same({i})"
        case Routed(input=i):
            return f"routed({i})"
        case TopK(k=k, block=b):
            return f"topk({k}, block={b})"
        case Union_(parts=ps):
            return "(" + " | ".join(pformat(p) for p in ps) + ")"
        case Inter(parts=ps):
            return "(" + " & ".join(pformat(p) for p in ps) + ")"
        case Diff(left=a, right=b):
            return f"({pformat(a)} - {pformat(b)})"
        case Not(operand=a):
            return f"~{pformat(a)}"
        case Along(operand=a, axis=ax):
            return f"({pformat(a)} @ {ax})"
        case Dilate(d=d, operand=a):
            return f"dilate({_fmt(d)}, {pformat(a)})"
        case Blockwise(b=b, operand=a):
            return f"blockwise({_fmt(b)}, {pformat(a)})"
        case Heads(arms=arms):
            inner = "; ".join(f"{'_' if a.selector is None else a.selector} => {pformat(a.body)}" for a in arms)
            return "heads { " + inner + " }"
        case PVar(name=n, axis=ax):
            return n if ax is None else f"{n}.{ax}"
        case PConst(value=v):
            return str(v)
        case PBin(op=op, left=a, right=b):
            return f"({pformat(a)} {op} {pformat(b)})"
        case PNeg(operand=a):
            return f"-{pformat(a)}"
        case PCall(func=f, args=args):
            return f"{f}(" + ", ".join(pformat(a) for a in args) + ")"
        case PCmp(ops=ops, operands=xs):
            out = pformat(xs[0])
            for op, x in zip(ops, xs[1:]):
                out += f" {op} {pformat(x)}"
            return out
        case PBool(op=op, parts=ps):
            return "(" + f" {op} ".join(pformat(p) for p in ps) + ")"
        case PNot(operand=a):
            return f"not {pformat(a)}"
        case PIn(item=i, collection=c):
            return f"{pformat(i)} in {c}"
        case SScore():
            return "score"
        case SNum(value=v):
            return repr(float(v))
        case SPos(node=n):
            text = pformat(n)
            return f"({text})" if " " in text and not text.startswith("(") else text
        case SBin(op=op, left=a, right=b):
            return f"({pformat(a)} {op} {pformat(b)})"
        case SNeg(operand=a):
            return f"-{pformat(a)}"
        case SCall(func=f, args=args):
            return f"{f}(" + ", ".join(pformat(a) for a in args) + ")"
        case SIndex(table=t, indices=idx):
            return f"{t}[" + ", ".join(pformat(i) for i in idx) + "]"
    if isinstance(node, Mask):  # a primitive or combinator added since: name(field=value, ...)
        args = ", ".join(f"{f.name}={pformat(v) if isinstance(v, Mask) else _fmt(v)}"
                         for f in fields(node) if f.name != "span" for v in [getattr(node, f.name)])
        return f"{type(node).__name__.lower()}({args})"
    raise TypeError(f"not an IR node: {node!r}")


def pattern_text(p: PatternIR) -> str:
    """Canonical text of a bound pattern: parameters, layout and body."""
    params = ", ".join(f"{s} = {v}" for s, v in p.bindings)
    inputs = ", ".join(f"{i.name}: {i.kind}" + (f"({i.block})" if i.block is not None else "") for i in p.inputs)
    tables = ", ".join(f"{t.name}: table(" + ", ".join(str(d) for d in t.dims) + ")" for t in p.tables)
    sig = ", ".join(x for x in (params, inputs, tables) if x)
    score = f" score {pformat(p.score.expr)}" if p.score is not None else ""
    return f"pattern {p.name}({sig}) on {p.layout} = {pformat(p.body)}{score}"


@memoize("reads_sizes", 256, "which of M and N each pattern reads")
def reads_sizes(p: PatternIR) -> frozenset[str]:
    """Which of the lengths M and N the pattern's bindings, body or score term mention: such a
    pattern changes as a sequence grows (decoding and KV retention care)."""
    return frozenset(re.findall(r"\b([MN])\b", pattern_text(p)))
