"""Sequence parallelism (NxD's --sequence-parallel-enabled) as a plan: rules, checks, and exact results."""

from __future__ import annotations

import pytest
import torch

from shardwise.errors import ShardwiseError
from shardwise.layout import compute_layout
from shardwise.plan import resolve_plan


def layout_for(shapes, config, tp, overrides=(), sp=True):
    plan = resolve_plan("llama", None, list(overrides), sequence_parallel=sp)
    return compute_layout(shapes, config, plan, plan.mesh(tp))


def test_the_flag_adds_rules_that_split_the_residual_stream(tiny_config, tiny_shapes):
    layout = layout_for(tiny_shapes, tiny_config, 2)
    assert layout.sequence is not None and layout.activations["model.embed_tokens"] == (None, "tensor", None)
    scatter, gather_out, gather_in = layout.sequence_boundaries()
    assert scatter == ["model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj",
                       "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    assert gather_out == ["model.norm"]
    assert gather_in == ["model.layers.0.mlp", "model.layers.0.self_attn", "model.layers.1.mlp",
                         "model.layers.1.self_attn"]
    assert layout_for(tiny_shapes, tiny_config, 1).sequence is None  # nothing to split over
    assert layout_for(tiny_shapes, tiny_config, 2, sp=False).sequence is None


def test_norm_outputs_kept_whole_are_gathered_at_the_norm(tiny_config, tiny_shapes):
    layout = layout_for(tiny_shapes, tiny_config, 2, ["model.layers.*.input_layernorm=[null,null,null]"])
    _, gather_out, gather_in = layout.sequence_boundaries()
    assert "model.layers.0.input_layernorm" in gather_out and "model.layers.0.self_attn" not in gather_in


@pytest.mark.parametrize("overrides, sp, msg", [
    (["model.embed_tokens=[null,tensor,null]"], False,
     "the output of model.embed_tokens is split by sequence but that of model.layers.0.mlp.down_proj is not"),
    (["model.layers.*.input_layernorm=[null,tensor,null]"], False,
     "the rule for model.layers.0.input_layernorm splits the sequence over 'tensor', which needs sequence parallelism"),
    (["model.norm=[null,tensor,null]"], True, "generation takes the last position of model.norm's output"),
    (["model.layers.*=[null,null,null]"], True, "the output of model.layers.0 is the residual stream"),
])
def test_inconsistent_sequence_rules_are_refused(tiny_config, tiny_shapes, overrides, sp, msg):
    with pytest.raises(ShardwiseError, match=msg):
        layout_for(tiny_shapes, tiny_config, 2, overrides, sp)


def test_capacity_estimate_sequence_parallelism_adds_no_bytes_per_token(tiny_raw, tmp_path):
    import json

    from shardwise.capacity import estimate_capacity

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_raw))
    plain = estimate_capacity(cfg, tp_degree=3, batch_size=2)
    sp = estimate_capacity(cfg, tp_degree=3, batch_size=2, sequence_parallel=True)
    gathers = [c for c in sp.collectives if "sequence-parallel" in c.what]
    assert sum(c.count for c in gathers) == 2 * 2 + 1  # attention and MLP inputs per layer, and model.norm
    assert all(c.kind == "broadcast" and c.bytes == 2 * 72 * 4 for c in gathers)  # the decode token, batch 2
    scattered = [c for c in sp.collectives if c.kind == "reduce-scatter"]
    assert sum(c.count for c in scattered) == 1 + 2 * 2  # the embedding, o_proj and down_proj of each layer
    assert not [c for c in sp.collectives if c.kind == "all-reduce"]
    # Partial -> Shard (reduce-scatter) plus Shard -> Replicate (gather) move the bytes of one all-reduce.
    assert sp.sent_per_rank == pytest.approx(plain.sent_per_rank)


def _rank_logits(rank, world, model_path, sp, out_dir, overrides=(), name=None):
    from shardwise.generation import generate
    from shardwise.plan import resolve_plan
    from shardwise.sharded_model import load_sharded

    plan = resolve_plan("llama", overrides=list(overrides), sequence_parallel=sp)
    sharded = load_sharded(model_path, "float32", plan)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    sent = sharded.comm.sent
    generate(sharded.module, prompts, 1, 0, (), comm=sharded.comm)  # the prefill alone
    prefill = dict(sent)
    sent.clear()
    gen = generate(sharded.module, prompts, 5, 0, (), comm=sharded.comm, keep_logits=True)
    decode = {k: v - prefill.get(k, 0) for k, v in sent.items()}  # 4 decode steps' bytes, per collective
    if rank == 0:
        torch.save({"tokens": gen.tokens, "logits": gen.step_logits, "decode": decode},
                   f"{out_dir}/{name or ('sp' if sp else 'tp')}.pt")


@pytest.mark.slow
def test_sequence_parallel_generates_what_tensor_parallelism_does(tiny_checkpoint, tmp_path):
    """TP 3 over a 5-token prompt: slices of 2, 2 and 1 tokens; each decode step's token on rank 0 only."""
    from shardwise.parallel.launch import launch

    launch(_rank_logits, 3, (str(tiny_checkpoint), True, str(tmp_path)))
    launch(_rank_logits, 3, (str(tiny_checkpoint), False, str(tmp_path)))
    sp, tp = torch.load(tmp_path / "sp.pt"), torch.load(tmp_path / "tp.pt")
    assert sp["tokens"] == tp["tokens"]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(sp["logits"], tp["logits"]))
    # Measured: sequence parallelism reduce-scatters instead of all-reducing and broadcasts the decode
    # token instead of padding a gather, so a generated token costs the same bytes as without it.
    assert "reduce-scatter" in sp["decode"] and "all-reduce" not in sp["decode"]
    assert sum(sp["decode"].values()) == pytest.approx(sum(tp["decode"].values()))


@pytest.mark.slow
def test_column_parallel_outputs_split_by_sequence_run_with_sequence_parallelism(tiny_checkpoint, tmp_path):
    """q_proj's output (split by features as computed) placed by sequence over 'tensor' beside the
    sequence-parallel stream, at TP 3 with uneven slices: gathered, placed, sliced back; tokens unchanged."""
    from shardwise.parallel.launch import launch

    rules = ["model.layers.*.self_attn.q_proj=[null,tensor,null]", "model.layers.*.mlp.up_proj=[tensor,null,null]"]
    launch(_rank_logits, 3, (str(tiny_checkpoint), True, str(tmp_path), rules, "placed"))
    launch(_rank_logits, 3, (str(tiny_checkpoint), False, str(tmp_path)))
    placed, tp = torch.load(tmp_path / "placed.pt"), torch.load(tmp_path / "tp.pt")
    assert placed["tokens"] == tp["tokens"]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(placed["logits"], tp["logits"]))
    assert placed["decode"]["all-gather"] > tp["decode"].get("all-gather", 0)  # the placements' gathers
