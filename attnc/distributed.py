"""Sparse-aware context parallelism: shard the sequence over the ranks of a
torch.distributed process group and exchange only the key/value tokens each rank's
queries need (docs/distributed.md).

    import attnc, attnc.distributed as cp
    lay = cp.layout(pat, N, ranks=world, heads=H)        # the same on every rank
    q, k, v = (lay.shard(x, rank) for x in (q, k, v))    # or build them from lay.positions(rank)
    out = cp.attention(lay, q, k, v)                     # this rank's rows; differentiable
"""

from attnc.runtime.distributed import (STRATEGIES, Layout, LinkModel, Sharding, ShardReport, attention, gather,
                                       layout)

__all__ = ["Layout", "layout", "attention", "gather", "STRATEGIES", "LinkModel", "Sharding", "ShardReport"]
