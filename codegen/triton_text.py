"""The Triton printer: a lowered mask as the source of a `@triton.jit` function `_mask`.

input:  a `Lowered` mask (lowered.py).
output: `triton_mask_source`: `_mask(q, k, h, b, <sizes>, <table pointers>)` and the
        floor-division helpers it calls; `TritonPrinter` for callers that print other
        expressions with the same rules (score terms, the kernels' headers), `table_arg`,
        `mask_size_args`, `helper_lines`.
does not: lower patterns (pointwise.py) or generate the kernels around `_mask` (kernels.py,
        decode_kernel.py).
"""

from __future__ import annotations

from . import sizes as size_tags
from .expr import COMPARE, INFIX, Builder, Const, Expr, Lookup, Op, Var, children, nodes
from .lowered import Lowered


#: Python operator precedences (higher binds tighter): `&` / `|` bind tighter
#: than comparisons, so comparisons inside them are parenthesised.
_TL_PREC = {"or": 7, "and": 9, "cmp": 5, "add": 12, "sub": 12, "mul": 13, "floordiv": 13, "mod": 13,
            "neg": 14, "not": 14, "atom": 100}
_TL_BOOL = {"and": " & ", "or": " | "}


class TritonPrinter:
    """Prints a `Lowered` mask as the body of a `@triton.jit` function
    `_mask(q, k, h, b, <table pointers>)`: one temporary per shared
    subexpression, Python floor semantics where operands may be negative."""

    def __init__(self, low: Lowered):
        self.low = low
        #: the sizes size-tagged constants are checked against ([Note: one text, many sizes]);
        #: None (N-D tiles: positions of the padded tile-major order) prints literals
        self.env = None if low.tiles is not None else size_tags.size_env(low.M, low.N, low.grid)
        self.builder = Builder(dict(low.var_bounds))
        self.tables = {t.name: t for t in low.tables}
        self.helpers: set[str] = set()

    def nonneg(self, e: Expr) -> bool:
        lo, _ = self.builder.bounds(e)
        return lo is not None and lo >= 0

    def lines(self) -> tuple[list[str], str]:
        """(statements, final expression)."""
        expr = self.low.expr
        refs: dict[Expr, int] = {}
        order = nodes(expr)
        for n in order:
            for c in children(n):
                refs[c] = refs.get(c, 0) + 1
        text: dict[Expr, tuple[str, int]] = {}
        out: list[str] = []
        for n in order:
            t = self.render(n, text)
            composite = isinstance(n, (Op, Lookup)) and not (isinstance(n, Op) and n.op == "neg")
            long_part = len(t[0]) > 72 and refs.get(n, 0) >= 1
            if n is not expr and composite and (refs.get(n, 0) > 1 or long_part):
                name = f"t{len([1 for s in out])}"
                out.append(f"{name} = {t[0]}")
                t = (name, _TL_PREC["atom"])
            text[n] = t
        return out, text[expr][0]

    def render(self, n: Expr, text) -> tuple[str, int]:
        def sub(c, need, strict=False):
            s, p = text[c]
            return f"({s})" if p < need or (strict and p == need) else s

        if isinstance(n, Var):
            return n.name, _TL_PREC["atom"]
        if isinstance(n, Const):
            v = n.value
            if isinstance(v, bool):
                return str(v), _TL_PREC["atom"]
            s = size_tags.text(v, self.env)
            if s.lstrip("-").isdigit():  # a literal
                return s, (_TL_PREC["atom"] if v >= 0 else _TL_PREC["neg"])
            return (s if s.isidentifier() else f"({s})"), _TL_PREC["atom"]
        if isinstance(n, Lookup):
            t = self.tables[n.table]
            strides = t.strides()
            terms = []
            idx = list(n.index)
            if t.batched:
                terms.append(f"b * {size_tags.text(_product(t.shape), self.env, 2)}")
                idx = idx[1:]
            for i, s in zip(idx, strides):
                if isinstance(i, Const) and i.value == 0:
                    continue
                terms.append(sub(i, _TL_PREC["mul"]) + (f" * {size_tags.text(s, self.env, 3)}" if s != 1 else ""))
            load = f"tl.load({table_arg(n.table)} + {' + '.join(terms) or '0'})"
            if n.bit is None:
                return load, _TL_PREC["atom"]
            return f"((({load}) >> {sub(n.bit, _TL_PREC['atom'])}) & 1) != 0", _TL_PREC["cmp"]
        op = n.op
        a = n.args
        if op in _TL_BOOL:
            need = _TL_PREC[op] + (1 if op == "or" else 0)
            return _TL_BOOL[op].join(sub(x, need + (3 if op == "or" else 0)) for x in a), _TL_PREC[op]
        if op == "not":
            return f"~{sub(a[0], _TL_PREC['atom'])}", _TL_PREC["not"]
        if op in COMPARE:
            return f"{sub(a[0], _TL_PREC['cmp'] + 1)} {COMPARE[op]} {sub(a[1], _TL_PREC['cmp'] + 1)}", _TL_PREC["cmp"]
        if op in ("floordiv", "mod"):
            c = a[1]
            if self.nonneg(a[0]) and isinstance(c, Const) and c.value > 0:
                p = _TL_PREC[op]
                return f"{sub(a[0], p)} {INFIX[op]} {sub(c, p, strict=True)}", p
            helper = "_floordiv" if op == "floordiv" else "_floormod"
            self.helpers.add(helper)
            return f"{helper}({text[a[0]][0]}, {text[a[1]][0]})", _TL_PREC["atom"]
        if op in ("add", "sub", "mul"):
            p = _TL_PREC[op]
            return f"{sub(a[0], p)} {INFIX[op]} {sub(a[1], p, strict=op != 'add' and op != 'mul')}", p
        if op == "neg":
            return f"-{sub(a[0], _TL_PREC['neg'])}", _TL_PREC["neg"]
        if op in ("min", "max"):
            return f"tl.{op}imum({text[a[0]][0]}, {text[a[1]][0]})", _TL_PREC["atom"]
        if op == "abs":
            return f"tl.abs({text[a[0]][0]})", _TL_PREC["atom"]
        raise ValueError(op)

    def source(self) -> str:
        """The `_mask` function (and the floor-division helpers it calls)."""
        low = self.low
        args = ", ".join(["q", "k", "h", "b", *mask_size_args(low)] + [table_arg(t.name) for t in low.tables])
        doc = [f'    """{low.name}: True where query row q may attend key k (head h, batch b).',
               "",
               "    q, k are clamped into [0, M) and [0, N) by the caller; they broadcast",
               '    ([BLOCK_M, 1] and [1, BLOCK_N] in the forward kernel, transposed in dK/dV)."""']
        if isinstance(low.expr, Const):
            body = ["# the pattern allows every pair" if low.expr.value else "# the pattern allows no pair",
                    f"return {'(q >= 0) & (k >= 0)' if low.expr.value else '(q < 0) & (k < 0)'}"]
        else:
            stmts, final = self.lines()
            body = stmts + [f"return {final}"]
        fn = ["@triton.jit", f"def _mask({args}):", *doc, *("    " + s for s in body)]
        return "\n".join(helper_lines(self.helpers) + fn) + "\n"


#: the floor-division helpers printed expressions call (Triton's // and % truncate toward zero)
_FLOOR_HELPERS = {
    "_floordiv": ["@triton.jit", "def _floordiv(a, b):",
                  '    """Python\'s a // b (Triton\'s // truncates toward zero)."""',
                  "    q = a // b",
                  "    return tl.where((a % b != 0) & ((a < 0) != (b < 0)), q - 1, q)", "", ""],
    "_floormod": ["@triton.jit", "def _floormod(a, b):",
                  '    """Python\'s a % b (the sign of b; Triton\'s % takes the sign of a)."""',
                  "    r = a % b",
                  "    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)", "", ""],
}


def helper_lines(names, defined: str = "") -> list[str]:
    """Source lines of the floor-division helpers in `names` that `defined` (module text
    printed already) does not define yet."""
    return [line for name in ("_floordiv", "_floormod") if name in names and f"def {name}(" not in defined
            for line in _FLOOR_HELPERS[name]]


def table_arg(name: str) -> str:
    """The Triton argument of table `name` ([Note: table names] in lowered.py)."""
    return f"tbl_{name}"


def mask_size_args(low: Lowered) -> tuple[str, ...]:
    """The run-time sizes `_mask` takes after (q, k, h, b): M, N and one per grid axis
    (size-tagged constants print as expressions of them)."""
    return ("M", "N", *size_tags.size_args(len(low.grid or ())))


def _product(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


def triton_mask_source(low: Lowered) -> str:
    """Triton source of `_mask(q, k, h, b, tbl_...)` for a lowered pattern."""
    return TritonPrinter(low).source()
