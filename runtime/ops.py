"""Dispatch of `BoundPattern.__call__` to a backend.

Each backend has a `can_run` predicate returning None or the reason it cannot
run; `auto` takes the first that can and logs why the others declined, a forced
backend raises its reason.
"""

from __future__ import annotations

import logging

import torch

from .reference import dense_attention
from .validate import check_qkv

log = logging.getLogger("attnc.runtime")

BACKENDS = ("auto", "triton", "torch", "flex")


def _can_run_torch(pat, q) -> str | None:
    return None


def _not_yet(name: str):
    def can_run(pat, q) -> str | None:
        return (f"the '{name}' backend is not available in attnc {__import__('attnc').__version__} "
                f"(generated kernels are not built yet); use backend='torch'")
    return can_run


_PREDICATES = {"triton": _not_yet("triton"), "flex": _not_yet("flex"), "torch": _can_run_torch}
_AUTO_ORDER = ("triton", "torch")


def choose_backend(pat, q: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    if backend != "auto":
        reason = _PREDICATES[backend](pat, q)
        if reason:
            raise ValueError(reason)
        return backend
    for name in _AUTO_ORDER:
        reason = _PREDICATES[name](pat, q)
        if reason is None:
            return name
        log.info("attnc: backend %r declined: %s", name, reason)
    raise ValueError("no backend can run this call")


def attention(pat, q, k, v, *, return_lse: bool, scale, backend: str, grid, inputs: dict):
    B, Hq, Hkv, M, N, D, scale = check_qkv(q, k, v, scale)
    M, N, H, grid = pat.resolve_sizes(M, N, Hq, grid)
    chosen = choose_backend(pat, q, backend)
    if chosen == "torch":
        mask = pat.mask(M, N, heads=Hq, grid=grid, **inputs)
        if mask.dim() == 3:
            mask = mask[None]
        out, lse = dense_attention(q, k, v, mask, scale)
    if return_lse:
        return out, lse.float() if lse.dtype != torch.float64 else lse
    return out
