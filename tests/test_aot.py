"""Ahead-of-time compilation for NVIDIA targets (attnc/aot.py), without a GPU.

The compile test builds the CI subset (`aot.ci_jobs`: a covering design over pattern kind x
target x dtype x head dim, forward and backward) in two worker processes and asserts every
kernel fits its target: no spills, shared memory within the limit. It needs Triton (the NVIDIA
backend ships ptxas and cuobjdump) and fails, not skips, without it.
"""

import io
import json

import pytest
import torch

import attnc

from attnc import aot, aot_worker, cli
from attnc.codegen.kernels import AUTOTUNE_CONFIGS, KernelConfig, configs_for
from conftest import EXAMPLES

USAGE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _attn_bwd_dkdv:
  REG:255 STACK:16 SHARED:1024 LOCAL:36 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _mask:
  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    got = aot_worker.parse_resource_usage(USAGE)
    assert set(got) == {"_attn_bwd_dkdv", "_mask"}
    assert got["_attn_bwd_dkdv"]["REG"] == 255
    assert got["_attn_bwd_dkdv"]["LOCAL"] == 36
    assert got["_attn_bwd_dkdv"]["SHARED"] == 1024
    assert got["_attn_bwd_dkdv"]["CONSTANT[0]"] == 640
    assert got["_mask"]["REG"] == 12


@pytest.mark.parametrize("text", ["", "Resource usage:\n Common:\n  GLOBAL:0\n", " Function f:\n  STACK:0\n"])
def test_parse_resource_usage_says_what_it_expected(text):
    with pytest.raises(aot.AOTError, match="expected 'Function NAME:' lines"):
        aot_worker.parse_resource_usage(text)


def test_problems():
    assert aot.problems(200, 0, 100_000, 128, 166912) == []
    assert aot.problems(255, 36, 100_000, 128, 166912) == ["spills 36 B per thread"]
    assert aot.problems(128, 0, 182272, 256, 166912) == ["shared memory 182272 B > 166912 B"]
    assert aot.problems(255, 0, 0, 512, 232448) == ["255 registers x 512 threads > 65536"]


def test_targets():
    assert aot.parse_target("sm_90") == (90, 232448)
    assert aot.parse_target("SM80") == (80, 166912)
    assert aot.parse_target("90a") == (90, 232448)
    assert aot.parse_targets("sm_90, sm_80") == ["sm_90", "sm_80"]
    for bad in ("sm_75", "h100", "sm_9x"):
        with pytest.raises(aot.AOTError, match=r"expected one of sm_80.*got .*try sm_90"):
            aot.parse_target(bad)
    with pytest.raises(aot.AOTError, match="expected targets like sm_90"):
        aot.parse_targets(" , ")


def test_bad_jobs_say_expected_got_try():
    f = str(EXAMPLES / "streaming_llm.attn")
    with pytest.raises(aot.AOTError, match="dtype: expected one of fp16, bf16, fp32, got 'fp8'; try fp16"):
        aot.Job(f, dtype="fp8").check()
    with pytest.raises(aot.AOTError, match="D: expected a head dim from 1 to 256.*got 512"):
        aot.Job(f, D=512).check()
    with pytest.raises(aot.AOTError, match="passes: expected 'fwd', 'bwd', 'both' or 'decode'"):
        aot.Job(f, passes="all").check()
    with pytest.raises(aot.AOTError, match="file: expected an .attn file.*not found"):
        aot.Job(f + ".missing").check()
    with pytest.raises(aot.AOTError, match="processes: expected at least 1, got 0"):
        aot.compile_jobs([aot.Job(f)], processes=0)


def test_job_round_trips_through_the_worker_protocol():
    j = aot.Job("x.attn", "p", (("w", 64), ("r", range(0, 16)), ("s", {0, 5}), ("t", (3, 5))), M=100, grid=(8, 8),
                config=KernelConfig(tile=((8, 8), (8, 4))), dtype="bf16", D=128, Dv=64, target="sm_80", passes="bwd")
    assert aot.job_from_json(aot.job_to_json(j)) == j


def test_cli_target_errors():
    f = str(EXAMPLES / "streaming_llm.attn")
    for argv, msg in ((["--target", "sm_75"], "--target: target: expected one of"),
                      (["--target", "sm_90", "--head-dim", "300"], "--head-dim: expected 1 to 256"),
                      (["--target", "sm_90", "--processes", "0"], "--processes: expected at least 1")):
        out, err = io.StringIO(), io.StringIO()
        assert cli.main(["compile", f, "--seq-len", "256", "-o", "unused"] + argv, out, err) == 2
        assert msg in err.getvalue()


# -- configs per target (kernels.configs_for) -------------------------------------------------------

def _key(c):
    return (c.block_m, c.block_n, c.num_warps, c.num_stages)


@pytest.mark.parametrize("cap", [75, 80, 86, 89, 90, 100, 120])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", torch.float16, torch.float32])
def test_every_config_the_runtime_chooses_runs_a_fitting_backward(cap, head_dim, dtype):
    tc = configs_for(cap, head_dim, dtype)
    assert tc.default in tc.autotune and _key(tc.default) in tc.backward_ok
    for c in (tc.default, *tc.autotune):
        bwd = tc.backward(c)
        assert _key(bwd) in tc.backward_ok
        assert (bwd == c) == (_key(c) in tc.backward_ok)
    nd = KernelConfig(tile=((8, 8), (8, 8)), num_warps=8, num_stages=3)
    assert tc.backward(nd).tile == nd.tile  # N-D tiles keep their tiles


def test_known_misfits_are_not_chosen():
    """From the AOT figures (docs/codegen.md section 7): at D=128, 128x64 w8 s3 needs 182272 B
    (closed form) to 247808 B (tile lists) for dK/dV on sm_80; 128x128 w8 s2 dK/dV with tile
    lists needs 263168 B on sm_90: their backward runs with a fitting config."""
    for cap in (80, 90):
        tc = configs_for(cap, 128, "fp16")
        for bad in ((128, 64, 8, 3), (128, 128, 8, 2)):
            assert bad not in tc.backward_ok
            c = KernelConfig(block_m=bad[0], block_n=bad[1], num_warps=bad[2], num_stages=bad[3])
            assert _key(tc.backward(c)) in tc.backward_ok
        assert tc.backward(KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)).block == (128, 64)
    assert configs_for(90, 128, torch.float32).autotune == (configs_for(90, 128, torch.float32).default,)


def test_cpu_interpreter_keeps_the_public_defaults():
    tc = configs_for(None, 64)
    assert tc.default == KernelConfig() and tc.autotune == AUTOTUNE_CONFIGS
    big = KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)
    assert tc.backward(big) == big


def test_configure_sets_and_restores_the_config_of_later_calls():
    import math
    from attnc.runtime.backend import Call
    from attnc.runtime.triton_backend import TritonBackend

    pat = attnc.loads("pattern p = sliding(8)").pattern()
    call = Call(pattern=pat, B=1, Hq=1, Hkv=1, M=64, N=64, D=256, Dv=256, grid=None, scale=1 / math.sqrt(256), inputs={})
    q = torch.empty(1, 1, 64, 256, dtype=torch.bfloat16)
    be = TritonBackend(capability=90)
    target = configs_for(90, 256, torch.bfloat16).default
    assert be.call_config(call, q) == target != KernelConfig()  # D=256 on sm_90: 8 warps or 32x32 tiles
    mine = KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    be.configure(mine)
    assert be.call_config(call, q) == mine
    be.configure(None)
    assert be.call_config(call, q) == target


def test_configs_for_says_what_it_expected():
    for bad in ("sm_90", 9.0, True, 0):
        with pytest.raises(ValueError, match="capability: expected an integer like 80"):
            configs_for(bad, 64)
    for bad in (0, 300, 64.0):
        with pytest.raises(ValueError, match="head_dim: expected 1 to 256"):
            configs_for(90, bad)


# -- the compile itself ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ci_reports():
    return aot.compile_jobs(aot.ci_jobs(EXAMPLES), processes=2)


def test_ci_subset_compiles_and_fits(ci_reports):
    jobs = aot.ci_jobs(EXAMPLES)
    assert {j.target for j in jobs} == {"sm_90", "sm_80"} and {j.dtype for j in jobs} == {"fp16", "bf16"}
    assert {j.D for j in jobs} == {64, 128}
    bad = [f"{r.job.label} {r.job.target} {r.job.dtype} D={r.job.D}: {r.error or [k.problems for k in r.kernels]}"
           for r in ci_reports if not r.fits]
    assert not bad, "kernels that do not fit:\n" + "\n".join(bad) + "\n" + aot.table(ci_reports)
    for r in ci_reports:
        want = ["_decode_split"] if r.job.passes == "decode" else ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"]
        assert [k.kernel for k in r.kernels if k.kernel != "_attn_bwd_preprocess"] == want, r.job
        for k in r.kernels:
            assert 0 < k.registers <= 255 and k.shared > 0 and k.compile_s >= 0
            assert k.limit == aot.TARGETS[r.job.target][1]
    nd = [r for r in ci_reports if r.job.config is not None and r.job.config.tile is not None]
    assert nd and all("tile 8x8/8x8" in k.config for r in nd for k in r.kernels)


def test_specialisation_follows_dtype_and_target(ci_reports):
    """Same pattern and kernel, other dtype / D / target: other PTX (the launch's specialisation
    reaches the compiler); the table names every kernel."""
    by = {}
    for r in ci_reports:
        for k in r.kernels:
            by.setdefault((r.job.label, k.kernel), set()).add(k.ptx_sha)
    assert all(len(v) == 2 for k, v in by.items() if k[1] != "_attn_bwd_preprocess")
    text = aot.table(ci_reports)
    assert text.count("_attn_fwd") == sum(r.job.passes != "decode" for r in ci_reports)
    assert text.count("_decode_split") == 2
    assert "| label | target |" in aot.table(ci_reports, markdown=True)


def test_cli_compile_with_targets(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["compile", str(EXAMPLES / "streaming_llm.attn"), "--seq-len", "1024", "--heads", "2",
                   "--target", "sm_80", "--tile", "32x32", "-o", str(tmp_path)], out, err)
    assert rc == 0, err.getvalue()
    assert "_attn_bwd_dkdv" in out.getvalue() and "32x32 w4 s2" in out.getvalue()
    meta = json.loads((tmp_path / "streaming_llm_1024.json").read_text())
    (rep,) = meta["aot"]
    assert rep["target"] == "sm_80" and rep["fits"] and len(rep["kernels"]) == 4


def test_runtime_jobs_cover_every_config_the_runtime_can_launch():
    job = aot.example_job(EXAMPLES / "bigbird.attn", target="sm_80", dtype="bf16", D=128)
    jobs = aot.runtime_jobs(job)
    tc = configs_for(80, 128, "bf16")
    assert [j.config for j in jobs] == list(dict.fromkeys([tc.default, *tc.autotune]))
    assert jobs[0].label == "bigbird (default)" and all(j.label == "bigbird (autotune)" for j in jobs[1:])
    # 128x128 w8 s2 runs the default's backward, compiled with the default already: forward only
    by = {_key(j.config): j.passes for j in jobs}
    assert by[(64, 64, 4, 2)] == "both" and by[(128, 128, 8, 2)] == "fwd" and by[(128, 64, 8, 3)] == "both"
    nd = aot.example_job(EXAMPLES / "natten2d.attn", grid=(32, 32), config=KernelConfig(tile=((8, 8), (8, 8))))
    assert all(j.config.tile == ((8, 8), (8, 8)) for j in aot.runtime_jobs(nd))


def test_ptx_fingerprint_ignores_file_paths_not_code():
    """A kernel module imported from another folder (another cache, a real launch next to an AOT
    worker) embeds other `.file` paths: the same kernel. Seen on the H200: every PTX hash of
    scripts/aot_gpu_check.py differed only there."""
    ptx = '.version 8.7\n.target sm_90a\n\t.file\t1 "/a/kernel.py"\n// begin inline asm\n\tmov.u32 %r1, 0;\n'
    moved = ptx.replace("/a/kernel.py", "/tmp/other/kernel.py")
    assert aot.ptx_fingerprint(ptx) == aot.ptx_fingerprint(moved)
    assert aot.ptx_fingerprint(ptx) != aot.ptx_fingerprint(ptx.replace("%r1, 0", "%r1, 1"))
