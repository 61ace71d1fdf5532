"""Files: imports (cycles, missing, unreadable targets, errors inside imported
files) give located diagnostics, and a `.attn` file is never executed as
Python: hostile names and strings parse as data, nothing reaches eval / exec /
compile, and the canonical IR text holds only identifiers and tokens the
compiler produced or checked."""

import builtins
import re

import pytest

import attnc
from attnc.elab_primitives import FUNCTIONS, PRIMITIVES


def load_err(path) -> str:
    with pytest.raises(attnc.AttnError) as info:
        attnc.load(path)
    return str(info.value)


def test_import_cycles_are_diagnostics(tmp_path):
    (tmp_path / "self.attn").write_text('import "self.attn"\npattern s = full\n')
    (tmp_path / "a.attn").write_text('import "b.attn"\npattern a = causal\n')
    (tmp_path / "b.attn").write_text('\nimport "c.attn"\npattern b = full\n')
    (tmp_path / "c.attn").write_text('import "a.attn"\npattern c = none\n')
    err = load_err(tmp_path / "self.attn")
    assert "self.attn:1:1: error: import cycle:" in err
    err = load_err(tmp_path / "a.attn")
    head = err.splitlines()[0]
    assert ": error: import cycle: " in head and all(f"{n}.attn" in head for n in "abc"), err
    assert '    import "' in err  # the import line under the message


def test_diamond_imports_are_not_cycles(tmp_path):
    (tmp_path / "base.attn").write_text("let W = 4\n")
    (tmp_path / "l.attn").write_text('import "base.attn"\npattern l = sliding(W)\n')
    (tmp_path / "r.attn").write_text('import "base.attn"\npattern r = sink(W)\n')
    (tmp_path / "top.attn").write_text('import "l.attn"\nimport "r.attn"\npattern t = l | r\n')
    want = attnc.loads("pattern t = sliding(4) | sink(4)").pattern().mask(8)
    assert bool((attnc.load(tmp_path / "top.attn").pattern("t").mask(8) == want).all())


@pytest.mark.parametrize("target,setup,msg,where", [
    ("missing.attn", None, "file not found", "main.attn:2:1"),
    ("sub.attn", "dir", "is a directory", "main.attn:2:1"),
    ("sub", "dir", "an import names an .attn file", "main.attn:2:1"),
    ("bin.attn", b"\x00\x01pattern", "is a binary file", "main.attn:2:1"),
    ("latin.attn", "pattern p = causal # caf\xe9\n".encode("latin-1"), "is not UTF-8 text", "latin.attn:1:25"),
])
def test_bad_import_targets_are_located(tmp_path, target, setup, msg, where):
    if setup == "dir":
        (tmp_path / target).mkdir()
    elif setup is not None:
        (tmp_path / target).write_bytes(setup)
    (tmp_path / "main.attn").write_text(f'pattern m = full\nimport "{target}"\n')
    err = load_err(tmp_path / "main.attn")
    assert f"{where}: error: " in err and msg in err, err


def test_errors_inside_an_imported_file_point_into_that_file(tmp_path):
    (tmp_path / "lib.attn").write_text("let ok = 3\npattern bad = sliding(\n")
    (tmp_path / "main.attn").write_text('import "lib.attn"\npattern m = full\n')
    err = load_err(tmp_path / "main.attn")
    assert "lib.attn:2:" in err and "unexpected end of file" in err, err
    assert "    pattern bad = sliding(" in err  # the imported file's own line


HOSTILE = r'''# os.system("touch PWNED_comment") \ " ' """ \n
# __import__('os').system('touch PWNED_comment2')
import "PWNED_import\"); __import__('os').system('touch PWNED_x')  #"
let __import__ = 3
let system = __import__ + 1
pattern eval(exec = 2, __class__ = {0, 1}, __builtins__ = 1) on seq(exec) + grid(os, PWNED_axis) =
    sliding(exec + system) | global(__class__) | where q.os - k.PWNED_axis < exec + __builtins__
pattern __init__(__dict__: segments) = causal & same(__dict__)
'''


def test_hostile_names_and_strings_are_data_not_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    for name in ("eval", "exec", "compile"):
        real = getattr(builtins, name)

        def spy(src, *a, _real=real, **kw):
            if "PWNED" in str(src):
                seen.append(str(src))
            return _real(src, *a, **kw)
        monkeypatch.setattr(builtins, name, spy)
    # strings have no escapes: the import line is a syntax error, nothing runs
    with pytest.raises(attnc.AttnError, match=r"hostile\.attn:3:\d+: error: unexpected"):
        (tmp_path / "hostile.attn").write_text(HOSTILE)
        attnc.load(tmp_path / "hostile.attn")
    src = HOSTILE.replace(HOSTILE.splitlines()[2], "")  # without the import: it compiles
    prog = attnc.loads(src, file="hostile.attn")
    pat = prog.pattern("eval", exec=3)
    text = pat.text()
    mask = pat.mask(3 + 16, grid=(4, 4), heads=2)
    assert mask.shape == (2, 19, 19)
    dyn = prog.pattern("__init__")
    assert "same(__dict__)" in dyn.text()
    assert not seen, seen
    assert not list(tmp_path.glob("PWNED*"))
    # canonical IR text: no quotes, backslashes, comments or line breaks; every
    # identifier is compiler vocabulary or a name the parser accepted as NAME
    for t in (text, dyn.text()):
        assert re.fullmatch(r"[A-Za-z0-9_ ().,{}|&~@<>=!+\-*/%:;]+", t), t
        names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", t))
        declared = {"eval", "exec", "__class__", "__builtins__", "os", "PWNED_axis", "__init__", "__dict__"}
        vocabulary = set(PRIMITIVES) | set(FUNCTIONS) | {"pattern", "on", "seq", "grid", "where", "heads", "in", "and",
                                                         "or", "not", "true", "false", "dilation", "stride", "causal",
                                                         "shift", "halo", "seed", "block", "size", "q", "k", "h",
                                                         "M", "N", "H", "segments", "blocks", "step"}
        assert names <= declared | vocabulary, names - declared - vocabulary
    assert "system" not in text and "__import__" not in text  # lets are inlined as values


@pytest.mark.parametrize("src", [
    'pattern p = causal # """; import os; os.system("x")\n',
    "pattern p = causal # \\\n",
    "pattern p = causal # \r\n",
    "pattern p = causal # \u2028 still a comment\n",
    'let s = "a string"\npattern p = causal\n',
    "pattern p = __import__('os')\n",
    "pattern p = causal; import os\n",
    "pattern p = [x for x in ()]\n",
    "pattern p = lambda: 0\n",
    'pattern p = causal\n"""\n',
])
def test_python_shaped_text_is_a_diagnostic_or_inert(src):
    try:
        prog = attnc.loads(src, file="x.attn")
    except attnc.AttnError as err:
        assert str(err).startswith("x.attn:")
        return
    assert prog.pattern("p").mask(4).shape == (1, 4, 4)
