"""The `attnc` command line's arguments: the parser of every verb and the readers of its values.

input:  argv (a list of strings).
output: argparse namespaces; `--set`, `--grid`, `--block` and `--tile` values as Python values;
        `--seq-len` / `--grid` / `--heads` checked against a bound pattern (`call_sizes`).
does not: run a verb (cli.py, cli_compile.py do) or print anything (a bad argument raises UsageError).
"""

from __future__ import annotations

import argparse
import ast as pyast


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would sys.exit(2) from deep inside
        raise UsageError(f"{self.prog}: error: {message}\n{self.format_usage().strip()}")


#: longest `--set` value read (a set of a few hundred tokens); longer text is refused unread
MAX_SET_CHARS = 4096


def parse_value(text: str):
    """A `--set` value: 3, -2, true, (3, 5), 3x5, {0, 5}, 0..16."""
    t = text.strip()
    if len(t) > MAX_SET_CHARS:
        raise UsageError(f"--set: value of {len(t)} characters; expected at most {MAX_SET_CHARS} "
                         "(an integer, true/false, (3, 5), {0, 5} or 0..16)")
    if t in ("true", "false"):
        return t == "true"
    if ".." in t:
        a, _, b = t.partition("..")
        try:
            return range(int(a), int(b))
        except ValueError:
            raise UsageError(f"--set: cannot read range {text!r}; expected A..B with integers") from None
    if "x" in t and all(p.strip().lstrip("-").isdigit() for p in t.split("x")):
        return tuple(int(p) for p in t.split("x"))
    try:
        v = pyast.literal_eval(t)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError, OverflowError):
        # RecursionError: 1+1+... or ------1 thousands deep; ValueError: 5000-digit integers
        raise UsageError(f"--set: cannot read value {text!r}; expected an integer, true/false, (3, 5), {{0, 5}} or 0..16") from None
    if isinstance(v, list):
        v = tuple(v)
    return v


def parse_sets(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--set: expected NAME=VALUE, got {item!r}")
        out[name.strip()] = parse_value(value)
    return out


def parse_grid(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--grid: expected sizes like 64x64 or 8x16x16, got {text!r}") from None
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise UsageError(f"--grid: expected 1 to 3 positive sizes like 64x64, got {text!r}")
    return dims


def parse_block(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise UsageError(f"--block: expected a size like 64 or 64x128, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise UsageError(f"--block: expected a size like 64 or 64x128, got {text!r}")
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="attnc", description="A compiler for attention sparsity patterns.")
    sub = p.add_subparsers(dest="verb", parser_class=Parser, metavar="VERB")

    c = sub.add_parser("check", help="parse and check .attn files; report diagnostics")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("-p", "--pattern", help="with --seq-len/--grid: only this pattern")
    c.add_argument("--set", action="append", metavar="K=V", help="bind a parameter (with --seq-len/--grid)")
    c.add_argument("--seq-len", type=int, metavar="N", help="also evaluate at this length and warn about empty rows")
    c.add_argument("--grid", metavar="AxB", help="also evaluate on this grid and warn about empty rows")
    c.add_argument("--heads", type=int, default=None, metavar="H")

    ls = sub.add_parser("list", help="list the patterns of a file with parameters and descriptions")
    ls.add_argument("file", metavar="FILE")

    s = sub.add_parser("show", help="picture of a mask at block granularity, with density figures")
    s.add_argument("file", metavar="FILE")
    s.add_argument("-p", "--pattern", help="pattern name (optional when the file has one)")
    s.add_argument("--set", action="append", metavar="K=V", help="bind a parameter, e.g. --set window=128")
    size = s.add_mutually_exclusive_group(required=True)
    size.add_argument("--seq-len", type=int, metavar="N", help="sequence length (M = N)")
    size.add_argument("--grid", metavar="AxB", help="grid sizes, e.g. 64x64")
    s.add_argument("--heads", type=int, default=None, metavar="H")
    s.add_argument("--block", default="64", metavar="B", help="tile size, e.g. 64 or 64x128 (default 64)")
    s.add_argument("--png", metavar="OUT", help="also write a PNG picture")
    s.add_argument("--width", type=int, default=64, help="maximum characters per row of the picture")

    sim = sub.add_parser("simulate", help="density, tile counts and predicted speedup for a GPU and tile shape")
    sim.add_argument("file", metavar="FILE")
    sim.add_argument("-p", "--pattern", help="pattern name (optional when the file has one)")
    sim.add_argument("--set", action="append", metavar="K=V", help="bind a parameter")
    size = sim.add_mutually_exclusive_group()
    size.add_argument("--seq-len", type=int, metavar="N", help="sequence length (M = N)")
    size.add_argument("--grid", metavar="TxHxW", help="grid sizes, e.g. 16x44x80")
    sim.add_argument("--heads", type=int, default=1, metavar="H")
    sim.add_argument("--head-dim", type=int, default=128, metavar="D")
    sim.add_argument("--tile", default="128x128", metavar="BMxBN", help="tile shape (default 128x128)")
    sim.add_argument("--gpu", default="h100", choices=["a100", "h100", "h200", "b200"])
    sim.add_argument("--json", action="store_true", help="print the report as JSON")
    sim.add_argument("--routed-density", type=float, metavar="D",
                     help="dynamic patterns: route this fraction of key blocks per query block (routed inputs and topk)")
    sim.add_argument("--sweep", metavar="VAR=SPEC", help="simulate over N or a parameter: N=1024:65536:x2, "
                     "N=1000:5000:+1000 or window=64,128,256 (a table, or JSON with --json)")
    sim.add_argument("--png", metavar="OUT", help="with --sweep: plot speedup and bounds against the variable")
    sim.add_argument("--ranks", metavar="R[,R...]", help="context parallelism over R ranks: per-rank work, bytes "
                     "exchanged and imbalance, beside plain ring attention (docs/distributed.md)")
    sim.add_argument("--strategy", default="auto", choices=["auto", "contiguous", "balanced", "zigzag"],
                     help="with --ranks: how tiles are assigned to ranks (default: auto, by the link model)")
    sim.add_argument("--flops-per-byte", type=float, default=None, metavar="F",
                     help="with --ranks: a rank's FLOP rate over its link bandwidth (default 2200: H100 on NVLink)")

    cp = sub.add_parser("compile", help="write the generated Triton kernels and the plan metadata (JSON)")
    cp.add_argument("file", metavar="FILE")
    cp.add_argument("-p", "--pattern", help="pattern name (optional when the file has one)")
    cp.add_argument("--set", action="append", metavar="K=V", help="bind a parameter")
    size = cp.add_mutually_exclusive_group(required=False)
    size.add_argument("--seq-len", type=int, metavar="N",
                      help="write the kernels as generated at this length (M = N) with its plan; without "
                           "--seq-len / --grid: length-generic kernels for every probed size class")
    size.add_argument("--grid", metavar="AxB", help="grid sizes, e.g. 64x64 (as --seq-len, for patterns on a grid)")
    cp.add_argument("--heads", type=int, default=None, metavar="H")
    cp.add_argument("--tile", default=None, metavar="BMxBN",
                    help="kernel tile (powers of two >= 16; default 64x64, or with --target the target's default), "
                         "or N-D tiles on a grid like 8x8/8x4")
    cp.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory (created if missing)")
    ca = sub.add_parser("cache", help="the generated-kernel cache: 'info' (where, how big, limits) or 'clear'")
    ca.add_argument("action", choices=("info", "clear"))
    for verb in (c, ls, s, sim, cp):
        verb.add_argument("-I", "--include", action="append", default=[], metavar="DIR",
                          help="also resolve imports in DIR (repeatable; before $ATTNC_PATH); imports read .attn "
                               "files inside the loaded file's folder tree or these folders only")
    cp.add_argument("--target", metavar="SM[,SM]", help="also compile the kernels for these NVIDIA targets without a GPU "
                    "(sm_90, sm_80, ...): registers, spills, shared memory; exit 1 if a kernel does not fit")
    cp.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="with --target: q/k/v dtype")
    cp.add_argument("--head-dim", type=int, default=64, metavar="D", help="with --target: head dim (default 64)")
    cp.add_argument("--processes", type=int, default=2, metavar="P", help="with --target: compile processes (default 2)")
    return p


def parse_tile(text: str):
    """`128x128` (query x key tokens) or `16x16/16x8` (N-D query tile / key tile shapes on a grid)."""
    if "/" in text:
        try:
            q, k = (tuple(int(p) for p in part.lower().split("x")) for part in text.split("/"))
        except ValueError:
            raise UsageError(f"--tile: expected N-D tile shapes like 16x16/16x8, got {text!r}") from None
        if min(q + k) < 1:
            raise UsageError(f"--tile: expected positive sizes, got {text!r}")
        return q, k
    return parse_block(text)


def call_sizes(pat, seq_len, grid, heads):
    """--seq-len, --grid and --heads checked against a bound pattern: its call sizes (M, N, H, grid)."""
    if seq_len is not None and seq_len < 1:
        raise UsageError(f"--seq-len: expected a positive length, got {seq_len}")
    if heads is not None and heads < 1:
        raise UsageError(f"--heads: expected a positive count, got {heads}")
    if grid is None and pat.layout.axes:
        raise UsageError(f"pattern '{pat.name}' is on {pat.layout}: give --grid " + "x".join("16" for _ in pat.layout.axes))
    if grid is not None and not pat.layout.axes:
        raise UsageError(f"pattern '{pat.name}' is on seq: give --seq-len N, not --grid")
    try:
        if grid is not None:
            M, N, H, g = pat.resolve_sizes(1, None, heads, grid)
            return N, N, H, g
        return pat.resolve_sizes(seq_len, seq_len, heads, None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
