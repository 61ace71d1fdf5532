"""Top-k routing inside the op: `topk(k, block=b)` lowered to `routed(sel)`.

input:  a pattern IR with `topk` nodes, the call's q and k (and its other
        run-time inputs).
output: the same pattern with each `topk` replaced by `routed(<fresh input>)`
        plus, per call, the block tables those inputs take.
does not: differentiate the selection, or change any other node.

[Note: one mechanism for dynamic blocks] A `topk` node is an externally routed
block set whose table the op computes itself. Lowering it to `routed` means
every backend, the plan builder and the reference handle top-k through the one
code path they already have for `routed(sel)`; only the selection lives here.

Selection rule (docs/language.md, "topk"):

* Query block `I` holds queries `I*b .. I*b + b - 1` (relative index, like
  `routed`), key block `J` keys `J*b .. J*b + b - 1`; the last block may be short.
* Score of (I, J) for query head h: mean_pool(q[h, I]) . mean_pool(k[g, J]) summed
  over the query heads of h's key/value group g (GQA: one score per group, as
  NSA shares its selection across a group). Pooling and dot products in float32.
* Eligible blocks: J is eligible for (h, I) iff selecting it changes the mask,
  i.e. some pair of the block is allowed when this `topk` is replaced by `full`
  but not when it is replaced by `none` (other `topk` nodes count as `none`).
  Blocks the static part excludes (e.g. future blocks under `causal`) or
  already covers (a block inside the sliding window) are never chosen, so `k`
  counts useful blocks. Fewer than k eligible: all of them.
* Ties: the higher score wins; equal scores go to the lower key block index.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import ir
from .limits import require


@dataclass(frozen=True)
class TopKSite:
    """One `topk` node and the run-time input that replaces it."""

    input: str
    node: ir.TopK


@dataclass(frozen=True)
class Lowered:
    pattern: ir.PatternIR  # topk nodes replaced by routed(site.input)
    sites: tuple[TopKSite, ...]



def lower_topk(p: ir.PatternIR) -> Lowered:
    """Replace every `topk` by `routed` over a fresh `blocks(b)` input (in source order)."""
    taken = {i.name for i in p.inputs}
    sites: list[TopKSite] = []

    def fresh() -> str:
        i = len(sites)
        while f"topk_sel{i}" in taken:
            i += 1
        taken.add(f"topk_sel{i}")
        return f"topk_sel{i}"

    def rw(node):
        if isinstance(node, ir.TopK):
            site = TopKSite(input=fresh(), node=node)
            sites.append(site)
            return ir.Routed(input=site.input, block=node.block, span=node.span)
        return None

    body = ir.transform(p.body, rw)
    specs = p.inputs + tuple(ir.InputSpec(name=s.input, kind="blocks", block=s.node.block, span=s.node.span) for s in sites)
    return Lowered(dataclasses.replace(p, body=body, inputs=specs), tuple(sites))


def _with_site(lowered: Lowered, site: TopKSite, as_full: bool) -> ir.PatternIR:
    """The lowered pattern with `site` replaced by full / none and every other topk site by none."""
    def rw(node):
        if isinstance(node, ir.Routed) and any(node.input == s.input for s in lowered.sites):
            return ir.Full(span=node.span) if (as_full and node.input == site.input) else ir.Empty(span=node.span)
        return None
    p = lowered.pattern
    body = ir.transform(p.body, rw)
    names = {s.input for s in lowered.sites}
    return dataclasses.replace(p, body=body, inputs=tuple(i for i in p.inputs if i.name not in names))


def eligible_blocks(lowered: Lowered, site: TopKSite, b: int, M: int, N: int, H: int, grid,
                    batches: list[dict]) -> torch.Tensor:
    """bool [B or 1, H or 1, ceil(M/b), ceil(N/b)]: blocks whose selection would change the mask."""
    from .reference import evaluate

    nq, nk = -(-M // b), -(-N // b)
    require_tables(len(batches), H, nq, nk, f"the eligible blocks of topk (block {b}) at M = {M}, N = {N}")
    with_full = _with_site(lowered, site, True)
    with_none = _with_site(lowered, site, False)
    has_inputs = bool(with_full.inputs)
    if not has_inputs:
        from .analysis import plan_blocks
        gain = dataclasses.replace(with_full, body=ir.Diff(left=with_full.body, right=with_none.body))
        plan = plan_blocks(gain, M, N, H, grid, block=(b, b))
        dense = plan.to_dense()  # [Hx, nq, nk]
        return (dense > 0)[None]
    # run-time inputs (same(doc), routed): evaluate per batch element, b query rows at a time
    nq, nk = -(-M // b), -(-N // b)
    out = torch.zeros(len(batches), H, nq, nk, dtype=torch.bool)
    for bi, inp in enumerate(batches):
        for qi in range(nq):
            lo, hi = qi * b, min(M, (qi + 1) * b)
            gain = evaluate(with_full, M, N, H, grid, inp, rows=(lo, hi)) & ~evaluate(with_none, M, N, H, grid, inp, rows=(lo, hi))
            # any() per key block without padding to nk * b keys (b may be far larger than N)
            hit = torch.zeros(H, nk, dtype=torch.int64).index_add_(1, torch.arange(N) // b, gain.any(dim=1).to(torch.int64))
            out[bi, :, qi] = hit > 0
    return out


#: bytes per (batch, head, query block, key block) of top-k selection: float32 scores, the masked
#: copy, the sort's values and int64 indices, the eligibility flags
TABLE_BYTES_PER_ENTRY = 4 + 4 + 4 + 8 + 2


def require_tables(B: int, H: int, nq: int, nk: int, what: str) -> None:
    """The memory check ([Note: memory limit], attnc/limits.py) of a [B, H, nq, nk] block table."""
    require(TABLE_BYTES_PER_ENTRY * B * H * nq * nk, f"{what} ({B} x {H} x {nq} x {nk} blocks)",
            "a larger block (fewer blocks per row), fewer heads or smaller sizes")


def pooled_scores(q: torch.Tensor, k: torch.Tensor, b: int) -> torch.Tensor:
    """float32 [B, Hq, ceil(M/b), ceil(N/b)]: mean-pooled block scores, summed over each GQA group."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]

    def pool(x, L):
        # per-block means without padding to nb * b rows: b may be far larger than L
        nb, nf = -(-L // b), L // b  # blocks, whole blocks
        x = x.detach().float()
        parts = [x[:, :, : nf * b].reshape(x.shape[0], x.shape[1], nf, b, x.shape[-1]).sum(3)] if nf else []
        if L % b:  # the short last block
            parts.append(x[:, :, nf * b:].sum(2, keepdim=True))
        sums = torch.cat(parts, 2)
        counts = torch.full((nb,), float(b), device=x.device)
        counts[-1] = L - (nb - 1) * b
        return sums / counts[:, None]

    qp, kp = pool(q, M), pool(k, N)  # [B, Hq, nq, D], [B, Hkv, nk, D]
    g = Hq // Hkv
    qg = qp.view(B, Hkv, g, qp.shape[2], D).sum(2)  # sum over the group: one score per kv head
    s = torch.matmul(qg, kp.transpose(-1, -2))  # [B, Hkv, nq, nk]
    return s.repeat_interleave(g, dim=1)


def select(scores: torch.Tensor, eligible: torch.Tensor, k: int, ordered: bool = True) -> torch.Tensor:
    """int32 [B, H, nq, k]: the chosen key blocks, -1 where fewer than k are eligible.

    Stable descending sort: among equal scores the lower block index comes first. With
    `ordered=False` the same set for scores without ties (the simulator's random draws), in no
    particular order, from a partial selection instead of a full sort (2 s -> 0.3 s for
    8 x 2048 x 2048 scores).
    """
    eligible = eligible.to(scores.device).expand_as(scores)
    masked = scores.masked_fill(~eligible, float("-inf"))
    k = max(0, min(k, scores.shape[-1]))
    if ordered:
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]
    else:
        order = torch.topk(masked, k, dim=-1, sorted=False).indices
    ok = torch.gather(eligible, -1, order)
    return torch.where(ok, order, -1).to(torch.int32)


def route(lowered: Lowered, q: torch.Tensor, k: torch.Tensor, M: int, N: int, H: int, grid, batches: list[dict],
          env) -> dict[str, torch.Tensor]:
    """The block tables of every topk site for this call (`batches`: the other run-time
    inputs per batch element; `env` evaluates k and block to integers)."""
    tables = {}
    for site in lowered.sites:
        kk, b = int(env(site.node.k)), int(env(site.node.block))
        if kk < 0 or b < 1:
            raise ValueError(f"topk(k={kk}, block={b}): expected k >= 0 and block >= 1")
        require_tables(q.shape[0], H, -(-M // b), -(-N // b), f"topk's block scores (block {b}) at M = {M}, N = {N}")
        elig = eligible_blocks(lowered, site, b, M, N, H, grid, batches)
        tables[site.input] = select(pooled_scores(q, k, b), elig, kk)
    return tables


def synthetic_inputs(pattern, M: int, N: int, H: int, grid, density: float | None, inputs: dict,
                     seed: int = 0) -> tuple[object, dict]:
    """For the simulator: (pattern, inputs) where every `topk` is lowered and every
    block table that was not given is drawn at `density` (a fraction of the key
    blocks per query block, chosen at random with `seed`). `topk(k)` keeps its
    `k` unless `density` is given, then k = ceil(density * key blocks); its
    blocks are drawn among the eligible ones, as the op would choose them.
    Segment inputs cannot be invented: they must be passed."""
    import math

    def value(expr) -> int:
        return pattern.value_at(expr, M, N, H, grid)

    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"routed_density: expected a fraction in (0, 1], got {density!r}; try 0.1")
    g = torch.Generator().manual_seed(seed)
    inputs = dict(inputs)
    for spec in pattern.ir.inputs:
        if spec.name in inputs:
            continue
        if spec.kind == "segments":
            raise ValueError(f"simulate: pattern '{pattern.name}' needs its segments input '{spec.name}': "
                             f"expected {spec.name}=ids [N]; try pat.simulate(..., {spec.name}=torch.tensor(ids))")
        if density is None:
            raise ValueError(f"simulate: pattern '{pattern.name}' routes blocks at run time ('{spec.name}'): "
                             f"expected {spec.name}=table or a density; try routed_density=0.1 (--routed-density 0.1)")
        b = value(spec.block)
        nq, nk = -(-M // b), -(-N // b)
        require_tables(1, H, nq, nk, f"a random block table for '{spec.name}' (block {b}) at M = {M}, N = {N}")
        k = max(1, math.ceil(density * nk))
        inputs[spec.name] = torch.rand(H, nq, nk, generator=g).topk(k, dim=-1).indices
    if not pattern.has_topk():  # computed when the pattern was bound
        return pattern, inputs
    lowered = pattern.topk_lowering()
    batches, _ = pattern.input_batches(M, N, H, inputs)
    for site in lowered.sites:
        kk, b = value(site.node.k), value(site.node.block)
        nq, nk = -(-M // b), -(-N // b)
        if density is not None:
            kk = max(1, math.ceil(density * nk))
        elig = eligible_blocks(lowered, site, b, M, N, H, grid, batches)[0].expand(H, nq, nk)
        inputs[site.input] = select(torch.rand(H, nq, nk, generator=g), elig, kk, ordered=False)
    return pattern.routed_pattern, inputs
