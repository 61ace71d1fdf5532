"""Modules: `SparseAttention`, a drop-in attention layer, and the Hugging Face adapter.

input:  a bound pattern (or an `.attn` file and its parameters), layer sizes.
output: `torch.nn.Module`s / attention functions that call the attnc op.
does not: define masks (the pattern does) or pick kernels (the op does).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .program import BoundPattern, load


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
        out = self.pattern(q, k, v, scale=self.scale, backend=self.backend, grid=grid if grid is not None else self.grid,
                           **inputs)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return self.out_proj(out) if self.out_proj is not None else out


# ----------------------------------------------------------------------------- Hugging Face transformers


def hf_attention(pattern: BoundPattern, *, backend: str = "auto"):
    """An attention function in the form of Hugging Face transformers' registry.

    ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)``
    with query ``[B, H, M, D]`` and key / value ``[B, Hkv, N, D]`` (GQA kept),
    returning ``(attn_output [B, M, H, D], None)``. The pattern replaces the
    model's own mask: ``attention_mask`` is not applied (use ``same(doc)`` for
    packed or padded batches, passed as ``kwargs[name]``).
    """
    names = [s.name for s in pattern.ir.inputs]

    def attnc_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        if dropout and getattr(module, "training", False):
            raise ValueError(f"attnc attention: expected dropout=0.0, got {dropout}; try attention_dropout=0.0 in the config")
        inputs = {n: kwargs[n] for n in names if n in kwargs}
        out = pattern(query, key, value, scale=scaling, backend=backend, **inputs)
        return out.transpose(1, 2).contiguous(), None

    return attnc_attention


def register_hf(pattern: BoundPattern, name: str = "attnc", *, backend: str = "auto") -> str:
    """Register `pattern` as ``attn_implementation=name`` in transformers.

    >>> attnc.nn.register_hf(pat, "attnc_sliding")
    >>> model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="attnc_sliding")
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("register_hf: expected the optional dependency `transformers`, which is not installed; "
                          "try pip install transformers") from None
    fn = hf_attention(pattern, backend=backend)
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is not None:
        interface.register(name, fn)
    else:  # transformers before AttentionInterface (< 4.50): the module-level dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        ALL_ATTENTION_FUNCTIONS[name] = fn
    return name
