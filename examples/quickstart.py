"""Run a compiled pattern as an attention op and check it against a plain
dense softmax written here from scratch (float64).

    python examples/quickstart.py
"""

from pathlib import Path

import torch

import attnc

HERE = Path(__file__).resolve().parent


def plain_attention(q, k, v, allowed):
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v.double()


def main() -> None:
    prog = attnc.load(HERE / "longformer.attn")
    pat = prog.pattern("longformer", window=64, globals=8)
    print(pat)

    B, H, N, D = 2, 4, 1000, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    q.requires_grad_()

    out, lse = pat(q, k, v, return_lse=True)
    allowed = pat.mask(N, heads=H)  # [H, N, N] bool, the reference semantics
    want = plain_attention(q.detach(), k, v, allowed)
    err = (out.double() - want).abs().max().item()
    out.sum().backward()

    print(f"out {tuple(out.shape)}, lse {tuple(lse.shape)}, density {allowed.float().mean().item():.4f}")
    print(f"max |attnc - dense softmax| = {err:.2e}; grad finite: {bool(torch.isfinite(q.grad).all())}")
    if err > 1e-4:
        raise SystemExit("MISMATCH")
    print("OK")


if __name__ == "__main__":
    main()
