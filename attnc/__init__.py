"""attnc: a compiler for attention sparsity patterns.

>>> import attnc
>>> prog = attnc.loads("pattern local(w = 4) = sliding(w) | (sink(1) & causal)")
>>> pat = prog.pattern("local", w=2)
>>> pat.mask(6).sum().item()
15
"""

import importlib

from .errors import AttnError, Diagnostic, SizeError, Span
from .version import __version__

__all__ = ["AttnError", "SizeError", "BoundPattern", "CuSeqlens", "cu_seqlens", "distributed", "nn", "Diagnostic", "PatternInfo", "Program", "Span", "load", "loads", "set_cache_limit", "__version__"]

#: names imported on first use (PEP 562), so `attnc --help` and `attnc check` start without
#: importing torch (loader.py and program.py load sympy and networkx; torch comes with the first mask or plan)
_LAZY = {"set_cache_limit": "lru", "BoundPattern": "program", "CuSeqlens": "inputs", "PatternInfo": "loader", "Program": "loader",
         "cu_seqlens": "inputs", "load": "loader", "loads": "loader"}


def __getattr__(name: str):
    if name in ("nn", "distributed"):  # attnc.nn.SparseAttention, attnc.distributed.layout, ...
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
