"""The Hugging Face adapter (attnc.nn.register_hf / hf_attention) in real transformers
models built from tiny configs (no download): padding masks are composed with the
pattern, so a left-padded batch gives sdpa's logits on every real token, in a forward
and in cached generation; masks that cannot be composed are refused, never dropped.

transformers is part of the test extra (pyproject.toml): a missing install fails here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import attnc
from attnc.nn import hf_attention, hf_key_validity, padding_ids, register_hf

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _pair(model_cls, config, src: str, name: str, backend: str):
    """(the model with sdpa, the same weights with the attnc pattern registered as `name`)."""
    torch.manual_seed(0)
    ref = model_cls(config).eval()
    ref.config._attn_implementation = "sdpa"
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation(register_hf(attnc.loads(src).pattern(), name, backend=backend))
    return ref, ours


def _left_padded(B=3, L=11, pads=(3, 0, 6)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return ids, mask


CASES = [
    (LlamaForCausalLM, LlamaConfig(**TINY), "pattern p = causal"),
    (MistralForCausalLM, MistralConfig(**TINY, sliding_window=4), "pattern p = sliding(4)"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model_cls, config, src", CASES, ids=["llama-causal", "mistral-sliding"])
def test_left_padded_batch_matches_sdpa_on_the_real_tokens(model_cls, config, src, backend):
    ref, ours = _pair(model_cls, config, src, f"attnc_test_pad_{backend}_{model_cls.__name__}", backend)
    ids, mask = _left_padded()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - want)[real].abs().max().item() < 1e-4
    # the unpadded sequence gives the same logits as its padded copy (causal models: positions are relative)
    with torch.no_grad():
        alone = ours(input_ids=ids[2:, 6:]).logits
    if model_cls is LlamaForCausalLM:
        assert (alone[0] - got[2, 6:]).abs().max().item() < 1e-4


def _generate_like_sdpa(ref, ours, ids, max_new_tokens: int, **kw) -> None:
    """Greedy generation with a cache: the same tokens and logits (1e-4) as the sdpa model."""
    kw = dict(kw, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, **kw)
        got = ours.generate(input_ids=ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) < 1e-4


def _spy_decode(monkeypatch, record) -> list:
    """What `record(args, kwargs)` returns for every call of runtime.decode.decode."""
    from attnc.runtime import decode as decode_module

    calls = []
    real = decode_module.decode
    monkeypatch.setattr(decode_module, "decode", lambda *a, **kw: calls.append(record(a, kw)) or real(*a, **kw))
    return calls


def test_cached_generation_of_a_left_padded_batch_matches_sdpa():
    ref, ours = _pair(MistralForCausalLM, MistralConfig(**TINY, sliding_window=4), "pattern p = sliding(4)",
                      "attnc_test_generate", "torch")
    ids, mask = _left_padded()
    _generate_like_sdpa(ref, ours, ids, 5, attention_mask=mask)


def test_cached_generation_of_a_left_padded_batch_decodes_with_empty_slots(monkeypatch):
    """A causal Llama keeps every key: its cached steps decode with the padded slots as
    empty positions (-1), and tokens and logits equal sdpa's."""
    calls = _spy_decode(monkeypatch, lambda a, kw: kw.get("key_positions"))
    ref, ours = _pair(LlamaForCausalLM, LlamaConfig(**TINY), "pattern p = causal", "attnc_test_generate_pad", "auto")
    ids, mask = _left_padded()
    _generate_like_sdpa(ref, ours, ids, 5, attention_mask=mask)
    assert len(calls) == 4 * 2 and all(p is not None and bool((p[0] < 0).any()) for p in calls)


def test_cached_generation_without_padding_decodes_and_matches_sdpa(monkeypatch):
    """Generation with a cache and no padding runs pat.decode for the new tokens (no plan per
    length); tokens and logits equal sdpa's with the model's own sliding window."""
    calls = _spy_decode(monkeypatch, lambda a, kw: a[1].shape)
    ref, ours = _pair(MistralForCausalLM, MistralConfig(**TINY, sliding_window=4), "pattern p = sliding(4)",
                      "attnc_test_generate_decode", "auto")
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    _generate_like_sdpa(ref, ours, ids, 6)
    assert len(calls) == 5 * 2 and all(shape[2] == 1 for shape in calls)  # 5 cached steps x 2 layers, one query each


def test_register_hf_asks_transformers_for_the_padding_mask():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = register_hf(attnc.loads("pattern p = sliding(3)").pattern(), "attnc_test_registry")
    assert name in transformers.AttentionInterface._global_mapping
    assert name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def _qkv(B=2, M=6, N=6):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, 4, M, 8, generator=g), torch.randn(B, 2, N, 8, generator=g), torch.randn(B, 2, N, 8, generator=g)


def test_a_padding_mask_composes_with_the_pattern_and_its_inputs():
    """A pattern with its own `doc` input (named like nothing internal) and a padding mask."""
    pat = attnc.loads("pattern p(doc: segments) = causal & same(doc)").pattern()
    fn = hf_attention(pat, backend="torch")
    q, k, v = _qkv()
    doc = torch.tensor([[0, 0, 0, 1, 1, 1], [4, 4, 4, 4, 4, 4]])
    pad = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    out, _ = fn(torch.nn.Module(), q, k, v, pad, scaling=0.5, doc=doc)
    mask = pat.mask(6, heads=4, doc=doc) & pad.bool()[:, None, None, :]
    s = torch.einsum("bhmd,bhnd->bhmn", q, k.repeat_interleave(2, 1)) * 0.5
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0) @ v.repeat_interleave(2, 1)
    real = pad.bool()
    assert (out.transpose(1, 2) - want).abs().amax(-1).transpose(1, 2)[real].max().item() < 1e-5


def test_padding_ids_are_exact_segments():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert padding_ids(valid).tolist() == [[-1, -2, 0, 0], [0, 0, 0, 0]]


def test_masks_that_cannot_be_composed_are_refused_not_dropped():
    B, N = 2, 6
    assert hf_key_validity(None, B, N) is None
    assert hf_key_validity(torch.ones(B, N, dtype=torch.long), B, N) is None
    two_d = torch.ones(B, N + 2, dtype=torch.long)
    two_d[0, :4] = 0  # transformers passes past + current keys: the last N columns are the keys
    assert hf_key_validity(two_d, B, N).tolist() == [[False, False, True, True, True, True], [True] * N]
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    # a 4-D causal mask hides no key from every query: accepted (the pattern replaces it)
    assert hf_key_validity(causal.expand(B, 1, N, N), B, N) is None
    additive = torch.zeros(B, 1, N, N).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert hf_key_validity(additive, B, N) is None
    # the same with two padded keys: refused
    padded = causal & torch.tensor([False, False, True, True, True, True])
    with pytest.raises(ValueError, match=r"4-D mask that hides key 0 of batch element 0 from every query.*try attnc.nn.register_hf"):
        hf_key_validity(padded.expand(B, 1, N, N), B, N)
    with pytest.raises(ValueError, match=r"expected a 2-D attention_mask of shape \[2, >= 6\].*got \(2, 5\); try"):
        hf_key_validity(torch.ones(B, N - 1), B, N)
    with pytest.raises(ValueError, match=r"expected attention_mask as None, a 2-D padding mask.*got a 3-D tensor"):
        hf_key_validity(torch.ones(B, N, N), B, N)
    fn = hf_attention(attnc.loads("pattern p = causal").pattern(), backend="torch")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="hides key 0"):
        fn(torch.nn.Module(), q, k, v, padded.expand(B, 1, N, N))
