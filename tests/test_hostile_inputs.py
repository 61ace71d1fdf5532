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
