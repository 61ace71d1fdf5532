"""The test install is complete: a missing core dependency stops the suite, it never skips."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_missing_triton_fails_the_run_at_start(tmp_path):
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    code = ("import sys, pytest; sys.modules['triton'] = None; "  # import triton -> ImportError
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--rootdir', {str(ROOT)!r}, "
            f"'-c', {str(ROOT / 'pyproject.toml')!r}, '--confcutdir', {str(ROOT / 'tests')!r}, "
            f"{str(ROOT / 'tests' / 'conftest.py')!r}, {str(tmp_path / 'test_nothing.py')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 4, run.stdout + run.stderr  # pytest's usage error, not "passed" / "skipped"
    assert "triton is not installed" in run.stdout + run.stderr
    assert "scripts/test.sh" in run.stdout + run.stderr


def test_the_test_extra_installs_triton():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("triton") for req in meta["test"])
    assert "triton" in (ROOT / "scripts" / "test.sh").read_text()


def test_the_test_extra_installs_transformers():
    """tests/test_hf.py imports it at the top: the adapter is tested, never skipped."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("transformers") for req in meta["test"])
