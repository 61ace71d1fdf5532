"""The kernel cache: generated modules stored by content hash.

input:  a cache key (sha256 of everything that changes the generated text or
        its compilation) and a function that generates the source.
output: the imported module (its `@triton.jit` kernels), written once to
        $ATTNC_CACHE_DIR (default ~/.cache/attnc) and reused across runs.
does not: cache compiled binaries itself: Triton keys those by the kernel
        source in its own cache (~/.triton/cache), so a stable generated file
        gives stable binaries.

[Note: concurrent writers] Each entry is a directory `<key[:2]>/<key>/` with
`kernel.py` (the generated source, readable) and `meta.json` (versions, key
fields and the sha256 of kernel.py). Both are written to a temporary file in
the same directory and renamed into place with `os.replace` (atomic on POSIX
and Windows), `kernel.py` first. A reader trusts an entry only when meta.json
parses and its checksum matches kernel.py; anything else (a truncated or
corrupted file, a writer caught between the two renames) is regenerated.
Several processes compiling the same pattern at once therefore all succeed and
leave one valid entry: they write identical bytes.

[Note: trust] kernel.py is imported, i.e. executed, and cache keys are
predictable (a hash of public inputs), so whoever can write into the cache can
run code in every process that reads it. The cache root is created 0700, entry
folders 0700 and files 0600 (mkstemp). Before an entry is read, the entry
folder, its `key[:2]` parent, the cache root and both files must be owned by
the current user, not writable by group or others, and (below the root) not
symbolic links; otherwise the entry is ignored with one warning and the kernel
is generated again into a private temporary folder (tempfile.mkdtemp, 0700) for
this process. A cache root that cannot be created, is not a folder, is not
writable or is not private gets the same fallback and one warning; an entry
that fails to import is regenerated and imported once more. The threat left:
another process of the same user (it could edit the code anyway).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

from attnc.lru import LRU


def _forget_module(key, mod) -> None:
    sys.modules.pop(mod.__name__, None)


#: modules imported in this process, by (key, interpreter mode); bounded ([Note: cache limits] in attnc/lru.py)
_LOADED = LRU("modules", 256, "imported kernel modules (one per distinct generated text)", on_evict=_forget_module)
#: how many modules this process generated or imported (tests count compilations with it)
IMPORTS = {"count": 0}


def interpret_mode() -> bool:
    """Whether `@triton.jit` builds interpreted functions now (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: the variable is read at decoration
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cache_dir() -> Path:
    """$ATTNC_CACHE_DIR, else ~/.cache/attnc."""
    env = os.environ.get("ATTNC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "attnc"


_CODEGEN_HASH: str | None = None


def codegen_hash() -> str:
    """sha256 (16 hex digits) of the code generator's own source files (this package's
    *.py). The generated text is a function of them: with it in the key, a changed
    generator (a new attnc checkout sharing ~/.cache/attnc, an edited lowering) can
    never import a stale kernel whose table layout no longer matches the tables it
    is given -- `attnc.__version__` alone does not change between commits."""
    global _CODEGEN_HASH
    if _CODEGEN_HASH is None:
        h = hashlib.sha256()
        for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        _CODEGEN_HASH = h.hexdigest()[:16]
    return _CODEGEN_HASH


def versions() -> dict[str, str]:
    from attnc.version import __version__
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # the key is still well defined; loading will fail later with a clear reason
        tv = "none"
    return {"attnc": __version__, "codegen": codegen_hash(), "triton": tv, "python": platform.python_version()}


def cache_key(pattern_text: str, options: dict, config_key: str, device: str) -> str:
    """sha256 of the canonical IR text, the size/plan options, the KernelConfig,
    the versions of attnc / Triton / Python and the device capability."""
    payload = json.dumps({"ir": pattern_text, "options": options, "config": config_key, "device": device,
                          "versions": versions()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_dir(key: str) -> Path:
    return cache_dir() / key[:2] / key


_FALLBACK: Path | None = None  # this process's private folder when the cache cannot be trusted or used
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def fallback_dir() -> Path:
    """A private temporary folder for this process (created 0700 by mkdtemp)."""
    global _FALLBACK
    if _FALLBACK is None:
        _FALLBACK = Path(tempfile.mkdtemp(prefix="attnc-kernels-"))
    return _FALLBACK


def untrusted(path: Path, follow: bool = False) -> str | None:
    """Why `path` may not be trusted (owned by someone else, writable by group or others,
    a symbolic link unless `follow`), or None."""
    st = os.stat(path) if follow else os.lstat(path)
    if not follow and stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def usable_root() -> Path:
    """The cache root, created 0700 if missing; the private fallback folder (with one
    warning) when it cannot be created or is not private to this user."""
    root = cache_dir()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder")
        why = untrusted(root, follow=True)  # the root itself may be reached through a link (~/.cache -> ...)
    except OSError as exc:
        why = f"cannot use {root}: {exc.strerror or exc}"
    if why is None:
        return root
    _warn_once(f"attnc kernel cache: {why}; generating kernels into {fallback_dir()} for this process "
               "(set ATTNC_CACHE_DIR to a private folder of yours)")
    return fallback_dir()


def _entry_untrusted(root: Path, key: str) -> str | None:
    d = root / key[:2] / key
    try:
        for p in (root / key[:2], d, d / "kernel.py", d / "meta.json"):
            why = untrusted(p)
            if why is not None:
                return why
    except FileNotFoundError:
        return None  # absent: nothing to trust yet
    except OSError as exc:
        return f"cannot inspect {d}: {exc.strerror or exc}"
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_entry(key: str, root: Path | None = None) -> str | None:
    """The cached source for `key`, or None when absent or not valid."""
    d = (cache_dir() if root is None else root) / key[:2] / key
    try:
        meta = json.loads((d / "meta.json").read_text())
        src = (d / "kernel.py").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != hashlib.sha256(src).hexdigest() or meta.get("key") != key:
        return None
    try:
        return src.decode("utf-8")
    except UnicodeDecodeError:
        return None


def write_entry(key: str, source: str, info: dict | None = None, root: Path | None = None) -> Path:
    """Store `source` under `key` (atomically, folders 0700, files 0600); returns the kernel.py path."""
    root = cache_dir() if root is None else root
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / key[:2]).mkdir(mode=0o700, exist_ok=True)
    d = root / key[:2] / key
    d.mkdir(mode=0o700, exist_ok=True)
    data = source.encode("utf-8")
    _atomic_write(d / "kernel.py", data)
    meta = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "versions": versions(), **(info or {})}
    _atomic_write(d / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
    return d / "kernel.py"


# -- size bound and maintenance (`attnc cache info | clear`) -----------------------------------------

#: default bound of the disk cache in MiB ($ATTNC_CACHE_MAX_MB); past it the least recently
#: written entries are removed after each write
DEFAULT_MAX_MB = 1024


def max_bytes() -> int:
    raw = os.environ.get("ATTNC_CACHE_MAX_MB", "").strip()
    if not raw:
        return DEFAULT_MAX_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"$ATTNC_CACHE_MAX_MB: expected a size in MiB, got {raw!r}; try ATTNC_CACHE_MAX_MB=512") from None
    if mb <= 0:
        raise ValueError(f"$ATTNC_CACHE_MAX_MB: expected a positive size in MiB, got {raw!r}; try ATTNC_CACHE_MAX_MB=512")
    return int(mb * (1 << 20))


def entries(root: Path | None = None) -> list[tuple[Path, int, float]]:
    """(entry folder, bytes, last write time) of every entry under the cache root."""
    root = cache_dir() if root is None else root
    out = []
    if not root.is_dir():
        return out
    for d in root.glob("??/*"):
        if not (d / "meta.json").is_file() and not (d / "kernel.py").is_file():
            continue
        try:
            files = [f.stat() for f in d.iterdir() if f.is_file()]
        except OSError:
            continue
        out.append((d, sum(st.st_size for st in files), max((st.st_mtime for st in files), default=0.0)))
    return out


def _remove_entry(d: Path) -> None:
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def prune(root: Path | None = None, limit: int | None = None) -> int:
    """Remove the oldest entries until the cache holds at most `limit` bytes (default
    `max_bytes()`); returns the number removed. Only this user's own entries are removed."""
    limit = max_bytes() if limit is None else limit
    items = sorted(entries(root), key=lambda e: e[2])
    total = sum(b for _, b, _ in items)
    removed = 0
    for d, size, _ in items:
        if total <= limit:
            break
        if untrusted(d) is not None:
            continue
        try:
            _remove_entry(d)
        except OSError:
            continue
        total -= size
        removed += 1
    return removed


def clear(root: Path | None = None) -> int:
    """Remove every entry of this user's cache (and forget the imported modules); returns how many."""
    n = 0
    for d, _, _ in entries(root):
        if untrusted(d) is not None:
            continue
        try:
            _remove_entry(d)
            n += 1
        except OSError:
            pass
    _LOADED.clear()
    return n


def get_source(key: str, generate: Callable[[], str], info: dict | None = None,
               fresh: bool = False) -> tuple[Path, bool]:
    """(path of kernel.py, whether it was a cache hit); generates and stores on a miss.
    Entries that are not private to this user are ignored (see [Note: trust]);
    `fresh` regenerates even when a valid entry exists."""
    root = usable_root()
    why = _entry_untrusted(root, key)
    if why is not None:
        _warn_once(f"attnc kernel cache: ignoring an entry: {why}; regenerating it into {fallback_dir()}")
        root = fallback_dir()
    elif not fresh:
        src = read_entry(key, root)
        if src is not None:
            return root / key[:2] / key / "kernel.py", True
    source = generate()
    try:
        path = write_entry(key, source, info, root)
        prune(root)
        return path, False
    except OSError as exc:
        if root == fallback_dir():
            raise
        _warn_once(f"attnc kernel cache: cannot write to {root}: {exc.strerror or exc}; "
                   f"generating kernels into {fallback_dir()} for this process")
        return write_entry(key, source, info, fallback_dir()), False


def load_module(key: str, generate: Callable[[], str], info: dict | None = None) -> ModuleType:
    """The generated module for `key`, imported from the cache directory.

    Importing from a real file matters: `@triton.jit` reads the kernels'
    source with `inspect`, and TRITON_INTERPRET=1 is read when the module is
    imported (at decoration), so a module is memoised per interpreter mode."""
    interpret = interpret_mode()
    return _LOADED.get((key, interpret), lambda: _load(key, generate, info, interpret))


def _load(key: str, generate: Callable[[], str], info: dict | None, interpret: bool) -> ModuleType:
    IMPORTS["count"] += 1
    path, hit = get_source(key, generate, info)
    try:
        mod = _import(key, path, interpret)
    except Exception as exc:
        if not hit:
            raise
        # a self-consistent entry that does not import (written by another version, damaged
        # in a way the checksum cannot see): regenerate it once
        _warn_once(f"attnc kernel cache: the cached {path} failed to import ({type(exc).__name__}: {exc}); regenerating it")
        path, _ = get_source(key, generate, info, fresh=True)
        mod = _import(key, path, interpret)
    return mod


def _import(key: str, path: Path, interpret: bool) -> ModuleType:
    name = f"attnc_kernel_{key[:24]}_{'interp' if interpret else 'jit'}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod
