"""Elaboration of primitive calls: the primitives' signatures and their argument kinds.

input:  a primitive's name and its argument expressions (the Elaborator's `ev` evaluates them).
output: the IR mask node of the call (`PrimitiveCalls`, a mixin of elaborate.Elaborator), and the
        signature tables: PRIMITIVES (name -> parameters and usage), FUNCTIONS, INPUT_TYPES and
        the argument kinds (INT, AXIS_INT, AXIS_BOOL, SET, MASK, SEGMENTS, BLOCKS).
does not: define what a primitive means (attnc/semantics.py), resolve names or evaluate
        operators (elab_names.py, elab_exprs.py).
"""

from __future__ import annotations

import difflib
from collections import ChainMap

import sympy

from . import ir, semantics
from .constraints import violations
from .elab_values import Abort, Ctx, InputRef, PatternRef, POISON, is_int, type_name
from .errors import Span

# ----------------------------------------------------------------------------- primitive signatures

INT, AXIS_INT, AXIS_BOOL, SET = semantics.INT, semantics.AXIS_INT, semantics.AXIS_BOOL, semantics.SET
MASK, SEGMENTS, BLOCKS = "mask", "segments", "blocks"
REQUIRED = semantics.REQUIRED

#: name -> (parameters [(name, kind, default)], description of the call): the positional primitives'
#: signatures are declared with their definitions (semantics.py), the others here
PRIMITIVES = ChainMap(semantics.SIGNATURES, {
    "random": ([("r", INT, REQUIRED), ("seed", INT, 0)], "random(r, seed=0)"),
    "same": ([("doc", SEGMENTS, REQUIRED)], "same(doc)"),
    "routed": ([("sel", BLOCKS, REQUIRED)], "routed(sel)"),
    "topk": ([("k", INT, REQUIRED), ("block", INT, 64)], "topk(k, block=64)"),
    "dilate": ([("d", AXIS_INT, REQUIRED), ("pattern", MASK, REQUIRED)], "dilate(d, P)"),
    "blockwise": ([("b", AXIS_INT, REQUIRED), ("pattern", MASK, REQUIRED)], "blockwise(b, P)"),
})
FUNCTIONS = {"min": "min(a, b, ...)", "max": "max(a, b, ...)", "abs": "abs(x)", "size": "size(axis)"}
INPUT_TYPES = {"segments": 0, "blocks": 1, "table": None}

#: primitives whose IR node takes exactly the primitive's arguments
_NODES = ChainMap(semantics.NODES, {"random": ir.Random, "topk": ir.TopK})


class PrimitiveCalls:
    """Mixin of elaborate.Elaborator: calls of the built-in primitives (causal, band, dilate, ...)."""

    # -- primitives
    def call_primitive(self, name, args, kwargs, span: Span, func_span: Span, ctx: Ctx):
        params, usage = PRIMITIVES[name]
        got: dict[str, tuple[object, Span]] = {}
        if len(args) > len(params):
            self.fail(span, f"{name} takes {len(params)} argument(s), got {len(args)}", usage)
        for (pname, _, _), a in zip(params, args):
            got[pname] = (a, a.span)
        names = [p[0] for p in params]
        for kw in kwargs:
            if kw.name not in names:
                close = difflib.get_close_matches(kw.name, names, n=1)
                self.fail(kw.span, f"{name} has no parameter '{kw.name}' ({usage})",
                          f"did you mean '{close[0]}'?" if close else None)
            if kw.name in got:
                self.fail(kw.span, f"argument '{kw.name}' of {name} given twice")
            got[kw.name] = (kw.value, kw.span)
        vals: dict[str, object] = {}
        inner = ctx
        if name in ("dilate", "blockwise"):
            inner = ctx.child(transformed=True)
        for pname, kind, default in params:
            if pname not in got:
                if default is REQUIRED:
                    self.fail(span, f"{name} is missing its argument '{pname}'", usage)
                vals[pname] = sympy.Integer(default) if isinstance(default, int) and not isinstance(default, bool) else default
                continue
            expr, aspan = got[pname]
            vals[pname] = self.arg(name, pname, kind, expr, aspan, inner if kind == MASK else ctx)
        if name in ("same", "routed", "topk"):
            if ctx.transformed:
                self.fail(span, f"{name} is a run-time primitive and cannot be used inside dilate, blockwise or @")
            if ctx.in_where:
                self.fail(span, f"{name} is a mask, not a condition")
        node = self.build(name, vals, span)
        for v in violations(node, self.static_int):
            self.fail(span, v)
        return node

    def arg(self, prim, pname, kind, expr, span, ctx: Ctx):
        v = self.ev(expr, ctx)
        if v is POISON:
            raise Abort
        where = f"argument '{pname}' of {prim}"
        if kind == INT:
            if not is_int(v):
                self.fail(span, f"{where} must be an integer, got {type_name(v)}")
            return v
        if kind in (AXIS_INT, AXIS_BOOL):
            want_bool = kind == AXIS_BOOL
            ok = (lambda x: isinstance(x, bool)) if want_bool else is_int
            if isinstance(v, tuple):
                if not all(ok(x) for x in v):
                    self.fail(span, f"{where} must be a tuple of {'booleans' if want_bool else 'integers'}")
                if ctx.ndim == 1:
                    self.fail(span, f"{where} is a per-axis tuple, but the pattern is 1-D here",
                              "give one value, or use a grid layout")
                if len(v) != ctx.ndim:
                    self.fail(span, f"{where} has {len(v)} values but the grid has {ctx.ndim} axes ({', '.join(ctx.layout.axes)})")
                return v
            if not ok(v):
                self.fail(span, f"{where} must be {'a boolean' if want_bool else 'an integer'} or a per-axis tuple, got {type_name(v)}")
            return v
        if kind == SET:
            if isinstance(v, (ir.SetList, ir.SetRange)):
                return v
            if is_int(v):
                return ir.SetList(items=(v,))
            if isinstance(v, tuple) and all(is_int(x) for x in v):
                return ir.SetList(items=v)
            self.fail(span, f"{where} must be a set of token positions, got {type_name(v)}", "0 .. 16 or {0, N - 1}")
        if kind == MASK:
            if isinstance(v, PatternRef):
                v = self.call_pattern(v, [], (), span, ctx)
            if not isinstance(v, ir.Mask):
                self.fail(span, f"{where} must be a mask, got {type_name(v)}")
            return v
        if kind in (SEGMENTS, BLOCKS):
            if not isinstance(v, InputRef) or v.spec.kind != kind:
                decl = "doc: segments" if kind == SEGMENTS else "sel: blocks(64)"
                self.fail(span, f"{where} must be a run-time input declared as a typed parameter, got {type_name(v)}",
                          f"pattern p({decl}) = ...")
            return v
        raise ValueError(kind)

    def build(self, name: str, v: dict, span: Span) -> ir.Mask:
        if name in _NODES:  # argument names are the IR field names
            return _NODES[name](**v, span=span)
        match name:
            case "same":
                return ir.Same(input=v["doc"].spec.name, span=span)
            case "routed":
                return ir.Routed(input=v["sel"].spec.name, block=v["sel"].spec.block, span=span)
            case "dilate":
                return ir.Dilate(d=v["d"], operand=v["pattern"], span=span)
            case "blockwise":
                return ir.Blockwise(b=v["b"], operand=v["pattern"], span=span)
        raise ValueError(name)
