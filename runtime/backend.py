"""The contract between the op (ops.py) and the backends that compute it.

input:  a validated `Call` (sizes, scale, run-time inputs, the bound pattern)
        and the q / k / v tensors.
output: forward (out, lse) and backward (dq, dk, dv).
does not: validate tensors (ops.py does, once) or choose a backend (ops.py).

Every backend implements `Backend`: `can_run` returns None or the reason it
cannot run this call (logged in auto mode, raised when forced: NATTEN's
pattern); `forward` / `backward` follow the shapes documented there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from attnc.codegen import pipeline
from attnc.codegen.pipeline import Shape

if TYPE_CHECKING:
    from attnc.program import BoundPattern


@dataclass(frozen=True, kw_only=True)
class Call:
    """One attention call, sizes resolved and tensors validated.

    q ``[B, Hq, M, D]``, k ``[B, Hkv, N, D]``, v ``[B, Hkv, N, Dv]``; query head
    ``h`` reads key/value head ``h // (Hq // Hkv)``. ``H`` in the pattern's
    sense (``heads { }``, the ``H`` symbol) is ``Hq``.
    """

    pattern: "BoundPattern"
    B: int
    Hq: int
    Hkv: int
    M: int
    N: int
    D: int
    Dv: int
    grid: tuple[int, ...] | None
    scale: float
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: whether gradients will be asked for (FlexAttention declines on CPU then)
    needs_grad: bool = False
    #: whether the caller uses lse (return_lse=True or gradients); a backend
    #: that cannot compute it may run when False and return lse filled with NaN
    needs_lse: bool = True
    #: the Triton kernels' tiles from `pat(..., block=...)`, spelled like `plan(block=)`:
    #: (bm, bn), or ((query tile shape), (key tile shape)) for N-D tiles on a grid; None:
    #: the backend's own configuration. Other backends choose their own tiles.
    block: tuple | None = None
    #: the score term's table inputs by name (shapes checked, on q's device); {} without a score term
    tables: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def score(self):
        """The pattern's score term at this call's sizes (codegen/score.ScoreFn), or None."""
        if self.pattern.ir.score is None:
            return None
        from attnc.codegen.score import score_fn
        return score_fn(self.pattern.ir, self.M, self.N, self.Hq, self.grid)

    def score_tables(self, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """The score term's tables detached, in `dtype` on `device` (the term's own gradients
        are computed by its derivative, not by autograd)."""
        return {n: t.detach().to(device=device, dtype=dtype) for n, t in self.tables.items()}

    @cached_property
    def shape(self) -> Shape:
        """This call as the compiler's one validated shape value (codegen/pipeline.Shape):
        the sizes resolved by the op and the run-time inputs' shapes. Every backend lowers
        and plans through the pipeline's passes with it ([Note: one shape])."""
        return Shape.of(self.pattern.ir, self.M, self.N, self.Hq, self.grid,
                        input_shapes={n: tuple(t.shape) for n, t in self.inputs.items()})

    def plan(self, block, inputs: dict | None = None):
        """The tile plan (plans.Plan) of this call's sizes with tiles `block` (1-D, or N-D in
        the grid's tile order, as `pat.plan` gives it), for one batch element's `inputs` when
        the pattern has run-time inputs: the pipeline's plan pass."""
        return self._planned(block, inputs, padded=False)

    def kernel_plan(self, block, inputs: dict | None = None):
        """`plan` as the kernels and the torch path run it: with N-D tiles `block`, in the
        padded tile-major order of their layout (`ndtiles.TileLayout.kernel_plan`); with
        1-D tiles the same plan."""
        return self._planned(block, inputs, padded=True)

    def _planned(self, block, inputs: dict | None, padded: bool):
        ir_ = self.pattern.ir
        return pipeline.plan(ir_, self.shape.with_tiles(ir_, block), self.pattern.program.sources, inputs,
                             padded=padded)

    def lowered(self, block=None, inputs: dict | None = None):
        """The mask as one pointwise expression (codegen/lowered.Lowered) at this call's
        sizes, for run-time inputs of these shapes (default: the call's), permuted into the
        padded tile-major order of N-D tiles `block`: the pipeline's lower pass.
        LoweringError (an AttnError) for patterns without a pointwise form (topk)."""
        ir_ = self.pattern.ir
        shape = self.shape if inputs is None else self.shape.with_inputs(inputs)
        if block is not None:
            shape = shape.with_tiles(ir_, block)
        return pipeline.lower(ir_, shape, self.pattern.program.sources)

    def mask(self) -> torch.Tensor:
        """Dense reference mask, bool [H, M, N] or [B, H, M, N] with batched inputs (small sizes only)."""
        return self.pattern.mask(self.M, self.N, heads=self.Hq, grid=self.grid, **self.inputs)


class Backend(ABC):
    """Base class of the attention backends ("torch", "triton", "flex", "reference")."""

    name: str = ""
    #: whether the backend computes score terms (`score EXPR`); the op declines the others for them.
    #: Such a backend's `backward` returns a fourth value when the call has score tables: their
    #: gradients, {name: tensor of the table's shape and dtype}.
    scores: bool = False

    @abstractmethod
    def can_run(self, call: Call, q: torch.Tensor) -> str | None:
        """None when this backend can compute `call` for tensors like `q`, else the reason."""

    @abstractmethod
    def forward(self, call: Call, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns out [B, Hq, M, Dv] in q's dtype and lse [B, Hq, M] (float32; float64
        for float64 inputs), natural log; rows with no allowed key: out 0, lse -inf."""

    @abstractmethod
    def backward(self, call: Call, q, k, v, out, lse, dout, dlse=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns dq, dk, dv (shapes and dtypes of q, k, v): gradients of
        sum(out * dout) + sum(lse * dlse) (dlse [B, Hq, M] or None), computed
        from the saved out and lse without N^2 state. With
        delta = rowsum(dout * out) - dlse: dS = P * (dout @ v^T - delta)."""
