"""The torch path's schedules: tile plans turned into gather tables, with the partial
tiles' mask bits, cached per call configuration.

input:  a validated `Call` (and its run-time inputs), the torch path's `TorchPathConfig`.
output: `Schedule`s per batch slice (`schedules`), 1-D tile plans (`plans`), a schedule cut
        down to some tiles (`restrict`), the mask bits of partial tiles (`partial_tile_masks`).
does not: choose tiles (tile_choice.py) or compute attention (torch_backend.py).

[Note: schedule] A `Schedule` is the plan turned into gather tables, built once
per call configuration (pattern IR, sizes, heads, grid, tile) and cached. Work
is split into *units*: a unit is one query tile and the heads that share its key
tiles -- every query head of every key/value head when all heads have one plan
(Hx = 1; GQA heads of one key/value head then share one gathered key block),
one head otherwise. Units are sorted by their tile counts and cut into chunks
of similar units, so padding is rare. For a chunk, the key / value tiles each
unit needs are gathered into one contiguous block ([B, X, units, slots * bn, D]),
and one batched matmul gives the scores of all its queries. Slots are ordered
full tiles first (no mask arithmetic), then masked slots (partial tiles, plus
full tiles at a ragged edge, plus padding as all-False tiles). Long slot lists
are cut into groups of at most `max_group_keys` keys merged by online softmax,
so memory stays O(chunk * keys-per-group) whatever the density.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from attnc.plans import Plan
from attnc.errors import AttnError
from attnc.lru import LRU

from .backend import Call
from .tile_choice import CONFIG, TorchPathConfig, choose_tile, tile_block, tile_layout


# ----------------------------------------------------------------------------- masks of partial tiles


def partial_tile_masks(call: Call, plan: Plan, inputs: dict | None = None, *, chunk_elements: int | None = None,
                       layout=None) -> torch.Tensor:
    """The mask bits of every partial tile of `plan`: bool [Hm, nq, P, bm, bn].

    Entry [h, i, p] is the tile (query tile i, key tile plan.partial.index[h, i, p])
    of head h; Hm is 1 when every head has the same bits (then the plan's
    head dimension is 1 too), else the number of heads -- a plan may be shared
    by heads whose partial tiles differ inside. Padding slots (index -1), rows
    beyond M and columns beyond N are False. `inputs` is one batch element's
    run-time inputs. This is the only source of mask bits in the torch path and
    the FlexAttention export.

    [Note: mask bits] The bits come from the pointwise lowering
    (codegen/pointwise.py, the expression the Triton kernels print) evaluated
    only on the partial tiles: O(partial tiles * bm * bn). Patterns it cannot
    lower fall back to the reference evaluator's rows (O(M * N)). With N-D tiles
    (`layout`, codegen/ndtiles.TileLayout) positions are those of the padded
    tile-major order and the lowering is permuted into it (padding never allowed).
    """
    bm, bn = plan.block
    nq, nk = plan.shape
    M, N, H = (call.M, call.N, call.Hq) if layout is None else (layout.M, layout.N, call.Hq)
    Hx, _, P = plan.partial.index.shape
    out = torch.zeros(H, nq, P, bm, bn, dtype=torch.bool)
    if int(plan.partial.counts.sum()) == 0:
        return out[:1] if Hx == 1 else out  # keep a per-head plan's head dimension
    budget = chunk_elements or CONFIG.mask_chunk_elements
    fn, uses_h = _pointwise(call, inputs, layout)
    if fn is None and layout is not None:
        raise ValueError("N-D tiles need the pattern's pointwise form")  # never chosen without one (choose_tile)
    if fn is not None:
        # one plan for every head and bits that do not read h: evaluate one head, not H copies
        He = 1 if Hx == 1 and not uses_h else H
        out = out[:He]
        index = plan.partial.index.long().expand(He, -1, -1)
        tiles_per_chunk = max(1, budget // max(1, He * P * bm * bn))
        h = torch.arange(He).view(He, 1, 1, 1, 1)
        for t0 in range(0, nq, tiles_per_chunk):
            t1 = min(nq, t0 + tiles_per_chunk)
            idx = index[:, t0:t1]  # [He, t, P]
            q = (torch.arange(t0, t1) * bm).view(1, -1, 1, 1, 1) + torch.arange(bm).view(1, 1, 1, bm, 1)
            k = idx.clamp(min=0)[..., None, None] * bn + torch.arange(bn).view(1, 1, 1, 1, bn)
            ok = (q < M) & (k < N) & (idx >= 0)[..., None, None]
            out[:, t0:t1] = fn(q.clamp(max=M - 1), k.clamp(max=N - 1), h, 0) & ok
        if Hx == 1 and He > 1 and bool((out == out[:1]).all()):
            return out[:1]
        return out
    tiles_per_chunk = max(1, budget // max(1, H * bm * N))
    index = plan.partial.index.long().expand(H, -1, -1)
    hsel = torch.arange(H)[:, None, None]
    for t0 in range(0, nq, tiles_per_chunk):
        t1 = min(nq, t0 + tiles_per_chunk)
        if int(plan.partial.counts[:, t0:t1].sum()) == 0:
            continue
        lo, hi = t0 * bm, min(M, t1 * bm)
        rows = call.pattern.mask_rows(M, N, H, call.grid, lo, hi, inputs)  # [H, r, N]
        padded = torch.zeros(H, (t1 - t0) * bm, nk * bn, dtype=torch.bool)
        padded[:, : hi - lo, :N] = rows
        tiles = padded.view(H, t1 - t0, bm, nk, bn).permute(0, 1, 3, 2, 4)  # [H, t, nk, bm, bn]
        idx = index[:, t0:t1]  # [H, t, P]
        tsel = torch.arange(t1 - t0)[None, :, None]
        out[:, t0:t1] = tiles[hsel, tsel, idx.clamp(min=0)] & (idx >= 0)[..., None, None]
    if Hx == 1 and bool((out == out[:1]).all()):
        return out[:1]
    return out


def _pointwise(call: Call, inputs: dict | None, layout=None):
    """(the pattern's pointwise mask function (q, k, h, b) -> bool, whether it
    reads h), or (None, True) when the pattern has no pointwise lowering; in the
    padded tile-major order of `layout` when given."""
    batched = {n: t[None] for n, t in (inputs or {}).items()}  # one batch element: b = 0
    try:
        low = call.lowered(None if layout is None else (layout.tile_q, layout.tile_k),
                           {n: tuple(t.shape) for n, t in batched.items()})
    except AttnError:
        return None, True
    return low.evaluator(batched), low.uses("h")


def scan_plan(call: Call, inputs: dict, block: tuple[int, int]) -> Plan:
    """The exact tile plan of one batch element of a pattern with run-time inputs:
    in closed form from the inputs when the analysis has one (contiguous segments,
    block tables: O(N) / O(M * kmax)), else by scanning the mask in row chunks."""
    from attnc.tilestats import tile_stats

    M, N, H = call.M, call.N, call.Hq
    try:
        return call.plan(block, inputs)
    except ValueError:
        pass  # e.g. a segment id in several runs: scan
    stats, _ = tile_stats(lambda lo, hi: call.pattern.mask_rows(M, N, H, call.grid, lo, hi, inputs), M, N, H, block)
    full, nonempty = stats.full_and_nonempty()
    if H > 1 and bool((full == full[:1]).all() and (nonempty == nonempty[:1]).all()):
        full, nonempty = full[:1], nonempty[:1]
    return Plan.from_flags(full, nonempty, M=M, N=N, heads=H, block=block, allowed=stats.allowed(),
                           method="exact-scan")


# ----------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Group:
    """Consecutive slots of a chunk: the first `n_full` need no mask."""

    kv: torch.Tensor  # int64 [c * s] flat key-tile indices
    slots: int
    n_full: int
    mask: torch.Tensor | None  # bool [c, 1, bm, (s - n_full) * bn]


@dataclass(frozen=True)
class Chunk:
    q: torch.Tensor  # int64 [c] flat query-tile index per unit
    groups: tuple[Group, ...]


@dataclass(frozen=True, eq=False)
class Schedule:
    """A plan as gather tables for the torch path (see [Note: schedule])."""

    block: tuple[int, int]
    shared: bool  # Hx == 1: a unit holds every head (X = Hkv, G' = Hq // Hkv)
    nq: int
    nk: int
    chunks: tuple[Chunk, ...]
    tiles: int  # (query tile, key tile) pairs visited per batch element and unit head group
    #: a restricted schedule ([Note: restricted schedules]): the global tile index of each local
    #: query / key tile; None: local tile i is global tile i
    q_tiles: torch.Tensor | None = None
    k_tiles: torch.Tensor | None = None
    #: N-D tiles: the padded tile-major order (codegen/ndtiles.TileLayout) q / k / v are
    #: gathered into and out / lse / gradients scattered back from ([Note: N-D tiles here])
    layout: object | None = None


def build_schedule(call: Call, plan: Plan, masks: torch.Tensor, config: TorchPathConfig = CONFIG,
                   layout=None) -> Schedule:
    """Turn a plan and its partial-tile masks into gather tables (pure function). With
    N-D tiles (`layout`) the keys are the padded tile-major order: no ragged last tile
    (padding is masked in the partial tiles, codegen/ndtiles.TileLayout.kernel_plan)."""
    bm, bn = plan.block
    nq, nk = plan.shape
    N = call.N if layout is None else layout.N
    Hq, Hkv = call.Hq, call.Hkv
    G = Hq // Hkv
    Hx = masks.shape[0]  # 1: one plan and one set of bits for every head
    shared = Hx == 1
    ragged = N % bn != 0

    fcnt, fidx = (t.long().expand(Hx, *t.shape[1:]) for t in (plan.full.counts, plan.full.index))
    pcnt, pidx = (t.long().expand(Hx, *t.shape[1:]) for t in (plan.partial.counts, plan.partial.index))
    # a full tile in the ragged last key column needs its columns >= N masked
    edge = torch.zeros(Hx, nq, dtype=torch.bool)
    if ragged:
        edge = ((fidx == nk - 1) & (torch.arange(fidx.shape[-1]) < fcnt[..., None])).any(-1)
    col_ok = (torch.arange(nk * bn) < N).view(nk, bn)

    units = []  # (hx, i, n_full, n_masked)
    for h in range(Hx):
        for i in range(nq):
            nf = int(fcnt[h, i]) - int(edge[h, i])
            nm = int(pcnt[h, i]) + int(edge[h, i])
            if nf + nm:  # a query tile with no key tile keeps out 0, lse -inf
                units.append((h, i, nf, nm))
    # units ordered by their counts, so chunks hold units of similar shape
    units.sort(key=lambda u: (u[2], u[3], u[0], u[1]))

    heads_per_unit = Hq if shared else 1
    chunks = []
    pos = 0
    tiles = 0
    while pos < len(units):
        # grow the chunk while its score block stays within the budget
        end = pos + 1
        width = units[pos][2] + units[pos][3]
        while end < len(units):
            w = max(width, units[end][2] + units[end][3])
            if (end + 1 - pos) * heads_per_unit * bm * min(w * bn, config.max_group_keys) > config.chunk_elements:
                break
            width, end = w, end + 1
        chunk_units = units[pos:end]
        pos = end
        f0 = min(u[2] for u in chunk_units)
        n_masked = max(u[2] - f0 + u[3] for u in chunk_units)
        c = len(chunk_units)
        slots = torch.zeros(c, f0 + n_masked, dtype=torch.int64)  # key tile per slot
        masks_c = torch.zeros(c, n_masked, bm, bn, dtype=torch.bool)
        qidx = torch.empty(c, dtype=torch.int64)
        kv_head = torch.zeros(c, dtype=torch.int64)
        for j, (h, i, nf, nmask) in enumerate(chunk_units):
            tiles += nf + nmask
            qidx[j] = i if shared else h * nq + i
            kv_head[j] = 0 if shared else h // G
            full_tiles = [int(t) for t in fidx[h, i, : int(fcnt[h, i])]]
            if edge[h, i]:
                full_tiles.remove(nk - 1)
            slots[j, :f0] = torch.tensor(full_tiles[:f0], dtype=torch.int64)
            extra = full_tiles[f0:]
            s = f0
            for t in extra:  # full tiles beyond the chunk's common count: an all-True mask
                slots[j, s] = t
                masks_c[j, s - f0] = True
                s += 1
            if edge[h, i]:
                slots[j, s] = nk - 1
                masks_c[j, s - f0] = col_ok[nk - 1][None, :].expand(bm, bn)
                s += 1
            npart = int(pcnt[h, i])
            if npart:
                slots[j, s: s + npart] = pidx[h, i, :npart]
                masks_c[j, s - f0: s - f0 + npart] = masks[h, i, :npart]
            # remaining slots stay key tile 0 with an all-False mask (padding)
        flat_kv = slots + (kv_head * (nk))[:, None]
        groups = []
        total = f0 + n_masked
        per_group = max(1, config.max_group_keys // bn)
        for g0 in range(0, total, per_group):
            g1 = min(total, g0 + per_group)
            n_full = max(0, min(f0, g1) - g0)
            m = None
            if g1 > g0 + n_full:
                a, b = g0 + n_full - f0, g1 - f0
                m = masks_c[:, a:b].permute(0, 2, 1, 3).reshape(c, 1, bm, (b - a) * bn).contiguous()
            groups.append(Group(kv=flat_kv[:, g0:g1].reshape(-1).contiguous(), slots=g1 - g0, n_full=n_full, mask=m))
        chunks.append(Chunk(q=qidx, groups=tuple(groups)))
    return Schedule(block=(bm, bn), shared=shared, nq=nq, nk=nk, chunks=tuple(chunks), tiles=tiles, layout=layout)


def restrict(sched: Schedule, q_tiles, k_tiles) -> Schedule:
    """The part of `sched` that computes query tiles `q_tiles` (ascending global tile
    indices) against the key tiles `k_tiles` gathered for them: int64 [C, nk], one row
    when every key/value head gathered the same tiles (C = 1), else row x for key/value
    head x, padded with -1 (every key tile those queries visit must be there).

    [Note: restricted schedules] Context parallelism (runtime/distributed.py) runs one
    rank's query tiles against the key tiles it gathered from other ranks. The global
    schedule is cut down to the units of those query tiles, and its tile indices are
    renumbered into the local q / k tensors (local query tile j = global tile q_tiles[j];
    local key tile j of head x = global tile k_tiles[x or 0, j]); both are kept so that
    score terms see global positions. Masks and slot order are the global schedule's, so
    every local row is computed exactly as in one process. Padding slots (all-False
    masks) point at local key tile 0."""
    q_tiles = torch.as_tensor(q_tiles, dtype=torch.int64)
    k_tiles = torch.as_tensor(k_tiles, dtype=torch.int64)
    k_tiles = k_tiles[None] if k_tiles.dim() == 1 else k_tiles
    if sched.q_tiles is not None or sched.layout is not None:
        raise ValueError("restrict: expected a global schedule of 1-D tiles, got a restricted or N-D one")
    C, nk = k_tiles.shape
    if sched.shared and C > 1:  # a unit gathers one key block for every head: one tile list
        raise ValueError("restrict: a schedule shared by all heads needs one key-tile list, got one per head")
    nq = q_tiles.numel()
    q_local = torch.full((sched.nq,), -1, dtype=torch.int64)
    q_local[q_tiles] = torch.arange(nq)
    k_local = torch.zeros(C, sched.nk, dtype=torch.int64)  # tiles not gathered: padding slots only
    for c in range(C):
        real = k_tiles[c] >= 0
        k_local[c, k_tiles[c][real]] = torch.arange(nk)[real]
    chunks = []
    tiles = 0
    for chunk in sched.chunks:
        head, tile = chunk.q // sched.nq, chunk.q % sched.nq
        keep = (q_local[tile] >= 0).nonzero().flatten()
        if keep.numel() == 0:
            continue
        c = chunk.q.numel()
        groups = []
        for g in chunk.groups:
            kv = g.kv.view(c, g.slots)[keep]
            x = kv // sched.nk
            kv = k_local[x if C > 1 else 0, kv % sched.nk] + x * nk
            mask = None if g.mask is None else g.mask[keep].contiguous()
            groups.append(Group(kv=kv.reshape(-1).contiguous(), slots=g.slots, n_full=g.n_full, mask=mask))
            tiles += keep.numel() * g.n_full + (0 if mask is None else int(
                mask.view(keep.numel(), 1, sched.block[0], -1, sched.block[1]).any(2).any(-1).sum()))
        chunks.append(Chunk(q=(head[keep] * nq + q_local[tile[keep]]).contiguous(), groups=tuple(groups)))
    return Schedule(block=sched.block, shared=sched.shared, nq=nq, nk=nk, chunks=tuple(chunks), tiles=tiles,
                    q_tiles=q_tiles, k_tiles=k_tiles.clamp(min=0))


#: schedules of static patterns, by (pattern, sizes, tile); bounded ([Note: cache limits] in attnc/lru.py)
_SCHEDULES = LRU("schedules", 32, "torch-path tile schedules of static patterns (per pattern and size)")
#: schedules of patterns with run-time inputs, by the inputs' content ([Note: input schedules])
_INPUT_SCHEDULES = LRU("input_schedules", 16, "torch-path schedules built from run-time inputs")


def inputs_digest(inputs: dict[str, torch.Tensor]) -> tuple:
    """A content key of one batch element's run-time inputs: per input its name,
    dtype, shape and a 128-bit BLAKE2 hash of its values (O(size), on the CPU)."""
    out = []
    for name in sorted(inputs):
        t = inputs[name].detach().cpu().contiguous()
        out.append((name, str(t.dtype), tuple(t.shape), hashlib.blake2b(t.numpy().tobytes(), digest_size=16).digest()))
    return tuple(out)


def schedules(call: Call, config: TorchPathConfig = CONFIG, nd: bool = True) -> list[tuple[slice, Schedule]]:
    """(batch slice, schedule) pairs covering the batch.

    Static patterns: one schedule, cached by (pattern IR, sizes, heads, grid,
    Hkv, tile). Run-time inputs: one per distinct batch element, cached by the
    same and the element's inputs' content (see [Note: input schedules]).

    [Note: input schedules] A pattern with run-time inputs (segments, block
    tables) needs its plan, partial-tile bits and gather tables rebuilt when the
    inputs change -- but a training step calls forward and backward with the
    same inputs, and packed batches often repeat. So they are kept in a small
    LRU (`_INPUT_CACHE_SIZE`) keyed by a hash of the inputs' values
    (`inputs_digest`): equal values hit whatever tensor holds them, an in-place
    change misses. Hashing costs O(inputs) per call, far below a rebuild.

    `nd=False` keeps 1-D tiles (context parallelism restricts these schedules to a
    rank's tiles); otherwise `choose_tile` may choose N-D tiles on a grid.
    """
    block = choose_tile(call, config) if nd else tile_block(call, config)
    key = (call.pattern.ir, call.M, call.N, call.Hq, call.Hkv, call.grid, block, config)
    out = []
    for bs, inputs in _batches(call):
        def build(inputs=inputs):
            if isinstance(block[0], tuple):  # N-D tiles: static patterns only (choose_tile)
                layout = tile_layout(call, block)
                plan = call.kernel_plan(block)  # in the layout's padded order
                return build_schedule(call, plan, partial_tile_masks(call, plan, layout=layout), config, layout)
            plan = _plan(call, inputs, block)
            return build_schedule(call, plan, partial_tile_masks(call, plan, inputs), config)
        if inputs is None:
            out.append((bs, _SCHEDULES.get(key, build)))
        else:
            out.append((bs, _INPUT_SCHEDULES.get(key + (inputs_digest(inputs),), build)))
    return out


def plans(call: Call, config: TorchPathConfig = CONFIG) -> list[tuple[slice, Plan]]:
    """(batch slice, tile plan) pairs of 1-D tiles (the torch path's `tile_block`), one per
    distinct batch element, built afresh (the schedules are what is cached). Context
    parallelism shards these; `schedules` may choose N-D tiles instead (`choose_tile`)."""
    block = tile_block(call, config)
    return [(bs, _plan(call, inputs, block)) for bs, inputs in _batches(call)]


def _batches(call: Call) -> list[tuple[slice, dict | None]]:
    """(batch slice, one element's run-time inputs or None for a static pattern): one
    entry when every batch element shares its inputs."""
    if not call.pattern.ir.inputs:
        return [(slice(0, call.B), None)]
    batches, _ = call.pattern.input_batches(call.M, call.N, call.Hq, dict(call.inputs), batch=call.B)
    return [(slice(b, b + 1) if len(batches) > 1 else slice(0, call.B), inputs) for b, inputs in enumerate(batches)]


def _plan(call: Call, inputs: dict | None, block: tuple[int, int]) -> Plan:
    if inputs is None:
        return call.plan(block)
    return scan_plan(call, inputs, block)


