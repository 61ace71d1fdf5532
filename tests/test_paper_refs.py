"""Self-checks for tests/paper_refs.py: tiny hand-computed cases, so the oracle itself is trusted."""

import itertools
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_refs as R  # noqa: E402


def mat(rows, N=None):
    """Build a bool matrix from a list of allowed-key lists (one per query row)."""
    N = N if N is not None else len(rows)
    m = np.zeros((len(rows), N), dtype=bool)
    for q, ks in enumerate(rows):
        for k in ks:
            m[q, k] = True
    return m


def lit(text):
    """Bool matrix from a literal picture: '1'/'x' allowed, '.'/'0' not."""
    rows = [r.strip() for r in text.strip().splitlines()]
    return np.array([[c in "1x" for c in r] for r in rows], dtype=bool)


# ----------------------------------------------------------------------------- 1-D patterns


def test_sliding_window():
    m = R.sliding_window(4, 6, 3)  # qa = q + 2
    assert m.dtype == bool and m.shape == (4, 6)
    assert (m == lit("""
        111...
        .111..
        ..111.
        ...111
    """)).all()
    assert (R.sliding_window(5, 5, 1) == np.eye(5, dtype=bool)).all()


def test_streaming_llm():
    m = R.streaming_llm(6, 6, sinks=1, recent=2)
    assert (m == lit("""
        1.....
        11....
        111...
        1.11..
        1..11.
        1...11
    """)).all()
    # sinks never look ahead: bottom-right aligned with M < N
    m = R.streaming_llm(2, 6, sinks=3, recent=1)  # qa = 4, 5
    assert (m == lit("""
        111.1.
        111..1
    """)).all()
    m = R.streaming_llm(3, 3, sinks=3, recent=1)
    assert (m == np.tril(np.ones((3, 3), dtype=bool))).all()


def test_duo():
    m = R.duo(2, 5, 5, retrieval={1}, recent=2, sinks=1)
    assert m.shape == (2, 5, 5)
    assert (m[1] == np.tril(np.ones((5, 5), dtype=bool))).all()
    assert (m[0] == lit("""
        1....
        11...
        111..
        1.11.
        1..11
    """)).all()


def test_longformer():
    m = R.longformer(5, 5, window=1, globals_=1)
    assert (m == lit("""
        11111
        111..
        1111.
        1.111
        1..11
    """)).all()
    m = R.longformer(2, 5, window=1, globals_=2)  # qa = 3, 4
    assert (m == lit("""
        11111
        11.11
    """)).all()


def test_prefix_lm():
    assert (R.prefix_lm(4, 4, 2) == lit("""
        11..
        11..
        111.
        1111
    """)).all()
    assert (R.prefix_lm(3, 3, 0) == np.tril(np.ones((3, 3), dtype=bool))).all()


def test_packed():
    assert (R.packed([0, 0, 1, 1, 1]) == lit("""
        1....
        11...
        ..1..
        ..11.
        ..111
    """)).all()
    # ids need not be sorted; equal ids far apart still attend
    assert (R.packed([7, 3, 7]) == lit("""
        1..
        .1.
        1.1
    """)).all()


# ----------------------------------------------------------------------------- BigBird


def test_mix32_known_values():
    assert R.mix32(0) == 0
    # lowbias32, step by step for x = 1
    x = 1
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    x ^= x >> 16
    assert R.mix32(1) == x
    assert R.mix32(1 + 2**32) == R.mix32(1)  # input is taken mod 2**32
    assert all(0 <= R.mix32(v) < 2**32 for v in range(100))


def test_random_keys_properties():
    for seed in (0, 1, 12345):
        for row in range(20):
            for n in (1, 2, 5, 17):
                for r in (0, 1, 3, 5, 20):
                    s = R.random_keys(seed, row, n, r)
                    assert s == R.random_keys(seed, row, n, r)  # deterministic
                    assert all(0 <= v < n for v in s)
                    assert len(s) == min(r, n)
    # different rows usually differ
    rows = {frozenset(R.random_keys(0, row, 50, 3)) for row in range(30)}
    assert len(rows) > 20


def test_random_keys_floyd_hand_trace():
    # Floyd with n=4, r=2: j runs over 2, 3; t = rand % (j+1)
    seed, row, n, r = 3, 5, 4, 2
    chosen = set()
    t = R.rand_u32(seed, row, 2) % 3
    chosen.add(2 if t in chosen else t)
    t = R.rand_u32(seed, row, 3) % 4
    chosen.add(3 if t in chosen else t)
    assert R.random_keys(seed, row, n, r) == chosen


def test_bigbird_no_random():
    b = 4
    m = R.bigbird(20, 20, b, r=0)  # nb = 5 key blocks, globals {0, 4}
    block = lit("""
        11111
        111.1
        11111
        1.111
        11111
    """)
    expected = np.kron(block, np.ones((b, b), dtype=bool)).astype(bool)
    assert (m == expected).all()
    # bottom-right aligned queries: qa = q + 12 -> query blocks 3,3,3,3,4,4,4,4
    m2 = R.bigbird(8, 20, b, r=0)
    assert (m2 == expected[12:]).all()
    # partial last block: N = 18 -> nb = 5, last block has 2 tokens
    m3 = R.bigbird(18, 18, b, r=0)
    assert (m3 == expected[:18, :18]).all()


def test_bigbird_random_blocks():
    b, N, r, seed = 2, 24, 2, 7
    nb = 12
    m = R.bigbird(N, N, b, r=r, seed=seed)
    for qb in range(nb):
        q = qb * b
        allowed_blocks = {kb for kb in range(nb) if m[q, kb * b]}
        # tokens inside a block pair agree (block granularity)
        for kb in range(nb):
            assert (m[qb * b:(qb + 1) * b, kb * b:(kb + 1) * b] == m[q, kb * b]).all()
        if qb in (0, nb - 1):
            assert allowed_blocks == set(range(nb))
            continue
        base = {0, nb - 1} | {kb for kb in (qb - 1, qb, qb + 1) if 0 <= kb < nb}
        assert allowed_blocks == base | R.random_keys(seed, qb, nb, r)
    # r >= nb: everything
    assert R.bigbird(8, 8, 2, r=10).all()


# ----------------------------------------------------------------------------- NATTEN


def test_natten_1d_size3():
    m = R.natten((5,), 3)
    assert (m == lit("""
        111..
        111..
        .111.
        ..111
        ..111
    """)).all()


def test_natten_1d_even_size_leans_left():
    m = R.natten((6,), 4)  # wl = 2, wr = 1
    assert (m == lit("""
        1111..
        1111..
        1111..
        .1111.
        ..1111
        ..1111
    """)).all()


def test_natten_1d_dilation():
    m = R.natten((7,), 3, dilation=2)
    # group 0 = {0,2,4,6} (Lg 4), group 1 = {1,3,5} (Lg 3)
    assert (m == mat([[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]])).all()
    # dilation with L % d != 0 and a window reaching the end: L=10, d=3, size 3
    assert R.natten_axis(10, 7, 3, dilation=3) == [1, 4, 7]
    assert R.natten_axis(10, 9, 3, dilation=3) == [3, 6, 9]
    assert R.natten_axis(10, 0, 3, dilation=3) == [0, 3, 6]


def test_natten_1d_stride():
    # size 4, stride 2 on 8: stride groups {0,1} {2,3} {4,5} {6,7}; leaders 1, 3, 5, 7
    m = R.natten((8,), 4, stride=2)
    assert (m == mat([range(0, 4)] * 2 + [range(1, 5)] * 2 + [range(3, 7)] * 2 + [range(4, 8)] * 2)).all()
    # stride == size is blocked attention
    m = R.natten((8,), 4, stride=4)
    assert (m == np.kron(np.eye(2, dtype=bool), np.ones((4, 4), dtype=bool))).all()
    # odd stride 3, size 3, L 7: groups {0,1,2} {3,4,5} {6}; leaders 1, 4, 6(clipped: min(7,6))
    m = R.natten((7,), 3, stride=3)
    assert (m == mat([[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[4, 5, 6]])).all()


def test_natten_1d_causal():
    m = R.natten((5,), 3, causal=True)
    assert (m == lit("""
        1....
        11...
        111..
        .111.
        ..111
    """)).all()
    # causal + stride 2: leaders 1, 3, 4(clipped); window ends at the query itself
    m = R.natten((5,), 3, stride=2, causal=True)
    assert (m == lit("""
        1....
        11...
        .11..
        .111.
        ..111
    """)).all()
    # causal + dilation 2 on 6: groups {0,2,4} {1,3,5}
    m = R.natten((6,), 2, dilation=2, causal=True)
    assert (m == mat([[0], [1], [0, 2], [1, 3], [2, 4], [3, 5]])).all()


def test_natten_2d_3d_is_and_of_axes():
    shape = (5, 4)
    m = R.natten(shape, (3, 2), dilation=(1, 2), stride=(2, 1), causal=(False, True))
    ax0 = R.natten((5,), 3, stride=2)
    ax1 = R.natten((4,), 2, dilation=2, causal=True)
    assert (m == np.kron(ax0, ax1)).all()  # row-major flattening -> Kronecker product
    # query (0, 0) with size 3 on 5x5 sees the top-left 3x3 block
    m = R.natten((5, 5), 3)
    assert sorted(np.flatnonzero(m[0])) == [0, 1, 2, 5, 6, 7, 10, 11, 12]
    shape3 = (3, 4, 5)
    m3 = R.natten(shape3, (2, 3, 4), stride=(1, 3, 2), causal=(True, False, False))
    k = np.kron(np.kron(R.natten((3,), 2, causal=True), R.natten((4,), 3, stride=3)), R.natten((5,), 4, stride=2))
    assert (m3 == k).all()


def test_natten_noncausal_sees_exactly_size_keys():
    for L in range(2, 13):
        for size in range(2, L + 1):
            for d in range(1, L // size + 1):
                for s in range(1, size + 1):
                    for x in range(L):
                        keys = R.natten_axis(L, x, size, d, s, False)
                        assert len(keys) == size and len(set(keys)) == size
                        assert all(k % d == x % d and 0 <= k < L for k in keys)
                        if s == 1:
                            assert x in keys  # a query always sees itself without stride


def test_natten_validation():
    with pytest.raises(ValueError):
        R.natten((5,), 1)  # size >= 2
    with pytest.raises(ValueError):
        R.natten((5,), 6)  # size * dilation <= L
    with pytest.raises(ValueError):
        R.natten((8,), 3, dilation=3)  # 9 > 8
    with pytest.raises(ValueError):
        R.natten((8,), 3, stride=4)  # stride <= size
    with pytest.raises(ValueError):
        R.natten((8,), 3, stride=0)
    with pytest.raises(ValueError):
        R.natten((8,), 3, dilation=0)
    with pytest.raises(ValueError):
        R.natten((8, 8), (3, 3, 3))  # per-axis tuple of wrong length
    with pytest.raises(ValueError):
        R.natten((2, 2, 2, 2), 2)  # at most 3-D


# Two independent formulations of the per-axis window, used to cross-check natten_axis.

def spec_neighborhood_axis(L, qa, size, d, s, causal):
    """attn-language.md section 3.1, transcribed literally."""
    wl = size // 2
    g = qa % d
    i = qa // d
    Lg = math.ceil((L - g) / d)
    if not causal:
        leader = min((i // s) * s + s // 2, Lg - 1)
        start = min(max(leader - wl, 0), Lg - size)
        keys = range(start, start + size)
    else:
        leader = min((i // s) * s + s - 1, Lg - 1)
        start = max(leader - (size - 1), 0)
        keys = range(start, i + 1)
    return [k for k in range(L) if k % d == g and k // d in keys]


def old_natten_window(L, index, kernel, dilation):
    """NATTEN <= 0.17 get_window_start (global coordinates, odd kernel, stride 1, non-causal)."""
    ns = kernel // 2
    if dilation <= 1:
        start = max(index - ns, 0) + (index + ns >= L) * (L - index - ns - 1)
    elif index - ns * dilation < 0:
        start = index % dilation
    elif index + ns * dilation >= L:
        imodd = index % dilation
        a = (L // dilation) * dilation
        b = L - a
        start = (L - b + imodd - 2 * ns * dilation) if imodd < b else (a + imodd - kernel * dilation)
    else:
        start = index - ns * dilation
    return [start + t * dilation for t in range(kernel)]


def test_natten_agrees_with_spec_3_1_and_old_natten():
    n = 0
    for L in range(2, 19):
        for size in range(2, L + 1):
            for d in range(1, L // size + 1):
                for s in range(1, size + 1):
                    for causal in (False, True):
                        for x in range(L):
                            mine = R.natten_axis(L, x, size, d, s, causal)
                            assert mine == spec_neighborhood_axis(L, x, size, d, s, causal), (L, x, size, d, s, causal)
                            if size % 2 == 1 and s == 1 and not causal:
                                assert mine == old_natten_window(L, x, size, d), (L, x, size, d)
                            n += 1
    assert n > 10000


# ----------------------------------------------------------------------------- Swin


def test_swin_plain_windows():
    m = R.swin((4, 4), 2, 0)
    # token (0,0)=0 sees its 2x2 window {0,1,4,5}; (3,3)=15 sees {10,11,14,15}
    assert sorted(np.flatnonzero(m[0])) == [0, 1, 4, 5]
    assert sorted(np.flatnonzero(m[15])) == [10, 11, 14, 15]
    assert (m == m.T).all() and m.sum() == 16 * 4


def test_swin_shifted_4x4():
    m = R.swin((4, 4), 2, 1)
    # per axis (shift 1, win 2): groups {1,2}, {3}, {0}
    assert sorted(np.flatnonzero(m[5])) == [5, 6, 9, 10]  # (1,1): the centre window
    assert sorted(np.flatnonzero(m[0])) == [0]  # (0,0) alone
    assert sorted(np.flatnonzero(m[3])) == [3]  # (0,3) alone
    assert sorted(np.flatnonzero(m[13])) == [13, 14]  # (3,1) with (3,2)
    assert sorted(np.flatnonzero(m[4])) == [4, 8]  # (1,0) with (2,0)
    # (0,0) and (3,3) share a rolled window but come from different regions -> masked
    assert not m[0, 15] and not m[15, 0]
    # 1-D check of the same thing
    assert (R.swin((4,), 2, 1) == mat([[0], [1, 2], [1, 2], [3]])).all()


def test_swin_matches_shifted_block_formula():
    # Independent characterisation: same window iff (x - shift) // win agrees on every axis.
    for shape, win, shift in [((6, 9), 3, 1), ((8, 4), 4, 2), ((6,), 3, 2), ((4, 6, 2), 2, 1), ((6, 8), (3, 4), (1, 2))]:
        m = R.swin(shape, win, shift)
        nd = len(shape)
        wins = win if isinstance(win, tuple) else (win,) * nd
        shs = shift if isinstance(shift, tuple) else (shift,) * nd
        coords = list(itertools.product(*[range(s) for s in shape]))
        for p, qc in enumerate(coords):
            for k, kc in enumerate(coords):
                same = all((a - s) // w == (c - s) // w for a, c, w, s in zip(qc, kc, wins, shs))
                assert m[p, k] == same


def test_swin_validation():
    with pytest.raises(ValueError):
        R.swin((5, 4), 2, 1)
    with pytest.raises(ValueError):
        R.swin((4, 4), 2, 2)


# ----------------------------------------------------------------------------- HaloNet


def test_halo_1d():
    m = R.halo((8,), 2, 1)
    assert (m == mat([range(0, 3)] * 2 + [range(1, 5)] * 2 + [range(3, 7)] * 2 + [range(5, 8)] * 2)).all()
    assert (R.halo((6,), 3, 0) == np.kron(np.eye(2, dtype=bool), np.ones((3, 3), dtype=bool))).all()


def test_halo_2d():
    m = R.halo((4, 4), 2, 1)
    # (0,0) block rows/cols 0..1 extended by 1 -> rows 0..2, cols 0..2
    assert sorted(np.flatnonzero(m[0])) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    # (2,3) block rows 2..3, cols 2..3 -> rows 1..3, cols 1..3
    assert sorted(np.flatnonzero(m[11])) == [5, 6, 7, 9, 10, 11, 13, 14, 15]
    assert (m == np.kron(R.halo((4,), 2, 1), R.halo((4,), 2, 1))).all()


# ----------------------------------------------------------------------------- MaxViT, CSWin, MM-DiT


def test_maxvit_grid():
    m = R.maxvit_grid((4, 4), 2)  # stride (2, 2)
    assert sorted(np.flatnonzero(m[0])) == [0, 2, 8, 10]
    assert sorted(np.flatnonzero(m[5])) == [5, 7, 13, 15]
    m = R.maxvit_grid((6, 4), 2)  # stride (3, 2): groups of 2x2 tokens
    assert sorted(np.flatnonzero(m[0])) == [0, 2, 12, 14]
    assert m.sum(axis=1).tolist() == [4] * 24
    with pytest.raises(ValueError):
        R.maxvit_grid((6, 5), 2)


def test_cswin():
    m = R.cswin(2, (4, 4), 2)
    assert m.shape == (2, 16, 16)
    assert sorted(np.flatnonzero(m[0, 0])) == list(range(8))  # rows 0..1
    assert sorted(np.flatnonzero(m[1, 0])) == [0, 1, 4, 5, 8, 9, 12, 13]  # cols 0..1
    m3 = R.cswin(3, (4, 6), 2)  # heads 0 rows, heads 1, 2 cols
    assert (m3[1] == m3[2]).all()
    for p in range(24):
        for k in range(24):
            assert m3[0, p, k] == (p // 6 // 2 == k // 6 // 2)
            assert m3[1, p, k] == (p % 6 // 2 == k % 6 // 2)
    official = R.cswin(2, (4, 4), 2, first_half="cols")
    assert (official[0] == m[1]).all() and (official[1] == m[0]).all()
    with pytest.raises(ValueError):
        R.cswin(2, (4, 5), 2)


def test_mmdit_local():
    m = R.mmdit_local(2, (3, 3), 2)
    assert m.shape == (11, 11)
    assert m[:2].all() and m[:, :2].all()
    centre = 2 + 4
    assert m[centre].all()  # every offset has d^2 <= 2 < 4
    corner = 2 + 0
    assert sorted(np.flatnonzero(m[corner])) == [0, 1, 2, 3, 5, 6]  # (0,0),(0,1),(1,0),(1,1)
    assert not m[corner, 2 + 2]  # (0,2): d^2 = 4, not < 4
    m1 = R.mmdit_local(1, (4,), 1)
    assert (m1 == lit("""
        11111
        11...
        1.1..
        1..1.
        1...1
    """)).all()


# ----------------------------------------------------------------------------- Sparse Transformer, MoA


def test_sparse_strided():
    m = R.sparse_strided(6, 6, 2)  # A1: i-2..i ; A2: (i - j) even
    assert (m == lit("""
        1.....
        11....
        111...
        .111..
        1.111.
        .1.111
    """)).all()
    m = R.sparse_strided(2, 6, 3)  # qa = 4, 5
    assert (m == lit("""
        .1111.
        ..1111
    """)).all()
    m = R.sparse_strided(8, 8, 2)
    assert m[7, 1] and not m[7, 0] and not m[7, 4]


def test_sparse_fixed():
    m = R.sparse_fixed(6, 6, 3, 1)  # blocks {0,1,2}, {3,4,5}; summary cells j % 3 == 2
    assert (m == lit("""
        1.....
        11....
        111...
        ..11..
        ..111.
        ..1111
    """)).all()


def test_moa():
    m = R.moa(6, 6, spans=[2, 6], sinks=1)
    assert m.shape == (2, 6, 6)
    assert (m[0] == R.streaming_llm(6, 6, sinks=1, recent=2)).all()
    assert (m[1] == np.tril(np.ones((6, 6), dtype=bool))).all()
    assert (R.moa(2, 5, spans=[1], sinks=0)[0] == lit("""
        ...1.
        ....1
    """)).all()


# ----------------------------------------------------------------------------- vision


def test_maxvit_block_and_crossformer_groups():
    m = R.maxvit_block((4, 4), 2)
    assert sorted(np.flatnonzero(m[0])) == [0, 1, 4, 5]
    assert sorted(np.flatnonzero(m[15])) == [10, 11, 14, 15]
    assert (R.crossformer_sda((4, 6), 2) == R.swin((4, 6), 2, 0)).all()
    lda = R.crossformer_lda((4, 6), 2)  # same (i % 2, j % 2)
    assert sorted(np.flatnonzero(lda[0])) == [0, 2, 4, 12, 14, 16]
    assert sorted(np.flatnonzero(lda[7])) == [7, 9, 11, 19, 21, 23]
    with pytest.raises(ValueError):
        R.crossformer_lda((4, 5), 2)


def test_axial():
    row = R.axial((2, 3), axis=1)
    col = R.axial((2, 3), axis=0)
    assert sorted(np.flatnonzero(row[4])) == [3, 4, 5]
    assert sorted(np.flatnonzero(col[4])) == [1, 4]


def test_hilo():
    m = R.hilo(4, (4, 4), 2, 3)  # one Hi-Fi head, three Lo-Fi heads
    assert sorted(np.flatnonzero(m[0, 5])) == [0, 1, 4, 5]
    assert m[1:].all()
    assert (R.hilo(2, (2, 2), 2, 0)[1] == True).all()  # noqa: E712  one 2x2 window covers the map


def test_video_window():
    m = R.video_window((3, 2, 4), 2, 2)  # 2 x 4 frames, spatial window 2, two frames
    # query (2, 1, 3): frames 1, 2; y window [0, 1]; x window [2, 3]
    assert sorted(np.flatnonzero(m[2 * 8 + 1 * 4 + 3])) == [10, 11, 14, 15, 18, 19, 22, 23]
    # query (0, 0, 0): frame 0 only; y [0, 1], x [0, 1]
    assert sorted(np.flatnonzero(m[0])) == [0, 1, 4, 5]
    # query (1, 0, 1): frames 0, 1; the even window leans left: x [0, 1]
    assert sorted(np.flatnonzero(m[8 + 1])) == [0, 1, 4, 5, 8, 9, 12, 13]


def test_biformer_routing():
    H = W = 4
    q = np.zeros((H, W, 2))
    k = np.zeros((H, W, 2))
    q[:2, :, 0] = 1.0  # top regions 0, 1 look along channel 0
    q[2:, :, 1] = 1.0  # bottom regions 2, 3 along channel 1
    k[:2, :2, 0] = 3.0  # region 0 has the largest channel-0 key
    k[:2, 2:, 0] = 2.0  # region 1 the next
    k[2:, 2:, 1] = 5.0  # region 3 the largest channel-1 key
    k[2:, :2, 1] = 1.0
    m, routed = R.biformer(q, k, (2, 2), 2)
    assert routed.tolist() == [[0, 1], [0, 1], [3, 2], [3, 2]]
    assert sorted(np.flatnonzero(m[0])) == list(range(8))  # top-left query: regions 0, 1 = the top half
    assert sorted(np.flatnonzero(m[15])) == list(range(8, 16))
    m1, r1 = R.biformer(q, k, (2, 2), 1)
    assert r1[:, 0].tolist() == [0, 0, 3, 3]
    assert sorted(np.flatnonzero(m1[5])) == [0, 1, 4, 5]
