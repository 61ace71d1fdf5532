"""attnc.codegen: bound patterns -> pointwise mask expressions -> Triton kernels.

`pointwise.lower` turns a bound pattern at concrete sizes into one expression
of (q, k, h, b) (expr.py) with a torch evaluator (lowered.py); `kernels.generate` prints the forward
and backward Triton kernels around it; `cache` stores generated modules by
content hash; `pipeline` names every pass in order and is the one place that
runs them (`pipeline.compile_kernels`, `pipeline.compile_pattern`). See
docs/codegen.md.
"""

from .lowered import Lowered
from .pointwise import LoweringError, lower

__all__ = ["Lowered", "LoweringError", "lower"]
