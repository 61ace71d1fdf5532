"""Elaboration of score terms (`score EXPR`): real arithmetic over score, tables and positions.

input:  the pattern's `score` expression, decimal literals and table reads `t[i, ...]`.
output: an ir.ScoreTerm (ScoreTerms, a mixin of elaborate.Elaborator), with diagnostics for
        tables never read and values that are not numbers.
does not: evaluate masks or conditions (elab_exprs.py), or lower scores to kernels (codegen/score.py).
"""

from __future__ import annotations

from . import ir, syntax as ast
from .elab_values import Abort, Ctx, POISON, Pos, ScoreVal, TableRef, is_int, type_name
from .errors import Span, error


class ScoreTerms:
    """Mixin of elaborate.Elaborator: the score term and its real-valued expressions."""

    # -- score terms
    def score_of(self, pdef: ast.PatternDef, ctx: Ctx) -> ir.ScoreTerm | None:
        """The pattern's `score EXPR` as IR (None without one); tables not read are an error."""
        e = pdef.score
        if e is None:
            for spec in self.tables.values():
                self.diags.add(error(spec.span, f"table input '{spec.name}' is never read: tables are read by a score term",
                                     f"add `score score + {spec.name}[...]` after the mask, or remove the input"))
            return None
        try:
            v = self.ev(e, ctx.child(in_where=True, in_score=True))
        except Abort:
            return None
        if v is POISON:
            return None
        if is_int(v) or (isinstance(v, Pos) and not v.boolean):
            v = ScoreVal(ir.SPos(node=self.pos(v), span=e.span))
        if not isinstance(v, ScoreVal):
            self.diags.add(error(e.span, f"a score term must be a number, got {type_name(v)}",
                                 "score score + bias[h, q - k], score 30 * tanh(score / 30)"))
            return None
        used = {n.table for n in _score_nodes(v.node) if isinstance(n, ir.SIndex)}
        for spec in self.tables.values():
            if spec.name not in used:
                self.diags.add(error(spec.span, f"table input '{spec.name}' is never read by the score term",
                                     f"index it, e.g. {spec.name}[h, ...], or remove the input"))
        return ir.ScoreTerm(expr=v.node, tables=tuple(self.tables.values()), span=e.span)

    def real(self, v, span: Span) -> ir.SExpr:
        """An operand of real arithmetic inside a score term."""
        if isinstance(v, ScoreVal):
            return v.node
        if is_int(v) or (isinstance(v, Pos) and not v.boolean):
            return ir.SPos(node=self.pos(v), span=span)
        self.fail(span, f"score arithmetic takes numbers, got {type_name(v)}")

    def ev_Real(self, e: ast.Real, ctx: Ctx):
        if not ctx.in_score:
            self.fail(e.span, f"'{e.value}' is not an integer: decimal numbers appear only in score terms",
                      "masks and their arguments use integers")
        return ScoreVal(ir.SNum(value=e.value, span=e.span))

    def ev_Index(self, e: ast.Index, ctx: Ctx):
        if not ctx.in_score:
            self.fail(e.span, f"'{e.base}[...]' reads a table: only score terms do", "score score + table[...]")
        ref = ctx.locals.get(e.base)
        if not isinstance(ref, TableRef):
            if e.base in ctx.locals:
                self.fail(e.base_span, f"'{e.base}' is {type_name(ctx.locals[e.base])}, not a table input",
                          f"declare it as {e.base}: table(d1, ...)")
            self.unknown(e.base, e.base_span, ctx, "table input")
        dims = ref.spec.dims
        if len(e.indices) != len(dims):
            self.fail(e.span, f"table '{e.base}' has {len(dims)} dimension(s), indexed with {len(e.indices)}",
                      f"{e.base}[" + ", ".join(f"i{j}" for j in range(len(dims))) + "]")
        idx = []
        for x in e.indices:
            v = self.ev(x, ctx)
            if v is POISON:
                raise Abort
            if not (is_int(v) or (isinstance(v, Pos) and not v.boolean)):
                self.fail(x.span, f"a table index must be an integer expression, got {type_name(v)}",
                          "integer arithmetic of q, k, h, q.a, k.a and parameters")
            idx.append(self.pos(v))
        return ScoreVal(ir.SIndex(table=e.base, indices=tuple(idx), span=e.span))


def _score_nodes(node: ir.SExpr):
    """Every node of a score expression (its integer parts not entered)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, ir.SBin):
            stack += [n.left, n.right]
        elif isinstance(n, ir.SNeg):
            stack.append(n.operand)
        elif isinstance(n, ir.SCall):
            stack += list(n.args)
