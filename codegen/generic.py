"""Size classes: which sizes share one generated kernel text (`attnc compile` without sizes).

input:  a bound pattern, a `KernelConfig`, the head count and the sizes to probe
        (default: `default_probes`).
output: `SizeClass`es: one generated module text each and the probed sizes it
        serves, largest sizes first.
does not: prove anything about sizes that were not probed: the runtime generates
        the text of every new size on the host and reuses compiled kernels only
        for equal texts ([Note: one text, many sizes] in sizes.py), so a size
        outside every class still runs correctly; it costs one compilation.

The kernels take M, N and the grid axis lengths as run-time arguments. What can
still change between sizes is a *decision* the generators make at the sizes:
a window at least as long as the sequence makes `sliding(w)` plain `causal`
(no window arithmetic in the mask); a guard that covers every query drops a
range; a plan whose closed form differs from the plan at some size reads tile
lists there. Each such decision splits the sizes into classes, typically two
("shorter than the window" and "longer").
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: 1-D lengths probed by default: tile multiples and odd lengths from 256 to 32K
PROBE_LENGTHS = (256, 1000, 1024, 2048, 3001, 4096, 6000, 8192, 12345, 16384, 32768)
#: per-axis lengths of the default grid probes (every axis the same, then mixed shapes)
PROBE_AXES = (8, 12, 16, 24, 32, 48, 64)


@dataclass
class SizeClass:
    source: str
    sizes: list = field(default_factory=list)  # lengths (1-D) or grid shapes


def default_probes(rank: int) -> list:
    """Lengths for 1-D patterns, grid shapes for patterns on a grid of `rank` axes."""
    if rank == 0:
        return list(PROBE_LENGTHS)
    out = [(a,) * rank for a in PROBE_AXES]
    out += [tuple(PROBE_AXES[(i + j) % len(PROBE_AXES)] for j in range(rank)) for i in range(1, len(PROBE_AXES))]
    return list(dict.fromkeys(out))


def size_classes(pat, config, heads: int | None = None, probes=None) -> tuple[list[SizeClass], list]:
    """(classes, skipped): the distinct texts over the probed sizes, the class serving
    the largest size first; `skipped` lists (size, reason) for sizes the pattern
    rejects (a neighborhood longer than the axis, ...)."""
    from attnc.errors import AttnError
    from attnc.progress import each

    from .pipeline import compile_pattern

    rank = len(pat.layout.axes)
    probes = default_probes(rank) if probes is None else list(probes)
    by_text: dict[str, SizeClass] = {}
    skipped = []
    for size in each(probes, "probing sizes", unit="size"):
        try:
            if rank:
                c = compile_pattern(pat, None, heads=heads, grid=tuple(size), config=config)
            else:
                c = compile_pattern(pat, int(size), heads=heads, config=config)
        except (AttnError, ValueError) as exc:
            msg = exc.diagnostics[0].message if isinstance(exc, AttnError) and exc.diagnostics else str(exc)
            skipped.append((size, msg))
            continue
        by_text.setdefault(c.source, SizeClass(c.source)).sizes.append(size)

    def weight(s):
        import math
        return math.prod(s) if isinstance(s, tuple) else s

    classes = sorted(by_text.values(), key=lambda c: -max(weight(s) for s in c.sizes))
    return classes, skipped


def sizes_text(sizes) -> str:
    return ", ".join("x".join(map(str, s)) if isinstance(s, tuple) else str(s) for s in sizes)
