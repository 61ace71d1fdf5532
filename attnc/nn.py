"""Modules: `SparseAttention`, a drop-in attention layer; `NeighborhoodAttention2D` and
`WindowAttention2D`, vision layers with relative position bias; `KVCache`, a decoding cache
that evicts what the pattern never reads again; the Hugging Face adapter (attnc/hf.py: `register_hf`,
`hf_attention`, ...), re-exported here.

input:  a bound pattern (or an `.attn` file and its parameters), layer sizes.
output: `torch.nn.Module`s / attention functions that call the attnc op.
does not: define masks (the pattern does) or pick kernels (the op does).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import ir as _ir
from .hf import (DECODE_MAX_QUERIES, hf_attention, hf_key_validity, hf_padding_mask, padding_ids,  # noqa: F401
                 register_hf, with_key_padding)
from .loader import load
from .program import BoundPattern


def _bind(pattern_or_path, pattern: str | None, params: dict) -> BoundPattern:
    if isinstance(pattern_or_path, BoundPattern):
        if pattern is not None or params:
            raise ValueError("SparseAttention: expected pattern parameters only with a file path, got a bound pattern "
                             f"and {sorted(params) or [pattern]}; try prog.pattern(name, **params) first")
        return pattern_or_path
    if isinstance(pattern_or_path, (str, os.PathLike)):
        return load(pattern_or_path).pattern(pattern, **params)
    raise ValueError(f"SparseAttention: expected a BoundPattern or a path to an .attn file, got "
                     f"{type(pattern_or_path).__name__}; try attnc.load(path).pattern(name)")


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SparseAttention: expected {name} to be a positive integer, got {value!r}")


class SparseAttention(nn.Module):
    """Multi-head attention restricted to an attnc pattern.

    ``SparseAttention(pattern_or_path, embed_dim=E, num_heads=H, num_kv_heads=Hkv)``
    projects ``query [B, M, E]`` (and ``key`` / ``value`` ``[B, N, E]``, which
    default to ``query``) to H query heads and Hkv key/value heads (GQA when
    Hkv < H) of size ``head_dim = E // H``, attends with the pattern and
    projects back: the result is ``[B, M, E]``. With ``embed_dim=None`` there
    are no projections: inputs are already ``[B, M, H * D]`` and
    ``[B, N, Hkv * D]``. Pattern parameters are keywords when a path is given:

    >>> layer = attnc.nn.SparseAttention("examples/mistral.attn", embed_dim=512, num_heads=8, window=128)
    >>> y = layer(x)                     # x [B, M, 512] -> y [B, M, 512]
    >>> y = layer(x, doc=ids)            # run-time inputs of the pattern, as for pat(q, k, v, doc=ids)

    A pattern with a score term owns its tables as learnable parameters (``layer.tables``,
    truncated normal, std 0.02 like Swin's and NATTEN's bias tables) when their shapes
    follow from the pattern's parameters, ``num_heads`` and ``grid``; a table whose shape
    needs the sequence length is passed per call (``layer(x, bias=t)``), as is any table
    given explicitly.
    """

    def __init__(self, pattern_or_path, *, embed_dim: int | None = None, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = True, pattern: str | None = None, backend: str = "auto",
                 scale: float | None = None, grid=None, device=None, dtype=None, **params):
        super().__init__()
        self.pattern = _bind(pattern_or_path, pattern, params)
        _positive("num_heads", num_heads)
        _positive("num_kv_heads", num_kv_heads, allow_none=True)
        _positive("embed_dim", embed_dim, allow_none=True)
        _positive("head_dim", head_dim, allow_none=True)
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"SparseAttention: expected num_heads to be a multiple of num_kv_heads (GQA), got "
                             f"num_heads={num_heads} and num_kv_heads={num_kv_heads}; try num_kv_heads in the divisors of {num_heads}")
        if embed_dim is not None and head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"SparseAttention: expected embed_dim divisible by num_heads, got embed_dim={embed_dim} "
                                 f"and num_heads={num_heads}; try head_dim=... explicitly")
            head_dim = embed_dim // num_heads
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.backend, self.scale, self.grid = backend, scale, grid
        if embed_dim is None:
            self.q_proj = self.k_proj = self.v_proj = self.out_proj = None
        else:
            kw = dict(bias=bias, device=device, dtype=dtype)
            self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, **kw)
            self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, **kw)
            self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, **kw)
            self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, **kw)
        self.tables = nn.ParameterDict({
            name: nn.Parameter(nn.init.trunc_normal_(torch.empty(shape, device=device, dtype=dtype), std=0.02))
            for name, shape in owned_table_shapes(self.pattern, num_heads, grid).items()})

    def extra_repr(self) -> str:
        return (f"pattern={self.pattern.name}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, backend={self.backend!r}")

    def _split(self, x: torch.Tensor, heads: int, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = f"{x.dim()}-D shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SparseAttention: {name}: expected a 3-D tensor [B, L, features], got {got}; "
                             f"try {name}.unsqueeze(0) for a single sequence")
        B, L, F = x.shape
        if F % heads:
            raise ValueError(f"SparseAttention: {name}: expected the last dim to split into {heads} heads, got {F}")
        return x.view(B, L, heads, F // heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None, *,
                grid=None, **inputs) -> torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        if self.q_proj is not None:
            for name, t in (("query", query), ("key", key), ("value", value)):
                if isinstance(t, torch.Tensor) and t.shape[-1] != self.embed_dim:
                    raise ValueError(f"SparseAttention: {name}: expected last dim embed_dim={self.embed_dim}, got "
                                     f"{tuple(t.shape)}")
            query, key, value = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        q = self._split(query, self.num_heads, "query")
        k = self._split(key, self.num_kv_heads, "key")
        v = self._split(value, self.num_kv_heads, "value")
        tables = {n: t for n, t in self.tables.items() if n not in inputs}
        out = self.pattern(q, k, v, scale=self.scale, backend=self.backend, grid=grid if grid is not None else self.grid,
                           **tables, **inputs)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return self.out_proj(out) if self.out_proj is not None else out


def owned_table_shapes(pattern: BoundPattern, heads: int, grid=None) -> dict[str, tuple[int, ...]]:
    """The score term's tables whose shapes follow from the pattern's parameters, `heads` and
    `grid` (sizes of a grid layout; without them only tables that need no axis size): a layer
    owns those as parameters. Tables whose shapes need M or N are left to the caller."""
    import sympy

    if not pattern.ir.tables:
        return {}
    env = {**pattern.ir.binding_map(), _ir.H: heads}
    if grid is not None and pattern.layout.axes:
        gt = (grid,) if isinstance(grid, int) else tuple(grid)
        env.update({_ir.axis_size(a): g for a, g in zip(pattern.layout.axes, gt)})
    out = {}
    for spec in pattern.ir.tables:
        dims = []
        for d in spec.dims:
            v = sympy.sympify(d)
            for _ in range(len(env) + 1):
                if not v.free_symbols:
                    break
                v = sympy.sympify(v.xreplace(env))
            if v.free_symbols or not v.is_Integer or int(v) < 1:
                break
            dims.append(int(v))
        else:
            out[spec.name] = tuple(dims)
    return out


#: the patterns of the vision layers below (NATTEN's and Swin's relative position bias)
_VISION = """
pattern na2d(size = 7, dilation = 1) on grid(h, w) = neighborhood(size, dilation = dilation)
pattern na2d_rpb(size = 7, dilation = 1, rpb: table(H, 2 * size - 1, 2 * size - 1)) on grid(h, w) =
    neighborhood(size, dilation = dilation)
    score score + rpb[h, (k.h - q.h) // dilation + size - 1, (k.w - q.w) // dilation + size - 1]
pattern win2d(win = 7, shift = 0) on grid(h, w) = block(win, shift = shift)
pattern win2d_rpb(win = 7, shift = 0, rpb: table((2 * win - 1) * (2 * win - 1), H)) on grid(h, w) =
    block(win, shift = shift)
    score score + rpb[(q.h - k.h + win - 1) * (2 * win - 1) + q.w - k.w + win - 1, h]
"""


class _Attention2D(nn.Module):
    """A 2-D attention layer on channels-last images ``[B, H, W, C]`` (NATTEN's module layout):
    fused qkv projection, the pattern over the H x W grid, output projection."""

    def __init__(self, name: str, dim: int, num_heads: int, params: dict, *, rpb: bool, qkv_bias: bool,
                 proj_bias: bool, qk_scale: float | None, proj_drop: float, backend: str, device, dtype):
        super().__init__()
        _positive("dim", dim)
        _positive("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"{type(self).__name__}: expected dim divisible by num_heads, got dim={dim} and "
                             f"num_heads={num_heads}; try num_heads in the divisors of {dim}")
        from .loader import loads

        self.pattern = loads(_VISION, file="<attnc.nn>").pattern(name + ("_rpb" if rpb else ""), **params)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.backend = backend
        kw = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **kw)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **kw)
        self.proj_drop = nn.Dropout(proj_drop)
        shapes = owned_table_shapes(self.pattern, num_heads)
        self.rpb = (nn.Parameter(nn.init.trunc_normal_(torch.empty(shapes["rpb"], **kw), std=0.02)) if rpb else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.dim:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: expected x of shape [B, H, W, {self.dim}] (channels last), got "
                             f"{got}; try x.permute(0, 2, 3, 1) for [B, C, H, W]")
        B, Hh, Ww, C = x.shape
        qkv = self.qkv(x).reshape(B, Hh * Ww, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        tables = {"rpb": self.rpb} if self.rpb is not None else {}
        out = self.pattern(qkv[0], qkv[1], qkv[2], grid=(Hh, Ww), scale=self.scale, backend=self.backend, **tables)
        out = out.transpose(1, 2).reshape(B, Hh, Ww, C)
        return self.proj_drop(self.proj(out))

    #: the subclass's own constructor arguments, shown by `extra_repr`
    _geometry: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        own = "".join(f"{name}={getattr(self, name)}, " for name in self._geometry)
        return f"dim={self.dim}, num_heads={self.num_heads}, {own}rpb={self.rpb is not None}, backend={self.backend!r}"


class NeighborhoodAttention2D(_Attention2D):
    """Neighborhood attention on ``[B, H, W, dim]`` images, with NATTEN's relative position bias.

    ``NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=1)`` follows NATTEN's
    module: a fused qkv projection, each pixel attends its ``kernel_size`` x ``kernel_size``
    (dilated) neighbourhood, a learned bias ``rpb [num_heads, 2 k - 1, 2 k - 1]`` indexed by
    the key's offset (on by default, ``rpb=False`` for none), then the output projection.

    >>> layer = attnc.nn.NeighborhoodAttention2D(dim=128, num_heads=4, kernel_size=7)
    >>> y = layer(x)                     # x [B, 56, 56, 128] -> y [B, 56, 56, 128]
    """

    _geometry = ("kernel_size", "dilation")

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int = 1, *, rpb: bool = True,
                 qkv_bias: bool = True, proj_bias: bool = True, qk_scale: float | None = None, proj_drop: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__("na2d", dim, num_heads, {"size": kernel_size, "dilation": dilation}, rpb=rpb, qkv_bias=qkv_bias,
                         proj_bias=proj_bias, qk_scale=qk_scale, proj_drop=proj_drop, backend=backend, device=device,
                         dtype=dtype)
        self.kernel_size, self.dilation = kernel_size, dilation


class WindowAttention2D(_Attention2D):
    """Swin window attention on ``[B, H, W, dim]`` images, with Swin's relative position bias.

    ``WindowAttention2D(dim, num_heads, window_size, shift=0)``: non-overlapping windows
    (shifted by ``shift`` for SW-MSA: Swin's cyclic shift and region mask, without rolling
    the tensor), a learned table ``rpb [(2 w - 1)^2, num_heads]`` read at Swin's
    relative_position_index (``rpb=False`` for none).
    """

    _geometry = ("window_size", "shift")

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int = 0, *, rpb: bool = True,
                 qkv_bias: bool = True, proj_bias: bool = True, qk_scale: float | None = None, proj_drop: float = 0.0,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__("win2d", dim, num_heads, {"win": window_size, "shift": shift}, rpb=rpb, qkv_bias=qkv_bias,
                         proj_bias=proj_bias, qk_scale=qk_scale, proj_drop=proj_drop, backend=backend, device=device,
                         dtype=dtype)
        self.window_size, self.shift = window_size, shift


class KVCache:
    """A decoding cache that evicts what the pattern can never read again.

    ``KVCache(pattern, num_heads=Hq, num_kv_heads=Hkv)``; ``cache.update(k, v)`` appends the
    newest tokens (``[B, Hkv, t, D]``, the same count for every sequence), ``cache.attend(q)``
    runs ``pattern.decode`` over what is kept (``q [B, Hq, m, D]``, the newest ``m`` tokens).
    After a prefill whose queries were answered elsewhere (the op over the prompt), say so:
    ``cache.update(k, v, attended=True)``. With ``evict=True`` (the default), once ``slack``
    tokens were attended since the last time, the cache drops, per key/value head, the
    positions ``pattern.kv_retention`` proves no later query can attend
    (a key/value head keeps what any of its query heads may read): ``sliding(w) | (sink(s) &
    causal)`` holds at most ``s + w + slack`` entries however long the generation, while a
    DuoAttention mixture keeps its retrieval heads whole. Outputs equal those of a cache that
    keeps everything (tests/test_decode.py).

    >>> cache = attnc.nn.KVCache(pat, num_heads=8, num_kv_heads=2)
    >>> cache.update(k_new, v_new); out = cache.attend(q_new)
    """

    def __init__(self, pattern: BoundPattern, *, num_heads: int, num_kv_heads: int | None = None, evict: bool = True,
                 slack: int = 256):
        if not isinstance(pattern, BoundPattern):
            raise ValueError(f"KVCache: expected a BoundPattern, got {type(pattern).__name__}; "
                             "try attnc.load(path).pattern(name)")
        _positive("num_heads", num_heads)
        _positive("num_kv_heads", num_kv_heads, allow_none=True)
        _positive("slack", slack)
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"KVCache: expected num_heads to be a multiple of num_kv_heads, got {num_heads} and "
                             f"{num_kv_heads}")
        self.pattern, self.num_heads, self.num_kv_heads = pattern, num_heads, num_kv_heads
        self.evict, self.slack = evict, slack
        self.length = 0  # tokens seen (the absolute position of the next one)
        self.k: list[torch.Tensor] | None = None  # per key/value head [B, S_g, D]
        self.v: list[torch.Tensor] | None = None
        self.pos: list[torch.Tensor] = []  # per key/value head [S_g] absolute positions
        self._evicted_at = 0  # the length at the last eviction
        self._queried = 0  # positions below this were attended (or declared attended)

    def stored(self) -> list[int]:
        """Entries kept per key/value head."""
        return [int(p.numel()) for p in self.pos]

    def update(self, k: torch.Tensor, v: torch.Tensor, *, attended: bool = False) -> None:
        if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[1] != self.num_kv_heads or v.shape[:3] != k.shape[:3]:
            got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
            raise ValueError(f"KVCache.update: expected k, v of shape [B, {self.num_kv_heads}, t, D], got {got}; "
                             "try the new tokens' keys and values only")
        t = k.shape[2]
        new_pos = torch.arange(self.length, self.length + t, device=k.device)
        if self.k is None:
            self.k = [k[:, g] for g in range(self.num_kv_heads)]
            self.v = [v[:, g] for g in range(self.num_kv_heads)]
            self.pos = [new_pos.clone() for _ in range(self.num_kv_heads)]
        else:
            if k.shape[0] != self.k[0].shape[0] or k.shape[-1] != self.k[0].shape[-1]:
                raise ValueError(f"KVCache.update: expected batch {self.k[0].shape[0]} and head dim "
                                 f"{self.k[0].shape[-1]}, got {tuple(k.shape)}; try a new KVCache for another batch")
            self.k = [torch.cat([self.k[g], k[:, g]], dim=1) for g in range(self.num_kv_heads)]
            self.v = [torch.cat([self.v[g], v[:, g]], dim=1) for g in range(self.num_kv_heads)]
            self.pos = [torch.cat([self.pos[g], new_pos]) for g in range(self.num_kv_heads)]
        self.length += t
        if attended:
            self._queried = self.length
            self._maybe_evict()

    def _maybe_evict(self) -> None:
        """Every position so far has been queried: evict when `slack` tokens came since the last time."""
        if self.evict and self.length - self._evicted_at >= self.slack:
            self._evict(self.length)

    def _evict(self, first: int) -> None:
        """Drop what no query at a position >= `first` may read."""
        self._evicted_at = first
        keep = self.pattern.kv_retention(first, heads=self.num_heads)  # [Hq, first]
        G = self.num_heads // self.num_kv_heads
        for g in range(self.num_kv_heads):
            need = torch.cat([keep[g * G:(g + 1) * G].any(0),
                              torch.ones(self.length - first, dtype=torch.bool)]).to(self.pos[g].device)
            alive = need[self.pos[g]]
            if not bool(alive.all()):
                self.k[g], self.v[g], self.pos[g] = self.k[g][:, alive], self.v[g][:, alive], self.pos[g][alive]

    def attend(self, q: torch.Tensor, *, scale: float | None = None, return_lse: bool = False, **tables):
        if self.k is None:
            raise ValueError("KVCache.attend: the cache is empty; call update(k, v) with the new tokens first")
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[1] != self.num_heads \
                or q.shape[0] != self.k[0].shape[0]:
            got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(f"KVCache.attend: expected q of shape [{self.k[0].shape[0]}, {self.num_heads}, m, D] "
                             f"(the cache's batch and query heads), got {got}; try the new tokens' queries")
        m = q.shape[2]
        if m > self.length - self._queried:
            raise ValueError(f"KVCache.attend: expected at most the {self.length - self._queried} token(s) added since "
                             f"the last attend, got m = {m}; try attending each token once, right after its update "
                             f"(earlier positions may have lost keys to eviction)")
        B = q.shape[0]
        out = self.pattern.decode(q, self.k, self.v, key_positions=self.pos,
                                  cache_seqlens=torch.full((B,), self.length), scale=scale, return_lse=return_lse,
                                  **tables)
        self._queried = self.length
        self._maybe_evict()  # the newest tokens are queried now
        return out

