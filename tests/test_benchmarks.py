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
