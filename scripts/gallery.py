"""Draw every pattern of examples/ into docs/gallery/<name>.png and write docs/gallery.md.

Each picture holds the block map (fraction of allowed pairs per 128 x 128 tile, one
panel per distinct head), a token-level zoom of the diagonal and, on grids, the keys of
the centre query drawn on the grid. Beside it the page gives the exact density and the
simulator's h100 figures (tile_bound, predicted_speedup) at the size stated.

    python scripts/gallery.py                    # every pattern (about a minute on 2 cores)
    python scripts/gallery.py --only swin moa    # redraw a few pictures (the page is left alone)
    python scripts/gallery.py --no-png           # the page only

The sizes are small on purpose (a few thousand tokens); every parameter that differs
from the example's default is listed on the page.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
TILE = (128, 128)
HEAD_DIM = 128
GPU = "h100"


@dataclass(frozen=True)
class Entry:
    file: str  # examples/<file>.attn
    name: str  # pattern name
    seq_len: int | None = None
    grid: tuple[int, ...] | None = None
    heads: int = 1
    params: dict = field(default_factory=dict)
    inputs: Callable[[int], dict] | None = None  # N -> one batch element's inputs: doc [N], sel [H, nqb, kmax]
    note: str = ""
    # (pat, M, N, H, head, inputs) -> (title, image): a custom picture of one query's keys
    query_view: Callable | None = None


def _packed_docs(N: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(N // 16, N // 3, (32,), generator=gen)
    return {"doc": torch.repeat_interleave(torch.arange(32), lengths)[:N]}


def _biformer_routing(N: int, region: int = 64, topk: int = 4) -> dict:
    """BiFormer's routing on seeded random queries and keys: region means, top-k regions."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(N, 32, generator=gen)
    k = torch.randn(N, 32, generator=gen)
    qr = q.view(-1, region, 32).mean(1)
    kr = k.view(-1, region, 32).mean(1)
    sel = (qr @ kr.T).topk(topk, dim=-1).indices
    return {"sel": sel[None]}


def _region_major(Hi: int, Wi: int, r: int) -> torch.Tensor:
    """[Hi, Wi] -> position of each pixel when tokens are laid out region by region."""
    pos = torch.arange(Hi * Wi).view(Hi // r, Wi // r, r, r)  # region row, region col, row, col
    return pos.permute(0, 2, 1, 3).reshape(Hi, Wi)


def _biformer_view(pat, M, N, H, head, inputs):
    """The keys of the centre pixel, put back on the 56 x 56 image."""
    pos = _region_major(56, 56, 8)
    q = int(pos[28, 28])
    row = pat.mask_rows(M, N, H, None, q, q + 1, inputs)[head, 0].float()
    return "keys of pixel (28, 28) on the image", row[pos]


SEQ = 8192
IMG = (56, 56)  # a 224 x 224 image at patch 4 (Swin / CrossFormer / BiFormer stage 1)
VID = (8, 32, 32)

ENTRIES = [
    Entry("mistral", "mistral", SEQ, params={"window": 1024}),
    Entry("streaming_llm", "streaming_llm", SEQ),
    Entry("longformer", "longformer", SEQ),
    Entry("bigbird", "bigbird", SEQ),
    Entry("sparse_transformer", "sparse_strided", SEQ),
    Entry("sparse_transformer", "sparse_fixed", SEQ),
    Entry("duo", "duo", SEQ, heads=12),
    Entry("moa", "moa", SEQ, heads=8),
    Entry("prefix_lm", "prefix_lm", SEQ, params={"n": 2048}),
    Entry("packed", "packed", SEQ, inputs=_packed_docs, note="32 documents of seeded random lengths"),
    Entry("natten1d", "natten1d", SEQ, params={"size": 511}),
    Entry("nsa_like", "nsa_like", SEQ, note="topk's blocks are chosen from q and k inside the op: no static picture"),
    Entry("biformer", "biformer", IMG[0] * IMG[1], inputs=_biformer_routing, query_view=_biformer_view,
          note="56 x 56 image laid out region by region (49 regions of 8 x 8); routing (top-4) from seeded random q, k"),
    Entry("natten2d", "natten2d", grid=IMG),
    Entry("dinat", "dinat", grid=IMG),
    Entry("swin", "swin", grid=IMG),
    Entry("swin_shifted", "swin_shifted", grid=IMG),
    Entry("halo", "halo", grid=IMG),
    Entry("maxvit_block", "maxvit_block", grid=IMG),
    Entry("maxvit_grid", "maxvit_grid", grid=IMG),
    Entry("cswin", "cswin", grid=IMG, heads=4),
    Entry("axial", "axial_row", grid=IMG),
    Entry("axial", "axial_col", grid=IMG),
    Entry("crossformer", "crossformer_sda", grid=IMG),
    Entry("crossformer", "crossformer_lda", grid=IMG),
    Entry("hilo", "hilo", grid=IMG, heads=10),
    Entry("mmdit", "mmdit", grid=(64, 64), params={"text": 256}),
    Entry("natten3d", "natten3d", grid=VID),
    Entry("gna_strided", "gna_strided", grid=(16, 32, 32), params={"size": (8, 12, 12), "stride": (4, 4, 4)},
          note="window and stride scaled down from the paper's 18x24x24 / 16x8x8 to fit the small volume"),
    Entry("gna_blocked", "gna_blocked", grid=(16, 32, 32), params={"size": (8, 8, 8)}),
    Entry("video", "video", grid=VID, params={"frames": 4}),
    Entry("alibi", "alibi", SEQ, params={"window": 1024}, note="the mask only: the score term (linear bias) changes weights, not tiles"),
    Entry("alibi", "alibi_slopes", SEQ, params={"window": 1024}, note="the mask only: the score term (linear bias) changes weights, not tiles"),
    Entry("gemma2", "gemma2_local", SEQ, params={"window": 1024}, note="the mask only: soft-capping changes weights, not tiles"),
    Entry("nat_rpb", "nat_rpb", grid=IMG, note="the mask only: the relative position bias changes weights, not tiles"),
    Entry("swin_rpb", "swin_rpb", grid=IMG, note="the mask only: the relative position bias changes weights, not tiles"),
]


@dataclass
class Row:
    entry: Entry
    text: str  # canonical IR text of the bound pattern
    size: str
    density: float | None = None
    tile_bound: float | None = None
    predicted_speedup: float | None = None
    why_no_sim: str = ""
    png: str | None = None


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def _mosaic(frames: torch.Tensor, per_row: int = 4) -> torch.Tensor:
    """[T, H, W] -> one image with the frames left to right, top to bottom, 1-pixel gaps."""
    T, H, W = frames.shape
    rows = math.ceil(T / per_row)
    out = torch.full((rows * (H + 1) - 1, min(T, per_row) * (W + 1) - 1), 0.15)
    for t in range(T):
        r, c = divmod(t, per_row)
        out[r * (H + 1): r * (H + 1) + H, c * (W + 1): c * (W + 1) + W] = frames[t]
    return out


def _query_view(pat, M, N, H, grid, head, inputs):
    """The keys of the centre grid query, drawn on the grid (None on 1-D layouts)."""
    if not grid:
        return None
    text = N - math.prod(grid)
    centre = tuple(s // 2 for s in grid)
    q = text + sum(c * math.prod(grid[i + 1:]) for i, c in enumerate(centre))
    row = pat.mask_rows(M, N, H, grid, q, q + 1, inputs)[head, 0, text:].float().view(grid)
    where = "(" + ", ".join(map(str, centre)) + ")"
    if len(grid) == 3:
        return f"keys of query {where}, frame by frame", _mosaic(row)
    extra = f" + {text} text keys" if text else ""
    return f"keys of query {where}{extra}", row


def render(entry: Entry, out_dir: Path | None) -> Row:
    """Bind, measure and (when out_dir is given) draw one entry."""
    import attnc
    from attnc.show import head_groups, render_png
    from attnc.tilestats import tile_stats

    pat = attnc.load(EXAMPLES / f"{entry.file}.attn").pattern(entry.name, **entry.params)
    if entry.grid:
        M, N, H, grid = pat.resolve_sizes(1, None, entry.heads, entry.grid)
        M = N
        size = f"grid {'x'.join(map(str, entry.grid))} (N = {N}), heads {H}"
    else:
        M, N, H, grid = pat.resolve_sizes(entry.seq_len, entry.seq_len, entry.heads, None)
        size = f"N = {N}, heads {H}"
    row = Row(entry, pat.text(), size)
    if any(type(n).__name__ == "TopK" for n in _nodes(pat.ir)):
        row.why_no_sim = "needs q and k (topk)"
        return row
    inputs = entry.inputs(N) if entry.inputs else {}
    if inputs:
        # the plan is built from the pattern's structure; run-time inputs are not part of it
        row.why_no_sim = "needs run-time inputs (" + ", ".join(inputs) + ")"
    else:
        rep = pat.simulate(M, N, heads=H, head_dim=HEAD_DIM, grid=grid, tile=TILE, gpu=GPU)
        row.tile_bound, row.predicted_speedup = rep.tile_bound, rep.predicted_speedup
    stats, rows = tile_stats(lambda lo, hi: pat.mask_rows(M, N, H, grid, lo, hi, inputs), M, N, H, TILE)
    row.density = stats.density()
    if out_dir is None:
        return row
    groups = head_groups(stats, rows)
    zq, zk = min(M, 128), min(N, 128)
    q0 = (M - zq) // 2
    k0 = max(0, min(N - zk, q0 + (N - M)))
    head = groups[0][0]
    token_view = pat.mask_rows(M, N, H, grid, q0, q0 + zq, inputs)[head, :, k0:k0 + zk].float()
    path = out_dir / f"{entry.name}.png"
    view = entry.query_view(pat, M, N, H, head, inputs) if entry.query_view else _query_view(pat, M, N, H, grid, head, inputs)
    render_png(str(path), pat, stats, groups, token_view, view)
    row.png = path.name
    return row


def _nodes(node):
    """Every IR node below `node` (dataclass fields that are nodes or tuples of nodes)."""
    import dataclasses

    yield node
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            v = getattr(node, f.name)
            for x in (v if isinstance(v, tuple) else (v,)):
                if dataclasses.is_dataclass(x):
                    yield from _nodes(x)


def markdown(rows: list[Row]) -> str:
    out = [
        "# Pattern gallery",
        "",
        "Every pattern in `examples/`, drawn by `scripts/gallery.py` (regenerate with",
        "`python scripts/gallery.py`). Sizes are small so the script runs in about a minute:",
        f"1-D patterns at N = {SEQ}, images at {IMG[0]} x {IMG[1]} tokens, videos at",
        f"{' x '.join(map(str, VID))} or 16 x 32 x 32. Parameters are the example's defaults unless listed.",
        "",
        f"Each picture: the block map (fraction of allowed pairs in every {TILE[0]} x {TILE[1]} tile on a",
        "square-root colour scale, one panel per group of identical heads, at most four), a 128 x 128",
        "token-level zoom on the diagonal (first head shown) and, on grids, the keys of the centre",
        "query drawn on the grid (videos: one small image per frame, in order).",
        "",
        "`density` is exact (allowed pairs / all pairs). `tile_bound` and `predicted_speedup` come",
        f"from `pat.simulate(..., tile={TILE}, head_dim={HEAD_DIM}, gpu=\"{GPU}\")`: the FLOP bound",
        "of a kernel that skips empty tiles, and the roofline model's forward speedup over dense",
        "FlashAttention (docs/analysis.md, section 'The simulator', explains the model and its limits). At these small sizes",
        "the speedups are far below what the same patterns reach at production lengths.",
        "",
        "Reading the numbers: density and tile_bound can disagree wildly. Strided patterns",
        "(sparse_strided, sparse_fixed, dinat, maxvit_grid, crossformer_lda, axial_col) keep a few",
        "keys in almost every 128 x 128 tile of the flattened sequence, so a kernel that skips",
        "empty tiles gains at most ~2x however low the density is; local windows on the same",
        "grid (swin, natten2d, crossformer_sda) skip most tiles. Reordering tokens so that a",
        "group is contiguous (as MaxViT and CrossFormer do with a reshape) is what turns density",
        "into speed for the strided ones.",
        "",
        "| pattern | file | size | parameters | density | tile_bound | predicted_speedup |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(x, fmt):
        return "—" if x is None else format(x, fmt)

    for r in rows:
        e = r.entry
        sim = (num(r.tile_bound, ".2f") + "x", num(r.predicted_speedup, ".2f") + "x") if r.tile_bound else (r.why_no_sim, "—")
        out.append(f"| [{e.name}](#{e.name}) | `examples/{e.file}.attn` | {r.size} | {_params_text(e.params)} | "
                   f"{num(r.density, '.4f')} | {sim[0]} | {sim[1]} |")
    for r in rows:
        e = r.entry
        out += ["", f"## {e.name}", "", "```", r.text, "```", ""]
        facts = [r.size, f"parameters: {_params_text(e.params)}"]
        if r.density is not None:
            facts.append(f"density {r.density:.4f}")
        if r.tile_bound is not None:
            facts.append(f"tile_bound {r.tile_bound:.2f}x, predicted_speedup {r.predicted_speedup:.2f}x ({GPU})")
        elif r.why_no_sim:
            facts.append(f"not simulated: {r.why_no_sim}")
        out.append("; ".join(facts) + ".")
        if e.note:
            out += ["", e.note[0].upper() + e.note[1:] + "."]
        if r.png:
            out += ["", f"![{e.name}](gallery/{r.png})"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only redraw these pictures; docs/gallery.md is not rewritten")
    ap.add_argument("--no-png", action="store_true", help="skip the pictures")
    ap.add_argument("--out", type=Path, default=DOCS, help="docs folder (default: docs/)")
    args = ap.parse_args(argv)
    entries = [e for e in ENTRIES if not args.only or e.name in args.only]
    if args.only and len(entries) != len(set(args.only)):
        known = {e.name for e in ENTRIES}
        print(f"gallery: unknown pattern(s): {', '.join(sorted(set(args.only) - known))}", file=sys.stderr)
        return 2
    out_dir = None if args.no_png else args.out / "gallery"
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for e in entries:
        rows.append(render(e, out_dir))
        existing = args.out / "gallery" / f"{e.name}.png"
        if out_dir is None and rows[-1].density is not None and existing.is_file():
            rows[-1].png = existing.name  # --no-png: keep linking the picture drawn earlier
        print(f"{e.name:18s} {rows[-1].size:40s} density {rows[-1].density if rows[-1].density is not None else '—'}")
    wrote = []
    if not args.only:
        (args.out / "gallery.md").write_text(markdown(rows))
        wrote.append(str(args.out / "gallery.md"))
    if out_dir:
        wrote.append(f"{len([r for r in rows if r.png])} pictures in {out_dir}")
    print("wrote " + (" and ".join(wrote) or "nothing"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
