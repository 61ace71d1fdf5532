"""The Hugging Face transformers adapter: a bound pattern as an `attn_implementation`.

input:  a bound pattern, and per call what transformers passes an attention function
        (query / key / value, its attention_mask, the pattern's run-time inputs as kwargs).
output: `hf_attention` (the registry's function), `register_hf` (the name registered with
        transformers, and its 2-D padding mask function), key padding as a `segments` input
        (`with_key_padding`, `padding_ids`, `hf_key_validity`). `attnc.nn` re-exports them.
does not: import transformers before `register_hf` runs, or run attention itself (the op and
        `pat.decode` do).
"""

from __future__ import annotations

import dataclasses

import torch

from . import ir as _ir
from .program import BoundPattern


def with_key_padding(pattern: BoundPattern) -> tuple[BoundPattern, str]:
    """``(pattern & same(pad), pad)``: the pattern with one more `segments` input, `pad`
    (a name none of its inputs has), for key padding masks (`padding_ids`).

    [Note: padding] A padding mask composes with any pattern as `same` over ids
    that are 0 for every real token and distinct negative numbers for the padded
    ones (`padding_ids`): a real query then sees exactly the real keys its pattern
    allows, a padded query at most itself. The pattern's positions stay absolute
    (padding included), as in transformers' own masks.
    """
    taken = {s.name for s in pattern.ir.inputs}
    pad = "key_padding"
    while pad in taken:
        pad += "_"
    ir = pattern.ir
    spec = _ir.InputSpec(name=pad, kind="segments")
    body = _ir.Inter(parts=(ir.body, _ir.Same(input=pad, span=ir.body.span)), span=ir.body.span)
    padded = BoundPattern(pattern.program, dataclasses.replace(ir, body=body, inputs=ir.inputs + (spec,)), pattern.params)
    return padded, pad


def padding_ids(valid: torch.Tensor) -> torch.Tensor:
    """bool [B, N] key validity -> int64 segment ids: 0 where valid, -1 - position where padded."""
    pos = torch.arange(valid.shape[-1], device=valid.device)
    return torch.where(valid, torch.zeros_like(pos), -1 - pos).expand(valid.shape).contiguous()


def hf_key_validity(attention_mask, B: int, N: int) -> torch.Tensor | None:
    """The keys a transformers ``attention_mask`` allows: bool [B or 1, N], or None
    when it masks no key (or is None).

    A 2-D mask ``[B, >= N]`` (1 / True = a real token; the last N columns are the
    keys, as transformers slices it) is padding. A 4-D mask ``[B, 1 or H, M, N]``
    (bool, or additive float with 0 where allowed) is the model's own mask: the
    pattern replaces it, so it is accepted only when it hides no key from every
    query; padding inside it is refused with a ValueError, never dropped in
    silence. (transformers 4.x unmasks padded query rows of 4-D masks only for
    its own "sdpa" implementation, never for a registered name.)
    """
    if attention_mask is None:
        return None
    m = attention_mask
    if not isinstance(m, torch.Tensor) or m.dim() not in (2, 4):
        got = f"{m.dim()}-D tensor of shape {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"attnc attention: expected attention_mask as None, a 2-D padding mask [B, N] or a 4-D mask "
                         f"[B, 1, M, N], got a {got}; try attention_mask=None or the tokenizer's 2-D mask")
    allowed = m if m.dtype == torch.bool else (m != 0 if m.dim() == 2 else m == 0)
    if m.dim() == 2:
        if m.shape[0] not in (1, B) or m.shape[1] < N:
            raise ValueError(f"attnc attention: expected a 2-D attention_mask of shape [{B}, >= {N}] (one column per key), "
                             f"got {tuple(m.shape)}; try the tokenizer's attention_mask for this batch")
        valid = allowed[:, -N:]
        return None if bool(valid.all()) else valid
    if m.shape[0] not in (1, B) or m.shape[-1] != N:
        raise ValueError(f"attnc attention: expected a 4-D attention_mask of shape [{B}, 1, M, {N}], got {tuple(m.shape)}")
    hidden = ~allowed.flatten(1, 2).any(1)  # [B, N]: keys no query (of any head) may see
    if bool(hidden.any()):
        b, j = (int(x) for x in hidden.nonzero()[0])
        raise ValueError(
            f"attnc attention: expected attention_mask to be None or a 2-D padding mask; got a 4-D mask that hides key {j} "
            f"of batch element {b} from every query (padding?). The pattern replaces the model's mask, and padding cannot "
            f"be separated from a 4-D mask; try attnc.nn.register_hf (it asks transformers for the 2-D mask), or pass "
            f"the padding as a segments input of the pattern")
    return None


#: queries per step up to which the HF adapter decodes (`pat.decode`) instead of calling the op
DECODE_MAX_QUERIES = 16


def hf_attention(pattern: BoundPattern, *, backend: str = "auto"):
    """An attention function in the form of Hugging Face transformers' registry.

    ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)``
    with query ``[B, H, M, D]`` and key / value ``[B, Hkv, N, D]`` (GQA kept),
    returning ``(attn_output [B, M, H, D], None)``. The pattern replaces the
    model's own mask; a padding ``attention_mask`` (2-D ``[B, N]``, what
    `register_hf` makes transformers pass) is composed with it: padded keys are
    never attended ([Note: padding], `with_key_padding`). A 4-D mask that hides
    keys is refused (`hf_key_validity`). Run-time inputs of the pattern come
    from ``kwargs[name]``. During cached generation (at most `DECODE_MAX_QUERIES` new
    queries against a longer cache, no padding, no gradients, backend "auto" or "torch")
    the adapter runs `pattern.decode`: only the keys the pattern allows are read, without a
    plan per length.
    """
    names = [s.name for s in (*pattern.ir.inputs, *pattern.ir.tables)]
    padded = None
    decodable = not pattern.layout.axes and not pattern.ir.inputs and not pattern.has_topk()

    def attnc_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        nonlocal padded
        if dropout and getattr(module, "training", False):
            raise ValueError(f"attnc attention: expected dropout=0.0, got {dropout}; try attention_dropout=0.0 in the config")
        inputs = {n: kwargs[n] for n in names if n in kwargs}
        valid = hf_key_validity(attention_mask, query.shape[0], key.shape[2])
        m, n = query.shape[2], key.shape[2]
        decoding = (decodable and m <= DECODE_MAX_QUERIES and m < n and backend in ("auto", "torch")
                    and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))))
        if decoding and valid is None:
            # generation with a cache: the newest tokens against the whole cache, no plan per length
            out = pattern.decode(query, key, value, scale=scaling, **inputs)
        elif decoding and bool((valid[:, 1:] >= valid[:, :-1]).all()):
            # left padding: the padded slots get no position, the real keys keep their cache index
            pos = torch.where(valid, torch.arange(n, device=valid.device), -1)
            Hkv = key.shape[1]
            out = pattern.decode(query, [key[:, g] for g in range(Hkv)], [value[:, g] for g in range(Hkv)],
                                 key_positions=[pos] * Hkv, cache_seqlens=torch.full((query.shape[0],), n),
                                 scale=scaling, **inputs)
        elif valid is None:
            out = pattern(query, key, value, scale=scaling, backend=backend, **inputs)
        else:
            if padded is None:
                padded = with_key_padding(pattern)
            pat, pad = padded
            out = pat(query, key, value, scale=scaling, backend=backend, **inputs, **{pad: padding_ids(valid)})
        return out.transpose(1, 2).contiguous(), None

    return attnc_attention


def hf_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                    mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask function `register_hf` gives transformers for the name (its
    ``AttentionMaskInterface``): the 2-D padding mask ``[B, kv_length]`` (bool), or None
    when nothing is padded. The pattern is the rest of the mask."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if mask.shape[1] == kv_length and bool(mask.all()) else mask


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
    # transformers >= 4.53 builds masks per attention implementation, and gives an unknown
    # one no mask at all -- the padding would be lost. Ask for the 2-D padding mask.
    masks = getattr(transformers, "AttentionMaskInterface", None)
    if masks is None:
        try:
            from transformers.masking_utils import AttentionMaskInterface as masks
        except ImportError:  # older: the model passes its own 4-D mask (hf_key_validity)
            masks = None
    if masks is not None:
        masks.register(name, hf_padding_mask)
    return name
