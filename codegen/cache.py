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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

#: modules imported in this process, by (key, interpreter mode)
_LOADED: dict[tuple[str, bool], ModuleType] = {}


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
    from attnc import __version__
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


def read_entry(key: str) -> str | None:
    """The cached source for `key`, or None when absent or not valid."""
    d = entry_dir(key)
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


def write_entry(key: str, source: str, info: dict | None = None) -> Path:
    """Store `source` under `key` (atomically); returns the kernel.py path."""
    d = entry_dir(key)
    d.mkdir(parents=True, exist_ok=True)
    data = source.encode("utf-8")
    _atomic_write(d / "kernel.py", data)
    meta = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "versions": versions(), **(info or {})}
    _atomic_write(d / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
    return d / "kernel.py"


def get_source(key: str, generate: Callable[[], str], info: dict | None = None) -> tuple[Path, bool]:
    """(path of kernel.py, whether it was a cache hit); generates and stores on a miss."""
    src = read_entry(key)
    if src is not None:
        return entry_dir(key) / "kernel.py", True
    return write_entry(key, generate(), info), False


def load_module(key: str, generate: Callable[[], str], info: dict | None = None) -> ModuleType:
    """The generated module for `key`, imported from the cache directory.

    Importing from a real file matters: `@triton.jit` reads the kernels'
    source with `inspect`, and TRITON_INTERPRET=1 is read when the module is
    imported (at decoration), so a module is memoised per interpreter mode."""
    interpret = interpret_mode()
    mod = _LOADED.get((key, interpret))
    if mod is not None:
        return mod
    path, _ = get_source(key, generate, info)
    name = f"attnc_kernel_{key[:24]}_{'interp' if interpret else 'jit'}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _LOADED[(key, interpret)] = mod
    return mod
