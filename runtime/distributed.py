"""Sparse-aware context parallelism on torch.distributed (public as `attnc.distributed`).

input:  a bound pattern and its sizes (a `Layout`, planned identically on every rank), this
        rank's shard of q / k / v, a process group.
output: this rank's out (and lse), differentiable: backward returns dq / dk / dv of the
        shard (and the score tables' gradients of this rank's rows).
does not: choose shards (attnc/sharding.py), or compute attention (the torch path's
        `run_forward` / `run_backward` do, on a restricted schedule).

[Note: the exchange] Every rank plans the same `Sharding` from the same plan, so every
rank knows, without asking, which of its rows each other rank needs (a row: one token of
one key/value head; a head mixture needs different tiles per head). K and V, packed as
rows [Hkv * n, B, D + Dv], go out in one `all_to_all_single` whose splits are those row
counts -- nothing else is sent, and nothing at all when no rank needs another's rows. The
received rows and the rank's own needed rows are laid out as the key tiles of the
restricted schedule ([Note: restricted schedules] in runtime/schedules.py), so
each local row is computed exactly as in one process. Backward runs the same exchange in
reverse: the gradients of the gathered K / V go back to the ranks that own them, which add
them to their own (a token needed by several ranks gets the sum). Gradients travel in the
accumulation dtype (float32 for 16-bit inputs), so the sum is rounded once, as in one
process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from attnc.sharding import STRATEGIES, LinkModel, Sharding, ShardReport, shard

from . import schedules as sc
from . import torch_backend as tb
from .ops import make_call, probe_call

__all__ = ["Layout", "layout", "attention", "gather", "STRATEGIES", "LinkModel", "Sharding", "ShardReport"]


def _global(t: torch.Tensor, L: int) -> torch.Tensor:
    """A tensor that looks like `t` at sequence length L, without memory (validation only)."""
    B, H, _, D = t.shape
    return t.new_empty(()).expand(B, H, L, D)


@dataclass(frozen=True)
class _Exchange:
    """One rank's side of [Note: the exchange]; a row is one token of one key/value head."""

    send_index: torch.Tensor  # int64: own rows sent, grouped by destination rank
    send_counts: list
    recv_counts: list
    src_index: torch.Tensor  # int64: gathered row -> row of cat(own rows, received rows, one zero row)
    own_rows: int
    q_tiles: np.ndarray
    k_tiles: torch.Tensor  # int64 [classes, gathered key tiles], -1 padded (schedules.restrict)
    silent: bool  # no rank receives anything: skip the collective


class Layout:
    """Which positions every rank holds, and what it exchanges (build with `layout(...)`).

    The same on every rank: build it with the same arguments everywhere (the run-time
    inputs included, e.g. the packed documents of this step)."""

    def __init__(self, pattern, sharding: Sharding, grid, inputs: dict, batch: int):
        self.pattern = pattern
        self.sharding = sharding
        self.grid = grid
        self.inputs = inputs
        self.batch = batch
        self._exchanges: dict = {}
        self._schedules: dict = {}
        self.verified = False  # every rank checked to hold the same layout (`_verify`)
        #: bytes this process sent and received through `attention`, by direction
        self.exchanged = {"forward_sent": 0, "forward_received": 0, "backward_sent": 0, "backward_received": 0}

    @property
    def N(self) -> int:
        return self.sharding.N

    @property
    def ranks(self) -> int:
        return self.sharding.ranks

    @property
    def heads(self) -> int:
        return self.sharding.heads

    def __repr__(self) -> str:
        return (f"Layout({self.pattern.name}, N={self.N}, ranks={self.ranks}, tile={self.sharding.tile}, "
                f"strategy={self.sharding.strategy!r})")

    def positions(self, rank: int) -> torch.Tensor:
        """The sequence positions `rank` holds, ascending (e.g. for rotary embeddings)."""
        self._check_rank(rank)
        return torch.from_numpy(self.sharding.positions(rank))

    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """`rank`'s part of a full-length tensor `x` (positions along `dim`)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[dim] != self.N:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"shard: expected a tensor with {self.N} positions along dim {dim}, got {got}; "
                             f"try the full sequence, or pass dim=")
        return x.index_select(dim, self.positions(rank).to(x.device))

    def unshard(self, parts, dim: int = 2) -> torch.Tensor:
        """The full-length tensor from every rank's part (a list in rank order)."""
        if len(parts) != self.ranks:
            raise ValueError(f"unshard: expected {self.ranks} parts (one per rank), got {len(parts)}")
        cat = torch.cat(list(parts), dim)
        order = torch.cat([self.positions(r) for r in range(self.ranks)]).to(cat.device)
        out = torch.empty_like(cat)
        return out.index_copy_(dim, order, cat)

    def report(self, *, batch: int | None = None, head_dim: int = 128, head_dim_v: int | None = None,
               bytes_per_element: int = 2) -> ShardReport:
        """Predicted per-rank tokens, work and bytes (attnc/sharding.ShardReport) of a call
        with `batch` sequences (default: the run-time inputs' batch, else 1): bytes grow
        with the batch, as every sequence's rows travel."""
        return self.sharding.report(batch=batch or self.batch, head_dim=head_dim, head_dim_v=head_dim_v,
                                    bytes_per_element=bytes_per_element, name=self.pattern.name)

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.ranks:
            raise ValueError(f"rank: expected an integer in [0, {self.ranks}), got {rank!r}")

    def exchange(self, rank: int) -> _Exchange:
        """`rank`'s side of [Note: the exchange] (cached). Rows are numbered x * n + i on
        their owner (key/value head x, local token i of its n); a rank receives, from each
        source in rank order, per key/value class, per head, per tile, the tile's tokens."""
        if rank in self._exchanges:
            return self._exchanges[rank]
        s = self.sharding
        Hkv, bn, nt = s.kv_heads, s.tile, s.n_tiles
        lens = s.tile_tokens(np.arange(nt))
        start = np.zeros(nt, dtype=np.int64)  # the first local token of every tile, on its owner
        for r in range(s.ranks):
            t = s.tiles(r)
            start[t] = np.cumsum(lens[t]) - lens[t]

        def rows(tiles_by_class, n_owner):  # rows (on their owner) of these tiles, in exchange order
            out = [x * n_owner + start[t] + np.arange(lens[t])
                   for c, tiles in enumerate(tiles_by_class) for x in s.class_heads(c) for t in tiles]
            return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

        n = s.tokens(rank)
        sends = [rows(s.received(d, rank), n) for d in range(s.ranks)]
        first = np.full((Hkv, nt), -1, dtype=np.int64)  # where tile t of head x starts in cat(own, received)
        own = s.tiles(rank)
        first[:, own] = np.arange(Hkv)[:, None] * n + start[own][None, :]
        base = Hkv * n
        recv_counts = []
        for src in range(s.ranks):
            got = 0
            for c, tiles in enumerate(s.received(rank, src)):
                for x in s.class_heads(c):
                    first[x, tiles] = base + got + np.cumsum(lens[tiles]) - lens[tiles]
                    got += int(lens[tiles].sum())
            recv_counts.append(got)
            base += got
        zero = base  # the zero row: padding of short tiles and of heads that gathered fewer tiles
        need = s.need[rank]
        width = max(len(t) for t in need)
        src = np.full((Hkv, width, bn), zero, dtype=np.int64)
        k_tiles = np.full((len(need), width), -1, dtype=np.int64)
        for x in range(Hkv):
            tiles = need[0 if len(need) == 1 else x]
            k_tiles[0 if len(need) == 1 else x, :len(tiles)] = tiles
            r = first[x, tiles][:, None] + np.arange(bn)[None, :]
            src[x, :len(tiles)] = np.where(np.arange(bn)[None, :] < lens[tiles][:, None], r, zero)
        ex = _Exchange(send_index=torch.from_numpy(np.concatenate(sends)), send_counts=[len(x) for x in sends],
                       recv_counts=recv_counts, src_index=torch.from_numpy(src.reshape(-1)), own_rows=Hkv * n,
                       q_tiles=own, k_tiles=torch.from_numpy(k_tiles), silent=not s.traffic[0].any())
        self._exchanges[rank] = ex
        return ex

    def schedules(self, call, rank: int) -> list:
        """(batch slice, restricted schedule) pairs of `rank` for `call` (cached per rank and
        configuration)."""
        key = (rank, call.Hkv, call.B)
        if key not in self._schedules:
            ex = self.exchange(rank)
            self._schedules[key] = [(bs, sc.restrict(sched, ex.q_tiles, ex.k_tiles)) for bs, sched in sc.schedules(call, nd=False)]
        return self._schedules[key]


def layout(pattern, seq_len: int | None = None, *, ranks: int, heads: int = 1, kv_heads: int | None = None, grid=None,
           strategy: str = "auto", link: LinkModel = LinkModel(), **inputs) -> Layout:
    """Plan how `ranks` ranks share a sequence of `seq_len` tokens (or `grid`) for
    `pattern`: the positions each holds and the tokens each exchanges.

    `heads` / `kv_heads`: the query and key/value heads (GQA; per-head patterns plan each
    head and exchange each key/value head's own tiles); `inputs`: the pattern's
    run-time inputs for the whole sequence (segments of packed documents, block tables),
    the same on every rank; `strategy`: see [Note: balance] in attnc/sharding.py; `link`:
    the cost model `auto` chooses by.

    >>> import attnc, attnc.distributed as cp
    >>> lay = cp.layout(attnc.loads("pattern p = sliding(128)").pattern(), 4096, ranks=4)
    >>> lay.positions(1)[:3].tolist(), lay.report(head_dim=64).recv_bytes[1]
    ([1024, 1025, 1026], 32768)
    """
    if pattern.has_topk():
        raise ValueError(f"pattern '{pattern.name}' chooses blocks with topk from q and k, which no rank holds whole; "
                         f"expected a static pattern or one with run-time inputs; try routing once "
                         f"(pat.route(q, k)) and passing the routed pattern and its block tables")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads: expected a positive integer, got {heads!r}")
    if seq_len is None and grid is None:
        raise ValueError(f"layout: expected the sequence length (or grid=) of pattern '{pattern.name}', got neither; "
                         f"try layout(pat, 8192, ranks={ranks})")
    M, N, H, grid = pattern.resolve_sizes(seq_len, seq_len, heads, grid)
    from attnc.inputs import CuSeqlens

    names = [s.name for s in pattern.ir.inputs]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"layout: expected the run-time input{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} of pattern '{pattern.name}' for the whole sequence; try "
                         f"layout(pat, N, ranks=R, {missing[0]}=...)")
    pattern.check_input_names(inputs)  # unknown names: expected / got / try
    for n, t in inputs.items():
        if not isinstance(t, (torch.Tensor, CuSeqlens)):
            raise ValueError(f"{n}: expected a torch integer tensor for the whole sequence, got {type(t).__name__}; "
                             f"try torch.as_tensor({n})")
    inputs = {n: (t.segment_ids(N, n) if isinstance(t, CuSeqlens) else t) for n, t in inputs.items()}
    batch = len(pattern.input_batches(N, N, H, inputs)[0])  # the batch rule of every call ([Note: input batches])
    plans = [p for _, p in sc.plans(probe_call(pattern, N, N, H, grid, inputs, batch))]
    return Layout(pattern, shard(plans, ranks, kv_heads=kv_heads, strategy=strategy, link=link), grid, inputs, batch)


def _rank_of(layout: Layout, group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("attnc.distributed.attention: expected an initialised torch.distributed process group; "
                         "try torch.distributed.init_process_group('gloo' or 'nccl', ...)")
    R = dist.get_world_size(group)
    if R != layout.ranks:
        raise ValueError(f"expected a process group of {layout.ranks} ranks (the layout's), got {R}; "
                         f"try layout(..., ranks={R})")
    return dist.get_rank(group)


def attention(layout: Layout, q, k, v, *, group=None, scale: float | None = None, return_lse: bool = False,
              **tables):
    """This rank's attention output for its shard of q [B, Hq, n, D], k / v [B, Hkv, n, D]
    (n = `len(layout.positions(rank))`), computed with only the key/value tokens its
    queries need ([Note: the exchange]); differentiable. `tables`: the score term's tables
    (each rank passes the same; their gradients are this rank's part, summed over ranks by
    the data-parallel all-reduce as for any replicated parameter)."""
    rank = _rank_of(layout, group)
    # first, on every rank alike: a rank that raised before this collective would hang the others
    _verify(layout, group, q.device if isinstance(q, torch.Tensor) else "cpu")
    n = layout.sharding.tokens(rank)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2] != n:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected this rank's shard, {n} positions along dim 2 (rank {rank} of the layout), "
                             f"got {got}; try layout.shard(x, {rank})")
    if (q.shape[1], k.shape[1]) != (layout.heads, layout.sharding.kv_heads):
        raise ValueError(f"expected {layout.heads} query and {layout.sharding.kv_heads} key/value heads (the layout's), "
                         f"got q {q.shape[1]} and k {k.shape[1]}; try layout(..., heads={q.shape[1]}, kv_heads={k.shape[1]})")
    table_names = [t.name for t in layout.pattern.ir.tables]
    unknown = sorted(set(tables) - set(table_names))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a table of pattern '{layout.pattern.name}' (its tables: "
                         f"{', '.join(table_names) or 'none'})")
    N = layout.N
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tables.values()))
    call = make_call(layout.pattern, _global(q, N), _global(k, N), _global(v, N), layout.inputs, layout.grid, scale,
                     needs_grad, True, None, tables)
    if call.score is not None and call.score.reads:
        tb.check_table_indices(call)
    ts = [tables[n] for n in table_names]
    out, lse = _Attend.apply(_State(layout, call, rank, group), q, k, v, *ts)
    return (out, lse) if return_lse else out


def _verify(layout: Layout, group, device) -> None:
    """Once per layout: check that every rank planned the same one (a rank given other
    inputs or sizes would exchange the wrong tokens and compute silently wrong rows)."""
    if layout.verified:
        return
    sh = layout.sharding
    h = hashlib.blake2b(sh.owner.tobytes(), digest_size=8)
    for per_class in sh.need:  # what every rank sends and receives
        for tiles in per_class:
            h.update(tiles.tobytes() + b"|")
    for n in sorted(layout.inputs):
        h.update(n.encode() + layout.inputs[n].detach().cpu().contiguous().numpy().tobytes())
    h.update(repr((layout.pattern.text(), layout.N, layout.grid, sh.heads, sh.kv_heads, layout.batch)).encode())
    mine = torch.tensor([int.from_bytes(h.digest(), "little") >> 1], dtype=torch.int64, device=device)  # NCCL: on q's GPU
    all_ = [torch.zeros_like(mine) for _ in range(layout.ranks)]
    dist.all_gather(all_, mine, group=group)
    if any(int(t) != int(mine) for t in all_):
        differ = [r for r, t in enumerate(all_) if int(t) != int(all_[0])]
        raise ValueError(f"expected every rank to build its layout from the same pattern, sizes and run-time inputs, "
                         f"got different layouts on ranks {differ} (rank 0's differs from theirs); try building it "
                         f"from the same arguments everywhere (e.g. broadcast the packed documents first)")
    layout.verified = True


@dataclass(frozen=True)
class _State:
    layout: Layout
    call: object
    rank: int
    group: object


def _send(state: _State, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gathered k / v [B, Hkv, gathered tiles * tile, D] of this rank's queries:
    own rows and received rows laid out as the restricted schedule's key tiles."""
    ex = state.layout.exchange(state.rank)
    x = _rows(k, v)
    send = x.index_select(0, ex.send_index.to(x.device))
    recv = x.new_empty((sum(ex.recv_counts),) + tuple(x.shape[1:]))
    if not ex.silent:
        dist.all_to_all_single(recv, send, ex.recv_counts, ex.send_counts, group=state.group)
        _count(state, "forward", send, recv)
    buf = torch.cat([x, recv, x.new_zeros((1,) + tuple(x.shape[1:]))]).index_select(0, ex.src_index.to(x.device))
    return _unrows(buf, k.shape[1], k.shape[-1])


def _send_back(state: _State, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of `_send`: the gathered rows' gradients back to their owners, summed."""
    ex = state.layout.exchange(state.rank)
    g = _rows(dk, dv)
    cat = g.new_zeros((ex.own_rows + sum(ex.recv_counts) + 1,) + tuple(g.shape[1:]))
    cat.index_add_(0, ex.src_index.to(g.device), g)
    own, back = cat[:ex.own_rows], cat[ex.own_rows:-1].contiguous()
    got = g.new_empty((sum(ex.send_counts),) + tuple(g.shape[1:]))
    if not ex.silent:
        dist.all_to_all_single(got, back, ex.send_counts, ex.recv_counts, group=state.group)
        _count(state, "backward", back, got)
        own.index_add_(0, ex.send_index.to(g.device), got)
    return _unrows(own, dk.shape[1], dk.shape[-1])


def _count(state: _State, direction: str, sent: torch.Tensor, received: torch.Tensor) -> None:
    state.layout.exchanged[f"{direction}_sent"] += sent.numel() * sent.element_size()
    state.layout.exchanged[f"{direction}_received"] += received.numel() * received.element_size()


def _rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v [B, Hkv, n, D] -> rows [Hkv * n, B, D + Dv] (row x * n + i: head x, token i)."""
    x = torch.cat([k, v], -1).permute(1, 2, 0, 3)
    return x.reshape(-1, *x.shape[2:])


def _unrows(rows: torch.Tensor, Hkv: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = rows.view(Hkv, -1, *rows.shape[1:]).permute(2, 0, 1, 3)
    return x[..., :D].contiguous(), x[..., D:].contiguous()


class _Attend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state: _State, q, k, v, *tables):
        call = state.call
        kg, vg = _send(state, k, v)
        B, Hq, n, _ = q.shape
        out = q.new_zeros(B, Hq, n, v.shape[-1])
        lse = torch.full((B, Hq, n), float("-inf"), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                         device=q.device)
        for bs, sched in state.layout.schedules(call, state.rank):
            out[bs], lse[bs] = tb.run_forward(sched, call, q[bs], kg[bs], vg[bs])
        ctx.state = state
        ctx.save_for_backward(q, kg, vg, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        state, call = ctx.state, ctx.state.call
        q, kg, vg, out, lse = ctx.saved_tensors
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        tables = call.score_tables(acc, q.device)
        dtables = {n: torch.zeros_like(t) for n, t in tables.items()}
        # gradients stay in the accumulation dtype until summed on their owner: a 16-bit
        # gradient rounded before the sum would differ from one process by an ulp
        kg, vg = kg.to(acc), vg.to(acc)
        dq, dkg, dvg = torch.zeros_like(q), torch.zeros_like(kg), torch.zeros_like(vg)
        dout = dout.contiguous()
        for bs, sched in state.layout.schedules(call, state.rank):
            dq[bs], dkg[bs], dvg[bs] = tb.run_backward(sched, call, q[bs], kg[bs], vg[bs], out[bs], lse[bs], dout[bs],
                                                        None if dlse is None else dlse[bs], tables, dtables)
        dk, dv = _send_back(state, dkg, dvg)
        # the tables came in declaration order (`attention`), whatever order the caller named them in
        names = [t.name for t in call.pattern.ir.tables]
        return (None, dq, dk.to(q.dtype), dv.to(q.dtype), *(dtables[n].to(call.tables[n].dtype) for n in names))


def gather(layout: Layout, x: torch.Tensor, *, group=None, dim: int = 2) -> torch.Tensor:
    """The full-length tensor from every rank's part of it (all_gather; not differentiable):
    for evaluation and tests, not for the training step."""
    rank = _rank_of(layout, group)
    n = [layout.sharding.tokens(r) for r in range(layout.ranks)]
    if x.shape[dim] != n[rank]:
        raise ValueError(f"gather: expected this rank's {n[rank]} positions along dim {dim}, got shape {tuple(x.shape)}")
    width = max(n)
    pad = list(x.shape)
    pad[dim] = width - n[rank]
    xp = torch.cat([x, x.new_zeros(pad)], dim).contiguous()
    parts = [torch.empty_like(xp) for _ in range(layout.ranks)]
    dist.all_gather(parts, xp, group=group)
    return layout.unshard([p.narrow(dim, 0, m) for p, m in zip(parts, n)], dim)

