"""The torch path's key ranges (runtime/key_ranges.py, [Note: schedule]): token-precise ranges,
strided views instead of gathers, one shared key block per causal chunk, masks only where some
row masks -- and the cheap finiteness check after a forward (runtime/validate.py)."""

import pytest
import torch

import attnc
from attnc.runtime import schedules as sc
from attnc.runtime import torch_backend as tb
from attnc.runtime.dense import ReferenceBackend
from attnc.runtime.ops import make_call
from attnc.runtime.validate import check_finite_result


def _schedule(src, N, H=2, Hkv=None):
    pat = attnc.loads(src).pattern()
    q = torch.randn(1, H, N, 16)
    k, v = (torch.randn(1, Hkv or H, N, 16) for _ in range(2))
    call = make_call(pat, q, k, v, {}, None, None)
    ((_, sched),) = sc.schedules(call)
    return pat, call, sched, (q, k, v)


def _groups(sched):
    return [(chunk, g) for chunk in sched.chunks for g in chunk.groups]


def test_sliding_window_with_sinks_reads_exact_token_ranges_as_views():
    _, call, sched, _ = _schedule("pattern p = sliding(512) | (sink(4) & causal)", 4096)
    bm, bn = sched.block
    assert (bm, bn) == (64, 64)
    interior = [ch for ch in sched.chunks if len(ch.groups) == 2]
    assert interior, "query tiles past the window: a sink range and a window range"
    for chunk in interior:
        sink, window = chunk.groups
        assert sink.length == 4 and bool((sink.keys == 0).all())  # 4 sink keys, not a 64-key tile
        assert window.length == 512 + bm - 1  # rows 64i .. 64i+63 see keys 64i-511 .. 64i+63
        assert window.view and window.step == bm  # one tile further per unit: a strided view
        tiles = chunk.q
        assert bool((window.keys == tiles * bm - 511).all())
        # masks only on the window's two triangular ends, one copy for every unit
        spans = [(c0, c1) for c0, c1, _, _ in window.masks]
        assert spans[0][0] == 0 and spans[-1][1] == window.length and sum(c1 - c0 for c0, c1 in spans) <= 2 * bm
        blocked = ~window.allowed(1, bm)[0, 0]  # row r sees columns r .. r + 511
        want = torch.arange(window.length)[None, :]
        rows = torch.arange(bm)[:, None]
        assert torch.equal(blocked, (want < rows) | (want > rows + 511))
        assert all(m.shape[0] == 1 for _, _, m, _ in window.masks)


def test_causal_chunks_share_one_key_block():
    _, _, sched, _ = _schedule("pattern p = causal", 4096, H=1)
    for chunk, g in _groups(sched):
        assert g.view and g.step == 0, "every unit of a causal chunk reads the same keys"
        assert bool((g.keys == g.keys[0]).all())
    # pieces of at most max_group_keys keys, counted from the range's start
    assert max(g.length for _, g in _groups(sched)) <= tb.CONFIG.max_group_keys


def test_views_copy_no_keys_and_match_the_reference():
    pat, call, sched, (q, k, v) = _schedule("pattern p = sliding(100) | (sink(3) & causal)", 1000, H=4, Hkv=2)
    assert all(g.view for _, g in _groups(sched))
    gathered = []
    real = torch.Tensor.index_select

    def spy(t, dim, index):
        gathered.append(tuple(t.shape))
        return real(t, dim, index)

    torch.Tensor.index_select = spy
    try:
        out, lse = tb.TorchBackend().forward(call, q, k, v)
    finally:
        torch.Tensor.index_select = real
    D = q.shape[-1]
    assert all(shape[-1] != D or len(shape) != 2 for shape in gathered), "a key row was gathered"
    want, want_lse = ReferenceBackend().forward(call, q, k, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_per_head_chunks_keep_one_head_so_their_keys_stay_views():
    src = "pattern p = heads { {0, 1} => causal; _ => sliding(256) | (sink(8) & causal) }"
    _, _, sched, _ = _schedule(src, 2048, H=4)
    assert not sched.shared
    for chunk, g in _groups(sched):
        heads = set((chunk.q // sched.nq).tolist())
        assert len(heads) == 1
        assert g.view


def test_restricted_schedules_read_explicit_rows():
    _, call, sched, _ = _schedule("pattern p = sliding(100)", 512, H=1)
    nq, nk = sched.nq, sched.nk
    local = sc.restrict(sched, torch.arange(nq // 2, nq), torch.arange(nk))
    assert all(g.rows is not None and not g.view for _, g in _groups(local))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_check_is_exact(dtype):
    q = k = v = torch.zeros(1, 1, 4, 2, dtype=dtype)
    big = torch.full((1, 1, 4, 2), torch.finfo(dtype).max / 2, dtype=dtype)  # finite, but its sum overflows
    check_finite_result(q, k, v, big, torch.zeros(1, 1, 4), 1.0)
    check_finite_result(q, k, v, big, torch.full((1, 1, 4), float("-inf")), 1.0)  # empty rows
    bad = big.clone()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="overflows|finite"):
        check_finite_result(q, k, v, bad, None, 1.0)
    for x in (float("nan"), float("inf")):
        lse = torch.zeros(1, 1, 4)
        lse[0, 0, 2] = x
        with pytest.raises(ValueError):
            check_finite_result(q, k, v, big, lse, 1.0)


def test_short_ranges_are_packed_into_one_gathered_group():
    # every other 16-key block: each visited key tile is its own range of 16 keys
    src = "pattern p = blockwise(16, strided(2) & causal)"
    pat = attnc.loads(src).pattern()
    q, k, v = (torch.randn(1, 2, 1024, 8) for _ in range(3))
    from attnc.runtime.tile_choice import TorchPathConfig

    cfg = TorchPathConfig(block=(16, 16))
    call = make_call(pat, q, k, v, {}, None, None)
    ((_, sched),) = sc.schedules(call, cfg)
    lengths = [len(ch.groups) for ch in sched.chunks]
    assert max(lengths) == 1, "scattered short ranges are packed into one group, not one group each"
    packed = [g for _, g in _groups(sched) if g.rows is not None]
    assert packed and all(g.keys.dim() == 2 for g in packed)
    out, _ = tb.TorchBackend(cfg).forward(call, q, k, v)
    want, _ = ReferenceBackend().forward(call, q, k, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
