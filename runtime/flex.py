"""FlexAttention interop: attnc's plan as a `BlockMask`, and the "flex" backend.

input:  a bound pattern, sizes, a tile shape (and run-time inputs).
output: `(mask_mod, BlockMask)` for `torch.nn.attention.flex_attention`, the
        BlockMask built from attnc's Plan (`BlockMask.from_kv_blocks`), never by
        evaluating mask_mod over N^2 positions (`create_block_mask`).
does not: compile FlexAttention kernels (torch does) or evaluate masks itself:
        mask bits come from schedules.partial_tile_masks.

[Note: mask_mod] The exported mask_mod is the pattern's closed form -- the
pointwise lowering the Triton kernels print (codegen/pointwise.py), a handful of
integer compares per position, as cheap as a hand-written mask_mod -- and reads
tensors only where the pattern does (segment ids, block tables). Patterns
without a pointwise form fall back to a lookup: a tile state table
[Bx, Hx, nq, nk] (0 empty, 1 partial, 2 full) and, for partial tiles, a slot
into a bank of bit tiles [S, bm, bn]. Either is exact at every (b, h, q, k), so
it also serves FlexAttention on tiles it did not plan; both are vmap- and
compile-friendly. Indices are clamped before any lookup (FlexAttention may
evaluate padded positions) and positions outside [0, M) x [0, N) are False.

[Note: edge tiles] FlexAttention's own BlockMask never marks a tile that
crosses the end of the sequence as full (create_block_mask pads with False),
so tiles in a ragged last row or column are exported as partial: mask_mod
then sees every position there and the BlockMask equals create_block_mask's.
"""

from __future__ import annotations

import torch

from attnc import ir
from attnc.lru import LRU

from .backend import Backend, Call
from .schedules import inputs_digest, partial_tile_masks, scan_plan


def _flex():
    from torch.nn.attention import flex_attention as fa
    return fa


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's (num_blocks, indices) layout of a dense bool [..., rows, cols]."""
    counts = dense.sum(-1).to(torch.int32)
    index = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), index.contiguous()


def _tile_states(plan):
    """int8 [Hx, nq, nk]: 0 empty, 1 partial, 2 full (the BlockMask's and the lookup's tiles)."""
    return plan.to_dense()


def _plan_tables(call: Call, plan, inputs: dict | None):
    """The lookup's tables: (state int8 [Hx, nq, nk], slot int64 [Hx, nq, nk], bits bool [S, bm, bn])."""
    nq, nk = plan.shape
    bm, bn = plan.block
    masks = partial_tile_masks(call, plan, inputs)  # [Hx, nq, P, bm, bn]
    Hx, _, P = masks.shape[:3]
    dense = _tile_states(plan).expand(Hx, -1, -1)
    slot = torch.full((Hx, nq, nk + 1), -1, dtype=torch.int64)
    idx = plan.partial.index.long().expand(Hx, -1, -1)
    flat = torch.arange(Hx * nq * P, dtype=torch.int64).view(Hx, nq, P)
    col = torch.where(idx < 0, nk, idx)
    slot.scatter_(2, col, torch.where(idx < 0, -1, flat))
    return dense, slot[..., :nk], masks.reshape(Hx * nq * P, bm, bn)


def _stack(ts: list) -> torch.Tensor:
    """[Bx, Hx, ...] of per-batch-element [Hx or 1, ...] tensors."""
    hx = max(t.shape[0] for t in ts)
    return torch.stack([t.expand(hx, *t.shape[1:]) for t in ts])


class FlexExport:
    """What `to_flex` builds: the BlockMask's tile classes, and the mask_mod (whose lookup
    tables, for patterns without a closed form, are built only then)."""

    def __init__(self, call: Call, block: tuple[int, int], batches: list[dict]):
        self.call, self.batches, self.device = call, batches, torch.device("cpu")
        M, N = call.M, call.N
        bm, bn = block
        self.plans = [call.plan(block) if not call.pattern.ir.inputs else scan_plan(call, inputs, block)
                      for inputs in batches]
        fulls, partials = [], []
        for plan in self.plans:
            state = _tile_states(plan)
            full = state == 2
            edge = torch.zeros_like(full)  # [Note: edge tiles]
            if M % bm:
                edge[:, -1, :] = True
            if N % bn:
                edge[:, :, -1] = True
            fulls.append(full & ~edge)
            partials.append((state == 1) | (full & edge))
        self.full = _stack(fulls)  # [Bx, Hx, nq, nk]
        self.partial = _stack(partials)
        self.M, self.N, self.block = M, N, block

    def mask_mod(self):
        """The closed form where the pattern has one, else the lookup ([Note: mask_mod])."""
        return self._closed_form() or self._lookup()

    def _closed_form(self):
        from attnc.errors import AttnError

        call, M, N = self.call, self.M, self.N
        inputs = {n: torch.stack([b[n] for b in self.batches]) for n in (self.batches[0] if self.batches else {})}
        try:
            low = call.lowered(inputs={n: tuple(t.shape) for n, t in inputs.items()})
        except AttnError:
            return None
        fn = low.evaluator(inputs, self.device)
        Bx = len(self.batches)
        reads = bool(low.tables)

        def attnc_mask_mod(b, h, q_idx, kv_idx):
            inside = (q_idx < M) & (kv_idx < N)
            if reads:  # table lookups need indices in range
                q_idx, kv_idx = q_idx.clamp(0, M - 1), kv_idx.clamp(0, N - 1)
                b = b.clamp(0, Bx - 1) if Bx > 1 else b * 0
            return fn(q_idx, kv_idx, h, b) & inside

        return attnc_mask_mod

    def _lookup(self):
        states, slots, banks = [], [], []
        offset = 0
        for plan, inputs in zip(self.plans, self.batches):
            state, slot, bits = _plan_tables(self.call, plan, inputs)
            states.append(state)
            slots.append(torch.where(slot >= 0, slot + offset, -1))
            banks.append(bits)
            offset += bits.shape[0]
        state, slot = _stack(states).to(self.device), _stack(slots).to(self.device)
        bits = (torch.cat(banks) if offset else torch.zeros(1, *self.block, dtype=torch.bool)).to(self.device)
        M, N = self.M, self.N
        bm, bn = self.block
        Bx, Hx = state.shape[0], state.shape[1]

        def attnc_mask_mod(b, h, q_idx, kv_idx):
            qi = q_idx.clamp(0, M - 1)
            ki = kv_idx.clamp(0, N - 1)
            bi = b.clamp(0, Bx - 1) if Bx > 1 else b * 0
            hi = h.clamp(0, Hx - 1) if Hx > 1 else h * 0
            tq, tk = qi // bm, ki // bn
            st = state[bi, hi, tq, tk]
            bit = bits[slot[bi, hi, tq, tk].clamp(min=0), qi % bm, ki % bn]
            inside = (q_idx >= 0) & (q_idx < M) & (kv_idx >= 0) & (kv_idx < N)
            return ((st == 2) | ((st == 1) & bit)) & inside

        return attnc_mask_mod

    def block_mask(self, mask_mod, device):
        kv_num, kv_idx = _ordered(self.partial)
        full_num, full_idx = _ordered(self.full)
        bm = _flex().BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=self.block,
                                              mask_mod=mask_mod, seq_lengths=(self.M, self.N))
        return bm.to(device) if torch.device(device).type != "cpu" else bm

    def to(self, device) -> "FlexExport":
        self.device = torch.device(device)
        self.full, self.partial = self.full.to(device), self.partial.to(device)
        return self


class FlexExported(tuple):
    """`(mask_mod, block_mask)` -- unpacks as that pair -- with `score_mod` as an attribute:
    the pattern's score term for FlexAttention's `score_mod=` (None without one)."""

    score_mod = None

    def __new__(cls, mask_mod, block_mask, score_mod=None):
        out = super().__new__(cls, (mask_mod, block_mask))
        out.score_mod = score_mod
        return out

    @property
    def mask_mod(self):
        return self[0]

    @property
    def block_mask(self):
        return self[1]


def score_mod_of(call: Call, device):
    """FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)`` of the call's score term (its
    tables captured as they are, so gradients reach them), or None without a term.
    FlexAttention passes the scaled dot product, as attnc's `score` is."""
    fn = call.score
    if fn is None:
        return None
    tables = {n: t.to(device) for n, t in call.tables.items()}
    M, N = call.M, call.N

    def attnc_score_mod(score, b, h, q_idx, kv_idx):
        qi = q_idx.clamp(0, M - 1)
        ki = kv_idx.clamp(0, N - 1)
        return fn.pointwise(score, qi, ki, h, {n: t.to(score.dtype) for n, t in tables.items()})

    return attnc_score_mod


def to_flex(pat, M: int, N: int | None = None, *, heads: int | None = None, grid=None, block=(128, 128),
            device="cpu", **inputs):
    """`(mask_mod, block_mask)` for FlexAttention, built from attnc's plan, with `.score_mod`.

    ``mask_mod(b, h, q_idx, kv_idx) -> bool`` is exact for every position (a
    lookup into the plan and the partial tiles' bits); ``block_mask`` is a
    ``BlockMask`` with ``BLOCK_SIZE=block`` whose full / partial tiles are the
    plan's. Pass run-time inputs as keywords (one plan per batch element), and the
    score term's tables too: the result's ``score_mod`` reads them (None when the
    pattern has no score term).

    >>> mask_mod, bm = pat.to_flex(4096, heads=8, block=(128, 128))
    >>> out = torch.compile(flex_attention)(q, k, v, block_mask=bm)
    >>> ex = nat.to_flex(grid=(32, 32), heads=4, rpb=table)
    >>> out = flex_attention(q, k, v, block_mask=ex.block_mask, score_mod=ex.score_mod)
    """
    M, N, H, grid = pat.resolve_sizes(M, N, heads, grid)
    from attnc.tiles import check_block
    block = check_block(block, pat.layout, M, N)
    if isinstance(block[0], tuple):
        raise ValueError(f"block: a BlockMask has 1-D tiles (BLOCK_SIZE), got N-D tiles {block!r}; try block=(128, 128)")
    table_names = {t.name for t in pat.ir.tables}
    pat.check_input_names(inputs, tables=True)
    tables = {n: inputs.pop(n) for n in list(inputs) if n in table_names}
    batches, _ = pat.input_batches(M, N, H, inputs)
    call = Call(pattern=pat, B=len(batches), Hq=H, Hkv=H, M=M, N=N, D=1, Dv=1, grid=grid, scale=1.0, inputs=dict(inputs),
                tables=tables)
    if tables:
        from .validate import check_tables
        from .torch_backend import check_table_indices
        check_tables(pat, tables, M, N, H, grid, torch.device(device))
        check_table_indices(call)
    export = FlexExport(call, block, batches).to(device)
    mask_mod = export.mask_mod()
    return FlexExported(mask_mod, export.block_mask(mask_mod, device), score_mod_of(call, device))


# ----------------------------------------------------------------------------- the backend


#: (mask_mod, BlockMask) per pattern, size and device; bounded ([Note: cache limits] in attnc/lru.py)
_EXPORTS = LRU("flex_exports", 16, "FlexAttention mask_mods and BlockMasks (per pattern and size)")
_compiled = None


def _compiled_flex():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_flex().flex_attention, dynamic=False)
    return _compiled


class FlexBackend(Backend):
    """FlexAttention (compiled) with attnc's BlockMask. Forward only on CPU:
    FlexAttention has no CPU backward and no CPU logsumexp."""

    name = "flex"
    block = (128, 128)
    scores = True

    def can_run(self, call: Call, q: torch.Tensor) -> str | None:
        try:
            _flex()
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention; try backend='torch'"
        if any(isinstance(n, ir.TopK) for n in ir.walk(call.pattern.ir.body)):
            return "topk(...) is dynamic (issue 6): FlexAttention export needs a static or input-driven plan"
        if q.device.type == "cpu":
            if call.needs_grad:
                return "FlexAttention has no backward on CPU; try backend='torch' for training on CPU"
            if call.needs_lse:
                return "FlexAttention on CPU cannot return the logsumexp; try backend='torch' or return_lse=False"
            if q.dtype == torch.float64:
                return "FlexAttention on CPU supports float32, float16 and bfloat16, got float64; try backend='torch'"
        return None

    def _export(self, call: Call, device):
        """(mask_mod, BlockMask), cached by pattern, sizes and device -- and, with run-time
        inputs, by their content (a training step's forward and backward, repeated packed
        batches: [Note: input schedules] in schedules.py)."""
        key = (call.pattern.ir, call.M, call.N, call.Hq, call.grid, self.block, str(device))
        batches = [{}]
        if call.pattern.ir.inputs:
            batches, _ = call.pattern.input_batches(call.M, call.N, call.Hq, dict(call.inputs), batch=call.B)
            key += tuple(inputs_digest(b) for b in batches)

        def build():
            export = FlexExport(call, self.block, batches).to(device)
            mask_mod = export.mask_mod()
            return mask_mod, export.block_mask(mask_mod, device)

        return _EXPORTS.get(key, build)

    def _run(self, call: Call, q, k, v, lse: bool):
        _, block_mask = self._export(call, q.device)
        kw = dict(block_mask=block_mask, scale=call.scale, enable_gqa=call.Hq != call.Hkv)
        if call.score is not None:
            kw["score_mod"] = score_mod_of(call, q.device)
        if not lse:
            return _compiled_flex()(q, k, v, **kw), None
        fa = _flex()
        if hasattr(fa, "AuxRequest"):
            out, aux = _compiled_flex()(q, k, v, return_aux=fa.AuxRequest(lse=True), **kw)
            return out, aux.lse
        return _compiled_flex()(q, k, v, return_lse=True, **kw)

    def forward(self, call: Call, q, k, v):
        cpu = q.device.type == "cpu"
        out, lse = self._run(call, q, k, v, lse=not cpu)
        if lse is None:  # CPU: FlexAttention computes no logsumexp (call.needs_lse is False here)
            lse = torch.full(q.shape[:-1], float("nan"), dtype=torch.float32, device=q.device)
        else:
            out = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(out), out)
        return out, lse

    def backward(self, call: Call, q, k, v, out, lse, dout, dlse=None):
        # [Note: flex backward] backward needs only the saved out and lse, so the
        # torch path's block-sparse recompute serves; FlexAttention's autograd
        # cannot run inside a custom op's kernel (autograd is below it there).
        if torch.isnan(lse).any():
            raise ValueError("flex backward: expected the logsumexp of the forward, got NaN (FlexAttention on CPU "
                             "computes none); try backend='torch'")
        from .torch_backend import backward
        return backward(call, q, k, v, out, lse, dout, dlse)
