"""attnc/semantics.py: one definition per primitive ([Note: one definition]).

The primitives' brute-force checks against the spec are in test_primitives.py; here:
the pointwise predicate (with its shorter spellings of cells and residues) is the
same set as the progressions, every primitive is covered, and a primitive added as
one definition works in every consumer: reference, plan, lowering, Triton kernels
(interpreter), loop bounds, formula and KV retention.
"""

import dataclasses

import pytest
import torch

import attnc
from attnc import elab_primitives, ir, semantics
from attnc.codegen.bounds import loop_bounds
from attnc.codegen.monotone import ev
from attnc.codegen.range_derivation import row_ranges
from attnc.codegen.expr import to_text
from attnc.codegen.pointwise import lower
from attnc.reference import Evaluator, View
from attnc.retention import retention
from kernel_check import check


def _progressions_mask(parts, q, k, env) -> torch.Tensor:
    """The keys of each query by enumerating the progressions with Python loops."""
    ev = Evaluator(None)
    out = torch.zeros(len(q), len(k), dtype=torch.bool)
    for i, qa in enumerate(q.tolist()):
        view = View(q=torch.tensor([qa]), k=torch.tensor([0]), env=env)

        def at(e):
            return int(ev.pos(e, view)[0].reshape(-1)[0])
        for p in parts:
            if p.when is not None and not bool(ev.pos(p.when, view)[0].reshape(-1)[0]):
                continue
            lo, hi, step = at(p.lo), at(p.hi), 1 if p.step is None else at(p.step)
            for key in range(lo, hi, step):
                if 0 <= key < len(k):
                    out[i, key] = True
    return out


SOURCES = ["full", "none", "causal", "band(3, 1)", "sliding(4)", "sink(3)", "prefix(5)", "rows({1, 7, 8})",
           "cols(2 .. 11 step 3)", "cols({0, 5})", "global(0 .. 2)", "block(4)", "block(5, shift = 2)",
           "block(4, shift = 1, halo = 2)", "strided(3)", "neighborhood(5)", "neighborhood(4, causal = true)",
           "neighborhood(3, dilation = 2)", "neighborhood(5, stride = 2)", "neighborhood(4, dilation = 3, stride = 2)",
           "neighborhood(3, dilation = 2, stride = 3, causal = true)"]


@pytest.mark.parametrize("src", SOURCES)
def test_predicate_is_the_progressions(src):
    pat = attnc.loads(f"pattern p = {src}").pattern()
    node = pat.ir.body
    parts = semantics.keys_of(node)
    assert parts is not None
    n = 19
    env = {ir.M: n, ir.N: n, ir.H: 1, **dict(pat.ir.bindings)}
    q = k = torch.arange(n)
    want = _progressions_mask(parts, q, k, env)
    assert torch.equal(pat.mask(n)[0], want)  # the reference evaluates `predicate`


def test_every_positional_primitive_has_a_definition():
    positional = {ir.Full, ir.Empty, ir.Causal, ir.Band, ir.Sliding, ir.Sink, ir.Prefix, ir.Rows, ir.Cols, ir.Global,
                  ir.Block, ir.Strided, ir.Neighborhood}
    assert positional <= set(semantics.DEFINITIONS)
    # and nothing else: run-time inputs, random and where are interpreted by each consumer, the boolean
    # combinators are defined over each consumer's algebra, the structural ones change its view
    assert not set(semantics.DEFINITIONS) & {ir.Random, ir.Same, ir.Routed, ir.TopK, ir.Where, ir.Union_, ir.Dilate}
    assert set(semantics.COMBINATORS) == {ir.Union_, ir.Inter, ir.Diff, ir.Not}


def test_spelled_the_way_kernels_compute_best():
    text = lambda src: to_text(lower(attnc.loads(f"pattern p = {src}").pattern().ir, 40).expr)  # noqa: E731
    assert text("block(8)") == "k // 8 == q // 8"  # a cell, not two comparisons
    assert text("sliding(4)") == "k > q - 4 and k <= q"  # as the spec writes it
    assert "%" in text("strided(4)") and ">" not in text("strided(4)")  # a residue, no range test


def test_non_decreasing_is_proved_from_the_form():
    value = lambda e: int(e.value)  # noqa: E731
    Q, c = semantics.Q, semantics.const
    assert semantics.non_decreasing(semantics.maximum(semantics.sub(Q, 3), 0), value)
    assert semantics.non_decreasing(semantics.mul(semantics.floordiv(Q, 4), 4), value)
    assert not semantics.non_decreasing(semantics.mod(Q, 4), value)
    assert not semantics.non_decreasing(semantics.sub(c(3), Q), value)
    assert not semantics.non_decreasing(semantics.mul(Q, -1), value)


# ----------------------------------------------------------------------------- a new primitive: one definition


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Ring(ir.Mask):
    """ring(w): keys within distance w of q modulo N (a periodic window)."""

    w: ir.Int


def _ring(node: Ring):  # registered by the fixture with @semantics.defines(Ring, "ring(w)", ("w", INT), rules=...)
    Q, N, w = semantics.Q, semantics.LENGTH, node.w
    lo, hi = semantics.sub(Q, w), semantics.add(semantics.add(Q, w), 1)
    return (semantics.Keys(lo, hi),  # the window itself, and the parts that wrap around either end
            semantics.Keys(semantics.add(lo, N), N),
            semantics.Keys(semantics.const(0), semantics.sub(hi, N)))


@pytest.fixture
def ring():
    semantics.defines(Ring, "ring(w)", ("w", semantics.INT), rules=[("w", lambda v: v >= 0, "ring width w must be >= 0")])(_ring)
    yield
    semantics.undefine("ring")


def _ring_mask(n: int, w: int) -> torch.Tensor:
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    d = (q - k).abs()
    return torch.minimum(d, n - d) <= w


def _ranges_mask(rs, n: int) -> torch.Tensor:
    out = torch.zeros(n, n, dtype=torch.bool)
    keys = torch.arange(n)
    for _, ranges in rs.groups:
        for r in ranges:
            for x in range(r.g0, r.g1):
                lo, hi = (int(ev(e, torch.tensor([x]))[0]) for e in (r.lo, r.hi))
                out[x] |= (keys >= lo) & (keys < hi)
    return out


def test_a_new_primitive_is_one_definition(ring):
    pat = attnc.loads("pattern p(w = 5) = ring(w) & ~sink(2)").pattern()
    for n in (32, 45):
        want = _ring_mask(n, 5) & (torch.arange(n) >= 2)[None, :]
        assert torch.equal(pat.mask(n)[0], want)  # reference
        plan = pat.plan(n, block=(16, 16))  # closed-form plan
        assert plan.allowed == int(want.sum()) and plan.method != "scan"
        got = lower(pat.ir, n).evaluator()(torch.arange(n)[:, None], torch.arange(n)[None, :], 0)
        assert torch.equal(got, want)  # the pointwise lowering (what the kernels print)
        assert torch.equal(_ranges_mask(row_ranges(pat.ir, n, n, 1), n), want)  # the loop bounds' key ranges
        # (the kernels visit ranges in one order for every query tile, and the wrapped parts come before the
        # window for some queries and after it for others: the check against the plan refuses that order)
        lb = loop_bounds(pat.ir, n, n, 1, (16, 16), plan)
        assert lb.closed == (False, False) and "differs from the plan" in lb.summary()
    f = attnc.loads("pattern p(w = 5) = ring(w)").pattern().formula()  # the density formula
    for n in (40, 64, 1000):
        assert f.allowed_at(n) == int(_ring_mask(n, 5).sum())
    check(pat, M=45, N=45, tiles=(16, 16))  # Triton kernels in the interpreter, forward and backward
    keep = retention(pat.ir, 30)  # KV retention stays conservative: nothing a later query reads is dropped
    assert keep.all()


def test_a_new_primitive_gets_located_errors(ring):
    with pytest.raises(attnc.AttnError, match=r"1:13: error: ring is missing its argument 'w'"):
        attnc.loads("pattern p = ring()").pattern()
    with pytest.raises(attnc.AttnError, match="ring width w must be >= 0, got -1"):
        attnc.loads("pattern p = ring(-1)").pattern()


def test_the_language_reads_its_primitives_from_the_definitions():
    assert set(semantics.PRIMITIVES) <= set(elab_primitives.PRIMITIVES)
    for name, prim in semantics.PRIMITIVES.items():
        assert elab_primitives.PRIMITIVES[name] == (list(prim.params), prim.usage)
        assert [f.name for f in dataclasses.fields(prim.node) if f.name != "span"] == [p[0] for p in prim.params]


# ----------------------------------------------------------------------------- a new combinator: one definition


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Xor(ir.Mask):
    """a ^ b: the keys allowed by exactly one of the operands."""

    left: ir.Mask
    right: ir.Mask

    def children(self):
        return (self.left, self.right)


def _xor(node, sets, a):  # what the fixture adds to semantics.COMBINATORS, and all it adds
    x, y = sets(node.left), sets(node.right)
    return a.union(iter((a.intersect(iter((x, a.complement_of(y)))), a.intersect(iter((a.complement_of(x), y))))))


@pytest.fixture
def xor(monkeypatch):
    monkeypatch.setitem(semantics.COMBINATORS, Xor, _xor)


def test_a_new_combinator_is_one_definition(xor):
    from attnc.analysis import plan_blocks
    from attnc.program import BoundPattern
    from attnc.symbolic import formula

    base = attnc.loads("pattern p = sliding(6) | sink(3)").pattern()
    a, b = base.ir.body.parts
    pat = BoundPattern(base.program, dataclasses.replace(base.ir, body=Xor(left=a, right=b)), {})
    for n in (32, 45):
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        want = ((k <= q) & (k > q - 6)) ^ (k < 3)
        assert torch.equal(pat.mask(n)[0], want)  # reference
        plan = plan_blocks(pat.ir, n, n, 1, None, block=(16, 16))  # closed-form plan (interval sets)
        assert plan.allowed == int(want.sum()) and plan.method == "closed-form"
        assert torch.equal(lower(pat.ir, n).evaluator()(q, k, 0), want)  # the kernels' predicate
        assert torch.equal(_ranges_mask(row_ranges(pat.ir, n, n, 1), n), want)  # the loop bounds' key ranges
    f = formula(pat.ir)  # the density formula
    for n in (40, 64, 1000):
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        assert f.allowed_at(n) == int((((k <= q) & (k > q - 6)) ^ (k < 3)).sum())
    check(pat, M=45, N=45, tiles=(16, 16))  # Triton kernels in the interpreter, forward and backward
    kept = retention(pat.ir, 30)  # KV retention: no key a later query reads is dropped
    read = pat.mask(90)[0, 30:, :30].any(dim=0)
    assert bool(kept[0][read].all()) and not bool(kept.all())  # and it still evicts (the window's old keys)


def test_retention_never_evaluates_what_a_complement_removes():
    """KV retention keeps every key under `~P` and `a - b` (its complement is everything), so it
    does not evaluate P or b: a right side that cannot be evaluated at this length is no error."""
    for src in ("sliding(8) - sliding(1152921504606846975)", "sliding(8) | ~sliding(1152921504606846975)"):
        keep = attnc.loads(f"pattern p = {src}").pattern().kv_retention(20, heads=2)
        want = torch.zeros(20, dtype=torch.bool)
        if "~" in src:
            want[:] = True
        else:
            want[13:] = True  # sliding(8): a query at 20 or later reads keys from 13 on
        assert torch.equal(keep, want.expand(2, -1))
