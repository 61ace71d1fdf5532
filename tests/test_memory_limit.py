"""The memory limit ([Note: memory limit], attnc/limits.py): every path that allocates in
proportion to the problem estimates its bytes first and refuses past $ATTNC_MAX_BYTES
with expected / got / try, instead of a raw allocation error or the OOM killer
(issue 17). Each test sets a small limit, so nothing big is ever allocated."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import attnc
from attnc import limits
from attnc.cli import main
from attnc.limits import MemoryLimitError


@pytest.fixture
def limit(monkeypatch):
    def set_(value: str):
        monkeypatch.setenv(limits.ENV, value)
    set_("1M")
    return set_


def refused(fn, *words) -> str:
    with pytest.raises(MemoryLimitError) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for w in ("expected at most", "got an estimate of", "try ", limits.ENV, *words):
        assert w in msg, (w, msg)
    return msg


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "w.attn").write_text("pattern p(w = 64) = sliding(w) | where (q + k) % 3 == 0\n")
    (tmp_path / "g.attn").write_text("pattern g(s = 7) on grid(h, w) = neighborhood(s)\n")
    (tmp_path / "t.attn").write_text("pattern t on seq(2**60) + grid(h, w) = causal\n")
    (tmp_path / "k.attn").write_text("pattern tk = causal & topk(2, block = 2**40)\n")
    return tmp_path


# ----------------------------------------------------------------------------- the limit itself


@pytest.mark.parametrize("text,value", [("2000000", 2000000), ("512M", 512 << 20), ("4G", 4 << 30), ("4GiB", 4 << 30),
                                        ("1.5T", int(1.5 * (1 << 40))), ("64k", 64 << 10), ("0", None),
                                        ("none", None)])
def test_the_limit_reads_byte_counts(text, value):
    assert limits.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["junk", "-5", "4X", "1e9", ""])
def test_an_unreadable_limit_is_a_value_error(monkeypatch, text):
    monkeypatch.setenv(limits.ENV, text + " ")
    if not text.strip():  # empty: the default applies
        assert limits.max_bytes()[0] == int(limits.physical_memory() * limits.DEFAULT_FRACTION)
        return
    with pytest.raises(ValueError, match=limits.ENV):
        attnc.loads("pattern p = causal").pattern().mask(4)


def test_the_default_is_half_of_physical_memory(monkeypatch):
    monkeypatch.delenv(limits.ENV, raising=False)
    value, source = limits.max_bytes()
    assert value == int(limits.physical_memory() * 0.5) and "physical memory" in source


def test_no_limit_with_zero(monkeypatch):
    monkeypatch.setenv(limits.ENV, "0")
    limits.require(10**30, "anything", "nothing")


# ----------------------------------------------------------------------------- each path


def test_mask(limit):
    pat = attnc.loads("pattern p = sliding(4)").pattern()
    assert pat.mask(100).shape == (1, 100, 100)  # well under 1 MiB
    msg = refused(lambda: pat.mask(10**6), "pat.mask(1000000, 1000000", "pat.plan")
    assert "22.7 TiB" in msg  # 10**12 pairs: the bool result and the working temporaries
    refused(lambda: pat.mask(400, heads=64), "heads=64")


def test_mask_with_batched_inputs(limit):
    pat = attnc.loads("pattern p(doc: segments) = causal & same(doc)").pattern()
    assert pat.mask(64, doc=torch.zeros(2, 64, dtype=torch.long)).shape == (2, 1, 64, 64)
    refused(lambda: pat.mask(300, doc=torch.zeros(64, 300, dtype=torch.long)), "64 batch elements")


def test_mask_rows_and_the_evaluator(limit):
    pat = attnc.loads("pattern p = causal").pattern()
    assert pat.mask_rows(10**4, 10**4, 1, None, 0, 2).shape == (1, 2, 10**4)  # a few rows are fine
    refused(lambda: pat.mask_rows(10**5, 10**5, 1, None, 0, 10**4), "evaluating 1 x 10000 x 100000 mask entries")


def test_seq_2_pow_60_layout(limit, files):
    pat = attnc.load(files / "t.attn").pattern("t")
    refused(lambda: pat.mask(1, grid=(2, 2)), "1152921504606846980")
    rc, _, err = cli("show", str(files / "t.attn"), "-p", "t", "--grid", "2x2")
    assert rc == 1 and "expected at most" in err and "Traceback" not in err


def test_show(limit, files):
    rc, out, err = cli("show", str(files / "w.attn"), "--seq-len", "10000000")
    assert rc == 1 and not out.strip(), out
    # show counts from the plan (pair_counts.tile_counts): the plan's first chunk is what refuses
    assert "of the tile plan" in err and "ATTNC_MAX_BYTES" in err and "Traceback" not in err
    limit("8M")
    rc, out, err = cli("show", str(files / "w.attn"), "--seq-len", "200", "--block", "16")
    assert rc == 0 and "density" in out, err


def test_check_rows(limit, files):
    rc, out, err = cli("check", str(files / "g.attn"), "--grid", "100000x100000")
    assert rc == 1 and "ok (1 pattern" in out
    assert "pattern 'g': the allowed keys of every query" in err and "Traceback" not in err
    refused(lambda: attnc.load(files / "w.attn").pattern().check_rows(10**7), "allowed keys of every query")


def test_simulate(limit, files):
    rc, _, err = cli("simulate", str(files / "g.attn"), "--grid", "100000x100000")
    assert rc == 1 and "expected at most" in err and "Traceback" not in err  # was killed by the OOM killer
    rc, _, err = cli("simulate", str(files / "w.attn"), "--seq-len", "10000000000")
    assert rc == 1 and "tile plan" in err and "Traceback" not in err


def test_closed_form_plan_projects_its_tiles(limit):
    limit("128M")  # room for one chunk of the plan builder
    pat = attnc.loads("pattern p = sliding(64)").pattern()
    assert pat.plan(4096, block=(64, 64)).counts()["tiles_partial"] > 0
    # 64 non-empty 1 x 1 tiles per query row at 10**7 rows: refused after the first chunk, not at the end
    refused(lambda: pat.plan(10**7, block=(1, 1)), "the tile plan", "non-empty tiles in the first")


def test_tile_runs_projected(limit):
    limit("16M")  # room for one chunk of the plan builder
    pat = attnc.loads("pattern p = full").pattern()
    # one run per query row at 2**20 rows: refused after the first chunk, from its runs
    refused(lambda: pat.plan(2**20, 10**6, block=(1, 1)), "16384 runs of non-empty tiles in the first 16384 query rows")


def test_tile_runs_expand_on_first_use(limit):
    limit("64M")
    # one run of 10**6 full tiles per query row: planned in O(rows), listed only when asked
    plan = attnc.loads("pattern p = full").pattern().plan(4096, 10**6, block=(1, 1))
    assert plan.counts()["tiles_full"] == 4096 * 10**6 and plan.allowed == 4096 * 10**6
    refused(lambda: plan.full.cols, "the tile list of 4096000000 tiles")
    refused(lambda: plan.full.index, "the tile list of 4096000000 tiles")


def test_tile_boxes(limit):
    limit("16M")  # room for one chunk of the plan builder
    pat = attnc.loads("pattern p = where (q + k) % 3 == 0").pattern()
    refused(lambda: pat.plan(10**5, block=(16, 16)), "the tile plan of 'p'", "tiles per head")


def test_plan_to_dense(limit):
    limit("16M")  # room for one chunk of the plan builder
    plan = attnc.loads("pattern p = sliding(4)").pattern().plan(10**6, block=(16, 16))
    refused(plan.to_dense, "a dense map of 1 x 62500 x 62500 tiles")


def test_nd_tile_plan(limit):
    limit("16M")  # room for one chunk of the plan builder
    pat = attnc.loads("pattern g on grid(h, w) = neighborhood(3)").pattern()
    refused(lambda: pat.plan(None, grid=(2000, 2000), block=((1, 1), (1, 1))), "the N-D tile plan")


def test_grid_axis_interval_sets(limit):
    limit("16M")  # room for one chunk of the plan builder
    pat = attnc.loads("pattern g on grid(h, w) = neighborhood(3)").pattern()
    refused(lambda: pat.plan(None, grid=(10**9, 2), block=(64, 64)), "every coordinate of axis h")


def test_topk_with_a_huge_block_pools_without_padding(limit, files):
    # block 2**40 used to pad q and k to 2**40 rows before pooling
    pat = attnc.load(files / "k.attn").pattern()
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    out = pat(q, k, v, backend="torch")
    ref = pat(q, k, v, backend="reference")
    assert torch.allclose(out, ref, atol=1e-5)
    rc, out, err = cli("simulate", str(files / "k.attn"), "--seq-len", "1000")
    assert rc == 0, err


def test_topk_tables(limit):
    pat = attnc.loads("pattern p = causal & topk(2, block = 1)").pattern()
    q = torch.randn(1, 1, 300, 4)
    refused(lambda: pat(q, q, q, backend="torch"), "topk")
    refused(lambda: pat.simulate(2000, routed_density=0.5, tile=(64, 64)), "blocks")


def test_routed_tables_in_simulate(limit):
    pat = attnc.loads("pattern p(sel: blocks(1)) = causal & routed(sel)").pattern()
    refused(lambda: pat.simulate(4000, routed_density=0.1), "a random block table for 'sel'")


def test_compile_lowering(limit, files):
    rc, _, err = cli("compile", str(files / "g.attn"), "--grid", "100000x100000", "-o", str(files / "out"))
    assert rc == 1 and "lowering 'g'" in err and "Traceback" not in err


def test_tiles_beyond_2_pow_30_are_refused():
    pat = attnc.loads("pattern p = sliding(4)").pattern()
    with pytest.raises(ValueError, match=r"expected tile sizes up to 2\*\*30"):
        pat.plan(100, block=(2**40, 2**40))


def test_a_real_process_refuses_instead_of_crashing(files):
    env = dict(os.environ, **{limits.ENV: "64M"})
    for argv in (["show", str(files / "w.attn"), "--seq-len", "10000000"],
                 ["check", str(files / "g.attn"), "--grid", "100000x100000"]):
        res = subprocess.run([sys.executable, "-m", "attnc", *argv], capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 1 and "expected at most 64.0 MiB" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_an_allocation_the_estimates_missed_is_still_a_message(files, monkeypatch):
    import attnc.show
    def boom(*a, **k):
        raise MemoryError()
    monkeypatch.setattr(attnc.show, "plan_tile_stats", boom)  # what `attnc show` counts with
    rc, _, err = cli("show", str(files / "w.attn"), "--seq-len", "64")
    assert rc == 1 and "out of memory" in err and limits.ENV in err and "Traceback" not in err
