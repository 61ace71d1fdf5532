"""The memory limit: estimate what a call would allocate before allocating it.

input:  an estimate of the bytes an operation will hold at its peak.
output: nothing, or `MemoryLimitError` (expected / got / try) past the limit.
does not: allocate or measure memory.

[Note: memory limit] Everything in attnc that allocates in proportion to the
problem (dense masks: H * M * N; per-row evaluation and interval sets: M; the
pictures of `attnc show`: one count per tile; tile plans without a closed form:
H * query tiles * key tiles; top-k score tables: B * H * query blocks * key
blocks) first estimates the bytes it will hold at its peak and calls `require`.
Past the limit `require` raises `MemoryLimitError`, a `ValueError` whose message
says what was asked for, expected (the limit) / got (the estimate) / try (smaller
sizes, a larger tile, a plan instead of a dense mask, or a higher limit), instead
of letting the allocator fail with a raw RuntimeError or the OOM killer end the
process. The estimates are deliberately rough (within a small factor, on the
high side): their job is to refuse the absurd, not to account for every byte.

The limit is, in this order:
* ``$ATTNC_MAX_BYTES`` -- a byte count such as ``2000000000``, ``512M``, ``4G``
  or ``1.5T`` (powers of 1024); ``0`` or ``none`` turns the check off;
* else half of the machine's physical memory (`DEFAULT_FRACTION`).
It is read on every check, so setting the variable takes effect at once.
"""

from __future__ import annotations

import math
import os
import re

#: the environment variable that sets the limit
ENV = "ATTNC_MAX_BYTES"
#: the default limit: this fraction of physical memory
DEFAULT_FRACTION = 0.5

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class MemoryLimitError(ValueError):
    """A call that would need more memory than the limit (`ValueError`: bad sizes)."""


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def parse_bytes(text: str) -> int | None:
    """`4G` -> 4 * 2**30; `0` / `none` -> None (no limit). ValueError when unreadable."""
    t = text.strip().upper()
    for suffix in ("IB", "B"):  # 4GiB, 4GB and 4G alike
        if t.endswith(suffix) and len(t) > len(suffix):
            t = t[: -len(suffix)].strip()
            break
    if t in ("0", "NONE", "OFF"):
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)", t)
    if m is None:
        raise ValueError(f"${ENV}: expected a byte count like 2000000000, 512M or 4G (0 or none: no limit), "
                         f"got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"${ENV}: expected a positive byte count, got {text!r}")
    return int(value)


def max_bytes() -> tuple[int | None, str]:
    """(the limit in bytes or None for none, where it comes from)."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return parse_bytes(env), f"${ENV}={env.strip()}"
    phys = physical_memory()
    if phys is None:
        return None, "no limit: physical memory unknown"
    return int(phys * DEFAULT_FRACTION), f"half of the {fmt(phys)} of physical memory; set ${ENV} to change it"


def fmt(n: float) -> str:
    """1536 -> '1.5 KiB'; numbers far beyond any machine stay readable ('2.0e+21 B')."""
    if n >= 1 << 60:
        return f"{n:.1e} B"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def require(nbytes: float, what: str, hint: str) -> None:
    """Raise MemoryLimitError when `what` would need about `nbytes` (more than the limit).

    `hint` says what to try instead; the message always adds how to raise the limit."""
    limit, source = max_bytes()
    if limit is None or nbytes <= limit:
        return
    raise MemoryLimitError(f"{what}: expected at most {fmt(limit)} of memory (the limit: {source}), "
                           f"got an estimate of {fmt(nbytes)}; try {hint}, or raise the limit with {ENV}=... "
                           f"if the machine has the memory")
