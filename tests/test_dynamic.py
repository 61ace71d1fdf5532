"""topk routing inside the op (attnc/dynamic.py), against a selection written
here from the documented rule with plain loops and hand-written static masks."""

import pytest
import torch

import attnc
from conftest import EXAMPLES, tiles_from_mask


def hand_static(M, N, window, sinks):
    """causal, and the static alternatives sliding(window) | sink(sinks), as dense bool [M, N]."""
    q = torch.arange(M)[:, None] + (N - M)
    k = torch.arange(N)[None, :]
    causal = k <= q
    alt = ((q - k >= 0) & (q - k < window)) | (k < sinks)
    return causal, alt


def brute_selection(q, k, b, kk, causal, alt):
    """Per (batch, query head, query block): the chosen key blocks, by the documented rule."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g = Hq // Hkv
    nq, nk = -(-M // b), -(-N // b)
    out = {}
    for bi in range(B):
        for h in range(Hq):
            grp = h // g
            for I in range(nq):
                rows = slice(I * b, min(M, (I + 1) * b))
                scores = []
                for J in range(nk):
                    cols = slice(J * b, min(N, (J + 1) * b))
                    gain = causal[rows, cols] & ~alt[rows, cols]  # allowed with topk -> full, not with topk -> none
                    if not gain.any():
                        continue
                    kp = k[bi, grp, cols].double().mean(0)
                    s = sum(float(q[bi, hh, rows].double().mean(0) @ kp) for hh in range(grp * g, (grp + 1) * g))
                    scores.append((-s, J))
                out[bi, h, I] = sorted(j for _, j in sorted(scores)[:kk])
    return out


def table_to_sets(table):
    B, H, nq, _ = table.shape
    return {(b, h, i): sorted(int(x) for x in table[b, h, i] if x >= 0) for b in range(B) for h in range(H) for i in range(nq)}


@pytest.mark.parametrize("M,N,Hq,Hkv,b,kk,seed", [
    (50, 50, 2, 2, 8, 2, 0),
    (61, 77, 4, 2, 8, 3, 1),  # GQA, M != N, short last blocks
    (40, 40, 3, 1, 16, 1, 2),
])
def test_topk_selection_matches_the_documented_rule(M, N, Hq, Hkv, b, kk, seed):
    pat = attnc.loads(f"pattern p(k = {kk}) = causal & (topk(k, block = {b}) | sliding(8) | sink(4))").pattern()
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, Hq, M, 16, generator=g), torch.randn(2, Hkv, N, 16, generator=g)
    low, inputs = pat.route(q, k)
    table = inputs["topk_sel0"]
    assert table.shape == (2, Hq, -(-M // b), kk) and table.dtype == torch.int32
    causal, alt = hand_static(M, N, 8, 4)
    assert table_to_sets(table) == brute_selection(q, k, b, kk, causal, alt)
    # the lowered pattern's mask is the op's reference: static part | chosen blocks, under causal
    mask = low.mask(M, N, heads=Hq, **inputs)
    for (bi, h, I), blocks in brute_selection(q, k, b, kk, causal, alt).items():
        rows = slice(I * b, min(M, (I + 1) * b))
        want = alt[rows].clone()
        for J in blocks:
            want[:, J * b:(J + 1) * b] = True
        assert torch.equal(mask[bi, h, rows], want & causal[rows])


def test_ties_go_to_the_lower_block_index_and_gqa_groups_share_a_selection():
    pat = attnc.loads("pattern p = topk(2, block = 4)").pattern()
    q, k = torch.zeros(1, 4, 16, 8), torch.zeros(1, 2, 16, 8)  # every score 0: all ties
    _, inputs = pat.route(q, k)
    assert inputs["topk_sel0"][0, :, :, :].tolist() == [[[0, 1]] * 4] * 4
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    t = pat.route(q, k)[1]["topk_sel0"][0]
    assert torch.equal(t[0], t[1]) and torch.equal(t[2], t[3])  # heads 0,1 share kv head 0; 2,3 share kv head 1


def test_fewer_eligible_blocks_than_k():
    pat = attnc.loads("pattern p = causal & topk(5, block = 4)").pattern()
    q, k = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    t = pat.route(q, k)[1]["topk_sel0"][0, 0]
    assert [sorted(x for x in row.tolist() if x >= 0) for row in t] == [[0], [0, 1], [0, 1, 2]]
    assert t.shape[-1] == 3 and (t[0] == -1).sum() == 2  # k is capped at the number of key blocks


def test_topk_with_segments_never_selects_blocks_of_other_documents():
    pat = attnc.loads("pattern p(doc: segments) = same(doc) & topk(1, block = 4)").pattern()
    doc = torch.tensor([[0] * 8 + [1] * 8])
    q, k = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    t = pat.route(q, k, doc=doc)[1]["topk_sel0"][0, 0, :, 0].tolist()
    assert t[0] in (0, 1) and t[1] in (0, 1) and t[2] in (2, 3) and t[3] in (2, 3)


def test_patterns_without_topk_route_to_themselves():
    pat = attnc.loads("pattern p = sliding(4)").pattern()
    q = torch.randn(1, 1, 8, 4)
    assert pat.route(q, q) == (pat, {})


def test_cu_seqlens_is_an_alternative_form_of_segment_ids():
    pat = attnc.load(EXAMPLES / "packed.attn").pattern()
    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    assert torch.equal(pat.mask(10, doc=attnc.cu_seqlens(cu)), pat.mask(10, doc=ids))
    q = torch.randn(2, 1, 10, 4)
    assert torch.allclose(pat(q, q, q, doc=attnc.cu_seqlens(cu)), pat(q, q, q, doc=ids.expand(2, -1)))


@pytest.mark.parametrize("offsets,msg", [
    ([0, 3, 9], "from 0 to N = 10"),
    ([1, 3, 10], "from 0 to N = 10"),
    ([0, 5, 3, 10], "non-decreasing"),
    ([0.0, 10.0], "1-D integer tensor"),
])
def test_bad_cu_seqlens_say_what_was_expected(offsets, msg):
    pat = attnc.load(EXAMPLES / "packed.attn").pattern()
    with pytest.raises(ValueError, match=msg):
        pat.mask(10, doc=attnc.cu_seqlens(torch.tensor(offsets)))


@pytest.mark.parametrize("seed", range(6))
def test_plans_from_run_time_inputs_match_the_mask(seed):
    g = torch.Generator().manual_seed(seed)
    M, N, H = 37 + seed * 7, 61 + seed * 5, 2
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[:3] + 1).values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([N])]))
    doc = torch.repeat_interleave(torch.arange(4), lengths)
    packed = attnc.loads("pattern p(doc: segments) = causal & same(doc) | sink(2)").pattern()
    plan = packed.plan(M, N, heads=H, block=(8, 16), doc=doc)
    mask = packed.mask(M, N, heads=H, doc=doc)
    assert torch.equal(plan.to_dense().expand(H, -1, -1), tiles_from_mask(mask, 8, 16))
    assert plan.allowed == int(mask.sum()) and plan.method == "closed-form"
    b = 8
    sel = torch.randint(-1, -(-N // b), (H, -(-M // b), 3), generator=g)
    routed = attnc.loads(f"pattern r(sel: blocks({b})) = routed(sel) & ~causal | sliding(3)").pattern()
    plan = routed.plan(M, N, heads=H, block=(16, 8), sel=sel)
    mask = routed.mask(M, N, heads=H, sel=sel)
    assert torch.equal(plan.to_dense().expand(H, -1, -1), tiles_from_mask(mask, 16, 8))
    assert plan.allowed == int(mask.sum())


def test_plan_with_inputs_says_what_it_cannot_do():
    packed = attnc.load(EXAMPLES / "packed.attn").pattern()
    with pytest.raises(ValueError, match="one batch element"):
        packed.plan(8, doc=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="several runs"):
        packed.plan(8, doc=torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]))


def test_simulate_dynamic_patterns_with_a_routed_density():
    import io

    from attnc.cli import main

    # the diagonal block is static, so never eligible: topk adds exactly 4 other blocks per query block
    rep = attnc.loads("pattern p = topk(4, block = 64) | block(64)").pattern().simulate(4096, tile=(64, 64))
    assert (rep.tiles_full, rep.tiles_partial, rep.density) == (64 * 5, 0, 5 / 64)
    rep = attnc.loads("pattern p = topk(4, block = 64) | block(64)").pattern().simulate(
        4096, tile=(64, 64), routed_density=0.5)  # a density overrides k: 32 eligible blocks + the diagonal
    assert rep.tiles_full == 64 * 33
    routed = attnc.loads("pattern r(sel: blocks(64)) = routed(sel)").pattern()
    rep = routed.simulate(4096, tile=(64, 64), routed_density=0.25)
    assert rep.tiles_full == 64 * 16 and rep.tiles_partial == 0 and rep.density == 0.25
    with pytest.raises(ValueError, match="try routed_density=0.1"):
        routed.simulate(4096)
    with pytest.raises(ValueError, match="expected a fraction"):
        routed.simulate(4096, routed_density=2.0)
    out, err = io.StringIO(), io.StringIO()
    path = EXAMPLES / "biformer.attn"
    assert main(["simulate", str(path), "--seq-len", "4096", "--tile", "64x64", "--routed-density", "0.25"], out, err) == 0
    assert "0.25" in out.getvalue() and "tile_bound         4.00x" in out.getvalue()
    assert main(["simulate", str(path), "--seq-len", "4096"], out, err) == 2
    assert "--routed-density 0.1" in err.getvalue()


@pytest.mark.parametrize("k", [0, 1, 5, 40, 60])
def test_an_unordered_selection_is_the_same_set(k):
    """`select(..., ordered=False)` (the simulator's draws): the set of the stable sort's choice for
    scores without ties, -1 where fewer blocks are eligible, from a partial selection."""
    from attnc.dynamic import select
    g = torch.Generator().manual_seed(k)
    for _ in range(10):
        s, e = torch.rand(3, 17, 40, generator=g), torch.rand(3, 17, 40, generator=g) < 0.5
        got, want = select(s, e, k, ordered=False).long(), select(s[None], e[None], k)[0].long()
        assert got.shape == want.shape and torch.equal(got.sort(-1).values, want.sort(-1).values)
