"""The layout is pure: tested here with no processes and no weights."""

from __future__ import annotations

import itertools

import pytest

from shardwise.config import config_from_dict
from shardwise.errors import ShardwiseError
from shardwise.layout import Segment, _even_segments, assign_heads, compute_layout
from shardwise.mesh import Mesh
from shardwise.plan import builtin_plan


@pytest.mark.parametrize("heads,kv,parts", [
    (h, kv, p)
    for h, kv, p in itertools.product([1, 2, 3, 4, 6, 8, 9, 12, 16, 32, 128], [1, 2, 3, 4, 8, 16], range(1, 9))
    if h % kv == 0 and p <= h
] + [(128, 8, 64)])
def test_assign_heads_is_exact(heads, kv, parts):
    a = assign_heads(heads, kv, parts)
    group = heads // kv
    assert len(a.q) == len(a.kv) == parts
    n_kv, n_q = len(a.kv[0]), len(a.q[0])
    # Every rank has the same shape (the model code needs uniform local head counts) ...
    assert all(len(k) == n_kv and len(q) == n_q for k, q in zip(a.kv, a.q))
    assert n_kv >= 1 and n_q % n_kv == 0
    real_q = []
    for kv_heads, q_heads in zip(a.kv, a.q):
        per = n_q // n_kv
        for slot, qh in enumerate(q_heads):
            if qh is not None:
                # ... and each real query head attends with the KV head of its own group.
                assert kv_heads[slot // per] == qh // group
                real_q.append(qh)
    # Every real query head is computed exactly once (padding heads are None).
    assert sorted(real_q) == list(range(heads))


def test_assign_heads_prefers_fewer_kv_heads():
    # SmolLM2 (9/3) at TP 2: padding one KV group beats replicating every KV head.
    a = assign_heads(9, 3, 2)
    assert [len(k) for k in a.kv] == [2, 2] and a.kv[1] == (2, None)
    # Llama-3.1-405B (128/8) at TP 64: each KV head replicated 8 times, no padding at all.
    b = assign_heads(128, 8, 64)
    assert all(len(k) == 1 and len(q) == 2 and None not in q for k, q in zip(b.kv, b.q))


def test_even_segments_pad_the_tail():
    assert _even_segments(101, 4, 0) == (Segment(0, 26),)
    assert _even_segments(101, 4, 3) == (Segment(78, 23), Segment(None, 3))
    assert _even_segments(3, 4, 3) == (Segment(None, 1),)


SMOL = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 2, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}


def _tensors(cfg):
    h, hd = cfg.hidden_size, cfg.head_dim
    t = {"model.embed_tokens.weight": ((cfg.vocab_size, h), "BF16"), "model.norm.weight": ((h,), "BF16")}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = ((cfg.num_heads * hd, h), "BF16")
        t[p + "self_attn.k_proj.weight"] = ((cfg.num_kv_heads * hd, h), "BF16")
        t[p + "self_attn.v_proj.weight"] = ((cfg.num_kv_heads * hd, h), "BF16")
        t[p + "self_attn.o_proj.weight"] = ((h, cfg.num_heads * hd), "BF16")
        for n in ("gate_proj", "up_proj"):
            t[p + f"mlp.{n}.weight"] = ((cfg.intermediate_size, h), "BF16")
        t[p + "mlp.down_proj.weight"] = ((h, cfg.intermediate_size), "BF16")
        t[p + "input_layernorm.weight"] = ((h,), "BF16")
        t[p + "post_attention_layernorm.weight"] = ((h,), "BF16")
    return t


def test_layout_of_smollm2_at_tp2():
    cfg = config_from_dict(SMOL)
    layout = compute_layout(_tensors(cfg), cfg, builtin_plan("llama"), Mesh.tensor_only(2))
    q = layout.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert [s.local_shape for s in q.shards] == [(6 * 64, 576), (6 * 64, 576)]
    assert q.shards[1].dims[0] == (Segment(6 * 64, 3 * 64), Segment(None, 3 * 64))
    o = layout.tensors["model.layers.0.self_attn.o_proj.weight"]
    assert o.split_dims == (1,) and o.shards[1].dims[1] == q.shards[1].dims[0]
    # Tied lm_head reads the embedding and is split the same way; norms are replicated.
    assert layout.tensors["lm_head.weight"].source == "model.embed_tokens.weight"
    assert "model.norm.weight" in layout.replicated_names
    # No gather reordering is needed for the vocabulary: padding only at the tail.
    assert layout.gather_index("lm_head.weight", 0) is None


# Llama-3.1-405B's shapes (from examples/configs/llama-3.1-405b/config.json).
LLAMA_405B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
              "intermediate_size": 53248, "num_attention_heads": 128, "num_key_value_heads": 8,
              "num_hidden_layers": 126, "vocab_size": 128256, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-05, "max_position_embeddings": 131072, "rope_theta": 500000.0}


def test_layout_needs_no_weights_for_405b():
    cfg = config_from_dict({**LLAMA_405B, "num_hidden_layers": 2})  # two layers suffice for the shapes
    layout = compute_layout(_tensors(cfg), cfg, builtin_plan("llama"), Mesh.tensor_only(64))
    k = layout.tensors["model.layers.1.self_attn.k_proj.weight"]
    assert all(s.local_shape == (128, 16384) for s in k.shards)  # one (replicated) KV head per rank
    q = layout.tensors["model.layers.1.self_attn.q_proj.weight"]
    assert all(s.local_shape == (2 * 128, 16384) for s in q.shards)  # 128 heads / 64 ranks
    embed = layout.tensors["model.embed_tokens.weight"]
    assert all(s.local_shape == (128256 // 64, 16384) for s in embed.shards)  # vocabulary rows split evenly


def test_plan_rule_that_matches_nothing_is_an_error():
    cfg = config_from_dict(SMOL)
    plan = builtin_plan("llama").with_overrides(["model.layers.*.self_attn.o_proj_weight=[null, tensor]"])
    with pytest.raises(ShardwiseError, match=r"o_proj_weight.*nearest real names: model.layers.\*.self_attn.o_proj"):
        compute_layout(_tensors(cfg), cfg, plan, Mesh.tensor_only(2))
