"""`BoundPattern.__call__` as a registered PyTorch op, dispatched to a backend.

input:  a bound pattern, q / k / v, the call's options and run-time inputs.
output: out (and lse), differentiable, under eager, autograd and torch.compile.
does not: compute attention itself (the backends do: torch_backend.py,
        flex.py, reference.py, and triton_backend.py where it exists).

[Note: the op] `attnc::attention` and `attnc::attention_backward` are
`torch.library.custom_op`s with fake (meta) kernels, so torch.compile traces
them as single graph nodes (no graph breaks) and autograd calls the chosen
backend's own memory-lean backward. A pattern is not a valid op argument, so
the op receives a string key into a registry of bound patterns (weak: a
pattern that is gone is never kept alive by the registry) plus plain-typed
call options; run-time inputs (segments, block tables) travel as tensors.
Everything heavy -- resolving sizes, checking inputs, plans, masks, choosing
the backend -- happens inside the op, where torch.compile does not trace.

[Note: backend choice] Each backend has `can_run(call, q)` returning None or
the reason it cannot run (NATTEN's pattern). `auto` tries "triton", then
"torch", logging every decline on the "attnc.runtime" logger; a forced backend
raises its reason as a ValueError.
"""

from __future__ import annotations

import functools
import logging
import numbers
from typing import Optional

import torch
from torch import Tensor

from .backend import Backend, Call
from .registry import live_pattern
from .validate import check_finite_result, check_qkv, check_tables

log = logging.getLogger("attnc.runtime")

BACKENDS = ("auto", "triton", "torch", "flex", "reference")
AUTO_ORDER = ("triton", "torch")


# ----------------------------------------------------------------------------- backends


class Unavailable(Backend):
    """A backend that cannot be loaded here; it declines every call with the reason."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def can_run(self, call: Call, q: torch.Tensor) -> str | None:
        return self.reason

    def forward(self, call, q, k, v):  # never chosen: can_run always declines
        raise ValueError(f"backend={self.name!r} cannot run this call: {self.reason}")

    def backward(self, call, q, k, v, out, lse, dout, dlse=None):
        raise ValueError(f"backend={self.name!r} cannot run this call: {self.reason}")


@functools.cache
def get_backend(name: str) -> Backend:
    """The backend object named `name` (imported on first use)."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend()
    if name == "reference":
        from .dense import ReferenceBackend
        return ReferenceBackend()
    if name == "flex":
        from .flex import FlexBackend
        return FlexBackend()
    if name == "triton":
        try:
            from .triton_backend import TritonBackend
        except ImportError as exc:
            return Unavailable("triton", f"the 'triton' backend is not available in this installation ({exc}); "
                                         f"try backend='torch'")
        return TritonBackend()
    raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in BACKENDS)}, got {name!r}")


def _decline_score(backend: Backend, call: Call) -> str | None:
    if call.pattern.ir.score is not None and not backend.scores:
        return (f"the {backend.name} backend does not compute score terms (`score ...`) yet; "
                f"try backend='torch' (or 'reference')")
    return None


def choose_backend(call: Call, q: torch.Tensor, backend: str) -> Backend:
    """The backend that computes `call` (see [Note: backend choice])."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    if backend != "auto":
        chosen = get_backend(backend)
        reason = _decline_score(chosen, call) or chosen.can_run(call, q)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
        return chosen
    reasons = []
    for name in AUTO_ORDER:
        candidate = get_backend(name)
        if name == "triton" and q.device.type != "cuda":
            # the interpreter is for testing kernels (backend="triton"); auto means fast
            reason = f"auto uses the Triton kernels on CUDA only (tensors are on {q.device.type}); force backend='triton' to interpret them"
        else:
            reason = _decline_score(candidate, call) or candidate.can_run(call, q)
        if reason is None:
            return candidate
        log.info("attnc: backend %r declined: %s", name, reason)
        reasons.append(f"{name}: {reason}")
    raise ValueError("no backend can run this call: " + "; ".join(reasons))


# ----------------------------------------------------------------------------- the registry


def pattern_key(pat) -> str:
    """The registry key of a bound pattern (assigned when it is bound: runtime/registry.py)."""
    return pat.op_key


def _lookup(key: str):
    pat = live_pattern(key)
    if pat is None:
        raise ValueError(f"attnc::attention: expected the key of a live bound pattern, got {key!r}; "
                         f"try calling the pattern object itself: pat(q, k, v)")
    return pat


def make_call(pat, q: Tensor, k: Tensor, v: Tensor, inputs: dict, grid, scale: float, needs_grad: bool = False,
              needs_lse: bool = True, block: tuple | None = None, tables: dict | None = None) -> Call:
    """A validated `Call` (sizes resolved, run-time inputs and score tables checked)."""
    B, Hq, Hkv, M, N, D, scale = check_qkv(q, k, v, scale)
    M, N, _, grid = pat.resolve_sizes(M, N, Hq, grid)
    if inputs:
        # shapes, values and the batch rule ([Note: input batches], attnc/call_inputs.py), once for
        # every backend: a backend never sees an input whose batch is neither 1 nor B
        pat.input_batches(M, N, Hq, inputs, batch=B)
    tables = dict(tables or {})
    check_tables(pat, tables, M, N, Hq, grid, q.device)
    return Call(pattern=pat, B=B, Hq=Hq, Hkv=Hkv, M=M, N=N, D=D, Dv=v.shape[-1], grid=grid, scale=scale,
                inputs=dict(inputs), needs_grad=needs_grad, needs_lse=needs_lse or needs_grad, block=block,
                tables=tables)


def probe_call(pat, M: int, N: int, H: int, grid, inputs: dict | None = None, batch: int = 1) -> Call:
    """A validated `Call` at these sizes without real tensors, for planning and checks that
    read no values (tile choices, context-parallel layouts, index proofs): q / k / v are
    zero-stride views of one element, the score term's tables zeros of their declared shapes."""
    e = torch.empty(())
    return make_call(pat, e.expand(batch, H, M, 1), e.expand(batch, H, N, 1), e.expand(batch, H, N, 1),
                     dict(inputs or {}), grid, 1.0,
                     tables={n: torch.zeros(s) for n, s in pat.table_shapes(M, N, H, grid).items()})


def check_block(block) -> tuple | None:
    """`block=` of `pat(...)`, spelled like `plan(block=)`: None, bm (square), (bm, bn), or
    ((query tile shape), (key tile shape)) for N-D tiles; normalised to tuples. Whether the
    kernels can use it (powers of two, a pure grid) is the Triton backend's `can_run`."""
    if block is None:
        return None
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    try:
        bm, bn = block
        if isinstance(bm, (tuple, list)) or isinstance(bn, (tuple, list)):
            bm, bn = tuple(bm), tuple(bn)
            sizes = bm + bn
            if len(bm) != len(bn) or not bm:
                raise TypeError
        else:
            sizes = (bm, bn)
    except (TypeError, ValueError):
        sizes = None
    if sizes is not None and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in sizes):
        sizes = tuple(int(x) for x in sizes)
        if isinstance(bm, tuple):
            bm, bn = sizes[:len(bm)], sizes[len(bm):]
        else:
            bm, bn = sizes
    if sizes is None or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in sizes):
        raise ValueError(f"block: expected the kernels' tiles as two positive integers, or two N-D tile shapes on a "
                         f"grid, got {block!r}; try block=(64, 64) or block=((8, 8), (8, 4))")
    return bm, bn


def _encode_block(block: tuple | None) -> list[int] | None:
    """The op's int-list form of `block`: [bm, bn], or [d, *query tile, *key tile]."""
    if block is None:
        return None
    bm, bn = block
    return [len(bm), *bm, *bn] if isinstance(bm, tuple) else [bm, bn]


def _decode_block(enc: list[int] | None) -> tuple | None:
    if not enc:
        return None
    if len(enc) == 2:
        return enc[0], enc[1]
    d = enc[0]
    return tuple(enc[1:1 + d]), tuple(enc[1 + d:1 + 2 * d])


def _prepare(key, q, k, v, inputs, tables, grid, scale, backend, needs_grad, needs_lse, block) -> tuple[Call, Backend]:
    pat = _lookup(key)
    names = [s.name for s in pat.ir.inputs]
    table_names = [t.name for t in pat.ir.tables]
    call = make_call(pat, q, k, v, dict(zip(names, inputs)), tuple(grid) if grid else None, scale, needs_grad, needs_lse,
                     _decode_block(block), dict(zip(table_names, tables)))
    chosen = choose_backend(call, q, backend)
    if call.score is not None and call.score.reads:
        from .torch_backend import check_table_indices
        check_table_indices(call)  # every allowed pair reads inside its tables ([Note: score terms])
    return call, chosen


# ----------------------------------------------------------------------------- the custom ops


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("attnc::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor], tables: list[Tensor], key: str, grid: list[int],
                 scale: float, backend: str, needs_grad: bool, needs_lse: bool,
                 block: Optional[list[int]]) -> tuple[Tensor, Tensor]:
    """out [B, Hq, M, Dv] and lse [B, Hq, M] of the pattern registered under `key`
    (lse may be NaN when needs_lse and needs_grad are both False); `block`: `_encode_block`;
    `tables`: the score term's table inputs in declaration order."""
    call, chosen = _prepare(key, q, k, v, inputs, tables, grid, scale, backend, needs_grad, needs_lse, block)
    try:
        out, lse = chosen.forward(call, q, k, v)
        check_finite_result(q, k, v, out, lse if call.needs_lse else None, call.scale)
    except ValueError as exc:
        if call.score is None or "overflows" not in str(exc):
            raise
        raise ValueError(f"{exc}; or the score term `{call.score.text}` is not finite on an allowed pair "
                         f"(a division by zero, a power of a negative number, an overflowing exp): expected finite "
                         f"logits; try guarding the term, e.g. with max(...) or a wider mask exclusion") from None
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, inputs, tables, key, grid, scale, backend, needs_grad, needs_lse, block):
    B, Hq, M, _ = q.shape
    return q.new_empty(B, Hq, M, v.shape[-1]), q.new_empty(B, Hq, M, dtype=_lse_dtype(q))


@torch.library.custom_op("attnc::attention_backward", mutates_args=())
def attention_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor,
                          inputs: list[Tensor], tables: list[Tensor], key: str, grid: list[int], scale: float,
                          backend: str, block: Optional[list[int]]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """dq, dk, dv and the tables' gradients of sum(out * dout) + sum(lse * dlse)."""
    call, chosen = _prepare(key, q, k, v, inputs, tables, grid, scale, backend, True, True, block)
    grads = chosen.backward(call, q, k, v, out, lse, dout.contiguous(), dlse.contiguous())
    dq, dk, dv = grads[:3]
    dt = grads[3] if len(grads) > 3 else {}
    dtables = [dt[n].to(t.dtype).contiguous() if n in dt else torch.zeros_like(t) for n, t in call.tables.items()]
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dtables


@attention_backward_op.register_fake
def _attention_backward_fake(q, k, v, out, lse, dout, dlse, inputs, tables, key, grid, scale, backend, block):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(t) for t in tables]


def _setup_context(ctx, inputs, output):
    q, k, v, ins, tables, key, grid, scale, backend, _, _, block = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *ins, *tables)
    ctx.n_inputs, ctx.key, ctx.grid, ctx.scale, ctx.backend = len(ins), key, list(grid), scale, backend
    ctx.block = block
    # autograd wants the gradient structure to mirror the inputs: an empty
    # int list is an empty list there, a non-empty one a single leaf
    ctx.grid_grad = [] if not grid else None


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    ins, tables = rest[:ctx.n_inputs], rest[ctx.n_inputs:]
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv, dtables = attention_backward_op(q, k, v, out, lse, dout, dlse, ins, tables, ctx.key, ctx.grid, ctx.scale,
                                                ctx.backend, ctx.block)
    return dq, dk, dv, [None] * ctx.n_inputs, list(dtables), None, ctx.grid_grad, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the entry point


def attention(pat, q, k, v, *, return_lse: bool, scale, backend: str, grid, inputs: dict, block=None):
    """`BoundPattern.__call__`: validate what is cheap to validate here, then call the op."""
    scale = check_qkv(q, k, v, scale)[-1]
    block = check_block(block)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    pat.check_input_names(inputs, tables=True)
    table_names = [t.name for t in pat.ir.tables]
    tables = [inputs.pop(n) for n in table_names]
    for name, t in zip(table_names, tables):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a real torch tensor (the score term's table), got {type(t).__name__}; "
                             f"try torch.as_tensor({name}, dtype=torch.float32)")
    specs = pat.check_input_names(inputs)
    from attnc.inputs import CuSeqlens
    inputs = {n: (t.segment_ids(k.shape[2], n) if isinstance(t, CuSeqlens) else t) for n, t in inputs.items()}
    if pat.has_topk():
        # topk is lowered to routed(sel) with tables chosen from q and k (attnc/dynamic.py):
        # every backend then runs the lowered pattern through its routed code path
        pat, inputs = pat.route(q, k, grid=grid, **inputs)
        specs = pat.check_input_names(inputs)
    for name in specs:
        if not isinstance(inputs[name], Tensor):
            raise ValueError(f"{name}: expected a torch integer tensor, got {type(inputs[name]).__name__}; "
                             f"try torch.as_tensor({name})")
    if grid is None:
        grid_list: list[int] = []
    else:
        gt = (grid,) if isinstance(grid, int) else grid
        if not isinstance(gt, (tuple, list)) or not gt or not all(isinstance(g, int) and not isinstance(g, bool) for g in gt):
            raise ValueError(f"grid: expected a tuple of positive integer sizes like (16, 16), got {grid!r}")
        grid_list = list(gt)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tables))
    out, lse = attention_op(q, k, v, [inputs[n] for n in specs], tables, pattern_key(pat), grid_list,
                            scale, backend, needs_grad, return_lse, _encode_block(block))
    return (out, lse) if return_lse else out
