"""The torch path's schedules: tile plans turned into key ranges (runtime/key_ranges.py), with
the partial tiles' mask bits, cached per call configuration.

input:  a validated `Call` (and its run-time inputs), the torch path's `TorchPathConfig`.
output: `Schedule`s per batch slice (`schedules`), 1-D tile plans (`plans`), the mask bits of partial tiles (`partial_tile_masks`).
does not: choose tiles (tile_choice.py), turn plans into key ranges (key_ranges.py) or compute
        attention (torch_backend.py).

[Note: schedule] in runtime/key_ranges.py says what a `Schedule` is; it is built
once per call configuration (pattern IR, sizes, heads, grid, tile) and cached here.
"""

from __future__ import annotations

import hashlib

import torch

from attnc.plans import Plan
from attnc.errors import AttnError
from attnc.lru import LRU

from .backend import Call
from .key_ranges import Chunk, Group, Schedule, build_schedule, restrict
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


