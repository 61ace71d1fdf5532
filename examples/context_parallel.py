"""Context parallelism in a training step: two CPU processes (gloo) share one sequence.

    python examples/context_parallel.py            # 2 ranks; --ranks 4 for four

Each rank holds the positions `layout.positions(rank)` of a 4096-token sequence, runs a
small attention layer (q / k / v projections, attnc.distributed.attention with a sliding
window and sinks, an output projection) on them, and DDP sums the parameters' gradients
over the ranks. The script checks the loss and every gradient against the same layer run
in one process, and prints the bytes each rank exchanged next to what ring attention
would have passed around.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import attnc
import attnc.distributed as cp

N, DIM, HEADS = 4096, 64, 4
PATTERN = Path(__file__).resolve().parent / "streaming_llm.attn"


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.pat = attnc.load(PATTERN).pattern(recent=256)

    def forward(self, x, layout=None):
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        o = self.pat(q, k, v) if layout is None else cp.attention(layout, q, k, v)
        return self.out(o.transpose(1, 2).reshape(B, n, DIM))


def step(model, x, target, layout=None):
    """Mean squared error over the whole sequence: each rank adds its positions' share."""
    y = model(x, layout)
    return ((y - target) ** 2).sum() / (N * DIM)


def worker(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for (gloo's own connections use free ports)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same weights and data on every rank
    model = Layer().double()
    x = torch.randn(1, N, DIM, dtype=torch.float64)
    target = torch.randn(1, N, DIM, dtype=torch.float64)

    # the reference: the whole sequence in this process
    ref = Layer().double()
    ref.load_state_dict(model.state_dict())
    loss_ref = step(ref, x, target)
    loss_ref.backward()

    layout = cp.layout(model.pat, N, ranks=world, heads=HEADS)
    ddp = nn.parallel.DistributedDataParallel(model)
    mine = layout.shard(x, rank, dim=1)
    loss = step(ddp, mine, layout.shard(target, rank, dim=1), layout)
    (loss * world).backward()  # DDP averages gradients over ranks; the sequence's loss is their sum

    total = loss.detach().clone()
    dist.all_reduce(total)
    err = max(float((p.grad - r.grad).abs().max()) for p, r in zip(model.parameters(), ref.parameters()))
    rep = layout.report(head_dim=DIM // HEADS, bytes_per_element=8)
    print(f"rank {rank}: positions {layout.positions(rank)[0]}..{layout.positions(rank)[-1]}, "
          f"loss {float(total):.6f} (one process {float(loss_ref.detach()):.6f}), max |grad difference| {err:.1e}, "
          f"sent {layout.exchanged['forward_sent']} B forward + {layout.exchanged['backward_sent']} B backward "
          f"(ring attention: {rep.ring_recv_bytes[rank]} B each way)", flush=True)
    assert abs(float(total) - float(loss_ref.detach())) < 1e-9 and err < 1e-9
    del ddp  # DDP's reducer goes before its process group
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter finalisation: gloo's threads can abort there (pytorch/pytorch#179291)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(args.ranks, os.path.join(d, "store")), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
