"""Parser and elaborator fuzzing: whatever text goes in, the only outcomes are
success or `AttnError` diagnostics located inside that text.

Three generators: random token streams over the grammar's vocabulary,
grammar-shaped random programs (loosely typed, so many fail elaboration), and
mutations of every examples/*.attn (characters, tokens, truncation, deep
nesting, long flat chains, huge numbers, unicode, NUL bytes). Sources that
compile are bound with their defaults and evaluated (mask, plan, IR text) at
small sizes, where again only `AttnError` (or `ValueError` about call sizes)
may come out.

CI runs a fast deterministic subset; `ATTNC_LONG=1` runs >= 10 000 cases with
fresh randomness. The counts are printed at the end of the module.
"""

from __future__ import annotations

import collections
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import attnc
from attnc.errors import AttnError
from conftest import EXAMPLES
from counts import print_line
from hostile import Hang, watchdog  # noqa: F401  (one watchdog for the fuzz and hostile suites)

LONG = bool(os.environ.get("ATTNC_LONG"))
FILE = "fuzz.attn"
#: per-generator example counts: 4 generators, >= 10 000 cases in the long run
EXAMPLES_PER_TEST = 3000 if LONG else 120
WATCHDOG_S = 60  # a case still running after this long is a hang, not slowness

COUNTS: collections.Counter = collections.Counter()

FUZZ = settings(
    max_examples=EXAMPLES_PER_TEST,
    deadline=None,
    derandomize=not LONG,  # CI is reproducible; the long run explores
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request, tmp_path_factory):
    """Run in an empty directory (fuzzed imports resolve there) and print the counts."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("fuzz"))
    yield
    os.chdir(old)
    total = sum(v for k, v in COUNTS.items() if k.startswith("case:"))
    parts = ", ".join(f"{k[5:]} {v}" for k, v in sorted(COUNTS.items()) if k.startswith("case:"))
    outcomes = ", ".join(f"{k[8:]} {v}" for k, v in sorted(COUNTS.items()) if k.startswith("outcome:"))
    line = f"fuzz: {total} cases ({parts}); outcomes: {outcomes}"
    print_line(request.config, line)


# ----------------------------------------------------------------------------- the oracle


def check_located(err: AttnError, sources: dict[str, str]) -> None:
    """Every diagnostic points inside a source it came from, and renders as
    FILE:LINE:COL with that very line under it."""
    rendered = str(err)
    assert err.diagnostics, "an AttnError without diagnostics"
    for d in err.diagnostics:
        assert d.span.file in sources, f"diagnostic in unknown file {d.span.file!r}: {rendered}"
        text = sources[d.span.file]
        lines = text.split("\n")
        assert 1 <= d.span.line <= len(lines), f"line {d.span.line} outside 1..{len(lines)}: {rendered}"
        line = lines[d.span.line - 1]
        assert 1 <= d.span.col <= len(line) + 1, f"col {d.span.col} outside 1..{len(line) + 1}: {rendered}"
        head = f"{d.span.file}:{d.span.line}:{d.span.col}: {d.severity}: "
        assert head in rendered, (head, rendered)
        shown = "    " + line.rstrip("\r").replace("\t", " ")
        assert shown in rendered.split("\n"), f"source line {d.span.line} not shown under {head!r}:\n{rendered}"
    assert rendered.splitlines()[0].startswith(f"{err.diagnostics[0].span.file}:")


def _sizes(pat):
    """(M, N, heads, grid) small enough to evaluate, or None."""
    layout = pat.layout
    grid = (3, 4, 2)[: len(layout.axes)] or None
    try:
        M, N, H, grid = pat.resolve_sizes(1, None, 3, grid)
    except AttnError as err:  # e.g. a text length seq(T) that depends on N
        check_located(err, pat.program.sources)
        COUNTS["outcome:size-diagnostic"] += 1
        return None
    if N > 400:
        return None
    return (N if grid else 12), (N if grid else 12), H, grid


def exercise(source: str) -> str:
    """Compile `source`, then bind and evaluate every pattern; returns the outcome."""
    with watchdog(WATCHDOG_S):
        try:
            prog = attnc.loads(source, file=FILE)
        except AttnError as err:
            check_located(err, {FILE: source, **err.sources})
            return "diagnostic"
        outcome = "compiled"
        for name in prog.names():
            try:
                pat = prog.pattern(name)
            except AttnError as err:
                check_located(err, prog.sources)
                outcome = "bind-diagnostic"
                continue
            assert pat.text().startswith("pattern ")
            if pat.ir.inputs:
                continue
            sizes = _sizes(pat)
            if sizes is None:
                continue
            M, N, H, grid = sizes
            try:
                mask = pat.mask(M, N, heads=H, grid=grid)
                assert mask.shape == (H, M, N) and str(mask.dtype) == "torch.bool"
                plan = pat.plan(M, N, heads=H, grid=grid, block=(4, 4))
                assert plan.counts()["tiles_total"] == H * -(-M // 4) * -(-N // 4)
                if not grid:  # bottom-right alignment: fewer queries than keys
                    pat.mask(5, N, heads=H)
                outcome = "evaluated" if outcome == "compiled" else outcome
            except AttnError as err:
                check_located(err, prog.sources)
                outcome = "eval-diagnostic"
        return outcome


def run_case(kind: str, source: str) -> None:
    COUNTS["case:" + kind] += 1
    COUNTS["outcome:" + exercise(source)] += 1


# ----------------------------------------------------------------------------- vocabulary

KEYWORDS = ["pattern", "let", "import", "on", "in", "where", "heads", "step", "true", "false", "not", "and", "or",
            "seq", "grid"]
PRIMS = ["full", "none", "causal", "band", "sliding", "neighborhood", "block", "strided", "sink", "global", "rows",
         "cols", "prefix", "random", "same", "routed", "topk", "dilate", "blockwise", "min", "max", "abs", "size"]
NAMES = ["p", "q", "k", "h", "w", "x", "M", "N", "H", "_", "window", "doc", "segments", "blocks", "dilation", "stride",
         "causal_", "__import__", "os", "system", "eval", "exec", "self", "None", "lambda"]
PUNCT = ["(", ")", "{", "}", ",", ";", "=", "=>", "|", "&", "-", "~", "@", ".", "..", "+", "*", "//", "%", "**",
         "<", "<=", "==", "!=", ">", ">=", ":", "[", "]", "!", "\\", "'", "\""]
NUMBERS = ["0", "1", "2", "3", "7", "64", "4096", "1152921504606846976", "1152921504606846977", "99999999999999999999",
           "9" * 5000]
STRINGS = ['"x.attn"', '""', '"."', '".."', '"a/b.attn"', '"/"', '"\\n"', '"unterminated']
WEIRD = ["\x00", "\u00e4", "\u2028", "\u2029", "\r", "\r\n", "\t", "\x0b", "\x0c", "\x85", "\ufeff", "\U0001f600",
         "# comment\n", "#\u2028 not a line break for the parser\n", "\n"]
VOCAB = KEYWORDS + PRIMS + NAMES + PUNCT + NUMBERS + STRINGS + WEIRD

TOKEN_RE = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|[0-9]+|\.\.|//|\*\*|=>|<=|>=|==|!=|\"[^\"\n]*\"|#[^\n]*|.", re.S)
SEEDS = {p.name: p.read_text() for p in sorted(EXAMPLES.glob("*.attn"))}


# ----------------------------------------------------------------------------- 1. token streams


@FUZZ
@given(st.lists(st.sampled_from(VOCAB), max_size=40), st.sampled_from(["", " ", "\n"]))
def test_random_token_streams(tokens, sep):
    run_case("tokens", sep.join(tokens))


@FUZZ
@given(st.lists(st.sampled_from(VOCAB), max_size=30))
def test_token_streams_after_a_pattern_head(tokens):
    # most random streams die at the first token; these start where expressions do
    run_case("tokens-in-pattern", "pattern p(w = 4) on grid(a, b) = " + " ".join(tokens))


# ----------------------------------------------------------------------------- 2. grammar-shaped programs

INT_LEAVES = st.sampled_from(["0", "1", "2", "3", "4", "7", "w", "M", "N", "H", "size(a)", "size(b)", "-1", "x",
                              "causal", "q", "(1, 2)", "{0, 3}", "true"])
MASK_LEAVES = st.sampled_from(["full", "none", "causal", "sink(2)", "sliding(w)", "band(1, 2)", "block(3)",
                               "strided(2)", "prefix(3)", "global({0, N - 1})", "rows(0 .. 2)", "cols({1})",
                               "random(2, seed = 1)", "neighborhood(3)", "neighborhood((3, 2), dilation = 1)",
                               "block(2, shift = 1, halo = 1)", "where q - k < w", "where q.a == k.a and k.b <= q.b",
                               "where (q + k) % 3 == h", "same(doc)", "topk(2, block = 4)", "other", "other(w = 2)",
                               "3", "w", "unknown_thing"])


def _ints(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "//", "%", "**"]), children).map(" ".join),
        st.tuples(st.sampled_from(["min", "max"]), children, children).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        children.map(lambda c: f"abs({c})"),
        children.map(lambda c: f"({c})"),
    )


INTS = st.recursive(INT_LEAVES, _ints, max_leaves=6)


def _masks(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(["|", "&", "-"]), children).map(" ".join),
        children.map(lambda c: f"~{c}"),
        children.map(lambda c: f"({c})"),
        st.tuples(children, st.sampled_from(["a", "b", "c"])).map(lambda t: f"({t[0]}) @ {t[1]}"),
        st.tuples(INTS, children).map(lambda t: f"dilate({t[0]}, {t[1]})"),
        st.tuples(INTS, children).map(lambda t: f"blockwise({t[0]}, {t[1]})"),
        st.tuples(INTS, children).map(lambda t: f"let x = {t[0]} in {t[1]}"),
        st.lists(st.tuples(st.one_of(INTS, st.just("_"), st.just("0 .. 2")), children), min_size=1, max_size=3).map(
            lambda arms: "heads { " + "; ".join(f"{s} => {b}" for s, b in arms) + " }"),
        st.tuples(INTS, st.sampled_from(["<", "<=", "==", "!=", ">"]), INTS).map(lambda t: f"where q + {t[0]} {t[1]} k * {t[2]}"),
    )


MASKS = st.recursive(MASK_LEAVES, _masks, max_leaves=8)
LAYOUTS = st.sampled_from(["", "on seq", "on grid(a, b)", "on grid(a)", "on grid(a, b, c)", "on seq(3) + grid(a, b)",
                           "on seq(w) + grid(a, b)", "on grid(a, a)", "on seq + grid(a, b)", "on grd(a)"])
PARAMS = st.sampled_from(["", "()", "(w = 2)", "(w = 3, doc: segments)", "(w)", "(w = N // 4)", "(w = (2, 3))",
                          "(w = {1, 2})", "(sel: blocks(4), w = 1)", "(w: segment)", "(N = 3)"])


@FUZZ
@given(st.lists(st.tuples(PARAMS, LAYOUTS, MASKS), min_size=1, max_size=3), st.booleans(), INTS)
def test_grammar_shaped_programs(defs, with_other, let_value):
    src = [f"let x = {let_value}"]
    if with_other:
        src.append("pattern other(w = 1) = sliding(w + 1) | sink(1)")
    for i, (params, layout, body) in enumerate(defs):
        src.append(f"# pattern number {i}\npattern p{i}{params} {layout} = {body}")
    run_case("grammar", "\n".join(src) + "\n")


# ----------------------------------------------------------------------------- 3. mutations of the examples


def _mutate(data, text: str) -> str:
    op = data.draw(st.sampled_from(["insert", "delete", "swap", "duplicate", "tokens", "truncate", "nest", "chain",
                                    "huge", "unicode", "nul", "replace-token"]), label="op")
    n = len(text)
    pos = data.draw(st.integers(0, n), label="pos")
    if op == "insert":
        return text[:pos] + data.draw(st.text(max_size=6), label="ins") + text[pos:]
    if op == "delete":
        return text[:pos] + text[pos + data.draw(st.integers(1, 30)):]
    if op == "swap" and n >= 2:
        j = data.draw(st.integers(0, n - 1))
        i = min(pos, n - 1)
        chars = list(text)
        chars[i], chars[j] = chars[j], chars[i]
        return "".join(chars)
    if op == "duplicate":
        return text[:pos] + text[pos: pos + data.draw(st.integers(1, 40))] + text[pos:]
    if op in ("tokens", "replace-token"):
        toks = TOKEN_RE.findall(text)
        i = data.draw(st.integers(0, max(0, len(toks) - 1)))
        if op == "replace-token":
            toks[i:i + 1] = [data.draw(st.sampled_from(VOCAB))]
        else:
            how = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
            j = data.draw(st.integers(0, max(0, len(toks) - 1)))
            if how == "delete":
                del toks[i:i + 1]
            elif how == "duplicate":
                toks[i:i] = toks[i:j + 1][:20]
            elif toks:
                toks[i], toks[j] = toks[j], toks[i]
        return "".join(toks)
    if op == "truncate":
        return text[:pos]
    if op == "nest":
        depth = data.draw(st.sampled_from([5, 50, 199, 201, 250, 1000, 20000]))
        opener = data.draw(st.sampled_from(["(", "~", "-", "let z = 1 in ", "~(", "dilate(1, ", "not "]))
        closer = {"(": ")", "~(": ")", "dilate(1, ": ")"}.get(opener, "")
        start = text.rfind("=", 0, max(pos, 1)) + 1 or pos
        end = text.find("\n", start)
        end = n if end < 0 else end
        return text[:start] + " " + opener * depth + text[start:end] + closer * depth + text[end:]
    if op == "chain":
        length = data.draw(st.sampled_from([10, 150, 201, 2000, CHAIN]))
        piece = data.draw(st.sampled_from([" | causal", " & full", " + 1", " - sink(1)", " * 1", " @ h"]))
        end = text.find("\n", pos)
        end = n if end < 0 else end
        return text[:end] + piece * length + text[end:]
    if op == "huge":
        digits = data.draw(st.sampled_from([19, 20, 40, 4400, 100_000]))
        m = list(re.finditer(r"[0-9]+", text))
        if not m:
            return text + " " + "7" * digits
        hit = m[data.draw(st.integers(0, len(m) - 1))]
        return text[:hit.start()] + "7" * digits + text[hit.end():]
    if op == "unicode":
        return text[:pos] + data.draw(st.sampled_from(WEIRD + ["\u00e9", "\u0394", "\u200b", "\ud7ff", "\U00010000"])) + text[pos:]
    if op == "nul":
        return text[:pos] + "\x00" + text[pos:]
    return text


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_mutated_examples(name, data):
    text = SEEDS[name]
    for _ in range(data.draw(st.integers(1, 3), label="rounds")):
        text = _mutate(data, text)
    run_case("mutation", text)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_example_survives_each_mutation_kind(name):
    """A fixed sweep: each example under each structural stress, in CI too."""
    text = SEEDS[name]
    first_int = re.search(r"[0-9]+", text)
    body = text.rfind("=") + 1
    cases = {
        "deep-parens": text[:body] + "(" * 300 + text[body:].rstrip() + ")" * 300 + "\n",
        "deep-tilde": text[:body] + " ~" * 300 + text[body:],
        "long-chain": text.rstrip() + " | causal" * 2000 + "\n",
        "huge-number": text[:first_int.start()] + "9" * 5000 + text[first_int.end():] if first_int else text + " 9" * 5000,
        "nul": text.replace("=", "=\x00", 1),
        "unicode-line-separator": text.replace("\n", "\u2028", 3),
        "crlf": text.replace("\n", "\r\n"),
        "truncated": text[: len(text) // 2],
        "latin-name": text.replace("pattern ", "pattern \u00e9", 1),
    }
    for kind, src in cases.items():
        run_case("sweep:" + kind, src)


# ----------------------------------------------------------------------------- limits, named


CHAIN = 100_000 if LONG else 20_000  # the 100k chain costs ~5 s of parsing: long runs only
LIMITS = {
    "flat-chain": ("pattern p = " + " | ".join(["causal"] * CHAIN), "expression too deep: more than 200 nested operators"),
    "deep-brackets": ("pattern p = " + "(" * 5000 + "causal" + ")" * 5000, "nested too deeply (more than 200 levels of brackets)"),
    "long-sum": ("pattern p = sliding(" + " + ".join(["1"] * 5000) + ")", "expression too deep"),
    "let-in-chain": ("pattern p = " + "let x = 1 in " * 3000 + "causal", "expression too deep"),
    "not-chain": ("pattern p = where " + "not " * 3000 + "q < k", "expression too deep"),
    "huge-literal": ("pattern p = sliding(" + "9" * 100_000 + ")", "integer literal 9999999999...9999 (100000 digits) is too large"),
    "literal-past-limit": ("pattern p = sliding(1152921504606846977)", "integer literal 1152921504606846977 is too large (limit 2**60"),
    "power-past-limit": ("pattern p = sliding(2 ** 61)", "integer value too large: 2305843009213693952 (limit 2**60"),
    "product-past-limit": ("pattern p = global(0 .. 2 ** 40 * 2 ** 40)", "integer value too large"),
    "power-of-power": ("pattern p(w = 2) = sliding(((w ** 64) ** 64) ** 64)", "exponent 4096 (limit 64)"),
    "size-exponent": ("pattern p = sliding(2 ** N)", "the exponent of '**' must be known when the pattern is bound"),
    "let-chain": ("".join(f"let x{i} = x{i - 1} + 1\n" if i else "let x0 = 1\n" for i in range(3000)) + "pattern p = sliding(x2999)",
                  "expression too complex: more than 250 nested levels"),
    "call-chain": ("".join(f"pattern p{i} = p{i - 1} | causal\n" if i else "pattern p0 = causal\n" for i in range(100)),
                   "pattern calls nested more than 64 deep"),
}


@pytest.mark.parametrize("name", list(LIMITS))
def test_limits_give_located_diagnostics(name):
    src, msg = LIMITS[name]
    with pytest.raises(AttnError) as info:
        attnc.loads(src, file=FILE)
    assert msg in str(info.value)
    check_located(info.value, {FILE: src})


def test_the_limits_leave_room_for_real_patterns():
    # 200 levels of operators and 250 through lets are far past anything hand-written
    src = "pattern p = " + " | ".join(["sink(1)"] * 150) + " | causal"
    assert attnc.loads(src).pattern().mask(8).sum() == 36
    lets = "".join(f"let x{i} = x{i - 1} + 1\n" if i else "let x0 = 1\n" for i in range(100))
    assert attnc.loads(lets + "pattern p = sliding(x99)").pattern().mask(200)[0, 199].sum() == 100


@pytest.mark.parametrize("src,sizes,msg", [
    ("pattern p(w = 1) = band(w, 0)", dict(w=2**61), "parameter 'w': 2305843009213693952 is too large"),
    ("pattern p = where q * 1073741824 * 1073741824 * 4 > k", {}, "integer overflow in `where`"),
    ("pattern p = where q ** 64 > k", {}, "integer overflow in `where`"),
    ("pattern p(w = 1) = sliding(w * N * N * N * N)", dict(w=2**40), "beyond the integer limit 2**60"),
])
def test_integer_overflow_is_a_diagnostic_not_a_wrong_mask(src, sizes, msg):
    with pytest.raises(AttnError, match=re.escape(msg)):
        attnc.loads(src, file=FILE).pattern(**sizes).mask(1024)


@pytest.mark.parametrize("params,msg", [
    ("(w = N // 4)", "the text length T of seq(T) must not depend on M or N"),
    ("(w = M)", "the text length T of seq(T) must not depend on M or N"),
    ("(w = H - 5)", "the text length T of seq(T) must be >= 0, got -2"),
])
def test_text_length_of_a_mixed_layout_is_checked_at_call_time(params, msg):
    pat = attnc.loads(f"pattern p{params} on seq(w) + grid(a, b) = causal", file=FILE).pattern()
    with pytest.raises(AttnError, match=re.escape(msg)) as info:
        pat.mask(4, grid=(3, 4), heads=3)
    check_located(info.value, {FILE: pat.program.sources[FILE]})


def test_text_length_may_use_heads_axis_sizes_and_other_parameters():
    for params, T in [("(w = H)", 3), ("(w = size(a))", 3), ("(v = 2, w = v * 2)", 4)]:
        pat = attnc.loads(f"pattern p{params} on seq(w) + grid(a, b) = causal").pattern()
        assert pat.mask(4, grid=(3, 4), heads=3).shape == (3, 4, T + 12)


def test_huge_dilation_does_not_loop_over_every_group():
    pat = attnc.loads("pattern p(d = 1) = dilate(d, causal)").pattern(d=2**59)
    with watchdog(WATCHDOG_S):
        m = pat.mask(64)
    assert bool((m[0] == attnc.loads("pattern p = where q == k").pattern().mask(64)[0]).all())


@pytest.mark.parametrize("src", ["pattern p(doc: segments) = causal & same(doc)",
                                 "pattern p(sel: blocks(4)) = causal & routed(sel)"])
def test_plan_of_a_pattern_with_run_time_inputs_needs_them(src):
    pat = attnc.loads(src, file=FILE).pattern()
    with pytest.raises(ValueError, match="missing run-time input '(doc|sel)'.*try"):
        pat.plan(16, block=(4, 4))
