"""Lowered masks: one expression of (q, k, h, b) and the host tables it reads.

input:  what `pointwise.lower` produces (the expression, its tables, sizes and variable
        ranges) and, at run time, the op's run-time inputs.
output: `Lowered` (with `evaluator`, a torch function of the mask, and `table_tensors`);
        `Table`, the table names ([Note: table names]) and the int32 conversions of run-time
        inputs (`dense_ranks` for segment ids, `pack_bits` for block tables and random bits).
does not: lower patterns (pointwise.py) or print Triton (triton_text.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .expr import Expr, Var, nodes
from .torch_program import run_torch_program, torch_program


def input_table_name(source: str) -> str:
    """The table of the run-time input `source`: ``in_<source>``.

    [Note: table names] Table names become Triton argument names (`tbl_<name>`),
    so they are identifiers; they live in two disjoint namespaces. A run-time
    input's table is ``in_`` plus the user's name; tables the lowering makes
    itself are ``random<i>`` (random bits) and never start with ``in_``. So
    no user name -- ``random0`` included -- can select, replace or alias an
    internal table.
    """
    return f"in_{source}"


@dataclass(frozen=True)
class Table:
    """A tensor the mask reads: contiguous, int32; `batched` tables have a
    leading batch dimension indexed by `b` (run-time inputs). Names: see
    [Note: table names] (`input_table_name`)."""

    name: str
    shape: tuple[int, ...]  # without the batch dimension
    batched: bool
    data: torch.Tensor | None = None  # static tables (random bits); None for run-time inputs
    source: str | None = None  # run-time input name
    kind: str = ""  # "random" | "segments" | "blocks"
    block: int = 0  # key block of a "blocks" table

    def strides(self) -> tuple[int, ...]:
        out, acc = [], 1
        for s in reversed(self.shape):
            out.append(acc)
            acc = acc * s  # keeps size tags (sizes.Sym)
        return tuple(reversed(out))


@dataclass(frozen=True)
class Lowered:
    """A bound pattern's mask as one expression of (q, k, h, b).

    `expr` is True where query row `q` (0..M-1) of head `h` may attend key `k`
    (0..N-1) in batch element `b`. `tables` are the tensors it reads. Use
    `evaluator(inputs)` for a torch function and `triton_mask_source(low)`
    for kernel source.
    """

    name: str
    text: str  # canonical IR text of the bound pattern
    M: int
    N: int
    H: int
    grid: tuple[int, ...] | None
    expr: Expr
    tables: tuple[Table, ...]
    var_bounds: tuple[tuple[str, tuple[int | None, int | None]], ...]
    #: N-D tiles (see `permute`): ((query tile shape), (key tile shape)); then `q` / `k` are
    #: positions of the padded tile-major order and M / N its padded lengths
    tiles: tuple | None = None

    def uses(self, name: str) -> bool:
        """Whether the expression reads variable `name` ("q", "k", "h", "b")."""
        return any(isinstance(e, Var) and e.name == name for e in nodes(self.expr))

    def table_tensors(self, inputs: dict | None = None, device=None) -> dict[str, torch.Tensor]:
        """Every table as a contiguous int32 tensor (run-time inputs converted
        from the op's `inputs`: segment ids [B, N], block tables [B, H|1, nqb, kmax])."""
        out = {}
        for t in self.tables:
            if t.data is not None:
                data = t.data
            else:
                raw = (inputs or {}).get(t.source)
                if raw is None:
                    raise ValueError(f"missing run-time input '{t.source}': expected {t.source}=tensor; "
                                     f"try passing {t.source}=... to the op")
                data = _input_table(t, raw)
            out[t.name] = data.to(device=device or data.device, dtype=torch.int32).contiguous()
        return out

    def evaluator(self, inputs: dict | None = None, device=None):
        """A torch function `fn(q, k, h, b=None) -> bool tensor` of the mask.

        Arguments are integer tensors (or ints) that broadcast together; the
        result has their broadcast shape. Made only of elementwise torch ops and
        table indexing, with no data-dependent Python control flow, so it works
        under `torch.vmap` and as a FlexAttention `mask_mod` (argument order
        differs: use `lambda b, h, q, k: fn(q, k, h, b)`). `b` is needed only
        when the pattern has run-time inputs (and defaults to 0).

        >>> low = lower(attnc.loads("pattern p = sliding(2)").pattern().ir, 4, 4, 1)
        >>> fn = low.evaluator()
        >>> fn(torch.arange(4)[:, None], torch.arange(4)[None, :], 0).int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
        """
        tables = self.table_tensors(inputs, device)
        program = torch_program(self.expr)  # [Note: torch program] in torch_program.py

        def fn(q, k, h, b=None):
            env = {"q": _as_tensor(q, device), "k": _as_tensor(k, device), "h": _as_tensor(h, device),
                   "b": _as_tensor(0 if b is None else b, device)}
            out = run_torch_program(program, env, tables)
            if not isinstance(out, torch.Tensor):
                shape = torch.broadcast_shapes(env["q"].shape, env["k"].shape, env["h"].shape)
                return torch.full(shape, bool(out), dtype=torch.bool, device=env["q"].device)
            shape = torch.broadcast_shapes(out.shape, env["q"].shape, env["k"].shape, env["h"].shape)
            # no expand when nothing broadcasts: inductor's FlexAttention lowering rejects a no-op expand
            return out if out.shape == shape else out.expand(shape)

        return fn


def _as_tensor(x, device):
    if isinstance(x, torch.Tensor):
        return x.long() if x.dtype not in (torch.int32, torch.int64) else x
    return torch.tensor(int(x), dtype=torch.int64, device=device)


def dense_ranks(ids: torch.Tensor) -> torch.Tensor:
    """int64 [B, n] segment ids -> their dense ranks per row (0 .. distinct - 1), int64.

    [Note: exact ids] The tables the mask reads are int32 (Triton, the torch
    evaluator), but segment ids are any int64 (hashes, 2**40, negative ones).
    `same` only compares ids of one batch element, so replacing each row's ids by
    their rank among the row's distinct ids keeps every equality and inequality
    exactly, and ranks are < n, which int32 holds. Narrowing the ids themselves
    would make 0 and 2**32 the same document.
    """
    if ids.numel() == 0:
        return ids
    srt, order = torch.sort(ids, dim=-1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[..., 1:] = srt[..., 1:] != srt[..., :-1]
    ranks = torch.cumsum(new.to(torch.int64), dim=-1) - 1
    return torch.empty_like(ranks).scatter_(-1, order, ranks)


def _input_table(t: Table, raw: torch.Tensor) -> torch.Tensor:
    raw = raw.to(torch.int64)
    if t.kind == "segments":
        return dense_ranks(raw[None] if raw.dim() == 1 else raw)
    # blocks: [B, Hs, nqb, kmax] of key-block ids (-1 = none) -> bitsets [B, Hs, nqb, words]
    if raw.dim() == 3:
        raw = raw[None]
    B, Hs, nqb, _ = raw.shape
    nkb = t.shape[-1] * 32
    hits = torch.zeros(B, Hs, nqb, nkb + 1, dtype=torch.bool, device=raw.device)
    hits.scatter_(3, torch.where(raw < 0, nkb, raw.clamp(max=nkb)), True)
    return pack_bits(hits[..., :nkb])


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> int32 [..., ceil(n / 32)], bit j of word w is element 32 w + j."""
    n = bits.shape[-1]
    words = -(-n // 32)
    pad = torch.zeros(*bits.shape[:-1], words * 32, dtype=torch.int64, device=bits.device)
    pad[..., :n] = bits.to(torch.int64)
    weights = (torch.ones(32, dtype=torch.int64, device=bits.device) << torch.arange(32, device=bits.device))
    packed = (pad.view(*bits.shape[:-1], words, 32) * weights).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
