"""Argument constraints of the primitives, shared by the static checker
(elaborate.py, when values are known at bind time) and the reference evaluator
(when sizes become known). One table, so both always agree.
"""

from __future__ import annotations

from . import ir

#: node type -> [(field, predicate on one int, requirement text)]
CONSTRAINTS: dict[type, list[tuple[str, callable, str]]] = {
    ir.Sliding: [("w", lambda v: v >= 1, "sliding window w must be >= 1")],
    ir.Neighborhood: [
        ("size", lambda v: v >= 2, "neighborhood size must be >= 2"),
        ("dilation", lambda v: v >= 1, "neighborhood dilation must be >= 1"),
        ("stride", lambda v: v >= 1, "neighborhood stride must be >= 1"),
    ],
    ir.Block: [
        ("size", lambda v: v >= 1, "block size must be >= 1"),
        ("halo", lambda v: v >= 0, "block halo must be >= 0"),
    ],
    ir.Strided: [("s", lambda v: v >= 1, "strided step s must be >= 1")],
    ir.Sink: [("n", lambda v: v >= 0, "sink count n must be >= 0")],
    ir.Prefix: [("n", lambda v: v >= 0, "prefix length n must be >= 0")],
    ir.Random: [("r", lambda v: v >= 0, "random key count r must be >= 0"),
                ("seed", lambda v: v >= 0, "random seed must be >= 0")],
    ir.TopK: [("k", lambda v: v >= 1, "topk k must be >= 1"), ("block", lambda v: v >= 1, "topk block must be >= 1")],
    ir.Dilate: [("d", lambda v: v >= 1, "dilation d must be >= 1")],
    ir.Blockwise: [("b", lambda v: v >= 1, "block size b must be >= 1")],
}


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
    if isinstance(node, ir.Neighborhood):
        sizes, strides = node.size, node.stride
        n = max(len(x) for x in (sizes, strides) if isinstance(x, tuple)) if any(isinstance(x, tuple) for x in (sizes, strides)) else 1
        for i in range(n):
            s = value_of(sizes[i] if isinstance(sizes, tuple) else sizes)
            st = value_of(strides[i] if isinstance(strides, tuple) else strides)
            if s is not None and st is not None and st > s:
                out.append(f"neighborhood stride must be <= size, got stride {st} > size {s}")
                break
    return out
