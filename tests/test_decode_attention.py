"""decode_attention.py: in a compiled CPU step, one-query attention becomes arithmetic with the library
kernel's result; attention over several queries keeps the kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardwise
from shardwise.compiled_decode import CompiledDecode, PassChain
from shardwise.decode_attention import AttentionAsReduction, attention_by_reduction
from shardwise.matvec import MatvecAsReduction


def _inputs(dtype: torch.dtype, heads: int = 6, kv_heads: int = 2, queries: int = 1, slots: int = 9):
    torch.manual_seed(0)
    q = torch.randn(2, heads, queries, 16, dtype=dtype)
    k = torch.randn(2, kv_heads, slots, 16, dtype=dtype)
    v = torch.randn(2, kv_heads, slots, 16, dtype=dtype)
    mask = torch.rand(2, 1, queries, slots) > 0.3
    mask[..., 0] = True  # every query sees a slot
    return q, k, v, mask


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (5, 1)])
def test_the_arithmetic_is_the_library_kernels_attention(dtype, atol, heads, kv_heads):
    q, k, v, mask = _inputs(dtype, heads, kv_heads)
    gqa = heads != kv_heads
    for attn_mask in (mask, None, torch.where(mask, 0.0, -1e4).to(dtype)):  # boolean, none, additive
        for scale in (None, 0.3):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
            got = attention_by_reduction(q, k, v, attn_mask, scale)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.allclose(got.float(), ref.float(), atol=atol, rtol=atol)


class _Attend(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]) * 2


@pytest.mark.parametrize("queries", [1, 3])
def test_only_one_query_attention_is_rewritten_and_the_result_holds(queries):
    torch._dynamo.reset()
    q, k, v, mask = _inputs(torch.float32, queries=queries)
    rewrite = AttentionAsReduction()
    # No compile cache: a cached graph would skip the pass, and the count below would be 0.
    compiled = torch.compile(_Attend(), dynamic=False,
                             options={"pre_grad_custom_pass": rewrite, "fx_graph_cache": False})
    with torch.no_grad():
        out, ref = compiled(q, k, v, mask), _Attend()(q, k, v, mask)
    assert rewrite.rewritten == (1 if queries == 1 else 0)
    assert torch.allclose(out, ref, atol=1e-5)


def test_causal_or_dropout_attention_is_left_to_the_library():
    torch._dynamo.reset()
    q, k, v, _ = _inputs(torch.float32, heads=2, kv_heads=2, slots=1)
    rewrite = AttentionAsReduction()
    compiled = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), dynamic=False,
                             options={"pre_grad_custom_pass": rewrite, "fx_graph_cache": False})
    with torch.no_grad():
        assert torch.allclose(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
    assert rewrite.rewritten == 0


def test_compiled_decode_chains_both_passes_on_a_cpu_unless_turned_off(tiny_models, monkeypatch):
    sharded = shardwise.load_sharded(tiny_models["gqa9_tied"])
    step = CompiledDecode(sharded.module)
    assert isinstance(step.attention, AttentionAsReduction) and isinstance(step.matvec, MatvecAsReduction)
    chain = PassChain([step.attention, step.matvec])
    assert chain.uuid() == step.attention.uuid() + step.matvec.uuid()  # inductor's cache key changes with either
    monkeypatch.setenv("SHARDWISE_ATTENTION_REDUCTION", "0")
    assert CompiledDecode(sharded.module).attention is None
    monkeypatch.setenv("SHARDWISE_ATTENTION_REDUCTION", "maybe")
    with pytest.raises(shardwise.ShardwiseError, match="SHARDWISE_ATTENTION_REDUCTION"):
        CompiledDecode(sharded.module)
