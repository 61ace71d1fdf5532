"""A hostile-input generator (issue 17): random programs with an independent oracle,
plus a catalogue of pathological forms, run in-process and through the CLI.

`cases(seed)` yields `Case`s from one seed: a random 1-D program whose mask has a
brute-force oracle written from docs/language.md (never from attnc's evaluator),
and one or two catalogue cases (huge numbers, deep nesting, reserved names, name
collisions, empty sets, division by zero at bind time, enormous sizes, odd files
and links). `Runner.run(case)` runs a case in-process (`attnc.loads` / `load`,
`pattern`, `mask`, `plan`, `check_rows`, `simulate`) and through `attnc.cli.main`
(check / show / simulate / compile), and records its outcome and wall time.

Outcomes (docs/reliability.md, "Hostile inputs"):

* fine: success, an `AttnError` diagnostic, a `ValueError` (expected / got / try,
  including `MemoryLimitError` past `$ATTNC_MAX_BYTES`), CLI exit 0, 1 or 2;
* a failure: any other exception escaping (a traceback), a CLI exit code other than
  0 / 1 / 2 or a traceback in its output, a mask that differs from the oracle, an
  invalid argument the oracle rejects but attnc accepts (or the reverse), a count
  printed by `attnc show` that differs from the oracle, a plan whose allowed count
  differs from the mask's.

Every case runs under a small memory limit (`MEMORY_LIMIT`), so enormous sizes
are refused by the estimate instead of allocated. The time of every case is
measured; cases over `LIMIT_S` are counted (not asserted in CI), and a watchdog
turns a case still running after `WATCHDOG_S` into a failure.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import attnc
from attnc.cli import main as cli_main
from attnc.errors import AttnError
from paper_refs import random_keys

LIMIT_S = 5.0  # a case slower than this is counted as "over the limit"
WATCHDOG_S = 60  # a case still running after this long is a hang: a failure
MEMORY_LIMIT = "256M"  # $ATTNC_MAX_BYTES while the cases run


class Invalid(Exception):
    """The oracle's verdict: an argument breaks a documented constraint."""


# ----------------------------------------------------------------------------- random programs with an oracle
#
# A node is (text, fn): `fn(h, qa, k, env)` says whether query position qa (absolute,
# bottom-right aligned) may attend key k in head h; env holds the sizes the node sees
# ("M", "N", "H") and the bound parameters. Integer expressions are (text, val(env)).


def _int_expr(rng: random.Random, lo: int, hi: int, ctx: dict):
    """An integer expression whose value lies in [lo, hi] at every size this node may see."""
    r = rng.random()
    params = ctx["params"]
    if r < 0.45 or hi - lo < 1:
        c = rng.randint(lo, hi)
        return str(c), (lambda env, c=c: c)
    if r < 0.6 and params:
        name = rng.choice(sorted(params))
        return f"max({lo}, min({hi}, {name}))", (lambda env, n=name: max(lo, min(hi, env[n])))
    if r < 0.8:
        d = rng.randint(1, 4)
        return f"max({lo}, min({hi}, N // {d}))", (lambda env, d=d: max(lo, min(hi, env["N"] // d)))
    c = rng.randint(0, 3)
    if ctx["m_ok"]:
        return f"max({lo}, min({hi}, M - {c}))", (lambda env, c=c: max(lo, min(hi, env["M"] - c)))
    return f"max({lo}, min({hi}, N - {c}))", (lambda env, c=c: max(lo, min(hi, env["N"] - c)))


def _set(rng: random.Random, L: int):
    """(text, contains(x, env)) of a set of positions."""
    r = rng.random()
    if r < 0.3:
        a, b = rng.randint(0, L + 1), rng.randint(0, L + 2)
        return f"{a} .. {b}", (lambda x, env: a <= x < b)
    if r < 0.5:
        a, b, s = rng.randint(0, L), rng.randint(0, L + 3), rng.randint(1, 3)
        return f"{a} .. {b} step {s}", (lambda x, env: a <= x < b and (x - a) % s == 0)
    if r < 0.6:
        return "{0, N - 1}", (lambda x, env: x in (0, env["N"] - 1))
    if r < 0.65:
        return "{}", (lambda x, env: False)
    items = sorted({rng.randint(0, L + 1) for _ in range(rng.randint(1, 3))})
    return "{" + ", ".join(map(str, items)) + "}", (lambda x, env: x in items)


def _pred(rng: random.Random, ctx: dict, depth: int = 0):
    """(text, fn(h, q, k, env)) of a `where` predicate; q is the absolute position."""
    L, H = ctx["L"], ctx["H"]
    r = rng.random()
    if depth < 2 and r < 0.15:
        (ta, fa), (tb, fb) = _pred(rng, ctx, depth + 1), _pred(rng, ctx, depth + 1)
        if rng.random() < 0.5:
            return f"({ta}) and ({tb})", (lambda h, q, k, e: fa(h, q, k, e) and fb(h, q, k, e))
        return f"({ta}) or ({tb})", (lambda h, q, k, e: fa(h, q, k, e) or fb(h, q, k, e))
    if depth < 2 and r < 0.22:
        t, f = _pred(rng, ctx, depth + 1)
        return f"not ({t})", (lambda h, q, k, e: not f(h, q, k, e))
    c = rng.randint(-3, 6)
    m = rng.randint(1, 4)
    x = rng.randint(0, m - 1)
    s_text, s_in = _set(rng, L)
    options = [
        (f"q - k < {c}", lambda h, q, k, e: q - k < c),
        (f"q - k >= {c}", lambda h, q, k, e: q - k >= c),
        (f"(q + k) % {m} == {x}", lambda h, q, k, e: (q + k) % m == x),
        (f"abs(q - k) <= {abs(c)}", lambda h, q, k, e: abs(q - k) <= abs(c)),
        (f"k in {s_text}", lambda h, q, k, e: s_in(k, e)),
        (f"0 <= q - k <= {abs(c)}", lambda h, q, k, e: 0 <= q - k <= abs(c)),
        (f"min(q, k) < {abs(c)}", lambda h, q, k, e: min(q, k) < abs(c)),
        (f"max(q, k) >= {abs(c)}", lambda h, q, k, e: max(q, k) >= abs(c)),
        (f"k * 2 < q + {c}", lambda h, q, k, e: k * 2 < q + c),
        (f"k // {m} == q // {m}", lambda h, q, k, e: k // m == q // m),
        ("q >= N // 2", lambda h, q, k, e: q >= e["N"] // 2),
    ]
    if ctx["heads_ok"]:
        hc = rng.randint(0, H)
        options.append((f"h == {hc}", lambda h, q, k, e: h == hc))
    return rng.choice(options)


def _neighborhood(qa: int, k: int, L: int, size: int, d: int, s: int, causal: bool) -> bool:
    """docs/language.md §3.1, written out for one (query, key) pair."""
    wl = size // 2
    g, i = qa % d, qa // d
    lg = -(-(L - g) // d)
    if not causal:
        leader = min((i // s) * s + s // 2, lg - 1)
        start = max(0, min(leader - wl, lg - size))
        end = start + size
    else:
        leader = min((i // s) * s + s - 1, lg - 1)
        start = max(leader - (size - 1), 0)
        end = i + 1
    return k % d == g and start <= k // d < end


def _prim(rng: random.Random, ctx: dict):
    L = ctx["L"]
    choice = rng.choice(["full", "none", "causal", "band", "sliding", "block", "strided", "sink", "global", "rows",
                         "cols", "prefix", "random", "where", "where", "neighborhood"])
    if choice == "full":
        return "full", lambda h, q, k, e: True
    if choice == "none":
        return "none", lambda h, q, k, e: False
    if choice == "causal":
        return "causal", lambda h, q, k, e: k <= q
    if choice == "band":
        (tl, vl), (tr, vr) = _int_expr(rng, 0, L + 1, ctx), _int_expr(rng, 0, L + 1, ctx)
        return f"band({tl}, {tr})", lambda h, q, k, e: q - vl(e) <= k <= q + vr(e)
    if choice == "sliding":
        tw, vw = _bad_or(rng, ctx, 1, L + 1, "w")
        return f"sliding({tw})", lambda h, q, k, e: q - _ok(vw(e), 1) < k <= q
    if choice == "block":
        ts, vs = _bad_or(rng, ctx, 1, L + 1, "size")
        tsh, vsh = _int_expr(rng, 0, 3, ctx)
        tha, vha = _int_expr(rng, 0, 2, ctx)

        def block(h, q, k, e):
            size, shift, halo = _ok(vs(e), 1), vsh(e), vha(e)
            bq = (q - shift) // size
            return bq * size + shift - halo <= k < (bq + 1) * size + shift + halo
        return f"block({ts}, shift = {tsh}, halo = {tha})", block
    if choice == "strided":
        ts, vs = _bad_or(rng, ctx, 1, L, "s")
        return f"strided({ts})", lambda h, q, k, e: (q - k) % _ok(vs(e), 1) == 0
    if choice == "sink":
        tn, vn = _int_expr(rng, 0, L + 1, ctx)
        return f"sink({tn})", lambda h, q, k, e: k < vn(e)
    if choice in ("global", "rows", "cols"):
        st, sin = _set(rng, L)
        fn = {"global": lambda h, q, k, e: sin(q, e) or sin(k, e), "rows": lambda h, q, k, e: sin(q, e),
              "cols": lambda h, q, k, e: sin(k, e)}[choice]
        return f"{choice}({st})", fn
    if choice == "prefix":
        tn, vn = _int_expr(rng, 0, L + 1, ctx)
        return f"prefix({tn})", lambda h, q, k, e: q < vn(e) and k < vn(e)
    if choice == "random":
        tr, vr = _int_expr(rng, 0, L + 1, ctx)
        seed = rng.randint(0, 99)
        cache: dict = {}

        def rand(h, q, k, e):
            n = e["N"]
            key = (q, n, vr(e))
            if key not in cache:
                cache[key] = random_keys(seed, q, n, vr(e))
            return k < n and k in cache[key]
        return f"random({tr}, seed = {seed})", rand
    if choice == "neighborhood" and L >= 2:
        size = rng.randint(2, L)
        dil = rng.randint(1, max(1, L // size))
        stride = rng.randint(1, size)
        causal = rng.random() < 0.3

        def nb(h, q, k, e):
            if size * dil > e["N"]:
                raise Invalid(f"size * dilation {size * dil} > {e['N']}")
            return _neighborhood(q, k, e["N"], size, dil, stride, causal)
        return f"neighborhood({size}, dilation = {dil}, stride = {stride}, causal = {'true' if causal else 'false'})", nb
    t, f = _pred(rng, ctx)
    return f"(where {t})", f


def _ok(v: int, lo: int) -> int:
    if v < lo:
        raise Invalid(f"{v} < {lo}")
    return v


def _bad_or(rng: random.Random, ctx: dict, lo: int, hi: int, what: str):
    """Mostly a valid value in [lo, hi]; rarely (2 %) a literal below `lo` that the oracle rejects."""
    if rng.random() < 0.02:
        v = rng.randint(lo - 3, lo - 1)
        ctx["bad"].append(v)  # a literal: refused at bind time even in a heads arm no head uses
        return str(v), (lambda env: v)
    return _int_expr(rng, lo, hi, ctx)


def _mask(rng: random.Random, ctx: dict, depth: int):
    if depth <= 0 or rng.random() < 0.25:
        return _prim(rng, ctx)
    forms = ["|", "&", "-", "|", "&", "~", "heads", "blockwise", "dilate", "let"]
    form = rng.choice(forms)
    if form in ("|", "&", "-"):
        (ta, fa), (tb, fb) = _mask(rng, ctx, depth - 1), _mask(rng, ctx, depth - 1)
        op = {"|": lambda a, b: a or b, "&": lambda a, b: a and b, "-": lambda a, b: a and not b}[form]
        return f"({ta} {form} {tb})", (lambda h, q, k, e: op(fa(h, q, k, e), fb(h, q, k, e)))
    if form == "~":
        t, f = _mask(rng, ctx, depth - 1)
        return f"~({t})", (lambda h, q, k, e: not f(h, q, k, e))
    if form == "heads" and ctx["heads_ok"]:
        H = ctx["H"]
        arms = []
        for _ in range(rng.randint(0, 2)):
            r = rng.random()
            if r < 0.4:
                a = rng.randint(0, H)
                sel, pick = str(a), (lambda h, a=a: h == a)
            elif r < 0.7:
                a, b = rng.randint(0, H), rng.randint(0, H + 1)
                sel, pick = f"{a} .. {b}", (lambda h, a=a, b=b: a <= h < b)
            else:
                items = sorted({rng.randint(0, H) for _ in range(2)})
                sel, pick = "{" + ", ".join(map(str, items)) + "}", (lambda h, items=items: h in items)
            arms.append((sel, pick, _mask(rng, ctx, depth - 1)))
        arms.append(("_", lambda h: True, _mask(rng, ctx, depth - 1)))
        text = "heads { " + "; ".join(f"{sel} => {t}" for sel, _, (t, _) in arms) + " }"

        def heads(h, q, k, e):
            for _, pick, (_, f) in arms:
                if pick(h):
                    return f(h, q, k, e)
            raise AssertionError("no arm")
        return text, heads
    if form == "blockwise":
        b = rng.randint(1, 4)
        inner = dict(ctx, L=-(-ctx["L"] // b), heads_ok=ctx["heads_ok"])
        t, f = _mask(rng, inner, depth - 1)

        def blockwise(h, q, k, e):
            env = dict(e, M=None if e["M"] is None else -(-e["M"] // b), N=-(-e["N"] // b))
            return f(h, q // b, k // b, env)
        return f"blockwise({b}, {t})", blockwise
    if form == "dilate":
        d = rng.randint(1, 3)
        inner = dict(ctx, L=max(1, ctx["L"] // d), m_ok=False)
        t, f = _mask(rng, inner, depth - 1)

        def dilate(h, q, k, e):
            g = q % d
            n_local = -(-(e["N"] - g) // d)
            if k % d != g or n_local <= 0:
                return False
            return f(h, q // d, k // d, dict(e, N=n_local, M=None))
        return f"dilate({d}, {t})", dilate
    if form == "let":
        tw, vw = _int_expr(rng, 1, ctx["L"] + 1, ctx)
        name = rng.choice(["w", "width", "self", "name", "x1"])
        return f"(let {name} = {tw} in sliding({name}))", (lambda h, q, k, e: q - vw(e) < k <= q)
    return _prim(rng, ctx)


@dataclass
class Case:
    """One hostile case. `source` is the text of the file (bytes: written raw); `files`
    extra files (relative path -> bytes, or ("symlink", target), or ("dir",)); `main`
    the file given to load / the CLI; `oracle(M, N, H)` the expected bool [H, M, N]."""

    family: str
    seed: int
    source: str | bytes | None = None
    files: dict = field(default_factory=dict)
    main: str = "case.attn"
    pattern: str | None = None
    params: dict = field(default_factory=dict)
    M: int = 8
    N: int | None = None
    H: int = 1
    grid: tuple | None = None
    oracle: object = None  # callable (M, N, H) -> bool tensor, may raise Invalid
    verbs: tuple = ("check", "show", "simulate")
    inprocess: bool = True
    extra_argv: tuple = ()
    vanish: bool = False  # delete the main file while the call runs

    def describe(self) -> str:
        src = self.source if isinstance(self.source, str) else repr(self.source)[:300]
        return (f"[{self.family} seed={self.seed}] M={self.M} N={self.N} H={self.H} grid={self.grid} "
                f"params={self.params} pattern={self.pattern}\n{src}")


def random_program(seed: int) -> Case:
    """A random valid (rarely, deliberately invalid) 1-D program with parameters and its oracle."""
    rng = random.Random(seed)
    N = rng.randint(1, 14)
    M = N if rng.random() < 0.6 else rng.randint(1, N + 4)
    H = rng.choice([1, 1, 2, 3])
    params = {}
    names = rng.sample(["w", "a", "size_", "self", "name", "x"], rng.randint(0, 2))
    for n in names:
        params[n] = rng.randint(0, N + 2)
    ctx = {"L": N, "H": H, "heads_ok": True, "m_ok": True, "params": params, "bad": []}
    text, fn = _mask(rng, ctx, rng.randint(0, 4))
    head = "pattern p"
    if params:
        head += "(" + ", ".join(f"{n} = {v}" for n, v in params.items()) + ")"
    bound = dict(params)
    if params and rng.random() < 0.4:  # bind other values than the defaults
        n = rng.choice(sorted(params))
        bound[n] = rng.randint(0, N + 2)
    src = f"# random program {seed}\n{head} =\n    {text}\n"

    bad = ctx["bad"]  # shared by every nested context

    def oracle(M_, N_, H_):
        if bad:
            raise Invalid(f"literal arguments {bad} break a documented constraint")
        env = {"M": M_, "N": N_, "H": H_, **bound}
        out = torch.zeros(H_, M_, N_, dtype=torch.bool)
        for h in range(H_):
            for qi in range(M_):
                qa = qi + N_ - M_
                for k in range(N_):
                    out[h, qi, k] = bool(fn(h, qa, k, env))
        return out

    verbs = ("check", "show", "simulate", "compile") if rng.random() < 0.05 else ("check", "show", "simulate")
    return Case(family="random", seed=seed, source=src, pattern="p", params={k: v for k, v in bound.items()
                if bound[k] != params[k]}, M=M, N=N, H=H, oracle=oracle, verbs=verbs)


# ----------------------------------------------------------------------------- the catalogue

HUGE = ["1152921504606846976", "1152921504606846977", "2 ** 60", "2 ** 61", "2 ** 64", "(2 ** 30) * (2 ** 31)",
        "99999999999999999999", "9" * 400, "N * N * N * N", "-1152921504606846977", "10 ** 18 * 10"]
RESERVED = ["q", "k", "h", "M", "N", "H", "_", "self", "name", "pattern", "let", "in", "on", "where", "heads",
            "causal", "full", "none", "size", "min", "max", "abs", "true", "false", "None", "__import__",
            "__class__", "topk_sel0", "random0", "segments", "blocks", "seq", "grid"]


def _catalogue(seed: int) -> list[Case]:
    rng = random.Random(f"catalogue-{seed}")
    fam = rng.choice(["huge", "nesting", "reserved", "collision", "empty", "divzero", "enormous", "files",
                      "set-literals", "mutation"])
    return [globals()["_cat_" + fam.replace("-", "_")](rng, seed)]


def _cat_huge(rng, seed) -> Case:
    v = rng.choice(HUGE)
    form = rng.choice([f"sliding({v})", f"band({v}, 1)", f"sink({v})", f"global({{0, {v}}})", f"random({v})",
                       f"block({v}, shift = {v})", f"strided({v})", f"where q - k < {v}", f"where q * {v} > k",
                       f"where (q + {v}) ** 2 > k", f"blockwise({v}, causal)", f"dilate({v}, causal)",
                       f"prefix({v}) | rows(0 .. {v} step {v})", f"heads {{ {v} => causal; _ => full }}"])
    src = f"pattern p(a = {v}) = {form}\n" if rng.random() < 0.3 else f"pattern p = {form}\n"
    return Case(family="huge", seed=seed, source=src, M=rng.randint(1, 12), H=rng.randint(1, 3))


def _cat_nesting(rng, seed) -> Case:
    n = rng.choice([50, 199, 200, 201, 250, 1000, 5000])
    kind = rng.randrange(7)
    if kind == 0:
        body = "(" * n + "causal" + ")" * n
    elif kind == 1:
        body = "~" * n + "causal"
    elif kind == 2:
        body = " | ".join(["causal"] * n)
    elif kind == 3:
        body = "where " + "not " * n + "q > k"
    elif kind == 4:
        body = "".join(f"let x{i} = {i} in " for i in range(n)) + "causal"
    elif kind == 5:
        body = "blockwise(1, " * min(n, 300) + "causal" + ")" * min(n, 300)
    else:
        body = "heads { 0 => " * min(n, 300) + "causal" + "; _ => full }" * min(n, 300)
    comment = "# " + "(" * rng.choice([0, 500]) + "\n"
    return Case(family="nesting", seed=seed, source=comment + f"pattern p = {body}\n", M=6)


def _cat_reserved(rng, seed) -> Case:
    name = rng.choice(RESERVED)
    where = rng.randrange(5)
    if where == 0:
        src = f"pattern p({name} = 3) = sliding({name})\n"
    elif where == 1:
        src = f"let {name} = 3\npattern p = sliding({name})\n"
    elif where == 2:
        src = f"pattern {name} = causal\n"
    elif where == 3:
        src = f"pattern p({name}: segments) = causal & same({name})\n"
    else:
        src = f"pattern p({name} = 2) = where q - k < {name}\n"
    return Case(family="reserved", seed=seed, source=src, M=6, H=2)


def _cat_collision(rng, seed) -> Case:
    forms = [
        "pattern p = causal\npattern p = full\n",
        "let p = 3\npattern p = causal\n",
        "let w = 3\npattern p(w = 5) = sliding(w)\n",
        "pattern p(w = 2, w = 3) = sliding(w)\n",
        "pattern p(topk_sel0: blocks(4)) = causal & (topk(1, block = 4) | routed(topk_sel0))\n",
        "pattern p(random0: segments) = random(2) | same(random0)\n",
        "pattern a = b\npattern b = a\npattern p = a\n",
        "pattern p = p\n",
        "pattern p(x = y, y = x) = sliding(x)\n",
        "let a = b\nlet b = a\npattern p = sliding(a)\n",
        "pattern p(doc: segments, doc: segments) = same(doc)\n",
    ]
    return Case(family="collision", seed=seed, source=rng.choice(forms), pattern="p", M=6)


def _cat_empty(rng, seed) -> Case:
    forms = ["global({})", "rows({})", "cols(5 .. 2)", "where k in {}", "heads { {} => causal; _ => full }",
             "global(0 .. 0 step 3)", "rows(3 .. 3)", "heads { 0 .. 0 => none; _ => causal }", "where q in 0 .. 0",
             "global({}) | rows({})", "none & full", "~full"]
    expected = {"global({})": 0, "rows({})": 0, "cols(5 .. 2)": 0, "where k in {}": 0, "global(0 .. 0 step 3)": 0,
                "rows(3 .. 3)": 0, "where q in 0 .. 0": 0, "global({}) | rows({})": 0, "none & full": 0, "~full": 0}
    form = rng.choice(forms)
    M = rng.randint(1, 9)
    H = rng.randint(1, 3)
    oracle = None
    if form in expected:
        oracle = lambda M_, N_, H_: torch.zeros(H_, M_, N_, dtype=torch.bool)  # noqa: E731
    elif form.startswith("heads { {}"):
        oracle = lambda M_, N_, H_: torch.ones(H_, M_, N_, dtype=torch.bool)  # noqa: E731
    return Case(family="empty", seed=seed, source=f"pattern p = {form}\n", M=M, H=H, oracle=oracle)


def _cat_divzero(rng, seed) -> Case:
    M = rng.randint(1, 16)
    forms = [
        (f"pattern p(a = N // (N - {M})) = sliding(max(1, a))\n", True),
        (f"pattern p(a = N % (M - {M})) = sink(a)\n", True),
        ("pattern p(a = 4 // 0) = sliding(a)\n", True),
        ("pattern p = where q // (k - k) == 0\n", True),
        ("pattern p = where (q + 1) % (k - k) == 0\n", True),
        ("let z = 0\npattern p = sliding(3 // z)\n", True),
        (f"pattern p(w = 8) = blockwise(N // (N - {M}), causal)\n", True),
        ("pattern p(a = 1 // max(0, N - 100)) = causal\n", True),
        ("pattern p = global(0 .. 8 step 0)\n", True),
        ("pattern p = where k // max(1, q) >= 0\n", False),
    ]
    src, bad = rng.choice(forms)
    return Case(family="divzero", seed=seed, source=src, M=M, H=rng.randint(1, 2),
                oracle=(lambda *a: (_ for _ in ()).throw(Invalid("division by zero"))) if bad else None)


def _cat_enormous(rng, seed) -> Case:
    kind = rng.randrange(8)
    if kind == 0:
        return Case(family="enormous", seed=seed, source="pattern p(w = 64) = sliding(w) | where (q + k) % 3 == 0\n",
                    M=rng.choice([10**6, 10**7, 10**10]), H=rng.choice([1, 64]))
    if kind == 1:
        return Case(family="enormous", seed=seed, source="pattern g(s = 7) on grid(h, w) = neighborhood(s)\n",
                    M=None, grid=rng.choice([(100000, 100000), (4096, 4096), (10**9, 2)]))
    if kind == 2:
        return Case(family="enormous", seed=seed, source="pattern t on seq(2**60) + grid(h, w) = causal\n", M=None,
                    grid=(2, 2))
    if kind == 3:
        return Case(family="enormous", seed=seed,
                    source=f"pattern tk = causal & topk(2, block = {rng.choice(['2**40', '2**20', '1'])})\n",
                    M=rng.choice([1000, 10**6]), extra_argv=("--routed-density", "0.5"), verbs=("simulate",))
    if kind == 4:
        return Case(family="enormous", seed=seed, source="pattern p = causal\n", M=rng.choice([10**5, 10**9]),
                    H=rng.choice([1, 10**6]))
    if kind == 5:
        return Case(family="enormous", seed=seed, source="pattern p(b = 2**40) = blockwise(b, random(3)) | sliding(2**59)\n",
                    M=rng.choice([64, 10**8]))
    if kind == 6:
        return Case(family="enormous", seed=seed, source="pattern p(n = 2**60) = prefix(n) | global({0, 2**59})\n",
                    M=rng.choice([16, 10**12]))
    return Case(family="enormous", seed=seed, source="pattern p = where q * q > k * 1000\n",
                M=rng.choice([10**4, 10**6]), extra_argv=("--block", str(rng.choice([1, 1 << 20]))), verbs=("show",))


def _cat_set_literals(rng, seed) -> Case:
    value = rng.choice(["1+" * 3000 + "1", "-" * 5000 + "1", "9" * 5000, "(" * 500 + "1" + ")" * 500, "{}", "()",
                        "0..", "..", "1x", "x", "true", "[1, [2]]", "{1: 2}", "'s'", "1e400", "nan", "3x5x", "--1",
                        "0..99999999999999999999999", "\x00", "\udcff"[:0] + "\u2028"])
    return Case(family="set-literals", seed=seed, source="pattern p(w = 3) = sliding(w)\n", M=6, inprocess=False,
                extra_argv=("--set", f"w={value}"))


def _cat_mutation(rng, seed) -> Case:
    base = random_program(rng.randrange(10**9))
    text = base.source
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text) + 1)
        r = rng.random()
        if r < 0.4:
            text = text[:i] + text[i + 1:]
        elif r < 0.8:
            text = text[:i] + rng.choice(list("()[]{},;=|&-~@.+*/%<>!#\"\\\n\t\x00\u2028\ufeff0123456789qkhMNH_")) + text[i:]
        else:
            text = text[:i] + rng.choice([" let ", " pattern ", " in ", " where ", " heads ", " import \"x.attn\" "]) + text[i:]
    return Case(family="mutation", seed=seed, source=text, M=base.M, N=base.N, H=base.H)


def _cat_files(rng, seed) -> Case:
    kind = rng.randrange(14)
    ok = b"pattern p = causal\n"
    if kind == 0:  # a symlink loop as the file
        return Case(family="files", seed=seed, files={"a.attn": ("symlink", "b.attn"), "b.attn": ("symlink", "a.attn")},
                    main="a.attn")
    if kind == 1:  # an import through a symlink loop
        return Case(family="files", seed=seed, source=b'import "loop.attn"\n' + ok,
                    files={"loop.attn": ("symlink", "loop.attn")})
    if kind == 2:  # a directory named .attn, given and imported
        return Case(family="files", seed=seed, source=b'import "d.attn"\n' + ok, files={"d.attn": ("dir",)},
                    main=rng.choice(["case.attn", "d.attn"]))
    if kind == 3:  # non-UTF-8 bytes
        junk = bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 8)))
        pos = rng.randrange(len(ok) + 1)
        return Case(family="files", seed=seed, source=ok[:pos] + junk + ok[pos:])
    if kind == 4:  # NUL bytes, early or late
        pos = rng.choice([0, 5, len(ok)])
        src = ok[:pos] + b"\x00" + ok[pos:]
        if rng.random() < 0.5:
            src = b"# " + b"x" * 9000 + b"\n" + src
        return Case(family="files", seed=seed, source=src)
    if kind == 5:  # a file that vanishes before the call
        return Case(family="files", seed=seed, source=ok, vanish=True)
    if kind == 6:  # a dangling symlink
        return Case(family="files", seed=seed, files={"case.attn": ("symlink", "gone.attn")})
    if kind == 7:  # an import of a non-UTF-8 / NUL / empty file
        body = rng.choice([b"\xff\xfe", b"\x00\x00", b"", b"\xef\xbb\xbfpattern q = full\n", b"pattern q = full\r\n"])
        return Case(family="files", seed=seed, source=b'import "other.attn"\n' + ok, files={"other.attn": body})
    if kind == 8:  # an import that escapes the folder or names a non-.attn file
        target = rng.choice(["../../etc/passwd.attn", "/etc/passwd", "/dev/zero", ".attn", "sub/../../x.attn", "", "."])
        return Case(family="files", seed=seed, source=f'import "{target}"\n'.encode() + ok)
    if kind == 9:  # a symlink to a non-.attn file
        return Case(family="files", seed=seed, source=b'import "link.attn"\n' + ok, files={"link.attn": ("symlink", "/etc/hostname")})
    if kind == 10:  # an import cycle through symlinks
        return Case(family="files", seed=seed, source=b'import "b.attn"\n' + ok,
                    files={"b.attn": b'import "c.attn"\npattern b = full\n', "c.attn": ("symlink", "case.attn")})
    if kind == 11:  # odd line breaks, BOM, a very long line
        src = rng.choice([b"\xef\xbb\xbf" + ok, ok.replace(b"\n", b"\r"), b"pattern p = " + b"causal | " * 20000 + b"full\n",
                          b"pattern p = causal\x0c\n", "pattern p = causal\u2028\n".encode()])
        return Case(family="files", seed=seed, source=src)
    if kind == 12:  # a FIFO
        return Case(family="files", seed=seed, files={"case.attn": ("fifo",)})
    return Case(family="files", seed=seed, source=ok, vanish=True, main="sub/case.attn")  # folder missing too


def cases(seed: int) -> list[Case]:
    """The cases of one seed: a random program with its oracle, then a catalogue case."""
    return [random_program(seed)] + _catalogue(seed)


# ----------------------------------------------------------------------------- running


class Hang(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds: int):
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def memory_limit(value: str = MEMORY_LIMIT):
    old = os.environ.get("ATTNC_MAX_BYTES")
    os.environ["ATTNC_MAX_BYTES"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTNC_MAX_BYTES", None)
        else:
            os.environ["ATTNC_MAX_BYTES"] = old


def _fine(exc: BaseException) -> bool:
    """The exceptions a hostile input may raise: diagnostics and ValueErrors (expected / got / try)."""
    return isinstance(exc, (AttnError, ValueError))


@dataclass
class Runner:
    """Runs cases in a scratch folder and keeps the counts."""

    root: Path
    counts: collections.Counter = field(default_factory=collections.Counter)
    failures: list = field(default_factory=list)
    slow: list = field(default_factory=list)
    subprocess_every: int = 0  # also run every n-th case's first verb as a real subprocess (0: never)

    def fail(self, case: Case, what: str) -> None:
        self.counts["failures"] += 1
        self.failures.append(f"{what}\n{case.describe()}")

    def write(self, case: Case) -> Path:
        d = self.root / f"{case.family}-{case.seed}-{self.counts['cases']}"
        d.mkdir(parents=True)
        for rel, content in case.files.items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            elif content[0] == "symlink":
                os.symlink(content[1], p)
            elif content[0] == "dir":
                p.mkdir()
            elif content[0] == "fifo":
                os.mkfifo(p)
        main = d / case.main
        if case.source is not None and not main.exists() and not main.is_symlink():
            main.parent.mkdir(parents=True, exist_ok=True)
            data = case.source.encode("utf-8", "surrogatepass") if isinstance(case.source, str) else case.source
            main.write_bytes(data)
        if case.vanish and (main.exists() or main.is_symlink()):
            main.unlink()
            if case.main.startswith("sub/"):
                main.parent.rmdir()
        return main

    def run(self, case: Case) -> None:
        self.counts["cases"] += 1
        self.counts["family:" + case.family] += 1
        path = self.write(case)
        t0 = time.perf_counter()
        secs = None
        try:
            with watchdog(WATCHDOG_S), memory_limit():
                if case.inprocess:
                    self.inprocess(case, path)
                for verb in case.verbs:
                    self.cli(case, path, verb)
                secs = time.perf_counter() - t0
                if self.subprocess_every and self.counts["cases"] % self.subprocess_every == 0:
                    # timed apart: a new process spends seconds importing torch, which is not the case's work
                    t1 = time.perf_counter()
                    self.subprocess(case, path, case.verbs[0])
                    self.counts["subprocess_max_s"] = max(self.counts["subprocess_max_s"], time.perf_counter() - t1)
        except Hang as exc:
            self.fail(case, f"hang: {exc}")
        if secs is None:
            secs = time.perf_counter() - t0
        self.counts["seconds"] += secs
        if secs > LIMIT_S:
            self.counts["over_limit"] += 1
            self.slow.append(f"{secs:.1f} s: [{case.family} seed={case.seed}]")

    # -- in-process
    def inprocess(self, case: Case, path: Path) -> None:
        try:
            if isinstance(case.source, str) and not case.files and not case.vanish:
                prog = attnc.loads(case.source, file="case.attn")
            else:
                prog = attnc.load(path)
            pat = prog.pattern(case.pattern, **case.params)
        except Hang:
            raise
        except BaseException as exc:  # noqa: BLE001 - everything else is classified
            self.outcome(case, exc, "load")
            self._expect_invalid_seen(case, exc)
            return
        M, N, H, grid = case.M, case.N, case.H, case.grid
        want = None
        try:
            if pat.ir.inputs:
                self.counts["outcome:needs-inputs"] += 1
                return
            if case.oracle is not None:
                try:
                    want = case.oracle(*pat.resolve_sizes(M, N, H, grid)[:3])
                except Invalid:
                    want = Invalid
            mask = pat.mask(M, N, heads=H, grid=grid)
        except Hang:
            raise
        except BaseException as exc:  # noqa: BLE001
            self.outcome(case, exc, "mask")
            if want is not None and want is not Invalid and _fine(exc):
                self.fail(case, f"the oracle accepts these arguments but mask() refused them: {exc}")
            return
        if want is Invalid:
            self.fail(case, "the oracle rejects an argument (documented constraint) but mask() accepted it")
            return
        if want is not None:
            self.counts["compared"] += 1
            if mask.shape != want.shape or not torch.equal(mask, want):
                bad = (mask != want).nonzero()[:3].tolist() if mask.shape == want.shape else mask.shape
                self.counts["wrong_masks"] += 1
                self.fail(case, f"wrong mask: differs from the oracle at [h, q, k] {bad}")
                return
        self.counts["outcome:evaluated"] += 1
        Mv, Nv = mask.shape[-2], mask.shape[-1]
        try:
            plan = pat.plan(Mv, Nv, heads=H, grid=grid, block=(4, 4))
            if plan.allowed != int(mask.sum()):
                self.fail(case, f"plan counts {plan.allowed} allowed pairs, the mask {int(mask.sum())}")
            rep = pat.check_rows(Mv, Nv, heads=H, grid=grid)
            empty = int((mask.sum(-1) == 0).sum())
            if rep.empty_rows != empty:
                self.fail(case, f"check_rows finds {rep.empty_rows} empty rows, the mask {empty}")
            pat.simulate(Mv, Nv, heads=H, grid=grid, tile=(4, 4), head_dim=8)
        except Hang:
            raise
        except BaseException as exc:  # noqa: BLE001
            self.outcome(case, exc, "plan")

    def outcome(self, case: Case, exc: BaseException, stage: str) -> None:
        if _fine(exc):
            self.counts[f"outcome:{type(exc).__name__}"] += 1
            return
        self.counts["tracebacks"] += 1
        tb = "".join(traceback.format_exception(exc))[-3000:]
        self.fail(case, f"traceback in {stage}: {type(exc).__name__}: {exc}\n{tb}")

    def _expect_invalid_seen(self, case: Case, exc: BaseException) -> None:
        if case.oracle is None or not _fine(exc) or case.family != "random":
            return
        try:
            case.oracle(case.M, case.N or case.M, case.H)
        except Invalid:
            return
        self.fail(case, f"the oracle accepts this program but loading / binding refused it: {exc}")

    # -- CLI
    def argv(self, case: Case, path: Path, verb: str) -> list[str]:
        argv = [verb, str(path)]
        if case.pattern:
            argv += ["-p", case.pattern]
        for k, v in case.params.items():
            argv += ["--set", f"{k}={v}"]
        if case.grid is not None:
            argv += ["--grid", "x".join(map(str, case.grid))]
        elif case.M is not None:
            argv += ["--seq-len", str(case.N if case.N is not None and case.N != case.M else case.M)]
        if case.H != 1:
            argv += ["--heads", str(case.H)]
        if verb == "show" and "--block" not in case.extra_argv:
            argv += ["--block", "4"]
        if verb == "simulate":
            argv += ["--tile", "4x4"]
        if verb == "compile":
            argv += ["-o", str(path.parent / "out"), "--tile", "16x16"]
        extra = list(case.extra_argv)
        for flag, owner in (("--routed-density", "simulate"), ("--block", "show")):
            if flag in extra and verb != owner:
                i = extra.index(flag)
                del extra[i: i + 2]
        return argv + extra

    def cli(self, case: Case, path: Path, verb: str) -> None:
        argv = self.argv(case, path, verb)
        out, err = io.StringIO(), io.StringIO()
        self.counts["cli_calls"] += 1
        try:
            rc = cli_main(argv, out=out, err=err)
        except Hang:
            raise
        except BaseException as exc:  # noqa: BLE001
            self.counts["tracebacks"] += 1
            tb = "".join(traceback.format_exception(exc))[-3000:]
            self.fail(case, f"traceback from attnc {' '.join(argv)}: {type(exc).__name__}: {exc}\n{tb}")
            return
        self.counts[f"cli:{verb}:{rc}"] += 1
        if rc not in (0, 1, 2) or "Traceback" in err.getvalue():
            self.counts["tracebacks"] += 1
            self.fail(case, f"attnc {' '.join(argv)} exited {rc}:\n{err.getvalue()[-2000:]}")
            return
        if verb == "show" and rc == 0 and case.oracle is not None and case.H == 1 and case.grid is None:
            self.check_show(case, out.getvalue(), argv)

    def check_show(self, case: Case, text: str, argv) -> None:
        """`attnc show` at M = N: its allowed-pair count must match the oracle's."""
        import re
        n = case.N if case.N is not None and case.N != case.M else case.M
        try:
            want = case.oracle(n, n, 1)
        except Invalid:
            self.fail(case, f"the oracle rejects an argument but attnc {' '.join(argv)} exited 0")
            return
        m = re.search(r"density [0-9.]+ \((\d+) of (\d+) pairs\)", text)
        if m is None:
            self.fail(case, f"attnc show printed no density line:\n{text[-1000:]}")
            return
        self.counts["show_compared"] += 1
        if int(m.group(1)) != int(want.sum()) or int(m.group(2)) != n * n:
            self.counts["wrong_masks"] += 1
            self.fail(case, f"attnc show counts {m.group(1)} of {m.group(2)} pairs, the oracle {int(want.sum())} of {n * n}")

    def subprocess(self, case: Case, path: Path, verb: str) -> None:
        """The same call through a real `python -m attnc` process."""
        argv = [sys.executable, "-m", "attnc", *self.argv(case, path, verb)]
        env = dict(os.environ, ATTNC_MAX_BYTES=MEMORY_LIMIT)
        self.counts["subprocesses"] += 1
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=WATCHDOG_S, env=env,
                                 errors="replace", stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            self.fail(case, f"hang: {' '.join(argv[2:])} still running after {WATCHDOG_S} s")
            return
        if res.returncode not in (0, 1, 2) or "Traceback" in res.stderr:
            self.counts["tracebacks"] += 1
            self.fail(case, f"subprocess {' '.join(argv[2:])} exited {res.returncode}:\n{res.stderr[-2000:]}")

    def summary(self) -> str:
        c = self.counts
        fams = ", ".join(f"{k[7:]} {v}" for k, v in sorted(c.items()) if k.startswith("family:"))
        outs = ", ".join(f"{k[8:]} {v}" for k, v in sorted(c.items()) if k.startswith("outcome:"))
        return (f"hostile: {c['cases']} cases ({fams}); {c['cli_calls']} CLI calls in-process, {c['subprocesses']} "
                f"subprocesses (slowest {c['subprocess_max_s']:.1f} s); masks compared with the oracle {c['compared']} (+ {c['show_compared']} show counts); "
                f"tracebacks {c['tracebacks']}, wrong masks {c['wrong_masks']}, failures {c['failures']}, "
                f"over {LIMIT_S:.0f} s {c['over_limit']}; outcomes: {outs}; {c['seconds']:.0f} s")
