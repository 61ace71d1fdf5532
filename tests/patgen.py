"""A seeded generator of random *valid* `.attn` patterns with call sizes.

`generate(seed)` returns a `Case`: an expression tree over every primitive,
the combinators (| & - ~), `heads { }`, `where`, `let ... in`, `@` axes,
`dilate` and `blockwise`, on seq, grid (1-3 axes) or mixed `seq(T) + grid(..)`
layouts, plus run-time inputs (`same`, `routed`) - together with sizes (M, N,
heads, grid) for which every argument constraint holds, so the pattern binds
and evaluates without a diagnostic. Valid by construction: each sub-expression
is generated knowing the lengths its view will have (a blockwise operand sees
block counts, a dilate operand group lengths, `@ a` the axis size).

`shrink(case, fails)` makes a failing case small for the report: it replaces
combinators by one of their operands, drops heads arms and shrinks sizes while
`fails` still holds. `case.snippet()` is the `.attn` text with the sizes in a
comment, ready to paste into a bug report.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch

# An expression is a nested tuple:
#   ("prim", text) | ("bin", op, a, b) | ("not", a) | ("heads", ((selector, body), ...))
#   ("along", axis, a) | ("dilate", d_text, a) | ("blockwise", b_text, a) | ("let", name, value, a)


def render(e) -> str:
    kind = e[0]
    if kind == "prim":  # a `where` condition runs to the next `|`, `&` or `)`: bracket it
        return f"({e[1]})" if e[1].startswith("where") else e[1]
    if kind == "bin":
        return f"({render(e[2])} {e[1]} {render(e[3])})"
    if kind == "not":
        return f"~{_atom(e[1])}"
    if kind == "heads":
        return "heads { " + "; ".join(f"{sel} => {render(body)}" for sel, body in e[1]) + " }"
    if kind == "along":
        return f"{_atom(e[2])} @ {e[1]}"
    if kind == "dilate":
        return f"dilate({e[1]}, {render(e[2])})"
    if kind == "blockwise":
        return f"blockwise({e[1]}, {render(e[2])})"
    if kind == "let":
        return f"(let {e[1]} = {e[2]} in {render(e[3])})"
    raise ValueError(kind)


def _atom(e) -> str:
    text = render(e)
    return text if e[0] == "prim" else f"({text})"


@dataclass(frozen=True)
class Case:
    seed: int
    expr: tuple
    axes: tuple[str, ...]  # () on seq
    text_len: int | None  # T of `seq(T) + grid(...)`, None otherwise
    M: int
    N: int
    H: int
    grid: tuple[int, ...] | None
    block: tuple[int, int]  # the plan's tile
    inputs: tuple[tuple[str, str, int], ...] = ()  # (name, "segments" | "blocks", block size)
    #: how segment ids are drawn (`ID_STYLES`): "small" ids 0..2, or values that collide or
    #: wrap when narrowed to int32, negative ones, ids in several runs
    id_style: str = "small"

    def source(self) -> str:
        params = ", ".join(f"{n}: segments" if kind == "segments" else f"{n}: blocks({b})" for n, kind, b in self.inputs)
        layout = ""
        if self.axes:
            layout = f" on {'seq(%d) + ' % self.text_len if self.text_len is not None else ''}grid({', '.join(self.axes)})"
        return f"pattern p{'(' + params + ')' if params else ''}{layout} = {render(self.expr)}\n"

    def snippet(self) -> str:
        return (f"# M={self.M} N={self.N} heads={self.H} grid={self.grid} block={self.block} seed={self.seed}"
                f"{f' inputs: see tensors(seed), ids {self.id_style}' if self.inputs else ''}\n" + self.source())

    def tensors(self, batch: int = 2) -> dict[str, torch.Tensor]:
        """The run-time inputs, drawn from the case's seed."""
        g = torch.Generator().manual_seed(self.seed)
        out = {}
        for name, kind, b in self.inputs:
            if kind == "segments":
                # sorted document ids: packed sequences; then mapped to the case's id style
                ids = torch.sort(torch.randint(0, 3, (batch, self.N), generator=g), dim=-1).values
                if self.id_style == "unsorted":  # an id in several runs: plans are scanned, not closed-form
                    ids = torch.randint(0, 3, (batch, self.N), generator=g) * 2**32 + 7
                out[name] = ID_STYLES[self.id_style][ids] if self.id_style != "unsorted" else ids
            else:
                nqb, nkb = -(-self.M // b), -(-self.N // b)
                kmax = 1 + int(torch.randint(0, 3, (1,), generator=g))
                out[name] = torch.randint(-1, nkb, (batch, self.H, nqb, kmax), generator=g)
        return out


#: segment id styles: the ids 0, 1, 2 are replaced by these values. All but "small" hold
#: distinct ids that are equal once cast to int32 (a lowering that narrows them merges documents)
ID_STYLES = {
    "small": torch.tensor([0, 1, 2]),
    "wide": torch.tensor([0, 2**32, 2**33]),                    # int32: 0, 0, 0
    "edges": torch.tensor([2**31 - 1, 2**31, -2**31 - 1]),       # int32: 2**31 - 1, -2**31, 2**31 - 1
    "extremes": torch.tensor([-2**63, 2**63 - 1, -1]),           # int32: 0, -1, -1
    "negative": torch.tensor([-3, -2**40, -1 - 2**32]),          # int32: -3, 0, -1
    "unsorted": torch.tensor([0, 1, 2]),                         # (drawn apart, see Case.tensors)
}
#: names a run-time input may get: some equal names the lowering or the adapters use for
#: their own tables / inputs (random0, in_doc, topk_sel0, key_padding), which must not interfere
SEGMENT_NAMES = ("doc", "random0", "random1", "in_doc", "key_padding")
BLOCK_NAMES = ("sel", "random0", "in_sel", "topk_sel0")


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Ctx:
    dims: tuple[int, ...]  # per-axis lengths (one entry on 1-D views)
    L: int  # flat length N of this view
    grid: bool  # grid coordinates (q.a) and per-axis tuples are available
    axes: tuple[str, ...]
    mixed: bool
    transformed: bool  # inside @ / dilate / blockwise: no run-time primitives
    inputs: tuple[tuple[str, str, int], ...]
    H: int


def _axis_value(rng, ctx: Ctx, make) -> str:
    """A scalar, or on grids sometimes a per-axis tuple, made by make(length)."""
    if ctx.grid and len(ctx.dims) > 1 and rng.random() < 0.5:
        return "(" + ", ".join(str(make(d)) for d in ctx.dims) + ")"
    return str(make(min(ctx.dims)))


def _set(rng, L: int) -> str:
    r = rng.random()
    if r < 0.3:
        a = rng.randrange(0, L + 2)
        return f"{a} .. {a + rng.randrange(0, 5)}"
    if r < 0.5:
        a = rng.randrange(0, L + 1)
        return f"{a} .. {a + rng.randrange(1, 12)} step {rng.randrange(1, 4)}"
    if r < 0.7:
        return "{0, N - 1}"
    return "{" + ", ".join(str(rng.randrange(0, L + 2)) for _ in range(rng.randrange(1, 4))) + "}"


def _pred(rng, ctx: Ctx, depth: int = 0) -> str:
    r = rng.random()
    if depth < 2 and r < 0.2:
        return f"({_pred(rng, ctx, depth + 1)}) {rng.choice(['and', 'or'])} ({_pred(rng, ctx, depth + 1)})"
    if depth < 2 and r < 0.27:
        return f"not ({_pred(rng, ctx, depth + 1)})"
    cmp = rng.choice(["<", "<=", ">", ">=", "==", "!="])
    c = rng.randrange(-3, 8)
    options = [
        f"q - k {cmp} {c}",
        f"(q + k) % {rng.randrange(1, 5)} {cmp} {rng.randrange(0, 3)}",
        f"abs(q - k) {cmp} {abs(c)}",
        f"k // {rng.randrange(1, 6)} == q // {rng.randrange(1, 6)}",
        f"max(q, k) {cmp} {rng.randrange(0, ctx.L + 1)}",
        f"k in {_set(rng, ctx.L)}",
        f"q * 2 - k * 3 {cmp} {c}",
        f"0 <= q - k <= {abs(c)}",
        f"h {cmp} {rng.randrange(0, ctx.H)}",
        f"h in 0 .. {rng.randrange(1, ctx.H + 1)}",
        "min(q, N - 1 - k) < N // 2",
    ]
    if ctx.grid:
        a, b = rng.choice(ctx.axes), rng.choice(ctx.axes)
        options += [f"q.{a} - k.{a} {cmp} {c}", f"(q.{a} - k.{b}) ** 2 + (q.{b} - k.{a}) ** 2 < {rng.randrange(1, 20)}",
                    f"k.{a} < size({a}) // 2", f"q.{a} == k.{a} and q.{b} >= k.{b}"]
    return rng.choice(options)


def _prim(rng, ctx: Ctx) -> tuple:
    L = ctx.L
    options = ["full", "none", "causal", "band", "sliding", "block", "strided", "sink", "global", "rows", "cols",
               "prefix", "random", "where", "where", "let"]
    if min(ctx.dims) >= 2:
        options += ["neighborhood", "neighborhood"]
    if not ctx.transformed:
        options += [f"input:{n}" for n, _, _ in ctx.inputs]
    choice = rng.choice(options)
    if choice in ("full", "none", "causal"):
        text = choice
    elif choice == "band":
        text = f"band({_axis_value(rng, ctx, lambda d: rng.randrange(0, d + 1))}, {_axis_value(rng, ctx, lambda d: rng.randrange(0, d + 1))})"
    elif choice == "sliding":
        text = f"sliding({_axis_value(rng, ctx, lambda d: rng.randrange(1, d + 2))})"
    elif choice == "neighborhood":
        # per axis: 2 <= size, size * dilation <= length, 1 <= stride <= size
        if ctx.grid and len(ctx.dims) > 1 and rng.random() < 0.5:
            per = []
            for d in ctx.dims:
                size = rng.randrange(2, d + 1) if d >= 2 else 2
                per.append((size, rng.randrange(1, d // size + 1), rng.randrange(1, size + 1)))
            args = ["(" + ", ".join(str(p[0]) for p in per) + ")",
                    "dilation = (" + ", ".join(str(p[1]) for p in per) + ")",
                    "stride = (" + ", ".join(str(p[2]) for p in per) + ")"]
        else:  # one scalar valid on every axis
            d = min(ctx.dims)
            size = rng.randrange(2, d + 1)
            dil, stride = rng.randrange(1, d // size + 1), rng.randrange(1, size + 1)
            args = [str(size)]
            if dil > 1 or rng.random() < 0.3:
                args.append(f"dilation = {dil}")
            if stride > 1 or rng.random() < 0.3:
                args.append(f"stride = {stride}")
        if rng.random() < 0.3:
            args.append("causal = true")
        text = f"neighborhood({', '.join(args)})"
    elif choice == "block":
        args = [_axis_value(rng, ctx, lambda d: rng.randrange(1, d + 2))]
        if rng.random() < 0.4:
            args.append(f"shift = {rng.randrange(0, 4)}")
        if rng.random() < 0.4:
            args.append(f"halo = {rng.randrange(0, 3)}")
        text = f"block({', '.join(args)})"
    elif choice == "strided":
        text = f"strided({_axis_value(rng, ctx, lambda d: rng.randrange(1, d + 1))})"
    elif choice == "sink":
        text = f"sink({rng.randrange(0, L + 2)})"
    elif choice in ("global", "rows", "cols"):
        text = f"{choice}({_set(rng, L)})"
    elif choice == "prefix":
        text = f"prefix({rng.randrange(0, L + 2)})"
    elif choice == "random":
        text = f"random({rng.randrange(0, L + 2)}, seed = {rng.randrange(0, 100)})"
    elif choice == "where":
        text = f"where {_pred(rng, ctx)}"
    elif choice == "let":
        w = rng.randrange(1, L + 2)
        return ("let", "w", str(w), ("prim", rng.choice(["sliding(w)", "sink(w)", "band(w, w // 2)", "prefix(w + 1)"])))
    else:
        name = choice.split(":")[1]
        kind = next(k for n, k, _ in ctx.inputs if n == name)
        text = f"same({name})" if kind == "segments" else f"routed({name})"
    return ("prim", text)


def _mask(rng, ctx: Ctx, depth: int) -> tuple:
    if depth <= 0 or rng.random() < 0.25:
        return _prim(rng, ctx)
    forms = ["bin", "bin", "bin", "not", "heads"]
    if ctx.grid and not ctx.transformed:
        forms.append("along")
    if not ctx.mixed:
        forms += ["dilate", "blockwise"]
    form = rng.choice(forms)
    if form == "bin":
        return ("bin", rng.choice(["|", "&", "-"]), _mask(rng, ctx, depth - 1), _mask(rng, ctx, depth - 1))
    if form == "not":
        return ("not", _mask(rng, ctx, depth - 1))
    if form == "heads":
        arms = []
        for _ in range(rng.randrange(0, 3)):
            r = rng.random()
            sel = (str(rng.randrange(0, ctx.H + 1)) if r < 0.4 else
                   f"{rng.randrange(0, ctx.H)} .. {rng.randrange(0, ctx.H + 2)}" if r < 0.7 else
                   "{" + ", ".join(str(rng.randrange(0, ctx.H + 1)) for _ in range(2)) + "}")
            arms.append((sel, _mask(rng, ctx, depth - 1)))
        arms.append(("_", _mask(rng, ctx, depth - 1)))
        return ("heads", tuple(arms))
    if form == "along":
        i = rng.randrange(len(ctx.axes))
        inner = dataclasses.replace(ctx, dims=(ctx.dims[i],), L=ctx.dims[i], grid=False, transformed=True, mixed=False)
        return ("along", ctx.axes[i], _mask(rng, inner, depth - 1))
    if form == "dilate":
        ds = [rng.randrange(1, max(1, min(d, 4)) + 1) for d in ctx.dims]
        if ctx.grid and len(ds) > 1 and rng.random() < 0.5:
            text = "(" + ", ".join(map(str, ds)) + ")"
        else:
            ds = [min(ds)] * len(ctx.dims)
            text = str(ds[0])
        # the smallest dilation group of an axis of length d has floor(d / dil) positions
        dims = tuple(max(1, d // k) for d, k in zip(ctx.dims, ds))
        inner = dataclasses.replace(ctx, dims=dims, L=math.prod(dims) if ctx.grid else dims[0], transformed=True)
        return ("dilate", text, _mask(rng, inner, depth - 1))
    bs = [rng.randrange(1, max(1, min(d, 6)) + 1) for d in ctx.dims]
    if ctx.grid and len(bs) > 1 and rng.random() < 0.5:
        text = "(" + ", ".join(map(str, bs)) + ")"
    else:
        bs = [min(bs)] * len(ctx.dims)
        text = str(bs[0])
    dims = tuple(-(-d // b) for d, b in zip(ctx.dims, bs))
    inner = dataclasses.replace(ctx, dims=dims, L=math.prod(dims) if ctx.grid else dims[0], transformed=True)
    return ("blockwise", text, _mask(rng, inner, depth - 1))


def generate(seed: int, *, max_depth: int = 4, force_inputs: bool = False) -> Case:
    """A random valid pattern with sizes, determined by `seed`. `force_inputs`: the
    pattern always reads a run-time input (one is added when none was drawn)."""
    rng = random.Random(seed)
    H = rng.choice([1, 1, 2, 3, 4])
    kind = rng.choice(["seq", "seq", "seq", "grid", "grid", "mixed"])
    axes: tuple[str, ...] = ()
    grid = None
    text_len = None
    if kind == "seq":
        N = rng.randrange(1, 48)
        dims = (N,)
    else:
        axes = ("t", "h", "w")[3 - rng.randrange(1, 4):]
        grid = tuple(rng.randrange(1, 8) for _ in axes)
        while math.prod(grid) > 96:
            grid = tuple(max(1, g - 1) for g in grid)
        dims = grid
        text_len = rng.randrange(0, 7) if kind == "mixed" else None
        N = (text_len or 0) + math.prod(grid)
    M = N if rng.random() < 0.6 else rng.randrange(1, N + 1)
    inputs = []
    if rng.random() < 0.15:
        inputs.append(("doc", "segments", 0))
    if rng.random() < 0.1:
        inputs.append(("sel", "blocks", rng.randrange(1, 9)))
    ctx = Ctx(dims=dims, L=N, grid=kind != "seq", axes=axes, mixed=kind == "mixed", transformed=False,
              inputs=tuple(inputs), H=H)
    expr = _mask(rng, ctx, rng.randrange(0, max_depth + 1))
    used = render(expr)
    inputs = [i for i in inputs if f"({i[0]})" in used]
    block = (rng.randrange(1, 17), rng.randrange(1, 17))
    case = Case(seed=seed, expr=expr, axes=axes, text_len=text_len, M=M, N=N, H=H, grid=grid, block=block,
                inputs=tuple(inputs))
    return _extremes(case, random.Random(f"extremes-{seed}"), force_inputs)


def _extremes(case: Case, rng: random.Random, force_inputs: bool) -> Case:
    """Edge cases drawn from a second stream (so the draws above keep their seeds): more
    queries than keys on seq (qa < 0 for the first rows), input names that equal internal
    table names, segment ids past int32, and with `force_inputs` an input in every pattern."""
    changes = {}
    if case.grid is None and rng.random() < 0.12:
        changes["M"] = case.N + rng.randrange(1, 9)
    inputs = list(case.inputs)
    expr = case.expr
    if force_inputs and not inputs:
        if rng.random() < 0.6:
            inputs.append(("doc", "segments", 0))
            prim = ("prim", "same(doc)")
        else:
            inputs.append(("sel", "blocks", rng.randrange(1, 9)))
            prim = ("prim", "routed(sel)")
        expr = ("bin", rng.choice(["|", "&"]), expr, prim)
    if inputs and rng.random() < 0.5:
        renamed = []
        for name, kind, b in inputs:
            pool = [n for n in (SEGMENT_NAMES if kind == "segments" else BLOCK_NAMES) if n not in {r[0] for r in renamed}]
            new = rng.choice(pool)
            expr = _rename(expr, name, new)
            renamed.append((new, kind, b))
        inputs = renamed
    changes.update(expr=expr, inputs=tuple(inputs))
    if any(kind == "segments" for _, kind, _ in inputs) and rng.random() < (0.8 if force_inputs else 0.5):
        changes["id_style"] = rng.choice([s for s in ID_STYLES if s != "small"])
    return dataclasses.replace(case, **changes)


def _rename(e, old: str, new: str):
    """`e` with the run-time input `old` called `new` (same(old) / routed(old))."""
    kind = e[0]
    if kind == "prim":
        return ("prim", e[1].replace(f"({old})", f"({new})"))
    if kind == "bin":
        return ("bin", e[1], _rename(e[2], old, new), _rename(e[3], old, new))
    if kind == "not":
        return ("not", _rename(e[1], old, new))
    if kind == "heads":
        return ("heads", tuple((sel, _rename(body, old, new)) for sel, body in e[1]))
    if kind == "let":
        return ("let", e[1], e[2], _rename(e[3], old, new))
    return (kind, e[1], _rename(e[2], old, new))  # along, dilate, blockwise


# ----------------------------------------------------------------------------- shrinking


def _subtrees(e):
    """(replacement candidates for e): its operands, and e with one part shrunk."""
    kind = e[0]
    if kind == "prim":
        return []
    if kind == "bin":
        kids = [e[2], e[3]]
        out = list(kids)
        out += [("bin", e[1], s, e[3]) for s in _subtrees(e[2])]
        out += [("bin", e[1], e[2], s) for s in _subtrees(e[3])]
        return out
    if kind == "not":
        return [e[1]] + [("not", s) for s in _subtrees(e[1])]
    if kind == "heads":
        arms = e[1]
        out = [body for _, body in arms]
        out += [("heads", arms[:i] + arms[i + 1:]) for i in range(len(arms) - 1)]  # keep the `_` arm
        for i, (sel, body) in enumerate(arms):
            out += [("heads", arms[:i] + ((sel, s),) + arms[i + 1:]) for s in _subtrees(body)]
        return out
    if kind in ("along", "dilate", "blockwise"):
        return [e[2]] + [(kind, e[1], s) for s in _subtrees(e[2])]
    if kind == "let":
        return [("let", e[1], e[2], s) for s in _subtrees(e[3])]
    raise ValueError(kind)


def _smaller_sizes(case: Case):
    if case.M > 1:
        yield dataclasses.replace(case, M=max(1, case.M // 2))
        yield dataclasses.replace(case, M=case.M - 1)
    if case.grid is None:
        if case.N > case.M:
            yield dataclasses.replace(case, N=max(case.M, case.N // 2))
            yield dataclasses.replace(case, N=case.N - 1)
    else:
        for i, g in enumerate(case.grid):
            if g > 1:
                grid = case.grid[:i] + (g - 1,) + case.grid[i + 1:]
                N = (case.text_len or 0) + math.prod(grid)
                yield dataclasses.replace(case, grid=grid, N=N, M=min(case.M, N))
        if case.text_len:
            N = case.N - 1
            yield dataclasses.replace(case, text_len=case.text_len - 1, N=N, M=min(case.M, N))
    if case.H > 1:
        yield dataclasses.replace(case, H=case.H - 1)
    bm, bn = case.block
    if bm > 1:
        yield dataclasses.replace(case, block=(bm // 2, bn))
    if bn > 1:
        yield dataclasses.replace(case, block=(bm, bn // 2))


def shrink(case: Case, fails, budget: int = 300) -> Case:
    """A smaller case for which `fails(case)` still holds (greedy, bounded by `budget` tries).

    `fails` should return False (not raise) for candidates that are invalid.
    """
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        candidates = [dataclasses.replace(case, expr=s) for s in _subtrees(case.expr)] + list(_smaller_sizes(case))
        for cand in candidates:
            tries += 1
            if tries > budget:
                break
            used = render(cand.expr)
            cand = dataclasses.replace(cand, inputs=tuple(i for i in cand.inputs if f"({i[0]})" in used))
            if fails(cand):
                case, improved = cand, True
                break
    return case
