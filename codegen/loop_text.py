"""The kernels' loops as Triton text: over the plan's tile lists, or over closed-form ranges.

input:  a kernel kind ('fwd', 'dkdv', 'dq'), the arguments its inner function passes on
        and, for closed-form loops, the direction's `Ranges` (bounds.LoopBounds).
output: the text of each kernel's loops (`list_body`, `closed_body`: full tiles unmasked,
        partial tiles masked, [Note: the two loops] in kernels.py) and the module's
        closed-form helpers (`bounds_source`: `_split`, `_key_tiles_i`, `_query_tiles_i`).
does not: derive or check the ranges (range_derivation.py, bounds.py), decide which
        direction is closed-form (bounds.loop_bounds does) or assemble the module
        (kernels.generate fills kernel_templates.ATTENTION_MODULE).
"""

from __future__ import annotations

from .kernel_templates import INNER_CALLS


def _call(kind: str, tiles: str, masked: bool, tbl: str) -> str:
    indent, text = INNER_CALLS[kind]
    body = text.format(tiles=tiles, masked=masked, tbl=tbl)
    return "\n".join(indent + line for line in body.split("\n"))


def list_body(kind: str, tbl: str) -> str:
    """Two loops over the plan's tile lists: full tiles, then partial ones."""
    indent = INNER_CALLS[kind][0]
    rows = "tl.cdiv(N, BLOCK_N) + start_n" if kind == "dkdv" else "tl.cdiv(M, BLOCK_M) + start_m"
    return "\n".join([f"{indent}row = (off_h % PLAN_HEADS) * {rows}",
                      _call(kind, "FullIndex + row * full_width, tl.load(FullCount + row)", False, tbl),
                      _call(kind, "PartIndex + row * part_width, tl.load(PartCount + row)", True, tbl)])


def closed_body(kind: str, rs, tbl: str, sizes: str = "", env: dict | None = None) -> str:
    """Per range: its tiles in closed form, clipped after the previous range, then
    a masked prefix, the full middle (no mask) and a masked suffix."""
    indent = INNER_CALLS[kind][0]
    fn, args = (("_query_tiles", f"k0, k1, off_h, M, N{sizes}, BLOCK_M") if kind == "dkdv"
                else ("_key_tiles", f"q0, q1, off_h, M, N{sizes}, BLOCK_N"))
    out = []
    if kind == "dkdv":
        out += [f"{indent}k0 = start_n * BLOCK_N  # this tile's keys: [k0, k1)",
                f"{indent}k1 = tl.minimum(k0 + BLOCK_N, N)",
                f"{indent}done = start_n * 0  # query tiles before `done` were visited by an earlier range"]
    else:
        out += [f"{indent}q0 = start_m * BLOCK_M + (N - M)  # absolute positions of this tile's queries: [q0, q1)",
                f"{indent}q1 = tl.minimum(start_m * BLOCK_M + BLOCK_M, M) + (N - M)",
                f"{indent}done = start_m * 0  # key tiles before `done` were visited by an earlier range"]
    for i, (text, _) in enumerate(_range_list(rs, env)):
        out += [f"{indent}# range {i}: {text}",
                f"{indent}first, full_first, full_end, end, full = {fn}_{i}({args})",
                f"{indent}start, full_start, full_stop, done = _split(first, full_first, full_end, end, full, done)",
                _call(kind, "start, full_start", True, tbl),
                _call(kind, "full_start, full_stop", False, tbl),
                _call(kind, "full_stop, done", True, tbl)]
    if not _range_list(rs):
        out.append(f"{indent}# the pattern allows no pair: nothing to visit")
    return "\n".join(out)


def _range_list(rs, env: dict | None = None) -> list:
    """[(text, (head bits, Range))] in kernel order: every group's ranges (a head
    outside a group finds its ranges inactive)."""
    var = "q" if rs.direction == "rows" else "k"
    out = []
    for bits, ranges in rs.groups:
        for r in ranges:
            t = (f"{'keys' if var == 'q' else 'query rows'} {r.text(var, rs.domain, env)}"
                 + ("" if bits == -1 else f" (heads {_bits_text(bits)})"))
            out.append((t, (bits, r)))
    return out


def _bits_text(bits: int) -> str:
    return "{" + ", ".join(str(h) for h in range(bits.bit_length()) if (bits >> h) & 1) + "}"


_SPLIT = '''@triton.jit
def _split(first, full_first, full_end, end, full, done):
    """One range of tiles: [first, end) touched, [full_first, full_end) full when
    `full`. Clipped to start at `done` (an earlier range visited the tiles before
    it): (start, full_start, full_stop, stop), [start, full_start) and
    [full_stop, stop) masked. Ranges come in order of their first tile, so no
    tile is skipped and none is visited twice."""
    start = tl.maximum(first, done)
    stop = tl.maximum(end, start)
    full_start = tl.where(full, tl.minimum(tl.maximum(full_first, start), stop), stop)
    full_stop = tl.where(full, tl.minimum(tl.maximum(full_end, full_start), stop), stop)
    return start, full_start, full_stop, stop
'''


def _range_helper(rs, i: int, bits: int, r, sizes: str = "", env: dict | None = None) -> str:
    """`_key_tiles_i(q0, q1, h, M, N, G.., BLOCK_N)` (or `_query_tiles_i(k0, k1, h, M, N, G..,
    BLOCK_M)`): the tiles of range i for the positions [x0, x1) of one tile, by monotonicity:
    touched [lo(first) // B, cdiv(hi(last), B)), full [cdiv(lo(last), B), hi(first) // B).
    Size-tagged constants print as expressions of the size arguments (`env`: the sizes
    they are checked against, sizes.text)."""
    import torch

    from . import sizes as size_tags
    from .monotone import to_text, to_triton

    rows = rs.direction == "rows"
    v = "q" if rows else "k"
    L, B = ("N", "BLOCK_N") if rows else ("M", "BLOCK_M")
    name = f"_key_tiles_{i}" if rows else f"_query_tiles_{i}"
    what = "keys" if rows else "query rows"
    g0, g1 = size_tags.text(r.g0, env), size_tags.text(r.g1, env)
    doc = (f'    """{what.capitalize()} [{to_text(r.lo, v, env)}, {to_text(r.hi, v, env)}) of positions {v}0 <= {v} < {v}1'
           + ("" if (r.g0, r.g1) == rs.domain else f" (for {g0} <= {v} < {g1})")
           + ("" if bits == -1 else f", heads {_bits_text(bits)}") + f".\n\n"
           f"    Returns (first, full_first, full_end, end, full): tiles [first, end) touched,\n"
           f'    [full_first, full_end) full when `full` (every position of the tile is in range)."""')
    lines = [f"@triton.jit", f"def {name}({v}0, {v}1, h, M, N{sizes}, {B}: tl.constexpr):", doc]
    guarded = (r.g0, r.g1) != rs.domain
    if guarded:
        lines += [f"    s = tl.maximum({v}0, {g0})  # clipped to the range's positions [{g0}, {g1})",
                  f"    e = tl.minimum({v}1, {g1})",
                  f"    active = s < e",
                  f"    {v}_first = tl.minimum(s, {size_tags.text(r.g1 - 1, env, 9)})",
                  f"    {v}_last = tl.maximum(e - 1, {g0})"]
    else:
        lines += [f"    active = {v}0 < {v}1", f"    {v}_first = {v}0", f"    {v}_last = {v}1 - 1"]
    if bits != -1:
        from .ranges import head_runs
        runs = head_runs(bits, bits.bit_length())
        cond = " | ".join(f"(h == {a})" if b == a + 1 else f"((h >= {a}) & (h < {b}))" for a, b in runs)
        lines.append(f"    active = active & ({cond})")
    xs = torch.arange(int(r.g0), int(r.g1), dtype=torch.int64)
    for end, expr in (("lo", r.lo), ("hi", r.hi)):
        for where in ("first", "last"):
            code = to_triton(expr, f"{v}_{where}", xs, env)
            if f"{v}_{where}" not in code:  # no position in it: keep it a tensor like the others
                code = f"tl.zeros_like({v}_{where}) + {code if code.lstrip('-').isdigit() else f'({code})'}"
            lines.append(f"    {end}_{where} = {code}")
    lines += [f"    first = tl.where(active, lo_first // {B}, 0)",
              f"    end = tl.where(active, tl.cdiv(hi_last, {B}), 0)",
              f"    full_first = tl.cdiv(lo_last, {B})",
              (f"    full_end = tl.minimum(hi_first, N) // BLOCK_N  # a ragged last key tile is partial" if rows else
               f"    full_end = tl.where(hi_first >= M, tl.cdiv(M, BLOCK_M), hi_first // BLOCK_M)  # ragged last tile"),
              f"    full = active" + (f" & (s == {v}0) & (e == {v}1)" if guarded else ""),
              f"    return first, full_first, full_end, end, full"]
    return "\n".join(lines) + "\n"


def bounds_source(bounds, sizes: str = "", env: dict | None = None) -> str:
    """The closed-form helpers of a module (empty when both directions read tile lists)."""
    if bounds is None or not any(bounds.closed):
        return ""
    parts = [_SPLIT]
    for rs in (bounds.rows, bounds.cols):
        if rs is not None:
            parts += [_range_helper(rs, i, bits, r, sizes, env) for i, (_, (bits, r)) in enumerate(_range_list(rs, env))]
    return "\n" + "\n\n".join(parts) + "\n"
