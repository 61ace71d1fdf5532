"""Elaboration of a pattern's layout and parameters.

input:  a pattern definition (its `on seq / grid(...)` layout and its parameters) and the values
        given at bind time or by a calling pattern.
output: the layout (ir.Layout) and each parameter's value: integers become symbols with a
        binding, typed parameters run-time inputs (InputRef) or tables (TableRef); `ParamBinding`
        is a mixin of elaborate.Elaborator.
does not: elaborate the pattern's body or score term (elaborate.py, elab_scores.py).
"""

from __future__ import annotations

import difflib

import sympy

from . import ir, syntax as ast
from .elab_primitives import INPUT_TYPES
from .elab_values import Abort, Ctx, InputRef, ModuleScope, TableRef, is_int
from .errors import error


class ParamBinding:
    """Mixin of elaborate.Elaborator: layouts and parameter values."""

    def layout(self, pdef: ast.PatternDef, module: ModuleScope) -> ir.Layout:
        """Axes of the layout (the text length needs parameters: layout_text)."""
        if pdef.layout is None:
            return ir.Layout(span=pdef.span)
        axes: list[str] = []
        seen_seq = seen_grid = False
        for part in pdef.layout.parts:
            if part.kind == "seq":
                if seen_seq or seen_grid:
                    self.diags.add(error(part.span, "a mixed layout is written `seq(T) + grid(a, b)`: one seq part, first"))
                seen_seq = True
                if len(part.args) > 1:
                    self.diags.add(error(part.span, f"seq takes at most one argument (the text length), got {len(part.args)}"))
            elif part.kind == "grid":
                if seen_grid:
                    self.diags.add(error(part.span, "a layout has at most one grid part"))
                seen_grid = True
                if not 1 <= len(part.args) <= 3:
                    self.diags.add(error(part.span, f"grid takes 1 to 3 axis names, got {len(part.args)}"))
                for a in part.args:
                    if not isinstance(a, ast.Name):
                        self.diags.add(error(a.span, "grid axes are names, e.g. grid(h, w); sizes are given at call time"))
                    elif a.id in ir.RESERVED - {"h"}:  # `h` alone is the head; `q.h`, `size(h)`, `@ h` the axis
                        self.diags.add(error(a.span, f"'{a.id}' cannot name a grid axis: it is reserved (M N H q k _)"))
                    elif a.id in axes:
                        self.diags.add(error(a.span, f"grid axis '{a.id}' appears twice"))
                    else:
                        axes.append(a.id)
            else:
                close = difflib.get_close_matches(part.kind, ["seq", "grid"], n=1)
                self.diags.add(error(part.span, f"unknown layout '{part.kind}': expected seq, grid(...) or seq(T) + grid(...)",
                                     f"did you mean '{close[0]}'?" if close else None))
        return ir.Layout(axes=tuple(axes), text=None, span=pdef.layout.span)

    def layout_text(self, pdef: ast.PatternDef, ctx: Ctx, layout: ir.Layout) -> ir.Layout:
        if pdef.layout is None:
            return layout
        parts = pdef.layout.parts
        seq = [p for p in parts if p.kind == "seq"]
        if not seq or not seq[0].args or len(parts) == 1:
            if seq and seq[0].args and len(parts) == 1:
                self.diags.add(error(seq[0].span, "seq(T) only makes sense before a grid part: `seq(T) + grid(h, w)`"))
            return layout
        if not layout.axes:
            return layout
        try:
            t = self.int_of(seq[0].args[0], ctx, "the text length T of seq(T)")
        except Abort:
            return layout
        v = self.static_int(t)
        if v is not None and v < 0:
            self.diags.add(error(seq[0].args[0].span, f"the text length must be >= 0, got {v}"))
        return ir.Layout(axes=layout.axes, text=t, span=layout.span)

    def param_value(self, p: ast.Param, ctx: Ctx, values: dict[str, object], top: bool):
        if p.name in ir.SIZE_NAMES or p.name == "_":
            self.fail(p.span, f"'{p.name}' cannot be a parameter name: M, N, H and _ are reserved")
        if p.name in ctx.layout.axes:
            self.fail(p.span, f"parameter '{p.name}' has the name of a grid axis")
        if p.type is not None:
            return self.input_param(p, ctx, values, top)
        if p.name in values:
            v = values[p.name]
            if isinstance(v, ast.Node):  # an argument expression from a calling pattern
                return v
            return self.from_python(v, p, ctx, top)
        if p.default is None:
            if top:
                self.fail(p.span, f"parameter '{p.name}' has no default: bind it, e.g. prog.pattern(..., {p.name}=...)")
            self.fail(p.span, f"parameter '{p.name}' has no default and the call does not give it")
        v = self.ev(p.default, ctx)
        if isinstance(v, ir.Mask):
            return v
        if top and is_int(v):
            sym = ir.param_symbol(p.name)
            self.bindings[sym] = v.xreplace(self.bindings)
            return sym
        return v

    def from_python(self, v, p: ast.Param, ctx: Ctx, top: bool):
        """Convert a Python value given at bind time."""
        span = p.span
        if isinstance(v, bool):
            return v
        if isinstance(v, int):
            if abs(v) > ast.MAX_INT:
                self.fail(span, f"parameter '{p.name}': {v} is too large (limit 2**60 = {ast.MAX_INT})")
            if top:
                sym = ir.param_symbol(p.name)
                self.bindings[sym] = sympy.Integer(v)
                return sym
            return sympy.Integer(v)
        if isinstance(v, range):
            if v.step < 1:
                self.fail(span, f"parameter '{p.name}': a range needs a positive step, got {v.step}")
            return ir.SetRange(start=sympy.Integer(v.start), stop=sympy.Integer(v.stop), step=sympy.Integer(v.step))
        if isinstance(v, (set, frozenset)):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                self.fail(span, f"parameter '{p.name}': expected a set of integers, got {v!r}")
            return ir.SetList(items=tuple(sympy.Integer(x) for x in sorted(v)))
        if isinstance(v, (tuple, list)):
            if v and all(isinstance(x, bool) for x in v):
                return tuple(v)
            if not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                self.fail(span, f"parameter '{p.name}': expected a tuple of integers or of booleans, got {v!r}")
            return tuple(sympy.Integer(x) for x in v)
        try:  # numpy / torch integer scalars
            import numbers
            if isinstance(v, numbers.Integral):
                return self.from_python(int(v), p, ctx, top)
        except TypeError:
            pass
        self.fail(span, f"parameter '{p.name}': expected an integer, boolean, tuple or set, got {type(v).__name__} {v!r}",
                  f"{p.name}=3, {p.name}=(3, 5) or {p.name}={{0, 1}}")

    def input_param(self, p: ast.Param, ctx: Ctx, values: dict[str, object], top: bool = True):
        t = p.type
        if t.name not in INPUT_TYPES:
            close = difflib.get_close_matches(t.name, list(INPUT_TYPES), n=1)
            self.fail(t.span, f"unknown run-time input type '{t.name}': expected segments, blocks(b) or table(d1, ...)",
                      f"did you mean '{close[0]}'?" if close else None)
        if t.name == "table":
            return self.table_param(p, ctx, values, top)
        if p.name in values and isinstance(values[p.name], InputRef):
            return values[p.name]
        if p.name in values and not isinstance(values[p.name], ast.Node):
            self.fail(p.span, f"'{p.name}' is a run-time input ({t.name}): pass it as a tensor when calling the op, not when binding",
                      f"pat(q, k, v, {p.name}=tensor)")
        block = None
        if t.name == "segments":
            if t.args:
                self.fail(t.span, f"segments takes no arguments, got {len(t.args)}")
        else:
            if len(t.args) != 1:
                self.fail(t.span, "blocks needs the block size: blocks(64)")
            block = self.int_of(t.args[0], ctx, "the block size of blocks(b)")
            bv = self.static_int(block)
            if bv is not None and bv < 1:
                self.fail(t.args[0].span, f"block size must be >= 1, got {bv}")
        spec = ir.InputSpec(name=p.name, kind=t.name, block=block, span=p.span)
        prev = self.inputs.get(p.name)
        if prev is not None and (prev.kind, prev.block) != (spec.kind, spec.block):
            self.fail(p.span, f"run-time input '{p.name}' is declared twice with different types")
        self.inputs[p.name] = spec
        return InputRef(spec)

    def table_param(self, p: ast.Param, ctx: Ctx, values: dict[str, object], top: bool):
        """`name: table(d1, d2, ...)`: a real tensor of exactly that shape, read by the score term."""
        t = p.type
        if not top:
            self.fail(p.span, f"'{p.name}' is a table input of a called pattern: tables are read by score terms, "
                              "and only the pattern that is bound has one", "declare the table on the bound pattern")
        if p.name in values and not isinstance(values[p.name], ast.Node):
            self.fail(p.span, f"'{p.name}' is a run-time input (table): pass it as a tensor when calling the op, not when binding",
                      f"pat(q, k, v, {p.name}=tensor)")
        if not t.args:
            self.fail(t.span, "table needs its shape: table(d1, d2, ...), e.g. table(H, 2 * size - 1)")
        dims = []
        for a in t.args:
            d = self.int_of(a, ctx, "a table dimension")
            dv = self.static_int(d)
            if dv is not None and dv < 1:
                self.fail(a.span, f"a table dimension must be >= 1, got {dv}")
            dims.append(d)
        spec = ir.TableSpec(name=p.name, dims=tuple(dims), span=p.span)
        self.tables[p.name] = spec
        return TableRef(spec)
