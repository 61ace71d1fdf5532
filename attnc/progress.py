"""Progress bars for long operations, shown by the CLI only.

input:  long loops of the library (`task`, `each`), and the CLI's choice to show bars.
output: tqdm bars on stderr when turned on; nothing otherwise.
does not: decide when the CLI shows bars (cli.py) or print anything to stdout.

[Note: progress] Library code reports progress where a loop can run long (plan chunks,
evaluated tiles, probed sizes, ahead-of-time compile jobs, sweep points) through
`task(desc, total)`, which costs nothing unless a caller turned rendering on with
`shown(stream)`: then each task is a `tqdm` bar on that stream that appears only after
`delay` seconds (so fast runs print nothing) and disappears when done. `attnc` turns it
on for stderr when stdout is a terminal and the verb prints no JSON; `$ATTNC_PROGRESS=1`
forces it on (`0` off) and `$ATTNC_PROGRESS_DELAY` sets the delay (seconds, default 1).
Progress never goes to stdout, so piped output is the same with and without it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

#: (stream, delay) of the bars, or None: tasks are silent
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("attnc_progress", default=None)


class _Silent:
    """The task of a silent run: updates do nothing."""

    def update(self, n: int = 1) -> None:
        pass


_SILENT = _Silent()


def wanted(out, json_output: bool = False) -> bool:
    """Whether the CLI shows progress: `$ATTNC_PROGRESS` (1 / 0) decides when set, else
    only when `out` (the verb's stdout) is a terminal and no JSON is printed."""
    env = os.environ.get("ATTNC_PROGRESS", "").strip()
    if env in ("0", "1"):
        return env == "1" and not json_output
    if env:
        raise ValueError(f"$ATTNC_PROGRESS: expected 0 or 1, got {env!r}")
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and not json_output


def _delay() -> float:
    text = os.environ.get("ATTNC_PROGRESS_DELAY", "1")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"$ATTNC_PROGRESS_DELAY: expected seconds (e.g. 1 or 0.5), got {text!r}") from None
    if not value >= 0:
        raise ValueError(f"$ATTNC_PROGRESS_DELAY: expected seconds >= 0, got {text!r}")
    return value


@contextlib.contextmanager
def shown(stream, enabled: bool = True):
    """Inside this block, `task`s render as bars on `stream` (when `enabled`)."""
    token = _ACTIVE.set((stream, _delay()) if enabled else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def task(desc: str, total: int | None, unit: str = "it"):
    """A unit of long work: `with task("planning", total=rows) as t: ... t.update(n)`."""
    active = _ACTIVE.get()
    if active is None:
        yield _SILENT
        return
    from tqdm import tqdm

    stream, delay = active
    bar = tqdm(total=total, desc=f"attnc: {desc}", unit=unit, file=stream, delay=delay, leave=False,
               dynamic_ncols=True, mininterval=0.2)
    try:
        yield bar
    finally:
        bar.close()


def each(items, desc: str, unit: str = "it"):
    """`items` one by one inside a `task` (one update per item)."""
    items = items if hasattr(items, "__len__") else list(items)
    with task(desc, len(items), unit) as bar:
        for x in items:
            yield x
            bar.update()
