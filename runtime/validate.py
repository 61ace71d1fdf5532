"""Checks on the tensors given to an attention op.

input:  q / k / v and the scale of a call, the score term's tables, the results of
        a forward.
output: the sizes (B, Hq, Hkv, M, N, D) and the scale, checked; or a ValueError.
does not: resolve the pattern's sizes (BoundPattern.resolve_sizes, called by the op)
        or compute anything.

Every failure is a `ValueError` that says what was expected, what was got and
what to try, in the style of FlexAttention's own messages.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _finite_float(x) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an int past float's range (10**400)
        return False


def check_qkv(q, k, v, scale) -> tuple[int, int, int, int, int, int, float]:
    """Returns (B, Hq, Hkv, M, N, D, scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}; try torch.as_tensor({name})")
        if t.dim() != 4:
            hint = f"{name}.unsqueeze(0)" if t.dim() == 3 else f"{name}.view(B, H, L, D)"
            shape = "[B, Hq, M, D]" if name == "q" else "[B, Hkv, N, D]"
            raise ValueError(f"{name}: expected a 4-D tensor {shape}, got {t.dim()}-D shape {tuple(t.shape)}; try {hint}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}; "
                             f"try {name}.float()")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"expected q, k, v of one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; try k.to(q.dtype), v.to(q.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"expected q, k, v on one device, got q on {q.device}, k on {k.device}, v on {v.device}; "
                         f"try k.to(q.device), v.to(q.device)")
    B, Hq, M, D = q.shape
    Bk, Hkv, N, Dk = k.shape
    Bv, Hv, Nv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"expected one batch size, got q {B}, k {Bk}, v {Bv}")
    if Dk != D:
        raise ValueError(f"expected q and k with the same head dim, got q D={D} and k D={Dk}; try projecting both to one size")
    if Hv != Hkv or Nv != N:
        raise ValueError(f"expected k and v with the same heads and length, got k [.., {Hkv}, {N}, ..] and v [.., {Hv}, {Nv}, ..]")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"expected the query heads to be a multiple of the key/value heads (GQA), got Hq={Hq} and Hkv={Hkv}; "
                         f"try Hkv in the divisors of {Hq}")
    if M == 0 or N == 0 or D == 0 or Dv == 0:
        raise ValueError(f"expected non-empty tensors, got M={M}, N={N}, D={D}, Dv={Dv} (v's last dimension); "
                         "try at least one query, key and feature")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not _finite_float(scale):
        shown = repr(scale) if len(repr(scale)) <= 40 else f"an integer of {len(str(abs(scale)))} digits"
        raise ValueError(f"scale: expected a finite float, got {shown}; try scale=None for 1/sqrt(D)")
    return B, Hq, Hkv, M, N, D, float(scale)


def check_finite_result(q, k, v, out, lse, scale: float) -> None:
    """After a forward: NaN / inf in out or lse (lse -inf marks empty rows; pass
    lse=None when the backend did not compute it) is never returned silently;
    say which input or which scale caused it."""
    # one reduction each: a sum is finite only if every term is (a finite sum of finite terms
    # can still overflow; then the exact test below decides), the max of lse is NaN or +inf
    # only if some entry is (-inf marks an empty row)
    bad_lse = lse is not None and lse.numel() > 0 and not bool(lse.max() < float("inf"))
    if not bad_lse and (bool(torch.isfinite(out.sum())) or bool(torch.isfinite(out).all())):
        return
    raise_nonfinite(scale, q=q, k=k, v=v)


def raise_nonfinite(scale: float, **tensors):
    """The ValueError for a non-finite attention: the input (q, k, v) that holds
    inf / NaN, else the scale that makes scale * q.k overflow."""
    q, k = tensors["q"], tensors["k"]
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected finite values, got inf or NaN; try torch.nan_to_num({name})")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    big = float(q.abs().amax()) * float(k.abs().amax()) * q.shape[-1]
    raise ValueError(f"scale * q.k overflows {acc}: expected |scale * q.k| < {torch.finfo(acc).max:.3g}, got scale={scale:g} "
                     f"with |q.k| up to {big:.3g}; try a smaller scale or float64 inputs")


def check_tables(pat, tables: dict, M: int, N: int, H: int, grid, device) -> None:
    """Raise ValueError unless `tables` holds every table of the score term: real, of the
    declared shape at these sizes, on `device` (expected / got / try)."""
    for name, shape in pat.table_shapes(M, N, H, grid).items():
        t = tables.get(name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a real tensor of shape {shape} (the score term's table), "
                             f"got {type(t).__name__}; try {name}=torch.zeros{shape}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point table, got dtype {t.dtype}; try {name}.float()")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected a table of shape {shape} at M = {M}, N = {N}, H = {H}"
                             + (f", grid = {grid}" if grid else "") + f", got {tuple(t.shape)}; "
                             f"try torch.zeros{shape} (its declaration fixes the shape)")
        if t.device != device:
            raise ValueError(f"{name}: expected the table on q's device {device}, got {t.device}; try {name}.to(q.device)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected a table of finite values, got inf or NaN; try torch.nan_to_num({name})")
