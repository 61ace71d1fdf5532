"""The dense reference attention: the numerical oracle for every backend.

input:  q / k / v and a dense mask (`dense_attention`), or a validated `Call` and
        q / k / v (`ReferenceBackend`, with the mask from `Call.mask`).
output: out and lse, and dq / dk / dv, computed densely per the `Backend` contract.
does not: skip anything: no plans, no kernels, O(B * H * M * N) memory.

Masked positions get -inf before the softmax; queries with no allowed key give
output 0 and logsumexp -inf (never NaN). Accumulates in float32 (float64 for
float64 inputs). Memory is O(B * H * M * N): for checking, not for speed.
"""

from __future__ import annotations

import torch

from .validate import raise_nonfinite

from .backend import Backend


def dense_attention(q, k, v, mask: torch.Tensor, scale: float, score=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, M, D], k/v [B, Hkv, N, *], mask bool broadcastable to [B, Hq, M, N];
    `score(s)` (optional) maps the scaled dot products [B, Hq, M, N] to the logits.

    Returns (out [B, Hq, M, Dv] in q's dtype, lse [B, Hq, M] in float32/float64).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq != Hkv:  # GQA: query head h reads key/value head h // (Hq // Hkv)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    mask = mask.to(q.device)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if score is not None:
        s = score(s)
    s = s.masked_fill(~mask, float("-inf"))
    if not bool(torch.isfinite(s.masked_fill(~mask, 0.0)).all()):
        raise_nonfinite(scale, q=q, k=k)  # the scores alone: v is not involved yet
    # [Note: empty rows] a row with no allowed key would make logsumexp -inf and
    # its backward NaN (0 * exp(-inf + inf)); give such rows a finite stand-in
    # for the normaliser so p is exactly 0 there and every gradient stays finite.
    nonempty = mask.any(dim=-1).expand(s.shape[:-1])
    lse_safe = torch.logsumexp(s.masked_fill(~nonempty[..., None], 0.0), dim=-1)
    p = torch.exp(s - lse_safe[..., None])
    out = torch.matmul(p, v.to(acc))
    lse = lse_safe.masked_fill(~nonempty, float("-inf"))
    return out.to(q.dtype), lse



def dense_backward(q, k, v, mask, scale, out, lse, dout, dlse=None):
    """Gradients of sum(out * dout) + sum(lse * dlse) by the textbook formulas,
    densely: P = exp(S - lse), dS = P * (dout @ v^T - delta) with
    delta = rowsum(dout * out) - dlse. Returns dq, dk, dv in the input dtypes."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    ke, ve = (t.repeat_interleave(G, dim=1).to(acc) for t in (k, v))
    qa, doa = q.to(acc), dout.to(acc)
    s = torch.matmul(qa, ke.transpose(-1, -2)) * scale
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(acc)
    p = torch.exp(s - lse_safe[..., None]).masked_fill(~mask.to(q.device), 0.0)
    delta = (doa * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    ds = p * (torch.matmul(doa, ve.transpose(-1, -2)) - delta[..., None])
    dq = torch.matmul(ds, ke) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qa) * scale
    dv = torch.matmul(p.transpose(-1, -2), doa)
    B, N = k.shape[0], k.shape[2]
    dk = dk.view(B, Hkv, G, N, -1).sum(2)
    dv = dv.view(B, Hkv, G, N, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

def _dense_pairs(call, device):
    """Query rows, keys and heads broadcasting with dense scores [B, Hq, M, N]."""
    return (torch.arange(call.M, device=device).view(1, 1, -1, 1), torch.arange(call.N, device=device).view(1, 1, 1, -1),
            torch.arange(call.Hq, device=device).view(1, -1, 1, 1))


def dense_score(call, acc, device):
    """The call's score term as a function of dense scaled dot products [B, Hq, M, N]
    (None without a score term)."""
    fn = call.score
    if fn is None:
        return None
    tables = call.score_tables(acc, device)
    rows, keys, heads = _dense_pairs(call, device)
    return lambda s: fn(s, rows, keys, heads, tables)


class ReferenceBackend(Backend):
    """The dense oracle as a backend ("reference"): O(B * H * M * N) memory, for checking."""

    name = "reference"
    scores = True

    def can_run(self, call, q) -> str | None:
        from attnc import ir
        if any(isinstance(n, ir.TopK) for n in ir.walk(call.pattern.ir.body)):
            return "the reference backend cannot evaluate topk(...) (dynamic routing, issue 6)"
        return None

    def _mask(self, call, device):
        mask = call.mask()
        return (mask if mask.dim() == 4 else mask[None]).to(device)

    def forward(self, call, q, k, v):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return dense_attention(q, k, v, self._mask(call, q.device), call.scale, dense_score(call, acc, q.device))

    def backward(self, call, q, k, v, out, lse, dout, dlse=None):
        if call.score is None:
            return dense_backward(q, k, v, self._mask(call, q.device), call.scale, out, lse, dout, dlse)
        # with a score term: the textbook formulas through the term's own derivative
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        fn = call.score
        tables = call.score_tables(acc, q.device)
        rows, keys, heads = _dense_pairs(call, q.device)
        mask = self._mask(call, q.device)
        G = call.Hq // call.Hkv
        ke, ve = (t.repeat_interleave(G, dim=1).to(acc) for t in (k, v))
        qa, doa = q.to(acc), dout.to(acc)
        raw = torch.matmul(qa, ke.transpose(-1, -2)) * call.scale
        s = fn(raw, rows, keys, heads, tables)
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).to(acc)
        p = torch.exp(s - lse_safe[..., None]).masked_fill(~mask, 0.0)
        delta = (doa * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(acc)
        dterm = p * (torch.matmul(doa, ve.transpose(-1, -2)) - delta[..., None])
        dt = {n: torch.zeros_like(t) for n, t in tables.items()}
        ds = fn.backward(raw, rows, keys, heads, tables, dterm, dt)
        dq = torch.matmul(ds, ke) * call.scale
        dk = (torch.matmul(ds.transpose(-1, -2), qa) * call.scale).view(call.B, call.Hkv, G, call.N, -1).sum(2)
        dv = torch.matmul(p.transpose(-1, -2), doa).view(call.B, call.Hkv, G, call.N, -1).sum(2)
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        return dq, dk, dv, dt
