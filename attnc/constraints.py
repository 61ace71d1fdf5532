"""Argument constraints of the primitives, shared by the static checker
(elaborate.py, when values are known at bind time) and the reference evaluator
(when sizes become known). One table, so both always agree.

input:  a primitive's IR node and a way to read its argument values.
output: the violated requirements, as messages (`violations`).
does not: define the rules (each primitive's `@defines` in semantics.py does) or raise.
"""

from __future__ import annotations

from collections import ChainMap

from . import ir, semantics

#: node type -> [(field, predicate on one int, requirement text)]: the positional primitives' rules are
#: declared with their definitions (semantics.py), the others here
CONSTRAINTS = ChainMap(semantics.RULES, {
    ir.Random: [("r", lambda v: v >= 0, "random key count r must be >= 0"),
                ("seed", lambda v: v >= 0, "random seed must be >= 0")],
    ir.TopK: [("k", lambda v: v >= 1, "topk k must be >= 1"), ("block", lambda v: v >= 1, "topk block must be >= 1")],
    ir.Dilate: [("d", lambda v: v >= 1, "dilation d must be >= 1")],
    ir.Blockwise: [("b", lambda v: v >= 1, "block size b must be >= 1")],
})


def violations(node: ir.Mask, value_of) -> list[str]:
    """Requirement texts that `node` violates; `value_of(expr)` returns an int
    or None when the value is not known yet."""
    out = []
    for fld, pred, text in CONSTRAINTS.get(type(node), ()):
        raw = getattr(node, fld)
        for v in raw if isinstance(raw, tuple) else (raw,):
            val = value_of(v)
            if val is not None and not pred(val):
                out.append(f"{text}, got {val}")
                break
    relation = semantics.relation_problem(node, value_of)
    if relation is not None:
        out.append(relation)
    return out
