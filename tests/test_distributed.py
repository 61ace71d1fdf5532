"""Context parallelism (attnc.distributed): real processes on CPU with the gloo backend.

One spawn per world size (2 and 4 ranks) runs every case; each rank compares its rows of
out, lse and every gradient with the single-process op and counts the bytes it hands to
torch.distributed, and the tests below read what the ranks wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import attnc
import attnc.distributed as cp

EX = Path(__file__).resolve().parent.parent / "examples"

#: name -> (example file or source, params, sizes, heads, kv heads, strategy)
CASES = {
    "sliding_sinks": ("streaming_llm.attn", {"recent": 96}, {"seq_len": 1000}, 2, 1, "auto"),
    "neighborhood_2d": ("natten2d.attn", {"size": 5}, {"grid": (24, 30)}, 2, 2, "auto"),
    "heads_mixture": ("duo.attn", {"retrieval": {0, 2}}, {"seq_len": 777}, 4, 2, "auto"),
    "packed_documents": ("packed.attn", {}, {"seq_len": 900}, 2, 2, "auto"),
    "routed": ("biformer.attn", {}, {"seq_len": 640}, 2, 2, "auto"),
    "score_table": ("nat_rpb.attn", {"size": 5}, {"grid": (20, 26)}, 2, 2, "auto"),
    "causal_zigzag": ("pattern causal_lm = causal", {}, {"seq_len": 1100}, 2, 2, "zigzag"),
    "bfloat16": ("streaming_llm.attn", {"recent": 64}, {"seq_len": 700}, 2, 2, "auto"),
    # two tables, passed in the other order than declared: each gets its own gradient
    "two_tables": ("pattern p(a: table(H), b: table(H)) = sliding(100) score score - a[h] * (q - k) * 0.01 "
                   "+ b[h] * (q - k) * 0.03", {}, {"seq_len": 600}, 2, 2, "auto"),
}
#: cases in bfloat16 (K / V travel in it too); the others are float64
LOW_PRECISION = {"bfloat16": 2e-2}


def _pattern(spec, params):
    if spec.endswith(".attn"):
        return attnc.load(EX / spec).pattern(**params)
    return attnc.loads(spec).pattern(**params)


def _inputs(name: str, pat, N: int, H: int) -> dict:
    """The case's run-time inputs and score tables (float64 tables)."""
    g = torch.Generator().manual_seed(7)
    if name == "packed_documents":
        cuts = torch.sort(torch.randperm(N - 1, generator=g)[:7] + 1).values
        doc = torch.zeros(N, dtype=torch.int64)
        doc[cuts] = 1
        return {"doc": doc.cumsum(0)}
    if name == "routed":
        nb = -(-N // 64)
        sel = torch.stack([torch.stack([torch.randperm(nb, generator=g)[:3] for _ in range(nb)]) for _ in range(H)])
        return {"sel": sel[None]}
    if name == "score_table":
        return {"rpb": torch.randn(H, 9, 9, generator=g, dtype=torch.float64)}
    if name == "two_tables":
        return {"b": torch.randn(H, generator=g, dtype=torch.float64), "a": torch.randn(H, generator=g, dtype=torch.float64)}
    return {}


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for (gloo's own connections use free ports)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    sent = {"bytes": 0}
    real = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):  # count what is handed to the transport
        sent["bytes"] += input.numel() * input.element_size()
        return real(output, input, *args, **kwargs)

    dist.all_to_all_single = counting
    results = {}
    for name, (spec, params, sizes, H, Hkv, strategy) in CASES.items():
        results[name] = _case(name, spec, params, sizes, H, Hkv, strategy, rank, world, sent, dist)
    results["_errors"] = _errors(rank, world, dist)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter finalisation: gloo's threads can abort there (pytorch/pytorch#179291)


def _case(name, spec, params, sizes, H, Hkv, strategy, rank, world, sent, dist) -> dict:
    pat = _pattern(spec, params)
    grid = sizes.get("grid")
    N = sizes.get("seq_len") or int(np.prod(grid))
    g = torch.Generator().manual_seed(1)
    dt = torch.bfloat16 if name in LOW_PRECISION else torch.float64
    q, k, v, gout = (torch.randn(1, h, N, 16, generator=g, dtype=torch.float64).to(dt) for h in (H, Hkv, Hkv, H))
    glse = torch.randn(1, H, N, generator=g, dtype=torch.float64)
    extra = _inputs(name, pat, N, H)
    tables = {n: t for n, t in extra.items() if n in [t.name for t in pat.ir.tables]}
    inputs = {n: t for n, t in extra.items() if n not in tables}
    for t in tables.values():
        t.requires_grad_(True)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = pat(*leaves, return_lse=True, backend="torch", grid=grid, **inputs, **tables)
    ((out * gout).sum() + (lse * glse).sum()).backward()
    ref = {"out": out, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    ref_tables = {n: t.grad.clone() for n, t in tables.items()}
    for t in tables.values():
        t.grad = None

    lay = cp.layout(pat, sizes.get("seq_len"), ranks=world, heads=H, kv_heads=Hkv, grid=grid, strategy=strategy, **inputs)
    mine = [lay.shard(x, rank).requires_grad_(True) for x in (q, k, v)]
    before = sent["bytes"]
    o, l = cp.attention(lay, *mine, return_lse=True, **tables)
    fwd_bytes = sent["bytes"] - before
    ((o * lay.shard(gout, rank)).sum() + (l * lay.shard(glse, rank)).sum()).backward()
    bwd_bytes = sent["bytes"] - before - fwd_bytes
    got = {"out": o.detach(), "lse": l.detach(), "dq": mine[0].grad, "dk": mine[1].grad, "dv": mine[2].grad}
    err = {key: float((got[key].double() - lay.shard(ref[key].detach(), rank).double()).abs().max()) for key in got}
    for n, t in tables.items():
        total = t.grad.clone()
        dist.all_reduce(total)  # each rank holds its rows' part of a replicated table's gradient
        err["d" + n] = float((total - ref_tables[n]).abs().max())
    full = cp.gather(lay, o.detach())
    err["gather"] = float((full.double() - ref["out"].detach().double()).abs().max())
    rep = lay.report(head_dim=16, bytes_per_element=q.element_size())
    return {"err": err, "sent_forward": fwd_bytes, "sent_backward": bwd_bytes,
            "predicted_sent": rep.sent_bytes[rank], "predicted_recv": rep.recv_bytes[rank],
            "counted": lay.exchanged, "tokens": lay.sharding.tokens(rank), "N": N, "strategy": lay.sharding.strategy}


def _errors(rank, world, dist) -> dict:
    """Messages of calls that must fail on every rank."""
    out = {}
    pat = attnc.load(EX / "streaming_llm.attn").pattern(recent=64)
    lay = cp.layout(pat, 512, ranks=world)
    x = torch.randn(1, 1, 512, 8)
    try:
        cp.attention(lay, x, x, x)
    except ValueError as exc:
        out["shape"] = str(exc)
    packed = attnc.load(EX / "packed.attn").pattern()
    doc = torch.zeros(512, dtype=torch.int64)
    doc[100 + rank:] = 1  # every rank was given different documents
    lay = cp.layout(packed, 512, ranks=world, doc=doc)
    mine = lay.shard(x, rank)
    try:
        cp.attention(lay, mine, mine, mine)
    except ValueError as exc:
        out["mismatch"] = str(exc)
    # another window on every rank: the same tiles owned, other rows exchanged
    other = attnc.load(EX / "streaming_llm.attn").pattern(recent=64 + 64 * rank)
    lay = cp.layout(other, 512, ranks=world, strategy="contiguous")
    mine = lay.shard(x, rank)
    try:
        cp.attention(lay, mine, mine, mine)
    except ValueError as exc:
        out["pattern_mismatch"] = str(exc)
    # a batch of 3 sequences: every sequence's rows travel, as the report says for batch=3
    lay = cp.layout(pat, 512, ranks=world)
    xb = lay.shard(torch.randn(3, 1, 512, 8), rank)
    cp.attention(lay, xb, xb, xb)
    rep = lay.report(batch=3, head_dim=8, bytes_per_element=4)
    out["batch_bytes"] = [lay.exchanged["forward_sent"], rep.sent_bytes[rank], lay.exchanged["forward_received"],
                          rep.recv_bytes[rank]]
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, tmp_path_factory):
    import torch.multiprocessing as mp

    world = request.param
    d = tmp_path_factory.mktemp(f"cp{world}")
    mp.spawn(_worker, args=(world, str(d / "store"), str(d)), nprocs=world, join=True)
    return world, [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_matches_the_single_process_op(ranks, case):
    world, results = ranks
    for r, res in enumerate(results):
        got = res[case]
        assert got["tokens"] > 0
        for key, e in got["err"].items():
            assert e < LOW_PRECISION.get(case, 1e-9), f"rank {r} of {world}, {case}: {key} differs by {e}"


@pytest.mark.parametrize("case", list(CASES))
def test_bytes_sent_are_the_simulators(ranks, case):
    world, results = ranks
    for r, res in enumerate(results):
        got = res[case]
        # forward sends K and V of the tokens other ranks need; backward sends their gradients back
        assert got["sent_forward"] == got["predicted_sent"]
        # gradients go back in float32 for 16-bit inputs
        assert got["sent_backward"] == got["predicted_recv"] * (2 if case in LOW_PRECISION else 1)
        assert got["counted"]["forward_sent"] == got["predicted_sent"]
        assert got["counted"]["forward_received"] == got["predicted_recv"]
    total = sum(res[case]["sent_forward"] for res in results)
    assert total == sum(res[case]["predicted_recv"] for res in results)


def test_a_sliding_window_sends_its_edges_not_the_sequence(ranks):
    world, results = ranks
    for res in results:
        got = res["sliding_sinks"]
        per_token = 2 * 16 * 8  # K and V, one key/value head, D = 16, float64
        # a window of 96 reaches back 96 tokens: two 64-token tiles at most, plus the 4 sinks' tile
        assert got["predicted_recv"] <= 3 * 64 * per_token
    assert all(res["causal_zigzag"]["strategy"] == "zigzag" for res in results)


def test_errors_are_clear_on_every_rank(ranks):
    world, results = ranks
    for r, res in enumerate(results):
        assert "expected this rank's shard" in res["_errors"]["shape"] and "layout.shard(x" in res["_errors"]["shape"]
        assert "expected every rank to build its layout from the same" in res["_errors"]["mismatch"]
        assert "expected every rank to build its layout from the same" in res["_errors"]["pattern_mismatch"]
        sent, want_sent, got, want_got = res["_errors"]["batch_bytes"]
        assert sent == want_sent and got == want_got and sent + got > 0


# ----------------------------------------------------------------------------- planning (no processes)


def test_a_sliding_windows_traffic_does_not_grow_with_the_sequence():
    pat = attnc.load(EX / "streaming_llm.attn").pattern(recent=256)
    got = [max(cp.layout(pat, N, ranks=8).report(head_dim=64).recv_bytes) for N in (8192, 65536)]
    assert got[0] == got[1] > 0
    ring = cp.layout(pat, 65536, ranks=8).report(head_dim=64).ring_recv_bytes
    assert max(ring) > 100 * got[1]


def test_causal_attention_is_balanced_by_zigzag_or_work():
    pat = attnc.loads("pattern p = causal").pattern()
    lay = cp.layout(pat, 16384, ranks=8)
    rep = lay.report()
    assert lay.sharding.strategy in ("zigzag", "balanced") and rep.imbalance < 1.05
    contiguous = cp.layout(pat, 16384, ranks=8, strategy="contiguous").report()
    assert contiguous.imbalance > 1.8
    # the positions of all ranks are the sequence, each once
    pos = torch.cat([lay.positions(r) for r in range(8)])
    assert torch.equal(pos.sort().values, torch.arange(16384))


def test_shard_and_unshard_round_trip():
    lay = cp.layout(attnc.loads("pattern p = causal").pattern(), 1000, ranks=3, strategy="zigzag")
    x = torch.randn(2, 3, 1000, 4)
    assert torch.equal(lay.unshard([lay.shard(x, r) for r in range(3)]), x)


@pytest.mark.parametrize("call, msg", [
    (lambda p: cp.layout(p, 1000, ranks=0), "ranks: expected a positive integer"),
    (lambda p: cp.layout(p, 1000, ranks=100), "expected at most 16 ranks"),
    (lambda p: cp.layout(p, 1000, ranks=2, strategy="ring"), "strategy: expected one of"),
    (lambda p: cp.layout(p, 1000, ranks=9, strategy="zigzag"), "expected at least 18 tiles"),
    (lambda p: cp.layout(p, ranks=2), "expected the sequence length"),
    (lambda p: cp.layout(p, 1000, ranks=2).shard(torch.zeros(1, 1, 999, 4), 0), "expected a tensor with 1000 positions"),
    (lambda p: cp.layout(p, 1000, ranks=2).positions(2), "rank: expected an integer in [0, 2)"),
    (lambda p: cp.attention(cp.layout(p, 1000, ranks=2), *[torch.zeros(1, 1, 500, 4)] * 3),
     "expected an initialised torch.distributed process group"),
])
def test_planning_errors(call, msg):
    with pytest.raises(ValueError) as exc:
        call(attnc.loads("pattern p = causal").pattern())
    assert msg in str(exc.value)


def test_inputs_and_topk_are_required_or_refused():
    packed = attnc.load(EX / "packed.attn").pattern()
    with pytest.raises(ValueError, match="expected the run-time input doc"):
        cp.layout(packed, 512, ranks=2)
    topk = attnc.loads("pattern p = causal & topk(2, block = 64)").pattern()
    with pytest.raises(ValueError, match="chooses blocks with topk"):
        cp.layout(topk, 512, ranks=2)


# ----------------------------------------------------------------------------- attnc simulate --ranks


def test_simulate_ranks_prints_each_rank_count_beside_ring_attention():
    from test_cli import run

    code, out, err = run("simulate", EX / "streaming_llm.attn", "--seq-len", 65536, "--ranks", "4,64", "--tile", "64x64",
                         "--head-dim", 64)
    assert code == 0, err
    assert out.count("context parallelism: streaming_llm, N = 65536") == 2
    assert "plain ring attention" in out and "imbalance (max / mean tiles visited)" in out
    assert "     max " in out  # 64 ranks: a summary instead of 64 rows
    pat = attnc.load(EX / "streaming_llm.attn").pattern()
    rep = cp.layout(pat, 65536, ranks=4).report(head_dim=64)
    code, out, err = run("simulate", EX / "streaming_llm.attn", "--seq-len", 65536, "--ranks", "4", "--tile", "64x64",
                         "--head-dim", 64, "--json")
    got = json.loads(out)[0]
    assert got["recv_bytes"] == rep.recv_bytes and got["sent_bytes"] == rep.sent_bytes and got["work"] == rep.work


def test_simulate_ranks_routes_dynamic_patterns_at_a_density():
    from test_cli import run

    code, out, err = run("simulate", EX / "biformer.attn", "--seq-len", 8192, "--ranks", 8, "--routed-density", 0.25)
    assert code == 0, err
    assert "context parallelism: biformer" in out


@pytest.mark.parametrize("argv, msg", [
    (["--ranks", "0"], "--ranks: expected positive rank counts"),
    (["--ranks", "x"], "--ranks: expected positive rank counts"),
    (["--ranks", "4", "--tile", "64x128"], "--ranks: expected square 1-D tiles"),
    (["--ranks", "100"], "--ranks 100: ranks: expected at most 32 ranks"),
    (["--strategy", "zigzag"], "expected --ranks R as well"),
    (["--ranks", "2", "--flops-per-byte", "0"], "--flops-per-byte: expected a positive number"),
])
def test_simulate_ranks_usage_errors(argv, msg):
    from test_cli import run

    code, out, err = run("simulate", EX / "streaming_llm.attn", "--seq-len", 4096, *argv)
    assert code == 2 and msg in err and "Traceback" not in err


def test_a_head_mixture_exchanges_each_heads_own_tiles():
    duo = attnc.load(EX / "duo.attn").pattern(retrieval={0})
    causal = attnc.loads("pattern p = causal").pattern()
    window = attnc.loads("pattern p = sliding(256) | (sink(64) & causal)").pattern()
    mix, c, w = (cp.layout(p, 16384, ranks=4, heads=h, strategy="contiguous").sharding
                 for p, h in ((duo, 4), (causal, 1), (window, 1)))
    assert mix.classes == 4
    # one causal head and three windowed heads: exactly their own rows, not four causal heads' rows
    assert list(mix.traffic[0]) == list(c.traffic[0] + 3 * w.traffic[0])
    assert list(mix.traffic[1]) == list(c.traffic[1] + 3 * w.traffic[1])
    # with GQA the two query heads of a key/value head share its rows: head 0 (causal) and 1 share one
    gqa = cp.layout(duo, 16384, ranks=4, heads=4, kv_heads=2, strategy="contiguous").sharding
    assert list(gqa.traffic[0]) == list(c.traffic[0] + w.traffic[0])


def test_the_shipped_training_example_matches_one_process():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(EX / "context_parallel.py"), "--ranks", "2"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # each rank prints one report (their lines may interleave) and asserts it matches one process
    assert res.stdout.count("max |grad difference|") == 2


def test_attnc_distributed_is_reachable_from_the_package():
    import importlib
    import subprocess
    import sys

    code = "import attnc; print(attnc.distributed.layout.__module__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "attnc.runtime.distributed", res.stderr
    assert set(importlib.import_module("attnc.distributed").__all__) >= {"layout", "attention", "gather", "Layout"}


def test_layout_docstring_and_input_errors():
    import doctest

    import attnc.runtime.distributed as module

    assert doctest.testmod(module).failed == 0
    packed = attnc.load(EX / "packed.attn").pattern()
    with pytest.raises(ValueError, match=r"doc: expected a torch integer tensor .* try torch.as_tensor\(doc\)"):
        cp.layout(packed, 100, ranks=2, doc=[0, 1])
    with pytest.raises(ValueError, match="unexpected input 'dok'"):
        cp.layout(packed, 100, ranks=2, doc=torch.zeros(100, dtype=torch.int64), dok=torch.zeros(100))
    # cu_seqlens offsets are segments too
    lay = cp.layout(packed, 1000, ranks=2, doc=attnc.cu_seqlens(torch.tensor([0, 300, 1000])))
    assert lay.sharding.tokens(0) + lay.sharding.tokens(1) == 1000


def test_mixed_shared_and_per_head_plans_exchange_one_tile_list():
    """A batch element whose heads agree gets one plan for all heads (a shared schedule) while
    another keeps per-head plans: the rows are then laid out once for every head."""
    from attnc.runtime import schedules as sc

    src = "pattern p(doc: segments) = heads { {0} => causal & same(doc); _ => sliding(64) & same(doc) }"
    pat = attnc.loads(src).pattern()
    N = 640
    blk = torch.arange(N) // 10
    d0 = (blk // 3) * 2 + torch.tensor([0, 1, 0])[blk % 3]  # short documents in two runs: the heads agree
    d1 = (torch.arange(N) >= 300).long()  # two long documents: they do not
    doc = torch.stack([d0, d1])
    lay = cp.layout(pat, N, ranks=4, heads=2, doc=doc)
    assert lay.sharding.classes == 1
    from attnc.runtime.ops import probe_call

    call = probe_call(pat, N, N, 2, None, {"doc": doc}, batch=2)
    (shared, _), (per_head, _) = [(s.shared, bs) for bs, s in sc.schedules(call, nd=False)]
    assert shared and not per_head
    sched = sc.schedules(call, nd=False)[0][1]
    with pytest.raises(ValueError, match="needs one key-tile list"):
        sc.restrict(sched, [0], torch.tensor([[0], [0]]))
