"""Score terms as Triton: `_score`, its reverse-mode derivative and the tables' gradients.

input:  a `ScoreFn` (score.py: the term at concrete sizes), the `Lowered` mask it goes
        with (sizes and the integer printer) and the mask's Triton source (its helpers).
output: Triton source of `_score`, `_score_grad` and `_score_grad_tables`
        (`triton_score_source`: straight-line code, one value and one adjoint per node) and
        the kernel arguments of the tables and their gradients (`score_arg`, `grad_arg`).
does not: lower the term or evaluate it in torch (score.py), or decide where the kernels
        call it (kernels.py, [Note: score kernels]; decode_kernel.py).
"""

from __future__ import annotations

from .expr import Const, Expr
from .lowered import Lowered
from .score import Bin, Fn, Int, Neg, Read, Real, Score, ScoreFn, has_score, is_live
from .triton_text import TritonPrinter, helper_lines, mask_size_args


def score_arg(name: str) -> str:
    """The kernel argument holding table `name` (float32, contiguous)."""
    return f"sc_{name}"


def grad_arg(name: str) -> str:
    """The kernel argument accumulating the gradient of table `name` (float32, zeroed)."""
    return f"dsc_{name}"


class _TritonScore:
    """Straight-line Triton text of a score term and of its reverse-mode derivative."""

    def __init__(self, fn: ScoreFn, low: Lowered):
        self.fn = fn
        self.low = low
        self.order = []  # nodes in post-order (children first), each once
        seen = set()

        def visit(e):
            if id(e) in seen:
                return
            seen.add(id(e))
            for c in (e.a, e.b) if isinstance(e, Bin) else (e.a,) if isinstance(e, Neg) else e.args if isinstance(e, Fn) else ():
                visit(c)
            self.order.append(e)

        visit(fn.expr)
        self.name = {id(e): f"v{i}" for i, e in enumerate(self.order)}
        self.helpers: set[str] = set()
        self.flats: dict[int, str] = {}

    def _int(self, e: Expr, prefix: str, out: list[str]) -> str:
        """Print an integer expression (temporaries renamed with `prefix`), returning its text."""
        import dataclasses
        import re

        printer = TritonPrinter(dataclasses.replace(self.low, expr=e, tables=()))
        stmts, final = printer.lines()
        self.helpers |= printer.helpers
        rename = lambda text: re.sub(r"\bt(\d+)\b", lambda m: f"{prefix}t{m.group(1)}", text)  # noqa: E731
        out += [rename(s) for s in stmts]
        return rename(final)

    def forward_lines(self) -> list[str]:
        out: list[str] = []
        for i, e in enumerate(self.order):
            v = self.name[id(e)]
            if isinstance(e, Score):
                out.append(f"{v} = s")
            elif isinstance(e, Real):
                out.append(f"{v} = {e.value!r}")
            elif isinstance(e, Int):
                if isinstance(e.expr, Const):
                    out.append(f"{v} = {float(int(e.expr.value))!r}")
                else:
                    out.append(f"{v} = ({self._int(e.expr, f'i{i}', out)}).to(tl.float32)")
            elif isinstance(e, Read):
                terms = []
                stride = 1
                for j in range(len(e.dims) - 1, -1, -1):
                    idx = self._int(e.index[j], f"r{i}_{j}", out)
                    clamped = f"tl.minimum(tl.maximum({idx}, 0), {e.dims[j] - 1})"
                    terms.append(clamped if stride == 1 else f"{clamped} * {stride}")
                    stride *= e.dims[j]
                flat = f"f{i}"
                out.append(f"{flat} = " + " + ".join(reversed(terms)))
                self.flats[id(e)] = flat
                out.append(f"{v} = tl.load({score_arg(e.table)} + {flat})")
            elif isinstance(e, Neg):
                out.append(f"{v} = -{self.name[id(e.a)]}")
            elif isinstance(e, Bin):
                a, b = self.name[id(e.a)], self.name[id(e.b)]
                if e.op == "**":
                    n = _const_int(e.b)
                    if n is not None and -8 <= n <= 8:
                        prod = " * ".join([a] * abs(n)) if n else f"{a} * 0.0 + 1.0"
                        out.append(f"{v} = " + (prod if n >= 0 else f"1.0 / ({prod})"))
                    else:
                        self.helpers.add("_pow")
                        out.append(f"{v} = _pow({a}, {b})")
                else:
                    out.append(f"{v} = {a} {e.op} {b}")
            elif isinstance(e, Fn):
                xs = [self.name[id(a)] for a in e.args]
                if e.name == "tanh":
                    out.append(f"{v} = 2.0 * tl.sigmoid(2.0 * {xs[0]}) - 1.0")
                elif e.name == "exp":
                    out.append(f"{v} = tl.exp({xs[0]})")
                elif e.name == "sigmoid":
                    out.append(f"{v} = tl.sigmoid({xs[0]})")
                elif e.name == "abs":
                    out.append(f"{v} = tl.abs({xs[0]})")
                else:
                    acc = xs[0]
                    for x in xs[1:]:
                        acc = f"tl.{e.name}imum({acc}, {x})"
                    out.append(f"{v} = {acc}")
            else:
                raise TypeError(e)
        return out

    def backward_lines(self, tables: bool) -> list[str]:
        """Lines computing `ds` from `g` (d loss / d term), after `forward_lines`; with
        `tables`, atomic adds of the tables' gradients."""
        out: list[str] = []
        contrib: dict[int, list[str]] = {id(self.fn.expr): ["g"]}
        # a zero upstream gradient stays zero whatever the local derivative (inf at masked pairs)
        times = lambda g, d: f"tl.where({g} == 0.0, 0.0, {g} * ({d}))"  # noqa: E731
        ds_parts: list[str] = []
        for e in reversed(self.order):
            if not is_live(e) or id(e) not in contrib:
                continue
            g = f"g{self.name[id(e)][1:]}"
            out.append(f"{g} = " + " + ".join(contrib[id(e)]))

            def add(child, text):
                if is_live(child):
                    contrib.setdefault(id(child), []).append(f"({text})")

            v = self.name[id(e)]
            if isinstance(e, Score):
                ds_parts.append(g)
            elif isinstance(e, Read):
                if tables:
                    flat = self.flats[id(e)]
                    out.append(f"tl.atomic_add({grad_arg(e.table)} + ({flat} + tl.zeros_like({g}).to(tl.int32)), {g}, "
                               f"mask={g} != 0.0)")
            elif isinstance(e, Neg):
                add(e.a, f"-{g}")
            elif isinstance(e, Bin):
                a, b = self.name[id(e.a)], self.name[id(e.b)]
                if e.op == "+":
                    add(e.a, g), add(e.b, g)
                elif e.op == "-":
                    add(e.a, g), add(e.b, f"-{g}")
                elif e.op == "*":
                    add(e.a, times(g, b)), add(e.b, times(g, a))
                elif e.op == "/":
                    add(e.a, times(g, f"1.0 / {b}")), add(e.b, times(g, f"-{v} / {b}"))
                else:
                    n = _const_int(e.b)
                    if n is not None and 1 <= n <= 8:
                        add(e.a, times(g, f"{float(n)!r}" + "".join(f" * {a}" for _ in range(n - 1))))
                    elif n != 0:
                        self.helpers.add("_pow")
                        add(e.a, times(g, f"{b} * _pow({a}, {b} - 1.0)"))
                    add(e.b, times(g, f"{v} * tl.log({a})"))
            elif isinstance(e, Fn):
                xs = [self.name[id(x)] for x in e.args]
                if e.name == "tanh":
                    add(e.args[0], f"{g} * (1.0 - {v} * {v})")
                elif e.name == "exp":
                    add(e.args[0], times(g, v))
                elif e.name == "sigmoid":
                    add(e.args[0], f"{g} * {v} * (1.0 - {v})")
                elif e.name == "abs":
                    add(e.args[0], f"tl.where({xs[0]} > 0, {g}, tl.where({xs[0]} < 0, -{g}, 0.0))")
                else:  # min / max: the first argument attaining the result takes the gradient
                    taken = f"k{v[1:]}"
                    out.append(f"{taken} = {v} != {v}")
                    for j, (x, arg) in enumerate(zip(xs, e.args)):
                        hit = f"{taken}_{j}"
                        out.append(f"{hit} = ({x} == {v}) & ~{taken}")
                        out.append(f"{taken} = {taken} | {hit}")
                        add(arg, f"tl.where({hit}, {g}, 0.0)")
        out.append("return " + (" + ".join(ds_parts) if ds_parts else "g * 0.0"))
        return out

    def source(self, mask_helpers: str) -> str:
        sizes = ", ".join(mask_size_args(self.low))
        tabs = "".join(f", {score_arg(n)}" for n, _ in self.fn.tables)
        grads = "".join(f", {grad_arg(n)}" for n, _ in self.fn.tables)
        fwd = self.forward_lines()
        doc = f'    """score term: {self.fn.text} (s: the scaled dot product; q, k clamped, broadcasting)."""'
        parts = ["@triton.jit", f"def _score(s, q, k, h, {sizes}{tabs}):", doc,
                 *("    " + x for x in fwd),
                 f"    return {self.name[id(self.fn.expr)]}" + ("" if has_score(self.fn.expr) else " + tl.zeros_like(s)"),
                 "", ""]
        for suffix, tables, extra in (("", False, ""), ("_tables", True, grads)):
            what = "d loss / d s, adding the tables' gradients (atomics)" if tables else "d loss / d s"
            parts += ["@triton.jit", f"def _score_grad{suffix}(s, g, q, k, h, {sizes}{tabs}{extra}):",
                      f'    """{what}, given g = d loss / d term."""',
                      *("    " + x for x in fwd), *("    " + x for x in self.backward_lines(tables)), "", ""]
        helpers = []
        if "_pow" in self.helpers:
            helpers += ["@triton.jit", "def _pow(a, b):",
                        '    """a ** b as torch.pow: real for a negative base and an integer-valued b."""',
                        "    mag = tl.exp2(b * tl.log2(tl.abs(a)))",
                        "    whole = b == tl.floor(b)",
                        "    odd = whole & (tl.floor(b * 0.5) * 2.0 != b)",
                        "    neg = tl.where(whole, tl.where(odd, -mag, mag), float(\"nan\"))",
                        "    return tl.where(b == 0.0, 1.0, tl.where(a < 0.0, neg, mag))", "", ""]
        helpers += helper_lines(self.helpers, mask_helpers)
        return "\n".join(helpers + parts)


def _const_int(e) -> int | None:
    if isinstance(e, Real) and float(e.value).is_integer():
        return int(e.value)
    if isinstance(e, Int) and isinstance(e.expr, Const):
        return int(e.expr.value)
    return None


def triton_score_source(fn: ScoreFn, low: Lowered, mask_source: str) -> str:
    """Triton source of `_score`, `_score_grad` and `_score_grad_tables` for a score term
    (the floor-division helpers are added unless `mask_source` defines them)."""
    return _TritonScore(fn, low).source(mask_source)
