"""The torch path's schedule: a tile plan turned into key ranges, read as strided views.

input:  a tile plan, the mask bits of its partial tiles (schedules.partial_tile_masks), the
        call's sizes and the torch path's `TorchPathConfig`.
output: a `Schedule` (`build_schedule`), or one cut down to some tiles (`restrict`).
does not: plan, compute mask bits, cache (schedules.py) or compute attention (torch_backend.py).

[Note: schedule] Work is split into *units*: a unit is one query tile and the heads that
share its key tiles -- every query head of every key/value head when all heads have one
plan (shared; GQA heads of one key/value head then share one key block), one head
otherwise. A unit's visited key tiles, in key order, form runs of consecutive tiles; each
run is one *key range* of tokens, trimmed at both ends to the first and last column any
row allows (a 4-token sink reads 4 keys, not a 64-key tile), and cut into pieces of at
most `max_group_keys` keys, counted from the range's start. Ranges shorter than
`VIEW_MIN` keys are packed together into one gathered piece (the scattered tiles of a
dilated or block-sparse pattern stay one group, as one gather, not one group per tile).

Units of one head are sorted by their pieces' lengths and cut into chunks of alike units
(a unit whose starts would break the chunk's even steps starts a new chunk); piece j of
every unit of a chunk is one `Group`, widened to the chunk's longest (the extra columns
are masked). A group's keys are rows [start, start + length) of the padded k / v per
unit. When those starts step evenly across the chunk (a sliding window: one tile per
unit; a causal prefix: the same start), the key block is a strided *view* of k / v --
nothing is copied -- and with one start it is one matrix shared by the chunk, so the
chunk's queries form one large matmul. Other groups are gathered. Only the columns some
row masks carry mask bits (`Group.masks`, spans of columns): a window's two triangular
ends, a causal diagonal; bits equal for every unit are kept once and broadcast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from attnc.plans import Plan

from .backend import Call
from .tile_choice import CONFIG, TorchPathConfig

#: column spans of a group closer than this are masked as one span (a masked_fill over a
#: few allowed columns costs less than one more call)
SPAN_GAP = 32
#: key ranges shorter than this are packed with their unit's other short ranges into one
#: gathered piece (a view saves a copy only when the range is long enough to matter)
VIEW_MIN = 128


@dataclass(frozen=True)
class Group:
    """Piece j of every unit of a chunk: `length` keys per unit (see [Note: schedule])."""

    starts: torch.Tensor  # int64 [c]: first key row per unit in its head's padded rows, + kv head * Np (per-head)
    start: int  # starts[0]
    length: int
    #: starts[u] == start + u * step for every u (step >= 0): the keys are a strided view of
    #: k / v; None: they are gathered (`rows` when given, else starts + arange(length))
    step: int | None
    #: the key positions (score terms): int64 [c], column 0's per unit (columns follow on), or
    #: int64 [c, length], every column's (packed short ranges)
    keys: torch.Tensor
    #: ((col0, col1, blocked: bool [c or 1, 1, bm, col1 - col0], bias), ...): columns a row may
    #: not attend, and the same as a float32 bias (-inf where blocked, else 0: adding it is
    #: ~8x faster than masked_fill_ on CPU); every column outside the spans is allowed on every row
    masks: tuple
    #: int64 [c, length]: explicit key rows (packed short ranges, restricted schedules); starts unused
    rows: torch.Tensor | None = None

    @property
    def view(self) -> bool:
        return self.rows is None and self.step is not None

    def take(self, units) -> "Group":
        """The group of some of its units: a slice keeps evenly stepped starts a view (the
        backward's parts of a chunk), an index tensor does not (restricted schedules)."""
        starts = self.starts[units].contiguous()
        return dataclasses.replace(
            self, starts=starts, start=int(starts[0]), keys=self.keys[units].contiguous(),
            step=self.step if isinstance(units, slice) else None,
            masks=tuple((c0, c1, *(t[units].contiguous() if t.shape[0] > 1 else t for t in m)) for c0, c1, *m in self.masks),
            rows=None if self.rows is None else self.rows[units].contiguous())

    def to(self, device) -> "Group":
        """The group's tables on `device`."""
        return dataclasses.replace(self, starts=self.starts.to(device), keys=self.keys.to(device),
                                   masks=tuple((c0, c1, *(t.to(device) for t in m)) for c0, c1, *m in self.masks),
                                   rows=None if self.rows is None else self.rows.to(device))

    def allowed(self, c: int, bm: int) -> torch.Tensor:
        """bool [c, 1, bm, length]: which (row, column) pairs the group computes."""
        out = torch.ones(c, 1, bm, self.length, dtype=torch.bool, device=self.starts.device)
        for c0, c1, blocked, _ in self.masks:
            out[..., c0:c1] = ~blocked
        return out


@dataclass(frozen=True)
class Chunk:
    q: torch.Tensor  # int64 [c] flat query-tile index per unit
    groups: tuple[Group, ...]


@dataclass(frozen=True, eq=False)
class Schedule:
    """A plan as key ranges for the torch path (see [Note: schedule])."""

    block: tuple[int, int]
    shared: bool  # one plan for every head: a unit holds every head (X = Hkv, G' = Hq // Hkv)
    nq: int
    nk: int
    chunks: tuple[Chunk, ...]
    #: a restricted schedule ([Note: restricted schedules]): the global tile index of each local
    #: query / key tile; None: local tile i is global tile i
    q_tiles: torch.Tensor | None = None
    k_tiles: torch.Tensor | None = None
    #: N-D tiles: the padded tile-major order (codegen/ndtiles.TileLayout) q / k / v are
    #: gathered into and out / lse / gradients scattered back from ([Note: N-D tiles here])
    layout: object | None = None


# ----------------------------------------------------------------------------- one unit's key ranges


def _pieces(full: list, part: list, cols: list, bits: torch.Tensor, bn: int, N: int, most: int) -> list:
    """A unit's key pieces: [(segments [(start, stop)], masked [(column in the piece, bits
    [bm, width] of a partial tile's keys in it)])], in key order.

    `full` / `part` are the unit's full and partial key tiles, `cols[p]` the first and last
    column partial tile p allows on some row (None: none), `bits[p]` its bits. A range of at
    least `VIEW_MIN` keys is a piece of one segment (cut every `most` keys): a view candidate;
    shorter ranges are packed together into pieces of at most `most` keys, gathered (a
    dilated or block-random pattern's scattered tiles stay one group, not one per tile)."""
    kind = dict.fromkeys(full)
    for p, t in enumerate(part):
        if cols[p] is not None:  # a partial tile no row of this unit may attend is not visited
            kind[t] = p
    runs: list[list[int]] = []
    for t in sorted(kind):
        if runs and runs[-1][-1] == t - 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    out: list = []
    packed: list = []  # the open piece of short ranges: [segments, masked, length]
    for run in runs:
        first, last = kind[run[0]], kind[run[-1]]
        start = run[0] * bn + (0 if first is None else cols[first][0])
        stop = min(N, run[-1] * bn + (bn if last is None else cols[last][-1] + 1))
        masked = [(t * bn, bits[kind[t]]) for t in run if kind[t] is not None]
        if stop - start >= VIEW_MIN:
            for a in range(start, stop, most):
                b = min(stop, a + most)
                out.append(([(a, b)], _clip(masked, a, b, 0, bn)))
            continue
        if not packed or packed[2] + stop - start > most:
            packed = [[], [], 0]
            out.append((packed[0], packed[1]))
        packed[1].extend(_clip(masked, start, stop, packed[2], bn))
        packed[0].append((start, stop))
        packed[2] += stop - start
    return out


def _clip(masked: list, a: int, b: int, at: int, bn: int) -> list:
    """Partial tiles [(first key, bits [bm, bn])] cut to keys [a, b), placed in a piece
    whose column `at` is key a: [(column, bits [bm, width])]."""
    out = []
    for t0, m in masked:
        x0, x1 = max(t0, a), min(t0 + bn, b)
        if x0 < x1:
            out.append((at + x0 - a, m[:, x0 - t0: x1 - t0]))
    return out


def _length(piece) -> int:
    return sum(b - a for a, b in piece[0])


# ----------------------------------------------------------------------------- chunks and groups


def build_schedule(call: Call, plan: Plan, masks: torch.Tensor, config: TorchPathConfig = CONFIG,
                   layout=None) -> Schedule:
    """Turn a plan and its partial-tile masks into key ranges (pure function). With N-D
    tiles (`layout`) keys are rows of the padded tile-major order (its padding is masked
    in the partial tiles, codegen/ndtiles.TileLayout.kernel_plan)."""
    bm, bn = plan.block
    nq, nk = plan.shape
    N = call.N if layout is None else layout.N
    Np = nk * bn
    G = call.Hq // call.Hkv
    Hx = masks.shape[0]  # 1: one plan and one set of bits for every head
    shared = Hx == 1
    fcnt, fidx = (t.long().expand(Hx, *t.shape[1:]).tolist() for t in (plan.full.counts, plan.full.index))
    pcnt, pidx = (t.long().expand(Hx, *t.shape[1:]).tolist() for t in (plan.partial.counts, plan.partial.index))
    colany = masks.any(-2)  # [Hx, nq, P, bn]: the columns of each partial tile some row allows
    ar = torch.arange(bn)
    first = torch.where(colany, ar, bn).amin(-1).tolist()
    last = torch.where(colany, ar, -1).amax(-1).tolist()

    units = []  # (sort key, h, i, pieces)
    for h in range(Hx):
        for i in range(nq):
            full, part = fidx[h][i][: fcnt[h][i]], pidx[h][i][: pcnt[h][i]]
            if not full and not part:
                continue  # a query tile with no key tile keeps out 0, lse -inf
            cols = [(first[h][i][p], last[h][i][p]) if last[h][i][p] >= 0 else None for p in range(len(part))]
            pieces = _pieces(full, part, cols, masks[h, i], bn, N, config.max_group_keys)
            if pieces:
                units.append(((len(pieces), h, tuple(_length(p) for p in pieces), i), h, i, pieces))
    units.sort(key=lambda u: u[0])

    heads_per_unit = call.Hq if shared else 1
    chunks = []
    pos = 0
    while pos < len(units):
        # grow the chunk over units of one head with as many pieces (their starts may step
        # evenly: views) while its score blocks stay within budget
        n, head = len(units[pos][3]), units[pos][1]
        widths = [_length(p) for p in units[pos][3]]
        steps = None  # the pieces' start steps while every piece's starts step evenly (views)
        end = pos + 1
        while end < len(units) and len(units[end][3]) == n and units[end][1] == head:
            w = [max(x, _length(p)) for x, p in zip(widths, units[end][3])]
            if (end + 1 - pos) * heads_per_unit * bm * max(w) > config.chunk_elements:
                break
            step = _step(units[end - 1], units[end])
            if end == pos + 1:
                if step is None and end + 1 < len(units) and _step(units[end], units[end + 1]) is not None:
                    break  # the next units step evenly: leave this one alone, they start a chunk of views
                steps = step or False
            elif steps and step != steps:
                break  # a unit out of step would turn the chunk's views into gathers
            widths, end = w, end + 1
        members = units[pos:end]
        pos = end
        qidx = torch.tensor([i if shared else h * nq + i for _, h, i, _ in members], dtype=torch.int64)
        base = [0 if shared else (h // G) * Np for _, h, _, _ in members]
        groups = tuple(_group([u[3][j] for u in members], base, widths[j], Np, bm) for j in range(n))
        chunks.append(Chunk(q=qidx, groups=groups))
    return Schedule(block=(bm, bn), shared=shared, nq=nq, nk=nk, chunks=tuple(chunks), layout=layout)


def _step(u, v) -> list | None:
    """The steps between the starts of unit u's and unit v's pieces, None if they cannot
    be a view (another head, another number of pieces, a step back)."""
    if u[1] != v[1] or len(u[3]) != len(v[3]):
        return None
    if any(len(p[0]) > 1 for p in u[3] + v[3]):
        return None  # packed short ranges are gathered
    step = [b[0][0][0] - a[0][0][0] for a, b in zip(u[3], v[3])]
    return step if min(step) >= 0 else None


def _group(pieces: list, base: list, L: int, Np: int, bm: int) -> Group:
    """One group from every unit's piece (segments, masked tiles), `L` keys each. Pieces of
    one segment are widened inside their head's rows (a view when their starts step
    evenly); if some unit's piece packs several segments, every unit's keys are listed
    (gathered) and padded with masked columns."""
    c = len(pieces)
    one = all(len(segs) == 1 for segs, _ in pieces)
    n = [_length(p) for p in pieces]
    if one:
        starts = [min(segs[0][0], Np - L) for segs, _ in pieces]  # widen to L keys inside the head's rows
        off = [segs[0][0] - st for (segs, _), st in zip(pieces, starts)]  # the piece's column 0 in the group
    else:
        off = [0] * c
    # columns to mask per unit: the widening or padding, and partial tiles
    spans = []
    for (_, masked), o, m_ in zip(pieces, off, n):
        if o > 0:
            spans.append((0, o))
        if o + m_ < L:
            spans.append((o + m_, L))
        spans.extend((o + col, o + col + m.shape[1]) for col, m in masked)
    merged: list[list[int]] = []
    for c0, c1 in sorted(spans):
        if merged and c0 <= merged[-1][1] + SPAN_GAP:
            merged[-1][1] = max(merged[-1][1], c1)
        else:
            merged.append([c0, c1])
    masks = []
    for c0, c1 in merged:
        ok = torch.zeros(c, bm, c1 - c0, dtype=torch.bool)
        for u, ((_, masked), o, m_) in enumerate(zip(pieces, off, n)):
            lo, hi = max(c0, o), min(c1, o + m_)
            if lo < hi:
                ok[u, :, lo - c0: hi - c0] = True  # inside the unit's keys: allowed unless a partial tile says no
            for col, m in masked:
                x0, x1 = max(lo, o + col), min(hi, o + col + m.shape[1])
                if x0 < x1:
                    ok[u, :, x0 - c0: x1 - c0] = m[:, x0 - o - col: x1 - o - col]
        blocked = ~ok
        if c > 1 and bool((blocked == blocked[:1]).all()):
            blocked = blocked[:1]
        blocked = blocked[:, None].contiguous()
        masks.append((c0, c1, blocked, torch.zeros(blocked.shape).masked_fill_(blocked, float("-inf"))))
    if one:
        rows = [st + b for st, b in zip(starts, base)]
        steps = {rows[u + 1] - rows[u] for u in range(c - 1)}
        step = 0 if c == 1 else (steps.pop() if len(steps) == 1 and min(steps) >= 0 else None)
        return Group(starts=torch.tensor(rows, dtype=torch.int64), start=rows[0], length=L, step=step,
                     keys=torch.tensor(starts, dtype=torch.int64), masks=tuple(masks))
    keys = torch.empty(c, L, dtype=torch.int64)
    for u, (segs, _) in enumerate(pieces):
        pos = torch.cat([torch.arange(a, b) for a, b in segs])
        keys[u, : pos.numel()] = pos
        keys[u, pos.numel():] = segs[0][0]  # padding columns (masked) read the first key
    rows = keys + torch.tensor(base, dtype=torch.int64)[:, None]
    return Group(starts=rows[:, 0].contiguous(), start=int(rows[0, 0]), length=L, step=None, keys=keys,
                 masks=tuple(masks), rows=rows)


# ----------------------------------------------------------------------------- restricted schedules


def restrict(sched: Schedule, q_tiles, k_tiles) -> Schedule:
    """The part of `sched` that computes query tiles `q_tiles` (ascending global tile
    indices) against the key tiles `k_tiles` gathered for them: int64 [C, nk], one row
    when every key/value head gathered the same tiles (C = 1), else row x for key/value
    head x, padded with -1 (every key tile those queries visit must be there).

    [Note: restricted schedules] Context parallelism (runtime/distributed.py) runs one
    rank's query tiles against the key tiles it gathered from other ranks. The global
    schedule is cut down to the units of those query tiles, and its key ranges become
    explicit rows of the local keys (local query tile j = global tile q_tiles[j]; local
    key tile j of head x = global tile k_tiles[x or 0, j]); the global key positions are
    kept so that score terms see them. Masks and groups are the global schedule's, so
    every local row is computed exactly as in one process. Masked columns whose tile was
    not gathered point at local key 0."""
    q_tiles = torch.as_tensor(q_tiles, dtype=torch.int64)
    k_tiles = torch.as_tensor(k_tiles, dtype=torch.int64)
    k_tiles = k_tiles[None] if k_tiles.dim() == 1 else k_tiles
    if sched.q_tiles is not None or sched.layout is not None:
        raise ValueError("restrict: expected a global schedule of 1-D tiles, got a restricted or N-D one")
    C, nk = k_tiles.shape
    if sched.shared and C > 1:  # a unit gathers one key block for every head: one tile list
        raise ValueError("restrict: a schedule shared by all heads needs one key-tile list, got one per head")
    bn = sched.block[1]
    Np = sched.nk * bn
    nq = q_tiles.numel()
    q_local = torch.full((sched.nq,), -1, dtype=torch.int64)
    q_local[q_tiles] = torch.arange(nq)
    k_local = torch.zeros(C, sched.nk, dtype=torch.int64)  # tiles not gathered: masked columns only
    for c in range(C):
        real = k_tiles[c] >= 0
        k_local[c, k_tiles[c][real]] = torch.arange(nk)[real]
    chunks = []
    for chunk in sched.chunks:
        head, tile = chunk.q // sched.nq, chunk.q % sched.nq
        keep = (q_local[tile] >= 0).nonzero().flatten()
        if keep.numel() == 0:
            continue
        groups = []
        for g in chunk.groups:
            g = g.take(keep)
            x = g.starts // Np  # the key/value head of a per-head unit (0 when shared)
            pos = g.keys if g.keys.dim() == 2 else g.keys[:, None] + torch.arange(g.length)  # global key positions
            local = k_local[x[:, None] if C > 1 else 0, pos // bn] * bn + pos % bn + (x * nk * bn)[:, None]
            groups.append(dataclasses.replace(g, rows=local.contiguous()))
        chunks.append(Chunk(q=(head[keep] * nq + q_local[tile[keep]]).contiguous(), groups=tuple(groups)))
    return Schedule(block=sched.block, shared=sched.shared, nq=nq, nk=nk, chunks=tuple(chunks),
                    q_tiles=q_tiles, k_tiles=k_tiles.clamp(min=0))
