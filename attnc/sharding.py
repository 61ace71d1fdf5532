"""Context parallelism, planned: which query tiles each rank owns, which key tiles it must
receive, and how much work and traffic that makes.

input:  tile plans (plans.Plan, 1-D tiles, M == N) of one call, the number of ranks,
        a strategy and a link model.
output: a `Sharding` (owner of every tile, per rank its tiles, visited tiles, needed key
        tiles) and its `ShardReport` (tokens, work, bytes per rank; plain ring attention's
        figures beside them).
does not: communicate or compute attention (runtime/distributed.py does, from this), or
        build plans (analysis.py).

[Note: shards] A rank owns whole tiles of the sequence: its queries *and* the keys /
values at the same positions (self-attention, as the model's layers produce them). The
plan says, for every query tile, which key tiles it visits; the union over a rank's query
tiles is the set of key tiles it needs, and those owned by other ranks are the only
tokens it receives. A sliding window therefore receives its neighbours' edges, O(window)
per rank, where ring attention passes every shard around the ring, O(N) per rank. Every
rank computes its rows completely (no partial results to merge), exactly as one process
would: the same plan, the same tile masks ([Note: restricted schedules] in
runtime/torch_backend.py).

[Note: balance] Which tiles a rank owns is chosen from the plan's per-tile work
(visited tiles, summed over heads and batch elements):
  contiguous  R ranges of (nearly) equal token counts: the least traffic for local patterns;
  balanced    R contiguous ranges of (nearly) equal work (prefix sums of the work);
  zigzag      2R equal ranges, rank r owning ranges r and 2R-1-r: causal attention's
              classic balance (work that grows along the sequence pairs with work that shrinks);
  auto        the candidate with the least predicted step time, max over ranks of
              work * FLOPs per tile + received bytes * `flops_per_byte` (the link model),
              ties going to fewer bytes in all.
The figures count key/value *rows* (one token of one key/value head): a head mixture
(`heads { }`) exchanges each key/value head's own tiles.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import numpy as np

STRATEGIES = ("auto", "contiguous", "balanced", "zigzag")


@dataclass(frozen=True)
class LinkModel:
    """What one byte received costs, in FLOPs of attention: a rank's FLOP rate over its
    link bandwidth. The default is an H100 on NVLink 4 (989 TFLOP/s bf16 over 450 GB/s per
    direction, about 2200); across nodes on 400 Gb/s InfiniBand it is about 20 000, on CPU
    ranks with gloo over loopback some tens."""

    flops_per_byte: float = 2200.0
    head_dim: int = 128
    bytes_per_element: int = 2


@dataclass(frozen=True, eq=False)
class Sharding:
    """Tiles per rank (see [Note: shards]). Tile t holds tokens t*tile .. min(N, (t+1)*tile) - 1.

    `need[r]` holds one ascending array of key tiles per *key/value class*: one class
    (every key/value head needs the same tiles) when every head has the same plan, else
    one per key/value head, so that a head mixture exchanges each head's own tiles only
    (a causal head needs everything before it, a sliding head only its window)."""

    N: int
    ranks: int
    tile: int
    heads: int
    kv_heads: int
    strategy: str
    owner: np.ndarray  # int64 [tiles]: the rank that owns each tile
    work: np.ndarray  # int64 [ranks]: visited (head, query tile, key tile) triples, summed over batch elements
    need: tuple  # per rank, per key/value class: ascending int64 key tiles its queries visit (its own included)
    candidates: dict = field(default_factory=dict)  # strategy -> (max work, predicted cost, received rows) compared

    @property
    def n_tiles(self) -> int:
        return len(self.owner)

    @property
    def classes(self) -> int:
        """1 (every key/value head needs the same tiles) or kv_heads."""
        return len(self.need[0])

    def class_heads(self, c: int) -> range:
        """The key/value heads of class c."""
        return range(self.kv_heads) if self.classes == 1 else range(c, c + 1)

    def tiles(self, rank: int) -> np.ndarray:
        """The tiles `rank` owns, ascending."""
        return np.flatnonzero(self.owner == rank)

    def tile_tokens(self, tiles: np.ndarray) -> np.ndarray:
        return np.minimum(self.tile, self.N - np.asarray(tiles, dtype=np.int64) * self.tile)

    def positions(self, rank: int) -> np.ndarray:
        """The sequence positions `rank` holds, ascending (its queries, keys and values)."""
        t = self.tiles(rank)
        if len(t) == 0:
            return np.zeros(0, dtype=np.int64)
        pos = (t[:, None] * self.tile + np.arange(self.tile)[None, :]).reshape(-1)
        return pos[pos < self.N]

    def tokens(self, rank: int) -> int:
        return int(self.tile_tokens(self.tiles(rank)).sum())

    def received(self, rank: int, source: int) -> tuple:
        """Per key/value class, the key tiles `rank` receives from `source` (none from itself)."""
        if rank == source:
            return tuple(np.zeros(0, dtype=np.int64) for _ in self.need[rank])
        return tuple(n[self.owner[n] == source] for n in self.need[rank])

    @functools.cached_property
    def traffic(self) -> tuple[np.ndarray, np.ndarray]:
        """(key/value rows each rank receives, rows each rank sends) in one exchange of K
        and V: a row is one token of one key/value head."""
        recv = np.zeros(self.ranks, dtype=np.int64)
        sent = np.zeros(self.ranks, dtype=np.int64)
        for r, per_class in enumerate(self.need):
            for c, n in enumerate(per_class):
                n = n[self.owner[n] != r]
                lens = self.tile_tokens(n) * len(self.class_heads(c))
                recv[r] += lens.sum()
                sent += np.bincount(self.owner[n], weights=lens, minlength=self.ranks).astype(np.int64)
        return recv, sent

    def recv_rows(self, rank: int) -> int:
        return int(self.traffic[0][rank])

    def send_rows(self, rank: int) -> int:
        return int(self.traffic[1][rank])

    def report(self, *, batch: int = 1, head_dim: int = 128, head_dim_v: int | None = None,
               bytes_per_element: int = 2, name: str = "") -> "ShardReport":
        """Per-rank tokens, work and bytes of one forward exchange (K and V of every
        received row; backward sends their gradients back: as many elements, in float32
        for 16-bit inputs), and plain ring attention's figures for the same sizes."""
        per_row = batch * (head_dim + (head_dim_v or head_dim)) * bytes_per_element
        tokens = [self.tokens(r) for r in range(self.ranks)]
        owned = np.bincount(self.owner, minlength=self.ranks)
        ring_work = owned * self.n_tiles * self.heads * batch  # every (query tile, key tile) pair, every head
        return ShardReport(pattern=name, N=self.N, ranks=self.ranks, tile=self.tile, strategy=self.strategy,
                           tokens=tokens, work=[int(w) for w in self.work],
                           recv_bytes=[int(t) * per_row for t in self.traffic[0]],
                           sent_bytes=[int(t) * per_row for t in self.traffic[1]],
                           ring_recv_bytes=[(self.N - t) * self.kv_heads * per_row for t in tokens],
                           ring_work=[int(w) for w in ring_work],
                           candidates={k: list(v) for k, v in self.candidates.items()})


@dataclass(frozen=True)
class ShardReport:
    pattern: str
    N: int
    ranks: int
    tile: int
    strategy: str
    tokens: list
    work: list  # visited (head, query tile, key tile) triples per rank
    recv_bytes: list
    sent_bytes: list
    ring_recv_bytes: list  # plain ring attention: every other shard's K and V passes through every rank
    ring_work: list  # plain ring attention with a mask: every tile pair of the rank's rows
    candidates: dict

    @property
    def imbalance(self) -> float:
        """max / mean visited tiles over ranks (1.0 is perfect)."""
        mean = sum(self.work) / len(self.work)
        return max(self.work) / mean if mean else 1.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["imbalance"] = self.imbalance
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_table(self) -> str:
        mib = 1 << 20
        lines = [f"context parallelism: {self.pattern or 'pattern'}, N = {self.N}, {self.ranks} ranks, "
                 f"tile {self.tile}, strategy {self.strategy}"]
        if len(self.candidates) > 1:
            lines.append("  candidates (max visited tiles per rank, key/value rows received in all): " + ", ".join(
                f"{k} {v[0]} / {v[2]}" for k, v in self.candidates.items()))
        rows = range(self.ranks) if self.ranks <= 16 else None
        lines.append(f"  {'rank':>6} {'tokens':>9} {'tiles visited':>14} {'recv MiB':>10} {'sent MiB':>10}")
        if rows is not None:
            for r in rows:
                lines.append(f"  {r:>6} {self.tokens[r]:>9} {self.work[r]:>14} {self.recv_bytes[r] / mib:>10.3f} "
                             f"{self.sent_bytes[r] / mib:>10.3f}")
        else:
            for label, f in (("min", min), ("mean", lambda x: sum(x) / len(x)), ("max", max)):
                lines.append(f"  {label:>6} {f(self.tokens):>9.0f} {f(self.work):>14.0f} {f(self.recv_bytes) / mib:>10.3f} "
                             f"{f(self.sent_bytes) / mib:>10.3f}")
        lines.append(f"  imbalance (max / mean tiles visited): {self.imbalance:.3f}")
        total = sum(self.recv_bytes)
        ring = sum(self.ring_recv_bytes)
        lines.append(f"  exchanged per forward: {total / mib:.3f} MiB in all, at most {max(self.recv_bytes) / mib:.3f} MiB "
                     f"into one rank (backward returns their gradients)")
        ratio = f"{ring / total:.1f}x this" if total else "none needed here"
        lines.append(f"  plain ring attention: {ring / mib:.3f} MiB in all, {max(self.ring_recv_bytes) / mib:.3f} MiB "
                     f"into each rank ({ratio}); {max(self.ring_work)} tile pairs on its busiest rank "
                     f"({max(self.ring_work) / max(1, max(self.work)):.1f}x)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- building a sharding


def _visited(plans) -> tuple[np.ndarray, int]:
    """(work per query tile summed over heads and plans, heads) of a list of plans."""
    work = None
    for plan in plans:
        Hx = plan.full.counts.shape[0]
        per = (plan.full.counts.long() + plan.partial.counts.long()).sum(0).numpy().astype(np.int64)
        per = per * (plan.heads if Hx == 1 else 1)
        work = per if work is None else work + per
    return work, plans[0].heads


def _need(plans, owner: np.ndarray, ranks: int, classes: int, chunk_pairs: int = 1 << 22) -> tuple:
    """Per rank and key/value class, the ascending key tiles its query tiles visit in any
    plan or batch element (a per-head plan's query head h is in class h // (H / classes))."""
    nt = len(owner)
    need = np.zeros((ranks, classes, nt), dtype=bool)
    for plan in plans:
        for tl in (plan.full, plan.partial):
            index = tl.index.numpy()
            counts = tl.counts.numpy()
            Hx, nq, P = index.shape
            if P == 0:
                continue
            group = max(1, Hx // classes)
            cls = (np.arange(Hx) // group)[:, None, None] if Hx > 1 else None
            rows = max(1, chunk_pairs // max(1, Hx * P))
            for i0 in range(0, nq, rows):
                i1 = min(nq, i0 + rows)
                idx = index[:, i0:i1]
                ok = np.arange(P)[None, None, :] < counts[:, i0:i1, None]
                r = np.broadcast_to(owner[i0:i1][None, :, None], idx.shape)[ok]
                k = idx[ok]
                if cls is None:  # one plan for every head: every class needs the tiles
                    need[r, :, k] = True
                else:
                    need[r, np.broadcast_to(cls, idx.shape)[ok], k] = True
    return tuple(tuple(np.flatnonzero(need[r, c]) for c in range(classes)) for r in range(ranks))


def _bounds_owner(bounds: np.ndarray, nt: int) -> np.ndarray:
    """Owner per tile of contiguous ranges [bounds[j], bounds[j + 1])."""
    return np.searchsorted(bounds, np.arange(nt), side="right") - 1


def _candidates(work: np.ndarray, ranks: int, strategy: str) -> dict:
    nt = len(work)
    out = {}
    if strategy in ("auto", "contiguous"):
        out["contiguous"] = _bounds_owner(np.floor(np.arange(ranks + 1) * nt / ranks).astype(np.int64), nt)
    if strategy in ("auto", "balanced"):
        cw = np.concatenate([[0], np.cumsum(work)])
        targets = np.arange(ranks + 1) * cw[-1] / ranks
        b = np.searchsorted(cw, targets, side="left").astype(np.int64)
        # round each cut to the nearer side of its target, keep every rank at least one tile
        prev = np.maximum(b - 1, 0)
        b = np.where(np.abs(cw[prev] - targets) < np.abs(cw[np.minimum(b, nt)] - targets), prev, b)
        b[0], b[-1] = 0, nt
        for j in range(1, ranks):
            b[j] = min(max(b[j], b[j - 1] + 1), nt - (ranks - j))
        out["balanced"] = _bounds_owner(b, nt)
    if strategy in ("auto", "zigzag") and nt >= 2 * ranks:
        chunk = _bounds_owner(np.floor(np.arange(2 * ranks + 1) * nt / (2 * ranks)).astype(np.int64), nt)
        out["zigzag"] = np.where(chunk < ranks, chunk, 2 * ranks - 1 - chunk)
    elif strategy == "zigzag":
        raise ValueError(f"strategy='zigzag': expected at least {2 * ranks} tiles for {ranks} ranks (two ranges each), "
                         f"got {nt}; try strategy='balanced' or a smaller tile")
    return out


def shard(plans, ranks: int, *, kv_heads: int | None = None, strategy: str = "auto",
          link: LinkModel = LinkModel()) -> Sharding:
    """The sharding of the calls whose tile plans are `plans` (one per distinct batch
    element; 1-D square tiles, M == N) over `ranks` ranks (see [Note: balance]);
    `kv_heads` (default: the plans' query heads) divides them (GQA)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    if isinstance(ranks, bool) or not isinstance(ranks, (int, np.integer)) or ranks < 1:
        raise ValueError(f"ranks: expected a positive integer, got {ranks!r}")
    p0 = plans[0]
    bm, bn = p0.block
    if p0.tile_shape is not None or bm != bn or p0.M != p0.N:
        raise ValueError(f"context parallelism shards self-attention (M == N) in square 1-D tiles, got M = {p0.M}, "
                         f"N = {p0.N}, tiles {p0.block}; try equal query and key lengths")
    work, heads = _visited(plans)
    nt = len(work)
    if ranks > nt:
        raise ValueError(f"ranks: expected at most {nt} ranks (one tile of {bm} tokens each at N = {p0.N}), got {ranks}; "
                         f"try fewer ranks or a longer sequence")
    Hkv = kv_heads or heads
    if isinstance(Hkv, bool) or not isinstance(Hkv, int) or Hkv < 1 or heads % Hkv:
        raise ValueError(f"kv_heads: expected a divisor of the {heads} query heads, got {kv_heads!r}")
    # one layout of gathered rows per key/value head only when every batch element's plan is
    # per head: a shared plan's schedule gathers one key block for all heads (the union then)
    classes = Hkv if all(p.full.counts.shape[0] > 1 for p in plans) else 1
    tile_flops = 4.0 * bm * bn * link.head_dim
    row_bytes = 2 * link.head_dim * link.bytes_per_element  # K and V of one token of one head
    best = None
    table = {}
    for name, owner in _candidates(work, ranks, strategy).items():
        s = Sharding(N=p0.N, ranks=ranks, tile=bm, heads=heads, kv_heads=Hkv, strategy=name, owner=owner.astype(np.int64),
                     work=np.bincount(owner, weights=work, minlength=ranks).astype(np.int64),
                     need=_need(plans, owner, ranks, classes), candidates=table)
        recv = s.traffic[0]
        cost = float((s.work * tile_flops + recv * row_bytes * link.flops_per_byte).max())
        table[name] = (int(s.work.max()), cost, int(recv.sum()))
        if best is None or (cost, int(recv.sum())) < best[0]:
            best = ((cost, int(recv.sum())), s)
    return best[1]
