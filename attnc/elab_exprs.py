"""Elaboration of operators and literals: arithmetic, mask algebra, conditions, sets, `where`,
`heads { ... }` and `P @ axis`.

input:  operator, literal, set, `where`, `heads` and `@` expressions in their context (Ctx).
output: their values (sympy integers, Pos conditions, IR masks, sets, tuples); `Expressions` is
        a mixin of elaborate.Elaborator.
does not: resolve names or calls (elab_names.py), or elaborate score-only forms (elab_scores.py).
"""

from __future__ import annotations

import difflib

import sympy

from . import ir, syntax as ast
from .elab_values import Abort, Ctx, PatternRef, POISON, Pos, ScoreVal, is_int, type_name
from .errors import error


def _short(v: int) -> str:
    text = str(v)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-4:]} ({len(text)} digits)"


class Expressions:
    """Mixin of elaborate.Elaborator: literals, operators, sets, where, heads and @."""

    def ev_Num(self, e: ast.Num, ctx):
        return sympy.Integer(e.value)

    def ev_Bool(self, e: ast.Bool, ctx):
        return e.value

    # -- operators
    def ev_Unary(self, e: ast.Unary, ctx: Ctx):
        v = self.ev(e.operand, ctx)
        if v is POISON:
            raise Abort
        if isinstance(v, PatternRef):
            v = self.call_pattern(v, [], (), e.operand.span, ctx)
        if e.op == "~":
            if isinstance(v, ir.Mask):
                return ir.Not(operand=v, span=e.span)
            self.fail(e.span, f"'~' complements a mask, got {type_name(v)}", "use '-' to negate an integer" if is_int(v) else None)
        if e.op == "-":
            if is_int(v):
                return -v
            if isinstance(v, Pos) and not v.boolean:
                return Pos(ir.PNeg(operand=v.node, span=e.span), False)
            if isinstance(v, ScoreVal):
                return ScoreVal(ir.SNeg(operand=v.node, span=e.span))
            if isinstance(v, ir.Mask):
                self.fail(e.span, "unary '-' negates integers; the complement of a mask is '~P'", "~P")
            self.fail(e.span, f"'-' negates an integer, got {type_name(v)}")
        if e.op == "not":
            if isinstance(v, bool):
                return not v
            if isinstance(v, Pos) and v.boolean:
                return Pos(ir.PNot(operand=v.node, span=e.span), True)
            self.fail(e.span, f"'not' takes a condition, got {type_name(v)}")
        raise ValueError(e.op)

    def pos(self, v) -> ir.PExpr:
        if isinstance(v, Pos):
            return v.node
        return ir.PConst(value=v)

    def ev_Binary(self, e: ast.Binary, ctx: Ctx):
        left = right = POISON
        try:
            left = self.ev(e.left, ctx)
        except Abort:
            pass
        try:
            right = self.ev(e.right, ctx)
        except Abort:
            pass
        if left is POISON or right is POISON:
            if not self.diags.items:  # never unwind without telling the user why
                self.fail(e.span, "invalid operand")
            raise Abort
        if isinstance(left, PatternRef):
            left = self.call_pattern(left, [], (), e.left.span, ctx)
        if isinstance(right, PatternRef):
            right = self.call_pattern(right, [], (), e.right.span, ctx)
        op = e.op
        if op in ("and", "or"):
            parts = []
            for side, v in ((e.left, left), (e.right, right)):
                if isinstance(v, bool):
                    v = Pos(ir.PConst(value=sympy.Integer(int(v))), True)  # folded below
                if not (isinstance(v, Pos) and v.boolean):
                    self.fail(side.span, f"'{op}' combines conditions, got {type_name(v)}")
                parts.append(v.node)
            flat = []
            for p in parts:
                flat.extend(p.parts if isinstance(p, ir.PBool) and p.op == op else (p,))
            return Pos(ir.PBool(op=op, parts=tuple(flat), span=e.span), True)
        if isinstance(left, ir.Mask) or isinstance(right, ir.Mask):
            if op in ("|", "&", "-") and isinstance(left, ir.Mask) and isinstance(right, ir.Mask):
                if op == "-":
                    return ir.Diff(left=left, right=right, span=e.span)
                cls = ir.Union_ if op == "|" else ir.Inter
                parts = [p for side in (left, right) for p in (side.parts if isinstance(side, cls) else (side,))]
                parts = list({id(p): p for p in parts}.values())  # P | P is P (shared sub-results are one object)
                if len(parts) == 1:
                    return parts[0]
                return cls(parts=tuple(parts), span=e.span)
            other = right if isinstance(left, ir.Mask) else left
            hint = None
            if isinstance(other, Pos) and other.boolean:
                hint = "wrap the condition in where: (where ...)"
            self.fail(e.span, f"'{op}' cannot combine a mask with {type_name(other)}" if op in "|&-"
                      else f"'{op}' is arithmetic; masks combine with | & - ~", hint)
        if op in ("|", "&"):
            if isinstance(left, Pos) or isinstance(right, Pos):
                self.fail(e.span, f"'{op}' combines masks; conditions inside `where` combine with '{'or' if op == '|' else 'and'}'",
                          f"where a {'or' if op == '|' else 'and'} b")
            self.fail(e.span, f"'{op}' combines masks, got {type_name(left)} and {type_name(right)}")
        real_power = op == "**" and (isinstance(right, Pos) or (is_int(right) and (self.static_int(right) or 0) < 0))
        if ctx.in_score and (op == "/" or real_power or isinstance(left, ScoreVal) or isinstance(right, ScoreVal)):
            if op not in ("+", "-", "*", "/", "**"):
                self.fail(e.span, f"'{op}' is integer arithmetic; score terms combine reals with + - * / **")
            return ScoreVal(ir.SBin(op=op, left=self.real(left, e.left.span), right=self.real(right, e.right.span),
                                    span=e.span))
        if op == "/":
            self.fail(e.span, "'/' divides reals, which only score terms have; integers divide with '//'", "a // b")
        # arithmetic
        for side, v in ((e.left, left), (e.right, right)):
            if not (is_int(v) or (isinstance(v, Pos) and not v.boolean)):
                self.fail(side.span, f"'{op}' needs integers, got {type_name(v)}")
        if isinstance(left, Pos) or isinstance(right, Pos):
            if op == "**":
                exp = self.static_int(right) if is_int(right) else None
                if exp is None or exp < 0:
                    self.fail(e.right.span, "the exponent of '**' on positions must be a constant >= 0")
            if op in ("//", "%") and is_int(right) and self.static_int(right) == 0:
                self.fail(e.right.span, f"'{op}' by zero")
            return Pos(ir.PBin(op=op, left=self.pos(left), right=self.pos(right), span=e.span), False)
        if op in ("//", "%"):
            rv = self.static_int(right)
            if rv == 0:
                self.fail(e.right.span, f"'{op}' by zero")
        if op == "**":
            rv = self.static_int(right)
            if rv is None:
                self.fail(e.right.span, "the exponent of '**' must be known when the pattern is bound "
                          "(it cannot depend on M, N, H or grid sizes)")
            if rv < 0:
                self.fail(e.right.span, f"negative exponent {rv}: integer powers must be >= 0")
            if rv > self.MAX_EXPONENT:
                self.fail(e.right.span, f"exponent {rv} is too large (limit {self.MAX_EXPONENT})")
        match op:
            case "+":
                res = left + right
            case "-":
                res = left - right
            case "*":
                res = left * right
            case "//":
                res = sympy.floor(left / right)
            case "%":
                res = sympy.Mod(left, right)
            case "**":
                res = left ** right
            case _:
                raise ValueError(op)
        self.check_magnitude(res, e)
        return res

    def check_magnitude(self, v: ir.Int, e: ast.Binary) -> None:
        """Keep integers inside what the evaluators can hold (syntax.MAX_INT)."""
        if v.is_Integer:
            if abs(int(v)) > ast.MAX_INT:
                self.fail(e.span, f"integer value too large: {_short(int(v))} (limit 2**60 = {ast.MAX_INT})")
            return
        if e.op in ("*", "**"):
            for pw in v.atoms(sympy.Pow):
                if pw.exp.is_Integer and abs(int(pw.exp)) > self.MAX_EXPONENT:
                    self.fail(e.span, f"this makes a power with exponent {int(pw.exp)} (limit {self.MAX_EXPONENT}): "
                              "its value would not fit an integer")

    def ev_Compare(self, e: ast.Compare, ctx: Ctx):
        vals = [self.ev(x, ctx) for x in e.operands]
        for x, v in zip(e.operands, vals):
            if v is POISON:
                raise Abort
            if not (is_int(v) or (isinstance(v, Pos) and not v.boolean)):
                self.fail(x.span, f"comparisons take integers, got {type_name(v)}")
        return Pos(ir.PCmp(ops=e.ops, operands=tuple(self.pos(v) for v in vals), span=e.span), True)

    def ev_In(self, e: ast.In, ctx: Ctx):
        item = self.ev(e.item, ctx)
        coll = self.ev(e.collection, ctx)
        if not (is_int(item) or (isinstance(item, Pos) and not item.boolean)):
            self.fail(e.item.span, f"'in' tests an integer, got {type_name(item)}")
        if is_int(coll):
            coll = ir.SetList(items=(coll,))
        elif isinstance(coll, tuple) and all(is_int(x) for x in coll):
            coll = ir.SetList(items=coll)
        if not isinstance(coll, (ir.SetList, ir.SetRange)):
            self.fail(e.collection.span, f"'in' needs a set, got {type_name(coll)}")
        return Pos(ir.PIn(item=self.pos(item), collection=coll, span=e.span), True)

    def ev_Range(self, e: ast.Range, ctx: Ctx):
        start = self.int_of(e.start, ctx, "the start of a range")
        stop = self.int_of(e.stop, ctx, "the end of a range")
        step = sympy.Integer(1) if e.step is None else self.int_of(e.step, ctx, "the step of a range")
        sv = self.static_int(step)
        if sv is not None and sv < 1:
            self.fail(e.step.span, f"a range step must be >= 1, got {sv}")
        return ir.SetRange(start=start, stop=stop, step=step)

    def ev_TupleLit(self, e: ast.TupleLit, ctx: Ctx):
        vals = [self.ev(x, ctx) for x in e.items]
        if all(isinstance(v, bool) for v in vals):
            return tuple(vals)
        for x, v in zip(e.items, vals):
            if v is POISON:
                raise Abort
            if not is_int(v):
                self.fail(x.span, f"tuple elements must be integers (or all booleans), got {type_name(v)}")
        return tuple(vals)

    def ev_SetLit(self, e: ast.SetLit, ctx: Ctx):
        items = tuple(self.int_of(x, ctx, "a set element") for x in e.items)
        return ir.SetList(items=items)

    def ev_Heads(self, e: ast.Heads, ctx: Ctx):
        arms = []
        seen_wild = False
        for arm in e.arms:
            if seen_wild:
                self.diags.add(error(arm.span, "this arm is unreachable: the catch-all '_' arm before it matches every head"))
            sel = None
            if arm.selector is None:
                seen_wild = True
            else:
                try:
                    v = self.ev(arm.selector, ctx)
                except Abort:
                    v = POISON
                if is_int(v):
                    sel = ir.SetList(items=(v,))
                elif isinstance(v, (ir.SetList, ir.SetRange)):
                    sel = v
                elif isinstance(v, tuple) and all(is_int(x) for x in v):
                    sel = ir.SetList(items=v)
                elif v is not POISON:
                    self.diags.add(error(arm.selector.span, f"a head selector must be an integer, a range or a set, got {type_name(v)}",
                                         "0 => P; 2 .. 4 => P; {5, 7} => P; _ => P"))
            body = self.mask_of(arm.body, ctx, what="a heads arm")
            arms.append(ir.HeadArm(selector=sel, body=body, span=arm.span))
        return ir.Heads(arms=tuple(arms), span=e.span)

    def ev_Where(self, e: ast.Where, ctx: Ctx):
        v = self.ev(e.pred, ctx.child(in_where=True))
        if v is POISON:
            raise Abort
        if isinstance(v, bool):
            return ir.Full(span=e.span) if v else ir.Empty(span=e.span)
        if not (isinstance(v, Pos) and v.boolean):
            self.fail(e.pred.span, f"`where` needs a condition (a comparison), got {type_name(v)}", "where q - k < 8")
        return ir.Where(pred=v.node, span=e.span)

    def ev_Along(self, e: ast.Along, ctx: Ctx):
        if not ctx.layout.axes:
            self.fail(e.span, f"'@ {e.axis}' applies a pattern along a grid axis, but this pattern is on seq",
                      "declare the pattern `on grid(...)`")
        if e.axis not in ctx.layout.axes:
            close = difflib.get_close_matches(e.axis, list(ctx.layout.axes), n=1)
            self.fail(e.axis_span, f"unknown grid axis '{e.axis}' (the layout has {', '.join(ctx.layout.axes)})",
                      f"did you mean '{close[0]}'?" if close else None)
        if ctx.along is not None:
            self.fail(e.span, f"'@ {e.axis}' inside '@ {ctx.along}': a pattern is applied along one axis at a time")
        inner = ctx.child(along=e.axis, transformed=True)
        v = self.ev(e.operand, inner)
        if v is POISON:
            raise Abort
        if isinstance(v, PatternRef):
            v = self.call_pattern(v, [], (), e.operand.span, inner)
        if not isinstance(v, ir.Mask):
            self.fail(e.operand.span, f"'@ {e.axis}' applies a mask along an axis, got {type_name(v)}")
        return ir.Along(operand=v, axis=e.axis, span=e.span)
