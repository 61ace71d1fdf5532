"""Inputs that used to escape as raw exceptions or to take exponential time:
each is now a located diagnostic, a ValueError saying expected / got / try, or
fast (issue 17, "No tracebacks, no hangs")."""

import re

import pytest

import attnc
from attnc.errors import AttnError


def diag(src: str, file: str = "x.attn") -> str:
    with pytest.raises(AttnError) as info:
        attnc.loads(src, file=file)
    return str(info.value)


@pytest.mark.parametrize("src,where,word", [
    ("pattern p ongrid(h, w) = causal", "x.attn:1:11", "ongrid"),
    ("patternp = causal", "x.attn:1:1", "patternp"),
    ("pattern p = where q < k andk > 1", "x.attn:1:25", "andk"),
    ("let x = 1\npattern p = global(0 .. 8 stepx)", "x.attn:2:27", "stepx"),
])
def test_a_keyword_glued_to_a_name_is_a_diagnostic(src, where, word):
    err = diag(src)
    assert err.startswith(f"{where}: error: missing space: the keyword") and f"('{word}')" in err, err


def test_keywords_next_to_brackets_still_parse():
    for src in ["pattern p(a = 1) on grid(x) = causal", "pattern p = (where q in{1} or not(k in {2}))",
                "pattern p = where(q < k)and(k > 1)"]:
        attnc.loads(src)


def test_brackets_in_comments_and_strings_do_not_count_toward_the_nesting_limit():
    src = "# " + "(" * 300 + "\n" + '# "' + "{" * 300 + '"\npattern p = causal  # ' + "(" * 500 + "\n"
    assert attnc.loads(src).pattern().mask(4).sum() == 10
    assert "nested too deeply" in diag("pattern p = " + "(" * 201 + "causal" + ")" * 201)


def _chain(step: str, n: int, first: str = "pattern p0 = causal\n") -> str:
    return first + "".join(step.format(i=i, j=i - 1) for i in range(1, n))


@pytest.mark.parametrize("src,name", [
    (_chain("pattern p{i} = p{j} | p{j}\n", 40), "p39"),
    (_chain("pattern p{i} = p{j} & p{j} | p{j}\n", 40), "p39"),
    (_chain("let a{i} = a{j} | a{j}\n", 40, "let a0 = sliding(3)\n") + "pattern p = a39", "p"),
    (_chain("let a{i} = a{j} + a{j} - a{j}\n", 40, "let a0 = 3\n") + "pattern p = sliding(a39)", "p"),
    (_chain("pattern p{i}(w = 2) = p{j}(w = w) | p{j}(w = w + 0)\n", 40, "pattern p0(w = 2) = sliding(w)\n"), "p39"),
])
def test_reusing_the_previous_definition_twice_is_linear(src, name):
    # used to double the work at every line: 18 lines took ~19 s, 40 lines would take days
    import time
    t0 = time.perf_counter()
    pat = attnc.loads(src).pattern(name)
    assert pat.mask(8).shape == (1, 8, 8)
    assert time.perf_counter() - t0 < 20  # generous: the old code needs ~2**40 steps here


def test_a_pattern_whose_tree_doubles_at_every_line_is_refused_quickly():
    src = _chain("pattern p{i} = p{j} | ~p{j}\n", 40)
    err = diag(src)
    assert re.search(r"x\.attn:\d+:9: error: pattern 'p\d+' is too large: more than 20000", err), err


@pytest.mark.parametrize("body", [" | ".join(f"sliding({3 * i + 1})" for i in range(8)), "global({0, 1000000})",
                                  "rows({0, 5, 9}) | cols({1, 2})"])
def test_the_density_formula_gives_up_within_its_budget(body, tmp_path):
    # used to run for minutes (inclusion-exclusion over every sub-union)
    from attnc.cli import main
    from attnc.symbolic import NoFormula
    pat = attnc.loads(f"pattern p = {body}").pattern()
    with pytest.raises(NoFormula, match="too many terms for a closed form"):
        pat.formula()
    f = tmp_path / "p.attn"
    f.write_text(f"pattern p = {body}\n")
    import io
    out, err = io.StringIO(), io.StringIO()
    assert main(["show", str(f), "--seq-len", "128"], out, err) == 0, err.getvalue()
    assert "density formula: none (too many terms" in out.getvalue()
    assert "exact counts at this size" in out.getvalue()


@pytest.mark.parametrize("body", ["global({})", "rows({})", "cols({})", "cols({}) | sliding(3)"])
def test_empty_sets_have_a_formula(body):
    pat = attnc.loads(f"pattern p = {body}").pattern()
    assert pat.formula().allowed_at(40) == int(pat.mask(40).sum())
