"""Size-tagged integers: how generated kernels become generic in the sizes.

input:  concrete sizes (M, N, grid axis lengths) wrapped as `Sym` by the code
        generators (pointwise.lower, bounds.loop_bounds).
output: integers that still behave as the concrete values everywhere (every
        decision the generators make is made at the concrete sizes) but carry
        the expression of the sizes they were computed from, so a constant
        printed into a kernel reads `N - 4` instead of `4092`.
does not: decide anything symbolically, or promise that two sizes share a
        kernel: see [Note: one text, many sizes].

[Note: one text, many sizes] The generators run at the call's concrete sizes,
exactly as before, and print every size-derived constant as an expression of
the kernels' run-time arguments `M`, `N`, `G0`, `G1`, ... (`size_args`). The
kernel text is therefore the same at every size where the generators made the
same decisions (which tiles are full, which ranges merge, which comparisons
fold), and the compiled kernels are keyed by that text: a new length costs the
host-side generation (milliseconds) and reuses the compiled kernels whenever
its text was seen before. This is sound without any proof about other sizes:
the text used at a size is the text generated *for* that size, and a printed
expression is checked against the concrete value before it is printed
(`text`: a mismatch prints the literal instead). What can go wrong is only
extra compilations: a constant whose tag was lost (a value that went through
torch, or a cached helper) prints as a literal, and its text then differs
between sizes. tests/test_generic.py counts them per example.
"""

from __future__ import annotations

#: a node: ("v", name) | ("c", value) | (op, a, b) with op in + - * // % | ("neg", a) | ("cdiv", a, c)
_PREC = {"v": 9, "c": 9, "cdiv": 5, "+": 1, "-": 1, "*": 2, "//": 2, "%": 2, "neg": 3}


def _nonneg(e) -> bool:
    """Structurally non-negative for every size >= 1 (sizes are, constants >= 0 are)."""
    op = e[0]
    if op == "v":
        return True
    if op == "c":
        return e[1] >= 0
    if op in ("+", "*", "//", "%", "cdiv"):
        return _nonneg(e[1]) and _nonneg(e[2]) if op != "cdiv" else _nonneg(e[1])
    return False


def _positive_const(e) -> bool:
    return e[0] == "c" and e[1] > 0


def _node(x):
    if isinstance(x, Sym):
        return x.expr
    if isinstance(x, bool) or not isinstance(x, int):
        return None
    return ("c", int(x))


class Sym(int):
    """An int that remembers the size expression it was computed from (`expr`,
    None when the expression could not be kept exactly, e.g. a floor division
    of a difference, whose sign may change with the sizes)."""

    def __new__(cls, value: int, expr=None):
        self = super().__new__(cls, int(value))
        self.expr = expr
        return self

    @staticmethod
    def size(name: str, value: int) -> "Sym":
        return Sym(value, ("v", name))

    # repr / str stay the integer's: generated text, sort keys and messages read exactly
    # as at plain sizes unless a printer asks for the expression (`text`)
    __repr__ = int.__repr__
    __str__ = int.__repr__

    # two tagged values with different expressions are different constants even when
    # equal here (G0 = G1 = 16): caches keyed by expressions must not print one as the other
    def __eq__(self, other):
        if isinstance(other, Sym) and self.expr is not None and other.expr is not None and self.expr != other.expr:
            return False
        return int.__eq__(self, other)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = int.__hash__

    def describe(self) -> str:
        return f"{int(self)} = {text_of(self.expr) if self.expr else '?'}"

    def __reduce__(self):  # pickles (and deep-copies) as a plain int
        return (int, (int(self),))

    # -- arithmetic keeps the expression
    def _bin(self, other, op, value, swap=False):
        a, b = _node(self), _node(other)
        if swap:
            a, b = b, a
        if a is None or b is None:
            return Sym(value, None) if (isinstance(other, int) and not isinstance(other, bool)) else NotImplemented
        return Sym(value, _combine(op, a, b))

    def __add__(self, o):
        return self._bin(o, "+", int(self) + int(o)) if isinstance(o, int) else NotImplemented

    def __radd__(self, o):
        return self._bin(o, "+", int(o) + int(self), True) if isinstance(o, int) else NotImplemented

    def __sub__(self, o):
        return self._bin(o, "-", int(self) - int(o)) if isinstance(o, int) else NotImplemented

    def __rsub__(self, o):
        return self._bin(o, "-", int(o) - int(self), True) if isinstance(o, int) else NotImplemented

    def __mul__(self, o):
        return self._bin(o, "*", int(self) * int(o)) if isinstance(o, int) else NotImplemented

    def __rmul__(self, o):
        return self._bin(o, "*", int(o) * int(self), True) if isinstance(o, int) else NotImplemented

    def __floordiv__(self, o):
        return self._bin(o, "//", int(self) // int(o)) if isinstance(o, int) else NotImplemented

    def __rfloordiv__(self, o):
        return self._bin(o, "//", int(o) // int(self), True) if isinstance(o, int) else NotImplemented

    def __mod__(self, o):
        return self._bin(o, "%", int(self) % int(o)) if isinstance(o, int) else NotImplemented

    def __rmod__(self, o):
        return self._bin(o, "%", int(o) % int(self), True) if isinstance(o, int) else NotImplemented

    def __neg__(self):
        e = self.expr
        return Sym(-int(self), None if e is None else _canonical(("neg", e)))

    def __pos__(self):
        return self

    def __abs__(self):
        return self if int(self) >= 0 and self.expr is not None and _nonneg(self.expr) else Sym(abs(int(self)), None)

    def __index__(self):
        return int(self)


def _affine(e) -> tuple[dict, int]:
    """e as ({atom: coefficient}, constant): atoms are sizes and the non-linear nodes."""
    op = e[0]
    if op == "c":
        return {}, e[1]
    if op == "neg":
        terms, c = _affine(e[1])
        return {a: -k for a, k in terms.items()}, -c
    if op in ("+", "-"):
        (ta, ca), (tb, cb) = _affine(e[1]), _affine(e[2])
        sign = 1 if op == "+" else -1
        out = dict(ta)
        for a, k in tb.items():
            out[a] = out.get(a, 0) + sign * k
        return {a: k for a, k in out.items() if k}, ca + sign * cb
    if op == "*" and (e[1][0] == "c" or e[2][0] == "c"):
        k, x = (e[1][1], e[2]) if e[1][0] == "c" else (e[2][1], e[1])
        terms, c = _affine(x)
        return {a: k * v for a, v in terms.items() if k * v}, k * c
    return {e: 1}, 0


_ORDER = {"N": 0, "M": 1}


def _atom_key(a):
    if a[0] == "v":
        return (0, _ORDER.get(a[1], 2), a[1])
    return (1, 0, text_of(a))


def _from_affine(terms: dict, c: int):
    """The canonical node of an affine form: terms with positive coefficients first
    (N, M, G0, ..., then other atoms), then the negative ones, then the constant."""
    items = sorted(terms.items(), key=lambda t: (t[1] < 0, _atom_key(t[0])))
    node = None
    for atom, k in items:
        part = atom if abs(k) == 1 else ("*", atom, ("c", abs(k)))
        if node is None:
            node = part if k > 0 else ("neg", part)
        else:
            node = ("+" if k > 0 else "-", node, part)
    if node is None:
        return ("c", c)
    if c > 0:
        return ("+", node, ("c", c))
    if c < 0:
        return ("-", node, ("c", -c))
    return node


def _canonical(e):
    return _from_affine(*_affine(e))


def _combine(op, a, b):
    """The node a <op> b, in canonical form where it is affine; None when it cannot be kept."""
    if a[0] == "c" and b[0] == "c":
        x, y = a[1], b[1]
        if op in ("//", "%") and y == 0:
            return None
        return ("c", _apply(op, x, y))
    if op in ("+", "-") or (op == "*" and "c" in (a[0], b[0])):
        return _canonical((op, a, b))
    if op in ("//", "%"):
        if op == "//" and b == ("c", 1):
            return a
        # Triton's // and % truncate toward zero: keep only forms where that equals Python's floor
        if op == "//" and a[0] == "neg" and _nonneg(a[1]) and _positive_const(b):
            return ("neg", ("cdiv", a[1], b))  # -(-x // c) == cdiv(x, c)
        if not (_nonneg(a) and (_positive_const(b) or (b[0] == "v"))):
            return None
    return (op, a, b)


def _apply(op, x, y):
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    if op == "//":
        return x // y
    return x % y


def evaluate(e, env: dict) -> int:
    op = e[0]
    if op == "v":
        return int(env[e[1]])
    if op == "c":
        return e[1]
    if op == "neg":
        return -evaluate(e[1], env)
    x, y = evaluate(e[1], env), evaluate(e[2], env)
    if op == "cdiv":
        return -(-x // y)
    return _apply(op, x, y)


def text_of(e, parent: int = 0) -> str:
    """Python / Triton text of a node (the // and % in it have non-negative operands)."""
    op = e[0]
    if op == "v":
        return e[1]
    if op == "c":
        s = str(e[1])
        return f"({s})" if e[1] < 0 and parent > 0 else s
    if op == "neg":
        s = "-" + text_of(e[1], _PREC["neg"] + 1)
        return f"({s})" if parent > 0 else s
    if op == "cdiv":
        c = e[2][1]
        s = f"({text_of(e[1], 1)} + {c - 1}) // {c}"
        return f"({s})" if parent >= _PREC["//"] else s
    p = _PREC[op]
    s = f"{text_of(e[1], p)} {op} {text_of(e[2], p + 1)}"
    return f"({s})" if parent > p else s


def is_sized(v) -> bool:
    """Whether v prints as an expression of sizes (not a literal)."""
    return isinstance(v, Sym) and v.expr is not None and v.expr[0] != "c"


def text(v, env: dict | None, parent: int = 0) -> str:
    """How a generated kernel spells the integer v: its size expression when it has
    one and that expression evaluates to v at the sizes `env` (the check that keeps
    [Note: one text, many sizes] sound), else the literal."""
    if env is not None and is_sized(v):
        try:
            if evaluate(v.expr, env) == int(v):
                return text_of(v.expr, parent)
        except (KeyError, ZeroDivisionError):
            pass
    s = str(int(v))
    return f"({s})" if int(v) < 0 and parent > 0 else s


def tag_of(*values):
    """What tells apart equal integers with different size expressions (for the
    equality of expression nodes that hold them): their expressions, or None."""
    tags = tuple(v.expr if is_sized(v) else None for v in values)
    return None if not any(tags) else tags


def size_args(rank: int) -> tuple[str, ...]:
    """The kernels' run-time size arguments besides M and N: one per grid axis."""
    return tuple(f"G{i}" for i in range(rank))


def size_env(M: int, N: int, grid=None) -> dict:
    """The values of the size names (`M`, `N`, `G0`, ...) at concrete sizes."""
    env = {"M": int(M), "N": int(N)}
    for i, g in enumerate(grid or ()):
        env[f"G{i}"] = int(g)
    return env


def tag(M: int, N: int, grid=None):
    """(M, N, grid) as `Sym`s named like the kernels' size arguments."""
    return (Sym.size("M", M), Sym.size("N", N),
            None if grid is None else tuple(Sym.size(f"G{i}", g) for i, g in enumerate(grid)))


def keep_expression(expr, env: dict, value):
    """`value` (what an evaluator computed for the sympy expression `expr` over `env`) with
    the size expression kept when `expr` is built from sizes (`w = N // 8`), so kernels
    compute it from their size arguments; `value` itself otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and getattr(expr, "free_symbols", None):
        tagged = from_sympy(expr, env)
        if tagged is not None and int(tagged) == value:
            return tagged
    return value


def from_sympy(expr, env: dict):
    """A sympy integer expression of sizes evaluated over `env` (symbol -> int or Sym),
    keeping size tags where the operations are + - * floor(x / c) Mod Min Max; None
    when some part is outside that set (the caller keeps the plain value)."""
    import sympy

    def go(e):
        if isinstance(e, (int, Sym)):
            return e
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            return env[e]
        if isinstance(e, sympy.Add):
            out = 0
            for a in e.args:
                out = out + go(a)
            return out
        if isinstance(e, sympy.Mul):
            out = 1
            for a in e.args:
                if a.is_Rational and not a.is_Integer:
                    raise ValueError(e)
                out = out * go(a)
            return out
        if isinstance(e, sympy.floor):
            (arg,) = e.args
            num, den = arg.as_numer_denom()
            return go(num) // go(den)
        if isinstance(e, sympy.Mod):
            return go(e.args[0]) % go(e.args[1])
        if isinstance(e, (sympy.Min, sympy.Max)):
            vals = [go(a) for a in e.args]
            return (min if isinstance(e, sympy.Min) else max)(vals, key=int)
        raise ValueError(e)

    try:
        return go(expr)
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
