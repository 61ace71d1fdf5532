"""The block-sparse PyTorch path: attention driven by the tile plan, on any device.

input:  a validated `Call`, q / k / v (and for backward out, lse, dout, dlse).
output: out, lse (forward); dq, dk, dv (backward), per the `Backend` contract.
does not: validate tensors (ops.py), choose tiles (tile_choice.py), build its key ranges
        (key_ranges.py, [Note: schedule]), or decide masks itself: every mask bit of
        a partial tile comes from `schedules.partial_tile_masks`, the one place masks come from.

[Note: backward] Nothing of size N^2 is saved: backward reads the same key ranges,
recomputes P = exp(S - lse) from the saved lse, and with
delta = rowsum(dout * out) - dlse forms dS = P * (dout @ v^T - delta);
dq of a unit is written once; dk / dv of a group are added back with one add into
its key block when the chunk shares one, else one index_add_ (deterministic on CPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from attnc import ir
from attnc.lru import LRU, memoize

from .backend import Backend, Call
from .key_ranges import Chunk, Group, Schedule
from .schedules import inputs_digest, schedules
from .tile_choice import CONFIG, TorchPathConfig


# ----------------------------------------------------------------------------- the computation


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


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
    """q / k / v padded to whole tiles. Queries move as tiles ([tiles, bm, D] views,
    index_select / index_copy_ along dim 0); keys as the groups' key ranges: strided views
    of the padded k / v when the group's starts step evenly, else gathered rows
    ([Note: schedule] in runtime/key_ranges.py).
    """

    def __init__(self, sched: Schedule, call: Call, q, k, v, acc):
        bm, bn = sched.block
        B, Hq, Hkv = q.shape[0], call.Hq, call.Hkv
        G = Hq // Hkv
        dev = q.device
        self.B, self.Hkv, self.acc = B, Hkv, acc
        self.X = Hkv if sched.shared else 1
        self.Gu = G if sched.shared else 1
        self.bm, self.bn = bm, bn
        self.Mp, self.Np = sched.nq * bm, sched.nk * bn
        self.q = _pad(q, self.Mp).to(acc)
        self.k = _pad(k, self.Np).to(acc)
        self.v = _pad(v, self.Np).to(acc)
        # query tiles of one (batch, head group): shared -> per (b, x, g) nq tiles; per-head ->
        # all Hq * nq tiles of b. Key rows: Hkv * Np per batch element, Np per key/value head.
        if sched.shared:
            self.q_base = (torch.arange(B * self.X * self.Gu, device=dev) * sched.nq).view(B, self.X, 1, self.Gu)
            self.k_base = (torch.arange(B * self.X, device=dev) * self.Np).view(B, self.X, 1, 1)
        else:
            self.q_base = (torch.arange(B, device=dev) * Hq * sched.nq).view(B, 1, 1, 1)
            self.k_base = (torch.arange(B, device=dev) * Hkv * self.Np).view(B, 1, 1, 1)

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

    def key_rows(self, group: Group) -> torch.Tensor:
        """The group's key rows in the flat [B * Hkv * Np, D] keys, order (b, x, c, column)."""
        local = group.rows if group.rows is not None else group.starts[:, None] + torch.arange(
            group.length, device=group.starts.device)
        return (self.k_base + local.view(1, 1, -1, group.length)).reshape(-1)

    def keys(self, t: torch.Tensor, group: Group) -> torch.Tensor:
        """The group's keys of padded `t` (k or v, [B, Hkv, Np, D] contiguous): [B, X, c, L, D],
        a strided view when the group's starts step evenly, else a gathered copy."""
        c, L, D = group.starts.numel(), group.length, t.shape[-1]
        if group.view:
            return t.as_strided((self.B, self.X, c, L, D), (self.Hkv * self.Np * D, self.Np * D, group.step * D, D, 1),
                                t.storage_offset() + group.start * D)
        return t.view(-1, D).index_select(0, self.key_rows(group)).view(self.B, self.X, c, L, D)

    def add_keys(self, t: torch.Tensor, group: Group, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
        """Add scale * a^T @ b per unit (a: [B, X, c, R, L], b: [B, X, c, R, D]: the gradient of
        the group's keys) into padded `t` ([B, Hkv, Np, D])."""
        B, X, c, R, L = a.shape
        D = t.shape[-1]
        if group.view and group.step == 0:  # one key block for the whole chunk: one matmul, one add
            val = _bmm(a.reshape(B, X, c * R, L).transpose(-1, -2), b.reshape(B, X, c * R, D))
            self.keys(t, group)[:, :, 0].add_(val, alpha=scale)
            return
        val = _bmm(a.transpose(-1, -2), b)
        t.view(-1, D).index_add_(0, self.key_rows(group), val.reshape(-1, D), alpha=scale)


def _matmul(a: torch.Tensor, b: torch.Tensor, group: Group) -> torch.Tensor:
    """a @ b over [B, X, c] for a group's key block `b` (or its transpose), without copying
    a strided view: one key block for the chunk (step 0) is one matmul of all its rows;
    evenly stepped blocks run one batched matmul per (batch, head group)."""
    B, X, c, R, _ = a.shape
    if not group.view or B * X == 1:
        return _bmm(a, b)
    if group.step == 0:
        return _bmm(a.reshape(B, X, c * R, a.shape[-1]), b[:, :, 0]).view(B, X, c, R, b.shape[-1])
    out = a.new_empty(B, X, c, R, b.shape[-1])
    for i in range(B):
        for j in range(X):
            torch.bmm(a[i, j], b[i, j], out=out[i, j])
    return out


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over equal leading dimensions, as one torch.bmm on 3-D views. [Note: bmm] On
    CPU, torch.matmul of 4-D / 5-D operands with a transposed second operand ran at half
    the speed of torch.bmm on the same memory (43 vs 92 GFLOP/s for [512, 64] @ [64, 2048],
    torch 2.13, this project's machine)."""
    lead = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*lead, *out.shape[-2:])


def _keys_t(kc: torch.Tensor) -> torch.Tensor:
    return kc.transpose(-1, -2)


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    L = t.shape[2]
    if L == length:
        return t.contiguous()
    return torch.nn.functional.pad(t, (0, 0, 0, length - L))


def _scores(qc, kc, group: Group, Gu: int, bm: int, score=None) -> torch.Tensor:
    """q_chunk @ k_chunk^T (then the score term `score(s)`, if any) with the group's
    masked columns applied (-inf)."""
    s = _matmul(qc, _keys_t(kc), group)  # [B, X, c, G'bm, L]
    if score is not None:
        s = score(s)
    return _mask_(s, group, Gu, bm, fill=score is not None)


def _mask_(s, group: Group, Gu: int, bm: int, fill: bool = False) -> torch.Tensor:
    """`s` with the group's masked columns set to -inf in place: by adding the -inf bias to
    dot products (finite), by masked_fill_ after a score term (it may be NaN or inf on a
    masked pair, e.g. (q - k) ** 0.5 above the diagonal)."""
    if group.masks:
        B, X, c, R, K = s.shape
        sv = s.view(B, X, c, Gu, bm, K)
        for c0, c1, blocked, bias in group.masks:
            if fill:
                sv[..., c0:c1].masked_fill_(blocked, float("-inf"))
            else:
                sv[..., c0:c1].add_(bias.to(s.dtype))
    return s


# ----------------------------------------------------------------------------- score terms


def _pairs(call: Call, sched: Schedule, chunk: Chunk, group: Group, Gu: int, X: int, device):
    """Query rows, keys and heads of a group's scores, shaped to broadcast with them
    viewed as [B, X, c, G', bm, L]. Rows and keys run past M and N in padded tiles and
    masked columns: clamp them before evaluating the term (`_clamped`), compare them to keep pairs."""
    bm = sched.block[0]
    c = chunk.q.numel()
    qt = chunk.q.to(device)
    qg = qt % sched.nq
    if sched.q_tiles is not None:  # a restricted schedule: global positions ([Note: restricted schedules])
        qg = sched.q_tiles.to(device)[qg]
    rows = (qg[:, None] * bm + torch.arange(bm, device=device)).view(1, 1, c, 1, bm, 1)
    keys = group.keys.to(device)
    keys = keys if keys.dim() == 2 else keys[:, None] + torch.arange(group.length, device=device)
    keys = keys.view(1, 1, c, 1, 1, -1)
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
        bm = sched.block[0]
        for chunk in sched.chunks:
            c = chunk.q.numel()
            for group in chunk.groups:
                rows, keys, heads = _pairs(call, sched, chunk, group, Gu, X, torch.device("cpu"))
                ok = (rows < call.M) & (keys < call.N)
                rows, keys = _clamped(call, rows, keys)
                if group.masks:
                    ok = ok & group.allowed(c, bm).view(1, 1, c, 1, bm, group.length)
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
    out_p = torch.zeros(w.B, call.Hq, w.Mp, v.shape[-1], dtype=acc, device=q.device)
    lse_p = torch.full((w.B, call.Hq, w.Mp, 1), float("-inf"), dtype=acc, device=q.device)
    tout, tlse = w.flat(out_p, w.bm), w.flat(lse_p, w.bm)
    tables = call.score_tables(acc, q.device)
    # [Note: base 2] without a score term, scores are kept in base 2 (q scaled by scale * log2 e):
    # exp2 of (s - max) needs no multiply per score, and lse = (max + log2 l) * ln 2
    log2 = call.score is None
    unit = _LOG2E if log2 else 1.0
    for chunk in sched.chunks:
        c = chunk.q.numel()
        qi = w.q_index(chunk)
        qc = w.gather_q(tq, qi, c).mul_(call.scale * unit)
        m_i = l_i = o_i = None
        for group in chunk.groups:
            step = _score_step(call, sched, chunk, group, w, tables)
            s = _scores(qc, w.keys(w.k, group), group, w.Gu, w.bm, None if step is None else step.apply)
            vc = w.keys(w.v, group)
            m_new = s.amax(-1, keepdim=True)
            if m_i is not None:
                m_new = torch.maximum(m_new, m_i)
            # [Note: empty rows] a row with nothing allowed so far has max -inf; use 0 there
            m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
            p = s.sub_(m_safe).exp2_() if log2 else _exp_(s.sub_(m_safe))
            if m_i is None:
                l_i = p.sum(-1, keepdim=True)
                o_i = _matmul(p, vc, group)
            else:
                alpha = torch.exp2(m_i - m_safe) if log2 else torch.exp(m_i - m_safe)
                l_i = l_i.mul_(alpha).add_(p.sum(-1, keepdim=True))
                o_i = o_i.mul_(alpha).add_(_matmul(p, vc, group))
            m_i = m_safe
        empty = l_i == 0
        o_i = o_i.div_(l_i.masked_fill(empty, 1.0))
        lse_c = (m_i + torch.log2(l_i)).mul_(_LN2) if log2 else m_i + torch.log(l_i)
        lse_c = lse_c.masked_fill_(empty, float("-inf"))
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
                                                  tables, dtables, config)
            continue
        lay = sched.layout
        pq, pk = _positions(lay, q.device)
        qp, kp, vp = _into(lay, pq, pk, q[bs], k[bs], v[bs])
        # padding rows: zero q and dO, lse -inf (no key), so they add nothing to dK / dV
        g = run_backward(sched, call, qp, kp, vp, _put(out[bs], pq, lay.M), _put(lse[bs], pq, lay.M, float("-inf")),
                         _put(dout[bs], pq, lay.M), None if d is None else _put(d, pq, lay.M), tables, dtables, config)
        dq[bs], dk[bs], dv[bs] = g[0][:, :, pq], g[1][:, :, pk], g[2][:, :, pk]
    if call.score is not None:
        return dq, dk, dv, dtables
    return dq, dk, dv


def run_backward(sched: Schedule, call: Call, q, k, v, out, lse, dout, dlse, tables: dict, dtables: dict,
                 config: TorchPathConfig = CONFIG):
    """dq, dk, dv of one schedule's rows (see `run_forward`), adding the score tables'
    gradients into `dtables`. Backward holds four score-sized blocks where forward holds
    one or two, so it runs each chunk in parts of at most `backward_chunk_elements`
    score elements (`_parts`)."""
    acc = _acc_dtype(q.dtype)
    sched = _on_device(sched, q.device)
    w = _Views(sched, call, q, k, v, acc)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    log2 = call.score is None  # [Note: base 2]
    unit = _LOG2E if log2 else 1.0
    lse_safe = lse.to(acc).masked_fill(torch.isinf(lse), 0.0) * unit
    row = _pad(torch.stack([lse_safe, delta], -1), w.Mp)  # [B, Hq, Mp, 2]
    do_p = _pad(dout, w.Mp).to(acc)
    tq, tdo, trow = w.flat(w.q, w.bm), w.flat(do_p, w.bm), w.flat(row, w.bm)
    dq_p = torch.zeros_like(w.q)
    dk_p, dv_p = torch.zeros_like(w.k), torch.zeros_like(w.v)
    tdq = w.flat(dq_p, w.bm)
    for chunk in _parts(sched, w, config.backward_chunk_elements):
        c = chunk.q.numel()
        qi = w.q_index(chunk)
        qc = w.gather_q(tq, qi, c)
        qs = qc * (call.scale * unit)
        doc = w.gather_q(tdo, qi, c)
        rc = w.gather_q(trow, qi, c)
        lse_c, delta_c = rc[..., :1], rc[..., 1:]
        dqc = torch.zeros_like(qc)
        for group in chunk.groups:
            kc, vc = w.keys(w.k, group), w.keys(w.v, group)
            step = _score_step(call, sched, chunk, group, w, tables)
            if step is None:
                p = _scores(qs, kc, group, w.Gu, w.bm).sub_(lse_c).exp2_()
                ds = _matmul(doc, _keys_t(vc), group).sub_(delta_c).mul_(p)
            else:
                p, ds = _score_backward(step, qs, kc, vc, doc, lse_c, delta_c, group, w, dtables)
            dqc += _matmul(ds, kc, group)
            w.add_keys(dk_p, group, ds, qc, call.scale)
            w.add_keys(dv_p, group, p, doc)
        w.scatter_q(tdq, qi, dqc.mul_(call.scale))
    M, N = q.shape[2], k.shape[2]  # call.M and call.N, or a rank's rows and keys (restricted schedules)
    return dq_p[:, :, :M].to(q.dtype), dk_p[:, :, :N].to(k.dtype), dv_p[:, :, :N].to(v.dtype)


def _parts(sched: Schedule, w: _Views, budget: int):
    """The schedule's chunks, each cut into runs of consecutive units whose score blocks hold
    at most `budget` elements per batch element (a part of a view stays a view)."""
    for chunk in sched.chunks:
        c = chunk.q.numel()
        per_unit = w.X * w.Gu * w.bm * max(g.length for g in chunk.groups)
        n = max(1, budget // per_unit)
        if n >= c:
            yield chunk
            continue
        for u0 in range(0, c, n):
            part = slice(u0, min(c, u0 + n))
            yield Chunk(q=chunk.q[part], groups=tuple(g.take(part) for g in chunk.groups))


def _score_backward(step, qs, kc, vc, doc, lse_c, delta_c, group, w, dtables):
    """(P, the gradient with respect to the raw scores `qs @ kc^T` through the score term),
    adding the tables' gradients to `dtables` (codegen/score.ScoreFn.backward)."""
    raw = _matmul(qs, _keys_t(kc), group)
    s = step.apply(raw.clone())
    p = _exp_(_mask_(s, group, w.Gu, w.bm, fill=True).sub_(lse_c))
    ds = _matmul(doc, _keys_t(vc), group).sub_(delta_c).mul_(p)  # d loss / d score term
    return p, step.backward(raw, ds, dtables)


@memoize("device_schedules", 8, "torch-path schedules copied to an accelerator")
def _on_device(sched: Schedule, device: torch.device) -> Schedule:
    """The schedule's tables on `device` (kept while the schedule is in use)."""
    if device.type == "cpu":
        return sched
    chunks = tuple(Chunk(q=ch.q.to(device), groups=tuple(g.to(device) for g in ch.groups)) for ch in sched.chunks)
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
