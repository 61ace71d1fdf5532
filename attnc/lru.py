"""Bounded, thread-safe in-memory caches: every per-size cache of attnc is one of these.

input:  a cache name, a default entry limit, keys and a build function.
output: memoised values, evicted least recently used first; `caches()` lists
        them all (`attnc cache info` prints it).
does not: persist anything (codegen/cache.py stores generated kernel source on disk).

[Note: cache limits] A process that sees many sequence lengths must not grow
without bound: kernel sets, imported kernel modules, tile schedules, FlexAttention
exports, tile lists built from run-time inputs, density formulas and lowered score
terms are each held in an `LRU` (`memoize` wraps a function in one); the only
`functools` caches left hold one value per process (the parser, the backends).
The limit of cache `name` is, in order: `set_limit(name, n)`, the environment
variable `ATTNC_CACHE_<NAME>` (upper case), `ATTNC_CACHE_ENTRIES` (every cache),
or the cache's default. A limit of 0 keeps nothing (every call rebuilds).
`build` runs outside the lock, so two threads may build the same entry once
each; the first one stored wins and both get it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable

_REGISTRY: "dict[str, LRU]" = {}
_LIMITS: dict[str, int] = {}


def _env_limit(name: str) -> int | None:
    for var in (f"ATTNC_CACHE_{name.upper()}", "ATTNC_CACHE_ENTRIES"):
        raw = os.environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"${var}: expected a number of cache entries (0 or more), got {raw!r}; "
                             f"try {var}=64") from None
        if value < 0:
            raise ValueError(f"${var}: expected a number of cache entries (0 or more), got {value}; try {var}=64")
        return value
    return None


class LRU:
    """A named cache of at most `limit()` entries (see [Note: cache limits])."""

    def __init__(self, name: str, default: int, what: str, on_evict: Callable | None = None):
        if name in _REGISTRY:
            raise ValueError(f"a cache named {name!r} exists already")
        self.name, self.default, self.what = name, default, what
        self.on_evict = on_evict
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        _REGISTRY[name] = self

    def limit(self) -> int:
        if self.name in _LIMITS:
            return _LIMITS[self.name]
        env = _env_limit(self.name)
        return self.default if env is None else env

    def get(self, key, build: Callable[[], object]):
        """The value for `key`, built (and stored) on a miss."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
        value = build()
        with self._lock:
            value = self._data.setdefault(key, value)
            self._data.move_to_end(key)
            self._trim()
        return value

    def peek(self, key, default=None):
        with self._lock:
            return self._data.get(key, default)

    def _trim(self) -> None:
        limit = self.limit()
        while len(self._data) > limit:
            key, value = self._data.popitem(last=False)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(key, value)

    def clear(self) -> None:
        with self._lock:
            items = list(self._data.items())
            self._data.clear()
        if self.on_evict is not None:
            for key, value in items:
                self.on_evict(key, value)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        return key in self._data

    def info(self) -> dict:
        return {"name": self.name, "what": self.what, "entries": len(self._data), "limit": self.limit(),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def set_limit(name: str, entries: int | None) -> None:
    """Set the entry limit of cache `name` for this process (None: back to the
    environment / default); shrinking evicts at once."""
    if name not in _REGISTRY:
        raise ValueError(f"set_limit: no cache named {name!r}; expected one of {', '.join(sorted(_REGISTRY))}")
    if entries is None:
        _LIMITS.pop(name, None)
    elif isinstance(entries, bool) or not isinstance(entries, int) or entries < 0:
        raise ValueError(f"set_limit: expected a number of entries (0 or more), got {entries!r}; try 64")
    else:
        _LIMITS[name] = entries
    c = _REGISTRY[name]
    with c._lock:
        c._trim()


set_cache_limit = set_limit  # attnc.set_cache_limit("kernel_sets", 16)


def memoize(name: str, default: int, what: str) -> Callable[[Callable], Callable]:
    """A function memoised in an `LRU` named `name`, keyed by its (hashable) positional
    arguments: the bounded, settable replacement for `functools.lru_cache`."""
    def wrap(fn: Callable) -> Callable:
        cache = LRU(name, default, what)

        def memoised(*args):
            return cache.get(args, lambda: fn(*args))
        memoised.__wrapped__ = fn
        memoised.__doc__ = fn.__doc__
        memoised.__name__ = fn.__name__
        memoised.cache = cache
        return memoised
    return wrap


def caches() -> list[dict]:
    """`info()` of every cache created so far (a cache is created when its module is imported)."""
    return [c.info() for c in sorted(_REGISTRY.values(), key=lambda c: c.name)]


def clear_all() -> None:
    for c in _REGISTRY.values():
        c.clear()
