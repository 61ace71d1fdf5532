"""The block-sparse PyTorch path: attention driven by the tile plan, on any device.

input:  a validated `Call`, q / k / v (and for backward out, lse, dout, dlse).
output: out, lse (forward); dq, dk, dv (backward), per the `Backend` contract.
does not: validate tensors (ops.py), or decide masks itself: every mask bit of
        a partial tile comes from `partial_tile_masks`, the one place masks come from.

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

[Note: backward] Nothing of size N^2 is saved: backward regathers the same
tiles, recomputes P = exp(S - lse) from the saved lse, and with
delta = rowsum(dout * out) - dlse forms dS = P * (dout @ v^T - delta);
dq of a unit is written once, dk / dv of the gathered tiles are added back with
one index_add_ per group (deterministic on CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from attnc import ir
from attnc.errors import AttnError
from attnc.plans import Plan
from attnc.lru import LRU, memoize

from .backend import Backend, Call


@dataclass(frozen=True)
class TorchPathConfig:
    """Knobs of the torch path, in one place.

    block: (query tile, key tile); chunk_elements: score elements of one
    chunk (per batch element); max_group_keys: keys merged per online-softmax step.
    """

    block: tuple[int, int] = (64, 64)
    chunk_elements: int = 1 << 20
    max_group_keys: int = 2048
    mask_chunk_elements: int = 1 << 24


CONFIG = TorchPathConfig()


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
    from attnc.codegen.pointwise import lower

    batched = {n: t[None] for n, t in (inputs or {}).items()}  # one batch element: b = 0
    try:
        low = lower(call.pattern.ir, call.M, call.N, call.Hq, call.grid, {n: tuple(t.shape) for n, t in batched.items()})
    except AttnError:
        return None, True
    if layout is not None:
        low = layout.lower(low)
    return low.evaluator(batched), low.uses("h")


def scan_plan(call: Call, inputs: dict, block: tuple[int, int]) -> Plan:
    """The exact tile plan of one batch element of a pattern with run-time inputs:
    in closed form from the inputs when the analysis has one (contiguous segments,
    block tables: O(N) / O(M * kmax)), else by scanning the mask in row chunks."""
    from attnc.analysis import plan_blocks
    from attnc.tilestats import tile_stats

    M, N, H = call.M, call.N, call.Hq
    try:
        return plan_blocks(call.pattern.ir, M, N, H, call.grid, block=block, inputs=inputs)
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
                layout = _layout(call, block)
                plan = layout.kernel_plan(call.pattern.plan(call.M, call.N, heads=call.Hq, grid=call.grid, block=block))
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


def tile_block(call: Call, config: TorchPathConfig = CONFIG) -> tuple[int, int]:
    """The torch path's 1-D tile for this call: the configured one, shrunk to short sequences."""
    return min(config.block[0], _pow2_at_least(call.M)), min(config.block[1], _pow2_at_least(call.N))


#: N-D tiles the torch path considers per grid dimension: 64-token query boxes, key boxes of
#: 64 or 16 tokens (small key boxes cover a window's footprint more tightly; measured on a
#: 7x7 neighbourhood at 96x96: 8x8 / 4x4 tiles 193 ms, 8x8 / 8x8 291 ms, 1-D 301 ms)
ND_TILES = {2: (((8, 8), (8, 8)), ((8, 8), (4, 4))), 3: (((4, 4, 4), (4, 4, 4)), ((2, 4, 8), (1, 4, 4)))}
#: N-D tiles are chosen when their predicted time is at most this fraction of the 1-D
#: tiles' (the model's error on the cases it was fitted to is about 10 %)
ND_GAIN = 0.9

_TILE_CHOICES = LRU("tile_choices", 64, "the torch path's tile choice per pattern and size")

#: the torch path's time model, ns per full-tile pair, partial-tile pair, visited tile and
#: (N-D tiles) token gathered into and out of the tile-major order, per head: a least-squares
#: fit to 12 runs of 2-D / 3-D neighbourhoods and blocked attention, 1-D and N-D tiles,
#: H = 8, D = 64, fp32, one thread on this project's 2-core machine (2026-11-28)
COST = {"full": 2.6, "partial": 5.4, "tile": 690.0, "token": 635.0}


def tile_cost(plan: Plan, heads: int, layout=None) -> float:
    """Predicted forward time (ns) of the torch path on `plan` ([Note: N-D tiles here])."""
    bm, bn = plan.block
    per_head = 1 if plan.full.counts.shape[0] > 1 else heads
    full, partial = int(plan.full.counts.sum()) * per_head, int(plan.partial.counts.sum()) * per_head
    permute = 0 if layout is None else COST["token"] * (layout.M + layout.N) / 2 * heads
    return (COST["full"] * full * bm * bn + COST["partial"] * partial * bm * bn
            + COST["tile"] * (full + partial) + permute)


def choose_tile(call: Call, config: TorchPathConfig = CONFIG):
    """The torch path's tiles for `call`: 1-D `tile_block`, or N-D tiles on a grid.

    [Note: N-D tiles here] On a pure grid, 1-D tiles of 64 consecutive tokens cut
    across grid rows, so a 7x7 neighbourhood's tiles visit ~10x the pairs it allows. N-D
    tiles are compact boxes of the grid: q / k / v are gathered into the padded
    tile-major order (codegen/ndtiles.TileLayout), the same schedule machinery runs on
    it, and out / lse / gradients are scattered back. The choice compares the predicted
    time (`tile_cost`: full and partial pairs, tiles, the permutation) of the 1-D plan
    and of each `ND_TILES` candidate's plan (cached per pattern and size); N-D wins at
    `ND_GAIN` of the 1-D time or less. `block=` N-D tiles given to
    the op are used as asked. Patterns with run-time inputs or score terms, mixed
    layouts and grids under 256 tokens keep 1-D tiles."""
    return tile_options(call, config)[0]


def tile_options(call: Call, config: TorchPathConfig = CONFIG) -> tuple:
    """(the tiles `choose_tile` takes, {tiles: predicted time in ns} of every candidate it
    weighed; {} when it weighed none)."""
    one = tile_block(call, config)
    ir_ = call.pattern.ir
    lay = ir_.layout
    if not lay.axes or lay.text is not None or ir_.inputs or ir_.score is not None or call.M != call.N:
        return one, {}
    if call.block is not None and isinstance(call.block[0], tuple):
        return call.block, {}
    candidates = ND_TILES.get(len(lay.axes), ())
    if not candidates or config.block != CONFIG.block or call.N < 256:
        return one, {}
    key = (ir_, call.M, call.Hq, call.grid, config)

    def decide():
        from attnc.codegen.pointwise import lower

        try:
            lower(ir_, call.M, call.N, call.Hq, call.grid)
        except AttnError:
            return one, {}

        def cost(block):
            plan = call.pattern.plan(call.M, call.N, heads=call.Hq, grid=call.grid, block=block)
            if block is one:
                return tile_cost(plan, call.Hq)
            layout = _layout(call, block)
            return tile_cost(layout.kernel_plan(plan), call.Hq, layout)

        costs = {block: cost(block) for block in (one, *candidates)}
        best = min(candidates, key=costs.get)
        return (best if costs[best] <= ND_GAIN * costs[one] else one), costs

    return _TILE_CHOICES.get(key, decide)


def _layout(call: Call, block):
    from attnc.codegen.ndtiles import TileLayout
    return TileLayout(call.grid, *block)


def _batches(call: Call) -> list[tuple[slice, dict | None]]:
    """(batch slice, one element's run-time inputs or None for a static pattern): one
    entry when every batch element shares its inputs."""
    if not call.pattern.ir.inputs:
        return [(slice(0, call.B), None)]
    batches, _ = call.pattern._inputs(call.M, call.N, call.Hq, dict(call.inputs), batch=call.B)
    return [(slice(b, b + 1) if len(batches) > 1 else slice(0, call.B), inputs) for b, inputs in enumerate(batches)]


def _plan(call: Call, inputs: dict | None, block: tuple[int, int]) -> Plan:
    if inputs is None:
        return call.pattern.plan(call.M, call.N, heads=call.Hq, grid=call.grid, block=block)
    return scan_plan(call, inputs, block)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------- the computation


_LOG2E = 1.4426950408889634


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """exp of `t` in place, as exp2(t * log2 e).

    [Note: exp2] On CPU, torch's exp_ is 2x slower than mul_ + exp2_ on ordinary inputs,
    3-6x on -inf (every masked entry of a partial tile) and 20x on inputs below about -88
    (its slow path for underflow: large biases such as ALiBi's reach it), measured on this
    project's 2-core machine with torch 2.13 (benchmarks/results/scores_cpu.md); the
    result differs by about one ulp."""
    return t.mul_(_LOG2E).exp2_()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Views:
    """q / k / v padded to whole tiles, as flat tile-major tensors [tiles, rows, D].

    Gathers and scatters are index_select / index_copy_ / index_add_ along
    dim 0 of those (contiguous row copies, the fast kernels), with flat
    indices = a per-(batch, head group) base + the schedule's tile index.
    """

    def __init__(self, sched: Schedule, call: Call, q, k, v, acc):
        bm, bn = sched.block
        B, Hq, Hkv = q.shape[0], call.Hq, call.Hkv
        G = Hq // Hkv
        dev = q.device
        self.B, self.acc = B, acc
        self.X = Hkv if sched.shared else 1
        self.Gu = G if sched.shared else 1
        self.bm, self.bn = bm, bn
        self.Mp, self.Np = sched.nq * bm, sched.nk * bn
        self.q = _pad(q, self.Mp).to(acc)
        self.k = _pad(k, self.Np).to(acc)
        self.v = _pad(v, self.Np).to(acc)
        # tiles of one (batch, head group): shared -> per (b, x, g) nq query tiles
        # and per (b, x) nk key tiles; per-head -> all Hq*nq / Hkv*nk tiles of b
        if sched.shared:
            self.q_base = (torch.arange(B * self.X * self.Gu, device=dev) * sched.nq).view(B, self.X, 1, self.Gu)
            self.k_base = (torch.arange(B * self.X, device=dev) * sched.nk).view(B, self.X, 1)
        else:
            self.q_base = (torch.arange(B, device=dev) * Hq * sched.nq).view(B, 1, 1, 1)
            self.k_base = (torch.arange(B, device=dev) * Hkv * sched.nk).view(B, 1, 1)

    def flat(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """[B, H, L, D] (contiguous, L a multiple of rows) -> a view [tiles, rows, D]."""
        return t.view(-1, rows, t.shape[-1])

    def q_index(self, chunk: Chunk) -> torch.Tensor:
        return (self.q_base + chunk.q.view(1, 1, -1, 1)).reshape(-1)  # order (b, x, c, g)

    def gather_q(self, tq: torch.Tensor, qi: torch.Tensor, c: int) -> torch.Tensor:
        """[B, X, c, G' * bm, D] (a copy)."""
        return tq.index_select(0, qi).view(self.B, self.X, c, self.Gu * self.bm, tq.shape[-1])

    def scatter_q(self, tq: torch.Tensor, qi: torch.Tensor, val: torch.Tensor) -> None:
        tq.index_copy_(0, qi, val.reshape(-1, self.bm, val.shape[-1]).to(tq.dtype))

    def kv_index(self, group: Group) -> torch.Tensor:
        return (self.k_base + group.kv.view(1, 1, -1)).reshape(-1)  # order (b, x, c * s)

    def gather_kv(self, tk: torch.Tensor, ki: torch.Tensor, group: Group, c: int) -> torch.Tensor:
        return tk.index_select(0, ki).view(self.B, self.X, c, group.slots * self.bn, tk.shape[-1])

    def add_kv(self, tk: torch.Tensor, ki: torch.Tensor, val: torch.Tensor) -> None:
        tk.index_add_(0, ki, val.reshape(-1, self.bn, val.shape[-1]))


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    L = t.shape[2]
    if L == length:
        return t.contiguous()
    return torch.nn.functional.pad(t, (0, 0, 0, length - L))


def _scores(qc, kc, group: Group, Gu: int, bm: int, score=None) -> torch.Tensor:
    """q_chunk @ k_chunk^T (then the score term `score(s)`, if any) with the group's
    partial-tile masks applied (-inf)."""
    s = torch.matmul(qc, kc.transpose(-1, -2))  # [B, X, c, G'bm, s*bn]
    if score is not None:
        s = score(s)
    return _mask_(s, group, Gu, bm)


def _mask_(s, group: Group, Gu: int, bm: int) -> torch.Tensor:
    """`s` with the group's partial-tile masks applied in place (-inf)."""
    if group.mask is not None:
        B, X, c, R, K = s.shape
        cut = group.n_full * (K // group.slots)
        sv = s.view(B, X, c, Gu, bm, K)[..., cut:]
        sv.masked_fill_(~group.mask[:, :, :, :], float("-inf"))
    return s


# ----------------------------------------------------------------------------- score terms


def _pairs(call: Call, sched: Schedule, chunk: Chunk, group: Group, Gu: int, X: int, device):
    """Query rows, keys and heads of a group's scores, shaped to broadcast with them
    viewed as [B, X, c, G', bm, s * bn]. Rows and keys run past M and N in padded tiles:
    clamp them before evaluating the term (`_clamped`), compare them to keep pairs."""
    bm, bn = sched.block
    c = chunk.q.numel()
    qt = chunk.q.to(device)
    qg = qt % sched.nq
    kv = group.kv.to(device).view(c, group.slots)
    kt = kv % sched.nk
    if sched.q_tiles is not None:  # a restricted schedule: global positions ([Note: restricted schedules])
        kx = kv // sched.nk if sched.k_tiles.shape[0] > 1 else 0
        qg, kt = sched.q_tiles.to(device)[qg], sched.k_tiles.to(device)[kx, kt]
    rows = (qg[:, None] * bm + torch.arange(bm, device=device)).view(1, 1, c, 1, bm, 1)
    keys = (kt[:, :, None] * bn + torch.arange(bn, device=device)).reshape(c, group.slots * bn)
    keys = keys.view(1, 1, c, 1, 1, group.slots * bn)
    if sched.shared:
        G = call.Hq // call.Hkv
        heads = (torch.arange(X, device=device)[:, None] * G + torch.arange(Gu, device=device)).view(1, X, 1, Gu, 1, 1)
    else:
        heads = (qt // sched.nq).view(1, 1, c, 1, 1, 1)
    return rows, keys, heads


def _clamped(call: Call, rows, keys):
    """Rows and keys clamped into [0, M) x [0, N): the positions the term is evaluated at."""
    return rows.clamp(max=call.M - 1), keys.clamp(max=call.N - 1)


@dataclass(frozen=True)
class _ScoreStep:
    """The score term on one group's scores [B, X, c, G' * bm, s * bn]."""

    fn: object
    rows: torch.Tensor
    keys: torch.Tensor
    heads: torch.Tensor
    tables: dict
    Gu: int
    bm: int
    real_rows: torch.Tensor  # bool, broadcasting like rows: False for padding rows past M


    def _view(self, s):
        B, X, c, R, K = s.shape
        return s.view(B, X, c, self.Gu, self.bm, K)

    def apply(self, s):
        """The term's logits, computed over `s` in place; padding rows past M get -inf (a term
        such as a bias can be large there, and their zero q / dO must add nothing: inf * 0
        would be NaN)."""
        out = self.fn.apply_(self._view(s), self.rows, self.keys, self.heads, self.tables)
        if self.padded:
            out = out.masked_fill_(~self.real_rows, float("-inf"))
        return out.reshape(s.shape)

    @property
    def padded(self) -> bool:
        return not bool(self.real_rows.all())

    def backward(self, raw, grad, dtables):
        return self.fn.backward(self._view(raw), self.rows, self.keys, self.heads, self.tables, self._view(grad),
                                dtables).reshape(raw.shape)


def _score_step(call: Call, sched: Schedule, chunk: Chunk, group: Group, w, tables: dict):
    """The score term of a group's dot products (None without one)."""
    fn = call.score
    if fn is None:
        return None
    rows, keys, heads = _pairs(call, sched, chunk, group, w.Gu, w.X, chunk.q.device)  # the schedule is on q's device
    real = rows < call.M
    rows, keys = _clamped(call, rows, keys)
    return _ScoreStep(fn, rows, keys, heads, tables, w.Gu, w.bm, real)


#: calls whose table indices were proven in range, by (pattern, sizes, inputs)
_CHECKED = LRU("score_checks", 64, "score-term index checks (per pattern, size and run-time inputs)")


def check_table_indices(call: Call) -> None:
    """Raise ValueError unless every allowed pair reads inside the score term's tables.

    Exact at the call's sizes: the indices are evaluated on every pair of every
    visited tile (O(visited pairs), once per pattern, size and run-time inputs;
    cached), and only allowed pairs count (see [Note: score terms] in codegen/score.py)."""
    fn = call.score
    if fn is None or not fn.reads:
        return
    key = (call.pattern.ir, call.M, call.N, call.Hq, call.Hkv, call.grid,
           inputs_digest(call.inputs) if call.inputs else ())
    _CHECKED.get(key, lambda: _check_tables(call, fn))


def _check_tables(call: Call, fn) -> bool:
    lo: dict = {}
    hi: dict = {}
    for _, sched in schedules(call):
        X = call.Hkv if sched.shared else 1
        Gu = call.Hq // call.Hkv if sched.shared else 1
        bm, bn = sched.block
        for chunk in sched.chunks:
            c = chunk.q.numel()
            for group in chunk.groups:
                rows, keys, heads = _pairs(call, sched, chunk, group, Gu, X, torch.device("cpu"))
                K = group.slots * bn
                ok = (rows < call.M) & (keys < call.N)
                rows, keys = _clamped(call, rows, keys)
                if group.mask is not None:
                    cut = group.n_full * bn
                    part = torch.ones(1, 1, c, 1, bm, K, dtype=torch.bool)
                    part[..., cut:] = group.mask.view(c, 1, bm, K - cut)[None, None]
                    ok = ok & part
                for read, j, vals in fn.index_values(rows, keys, heads):
                    if not isinstance(vals, torch.Tensor):
                        vmin = vmax = int(vals)
                        if not bool(ok.any()):
                            continue
                    else:
                        vals, okb = torch.broadcast_tensors(vals, ok)
                        sel = vals[okb]
                        if sel.numel() == 0:
                            continue
                        vmin, vmax = int(sel.min()), int(sel.max())
                    k_ = (read.table, read.text, j)
                    lo[k_] = min(lo.get(k_, vmin), vmin)
                    hi[k_] = max(hi.get(k_, vmax), vmax)
    for (table, text, j), vmin in lo.items():
        vmax = hi[(table, text, j)]
        dim = dict(fn.tables)[table][j]
        if vmin < 0 or vmax >= dim:
            sizes = f"M = {call.M}, N = {call.N}, H = {call.Hq}" + (f", grid = {call.grid}" if call.grid else "")
            raise ValueError(f"{table}[{text}]: index {j} takes values in [{vmin}, {vmax}] on allowed pairs at {sizes}, "
                             f"but the table's dimension {j} is {dim} (expected indices in [0, {dim})); try a table "
                             f"declared with dimension {j} >= {vmax + 1} and an index shifted by {max(0, -vmin)}")
    return True


def forward(call: Call, q, k, v, config: TorchPathConfig = CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(q.dtype)
    B, Hq, M, _ = q.shape
    out = q.new_zeros(B, Hq, M, v.shape[-1])
    lse = torch.full((B, Hq, M), float("-inf"), dtype=acc, device=q.device)
    for bs, sched in schedules(call, config):
        if sched.layout is None:
            out[bs], lse[bs] = run_forward(sched, call, q[bs], k[bs], v[bs], acc)
            continue
        pq, pk = _positions(sched.layout, q.device)
        o, l = run_forward(sched, call, *_into(sched.layout, pq, pk, q[bs], k[bs], v[bs]), acc)
        out[bs], lse[bs] = o[:, :, pq], l[:, :, pq]
    return out, lse


@memoize("tile_positions", 16, "torch-path token positions of N-D tile layouts per device")
def _positions(layout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every grid token sits in the padded tile-major order, for queries and keys."""
    return layout.positions("q").to(device), layout.positions("k").to(device)


def _into(layout, pq, pk, q, k, v):
    """q / k / v gathered into the padded tile-major order (zero vectors at padding)."""
    return _put(q, pq, layout.M), _put(k, pk, layout.N), _put(v, pk, layout.N)


def _put(t: torch.Tensor, pos: torch.Tensor, L: int, fill: float = 0.0) -> torch.Tensor:
    """[B, H, n, ...] -> [B, H, L, ...] with row i at position pos[i], `fill` elsewhere."""
    out = t.new_full((*t.shape[:2], L, *t.shape[3:]), fill)
    out[:, :, pos] = t
    return out


def run_forward(sched: Schedule, call: Call, q, k, v, acc=None):
    """out, lse of one schedule's rows (q / k / v of the batch slice it serves; under a
    restricted schedule, a rank's query rows and its gathered keys)."""
    acc = acc or _acc_dtype(q.dtype)
    sched = _on_device(sched, q.device)
    w = _Views(sched, call, q, k, v, acc)
    tq = w.flat(w.q, w.bm)
    tk, tv = w.flat(w.k, w.bn), w.flat(w.v, w.bn)
    out_p = torch.zeros(w.B, call.Hq, w.Mp, v.shape[-1], dtype=acc, device=q.device)
    lse_p = torch.full((w.B, call.Hq, w.Mp, 1), float("-inf"), dtype=acc, device=q.device)
    tout, tlse = w.flat(out_p, w.bm), w.flat(lse_p, w.bm)
    tables = call.score_tables(acc, q.device)
    for chunk in sched.chunks:
        c = chunk.q.numel()
        qi = w.q_index(chunk)
        qc = w.gather_q(tq, qi, c).mul_(call.scale)
        m_i = l_i = o_i = None
        for group in chunk.groups:
            ki = w.kv_index(group)
            step = _score_step(call, sched, chunk, group, w, tables)
            s = _scores(qc, w.gather_kv(tk, ki, group, c), group, w.Gu, w.bm, None if step is None else step.apply)
            vc = w.gather_kv(tv, ki, group, c)
            m_new = s.amax(-1, keepdim=True)
            if m_i is not None:
                m_new = torch.maximum(m_new, m_i)
            # [Note: empty rows] a row with nothing allowed so far has max -inf; use 0 there
            m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
            p = _exp_(s.sub_(m_safe))
            if m_i is None:
                l_i = p.sum(-1, keepdim=True)
                o_i = torch.matmul(p, vc)
            else:
                alpha = torch.exp(m_i - m_safe)
                l_i = l_i.mul_(alpha).add_(p.sum(-1, keepdim=True))
                o_i = o_i.mul_(alpha).add_(torch.matmul(p, vc))
            m_i = m_safe
        empty = l_i == 0
        o_i = o_i.div_(l_i.masked_fill(empty, 1.0))
        lse_c = (m_i + torch.log(l_i)).masked_fill_(empty, float("-inf"))
        w.scatter_q(tout, qi, o_i)
        w.scatter_q(tlse, qi, lse_c)
    M = q.shape[2]  # call.M, or a rank's rows under a restricted schedule
    return out_p[:, :, :M].to(q.dtype), lse_p[:, :, :M, 0]


def backward(call: Call, q, k, v, out, lse, dout, dlse=None, config: TorchPathConfig = CONFIG):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    tables = call.score_tables(_acc_dtype(q.dtype), q.device)
    dtables = {n: torch.zeros_like(t) for n, t in tables.items()}
    for bs, sched in schedules(call, config):
        d = None if dlse is None else dlse[bs]
        if sched.layout is None:
            dq[bs], dk[bs], dv[bs] = run_backward(sched, call, q[bs], k[bs], v[bs], out[bs], lse[bs], dout[bs], d,
                                                  tables, dtables)
            continue
        lay = sched.layout
        pq, pk = _positions(lay, q.device)
        qp, kp, vp = _into(lay, pq, pk, q[bs], k[bs], v[bs])
        # padding rows: zero q and dO, lse -inf (no key), so they add nothing to dK / dV
        g = run_backward(sched, call, qp, kp, vp, _put(out[bs], pq, lay.M), _put(lse[bs], pq, lay.M, float("-inf")),
                         _put(dout[bs], pq, lay.M), None if d is None else _put(d, pq, lay.M), tables, dtables)
        dq[bs], dk[bs], dv[bs] = g[0][:, :, pq], g[1][:, :, pk], g[2][:, :, pk]
    if call.score is not None:
        return dq, dk, dv, dtables
    return dq, dk, dv


def run_backward(sched: Schedule, call: Call, q, k, v, out, lse, dout, dlse, tables: dict, dtables: dict):
    """dq, dk, dv of one schedule's rows (see `run_forward`), adding the score tables'
    gradients into `dtables`."""
    acc = _acc_dtype(q.dtype)
    sched = _on_device(sched, q.device)
    w = _Views(sched, call, q, k, v, acc)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse_safe = lse.to(acc).masked_fill(torch.isinf(lse), 0.0)
    row = _pad(torch.stack([lse_safe, delta], -1), w.Mp)  # [B, Hq, Mp, 2]
    do_p = _pad(dout, w.Mp).to(acc)
    tq, tdo, trow = w.flat(w.q, w.bm), w.flat(do_p, w.bm), w.flat(row, w.bm)
    tk, tv = w.flat(w.k, w.bn), w.flat(w.v, w.bn)
    dq_p = torch.zeros_like(w.q)
    dk_p, dv_p = torch.zeros_like(w.k), torch.zeros_like(w.v)
    tdq, tdk, tdv = w.flat(dq_p, w.bm), w.flat(dk_p, w.bn), w.flat(dv_p, w.bn)
    for chunk in sched.chunks:
        c = chunk.q.numel()
        qi = w.q_index(chunk)
        qc = w.gather_q(tq, qi, c)
        qs = qc * call.scale
        doc = w.gather_q(tdo, qi, c)
        rc = w.gather_q(trow, qi, c)
        lse_c, delta_c = rc[..., :1], rc[..., 1:]
        dqc = torch.zeros_like(qc)
        for group in chunk.groups:
            ki = w.kv_index(group)
            kc, vc = w.gather_kv(tk, ki, group, c), w.gather_kv(tv, ki, group, c)
            step = _score_step(call, sched, chunk, group, w, tables)
            if step is None:
                p = _exp_(_scores(qs, kc, group, w.Gu, w.bm).sub_(lse_c))
                ds = torch.matmul(doc, vc.transpose(-1, -2)).sub_(delta_c).mul_(p)
            else:
                p, ds = _score_backward(step, qs, kc, vc, doc, lse_c, delta_c, group, w, dtables)
            dqc += torch.matmul(ds, kc)
            w.add_kv(tdk, ki, torch.matmul(ds.transpose(-1, -2), qc).mul_(call.scale))
            w.add_kv(tdv, ki, torch.matmul(p.transpose(-1, -2), doc))
        w.scatter_q(tdq, qi, dqc.mul_(call.scale))
    M, N = q.shape[2], k.shape[2]  # call.M and call.N, or a rank's rows and keys (restricted schedules)
    return dq_p[:, :, :M].to(q.dtype), dk_p[:, :, :N].to(k.dtype), dv_p[:, :, :N].to(v.dtype)


def _score_backward(step, qs, kc, vc, doc, lse_c, delta_c, group, w, dtables):
    """(P, the gradient with respect to the raw scores `qs @ kc^T` through the score term),
    adding the tables' gradients to `dtables` (codegen/score.ScoreFn.backward)."""
    raw = torch.matmul(qs, kc.transpose(-1, -2))
    s = step.apply(raw.clone())
    p = _exp_(_mask_(s, group, w.Gu, w.bm).sub_(lse_c))
    ds = torch.matmul(doc, vc.transpose(-1, -2)).sub_(delta_c).mul_(p)  # d loss / d score term
    return p, step.backward(raw, ds, dtables)


@memoize("device_schedules", 8, "torch-path schedules copied to an accelerator")
def _on_device(sched: Schedule, device: torch.device) -> Schedule:
    """The schedule's tables on `device` (kept while the schedule is in use)."""
    if device.type == "cpu":
        return sched
    chunks = tuple(Chunk(q=ch.q.to(device), groups=tuple(
        Group(kv=g.kv.to(device), slots=g.slots, n_full=g.n_full, mask=None if g.mask is None else g.mask.to(device))
        for g in ch.groups)) for ch in sched.chunks)
    return dataclasses.replace(sched, chunks=chunks)


# ----------------------------------------------------------------------------- the backend


def _has(node: ir.Mask, kind) -> bool:
    return any(isinstance(n, kind) for n in ir.walk(node))


class TorchBackend(Backend):
    """Block-sparse attention in PyTorch, on any device (the CPU default)."""

    name = "torch"
    scores = True

    def __init__(self, config: TorchPathConfig = CONFIG):
        self.config = config

    def can_run(self, call: Call, q: torch.Tensor) -> str | None:
        if _has(call.pattern.ir.body, ir.TopK):
            return ("the torch path does not evaluate topk(...) yet (dynamic routing, issue 6); "
                    "try a static pattern or routed(sel) with precomputed block indices")
        return None

    def forward(self, call: Call, q, k, v):
        return forward(call, q, k, v, self.config)

    def backward(self, call: Call, q, k, v, out, lse, dout, dlse=None):
        return backward(call, q, k, v, out, lse, dout, dlse, self.config)
