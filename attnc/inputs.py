"""Run-time inputs given in another form than the pattern reads them.

input:  `attnc.cu_seqlens(offsets)`, passed for a `segments` input (`same(doc)`).
output: `CuSeqlens`, which turns its offsets into the segment ids [1, N] the pattern
        reads, on the offsets' device, checked (expected / got / try).
does not: validate the inputs' shapes and batches against a pattern (attnc/call_inputs.py
        does, for the bound pattern) or run the op (runtime/ops.py); both accept a `CuSeqlens`
        wherever a segments input goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when offsets are converted: `attnc check` never imports it
    import torch


@dataclass(frozen=True)
class CuSeqlens:
    """Packed-sequence offsets (FlashAttention's `cu_seqlens`) for a `segments` input.

    ``attnc.cu_seqlens(torch.tensor([0, 3, 7, 10]))`` says tokens 0..2, 3..6 and
    7..9 are three documents; the op turns it into segment ids on the tensor's
    device in O(N). One offsets tensor describes every batch element alike.
    """

    offsets: torch.Tensor

    def segment_ids(self, N: int, name: str) -> torch.Tensor:
        import torch

        o = self.offsets
        if not isinstance(o, torch.Tensor) or o.dim() != 1 or o.dtype.is_floating_point or o.dtype == torch.bool:
            got = f"{o.dtype} tensor of shape {tuple(o.shape)}" if isinstance(o, torch.Tensor) else type(o).__name__
            raise ValueError(f"{name}: expected cu_seqlens as a 1-D integer tensor [0, ..., {N}], got {got}")
        o = o.to(torch.int64)
        if o.numel() < 2 or int(o[0]) != 0 or int(o[-1]) != N or bool((o[1:] < o[:-1]).any()):
            shown = o.tolist() if o.numel() <= 8 else o[:4].tolist() + ["..."] + o[-2:].tolist()
            raise ValueError(f"{name}: expected non-decreasing cu_seqlens from 0 to N = {N}, got {shown}; "
                             f"try torch.cat([torch.zeros(1), lengths.cumsum(0)]) with lengths summing to {N}")
        pos = torch.arange(N, device=o.device)
        return torch.searchsorted(o[1:], pos, right=True)[None]


def cu_seqlens(offsets: torch.Tensor) -> CuSeqlens:
    """Mark `offsets` as cu_seqlens for a `segments` input: ``pat(q, k, v, doc=attnc.cu_seqlens(cu))``."""
    return CuSeqlens(offsets)
