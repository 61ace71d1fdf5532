"""Sparse-aware context parallelism: shard the sequence over the ranks of a
torch.distributed process group and exchange only the key/value tokens each rank's
queries need (docs/distributed.md).

input:  a bound pattern, the sequence length, the ranks of a process group, q / k / v shards.
output: a `Layout` (which tokens each rank holds, sends and receives) and the attention of
        this rank's rows, forward and backward.
does not: plan or count tiles (sharding.py) or compute attention (runtime/ backends).

    import attnc, attnc.distributed as cp
    lay = cp.layout(pat, N, ranks=world, heads=H)        # the same on every rank
    q, k, v = (lay.shard(x, rank) for x in (q, k, v))    # or build them from lay.positions(rank)
    out = cp.attention(lay, q, k, v)                     # this rank's rows; differentiable
"""

from attnc.runtime.distributed import (STRATEGIES, Layout, LinkModel, Sharding, ShardReport, attention, gather,
                                       layout)

__all__ = ["Layout", "layout", "attention", "gather", "STRATEGIES", "LinkModel", "Sharding", "ShardReport"]
