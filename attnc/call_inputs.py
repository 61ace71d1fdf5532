"""A call's run-time inputs and score-term tables, checked against a pattern.

input:  a bound pattern's IR, the call's sizes (M, N, H, grid) and the inputs passed by
        name (tensors, or `attnc.cu_seqlens` offsets for a `segments` input).
output: the declared inputs checked by name (`check_input_names`), one dict of int64 CPU
        tensors per batch element (`input_batches`), the tables' shapes (`table_shapes`).
does not: evaluate the mask (reference.py) or check the tables' values and devices
        (runtime/validate.py); `BoundPattern`'s methods of the same names call these.
"""

from __future__ import annotations

from . import ir
from .errors import AttnError, error
from .inputs import CuSeqlens


def int_value(expr, env) -> int | None:
    """The value of `expr` under `env` (bindings may refer to each other), None if unknown."""
    import sympy
    v = sympy.sympify(expr)
    for _ in range(len(env) + 1):  # bindings are in terms of earlier ones: substitute to a fixed point
        if isinstance(v, int) or not v.free_symbols:
            break
        v = v.xreplace(env)
    if isinstance(v, int):
        return v
    return int(v) if v.is_Integer else None


def check_input_names(pattern: ir.PatternIR, inputs: dict, tables: bool = False) -> dict:
    """Raise ValueError unless `inputs` names exactly the declared run-time
    inputs (and, with `tables`, the score term's table inputs); returns
    {name: InputSpec} of the mask's inputs in declaration order."""
    specs = {s.name: s for s in pattern.inputs}
    table_specs = {t.name: t for t in pattern.tables}
    for name in inputs:
        if name in table_specs and not tables:
            raise ValueError(f"'{name}' is a table input, read only by the score term: the mask does not take it; "
                             f"try passing only {', '.join(specs) or 'no inputs'} here, and {name}= to the op")
        if name not in specs and name not in table_specs:
            declared = ", ".join([*specs, *table_specs]) or "none"
            raise ValueError(f"unexpected input '{name}': pattern '{pattern.name}' declares run-time inputs: {declared}")
    for name, spec in specs.items():
        if name not in inputs:
            raise ValueError(f"missing run-time input '{name}' ({spec.kind}): expected {name}=tensor; "
                             f"try pat(q, k, v, {name}=...) or pat.mask(M, N, {name}=...)")
    if tables:
        for name, t in table_specs.items():
            if name not in inputs:
                raise ValueError(f"missing table input '{name}' of the score term: expected {name}=tensor of shape "
                                 f"({', '.join(str(d) for d in t.dims)}); try pat(q, k, v, {name}=torch.zeros(...))")
    return specs


def table_shapes(pattern: ir.PatternIR, M: int, N: int, H: int, grid,
                 sources: dict | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of every table input of the score term at these sizes ({} without one)."""
    if not pattern.tables:
        return {}
    env = {**pattern.binding_map(), ir.M: M, ir.N: N, ir.H: H}
    if grid is not None:
        env.update({ir.axis_size(a): s for a, s in zip(pattern.layout.axes, grid)})
    out = {}
    for t in pattern.tables:
        dims = tuple(int_value(d, env) for d in t.dims)
        if any(d is None or d < 1 for d in dims):
            raise AttnError(error(t.span, f"table '{t.name}' has shape {dims} at M = {M}, N = {N}, H = {H}: "
                                          "every dimension must be a positive integer"), sources)
        out[t.name] = dims
    return out


def input_batches(pattern: ir.PatternIR, M: int, N: int, H: int, inputs: dict, batch: int | None = None,
                  sources: dict | None = None) -> tuple[list[dict], bool]:
    """Validate run-time inputs; returns (one dict per batch element, whether
    any input carried a batch dimension).

    [Note: input batches] The broadcasting rule, the same for every backend:
    an input's batch dimension (absent = 1) is 1 -- one input shared by the
    whole batch -- or the batch `batch` of q when the op is called; anything
    else is a ValueError (expected / got / try). Without `batch` (`mask`,
    `to_flex`) the inputs' batches must agree the same way among
    themselves. The list returned has one entry when every input has batch
    1, else one per batch element. The op checks this once, in
    `runtime/ops.make_call`, before any backend runs."""
    import torch

    specs = check_input_names(pattern, inputs)
    if not specs:
        return [{}], False
    per_batch: list[dict] = []
    B = batch
    first = None  # the input that set B when no batch is given
    batched = False
    normalized = {}
    for name, spec in specs.items():
        t = inputs[name]
        if isinstance(t, CuSeqlens):
            if spec.kind != "segments":
                raise ValueError(f"{name}: cu_seqlens offsets describe segments, but '{name}' is {spec.kind}({spec.block})")
            t = t.segment_ids(N, name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch integer tensor, got {type(t).__name__}; try torch.as_tensor({name})")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name}: expected an integer tensor, got dtype {t.dtype}; try {name}.long()")
        t = t.to("cpu", torch.int64)
        batched |= t.dim() == (2 if spec.kind == "segments" else 4)
        if spec.kind == "segments":
            if t.dim() == 1:
                t = t[None]
            if t.dim() != 2 or t.shape[-1] != N:
                raise ValueError(f"{name}: expected segment ids of shape [B, N] = [B, {N}], got {tuple(inputs[name].shape)}; "
                                 f"try one id per key position, or attnc.cu_seqlens(offsets)")
        else:
            b = int_value(spec.block, {**pattern.binding_map(), ir.M: M, ir.N: N, ir.H: H})
            if b is None or b < 1:
                raise AttnError(error(spec.span, f"the block size of '{name}' must be a positive integer here, got {b}"),
                                sources)
            nqb, nkb = -(-M // b), -(-N // b)
            if t.dim() == 3:
                t = t[None]
            if t.dim() != 4 or t.shape[2] != nqb or t.shape[1] not in (1, H):
                raise ValueError(f"{name}: expected block indices of shape [B, H, ceil(M/{b}), kmax] = [B, {H}, {nqb}, kmax], "
                                 f"got {tuple(inputs[name].shape)}; try H or 1 heads and one row per query block")
            if t.numel() and (int(t.min()) < -1 or int(t.max()) >= nkb):
                raise ValueError(f"{name}: expected key-block indices in [0, {nkb}) or -1 for padding, "
                                 f"got values in [{int(t.min())}, {int(t.max())}]; try {name}.masked_fill(({name} < 0) | "
                                 f"({name} >= {nkb}), -1) to drop the others")
        got = t.shape[0]
        if B is None or (batch is None and B == 1):
            if got > 1 or B is None:
                B, first = got, name
        elif got not in (1, B):
            whose = "q's batch" if batch is not None else f"the batch of '{first}'"
            raise ValueError(f"{name}: expected batch size 1 (shared by the whole batch) or {B} ({whose}), got {got} "
                             f"(shape {tuple(inputs[name].shape)}); try one entry per batch element, {B} in all, "
                             f"or a single one for every element")
        normalized[name] = t
    rows = 1 if all(t.shape[0] == 1 for t in normalized.values()) else B
    for bi in range(rows):
        per_batch.append({n: (t[bi] if t.shape[0] > 1 else t[0]) for n, t in normalized.items()})
    return per_batch, batched
