"""attnc.nn: SparseAttention (projections, GQA, [B, M, E]) and the Hugging Face adapter."""

import math

import pytest
import torch

import attnc
from attnc.nn import SparseAttention, hf_attention
from conftest import EXAMPLES


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def manual(layer, x, mask):
    """The layer written out: projections, heads, masked softmax (dense), output projection."""
    B, M, E = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(B, M, H, D).transpose(1, 2)
    k = layer.k_proj(x).view(B, M, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    v = layer.v_proj(x).view(B, M, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    out = torch.softmax(s, -1) @ v
    return layer.out_proj(out.transpose(1, 2).reshape(B, M, H * D))


def test_layer_from_a_file_with_gqa_matches_the_written_out_layer():
    torch.manual_seed(0)
    layer = SparseAttention(EXAMPLES / "mistral.attn", embed_dim=32, num_heads=4, num_kv_heads=2, window=5).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 23, 32)
    want = manual(layer, x, layer.pattern.mask(23, heads=4))
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert layer.q_proj.weight.grad is not None and torch.isfinite(x.grad).all()
    assert "pattern=mistral" in repr(layer)


def test_layer_without_projections_and_with_inputs_and_grids():
    pat = attnc.load(EXAMPLES / "packed.attn").pattern()
    layer = SparseAttention(pat, num_heads=2)
    x = torch.randn(1, 10, 16)
    doc = torch.tensor([0] * 4 + [1] * 6)
    y = layer(x, doc=doc)
    q = x.view(1, 10, 2, 8).transpose(1, 2)
    torch.testing.assert_close(y, pat(q, q, q, doc=doc).transpose(1, 2).reshape(1, 10, 16))
    grid_layer = SparseAttention(EXAMPLES / "natten2d.attn", embed_dim=8, num_heads=2, size=3, grid=(4, 5))
    assert grid_layer(torch.randn(1, 20, 8)).shape == (1, 20, 8)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_heads=4, num_kv_heads=3, embed_dim=32), "expected num_heads to be a multiple of num_kv_heads"),
    (dict(num_heads=3, embed_dim=32), "expected embed_dim divisible by num_heads"),
    (dict(num_heads=0), "expected num_heads to be a positive integer"),
])
def test_bad_layer_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SparseAttention(EXAMPLES / "mistral.attn", **kwargs)


def test_bad_layer_inputs():
    layer = SparseAttention(EXAMPLES / "mistral.attn", embed_dim=16, num_heads=2)
    with pytest.raises(ValueError, match=r"query: expected last dim embed_dim=16, got \(1, 5, 8\)"):
        layer(torch.randn(1, 5, 8))
    bare = SparseAttention(attnc.load(EXAMPLES / "mistral.attn").pattern(), num_heads=2)
    with pytest.raises(ValueError, match=r"query: expected a 3-D tensor \[B, L, features\], got 2-D"):
        bare(torch.randn(5, 8))
    with pytest.raises(ValueError, match="expected pattern parameters only with a file path"):
        SparseAttention(attnc.load(EXAMPLES / "mistral.attn").pattern(), num_heads=2, window=3)


def test_hf_adapter_layout_without_transformers():
    """transformers passes [B, H, M, D] (GQA: fewer k/v heads) and wants [B, M, H, D] back."""
    pat = attnc.loads("pattern p = sliding(3)").pattern()
    fn = hf_attention(pat, backend="torch")
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    out, weights = fn(torch.nn.Module(), q, k, v, None, scaling=0.5)
    assert weights is None and out.shape == (2, 9, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, pat(q, k, v, scale=0.5).transpose(1, 2))
    module = torch.nn.Module().train()
    with pytest.raises(ValueError, match="expected dropout=0.0"):
        fn(module, q, k, v, None, dropout=0.1)


def test_register_hf_with_transformers():
    import transformers  # in the test extra: a missing install fails, never skips
    from attnc.nn import register_hf

    pat = attnc.loads("pattern p = sliding(3)").pattern()
    name = register_hf(pat, "attnc_test_sliding")
    registry = getattr(transformers, "AttentionInterface", None)
    if registry is not None:
        assert name in registry._global_mapping
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        assert name in ALL_ATTENTION_FUNCTIONS
