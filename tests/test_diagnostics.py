"""Golden diagnostics: each mistake gives a named message at the right column
(tests/golden/diagnostics.txt; `pytest --update-golden` rewrites it)."""

import pytest

import attnc

MISTAKES = {
    "unknown_primitive": "pattern p = bnd(3, 3)",
    "unknown_name": "pattern p(window = 8) = sliding(windw)",
    "arity": "pattern p = band(3)",
    "too_many_args": "pattern p = sliding(3, 4)",
    "unknown_kwarg": "pattern p on grid(h, w) = neighborhood(7, dilaton = 2)",
    "type_mask_expected": "pattern p = 3 + 4",
    "type_int_expected": "pattern p = sliding(causal)",
    "mask_plus_int": "pattern p = causal | 3",
    "size_too_small": "pattern p on grid(h, w) = neighborhood(1)",
    "stride_gt_size": "pattern p on grid(h, w) = neighborhood(3, stride = 4)",
    "tuple_len": "pattern p on grid(h, w) = neighborhood((3, 5, 7))",
    "tuple_on_seq": "pattern p = band((1, 2), 3)",
    "unknown_axis": "pattern p on grid(h, w) = block(4) @ x",
    "along_on_seq": "pattern p = sliding(4) @ h",
    "coord_outside_where": "pattern p on grid(h, w) = q.h",
    "q_outside_where": "pattern p = sliding(q)",
    "comparison_outside_where": "pattern p = band(1, 1) & q < k",
    "and_between_masks": "pattern p = where q < k & k > 2 and causal",
    "pipe_in_where": "pattern p = where q < k | k > 2",
    "recursive_pattern": "pattern a = b | causal\npattern b = a & sink(2)",
    "self_let": "let x = x + 1\npattern p = sliding(x)",
    "duplicate_definition": "pattern p = causal\npattern p = full",
    "unreachable_arm": "pattern p = heads { _ => causal; 0 => full }",
    "bad_selector": "pattern p = heads { causal => full; _ => none }",
    "input_type": "pattern p(doc: segment) = same(doc)",
    "same_needs_input": "pattern p(doc = 3) = same(doc)",
    "dynamic_in_blockwise": "pattern p(doc: segments) = blockwise(4, same(doc))",
    "division_by_zero": "pattern p = sliding(4 // 0)",
    "syntax_missing_paren": "pattern p = band(3, 3",
    "syntax_double_pipe": "pattern p = causal || sink(4)",
    "syntax_brackets": "pattern p = global([0, 1])",
    "syntax_double_equals": "pattern p = causal == full",
    "syntax_missing_operator": "pattern p = causal sink(4)",
    "bad_layout": "pattern p on grd(h, w) = full",
    "layout_mismatch": "pattern g on grid(h, w) = block(2)\npattern p = g",
    "reserved_param": "pattern p(N = 4) = sliding(N)",
    "param_hidden_in_where": "pattern p(k = 3) = where q - k < 8",
    "let_hidden_in_where": "pattern p = let h = 2 in where h == 0 | causal",
    "negative_range_step": "pattern p = global(0 .. 10 step 0)",
    "several_errors_at_once": "pattern a = bnd(1, 1)\npattern b = sliding(x)\npattern c = sink(causal)",
}


def render(src: str) -> str:
    with pytest.raises(attnc.AttnError) as info:
        attnc.loads(src, file="t.attn")
    return str(info.value)


def test_golden_diagnostics(golden):
    out = []
    for name, src in MISTAKES.items():
        out.append(f"=== {name}\n{src}\n---\n{render(src)}\n")
    golden("diagnostics.txt", "\n".join(out))


@pytest.mark.parametrize("name", list(MISTAKES))
def test_every_mistake_is_located(name):
    err = render(MISTAKES[name])
    first = err.splitlines()[0]
    assert first.startswith("t.attn:"), first
    line, col = map(int, first.split(":")[1:3])
    assert line >= 1 and col >= 1
    assert ": error: " in first
    assert "^" in err  # a caret under the source line


def test_all_errors_of_a_file_are_reported_together():
    err = render(MISTAKES["several_errors_at_once"])
    assert err.count(": error: ") == 3


def test_binding_errors():
    prog = attnc.loads("pattern p(window = 8) = sliding(window)", file="b.attn")
    with pytest.raises(attnc.AttnError, match=r"^b.attn:1:9: error: pattern 'p' has no parameter 'windw'"):
        prog.pattern("p", windw=3)
    with pytest.raises(attnc.AttnError, match="sliding window w must be >= 1, got 0"):
        prog.pattern("p", window=0)
    with pytest.raises(attnc.AttnError, match="expected an integer, boolean, tuple or set, got str"):
        prog.pattern("p", window="8")
    with pytest.raises(attnc.AttnError, match="no pattern named 'q'"):
        prog.pattern("q")


def test_size_dependent_constraints_are_checked_when_sizes_are_known():
    pat = attnc.loads("pattern p on grid(h, w) = neighborhood(7, dilation = 3)", file="c.attn").pattern()
    with pytest.raises(attnc.AttnError, match=r"c.attn:1:27: error: neighborhood needs size \* dilation <= length, got 7 \* 3 > 16"):
        pat.mask(256, grid=(16, 16))
