"""attnc: a compiler for attention sparsity patterns.

>>> import attnc
>>> prog = attnc.loads("pattern local(w = 4) = sliding(w) | (sink(1) & causal)")
>>> pat = prog.pattern("local", w=2)
>>> pat.mask(6).sum().item()
15
"""

from .errors import AttnError, Diagnostic, SizeError, Span
from .program import BoundPattern, CuSeqlens, PatternInfo, Program, cu_seqlens, load, loads
from . import nn  # noqa: F401  (attnc.nn.SparseAttention, attnc.nn.register_hf)

__version__ = "0.1.0"

__all__ = ["AttnError", "SizeError", "BoundPattern", "CuSeqlens", "cu_seqlens", "nn", "Diagnostic", "PatternInfo", "Program", "Span", "load", "loads", "__version__"]
