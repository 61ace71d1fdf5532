"""What every benchmark does with its result: print the markdown, and append it to `--out`;
how it times one call; and how it gives FlexAttention its best block size."""

import statistics
import time

#: FlexAttention's block sizes tried per case; the faster one is its configuration
FLEX_BLOCKS = (64, 128)


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


def fastest_flex_mask(make_mask, run):
    """FlexAttention at its best block size: per size in FLEX_BLOCKS, `make_mask(size)` (its own
    compiled create_block_mask) and the median CPU ms of 3 calls of `run(mask)` after a warm-up.
    Returns (the faster size, its mask, {size: build ms}, {size: trial ms})."""
    masks, build, trial = {}, {}, {}
    for bs in FLEX_BLOCKS:
        t0 = time.perf_counter()
        masks[bs] = make_mask(bs)
        build[bs] = (time.perf_counter() - t0) * 1e3
        run(masks[bs])
        trial[bs] = statistics.median(timed(lambda: run(masks[bs]))[2] for _ in range(3))
    block = min(trial, key=trial.get)
    return block, masks[block], build, trial
