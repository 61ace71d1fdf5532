"""Train a tiny transformer whose attention is an attnc pattern, on CPU, and watch the loss fall.

    python examples/train_tiny.py                 # 60 steps, a few seconds on a laptop CPU
    python examples/train_tiny.py --steps 40

The task needs attention: every sequence draws CHOICES of the VOCAB tokens and is a
random string over them, so the next token is one of the tokens seen so far. A model
that sees only the current token cannot do better than NO_ATTENTION_FLOOR (it knows one
of the CHOICES tokens, not the others); one that looks back reaches about log(CHOICES).
The attention is Mistral's sliding window (examples/mistral.attn, window = WINDOW) run
through attnc's op (`pat(q, k, v)`), so the loss only falls below the no-attention floor
if the forward and backward passes through the op are right.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import attnc

HERE = Path(__file__).resolve().parent
VOCAB, SEQ, CHOICES, WINDOW = 16, 64, 2, 16
#: best loss without attention: the next token is the current one w.p. 1/CHOICES, else one of VOCAB - 1
NO_ATTENTION_FLOOR = -(1 / CHOICES) * math.log(1 / CHOICES) - (1 - 1 / CHOICES) * math.log((1 - 1 / CHOICES) / (VOCAB - 1))


class AttncSelfAttention(nn.Module):
    """Multi-head self-attention restricted to an attnc pattern.

    x [B, N, dim] -> [B, N, dim]; the pattern decides which keys each query sees."""

    def __init__(self, dim: int, heads: int, pattern: attnc.BoundPattern):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.pattern = pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = self.pattern(q, k, v)  # [B, heads, N, C // heads]
        return self.out(y.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, pattern):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = AttncSelfAttention(dim, heads, pattern)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, pattern, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(SEQ, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, pattern) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids):
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def batch(gen: torch.Generator, size: int = 16) -> torch.Tensor:
    """[size, SEQ] sequences, each a random string over its own CHOICES distinct tokens."""
    choices = torch.rand(size, VOCAB, generator=gen).argsort(-1)[:, :CHOICES]
    pick = torch.randint(0, CHOICES, (size, SEQ), generator=gen)
    return choices.gather(1, pick)


def train(steps: int = 60, seed: int = 0, log=print) -> list[float]:
    """Train for `steps` Adam steps; returns the loss of every step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pattern = attnc.load(HERE / "mistral.attn").pattern("mistral", window=WINDOW)
    model = TinyLM(pattern)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        ids = batch(gen)
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.4f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train a tiny attnc-attention transformer on CPU")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    if args.steps < 10:
        ap.error(f"--steps: expected at least 10, got {args.steps}")
    losses = train(args.steps)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f}: log(VOCAB) = {math.log(VOCAB):.3f}, best without attention "
          f"{NO_ATTENTION_FLOOR:.3f}, with attention ~ log(CHOICES) = {math.log(CHOICES):.3f}")
    if not last < min(first, NO_ATTENTION_FLOOR):
        print("FAILED: the loss did not go below what a model without attention can reach")
        return 1
    print("OK: the model learned to use the attnc attention")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
