"""Progress bars ([Note: progress] in attnc/progress.py): silent in library use and under
pipes / --json, on stderr for long CLI work when wanted, never changing stdout."""

import io

import pytest

from attnc import progress
from attnc.cli import main
from conftest import EXAMPLES


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_tasks_are_silent_unless_shown():
    assert list(progress.each(range(3), "nothing")) == [0, 1, 2]
    with progress.task("nothing", 5) as t:
        t.update(2)


def test_shown_tasks_draw_on_their_stream(monkeypatch):
    monkeypatch.setenv("ATTNC_PROGRESS_DELAY", "0")
    err = io.StringIO()
    with progress.shown(err):
        assert list(progress.each(range(4), "counting", unit="tile")) == [0, 1, 2, 3]
    assert "attnc: counting" in err.getvalue() and "0/4" in err.getvalue()
    quiet = io.StringIO()
    with progress.shown(quiet, enabled=False):
        list(progress.each(range(4), "counting"))
    assert quiet.getvalue() == ""


def test_who_wants_progress(monkeypatch):
    monkeypatch.delenv("ATTNC_PROGRESS", raising=False)
    assert progress.wanted(Terminal()) and not progress.wanted(io.StringIO())
    assert not progress.wanted(Terminal(), json_output=True)
    monkeypatch.setenv("ATTNC_PROGRESS", "1")
    assert progress.wanted(io.StringIO()) and not progress.wanted(io.StringIO(), json_output=True)
    monkeypatch.setenv("ATTNC_PROGRESS", "0")
    assert not progress.wanted(Terminal())
    monkeypatch.setenv("ATTNC_PROGRESS", "yes")
    with pytest.raises(ValueError, match="ATTNC_PROGRESS: expected 0 or 1"):
        progress.wanted(Terminal())


SWEEP = ["simulate", str(EXAMPLES / "mistral.attn"), "--sweep", "N=512,1024,2048", "--heads", "2"]


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, out, err)
    return rc, out.getvalue(), err.getvalue()


def test_cli_progress_goes_to_stderr_and_leaves_stdout_alone(monkeypatch):
    monkeypatch.setenv("ATTNC_PROGRESS_DELAY", "0")
    monkeypatch.setenv("ATTNC_PROGRESS", "0")
    rc, plain, err = run(SWEEP)
    assert rc == 0 and err == ""
    monkeypatch.setenv("ATTNC_PROGRESS", "1")
    rc, out, err = run(SWEEP)
    assert rc == 0 and out == plain and "attnc: simulating N = ..." in err
    rc, out, err = run(SWEEP + ["--json"])  # JSON output: never a bar
    assert rc == 0 and err == ""


def test_cli_progress_of_size_probing(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_PROGRESS_DELAY", "0")
    monkeypatch.setenv("ATTNC_PROGRESS", "1")
    rc, out, err = run(["compile", str(EXAMPLES / "streaming_llm.attn"), "-o", str(tmp_path)])
    assert rc == 0 and "attnc: probing sizes" in err and "wrote" in out


def test_cli_rejects_a_bad_progress_setting(monkeypatch):
    monkeypatch.setenv("ATTNC_PROGRESS", "sometimes")
    rc, out, err = run(SWEEP)
    assert rc == 2 and "$ATTNC_PROGRESS: expected 0 or 1, got 'sometimes'" in err and out == ""
    monkeypatch.setenv("ATTNC_PROGRESS", "1")
    monkeypatch.setenv("ATTNC_PROGRESS_DELAY", "soon")
    rc, out, err = run(SWEEP)
    assert rc == 2 and "$ATTNC_PROGRESS_DELAY: expected seconds" in err
