"""The CLI, in process through main(argv): verbs, exit codes, bad files."""

import io

import pytest
from hypothesis import given, settings, strategies as st

import attnc
from attnc.cli import main
from conftest import EXAMPLES


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(map(str, argv)), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_check_ok_all_examples():
    files = sorted(EXAMPLES.glob("*.attn"))
    code, out, err = run("check", *files)
    assert code == 0, err
    assert out.count(": ok (") == len(files)


def test_check_reports_diagnostics_with_exit_1(tmp_path):
    f = tmp_path / "bad.attn"
    f.write_text("pattern p = sliding(3)\npattern r = bnd(2, 2)\n")
    code, out, err = run("check", f)
    assert code == 1
    assert "bad.attn:2:13: error: unknown pattern or primitive 'bnd'" in err
    assert "^~~" in err and "Traceback" not in err


def test_check_warns_about_empty_rows_with_a_witness(tmp_path):
    f = tmp_path / "e.attn"
    f.write_text("pattern p = sliding(4) & ~rows(3 .. 5)\npattern d = full\n")
    code, out, err = run("check", f, "--seq-len", 100)
    assert code == 0, err
    assert "pattern 'p' has 2 empty query rows at M = N = 100 (e.g. head 0, row 3)" in out
    assert "pattern 'd' is fully dense" in out


def test_list():
    code, out, _ = run("list", EXAMPLES / "gna_strided.attn")
    assert code == 0
    assert "gna_strided(size = (18, 24, 24), stride = (16, 8, 8)) on grid(t, h, w)" in out
    assert "Generalized Neighborhood Attention" in out
    code, out, _ = run("list", EXAMPLES / "packed.attn")
    assert "packed(doc: segments) on seq" in out


def test_show_seq_and_png(tmp_path):
    png = tmp_path / "l.png"
    code, out, err = run("show", EXAMPLES / "longformer.attn", "--set", "window=64", "--set", "globals=32",
                         "--seq-len", 1000, "--block", 64, "--png", png)
    assert code == 0, err
    assert "density 0.1824 (182400 of 1000000 pairs)" in out or "density" in out
    lines = [line.strip() for line in out.splitlines()]
    assert lines[lines.index("head 0: " + next(x for x in lines if x.startswith("head 0: "))[8:]) + 1].startswith("#")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_numbers_are_exact():
    code, out, _ = run("show", EXAMPLES / "mistral.attn", "--set", "window=10", "--seq-len", 100, "--block", 10)
    assert code == 0
    allowed = sum(min(q + 1, 10) for q in range(100))
    assert f"density {allowed / 10000:.4f} ({allowed} of 10000 pairs); tiles: 0 full, 19 partial, 81 empty of 100" in out


def test_show_grid_and_heads():
    code, out, err = run("show", EXAMPLES / "cswin.attn", "--grid", "14x14", "--heads", 4, "--block", 14, "--set", "sw=7")
    assert code == 0, err
    assert "heads 0-1:" in out and "heads 2-3:" in out


@pytest.mark.parametrize("argv,code,msg", [
    (["show", EXAMPLES / "natten2d.attn", "--seq-len", 64], 2, "give --grid"),
    (["show", EXAMPLES / "mistral.attn", "--grid", "8x8"], 2, "give --seq-len"),
    (["show", EXAMPLES / "natten2d.attn", "--grid", "8xx8"], 2, "--grid: expected sizes"),
    (["show", EXAMPLES / "mistral.attn", "--seq-len", 64, "--set", "window"], 2, "expected NAME=VALUE"),
    (["show", EXAMPLES / "mistral.attn", "--seq-len", 64, "--set", "windw=3"], 1, "has no parameter 'windw'"),
    (["show", EXAMPLES / "mistral.attn", "--seq-len", 0], 2, "positive length"),
    (["show", EXAMPLES / "packed.attn", "--seq-len", 64], 1, "run-time inputs"),
    (["show", EXAMPLES / "mistral.attn"], 2, "one of the arguments --seq-len --grid is required"),
    (["frobnicate"], 2, "invalid choice"),
    ([], 2, "usage"),
])
def test_usage_errors(argv, code, msg):
    got, out, err = run(*argv)
    assert got == code
    assert msg in err + out
    assert "Traceback" not in err


def test_bad_files(tmp_path):
    (tmp_path / "bin.attn").write_bytes(b"\x00\x01\x02pattern")
    (tmp_path / "latin.attn").write_bytes("pattern p = causal # caf\xe9\n".encode("latin-1"))
    (tmp_path / "dir.attn").mkdir()
    for name, msg in [("missing.attn", "file not found"), ("bin.attn", "binary file"),
                      ("latin.attn", "not UTF-8 text"), ("dir.attn", "is a directory")]:
        code, out, err = run("check", tmp_path / name)
        assert code == 1, name
        assert msg in err, (name, err)
        assert "Traceback" not in err


def test_import_cycle_and_missing_import(tmp_path):
    (tmp_path / "a.attn").write_text('import "b.attn"\npattern a = causal\n')
    (tmp_path / "b.attn").write_text('import "a.attn"\npattern b = full\n')
    (tmp_path / "c.attn").write_text('import "nope.attn"\npattern c = full\n')
    code, _, err = run("check", tmp_path / "a.attn")
    assert code == 1 and "import cycle" in err and "b.attn:1:1" in err
    code, _, err = run("check", tmp_path / "c.attn")
    assert code == 1 and "c.attn:1:1: error: file not found" in err


def test_python_m_attnc():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "attnc", "check", str(EXAMPLES / "mistral.attn")], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout


@pytest.mark.parametrize("argv, imports_torch", [
    (["--help"], False),
    (["check", "*"], False),
    (["list", "video.attn"], False),
    (["check", "natten2d.attn", "--grid", "8x8"], True),  # sizes: the row check runs on torch
])
def test_cli_imports_torch_only_for_work_on_tensors(argv, imports_torch):
    # lazy imports: `attnc --help`, `check` and `list` start without torch (seconds of import)
    import subprocess
    import sys
    files = [str(p) for p in sorted(EXAMPLES.glob("*.attn"))] if "*" in argv else []
    args = [a for a in argv if a != "*"] + files
    args = [str(EXAMPLES / a) if a.endswith(".attn") else a for a in args]
    code = ("import sys\nfrom attnc.cli import main\nrc = main(sys.argv[1:])\n"
            "print('torch' in sys.modules)\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == str(imports_torch)


SEEDS = [p.read_text() for p in sorted(EXAMPLES.glob("*.attn"))]
ALPHABET = "pattern let where heads on grid seq import ( ) { } [ ] , ; = => | & - ~ @ . .. + * // % ** < <= == q k h _ 0 7 N \n#\""


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SEEDS), st.integers(0, 400), st.integers(0, 20), st.text(alphabet=ALPHABET, max_size=12))
def test_mutated_sources_never_raise_anything_but_attn_error(seed, pos, cut, insert):
    pos = pos % (len(seed) + 1)
    src = seed[:pos] + insert + seed[pos + cut:]
    try:
        prog = attnc.loads(src)
    except attnc.AttnError as e:
        first = str(e).splitlines()[0]
        assert first.startswith("<string>:") and ": error: " in first
        return
    for name in prog.names():
        try:
            prog.pattern(name)
        except attnc.AttnError:
            pass


def test_quickstart_example_runs(capsys):
    import runpy
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    assert capsys.readouterr().out.strip().endswith("OK")
