"""Bound patterns by op key: how the `attnc::attention` op finds its pattern.

input:  every bound pattern, registered when it is bound (attnc/program.py).
output: its op key, a string (`name#serial`), which the op passes instead of the
        pattern object (torch.library ops take tensors, numbers and strings);
        `live_pattern(key)` gives the pattern back (runtime/ops.py).
does not: keep patterns alive: the registry is weak, so a pattern nobody holds is
        forgotten. No torch here: binding a pattern (`attnc check`) must not import it.
"""

from __future__ import annotations

import itertools
import weakref

_LIVE = weakref.WeakValueDictionary()
_SERIAL = itertools.count()


def register(pattern, name: str) -> str:
    """A new op key for `pattern` (named after the pattern `name`), kept while it lives."""
    key = f"{name}#{next(_SERIAL)}"
    _LIVE[key] = pattern
    return key


def live_pattern(key: str):
    """The live bound pattern with this op key, or None."""
    return _LIVE.get(key)
