"""The benchmark harnesses run end to end at tiny sizes (harness checks, no timing assertions)."""

import importlib.util
import json
import sys

from conftest import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_smoke_records_rows_with_simulator_columns(tmp_path, capsys):
    gpu = load("gpu")
    out = tmp_path / "rows.json"
    assert gpu.main(["--smoke", "--no-flex", "--fwd-only", "--cases", "llm-32k", "routed-10pct-32k",
                     "--json", str(out), "--out", str(tmp_path / "r.md")]) == 0
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["llm-32k", "routed-10pct-32k"]
    assert rows[0]["tile_bound"] > 1 and rows[0]["attnc_fwd_ms"] > 0 and rows[0]["dense_sdpa_fwd_ms"] > 0
    assert "speedup_vs_dense_fwd" in rows[0]
    assert "| llm-32k |" in (tmp_path / "r.md").read_text()


def test_gpu_benchmark_rejects_unknown_cases(capsys):
    assert load("gpu").main(["--smoke", "--cases", "nope"]) == 2
    assert "unknown cases" in capsys.readouterr().err


def test_dynamic_benchmark_smoke_prints_both_packed_rows(capsys):
    assert load("dynamic").main(["--n", "256", "--heads", "2", "--head-dim", "8", "--docs", "3", "--reps", "1",
                                 "--skip-topk"]) == 0
    text = capsys.readouterr().out
    assert "same documents every call | dense SDPA fwd" in text and "new documents every call | attnc fwd" in text


def test_gpu_benchmark_native_mask_mods_match_attnc_and_the_check_can_fail():
    gpu = load("gpu")
    cases = [c for c in gpu.smoke_cases() if c.native is not None]
    assert {c.name for c in cases} >= {"1d-w2k-s256", "2d-w80-s16", "llm-32k", "per-head-32k"}
    for case in cases:
        assert gpu.check_native(case, 4) == 0, case.name
    # an off-by-one window (and a stride the pattern does not have) is caught
    stride = next(c for c in cases if c.name == "1d-w2k-s256")
    assert gpu.check_native(gpu.Case(stride.name, stride.source, stride.params, stride.n, native=gpu.neighborhood_1d(512, 65, 16)), 4) > 0
    assert gpu.check_native(gpu.Case(stride.name, stride.source, stride.params, stride.n, native=gpu.neighborhood_1d(512, 64)), 4) > 0
    per_head = next(c for c in cases if c.name == "per-head-32k")
    assert gpu.check_native(gpu.Case(per_head.name, per_head.source, n=per_head.n, native=gpu.sliding_sinks(64, 4)), 4) > 0
