"""The simulator: density, tile counts and a roofline estimate of the speedup
of a block-sparse attention kernel over dense FlashAttention on a given GPU.

input:  a Plan (plans.py), head dim, GPU name.
output: a `SimReport` (attributes and `to_dict()` keys fixed by the spec).
does not: run anything on a GPU; constants are data-sheet peaks times an
        efficiency factor that issue 9's measurements will calibrate.

The model (docs/simulator.md): each visited tile costs 4*bm*bn*D FLOPs forward
(QK^T and PV; 2.5x that backward); a partial tile pays an extra `mask_cost`
fraction for the mask arithmetic; every visited tile streams its K and V tile
from HBM and every query tile reads Q and writes O. Time is the roofline
max(FLOPs / (peak * efficiency), bytes / bandwidth). Dense FlashAttention visits
every tile with no mask. predicted_speedup = T_dense / T_sparse.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

#: dense BF16/FP16 tensor-core peak (TFLOP/s, no sparsity) and HBM bandwidth (TB/s), vendor data sheets (SXM parts)
GPUS = {
    "a100": {"tflops": 312.0, "tbps": 2.039, "name": "NVIDIA A100 SXM 80GB"},
    "h100": {"tflops": 989.4, "tbps": 3.35, "name": "NVIDIA H100 SXM"},
    "h200": {"tflops": 989.4, "tbps": 4.8, "name": "NVIDIA H200 SXM"},
    "b200": {"tflops": 2250.0, "tbps": 8.0, "name": "NVIDIA B200"},
}


@dataclass(frozen=True)
class Model:
    efficiency: float = 0.7  # fraction of peak a well-tuned attention kernel sustains
    mask_cost: float = 0.25  # extra work of a partial tile relative to a full one
    bytes_per_element: int = 2  # bf16 / fp16
    bwd_flop_factor: float = 2.5  # backward FLOPs per tile relative to forward


@dataclass(frozen=True)
class SimReport:
    pattern: str
    gpu: str
    M: int
    N: int
    heads: int
    head_dim: int
    tile: tuple[int, int]
    density: float
    flop_bound: float
    tiles_total: int
    tiles_full: int
    tiles_partial: int
    tile_density: float
    tile_bound: float
    predicted_speedup: float
    predicted_speedup_bwd: float
    dense_ms: float
    sparse_ms: float
    method: str
    permutation_ms: float = 0.0  # N-D tiles: gathering Q/K/V into tile-major order and O back (forward)
    tile_shape: tuple | None = None  # N-D tiles: ((query tile shape), (key tile shape))
    density_formula: str | None = None  # sympy formula of N and the parameters (1-D, M = N), when one exists
    formula_exact_when: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile"] = list(self.tile)
        if self.tile_shape is not None:
            d["tile_shape"] = [list(t) for t in self.tile_shape]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        rows = [
            ("pattern", self.pattern),
            ("problem", f"M={self.M} N={self.N} heads={self.heads} head_dim={self.head_dim}"),
            ("gpu / tile", f"{self.gpu} / {self.tile[0]}x{self.tile[1]}" + (
                "" if self.tile_shape is None else
                " tokens = " + "/".join("x".join(map(str, t)) for t in self.tile_shape) + " (tile-major order)")),
            ("density", f"{self.density:.6f}"),
            ("flop_bound", f"{self.flop_bound:.2f}x"),
            ("tiles", f"{self.tiles_full} full + {self.tiles_partial} partial of {self.tiles_total}"),
            ("tile_density", f"{self.tile_density:.6f}"),
            ("tile_bound", f"{self.tile_bound:.2f}x"),
            ("predicted_speedup", f"{self.predicted_speedup:.2f}x forward, {self.predicted_speedup_bwd:.2f}x backward"),
            ("roofline time", f"dense {self.dense_ms:.3f} ms, sparse {self.sparse_ms:.3f} ms (forward)" + (
                f", of which token permutation {self.permutation_ms:.3f} ms" if self.tile_shape is not None else "")),
            ("plan", self.method),
        ]
        if self.density_formula is not None:
            rows.insert(4, ("density formula", f"{self.density_formula}   (exact when {self.formula_exact_when})"))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _time(gpu: dict, flops: float, bytes_: float, model: Model) -> float:
    return max(flops / (gpu["tflops"] * 1e12 * model.efficiency), bytes_ / (gpu["tbps"] * 1e12))


def simulate_plan(plan, *, name: str, head_dim: int, gpu: str, batch: int = 1, model: Model = Model()) -> SimReport:
    if gpu not in GPUS:
        raise ValueError(f"gpu: expected one of {', '.join(GPUS)}, got {gpu!r}")
    spec = GPUS[gpu]
    c = plan.counts()
    bm, bn = plan.block
    nq, nk = plan.shape
    D, e = head_dim, model.bytes_per_element
    tile_flops = 4.0 * bm * bn * D * batch
    kv_bytes = 2.0 * bn * D * e * batch
    qo_bytes = 2.0 * bm * D * e * batch * nq * plan.heads
    visited = c["tiles_full"] + c["tiles_partial"]
    eff_tiles = c["tiles_full"] + c["tiles_partial"] * (1 + model.mask_cost)
    dense = _time(spec, c["tiles_total"] * tile_flops, c["tiles_total"] * kv_bytes + qo_bytes, model)
    sparse = _time(spec, eff_tiles * tile_flops, visited * kv_bytes + qo_bytes, model)
    f = model.bwd_flop_factor
    dense_b = _time(spec, f * c["tiles_total"] * tile_flops, 2 * c["tiles_total"] * kv_bytes + 2 * qo_bytes, model)
    sparse_b = _time(spec, f * eff_tiles * tile_flops, 2 * visited * kv_bytes + 2 * qo_bytes, model)
    perm = perm_b = 0.0
    if plan.tile_shape is not None:
        # [Note: permutation cost] N-D tiles process tokens in tile-major order: forward gathers Q, K, V
        # into it and scatters O back (each a read and a write); backward permutes dO in and dQ, dK, dV out.
        row = 2.0 * D * e * batch * plan.heads  # read + write of one token's vector
        perm = row * (plan.M + 2 * plan.N + plan.M) / (spec["tbps"] * 1e12)
        perm_b = row * (2 * plan.M + 2 * plan.N) / (spec["tbps"] * 1e12)
        sparse, sparse_b = sparse + perm, sparse_b + perm_b
    density = plan.density()
    return SimReport(
        pattern=name, gpu=gpu, M=plan.M, N=plan.N, heads=plan.heads, head_dim=D, tile=(bm, bn),
        density=density, flop_bound=(1 / density) if density else float("inf"),
        tiles_total=c["tiles_total"], tiles_full=c["tiles_full"], tiles_partial=c["tiles_partial"],
        tile_density=visited / c["tiles_total"], tile_bound=(c["tiles_total"] / visited) if visited else float("inf"),
        predicted_speedup=dense / sparse if sparse else float("inf"),
        predicted_speedup_bwd=dense_b / sparse_b if sparse_b else float("inf"),
        dense_ms=dense * 1e3, sparse_ms=sparse * 1e3, method=plan.method, permutation_ms=perm * 1e3,
        tile_shape=plan.tile_shape,
    )


# ----------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Sweep:
    """Simulator reports over a range of one variable: `N` (M = N) or a pattern parameter."""

    over: str
    values: tuple
    reports: tuple  # SimReport per value

    def to_dict(self) -> dict:
        return {"over": self.over, "values": list(self.values), "reports": [r.to_dict() for r in self.reports]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        head = (self.over, "density", "flop_bound", "tiles full+partial", "tile_bound", "speedup fwd", "speedup bwd")
        rows = [head] + [(str(v), f"{r.density:.6f}", f"{r.flop_bound:.2f}x", f"{r.tiles_full}+{r.tiles_partial}",
                          f"{r.tile_bound:.2f}x", f"{r.predicted_speedup:.2f}x", f"{r.predicted_speedup_bwd:.2f}x")
                         for v, r in zip(self.values, self.reports)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        r0 = self.reports[0]
        title = f"{r0.pattern} on {r0.gpu}, tile {r0.tile[0]}x{r0.tile[1]}, heads={r0.heads} head_dim={r0.head_dim}"
        lines = [title] + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Speedup, tile bound and FLOP bound against the swept variable (PNG, matplotlib Agg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = list(self.values)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot(xs, [r.flop_bound for r in self.reports], "o--", label="flop_bound (1 / density)")
        ax.plot(xs, [r.tile_bound for r in self.reports], "s-", label="tile_bound")
        ax.plot(xs, [r.predicted_speedup for r in self.reports], "^-", label="predicted speedup (fwd)")
        ax.plot(xs, [r.predicted_speedup_bwd for r in self.reports], "v:", label="predicted speedup (bwd)")
        if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(self.over)
        ax.set_ylabel("x over dense")
        r0 = self.reports[0]
        ax.set_title(f"{r0.pattern}: {r0.gpu}, tile {r0.tile[0]}x{r0.tile[1]}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def parse_sweep(text: str) -> tuple[str, tuple[int, ...]]:
    """`N=1024:65536:x2` (geometric), `N=1000:5000:+1000` (arithmetic) or `window=64,128,256`."""
    name, eq, spec = text.partition("=")
    name = name.strip()
    if not eq or not name or not spec.strip():
        raise ValueError(f"--sweep: expected NAME=START:STOP:xFACTOR, NAME=START:STOP:+STEP or NAME=V1,V2,..., got {text!r}")
    try:
        if ":" in spec:
            start, stop, step = spec.split(":")
            a, b = int(start), int(stop)
            if step.startswith("x"):
                f = int(step[1:])
                if f < 2 or a < 1:
                    raise ValueError
                vals = []
                v = a
                while v <= b:
                    vals.append(v)
                    v *= f
            else:
                st = int(step.lstrip("+"))
                if st < 1:
                    raise ValueError
                vals = list(range(a, b + 1, st))
        else:
            vals = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--sweep: cannot read {spec!r}; expected START:STOP:xFACTOR (factor >= 2), START:STOP:+STEP "
                         f"or V1,V2,... with integers, e.g. N=1024:65536:x2 or window=64,128,256") from None
    if not vals or len(vals) > 64:
        raise ValueError(f"--sweep: expected 1 to 64 values, got {len(vals)} from {spec!r}")
    return name, tuple(vals)
