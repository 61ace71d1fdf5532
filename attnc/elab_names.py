"""Elaboration of names, lets and calls: what a name or `f(...)` in an expression refers to.

input:  names, coordinates (q.a), `let ... in`, and calls in an expression, in their context (Ctx).
output: their values: locals, module lets (memoised per context), patterns called with
        arguments (memoised), functions (min, max, abs, size), primitives (via elab_primitives);
        `NameResolution` is a mixin of elaborate.Elaborator.
does not: evaluate operators or literals (elab_exprs.py) or primitive arguments (elab_primitives.py).
"""

from __future__ import annotations

import difflib

import sympy

from . import ir, syntax as ast
from .elab_primitives import FUNCTIONS, PRIMITIVES, REQUIRED
from .elab_values import (FAILED, MISSING, POISON, Abort, Ctx, InputRef, ModuleScope, PatternRef, Pos, ScoreVal,
                          is_int, memo_key_of, note_hidden, type_name)
from .errors import Span


class NameResolution:
    """Mixin of elaborate.Elaborator: names, lets, coordinates and calls."""

    def ev_Name(self, e: ast.Name, ctx: Ctx):
        name = e.id
        if name == "score" and ctx.in_score:
            if name in ctx.locals:
                self.fail(e.span, "'score' inside a score term is the pair's scaled dot product, but a parameter or let "
                                  "named 'score' is in scope and would be hidden", "rename it (e.g. 'score_')")
            return ScoreVal(ir.SScore(span=e.span))
        if ctx.in_where and name in ("q", "k", "h"):
            if name in ctx.hidden:  # a parameter / let named q, k or h would be silently hidden here
                what = "the head index" if name == "h" else ("the query position" if name == "q" else "the key position")
                kind = ctx.hidden[name]
                self.fail(e.span, f"'{name}' inside `where` is {what}, but a {kind} named '{name}' is in scope "
                                  f"and would be hidden", f"rename the {kind} (e.g. '{name}_') or use it outside `where`")
            return Pos(ir.PVar(name=name, span=e.span), False)
        if name in ctx.locals:
            return ctx.locals[name]
        if name in ("q", "k", "h"):
            self.fail(e.span, f"'{name}' (a {'head index' if name == 'h' else 'token position'}) is only defined inside `where`",
                      f"where {name} ...")
        if name in ir.SIZE_NAMES:
            return ir.SIZE_NAMES[name]
        found = ctx.module.lookup(name)
        if found is not None:
            kind, node, scope = found
            if kind == "let":
                return self.let_value(node, scope, ctx)
            return PatternRef(node, scope)
        if name in PRIMITIVES:
            params, usage = PRIMITIVES[name]
            if any(d is REQUIRED for _, _, d in params):
                self.fail(e.span, f"'{name}' needs arguments: {usage}")
            return self.call_primitive(name, [], (), e.span, e.span, ctx)
        if name in ctx.layout.axes:
            self.fail(e.span, f"grid axis '{name}' is not a value here", f"size({name}), q.{name} or P @ {name}")
        if name in FUNCTIONS:
            self.fail(e.span, f"'{name}' is a function: {FUNCTIONS[name]}")
        if name == "_":
            self.fail(e.span, "'_' is only the catch-all selector inside heads { ... }")
        self.unknown(name, e.span, ctx)

    def unknown(self, name: str, span: Span, ctx: Ctx, what: str = "name"):
        candidates = [*ctx.locals, *ctx.module.visible_names(), *PRIMITIVES, *FUNCTIONS, *ir.SIZE_NAMES, *ctx.layout.axes]
        close = difflib.get_close_matches(name, candidates, n=1)
        self.fail(span, f"unknown {what} '{name}'", f"did you mean '{close[0]}'?" if close else None)

    def recall(self, key: tuple):
        """The memoised value for key (see [Note: shared sub-results]), MISSING, or Abort replayed."""
        v = self.memo.get(key, MISSING)
        if v is FAILED:
            raise Abort
        return v

    def let_value(self, let: ast.Let, scope: ModuleScope, ctx: Ctx):
        memo_key = ("let", id(let), ctx.layout, ctx.in_where, ctx.along, ctx.transformed)
        v = self.recall(memo_key)
        if v is not MISSING:
            return v
        key = f"{let.span.file}:{let.name}"
        if key in self.let_stack:
            chain = " -> ".join([*self.let_stack[self.let_stack.index(key):], key]).replace(f"{let.span.file}:", "")
            self.fail(let.name_span, f"'{let.name}' is defined in terms of itself ({chain})")
        self.let_stack.append(key)
        try:
            # module-level lets see module names only, not the caller's locals
            v = self.ev(let.value, Ctx(scope, ctx.layout, {}, ctx.in_where, ctx.along, ctx.transformed))
        except Abort:
            self.memo[memo_key] = FAILED
            raise
        finally:
            self.let_stack.pop()
        self.memo[memo_key] = v
        return v

    def ev_Coord(self, e: ast.Coord, ctx: Ctx):
        if e.base not in ("q", "k"):
            self.fail(e.span, f"'{e.base}.{e.axis}': only q.AXIS and k.AXIS name grid coordinates")
        if not ctx.in_where:
            self.fail(e.span, f"'{e.base}.{e.axis}' is only defined inside `where`")
        if e.axis not in ctx.layout.axes:
            if not ctx.layout.axes:
                self.fail(e.span, f"'{e.base}.{e.axis}' needs a grid layout: pattern ... on grid(h, w) = ...")
            close = difflib.get_close_matches(e.axis, list(ctx.layout.axes), n=1)
            self.fail(e.span, f"unknown grid axis '{e.axis}' (the layout has {', '.join(ctx.layout.axes)})",
                      f"did you mean '{close[0]}'?" if close else None)
        if ctx.along is not None:
            self.fail(e.span, f"grid coordinates are not defined inside `@ {ctx.along}` (it is 1-D): use q and k")
        return Pos(ir.PVar(name=e.base, axis=e.axis, span=e.span), False)

    def ev_LetIn(self, e: ast.LetIn, ctx: Ctx):
        if e.name in ir.SIZE_NAMES or e.name == "_":
            self.fail(e.span, f"'{e.name}' cannot be bound with let: M, N, H and _ are reserved")
        v = self.ev(e.value, ctx)
        inner = ctx.child()
        inner.locals[e.name] = v
        inner.hidden.pop(e.name, None)
        note_hidden(inner, e.name, "let binding")
        return self.ev(e.body, inner)

    def ev_Call(self, e: ast.Call, ctx: Ctx):
        name = e.func
        if name in ctx.locals and not (name in FUNCTIONS or name in PRIMITIVES):
            # a local that shadows a built-in name shadows it only as a value: `size(h)` still works
            self.fail(e.func_span, f"'{name}' is {type_name(ctx.locals[name])}, not a pattern or function")
        if name in ir.SCORE_FUNCTIONS and name not in ctx.locals and ctx.module.lookup(name) is None:
            if not ctx.in_score:
                self.fail(e.func_span, f"{name}() is a function of score terms only", f"score {name}(score)")
            if e.kwargs or len(e.args) != 1:
                self.fail(e.span, f"{name} takes one argument")
            arg = self.real(self.ev(e.args[0], ctx), e.args[0].span)
            return ScoreVal(ir.SCall(func=name, args=(arg,), span=e.span))
        if name in FUNCTIONS:
            return self.call_function(e, ctx)
        found = ctx.module.lookup(name)
        if found is not None:
            kind, node, scope = found
            if kind == "let":
                v = self.let_value(node, scope, ctx)
                if isinstance(v, PatternRef):
                    return self.call_pattern(v, e.args, e.kwargs, e.span, ctx)
                self.fail(e.func_span, f"'{name}' is {type_name(v)}, not a pattern or function")
            return self.call_pattern(PatternRef(node, scope), e.args, e.kwargs, e.span, ctx)
        if name in PRIMITIVES:
            return self.call_primitive(name, e.args, e.kwargs, e.span, e.func_span, ctx)
        if name in ("q", "k", "h", *ir.SIZE_NAMES):
            self.fail(e.func_span, f"'{name}' is not a function")
        self.unknown(name, e.func_span, ctx, "pattern or primitive")

    def call_function(self, e: ast.Call, ctx: Ctx):
        name = e.func
        if e.kwargs:
            self.fail(e.kwargs[0].span, f"{name}() takes no keyword arguments")
        if name == "size":
            if len(e.args) != 1 or not isinstance(e.args[0], ast.Name):
                self.fail(e.span, "size takes one grid axis name: size(h)")
            axis = e.args[0].id
            if axis not in ctx.layout.axes:
                if not ctx.layout.axes:
                    self.fail(e.args[0].span, f"size({axis}) needs a grid layout: pattern ... on grid({axis}, ...) = ...")
                close = difflib.get_close_matches(axis, list(ctx.layout.axes), n=1)
                self.fail(e.args[0].span, f"unknown grid axis '{axis}' (the layout has {', '.join(ctx.layout.axes)})",
                          f"did you mean '{close[0]}'?" if close else None)
            return ir.axis_size(axis)
        args = [self.ev(a, ctx) for a in e.args]
        if name == "abs" and len(args) != 1:
            self.fail(e.span, f"abs takes one argument, got {len(args)}")
        if name in ("min", "max") and len(args) < 2:
            self.fail(e.span, f"{name} takes at least two arguments, got {len(args)}")
        for a, arg in zip(e.args, args):
            if arg is POISON:
                raise Abort
        if ctx.in_score and any(isinstance(a, ScoreVal) for a in args):
            return ScoreVal(ir.SCall(func=name, args=tuple(self.real(v, a.span) for a, v in zip(e.args, args)), span=e.span))
        for a, arg in zip(e.args, args):
            if not (is_int(arg) or (isinstance(arg, Pos) and not arg.boolean)):
                self.fail(a.span, f"{name}() takes integers, got {type_name(arg)}")
        if any(isinstance(a, Pos) for a in args):
            return Pos(ir.PCall(func=name, args=tuple(self.pos(a) for a in args), span=e.span), False)
        fn = {"min": sympy.Min, "max": sympy.Max, "abs": sympy.Abs}[name]
        return fn(*args)

    def call_pattern(self, ref: PatternRef, args, kwargs, span: Span, ctx: Ctx):
        pdef = ref.definition
        if pdef.name in self.call_stack:
            chain = " -> ".join([*self.call_stack, pdef.name])
            self.fail(span, f"pattern '{pdef.name}' calls itself ({chain}); patterns cannot be recursive")
        if len(self.call_stack) >= self.MAX_CALL_DEPTH:
            chain = " -> ".join([*self.call_stack[:3], "...", *self.call_stack[-2:], pdef.name])
            self.fail(span, f"pattern calls nested more than {self.MAX_CALL_DEPTH} deep ({chain})")
        if pdef.layout is not None:
            callee_layout = self.layout(pdef, ref.module)
            if callee_layout.axes != ctx.layout.axes:
                self.fail(span, f"pattern '{pdef.name}' is on {callee_layout} but is used on {ctx.layout}",
                          "declare the callee without `on ...` to use it on any layout")
        if pdef.score is not None:
            self.fail(span, f"pattern '{pdef.name}' has a score term; a called pattern contributes only its mask, "
                            "so only the pattern that is bound may have one",
                      "call a mask-only pattern and write `score ...` on the calling pattern")
        params = pdef.params
        values: dict[str, object] = {}
        if len(args) > len(params):
            self.fail(span, f"pattern '{pdef.name}' takes {len(params)} argument(s), got {len(args)}")
        for p, a in zip(params, args):
            values[p.name] = a
        for kw in kwargs:
            if kw.name not in {p.name for p in params}:
                close = difflib.get_close_matches(kw.name, [p.name for p in params], n=1)
                self.fail(kw.span, f"pattern '{pdef.name}' has no parameter '{kw.name}'",
                          f"did you mean '{close[0]}'?" if close else None)
            if kw.name in values:
                self.fail(kw.span, f"argument '{kw.name}' given twice")
            values[kw.name] = kw.value
        # arguments are evaluated in the caller's context; defaults in the callee's
        evaluated: dict[str, object] = {}
        for name, v in values.items():
            evaluated[name] = self.ev(v, ctx)
            if evaluated[name] is POISON:
                raise Abort
        try:
            memo_key = ("call", id(pdef), ctx.layout, ctx.along, ctx.transformed,
                        tuple(sorted((n, memo_key_of(v)) for n, v in evaluated.items())))
            hash(memo_key)
        except TypeError:  # a value without a stable key: elaborate afresh
            memo_key = None
        else:
            v = self.recall(memo_key)
            if v is not MISSING:
                return v[1]
        inner = Ctx(ref.module, ctx.layout, {}, False, False, ctx.along, ctx.transformed)
        for p in params:
            if p.name in evaluated:
                v = evaluated[p.name]
                if p.type is not None:
                    if not isinstance(v, InputRef) or v.spec.kind != p.type.name:
                        self.fail(span, f"argument '{p.name}' of '{pdef.name}' must be a run-time input of type {p.type.name}, got {type_name(v)}")
                inner.locals[p.name] = v
            else:
                inner.locals[p.name] = self.param_value(p, inner, {}, top=False)
            note_hidden(inner, p.name, "parameter")
        self.call_stack.append(pdef.name)
        try:
            v = self.mask_of(pdef.body, inner, what=f"the body of pattern '{pdef.name}'")
        finally:
            self.call_stack.pop()
        if memo_key is not None:  # the arguments stay referenced, so the ids in the key stay valid
            self.memo[memo_key] = (evaluated, v)
        return v
