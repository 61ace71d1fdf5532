"""Decoding: a few new queries per sequence against a KV cache, visiting only the keys they may see.

input:  a bound pattern, q [B, Hq, m, D] (the last m positions of each sequence), a KV cache
        (contiguous [B, Hkv, S, D], paged [pages, Hkv, page_size, D] + block_table, or one
        [B, S_g, D] tensor per key/value head with the absolute position of every slot, as
        `attnc.nn.KVCache` keeps after eviction), per-sequence lengths `cache_seqlens`.
output: out [B, Hq, m, Dv] (and lse [B, Hq, m]).
does not: plan tiles (no work proportional to the cache length: the closed form answers which
        keys a query position sees), generate the Triton decode kernel (the pipeline's decode
        passes do: codegen/pipeline.py, `compile_decode`), or differentiate (inference; use
        the op to train).

[Note: decode] Per sequence, the pattern's interval sets for its m query rows at (M = m,
N = length) give each row's allowed keys exactly (intervals.IntervalAnalysis, O(m) plus the
pattern's size). Their union, merged, is a handful of key segments: a sliding window with
sinks is two. Each segment is read in place from the cache (a view of a contiguous cache,
its pages of a paged one, a searchsorted range of a position-tagged one), scores are masked
by the rows' own intervals, and one softmax runs over the concatenated segments. Patterns
without interval sets (`where`, `random`, ...) fall back to the reference rows of the m
queries (O(m * length) booleans, no plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnc import ir_text


@dataclass(frozen=True)
class _Cache:
    """One batch element's keys for one key/value head: storage (views where possible) and
    the absolute position of each slot (None: slot i is position i); paged storage is the
    page pool of this head with the sequence's page numbers."""

    k: Tensor  # [S, D], or the page pool [pages, page_size, D]
    v: Tensor
    pos: Tensor | None  # int64 [S], ascending; -1 = empty slot
    pages: Tensor | None = None  # int64 [pages of the sequence] (paged storage)

    @property
    def dv(self) -> int:
        return self.v.shape[-1]

    def segment(self, a: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """(keys, values, their positions) of the stored positions in [a, e): views of a
        contiguous cache, the covering pages of a paged one (only those are copied)."""
        if self.pages is not None:
            P = self.k.shape[1]
            p0, p1 = a // P, -(-e // P)
            ids = self.pages[p0:p1]
            k = self.k[ids].reshape(-1, self.k.shape[-1])[a - p0 * P: e - p0 * P]
            v = self.v[ids].reshape(-1, self.v.shape[-1])[a - p0 * P: e - p0 * P]
            return k, v, torch.arange(a, e, device=k.device)
        s0, s1, keypos = _slots(self, a, e)
        return self.k[s0:s1], self.v[s0:s1], keypos


def _expected(what: str, got, hint: str) -> ValueError:
    return ValueError(f"{what}; got {got}; try {hint}")


def check_decode_args(pat, q, k_cache, v_cache, cache_seqlens, block_table, key_positions):
    """Validate shapes (expected / got / try); returns (B, Hq, Hkv, m, D, Dv, lengths[B] list, layout)."""
    if pat.ir.layout.axes:
        raise ValueError(f"decode: expected a pattern on a sequence, got '{pat.name}' on {pat.ir.layout}; "
                         f"try the op pat(q, k, v, grid=...) for grids")
    if pat.ir.inputs or pat.has_topk():
        raise ValueError(f"decode: pattern '{pat.name}' has run-time inputs or topk; decoding supports static "
                         f"patterns (with score terms); try the op pat(q, k, v, ...) on the whole sequence")
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise _expected("decode: q must be [B, Hq, m, D]", getattr(q, "shape", type(q).__name__), "q[:, :, -1:] for one token")
    B, Hq, m, D = q.shape
    if isinstance(k_cache, (list, tuple)):
        layout = "per-head"
        Hkv = len(k_cache)
        if not isinstance(v_cache, (list, tuple)) or len(v_cache) != Hkv or not Hkv:
            raise _expected("decode: per-head caches need one k and one v tensor per key/value head",
                            f"{Hkv} k and {len(v_cache) if isinstance(v_cache, (list, tuple)) else type(v_cache).__name__} v",
                            "k_cache=[k0, k1], v_cache=[v0, v1] with key_positions=[p0, p1]")
        if not isinstance(key_positions, (list, tuple)) or len(key_positions) != Hkv:
            raise _expected("decode: per-head caches need key_positions, one [S_g] (or [B, S_g]) tensor per head",
                            type(key_positions).__name__, "key_positions=[p0, p1]")
        for g in range(Hkv):
            kg, vg, pg = k_cache[g], v_cache[g], key_positions[g]
            if kg.dim() != 3 or kg.shape[0] != B or kg.shape[2] != D or vg.shape[:2] != kg.shape[:2]:
                raise _expected(f"decode: k_cache[{g}] / v_cache[{g}] must be [B, S_g, D] = [{B}, S_g, {D}]",
                                f"{tuple(kg.shape)} / {tuple(vg.shape)}", "the layout attnc.nn.KVCache keeps")
            if pg.shape[-1] != kg.shape[1] or pg.dim() not in (1, 2):
                raise _expected(f"decode: key_positions[{g}] must be [S_g] or [B, S_g] with S_g = {kg.shape[1]}",
                                tuple(pg.shape), "one absolute position per slot, -1 for empty slots")
        Dv = v_cache[0].shape[-1]
        S = max(int(kg.shape[1]) for kg in k_cache)
    elif block_table is not None:
        layout = "paged"
        if k_cache.dim() != 4 or v_cache.dim() != 4 or k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != D:
            raise _expected(f"decode: paged caches must be [pages, Hkv, page_size, D] (HND pages) with D = {D}",
                            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}", "k_cache.view(pages, Hkv, page_size, D)")
        Hkv, P = k_cache.shape[1], k_cache.shape[2]
        if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype.is_floating_point:
            raise _expected(f"decode: block_table must be an integer tensor [B, max_pages] with B = {B}",
                            f"{block_table.dtype} {tuple(block_table.shape)}", "block_table.int()")
        Dv = v_cache.shape[-1]
        S = block_table.shape[1] * P
    else:
        layout = "contiguous"
        if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D or v_cache.shape[:3] != k_cache.shape[:3]:
            raise _expected(f"decode: k_cache / v_cache must be [B, Hkv, S, D] with B = {B}, D = {D}",
                            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}", "caches laid out like k in pat(q, k, v)")
        Hkv, S, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    if Hq % Hkv:
        raise _expected(f"decode: Hq must be a multiple of Hkv (GQA), Hq = {Hq}", f"Hkv = {Hkv}", "matching head counts")
    if cache_seqlens is None:
        if layout != "contiguous":
            raise _expected(f"decode: a {layout} cache needs cache_seqlens [B]", None, "cache_seqlens=torch.tensor([...])")
        lengths = [S] * B
    else:
        t = torch.as_tensor(cache_seqlens)
        if t.dim() != 1 or t.shape[0] != B or t.dtype.is_floating_point:
            raise _expected(f"decode: cache_seqlens must be an integer tensor [B] = [{B}]",
                            f"{t.dtype} {tuple(t.shape)}", "torch.tensor(lengths)")
        lengths = [int(x) for x in t.tolist()]
    for b, L in enumerate(lengths):
        if L < m or (layout != "per-head" and L > S):
            bound = f"in [m, S] = [{m}, {S}]" if layout != "per-head" else f"at least m = {m}"
            raise _expected(f"decode: cache_seqlens[{b}] must be {bound} (the cache holds the new tokens too)", L,
                            "append the new keys to the cache before attending")
    if pat.ir.tables and len(set(lengths)) > 1:
        shapes = {pat.table_shapes(*_sizes(pat, m, L)[:1], L, Hq, None).__repr__() for L in set(lengths)}
        if len(shapes) > 1:
            raise _expected("decode: the score term's tables change shape with the length, so a ragged batch has no "
                            "one table", f"lengths {sorted(set(lengths))}", "decoding sequences of equal length together")
    return B, Hq, Hkv, m, D, Dv, lengths, layout


def _sizes(pat, m: int, L: int) -> tuple[int, int]:
    """(M, first query row) at which a sequence of length L evaluates its newest m rows: the
    op's last m rows of the whole sequence (M = N = L). A pattern that never reads M gives the
    same rows at (m, L), which is cheaper to lower."""
    if "M" in ir_text.reads_sizes(pat.ir):
        return L, L - m
    return m, 0


def _rows(pat, m: int, L: int, H: int):
    """(lo, hi) int64 [Hx, m, R]: the newest m rows' allowed key intervals (see `_sizes`), or
    None when the pattern has no interval form (then the reference rows)."""
    from attnc.interval_sets import NotIntervals, merge
    from attnc.intervals import IntervalAnalysis
    from attnc.reference import top_view

    Mq, row0 = _sizes(pat, m, L)
    try:
        view = top_view(pat.ir, Mq, L, H, None, {}, rows=(row0, row0 + m))
        iset = merge(IntervalAnalysis(pat.ir).eval(pat.ir.body, view))
    except NotIntervals:
        return None
    return iset.lo, iset.hi


def _segments(lo: Tensor, hi: Tensor, L: int) -> list[tuple[int, int]]:
    """The merged union of every row's intervals: [(a, e)] ascending."""
    pairs = sorted({(int(a), int(e)) for a, e in zip(lo.reshape(-1).tolist(), hi.reshape(-1).tolist()) if a < e})
    out: list[list[int]] = []
    for a, e in pairs:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([a, e])
    return [(a, min(e, L)) for a, e in out if a < L]


DECODE_BACKENDS = ("auto", "torch", "triton")


def decode(pat, q: Tensor, k_cache, v_cache, *, cache_seqlens=None, block_table=None, key_positions=None,
           scale: float | None = None, return_lse: bool = False, backend: str = "auto", **tables):
    """`BoundPattern.decode` (see [Note: decode]); backend "triton" runs the split-KV kernel
    (codegen/decode_kernel.py), "auto" does on CUDA when it can."""
    B, Hq, Hkv, m, D, Dv, lengths, layout = check_decode_args(pat, q, k_cache, v_cache, cache_seqlens, block_table,
                                                              key_positions)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"decode: backend expected one of {', '.join(map(repr, DECODE_BACKENDS))}, got {backend!r}")
    if backend != "torch":
        reason = _triton_reason(pat, q, layout, Dv, D)
        if reason is None and (backend == "triton" or q.is_cuda):
            out, lse = decode_triton(pat, q, k_cache, v_cache, block_table, lengths, scale, tables)
            return (out, lse) if return_lse else out
        if backend == "triton":
            raise ValueError(f"decode: backend='triton' cannot run this call: {reason}; try backend='torch'")
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(B, Hq, m, Dv)
    lse = torch.full((B, Hq, m), float("-inf"), dtype=acc, device=q.device)
    pat.check_input_names(tables, tables=True)
    tabs: dict = {}  # the tables in acc, converted once per call after their first check
    for b, L in enumerate(lengths):
        rows = _rows(pat, m, L, Hq)
        Mq, row0 = _sizes(pat, m, L)
        dense = pat.mask_rows(Mq, L, Hq, None, row0, row0 + m) if rows is None else None  # [H | 1, m, L]
        score = None
        if pat.ir.score is not None:
            from attnc.codegen.score import score_fn
            from .validate import check_tables
            check_tables(pat, tables, Mq, L, Hq, None, q.device)
            tabs = tabs or {n: t.detach().to(device=q.device, dtype=acc) for n, t in tables.items()}
            score = (score_fn(pat.ir, Mq, L, Hq, None), row0)
        for g in range(Hkv):
            heads = slice(g * G, (g + 1) * G)
            cache = _cache_of(layout, k_cache, v_cache, block_table, key_positions, b, g, L)
            if rows is None:
                allowed = dense[heads] if dense.shape[0] > 1 else dense
                o, l = _attend_dense(q[b, heads].to(acc), cache, allowed, L, scale, score, tabs, heads, m, acc)
            else:
                lo, hi = rows
                lo_g, hi_g = (lo[heads], hi[heads]) if lo.shape[0] > 1 else (lo, hi)
                o, l = _attend_segments(q[b, heads].to(acc), cache, lo_g, hi_g, L, scale, score, tabs, heads, m, acc)
            out[b, heads] = o.to(out.dtype)
            lse[b, heads] = l
    return (out, lse) if return_lse else out


def _cache_of(layout, k_cache, v_cache, block_table, key_positions, b: int, g: int, L: int) -> _Cache:
    if layout == "contiguous":
        pos = None
        if key_positions is not None:
            p = torch.as_tensor(key_positions)
            pos = p[b] if p.dim() == 2 else p
        return _Cache(k_cache[b, g], v_cache[b, g], pos)
    if layout == "paged":
        P = k_cache.shape[2]
        return _Cache(k_cache[:, g], v_cache[:, g], None, block_table[b, : -(-L // P)].long())
    p = key_positions[g]
    return _Cache(k_cache[g][b], v_cache[g][b], _searchable((p[b] if p.dim() == 2 else p).long(), g))


def _searchable(pos: Tensor, g: int) -> Tensor:
    """Positions as `_slots` searches them: ascending, empty slots (-1) sorting outside every
    segment -- before the valid ones as they are, after them as a large number."""
    if pos.numel() < 2 or bool((pos[1:] >= pos[:-1]).all()):
        return pos
    big = torch.where(pos < 0, torch.iinfo(torch.int64).max, pos)
    if bool((big[1:] >= big[:-1]).all()):
        return big
    raise _expected(f"decode: key_positions[{g}] must be ascending, with empty slots (-1) only at the start or the end",
                    pos[:8].tolist(), "the layout attnc.nn.KVCache keeps (sorted positions)")


def _slots(cache: _Cache, a: int, e: int) -> tuple[int, int, Tensor]:
    """Storage slots [s0, s1) holding positions [a, e), and those positions."""
    if cache.pos is None:
        s1 = min(e, cache.k.shape[0])
        return a, s1, torch.arange(a, s1, device=cache.k.device)
    pos = cache.pos
    s0 = int(torch.searchsorted(pos, torch.tensor(a, device=pos.device)))
    s1 = int(torch.searchsorted(pos, torch.tensor(e, device=pos.device)))
    return s0, s1, pos[s0:s1]


def _apply(s: Tensor, allowed: Tensor | None, keypos: Tensor, score, tables, heads: slice, m: int, acc):
    """The logits of one segment: [G, m, len], score term and mask applied (`tables` already
    in `acc` on s's device)."""
    if score is not None:
        fn, row0 = score
        h = torch.arange(heads.start, heads.stop, device=s.device).view(-1, 1, 1)
        rows = (torch.arange(m, device=s.device) + row0).view(1, -1, 1)
        s = fn(s, rows, keypos.view(1, 1, -1).clamp(min=0), h, tables)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _softmax_out(parts, values, acc):
    s = torch.cat(parts, dim=-1)  # [G, m, K]
    mx = s.amax(-1, keepdim=True)
    empty = torch.isinf(mx)
    mx = mx.masked_fill(empty, 0.0)
    p = torch.exp(s - mx)
    l = p.sum(-1, keepdim=True)
    o = None
    start = 0
    for v in values:
        n = v.shape[0]
        term = p[..., start:start + n] @ v.to(acc)
        o = term if o is None else o + term
        start += n
    l_safe = l.masked_fill(l == 0, 1.0)
    o = o / l_safe
    lse = (mx + torch.log(l_safe)).masked_fill(l == 0, float("-inf"))
    return o, lse[..., 0]


def _attend_segments(qh, cache: _Cache, lo, hi, L, scale, score, tables, heads, m, acc):
    """qh [G, m, D]; lo / hi [1 | G, m, R] intervals of the rows."""
    G = qh.shape[0]
    parts, values = [], []
    for a, e in _segments(lo, hi, L):
        kseg, vseg, keypos = cache.segment(a, e)
        if keypos.numel() == 0:
            continue
        s = (qh @ kseg.to(acc).transpose(-1, -2)) * scale  # [G, m, len]
        kp = keypos.view(1, 1, 1, -1)
        inside = ((kp >= lo[..., None]) & (kp < hi[..., None])).any(-2)  # [1|G, m, len]
        allowed = None if bool(inside.all()) and cache.pos is None else inside & (keypos >= 0).view(1, 1, -1)
        parts.append(_apply(s, allowed, keypos, score, tables, heads, m, acc))
        values.append(vseg)
    if not parts:
        return torch.zeros(G, m, cache.dv, dtype=acc, device=qh.device), \
            torch.full((G, m), float("-inf"), dtype=acc, device=qh.device)
    return _softmax_out(parts, values, acc)


def _attend_dense(qh, cache: _Cache, allowed_rows, L, scale, score, tables, heads, m, acc):
    """Patterns without interval sets: the reference rows of the m queries, every cached key."""
    kseg, vseg, keypos = cache.segment(0, L)
    if keypos.numel() == 0:
        return torch.zeros(qh.shape[0], m, cache.dv, dtype=acc, device=qh.device), \
            torch.full((qh.shape[0], m), float("-inf"), dtype=acc, device=qh.device)
    s = (qh @ kseg.to(acc).transpose(-1, -2)) * scale
    valid = keypos >= 0
    allowed = allowed_rows.to(qh.device)[..., keypos.clamp(min=0)] & valid.view(1, 1, -1)
    return _softmax_out([_apply(s, allowed, keypos, score, tables, heads, m, acc)], [vseg], acc)


# ----------------------------------------------------------------------------- the split-KV kernel


def _triton_reason(pat, q: Tensor, layout: str, Dv: int, D: int) -> str | None:
    """None when the split-KV kernel can decode this call, else why not."""
    from .triton_backend import device_reason

    reason = device_reason(q, D, Dv)
    if reason:
        return reason.removesuffix("; try backend='torch'").removesuffix(": try backend='torch'")
    if layout == "per-head":
        return "per-head caches (attnc.nn.KVCache after eviction) are read by the torch path"
    return None


BLOCK_N = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _tile_list(pat, m: int, L: int, H: int) -> list[int]:
    """The key tiles (BLOCK_N keys) that hold an allowed key of one of the m rows, ascending."""
    rows = _rows(pat, m, L, H)
    if rows is None:
        return list(range(-(-L // BLOCK_N)))
    tiles: set[int] = set()
    for a, e in _segments(rows[0], rows[1], L):
        tiles.update(range(a // BLOCK_N, (e - 1) // BLOCK_N + 1))
    return sorted(tiles)


def decode_triton(pat, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table, lengths: list[int], scale: float,
                   tables: dict | None = None):
    from attnc.codegen.kernels import KernelConfig
    from attnc.codegen.pipeline import Shape, cache, compile_decode
    from .triton_backend import device_capability

    B, Hq, m, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[-1]
    device = q.device
    groups: dict[str, tuple[object, list[int]]] = {}  # module text -> (the pipeline's output, batch elements)
    tables = dict(tables or {})
    pat.check_input_names(tables, tables=True)
    score_tables = []
    config = KernelConfig(block_m=16, block_n=BLOCK_N)  # the decode kernel's key tile (rows: the GQA group)
    for b, L in enumerate(lengths):
        Mq = _sizes(pat, m, L)[0]
        # the decode passes (codegen/pipeline.py): lower, decode; the module is loaded per text below
        built = compile_decode(pat.ir, Shape.of(pat.ir, Mq, L, Hq, None, config), sources=pat.program.sources)
        if pat.ir.score is not None:
            from .validate import check_tables
            check_tables(pat, tables, Mq, L, Hq, None, q.device)
        groups.setdefault(built.source, (built, []))[1].append(b)
    if pat.ir.score is not None:
        score_tables = [t.detach().to(device=device, dtype=torch.float32).contiguous().view(-1)
                        for t in (tables[spec.name] for spec in pat.ir.tables)]
    tiles = [_tile_list(pat, m, L, Hq) for L in lengths]
    n_tiles = max(1, max(len(t) for t in tiles))
    table = torch.full((B, n_tiles), -1, dtype=torch.int32)
    for b, t in enumerate(tiles):
        table[b, :len(t)] = torch.tensor(t, dtype=torch.int32)
    nsplit = max(1, min(n_tiles, 16, -(-256 // max(1, B * Hkv))))
    per_split = -(-n_tiles // nsplit)
    out_s = torch.zeros(B, Hq, m, nsplit, Dv, dtype=torch.float32, device=device)
    lse_s = torch.full((B, Hq, m, nsplit), float("-inf"), dtype=torch.float32, device=device)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    table = table.to(device)
    paged = block_table is not None
    bt = block_table.to(device=device, dtype=torch.int32).contiguous() if paged else lens
    page_size = k_cache.shape[2] if paged else 1
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for built, members in groups.values():
        module = cache(built, device_capability(device)).module  # the pipeline's cache pass
        statics = [t.data.to(device, torch.int32).contiguous() for t in built.lowered.tables]
        sel = torch.tensor(members, device=device)
        # one launch per group of sequences whose lengths give the same module text
        sub = (lambda x: x) if len(members) == B else (lambda x: x.index_select(0, sel))
        qs = sub(q)
        ks = k_cache if paged else sub(k_cache)
        vs = v_cache if paged else sub(v_cache)
        o = torch.zeros(len(members), Hq, m, nsplit, Dv, dtype=torch.float32, device=device)
        ls = torch.full((len(members), Hq, m, nsplit), float("-inf"), dtype=torch.float32, device=device)
        module._decode_split[(len(members) * Hkv, nsplit)](
            qs, ks, vs, o, ls, scale, sub(lens), sub(table).contiguous(), sub(bt).contiguous() if paged else bt,
            *qs.stride(), *ks.stride(), *vs.stride(),
            n_tiles, per_split, bt.shape[-1] if paged else 0, page_size, *statics, *score_tables,
            HQ=Hq, HKV=Hkv, MQ=m, M_IS_N=_sizes(pat, m, m + 1)[0] != m, NSPLIT=nsplit, D=D, DV=Dv, BLOCK_R=max(16, _next_pow2((Hq // Hkv) * m)),
            BLOCK_N=BLOCK_N, BLOCK_D=max(16, _next_pow2(D)), BLOCK_DV=max(16, _next_pow2(Dv)), PAGED=paged,
            DOT_PRECISION=precision, num_warps=4)
        out_s[sel], lse_s[sel] = o, ls
    lse = torch.logsumexp(lse_s, dim=-1)  # -inf where every split is empty
    w = torch.exp(lse_s - lse[..., None]).nan_to_num(0.0)
    out = (w[..., None] * out_s).sum(-2)
    return out.to(q.dtype), lse
