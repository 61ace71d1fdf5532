"""Security: imports read only .attn files inside the allowed folder trees and
never echo other files; the kernel cache trusts only entries the current user
owns and nobody else can write (codegen/cache.py)."""

import io
import os
import stat
from pathlib import Path

import pytest

import attnc
from attnc.cli import main


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


SECRET = "xyzzy:CONTENT-LINE:0:0\n"


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """tmp/proj/{main.attn, sub/}, tmp/outside/{lib.attn, secret}, a symlink to the secret."""
    monkeypatch.delenv("ATTNC_PATH", raising=False)
    proj, outside = tmp_path / "proj", tmp_path / "outside"
    (proj / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "lib.attn").write_text("pattern o = causal\n")
    (outside / "secret").write_text(SECRET)
    (outside / "secret.txt.attn").symlink_to(outside / "secret")
    (proj / "sub" / "w.attn").write_text('import "../base.attn"\npattern w = sliding(W)\n')
    (proj / "base.attn").write_text("let W = 3\n")
    monkeypatch.chdir(proj)
    return proj, outside


def _err(path, **kw) -> str:
    with pytest.raises(attnc.AttnError) as info:
        attnc.load(path, **kw)
    return str(info.value)


@pytest.mark.parametrize("target,msg", [
    ("{outside}/secret", "an import names an .attn file"),
    ("/etc/shadow", "an import names an .attn file"),
    ("/etc/passwd", "an import names an .attn file"),
    ("{outside}/lib.attn", "outside the folders imports may read"),
    ("../outside/lib.attn", "outside the folders imports may read"),
    ("link.attn", "which is not an .attn file"),            # a symlink named .attn to a non-.attn file
    ("{outside}/secret.txt.attn", "which is not an .attn file"),
])
def test_imports_are_confined_and_never_echo_other_files(tree, target, msg):
    proj, outside = tree
    (proj / "link.attn").symlink_to(outside / "secret")
    target = target.format(outside=outside)
    (proj / "main.attn").write_text(f'import "{target}"\npattern m = causal\n')
    err = _err(proj / "main.attn")
    assert "main.attn:1:1: error: " in err and msg in err, err
    assert "xyzzy" not in err and "CONTENT" not in err


def test_search_path_opens_a_folder_explicitly(tree, monkeypatch):
    proj, outside = tree
    (proj / "main.attn").write_text('import "lib.attn"\npattern m = o | sliding(2)\n')
    assert "file not found" in _err(proj / "main.attn")
    assert attnc.load(proj / "main.attn", search_path=[outside]).names() == ["m"]
    assert attnc.loads('import "lib.attn"\npattern m = o', search_path=[str(outside)]).names() == ["m"]
    monkeypatch.setenv("ATTNC_PATH", f"/nonexistent{os.pathsep}{outside}")
    assert attnc.load(proj / "main.attn").names() == ["m"]
    monkeypatch.delenv("ATTNC_PATH")
    assert run("check", proj / "main.attn")[0] == 1
    code, out, err = run("check", "-I", outside, proj / "main.attn")
    assert code == 0 and "ok (1 pattern: m)" in out, err
    # a search folder does not open its parents: still only .attn files inside it
    (proj / "esc.attn").write_text('import "../secret"\npattern m = causal\n')
    assert "an import names an .attn file" in _err(proj / "esc.attn", search_path=[outside / "x"])


def test_nested_imports_stay_inside_the_root_tree(tree):
    proj, _ = tree
    (proj / "main.attn").write_text('import "sub/w.attn"\npattern m = w\n')
    assert attnc.load(proj / "main.attn").pattern("m").mask(8)[0, 7].sum() == 3  # sub/w.attn imports ../base.attn


def test_symlink_loops_are_diagnostics(tree):
    proj, _ = tree
    (proj / "loop.attn").symlink_to(proj / "loop.attn")
    (proj / "main.attn").write_text('import "loop.attn"\npattern m = causal\n')
    assert "symbolic link loop" in _err(proj / "main.attn")
    code, out, err = run("check", proj / "loop.attn")
    assert code == 1 and "Traceback" not in err and "loop.attn" in err


def test_a_non_attn_file_given_by_name_is_not_echoed(tree):
    _, outside = tree
    err = _err(outside / "secret")
    assert "is not an .attn source" in err and "xyzzy" not in err and "CONTENT" not in err
    code, out, err = run("check", outside / "secret")
    assert code == 1 and "xyzzy" not in err + out and "CONTENT" not in err + out
