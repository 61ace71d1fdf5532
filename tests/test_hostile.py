"""The hostile-input generator of tests/hostile.py, run in CI and as a long run.

CI runs a fixed, seeded subset (`CI_SEEDS` seeds, two cases each: a random program
compared with its brute-force oracle and a catalogue case) in-process and through
`attnc.cli.main`, plus a few real `python -m attnc` subprocesses. `ATTNC_LONG=1`
runs `LONG_SEEDS` seeds (>= 20 000 cases) from `$ATTNC_SEED` (default 0), in chunks
so that one failure does not hide the rest. The counts line (cases, tracebacks,
wrong masks, cases over 5 s) is printed at the end of the module; the times are
measured, not asserted (the CI machine is shared), while tracebacks, wrong masks,
hangs (60 s watchdog) and refused valid programs fail the test.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import attnc
import hostile
from attnc.cli import main
from counts import print_line

LONG = bool(os.environ.get("ATTNC_LONG"))
BASE = int(os.environ.get("ATTNC_SEED", "0"))
CI_SEEDS = 100
LONG_SEEDS = 10_000  # two cases per seed: 20 000 cases
CHUNK = 500
SEEDS = LONG_SEEDS if LONG else CI_SEEDS
CHUNKS = [(BASE + a, BASE + min(a + CHUNK, SEEDS)) for a in range(0, SEEDS, CHUNK)]


@pytest.fixture(scope="module")
def runner(request, tmp_path_factory):
    r = hostile.Runner(tmp_path_factory.mktemp("hostile"), subprocess_every=500 if LONG else 40)
    yield r
    print_line(request.config, r.summary() + (f"; slowest: {', '.join(sorted(r.slow)[-5:])}" if r.slow else ""))


@pytest.mark.parametrize("lo,hi", CHUNKS, ids=[f"seeds{a}-{b}" for a, b in CHUNKS])
def test_hostile_cases(request, runner, lo, hi):
    before = len(runner.failures)
    for seed in range(lo, hi):
        for case in hostile.cases(seed):
            runner.run(case)
    if LONG:  # progress of the long run, in its log
        print_line(request.config, f"hostile progress after seeds {BASE}-{hi}: {runner.summary()}")
    new = runner.failures[before:]
    assert not new, f"{len(new)} hostile failures; the first:\n" + "\n\n".join(new[:3])


# ----------------------------------------------------------------------------- the runner's own checks


def test_the_oracle_agrees_with_hand_written_masks():
    """The oracle is written from the spec: spot-check it against masks written out by hand."""
    case = hostile.random_program(0)
    for src, want in [
        ("sliding(2)", [[1, 0, 0], [1, 1, 0], [0, 1, 1]]),
        ("band(0, 1) - causal", [[0, 1, 0], [0, 0, 1], [0, 0, 0]]),
        ("blockwise(2, causal)", [[1, 1, 0], [1, 1, 0], [1, 1, 1]]),
        ("dilate(2, causal)", [[1, 0, 0], [0, 1, 0], [1, 0, 1]]),
    ]:
        got = attnc.loads(f"pattern p = {src}").pattern().mask(3)[0].int().tolist()
        assert got == want, (src, got)
    assert case.oracle is not None and case.source.startswith("# random program 0")


def test_a_wrong_mask_is_reported(tmp_path):
    """The runner must notice a mask that differs from the oracle (here: a lying oracle)."""
    r = hostile.Runner(tmp_path)
    lie = hostile.Case(family="random", seed=-1, source="pattern p = causal\n", pattern="p", M=4, N=4,
                       oracle=lambda M, N, H: torch.ones(H, M, N, dtype=torch.bool))
    r.run(lie)
    assert r.counts["wrong_masks"] >= 1 and "wrong mask" in r.failures[0]


def test_an_escaping_exception_is_a_traceback(tmp_path, monkeypatch):
    r = hostile.Runner(tmp_path)
    monkeypatch.setattr(attnc.program.BoundPattern, "_plan", lambda *a, **k: 1 / 0)  # what plan and simulate call
    r.run(hostile.Case(family="random", seed=-2, source="pattern p = causal\n", pattern="p", M=4, N=4,
                       verbs=("simulate",)))
    assert r.counts["tracebacks"] >= 2, r.failures  # in-process and through the CLI
    assert any("ZeroDivisionError" in f for f in r.failures)


def test_an_accepted_invalid_argument_is_reported(tmp_path):
    r = hostile.Runner(tmp_path)

    def oracle(M, N, H):
        raise hostile.Invalid("the oracle says no")
    r.run(hostile.Case(family="random", seed=-3, source="pattern p = causal\n", pattern="p", M=4, N=4, oracle=oracle,
                       verbs=()))
    assert any("accepted it" in f for f in r.failures)


def test_slow_cases_are_counted(tmp_path, monkeypatch):
    r = hostile.Runner(tmp_path)
    monkeypatch.setattr(hostile, "LIMIT_S", 0.0)
    r.run(hostile.Case(family="random", seed=-4, source="pattern p = causal\n", verbs=("check",)))
    assert r.counts["over_limit"] == 1 and r.slow


# ----------------------------------------------------------------------------- odd files through real processes


@pytest.mark.parametrize("kind,verb", [("symlink-loop", ["check"]), ("dir", ["show", "--seq-len", "8"]),
                                       ("nonutf8", ["simulate", "--seq-len", "8"]), ("nul", ["check"]),
                                       ("vanished", ["show", "--seq-len", "8"]), ("fifo", ["check"])])
def test_odd_files_through_a_real_process(tmp_path, kind, verb):
    f = tmp_path / "x.attn"
    if kind == "symlink-loop":
        os.symlink("y.attn", f)
        os.symlink("x.attn", tmp_path / "y.attn")
    elif kind == "dir":
        f.mkdir()
    elif kind == "nonutf8":
        f.write_bytes(b"pattern p = caus\xffal\n")
    elif kind == "nul":
        f.write_bytes(b"pattern p = causal\n\x00")
    elif kind == "vanished":
        f.write_text("pattern p = causal\n")
        f.unlink()
    else:
        os.mkfifo(f)
    res = subprocess.run([sys.executable, "-m", "attnc", verb[0], str(f), *verb[1:]], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL, errors="replace")
    assert res.returncode in (1, 2), (kind, verb, res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.strip(), (kind, verb, res.stderr)


def test_a_file_that_vanishes_while_it_is_read(tmp_path, monkeypatch):
    """The file exists when the CLI looks at it and is gone when it is opened."""
    f = tmp_path / "x.attn"
    f.write_text("pattern p = causal\n")
    real_open = type(f).open

    def vanishing_open(self, *a, **k):
        if self.name == "x.attn" and self.exists():
            self.unlink()
        return real_open(self, *a, **k)
    monkeypatch.setattr(type(f), "open", vanishing_open)
    err = io.StringIO()
    assert main(["check", str(f)], out=io.StringIO(), err=err) == 1
    assert "file not found" in err.getvalue() and "Traceback" not in err.getvalue()


# ----------------------------------------------------------------------------- what the generator found


@pytest.mark.parametrize("src", ["pattern p(w = 3) = sliding(max(1, min(9, N // 2)))",
                                 "pattern p = band(min(4, N), 1) | sink(max(1, N // 3))"])
def test_density_formula_of_min_max_of_n_is_no_formula(src):
    # sympy's PolynomialError escaped from attnc show / simulate as a traceback
    pat = attnc.loads(src).pattern()
    from attnc.piecewise import NoFormula
    with pytest.raises(NoFormula, match="not a polynomial in N"):
        pat.formula()
    rep = pat.simulate(12, tile=(4, 4), head_dim=8)
    assert rep.density_formula is None and rep.density == float(pat.mask(12).sum()) / 144


def test_show_of_min_max_of_n_prints_exact_counts(tmp_path):
    f = tmp_path / "x.attn"
    f.write_text("pattern p = sliding(max(1, min(9, N // 2)))\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["show", str(f), "--seq-len", "12", "--block", "4"], out=out, err=err) == 0, err.getvalue()
    assert "density formula: none" in out.getvalue() and "not a polynomial in N" in out.getvalue()


def test_plan_of_where_k_in_the_empty_set():
    # the tile-box classifier took max() of an empty set: a RuntimeError
    pat = attnc.loads("pattern p = where k in {} | (where q in {} and k < 2)").pattern()
    assert pat.plan(5, block=(4, 4)).allowed == 0 == int(pat.mask(5).sum())


def test_formula_conditions_keep_the_sign_of_upper_bounds():
    # `-w >= -5` was rewritten as `w <= -5`: the formula's conditions were false at the bound
    # values, so show and simulate never used it and `exact when` printed a wrong bound
    pat = attnc.loads("pattern p(w = 3) = sliding(w) | prefix(6 - w)").pattern()
    f = pat.formula()
    assert f.valid_at(100) and f.allowed_at(100) == int(pat.mask(100).sum())
    assert "w <= -" not in f.condition_text() and "w <= 3" in f.condition_text()
    assert pat.simulate(100, tile=(4, 4), head_dim=8).density_formula is not None
    pat = attnc.loads("pattern p(name = 2, self = 2) = (let self = 6 in sliding(self)) | "
                      "prefix(max(0, min(6, self)))").pattern()
    f = pat.formula()  # used to hold `False` conditions: AttributeError in condition_text()
    assert f.valid_at(100) and f.allowed_at(100) == int(pat.mask(100).sum()) and f.condition_text()


def test_a_long_union_refuses_its_formula_without_repeating_sympy_work(monkeypatch):
    # 199 `causal` terms took ~1.3 s per formula attempt (6000 sympy expansions for the same
    # few interval ends) and show / simulate asked twice: cases of 6-8 s in the long run
    from attnc import piecewise
    calls = []
    real = piecewise.Order._key
    monkeypatch.setattr(piecewise.Order, "_key", lambda self, e: calls.append(e) or real(self, e))
    pat = attnc.loads("pattern p = " + " | ".join(["causal"] * 199)).pattern()
    for _ in range(2):
        with pytest.raises(piecewise.NoFormula, match="too many terms"):
            pat.formula()
    assert 0 < len(calls) < 100, len(calls)  # each distinct end once; the refusal is cached
