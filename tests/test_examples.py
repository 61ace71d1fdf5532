"""Every example of the spec (§7), bound and compared with a reference written
from the original paper's definition (tests/paper_refs.py), not from attnc."""

import numpy as np
import pytest
import torch

import attnc
import paper_refs as ref
from conftest import EXAMPLES


def load(name, **params):
    return attnc.load(EXAMPLES / f"{name}.attn").pattern(name, **params)


def same(got: torch.Tensor, want: np.ndarray):
    want = torch.as_tensor(np.asarray(want, dtype=bool))
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = (got != want).nonzero()
    assert len(diff) == 0, f"{len(diff)} mismatches, first at {diff[0].tolist()}"


@pytest.mark.parametrize("M,N,w", [(37, 37, 5), (125, 125, 16), (20, 45, 7), (45, 20, 3)])
def test_mistral(M, N, w):
    same(load("mistral", window=w).mask(M, N)[0], ref.sliding_window(M, N, w))


@pytest.mark.parametrize("M,N,s,r", [(37, 37, 4, 9), (125, 125, 1, 30), (30, 61, 3, 11)])
def test_streaming_llm(M, N, s, r):
    same(load("streaming_llm", sinks=s, recent=r).mask(M, N)[0], ref.streaming_llm(M, N, s, r))


@pytest.mark.parametrize("M,N", [(37, 37), (50, 125)])
def test_duo(M, N):
    got = attnc.loads("""
        pattern duo(retrieval = {0, 5, 9}, recent = 6, sinks = 2) = heads {
            retrieval => causal; _ => sliding(recent) | (sink(sinks) & causal) }
    """).pattern("duo").mask(M, N, heads=12)
    same(got, ref.duo(12, M, N, {0, 5, 9}, recent=6, sinks=2))
    # the shipped file, with its own constants
    same(load("duo").mask(M, N, heads=12), ref.duo(12, M, N, {0, 5, 9}))


@pytest.mark.parametrize("M,N,b,r,seed", [(37, 37, 4, 2, 0), (125, 125, 8, 3, 0), (100, 100, 16, 1, 7), (60, 97, 8, 2, 3)])
def test_bigbird(M, N, b, r, seed):
    got = attnc.loads("pattern bb(b = 8, r = 2, seed = 0) = blockwise(b, band(1, 1) | global({0, N - 1}) | random(r, seed = seed))")
    same(got.pattern("bb", b=b, r=r, seed=seed).mask(M, N)[0], ref.bigbird(M, N, b, r, seed))
    if seed == 0:
        same(load("bigbird", b=b, r=r).mask(M, N)[0], ref.bigbird(M, N, b, r, 0))


@pytest.mark.parametrize("M,N,w,g", [(37, 37, 3, 2), (125, 125, 10, 0), (40, 90, 4, 5)])
def test_longformer(M, N, w, g):
    same(load("longformer", window=w, globals=g).mask(M, N)[0], ref.longformer(M, N, w, g))


@pytest.mark.parametrize("shape,size", [((9, 13), 3), ((11, 7), 4), ((6, 6), 6)])
def test_natten2d(shape, size):
    n = int(np.prod(shape))
    same(load("natten2d", size=size).mask(n, grid=shape)[0], ref.natten(shape, size))


@pytest.mark.parametrize("shape,size,dil", [((13, 11), 3, 2), ((16, 12), 4, 3), ((9, 9), 3, 3)])
def test_dinat(shape, size, dil):
    n = int(np.prod(shape))
    same(load("dinat", size=size, dilation=dil).mask(n, grid=shape)[0], ref.natten(shape, size, dilation=dil))


@pytest.mark.parametrize("shape,size,stride", [((5, 9, 10), (3, 4, 5), (2, 3, 4)), ((6, 7, 8), (4, 4, 4), (4, 2, 1))])
def test_gna_strided(shape, size, stride):
    n = int(np.prod(shape))
    same(load("gna_strided", size=size, stride=stride).mask(n, grid=shape)[0], ref.natten(shape, size, stride=stride))


def test_gna_strided_defaults_are_the_papers():
    # the paper's 18x24x24 window with 16x8x8 stride on a small video latent: spot-check rows
    shape = (20, 24, 24)
    n = int(np.prod(shape))
    pat = load("gna_strided")
    rows = [0, 5000, n - 1]
    got = torch.cat([pat.mask_rows(n, n, 1, shape, r, r + 1)[0] for r in rows])
    coords = [np.unravel_index(r, shape) for r in rows]
    for i, c in enumerate(coords):
        allowed = np.ones(shape, dtype=bool)
        for ax, (L, x, s, st) in enumerate(zip(shape, c, (18, 24, 24), (16, 8, 8))):
            keys = ref.natten_axis(L, int(x), s, 1, st, False)
            axis_mask = np.zeros(L, dtype=bool)
            axis_mask[list(keys)] = True
            allowed &= axis_mask.reshape([-1 if a == ax else 1 for a in range(3)])
        same(got[i].view(shape), allowed)


@pytest.mark.parametrize("shape,win", [((8, 8), 4), ((12, 6), 3), ((14, 14), 7)])
def test_swin_shifted(shape, win):
    n = int(np.prod(shape))
    same(load("swin_shifted", win=win).mask(n, grid=shape)[0], ref.swin(shape, win, win // 2))


@pytest.mark.parametrize("shape,b,h", [((16, 16), 8, 3), ((13, 10), 4, 1), ((9, 9), 3, 0)])
def test_halo(shape, b, h):
    n = int(np.prod(shape))
    same(load("halo", b=b, halo=h).mask(n, grid=shape)[0], ref.halo(shape, b, h))


@pytest.mark.parametrize("shape,g", [((14, 14), 7), ((12, 8), 4), ((9, 6), 3)])
def test_maxvit_grid(shape, g):
    n = int(np.prod(shape))
    same(load("maxvit_grid", g=g).mask(n, grid=shape)[0], ref.maxvit_grid(shape, g))


@pytest.mark.parametrize("shape,sw,H", [((14, 14), 7, 4), ((12, 9), 3, 6)])
def test_cswin(shape, sw, H):
    n = int(np.prod(shape))
    same(load("cswin", sw=sw).mask(n, grid=shape, heads=H), ref.cswin(H, shape, sw))


@pytest.mark.parametrize("M,N,n", [(37, 37, 10), (125, 125, 0), (30, 80, 60)])
def test_prefix_lm(M, N, n):
    same(load("prefix_lm", n=n).mask(M, N)[0], ref.prefix_lm(M, N, n))


def test_packed():
    gen = torch.Generator().manual_seed(0)
    for n in (37, 125):
        lengths = torch.randint(1, 20, (n,), generator=gen)
        doc = torch.repeat_interleave(torch.arange(n), lengths)[:n]
        same(load("packed").mask(n, doc=doc)[0], ref.packed(doc.tolist()))
    batch = torch.stack([doc, torch.zeros_like(doc)])
    got = load("packed").mask(n, doc=batch)
    assert got.shape == (2, 1, n, n)
    same(got[1, 0], ref.packed([0] * n))


@pytest.mark.parametrize("T,shape,r", [(5, (6, 7), 3), (0, (5, 5), 2), (9, (4, 11), 4)])
def test_mmdit(T, shape, r):
    n = T + int(np.prod(shape))
    same(load("mmdit", r=r, text=T).mask(n, grid=shape)[0], ref.mmdit_local(T, shape, r))


def test_nsa_like_parses_and_types():
    pat = load("nsa_like", k=4)
    assert "topk(k, block=64)" in pat.text()
    with pytest.raises(attnc.AttnError, match="topk"):
        pat.mask(128)


# ----------------------------------------------------------------------------- the rest of the library


def load_from(file, name, **params):
    return attnc.load(EXAMPLES / f"{file}.attn").pattern(name, **params)


@pytest.mark.parametrize("M,N,l", [(37, 37, 6), (125, 125, 11), (30, 70, 8)])
def test_sparse_strided(M, N, l):
    same(load_from("sparse_transformer", "sparse_strided", l=l).mask(M, N)[0], ref.sparse_strided(M, N, l))


@pytest.mark.parametrize("M,N,l,c", [(37, 37, 8, 2), (125, 125, 16, 4), (40, 90, 10, 3), (50, 50, 7, 7)])
def test_sparse_fixed(M, N, l, c):
    same(load_from("sparse_transformer", "sparse_fixed", l=l, c=c).mask(M, N)[0], ref.sparse_fixed(M, N, l, c))


@pytest.mark.parametrize("M,N,H", [(300, 300, 4), (700, 2100, 8), (2100, 2100, 5)])
def test_moa(M, N, H):
    # MoA's elastic rules as written in examples/moa.attn, one per quarter of the heads
    def span(h):
        if h < H // 4:
            return 256
        if h < H // 2:
            return 512 + N // 8
        if h < 3 * H // 4:
            return N // 4
        return 1024 + N // 2
    same(load("moa").mask(M, N, heads=H), ref.moa(M, N, [span(h) for h in range(H)], sinks=64))


@pytest.mark.parametrize("N,size,dil,causal", [(37, 7, 1, False), (125, 8, 3, False), (40, 5, 2, True), (64, 2, 1, True)])
def test_natten1d(N, size, dil, causal):
    got = load("natten1d", size=size, dilation=dil, causal=causal).mask(N)[0]
    same(got, ref.natten((N,), size, dilation=dil, causal=causal))


@pytest.mark.parametrize("shape,size,dil", [((4, 7, 9), (3, 5, 4), (1, 1, 2)), ((6, 6, 6), 3, 2), ((5, 8, 7), (2, 7, 7), 1)])
def test_natten3d(shape, size, dil):
    n = int(np.prod(shape))
    same(load("natten3d", size=size, dilation=dil).mask(n, grid=shape)[0], ref.natten(shape, size, dilation=dil))


@pytest.mark.parametrize("shape,size", [((4, 8, 8), (2, 4, 4)), ((5, 9, 7), (2, 3, 4)), ((6, 6, 9), 3)])
def test_gna_blocked(shape, size):
    n = int(np.prod(shape))
    got = load("gna_blocked", size=size).mask(n, grid=shape)[0]
    same(got, ref.natten(shape, size, stride=size))
    if all(L % s == 0 for L, s in zip(shape, size if isinstance(size, tuple) else (size,) * 3)):
        same(got, ref.swin(shape, size, 0))  # stride == size is plain window attention


@pytest.mark.parametrize("shape,win", [((14, 14), 7), ((8, 12), 4), ((9, 6), 3)])
def test_swin(shape, win):
    n = int(np.prod(shape))
    same(load("swin", win=win).mask(n, grid=shape)[0], ref.swin(shape, win, 0))


@pytest.mark.parametrize("shape,p", [((14, 14), 7), ((8, 12), 4)])
def test_maxvit_block(shape, p):
    n = int(np.prod(shape))
    same(load("maxvit_block", p=p).mask(n, grid=shape)[0], ref.maxvit_block(shape, p))


@pytest.mark.parametrize("shape", [(7, 9), (12, 5)])
def test_axial(shape):
    n = int(np.prod(shape))
    same(load_from("axial", "axial_row").mask(n, grid=shape)[0], ref.axial(shape, axis=1))
    same(load_from("axial", "axial_col").mask(n, grid=shape)[0], ref.axial(shape, axis=0))


@pytest.mark.parametrize("shape,g,i", [((14, 14), 7, 2), ((16, 8), 4, 4), ((12, 18), 3, 6)])
def test_crossformer(shape, g, i):
    n = int(np.prod(shape))
    same(load_from("crossformer", "crossformer_sda", g=g).mask(n, grid=shape)[0], ref.crossformer_sda(shape, g))
    same(load_from("crossformer", "crossformer_lda", i=i).mask(n, grid=shape)[0], ref.crossformer_lda(shape, i))


@pytest.mark.parametrize("shape,s,H", [((8, 8), 2, 10), ((12, 6), 3, 4), ((6, 6), 2, 1)])
def test_hilo(shape, s, H):
    n = int(np.prod(shape))
    got = load("hilo", s=s).mask(n, grid=shape, heads=H)
    same(got, ref.hilo(H, shape, s, int(H * 0.9)))  # the paper's alpha = 0.9, int() as in its code


@pytest.mark.parametrize("shape,size,frames", [((4, 6, 7), 3, 2), ((5, 5, 8), 4, 5), ((3, 7, 7), 7, 1)])
def test_video(shape, size, frames):
    n = int(np.prod(shape))
    same(load("video", size=size, frames=frames).mask(n, grid=shape)[0], ref.video_window(shape, size, frames))


def test_video_defaults_to_every_previous_frame():
    shape = (4, 7, 7)
    n = int(np.prod(shape))
    same(load("video").mask(n, grid=shape)[0], ref.video_window(shape, 7, shape[0]))


@pytest.mark.parametrize("image,region,topk", [((16, 16), (8, 8), 1), ((16, 24), (8, 8), 2), ((24, 24), (8, 8), 4)])
def test_biformer(image, region, topk):
    """2-D regions: the reference routes on the image in its own row-major order; attnc
    sees the tokens region by region (BiFormer's layout) and gets the routed region ids."""
    Hi, Wi = image
    rh, rw = region
    gen = torch.Generator().manual_seed(topk)
    q = torch.randn(Hi, Wi, 8, generator=gen)
    k = torch.randn(Hi, Wi, 8, generator=gen)
    want, routed = ref.biformer(q.numpy(), k.numpy(), region, topk)
    # region-major order: new position p holds pixel perm[p]
    rows = torch.arange(Hi * Wi).view(Hi // rh, rh, Wi // rw, rw).permute(0, 2, 1, 3).reshape(-1)
    sel = torch.as_tensor(routed)[None, None]  # [B=1, H=1, regions, topk]
    got = load("biformer").mask(Hi * Wi, sel=sel)[0, 0]
    same(got, want[np.ix_(rows.numpy(), rows.numpy())])


def test_every_spec_example_has_a_file():
    names = {"mistral", "streaming_llm", "duo", "bigbird", "natten2d", "dinat", "gna_strided", "swin_shifted", "halo",
             "maxvit_grid", "cswin", "prefix_lm", "packed", "nsa_like", "longformer", "mmdit"}
    for name in names:
        prog = attnc.load(EXAMPLES / f"{name}.attn")
        assert prog.names() == [name]
        assert prog.patterns()[0].description, f"{name} has no description comment"


def test_library_patterns_cite_their_paper():
    """Every pattern in examples/ carries a description naming its paper by arXiv id;
    the library holds at least 25 patterns."""
    import re
    count = 0
    for path in sorted(EXAMPLES.glob("*.attn")):
        for info in attnc.load(path).patterns():
            count += 1
            assert re.search(r"arXiv \d{4}\.\d{4,5}", info.description or ""), f"{path.name}:{info.name} cites no arXiv id"
    assert count >= 25, count


def test_golden_ir_of_every_example(golden):
    lines = []
    for path in sorted(EXAMPLES.glob("*.attn")):
        prog = attnc.load(path)
        for name in prog.names():
            lines.append(prog.pattern(name).text())
    golden("examples_ir.txt", "\n".join(lines) + "\n")


def test_golden_parse_dump(golden):
    from attnc.syntax import parse
    src = (EXAMPLES / "mmdit.attn").read_text()
    golden("parse_mmdit.txt", repr(parse(src, "mmdit.attn")) + "\n")
