"""The CLI on hostile files: every verb, every kind of bad input, exit 1 or 2
with a message and never a traceback (in process, through main(argv, out, err))."""

import io
import os
import stat
from pathlib import Path

import pytest

from attnc import syntax
from attnc.cli import main

VERBS = [
    ["check"],
    ["list"],
    ["show", "--seq-len", "64"],
    ["simulate", "--seq-len", "64"],
]


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _file(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.attn"
    if kind == "directory":
        p.mkdir()
    elif kind == "binary":
        p.write_bytes(bytes(range(256)) * 4)
    elif kind == "huge":
        p.write_bytes(b"pattern p = causal\n" + b"# padding padding padding\n" * (syntax.MAX_SOURCE_CHARS // 26 + 10))
    elif kind == "latin1":
        p.write_bytes("# caf\xe9\npattern p = causal\n".encode("latin-1"))
    elif kind == "utf16":
        p.write_bytes("pattern p = causal\n".encode("utf-16"))
    elif kind == "truncated-utf8":
        p.write_bytes("pattern p = causal # \u00e9".encode()[:-1])
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "whitespace":
        p.write_bytes(b"\n\n   \t\n# only a comment\n")
    elif kind == "python":
        p.write_text("import os\nos.system('echo hi')\n")
    elif kind == "nul-late":
        p.write_bytes(b"pattern p = causal\n" * 1000 + b"\x00")
    return p


BAD = {
    # kind: (exit codes allowed for check, message)
    "missing": "file not found",
    "directory": "is a directory",
    "binary": "binary file",
    "huge": "is too large",
    "latin1": "is not UTF-8 text (byte 0xe9)",
    "utf16": "binary file",
    "truncated-utf8": "is not UTF-8 text",
    "python": "unexpected",
    "nul-late": "unexpected character '\\x00'",
}


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_give_a_message_not_a_traceback(tmp_path, verb, kind):
    path = _file(tmp_path, kind)
    code, out, err = run(verb[0], path, *verb[1:])
    assert code in (1, 2), (code, out, err)
    assert BAD[kind] in err, err
    assert "Traceback" not in err + out
    assert os.path.basename(path) in err.splitlines()[0]  # FILE:LINE:COL names the file


@pytest.mark.parametrize("kind", ["empty", "whitespace"])
def test_empty_files(tmp_path, kind):
    path = _file(tmp_path, kind)
    assert run("check", path)[:2] == (0, f"{path}: ok (0 patterns: none)\n")
    assert run("list", path)[:2] == (0, "")
    for verb in VERBS[2:]:
        code, out, err = run(verb[0], path, *verb[1:])
        assert code == 1 and "defines 0 patterns" in err and "Traceback" not in err


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
def test_unreadable_file(tmp_path, verb, monkeypatch):
    path = tmp_path / "secret.attn"
    path.write_text("pattern p = causal\n")
    path.chmod(0)
    try:
        readable = os.access(path, os.R_OK)  # root reads anything: then simulate the refusal below
        if not readable:
            code, out, err = run(verb[0], path, *verb[1:])
            assert code == 1 and "permission denied" in err and "Traceback" not in err
        real_open = Path.open

        def refuse(self, *a, **kw):
            if self.name == "secret.attn":
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *a, **kw)
        monkeypatch.setattr(Path, "open", refuse)
        code, out, err = run(verb[0], path, *verb[1:])
        assert code == 1 and "cannot read" in err and "permission denied" in err and "Traceback" not in err
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null"])
def test_device_files_are_refused_without_reading(special):
    if not os.path.exists(special):
        pytest.skip(f"{special} does not exist here")
    code, out, err = run("check", special)
    assert code == 1 and "not a regular file" in err


def test_fifo_is_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.attn"
    os.mkfifo(fifo)
    code, out, err = run("check", fifo)  # opening a FIFO for reading would block forever
    assert code == 1 and "not a regular file" in err


def test_stdin_dash_is_not_a_file_name_we_read(tmp_path, monkeypatch):
    # `-` is not special: with no file of that name, a diagnostic (exit 1), never a hang on stdin
    monkeypatch.chdir(tmp_path)
    code, out, err = run("check", "-")
    assert code == 1 and "file not found: '-'" in err


def test_several_files_each_get_their_verdict(tmp_path):
    good = tmp_path / "good.attn"
    good.write_text("pattern p = causal\n")
    bad = _file(tmp_path, "binary")
    code, out, err = run("check", good, bad, tmp_path / "nope.attn")
    assert code == 1
    assert f"{good}: ok (1 pattern: p)" in out
    assert "binary file" in err and "file not found" in err


@pytest.mark.parametrize("argv", [
    ["show", "{f}", "--seq-len", "-5"],
    ["show", "{f}", "--seq-len", "abc"],
    ["show", "{f}", "--seq-len", "64", "--block", "0"],
    ["show", "{f}", "--seq-len", "64", "--block", "x"],
    ["show", "{f}", "--seq-len", "64", "--set", "w=(("],
    ["show", "{f}", "--seq-len", "64", "--set", "w=" + "9" * 5000],
    ["show", "{f}", "--seq-len", "64", "--heads", "0"],
    ["show", "{f}", "--seq-len", "64", "--width", "2"],
    ["simulate", "{f}", "--seq-len", "64", "--head-dim", "0"],
    ["simulate", "{f}", "--seq-len", "64", "--tile", "0x0"],
    ["simulate", "{f}", "--seq-len", "64", "--gpu", "tpu"],
    ["check", "{f}", "--seq-len", "0"],
    ["check", "{f}", "--grid", "0x0"],
    ["show", "{f}", "--seq-len", "64", "--png", "/nonexistent/dir/x.png"],
])
def test_bad_arguments(tmp_path, argv):
    f = tmp_path / "w.attn"
    f.write_text("pattern p(w = 4) = sliding(w)\n")
    code, out, err = run(*[a.format(f=f) for a in argv])
    assert code in (1, 2), (code, out, err)
    assert err.strip() and "Traceback" not in err
