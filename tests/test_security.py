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


# ----------------------------------------------------------------------------- the kernel cache

from attnc.codegen import cache  # noqa: E402

EVIL = "import pathlib\npathlib.Path(__file__).with_name('PWNED').write_text('x')\nX = 'evil'\n"
GOOD = "X = 'good'\n"


def _plant(root: Path, key: str, source: str) -> Path:
    """A self-consistent entry (valid meta.json and checksum), as an attacker would write it."""
    import hashlib
    import json
    d = root / key[:2] / key
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.py").write_text(source)
    (d / "meta.json").write_text(json.dumps({"key": key, "sha256": hashlib.sha256(source.encode()).hexdigest()}))
    return d


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    root = tmp_path / "kcache"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root))
    monkeypatch.setattr(cache, "_FALLBACK", None, raising=False)
    monkeypatch.setattr(cache, "_WARNED", set(), raising=False)
    return root


def _key(tag):
    return cache.cache_key(f"pattern {tag} = causal", {}, "k", "test")


def test_the_cache_root_and_entries_are_private(cache_env):
    key = _key("private")
    mod = cache.load_module(key, lambda: GOOD)
    assert mod.X == "good"
    for p in (cache_env, cache_env / key[:2], cache_env / key[:2] / key):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for f in ("kernel.py", "meta.json"):
        assert stat.S_IMODE((cache_env / key[:2] / key / f).stat().st_mode) == 0o600


@pytest.mark.parametrize("where", ["root", "prefix", "entry", "kernel.py", "meta.json"])
def test_an_entry_others_can_write_is_not_executed(cache_env, where):
    key = _key(f"writable_{where}")
    cache_env.mkdir(mode=0o700)
    d = _plant(cache_env, key, EVIL)
    for p in (cache_env, d.parent, d, d / "kernel.py", d / "meta.json"):
        p.chmod(0o700 if p.is_dir() else 0o600)
    target = {"root": cache_env, "prefix": d.parent, "entry": d}.get(where, d / where)
    target.chmod(0o777 if target.is_dir() else 0o666)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        mod = cache.load_module(key, lambda: GOOD)
    assert mod.X == "good" and not (d / "PWNED").exists()
    assert (d / "kernel.py").read_text() == EVIL  # left alone; the good kernel lives in the private fallback
    assert cache.fallback_dir() in Path(mod.__file__).parents


def test_an_entry_owned_by_another_user_is_not_executed(cache_env, monkeypatch):
    key = _key("foreign")
    d = _plant(cache_env, key, EVIL)
    for p in (cache_env, d.parent, d):
        p.chmod(0o700)
    real_lstat = os.lstat

    class Foreign:  # what lstat reports for a file another user planted
        def __init__(self, st):
            self.st_mode, self.st_uid = st.st_mode, st.st_uid + 1

    monkeypatch.setattr(cache.os, "lstat", lambda p: Foreign(real_lstat(p)) if str(p).endswith("kernel.py") else real_lstat(p))
    with pytest.warns(RuntimeWarning, match="owned by uid"):
        mod = cache.load_module(key, lambda: GOOD)
    assert mod.X == "good" and not (d / "PWNED").exists()


def test_a_symlinked_entry_is_not_followed(cache_env, tmp_path):
    key = _key("symlink")
    elsewhere = _plant(tmp_path / "attacker", key, EVIL)
    (cache_env / key[:2]).mkdir(parents=True, mode=0o700)
    cache_env.chmod(0o700)
    (cache_env / key[:2] / key).symlink_to(elsewhere)
    with pytest.warns(RuntimeWarning, match="symbolic link"):
        mod = cache.load_module(key, lambda: GOOD)
    assert mod.X == "good" and not (elsewhere / "PWNED").exists()


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_an_unusable_cache_location_falls_back_with_one_warning(cache_env, kind):
    if kind == "file":
        cache_env.write_text("not a folder")
    else:
        cache_env.mkdir(mode=0o500)
        if os.access(cache_env, os.W_OK):  # root writes anyway
            cache_env.chmod(0o700)
            pytest.skip("running as root: every folder is writable")
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = cache.load_module(_key(f"{kind}_a"), lambda: GOOD)
        b = cache.load_module(_key(f"{kind}_b"), lambda: "X = 'b'\n")
    assert a.X == "good" and b.X == "b"
    assert len([w for w in seen if "attnc kernel cache" in str(w.message)]) == 1, [str(w.message) for w in seen]
    cache_env.chmod(0o700) if cache_env.is_dir() else None


def test_an_entry_that_fails_to_import_is_regenerated(cache_env):
    key = _key("broken")
    cache.write_entry(key, "raise ImportError('stale entry')\n")
    with pytest.warns(RuntimeWarning, match="failed to import"):
        mod = cache.load_module(key, lambda: GOOD)
    assert mod.X == "good" and cache.read_entry(key) == GOOD
