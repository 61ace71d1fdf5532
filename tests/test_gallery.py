"""docs/gallery.md and scripts/gallery.py cover every example (cheap: no rendering), and the
script's drawing path works on one small entry."""

import dataclasses
import importlib.util
import re
import sys

import attnc
from conftest import EXAMPLES, ROOT


def gallery_module():
    name = "attnc_gallery_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "gallery.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def example_patterns():
    return {(path.stem, name) for path in EXAMPLES.glob("*.attn") for name in attnc.load(path).names()}


def test_script_covers_every_example():
    g = gallery_module()
    listed = [(e.file, e.name) for e in g.ENTRIES]
    assert len(listed) == len(set(listed))
    assert set(listed) == example_patterns()


def test_page_shows_every_example():
    page = (ROOT / "docs" / "gallery.md").read_text()
    sections = set(re.findall(r"^## (\w+)$", page, flags=re.M))
    assert sections == {name for _, name in example_patterns()}
    for name in sections:
        row = re.search(rf"^\| \[{name}\]\(#{name}\) \|.*$", page, flags=re.M)
        assert row, f"{name} missing from the summary table"
    pictures = re.findall(r"!\[(\w+)\]\(gallery/(\w+\.png)\)", page)
    for name, png in pictures:
        assert (ROOT / "docs" / "gallery" / png).is_file(), png
    # every pattern whose mask can be drawn has a picture (topk needs q and k)
    assert {n for n, _ in pictures} == sections - {"nsa_like"}


def test_render_one_entry(tmp_path):
    g = gallery_module()
    entry = next(e for e in g.ENTRIES if e.name == "swin_shifted")
    small = dataclasses.replace(entry, grid=(14, 14))
    row = g.render(small, tmp_path)
    assert (tmp_path / "swin_shifted.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pat = attnc.load(EXAMPLES / "swin_shifted.attn").pattern()
    want = pat.mask(196, grid=(14, 14)).sum().item() / 196**2
    assert abs(row.density - want) < 1e-12
    rep = pat.simulate(196, grid=(14, 14), tile=g.TILE)
    assert row.tile_bound == rep.tile_bound and row.predicted_speedup == rep.predicted_speedup
    page = g.markdown([row])
    assert "## swin_shifted" in page and "![swin_shifted](gallery/swin_shifted.png)" in page
    assert f"{rep.tile_bound:.2f}x" in page


def test_topk_patterns_are_listed_without_a_picture(tmp_path):
    g = gallery_module()
    entry = next(e for e in g.ENTRIES if e.name == "nsa_like")
    row = g.render(dataclasses.replace(entry, seq_len=256), tmp_path)
    assert row.png is None and row.density is None and "topk" in row.why_no_sim
    assert "not simulated: needs q and k (topk)" in g.markdown([row])
