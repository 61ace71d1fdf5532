"""What every benchmark does with its result: print the markdown, and append it to `--out`;
and how it times one call."""

import time


def timed(fn):
    """(fn(), wall ms, CPU ms) of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3


def emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text.rstrip("\n") + "\n\n")
